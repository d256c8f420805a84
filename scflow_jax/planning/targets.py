"""What a plan compiles for (``config.plan.target``): this host's devices, N CPU devices, N GPUs of
a named card, or a Cloud TPU slice; and how much memory one of its devices offers the step.

GPUs and TPUs need not be present: XLA compiles for a deviceless topology
(``jax.experimental.topologies``) through the platform's compiler plugin, on this CPU. The plugins
are optional extras of the package (``pip install -e '.[plan-gpu]'``, ``'.[plan-tpu]'``), never
runtime needs; a missing one is an error that names the extra.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re

import jax

GPU_TARGETS = "gpu_targets"  # package data: XLA GpuTargetConfig text files, one per named card
# JAX's allocator pool on a GPU, unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
JAX_DEFAULT_GPU_MEM_FRACTION = 0.75
# HBM per chip by TPU generation (GiB, as libtpu names the generations): what XLA:TPU may give one
# program, less its own reserve (it reports the limit when it refuses a program).
# (v4 is left out: libtpu describes a v4 slice by TensorCores, two per chip, so a plan there is per
# TensorCore, and config.plan.memory_gib must say what one has.)
TPU_CHIP_GIB = {"v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0}
_TPU_SLICE = re.compile(r"^(v\d+[a-z]*):\d+(x\d+)+$")
_DEVICE_MEMORY_SIZE = re.compile(r"^\s*device_memory_size:\s*(\d+)\s*$", re.MULTILINE)
_FIELD = "config.plan.target"


class PlanTargetError(ValueError):
    """A target the plan cannot compile for: the message names ``config.plan.target`` and the
    fix."""


@dataclasses.dataclass(frozen=True)
class Target:
    """``kind``: host (this process's devices), cpu, gpu or tpu. ``count``: devices asked for (GPUs
    of one node, CPU devices; None: as many as there are). ``name``: the card or slice."""

    spec: str
    kind: str
    name: str = ""
    count: int | None = None
    gpu_target_text: str = ""

    @property
    def compiler(self) -> str:
        platform = {"gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}.get(self.kind)
        return f"XLA:{(platform or jax.default_backend()).upper()}"


def known_gpus() -> list[str]:
    folder = importlib.resources.files(__package__) / GPU_TARGETS
    return sorted(f.name[: -len(".txtpb")] for f in folder.iterdir() if f.name.endswith(".txtpb"))


def _count(spec: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PlanTargetError(
            f"{_FIELD}={spec!r}: the device count after ':' must be a positive "
            f"integer, got {text!r}"
        )
    return int(text)


def parse_target(spec: str) -> Target:
    """``""``: this host's devices; ``cpu[:N]``; a GPU (``h100``, ``a100-80g``, ``h200`` or the path
    of a GpuTargetConfig text file) with ``[:N]`` GPUs of one node; a TPU slice as libtpu names it
    (``v5e:2x4``, ``v6e:2x4``, ``v5p:2x2x1``)."""
    if not isinstance(spec, str):
        raise PlanTargetError(f"{_FIELD}={spec!r} must be a string")
    spec = spec.strip()
    if not spec:
        return Target(spec, "host")
    slice_name = _TPU_SLICE.match(spec)
    if slice_name:
        return Target(spec, "tpu", name=spec)
    name, count = spec, None
    if ":" in spec and spec.rsplit(":", 1)[1].strip().lstrip("-").isdigit():
        name, count_text = spec.rsplit(":", 1)
        count = _count(spec, count_text.strip())
    if name == "cpu":
        return Target(spec, "cpu", name="cpu", count=count)
    return Target(spec, "gpu", name=name, count=count, gpu_target_text=gpu_target_text(spec, name))


def gpu_target_text(spec: str, name: str) -> str:
    """The XLA GpuTargetConfig text of a named card (package data) or of a file path."""
    named = importlib.resources.files(__package__) / GPU_TARGETS / f"{name}.txtpb"
    if named.is_file():
        text, where = named.read_text(), f"{name}.txtpb"
    elif os.path.isfile(name):
        with open(name) as f:
            text, where = f.read(), name
    else:
        raise PlanTargetError(
            f"{_FIELD}={spec!r} is not a target: '' (this host's devices), cpu[:N], a GPU "
            f"({', '.join(known_gpus())}, or the path of an XLA GpuTargetConfig .txtpb file)[:N], "
            f"or a TPU slice such as v5e:2x4"
        )
    if not _DEVICE_MEMORY_SIZE.search(text):
        raise PlanTargetError(
            f"{_FIELD}={spec!r}: {where} has no "
            f"gpu_device_info.device_memory_size; it is not an XLA "
            f"GpuTargetConfig in text form"
        )
    return text


def gpu_memory_bytes(target_text: str) -> int:
    return int(_DEVICE_MEMORY_SIZE.search(target_text).group(1))


def gpu_pool_fraction() -> float:
    """The share of a card's memory JAX's allocator takes: XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's
    own setting, read here as the card would read it), default 0.75."""
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", str(JAX_DEFAULT_GPU_MEM_FRACTION))
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise PlanTargetError(
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} must be a number in (0, 1]"
        )
    return fraction


def prepare_backends(target: Target) -> None:
    """Before JAX starts its backends (the CLI calls the plan first): a CPU, GPU or TPU target
    needs only the CPU backend (a GPU here would otherwise be initialised, and JAX would take most
    of its memory), and ``cpu:N`` N CPU devices. Once the backends run, these settings cannot
    change: :func:`devices` then says when the devices there are do not suffice."""
    if target.kind == "host":
        return
    if not jax.config.jax_platforms and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    if target.kind == "cpu" and target.count:
        try:
            jax.config.update("jax_num_cpu_devices", target.count)
        except RuntimeError:  # the backends run already: their CPU devices are what they are
            pass


def devices(target: Target, tpu_hbm_cap_mib: int = 0) -> list:
    """The devices the plan's mesh is laid over (``config.mesh`` takes its first
    ``num_devices``): real ones for the host and CPU targets, deviceless ones for GPUs and TPUs."""
    if target.kind == "host":
        return jax.devices()
    if target.kind == "cpu":
        present = jax.devices("cpu")
        if target.count and len(present) < target.count:
            raise PlanTargetError(
                f"{_FIELD}={target.spec!r} asks for {target.count} CPU devices, but JAX started "
                f"with {len(present)}: run --mode=plan in a process of its own (it sets the count "
                f"before JAX starts), or set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={target.count}"
            )
        return present[: target.count] if target.count else present
    if target.kind == "gpu":
        return _gpu_node(target)
    return _tpu_slice(target, tpu_hbm_cap_mib)


def _gpu_node(target: Target) -> list:
    from jax.experimental import topologies

    count = target.count or 1
    try:
        return list(
            topologies.get_topology_desc(
                platform="cuda", topology=f"1x1x{count}", target_config=target.gpu_target_text
            ).devices
        )
    except Exception as error:  # no CUDA plugin, or a target file it cannot read
        raise PlanTargetError(
            f"{_FIELD}={target.spec!r}: no GPU compiler could describe {count} of it "
            f"({type(error).__name__}: {str(error).strip()[:300]}). It needs JAX's CUDA plugin of "
            f"the jax release installed ({jax.__version__}): pip install -e '.[plan-gpu]' (no GPU, "
            f"driver or CUDA toolkit is needed to compile)"
        ) from error


def _tpu_slice(target: Target, tpu_hbm_cap_mib: int) -> list:
    from jax.experimental import topologies

    if tpu_hbm_cap_mib:  # read by libtpu when it first describes a slice, not at jax's import
        cap = f"--xla_tpu_max_hbm_size_mib={tpu_hbm_cap_mib}"
        os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {cap}".strip()
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target.name).devices)
    except Exception as error:  # no libtpu, or a slice it does not know
        raise PlanTargetError(
            f"{_FIELD}={target.spec!r}: no TPU compiler could describe it ({type(error).__name__}: "
            f"{str(error).strip()[:300]}). It needs libtpu of the jax release installed "
            f"({jax.__version__}): pip install -e '.[plan-tpu]', and a slice name libtpu knows, "
            f"e.g. v5e:2x4 or v6e:2x4"
        ) from error


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_memory(target: Target, mesh_devices: list, memory_gib: float = 0.0) -> tuple[float, str]:
    """GiB one device offers the step, and where the figure comes from. ``memory_gib`` > 0
    (``config.plan.memory_gib``) replaces it."""
    if memory_gib > 0:
        return memory_gib, "config.plan.memory_gib"
    if target.kind == "gpu":
        fraction = gpu_pool_fraction()
        card = gpu_memory_bytes(target.gpu_target_text) / 2**30
        return fraction * card, f"JAX's pool, {fraction:g} of {card:.2f} GiB"
    if target.kind == "tpu":
        generation = _TPU_SLICE.match(target.name).group(1)
        if generation not in TPU_CHIP_GIB:
            raise PlanTargetError(
                f"{_FIELD}={target.spec!r}: the memory of a {generation} chip "
                f"is not known here; give it as config.plan.memory_gib"
            )
        return TPU_CHIP_GIB[generation], f"HBM of a {generation} chip"
    stats = mesh_devices[0].memory_stats() if mesh_devices[0].platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / 2**30, "JAX's pool (memory_stats)"
    cpus = len(jax.devices("cpu"))
    share = _host_memory_bytes() / max(cpus, 1) / 2**30
    return share, f"host memory / {cpus} CPU device{'s' if cpus > 1 else ''}"
