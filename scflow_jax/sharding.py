"""Device mesh, state shardings and global batch assembly.

The mesh has a ``data`` axis (batch parallelism). Parameters, EMAs and optimizer states are
replicated across it; the batch is split along it. Global batch arithmetic is checked here,
once, with errors that name both numbers.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_data: int = -1, num_devices: int = -1) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (-1: all of them).

    ``num_data`` is the data-axis size (-1 fills it); it must equal the devices used.
    """
    available = jax.devices()
    if num_devices == -1:
        num_devices = len(available)
    if not 1 <= num_devices <= len(available):
        raise ValueError(f"config.mesh.num_devices={num_devices} but {len(available)} "
                         f"devices are available")
    if num_devices != len(available) and jax.process_count() > 1:
        raise ValueError("config.mesh.num_devices must be -1 (all devices) in a multi-process run")
    if num_data == -1:
        num_data = num_devices
    if num_data != num_devices:
        raise ValueError(
            f"config.mesh.data={num_data} does not match the {num_devices} devices in use "
            f"(use -1 to fill the mesh)")
    # Auto axes: XLA propagates shardings from the annotated inputs and outputs (GSPMD),
    # so model code needs no sharding annotations of its own.
    return jax.make_mesh((num_data,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=available[:num_devices])


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh, field: str) -> int:
    """Validates the global batch against devices and processes; returns the per-process batch."""
    n_dev = mesh.devices.size
    if global_batch <= 0:
        raise ValueError(f"{field}={global_batch} must be positive")
    if global_batch % n_dev:
        raise ValueError(
            f"{field}={global_batch} is not divisible by the number of devices ({n_dev}); "
            f"choose a multiple of {n_dev}")
    n_proc = jax.process_count()
    if global_batch % n_proc:
        raise ValueError(
            f"{field}={global_batch} is not divisible by the number of processes ({n_proc})")
    return global_batch // n_proc


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(abstract_state: Any, mesh) -> Any:
    """Shardings for a state pytree: replicated over the data axis."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def shard_batch(local_batch: dict, mesh) -> dict:
    """Process-local numpy arrays -> global jax arrays split along the data axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def put_replicated(tree: Any, mesh) -> Any:
    """Places host values (e.g. frozen teacher parameters) replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))
