"""Device mesh, state shardings and global batch assembly.

The mesh has two axes: ``data`` (pure batch parallelism: parameters replicated) and ``fsdp``
(fully sharded data parallelism: the batch is split over it too, and every large parameter
is split along one of its dimensions, gathered by XLA where a computation needs it). The
batch is split over both axes together, so ``data * fsdp`` devices each see
``global_batch / (data * fsdp)`` examples.

Parameter rules depend on a leaf's shape only. That is what makes them generic over any
Flax parameter tree, and it is also why optimizer moments, the target network and the EMAs
(which have their parameters' shapes) end up sharded exactly like their parameters.

Global batch arithmetic is checked here, once, with errors that name the config field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_FSDP_MIN_SIZE = 2**16


def resolve_mesh_shape(num_data: int, num_fsdp: int, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with one ``-1`` filled so that ``data * fsdp == num_devices``."""
    for name, value in (("data", num_data), ("fsdp", num_fsdp)):
        if value == 0 or value < -1:
            raise ValueError(f"config.mesh.{name}={value} must be a positive size or -1")
    if num_data == -1 and num_fsdp == -1:
        raise ValueError(
            "config.mesh.data and config.mesh.fsdp are both -1; at most one axis "
            "can be filled with the remaining devices"
        )
    if num_data == -1 or num_fsdp == -1:
        known = num_fsdp if num_data == -1 else num_data
        if num_devices % known:
            raise ValueError(
                f"config.mesh.{'fsdp' if num_data == -1 else 'data'}={known} does not divide "
                f"the {num_devices} devices in use, so the other mesh axis (-1) cannot fill them"
            )
        filled = num_devices // known
        return (filled, known) if num_data == -1 else (known, filled)
    if num_data * num_fsdp != num_devices:
        shape = f"config.mesh.data={num_data}" + (
            f" x config.mesh.fsdp={num_fsdp} = {num_data * num_fsdp}" if num_fsdp != 1 else ""
        )
        raise ValueError(
            f"{shape} does not match the {num_devices} devices in use "
            f"(use -1 for one axis to fill the mesh)"
        )
    return num_data, num_fsdp


def make_mesh(
    num_data: int = -1, num_devices: int = -1, num_fsdp: int = 1, devices=None
) -> jax.sharding.Mesh:
    """A ``(data, fsdp)`` mesh over the first ``num_devices`` devices (-1: all of them) of
    ``devices`` (default ``jax.devices()``; a deviceless topology's devices plan a step for hardware
    not present)."""
    available = list(jax.devices() if devices is None else devices)
    if num_devices == -1:
        num_devices = len(available)
    if not 1 <= num_devices <= len(available):
        raise ValueError(
            f"config.mesh.num_devices={num_devices} but {len(available)} devices are available"
        )
    if num_devices != len(available) and jax.process_count() > 1:
        raise ValueError("config.mesh.num_devices must be -1 (all devices) in a multi-process run")
    shape = resolve_mesh_shape(num_data, num_fsdp, num_devices)
    # Auto axes: XLA propagates shardings from the annotated inputs and outputs (GSPMD),
    # so model code needs no sharding annotations of its own.
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(
        shape, BATCH_AXES, axis_types=(auto, auto), devices=available[:num_devices]
    )


