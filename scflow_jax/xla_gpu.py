"""What the training steps do differently for XLA:GPU on a mesh of several GPUs.

1. Their collectives (the gradients' all-reduce or reduce-scatter, FSDP's parameter
all-gathers) run synchronously (``xla_gpu_disable_async_collectives``, given to ``jax.jit`` per
program) unless ``config.mesh.overlap_collectives`` is True. With XLA:GPU's default
asynchronous collectives the schedule of a backward pass moves the weight-gradient convolutions,
whose results the all-reduces consume, to its end, and every activation they read stays live
until then; under FSDP the asynchronous all-gathers and reduce-scatters do the same. The price
is that communication no longer overlaps compute.

2. Under FSDP each network gathers its parameters where it runs (``sharding.gathered_at_use``):
XLA:GPU's partitioner otherwise moves activations between the GPUs instead. TPUs keep XLA's own
partitioning: there the gather's whole parameter copies cost memory, and which way is faster is
not measured.

docs/scaling.md explains both; docs/performance.md has the measurements.
"""

from __future__ import annotations

from scflow_jax import sharding

# XLA's names for the collectives the training steps use (after paired_batch.py, no all-to-all).
SYNC_COLLECTIVES = {"xla_gpu_disable_async_collectives": "ALLREDUCE,REDUCESCATTER,ALLGATHER"}


def _on_several_gpus(mesh) -> bool:
    return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "gpu"


def step_compiler_options(mesh, overlap_collectives: bool = False) -> dict | None:
    """``compiler_options`` for the jitted training step on ``mesh``: synchronous collectives on
    a multi-GPU mesh; nothing for one device, for CPU and TPU, or when ``overlap_collectives``
    (XLA's default schedule, more memory)."""
    if overlap_collectives or not _on_several_gpus(mesh):
        return None
    return dict(SYNC_COLLECTIVES)


def from_config(config, mesh) -> dict | None:
    """:func:`step_compiler_options` for ``config.mesh.overlap_collectives``."""
    overlap = config.mesh.get("overlap_collectives", False)
    if not isinstance(overlap, bool):
        raise ValueError(f"config.mesh.overlap_collectives={overlap!r} must be True or False")
    return step_compiler_options(mesh, overlap)


def gathers_parameters_at_use(mesh) -> bool:
    """Whether the training steps' networks gather their FSDP-split parameters where they run
    (``sharding.gathered_at_use``): on a multi-GPU mesh with an fsdp axis."""
    return _on_several_gpus(mesh) and sharding.fsdp_size(mesh) > 1


def network_for_mesh(network_fn, mesh, rules: sharding.ShardingRules | None = None):
    """``network_fn(params, ...)`` as the training steps run it on ``mesh``: gathering its
    parameters, split by ``rules``, where :func:`gathers_parameters_at_use` says so."""
    if gathers_parameters_at_use(mesh):
        return sharding.gathered_at_use(network_fn, mesh, rules)
    return network_fn