def mesh_from_config(config, devices=None) -> jax.sharding.Mesh:
    m = config.mesh
    return make_mesh(m.data, m.num_devices, m.get("fsdp", 1), devices=devices)


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh, field: str) -> int:
    """Validates the global batch against devices and processes; returns the per-process batch."""
    n_dev = mesh.devices.size
    if global_batch <= 0:
        raise ValueError(f"{field}={global_batch} must be positive")
    if global_batch % n_dev:
        raise ValueError(
            f"{field}={global_batch} is not divisible by the number of devices in the mesh "
            f"({n_dev} = config.mesh.data {dict(mesh.shape).get(DATA_AXIS, 1)} x "
            f"config.mesh.fsdp {fsdp_size(mesh)}); choose a multiple of {n_dev}"
        )
    n_proc = jax.process_count()
    if global_batch % n_proc:
        raise ValueError(
            f"{field}={global_batch} is not divisible by the number of processes ({n_proc})"
        )
    return global_batch // n_proc


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sampler_shardings(abstract_params: Any, mesh) -> Any:
    """How the sample stage and evaluation hold a network's parameters: whole on every device,
    even on a mesh whose fsdp axis splits the training state (as the training grids and the
    evaluated teacher, put replicated, already were).

    Split, XLA's partitioner splits the sampler's computation too and moves activations between
    the devices; whole, the sampler needs no collective, at the price of one whole copy of the
    network per device (docs/performance.md has the counts for the SD 1.5 sampler)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_params)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp`` together (over those of
    the two that ``mesh`` has: a 1-D ``data`` mesh works too)."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def fsdp_size(mesh) -> int:
    return dict(mesh.shape).get(FSDP_AXIS, 1)


# ------------------------------------------------------------------ parameter sharding rules
@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """FSDP rule: a leaf with at least ``fsdp_min_size`` elements is split over the ``fsdp``
    axis along its largest dimension that the axis size divides. A large leaf with no such
    dimension is replicated, or is an error naming it when ``strict``."""

    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
    strict: bool = False

    @classmethod
    def from_config(cls, config) -> "ShardingRules":
        m = config.mesh
        rules = cls(
            fsdp_min_size=m.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE),
            strict=m.get("fsdp_strict", False),
        )
        if rules.fsdp_min_size < 1:
            raise ValueError(f"config.mesh.fsdp_min_size={rules.fsdp_min_size} must be >= 1")
        return rules


class UnshardableParameterError(ValueError):
    """Strict FSDP: a large parameter has no dimension the fsdp axis size divides."""


def fsdp_spec(
    shape: tuple[int, ...], num_fsdp: int, rules: ShardingRules, name: str = ""
) -> P | None:
    """The PartitionSpec of a leaf of ``shape``; ``None`` when a large leaf cannot be split."""
    if num_fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < rules.fsdp_min_size:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % num_fsdp == 0]
    if not divisible:
        if rules.strict:
            raise UnshardableParameterError(
                f"parameter {name!r} of shape {tuple(shape)} has no dimension divisible by "
                f"config.mesh.fsdp={num_fsdp}; choose another fsdp size, raise "
                f"config.mesh.fsdp_min_size above {int(np.prod(shape))}, or set "
                f"config.mesh.fsdp_strict=False to replicate it"
            )
        return None
    # Largest dimension; ties go to the later one (a kernel's output features).
    axis = max(divisible, key=lambda i: (shape[i], i))
    return P(*([None] * axis + [FSDP_AXIS]))


def _keystr(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


@dataclasses.dataclass
class ShardingSummary:
    sharded_leaves: int = 0
    sharded_bytes: int = 0
    replicated_leaves: int = 0
    replicated_bytes: int = 0
    unshardable: list = dataclasses.field(default_factory=list)  # large leaves kept whole

    def describe(self) -> str:
        mb = lambda b: b / 2**20  # noqa: E731
        text = (
            f"FSDP: {self.sharded_leaves} arrays ({mb(self.sharded_bytes):.1f} MiB) sharded, "
            f"{self.replicated_leaves} arrays ({mb(self.replicated_bytes):.1f} MiB) replicated"
        )
        if self.unshardable:
            text += (
                f"; {len(self.unshardable)} large arrays have no dimension divisible by the "
                f"fsdp size and are replicated, e.g. {self.unshardable[0]}"
            )
        return text


def state_shardings(
    abstract_state: Any,
    mesh,
    rules: ShardingRules | None = None,
    summary: ShardingSummary | None = None,
) -> Any:
    """NamedShardings for a state pytree under the FSDP ``rules`` (replicated when the mesh's
    fsdp axis is 1). ``summary``, if given, is filled with sharded/replicated counts."""
    rules = rules or ShardingRules()
    num_fsdp = fsdp_size(mesh)
    summary = summary if summary is not None else ShardingSummary()

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        spec = fsdp_spec(shape, num_fsdp, rules, _keystr(path))
        if spec is None:
            summary.unshardable.append(f"{_keystr(path)} {shape}")
            spec = P()
        if spec == P():
            summary.replicated_leaves += 1
            summary.replicated_bytes += nbytes
        else:
            summary.sharded_leaves += 1
            summary.sharded_bytes += nbytes
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def gathered_at_use(network_fn, mesh, rules: ShardingRules | None = None):
    """``network_fn(params, *args)`` with ``params`` gathered whole (replicated) where it is
    called, on a mesh with an fsdp axis; ``network_fn`` itself otherwise.

    FSDP stores parameters split; where a network runs on them, XLA's SPMD partitioner may
    instead split the computation along the parameters' split dimension and move the batch's
    activations between devices (all-to-alls, reduce-scatters of activations: seen in the
    discriminator's backward pass and the UNet's upsampling convolutions), which keeps extra
    activation copies live. Gathering the parameters first leaves every activation split by
    batch. The gradient goes back split as ``rules`` split the parameter (a reduce-scatter,
    not an all-reduce of the whole gradient). The cost is one whole copy of the network's
    parameters while it runs; the training steps pay it on GPUs only (xla_gpu.py says why).
    """
    num_fsdp = fsdp_size(mesh)
    if num_fsdp == 1:
        return network_fn
    rules = dataclasses.replace(rules or ShardingRules(), strict=False)
    whole = replicated(mesh)

    def gather(leaf):
        split = NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), num_fsdp, rules) or P())

        @jax.custom_vjp
        def gathered(x):
            return jax.lax.with_sharding_constraint(x, whole)

        def forward(x):
            return gathered(x), None

        def backward(_, cotangent):
            return (jax.lax.with_sharding_constraint(cotangent, split),)

        gathered.defvjp(forward, backward)
        return gathered(leaf)

    def run(params, *args, **kwargs):
        return network_fn(jax.tree.map(gather, params), *args, **kwargs)

    return run


# --------------------------------------------------------------------------- batches
def process_batch_indices(mesh, global_batch: int) -> np.ndarray:
    """Global row indices of the batch that this process's devices hold, in increasing order.

    A process loads exactly these rows, so a multi-process run sees the same global batch
    (in the same order) as a single-process run whatever the mesh's device layout.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def shard_batch(local_batch: dict, mesh) -> dict:
    """Process-local numpy arrays (this process's rows, see process_batch_indices) -> global
    jax arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def shard_global_batch(batch: Any, mesh) -> Any:
    """Host arrays that every process holds in full (a whole global batch: sampling noise,
    sample indices, conditions) -> global arrays split over the batch axes.

    Each process copies only the rows of its own devices (those of process_batch_indices),
    so the same call works with one process or many; ``shard_batch`` is the form for data
    loaders that read only their own rows. Leading dimensions must be a multiple of the
    mesh size (``pad_batch``)."""
    target = batch_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        if not x.ndim or x.shape[0] % mesh.devices.size:
            raise ValueError(
                f"a global batch of shape {x.shape} does not split over the "
                f"{mesh.devices.size} devices of the mesh (pad it with pad_batch)"
            )
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return jax.tree.map(one, batch)


def pad_batch(batch: Any, size: int) -> Any:
    """Every array of ``batch`` with copies of its last row appended up to ``size`` rows (a
    short batch in a compiled shape, or a multiple of the device count); callers drop the
    rows past the original count."""

    def one(x):
        x = np.asarray(x)
        if not 1 <= len(x) <= size:
            raise ValueError(f"cannot pad a batch of {len(x)} rows to {size} rows")
        return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x

    return jax.tree.map(one, batch)


def padded_size(num_rows: int, mesh) -> int:
    """``num_rows`` rounded up to a multiple of the mesh's device count."""
    return -(-num_rows // mesh.devices.size) * mesh.devices.size


def put_replicated(tree: Any, mesh) -> Any:
    """Places host values (e.g. the null-prompt embedding) replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (an all-gather when another process holds
    part of an array; a plain copy otherwise). Collective: every process must call it."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))
