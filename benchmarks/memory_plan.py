"""Does the SD 1.5 recipe's distillation state fit? Per-device memory under a (data, fsdp) mesh, planned on CPU.

The state is never allocated: its shapes come from ``jax.eval_shape`` of the distill stage's own
initialiser, its shardings from the project's FSDP rules (``sharding.state_shardings``, the same
call the trainer makes), and each array's per-device size from its sharding's shard shape. So
the state figures are exact for any backend: they are what every device holds between steps
(student, its Adam moments, target and eval EMAs, the discriminator and its Adam moments, all
float32 as the trainer keeps them, and the frozen teacher as ``precision.frozen_params`` stores it:
bf16 kernels under the recipe's bf16 compute). Their sum must leave room for the step's
activations, which depend on the backend's compiler and are measured on the device
(``scaling.py``, ``t2i_speed.py``). ``--compile`` compiles the partitioned step for the fake CPU
devices and reports XLA:CPU's buffer assignment per device: its argument size checks the plan
(a test holds them equal); its temporary size is XLA:CPU's, not a TPU's or GPU's, and is no fit
test for them. It also depends on the jaxlib version: 0.10.2's XLA:CPU ignores remat (31-32 GiB
per sample for the SD 1.5 step), 0.11.2's keeps it (4.1-4.4 GiB per sample; see the README).

``--tpu_topology`` is that fit test for a Cloud TPU slice that is not here: the mesh is laid over the
slice's chips as a deviceless topology (``jax.experimental.topologies``) and the step is compiled by
XLA:TPU itself, on this CPU, so its buffer sizes are the ones the chips would be asked for. It needs
libtpu (``pip install 'jax[tpu]'``, the release that matches jax) and nothing else of a TPU; off a TPU
VM libtpu warns that it cannot read the VM's metadata (accelerator type, worker hostnames), harmlessly.
XLA:TPU refuses a step whose temporaries it cannot fit, saying how far it got; a step that fits it
compiles whole, which for the SD 1.5 step took more than the 24 GiB of host memory this project's
2-core machines have. ``--tpu_hbm_cap_mib`` lowers XLA:TPU's limit so that it refuses early: the least
temporaries it reached, plus the state, against the chip's memory (``--hbm_gib``) is then the fit test.

``--gpu_target`` is the same for NVIDIA GPUs that are not here: XLA:GPU compiles the step for a deviceless
GPU described by a target file (``gpu_targets/h100.txtpb``: the card's CUDA device properties), through
JAX's CUDA plugin (``pip install jax-cuda12-plugin==V jax-cuda12-pjrt==V``, V the jax version), which
compiles with no GPU, driver or CUDA libraries present. XLA:GPU does not refuse a step that is too large:
it rematerialises toward its own limit (about three quarters of the card, logged when it falls short)
and then assigns buffers. The step fits when its arguments, outputs and temporaries fit JAX's allocator
pool on the card: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX's default 0.75) of its memory, unless
``--hbm_gib`` says otherwise. Without the GPU there is no autotuning, so XLA takes its default kernels.
On several GPUs the step is built and compiled as the trainer's (``xla_gpu.py``: synchronous collectives,
FSDP parameters gathered where each network runs); ``--overlap_collectives`` plans XLA's asynchronous
collectives instead. Compiled plans also count the program's collectives (``collective_counts``): all-to-alls,
collective-permutes and reductions of activations show where XLA split a computation across devices.

``--sampler=N`` plans the evaluation sampler instead of the training step: N Euler steps of the student,
the program ``--mode=sample`` and ``--mode=evaluate`` run (VAE decode excluded), at ``--batch`` (default
the recipe's evaluation batch). It reports that program's buffers per device and its collectives, with
the student held whole on every device as the samplers hold it, or split over fsdp like the training
state (``--sampler_split``, how they held it before).

Usage:
  python benchmarks/memory_plan.py --devices=8 --fsdp=8 [--batch=40] [--hbm_gib=16] [--compile]
  python benchmarks/memory_plan.py --tpu_topology=v5e:2x4 --fsdp=8 [--batch=40]   # XLA:TPU's plan, 8 v5e chips
  python benchmarks/memory_plan.py --tpu_topology=v5e:2x4 --tpu_hbm_cap_mib=1024 --batch=8   # its least
  python benchmarks/memory_plan.py --gpu_target=h100 --devices=1 --fsdp=1 --batch=20   # XLA:GPU's, one H100
  python benchmarks/memory_plan.py --gpu_target=h100 --devices=2 --fsdp=2 --batch=16 --sampler=1 [--sampler_split]
  --tiny: the tiny test networks (for tests; the figures mean nothing).
Runs on the CPU with --devices fake host devices. Prints one JSON line and appends it to
benchmarks/results.json unless --no_record.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=None,
                        help="devices of the mesh: fake CPU devices (default 8), with --tpu_topology the "
                             "first of the slice's chips (default all), with --gpu_target GPUs of one node "
                             "(default 1)")
    parser.add_argument("--fsdp", type=int, default=-1, help="size of the mesh's fsdp axis (-1: all devices)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the recipe's)")
    parser.add_argument("--hbm_gib", type=float, default=None,
                        help="memory of one device for the step, GiB (default 16, a TPU v5e chip; with "
                             "--gpu_target, JAX's allocator pool on the card)")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the step for the fake devices and report XLA:CPU's buffer sizes "
                             "(arguments: a check of the plan; temporaries: XLA:CPU's own, no fit test)")
    parser.add_argument("--tpu_topology", default="",
                        help="a Cloud TPU slice to compile for without one, as libtpu names it (v5e:2x4 is 8 "
                             "v5e chips, v6e:2x4 is 8 v6e chips): implies --compile, XLA:TPU's buffer sizes")
    parser.add_argument("--tpu_hbm_cap_mib", type=int, default=0,
                        help="with --tpu_topology: a memory limit for XLA:TPU below the chip's, so that it "
                             "refuses early and says the least temporaries it could reach (the fit test "
                             "without compiling the whole step; 0: the chip's own limit)")
    parser.add_argument("--gpu_target", default="",
                        help="an NVIDIA GPU to compile for without one: h100, or an XLA GpuTargetConfig text "
                             "file; implies --compile, XLA:GPU's buffer sizes")
    parser.add_argument("--overlap_collectives", action="store_true",
                        help="plan config.mesh.overlap_collectives=True: XLA:GPU's asynchronous "
                             "collectives (default: synchronous, as the trainer runs them)")
    parser.add_argument("--fsdp_min_size", type=int, default=0,
                        help="smallest array FSDP splits, in elements (0: the config's, 2**16)")
    parser.add_argument("--sampler", type=int, default=0,
                        help="plan the evaluation sampler instead of the training step: this many Euler steps "
                             "of the student (ShardedSampler's program, held as --mode=evaluate holds it)")
    parser.add_argument("--sampler_split", action="store_true",
                        help="with --sampler: the student split over fsdp like the training state, as the "
                             "samplers held it before sharding.sampler_shardings")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (tests)")
    parser.add_argument("--no_record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.tpu_topology and args.gpu_target:
        parser.error("--tpu_topology and --gpu_target each name the hardware to compile for: give one")
    args.compile = args.compile or bool(args.tpu_topology) or bool(args.gpu_target)
    if args.devices is None:
        args.devices = -1 if args.tpu_topology else 1 if args.gpu_target else 8  # -1: all of the slice's chips
    if args.devices < 1 and not (args.tpu_topology and args.devices == -1):
        parser.error(f"--devices={args.devices} must be >= 1")
    if args.tpu_hbm_cap_mib and not args.tpu_topology:
        parser.error("--tpu_hbm_cap_mib needs --tpu_topology")
    if args.tpu_hbm_cap_mib < 0:
        parser.error(f"--tpu_hbm_cap_mib={args.tpu_hbm_cap_mib} must be >= 0")
    if args.sampler < 0:
        parser.error(f"--sampler={args.sampler} must be >= 0 (0: plan the training step)")
    if args.sampler_split and not args.sampler:
        parser.error("--sampler_split needs --sampler")
    if args.overlap_collectives and args.sampler:
        parser.error("--overlap_collectives plans the training step; --sampler plans the sampler")
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        parser.error(f"--hbm_gib={args.hbm_gib} must be > 0")
    if args.gpu_target:
        try:
            args.gpu_target_text = gpu_target_text(args.gpu_target)
            if args.hbm_gib is None:
                args.hbm_gib = gpu_pool_gib(args.gpu_target_text)
        except ValueError as error:
            parser.error(str(error))
    if args.hbm_gib is None:
        args.hbm_gib = 16.0
    return args


def use_fake_cpu_devices(count: int) -> None:
    """Before JAX starts: the CPU platform only, with ``count`` host devices."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


def tpu_slice_chips(topology: str) -> list:
    """The chips of a Cloud TPU slice that is not here, as a deviceless topology: XLA:TPU compiles for them
    (through libtpu, on this CPU) and nothing runs on them."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as error:  # no libtpu, or a name it does not know: say which and how to get one
        raise SystemExit(f"--tpu_topology={topology}: no TPU compiler could describe it ({type(error).__name__}: "
                         f"{str(error).strip()[:300]}). It needs libtpu, the release matching jax "
                         f"(pip install 'jax[tpu]'), and a slice name libtpu knows, e.g. v5e:2x4 or v6e:2x4.")


GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
JAX_DEFAULT_GPU_MEM_FRACTION = 0.75  # JAX's allocator pool on a GPU, unless XLA_PYTHON_CLIENT_MEM_FRACTION is set
_DEVICE_MEMORY_SIZE = re.compile(r"^\s*device_memory_size:\s*(\d+)\s*$", re.MULTILINE)


def gpu_target_text(target: str) -> str:
    """The XLA GpuTargetConfig text of ``--gpu_target``: a name from gpu_targets/ (h100) or a file path."""
    named = os.path.join(GPU_TARGETS_DIR, f"{target}.txtpb")
    path = named if os.path.isfile(named) else target
    if not os.path.isfile(path):
        known = sorted(f[:-len(".txtpb")] for f in os.listdir(GPU_TARGETS_DIR) if f.endswith(".txtpb"))
        raise ValueError(f"--gpu_target={target}: neither a known GPU ({', '.join(known)}) nor a target file")
    with open(path) as f:
        text = f.read()
    if not _DEVICE_MEMORY_SIZE.search(text):
        raise ValueError(f"--gpu_target={target}: {path} has no gpu_device_info.device_memory_size; "
                         f"it is not an XLA GpuTargetConfig in text form")
    return text


def gpu_pool_gib(target_text: str) -> float:
    """GiB that JAX's allocator takes on the target card: its memory times XLA_PYTHON_CLIENT_MEM_FRACTION."""
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", str(JAX_DEFAULT_GPU_MEM_FRACTION))
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} must be a number in (0, 1]")
    return int(_DEVICE_MEMORY_SIZE.search(target_text).group(1)) * fraction / 2 ** 30


def gpu_node_devices(target: str, target_text: str, count: int) -> list:
    """``count`` GPUs of one node, as a deviceless topology: XLA:GPU compiles for them (through JAX's CUDA
    plugin, on this CPU) and nothing runs on them."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                                 target_config=target_text).devices)
    except Exception as error:  # no CUDA plugin, or a target file it cannot read: say which and how to get one
        import jax

        raise SystemExit(f"--gpu_target={target}: no GPU compiler could describe {count} of it "
                         f"({type(error).__name__}: {str(error).strip()[:300]}). It needs JAX's CUDA plugin, the "
                         f"release matching jax: pip install jax-cuda12-plugin=={jax.__version__} "
                         f"jax-cuda12-pjrt=={jax.__version__} (no GPU, driver or CUDA libraries are needed to "
                         f"compile).")


# XLA:TPU refuses a program whose temporaries exceed the chip's memory, naming both sizes (unit K, M or G).
_TPU_OUT_OF_HBM = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMG])\) exceeds available HBM \(([\d.]+)([KMG])\)")
_TO_GIB = {"K": 2.0 ** -20, "M": 2.0 ** -10, "G": 1.0}


def compiled_fit(lowered, hbm_gib: float, state_gib: float, compiler: str) -> dict:
    """The buffer assignment per device that XLA:``compiler`` (tpu or gpu) makes for a lowered step, and
    whether it fits ``hbm_gib``.

    Compiled: its sizes, arguments (the state, ``state_gib``, plus the batch), outputs and temporaries.
    Refused (XLA:TPU only): XLA:TPU rematerialises to fit its memory limit and refuses the program when
    it cannot, naming the temporaries it got down to; the step fits when they and the state do. Under
    the chip's own limit that is a no. Under a lower limit (``--tpu_hbm_cap_mib``) the refusal is the
    fit test that ends early: the figure is the least XLA:TPU reached, short of compiling the whole
    program. XLA:GPU compiles whatever the size; its sizes decide."""
    import jax

    from common import compiled_memory_gib, fused_attention_calls

    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        refused = _TPU_OUT_OF_HBM.search(str(error))
        if not refused:
            raise
        needed, unit, limit, limit_unit = refused.groups()
        temporaries = float(needed) * _TO_GIB[unit]
        return {"fits_hbm": temporaries + state_gib <= hbm_gib,
                f"xla_{compiler}_gib_per_device": {"temporaries": temporaries},
                f"xla_{compiler}_limit_gib": float(limit) * _TO_GIB[limit_unit],
                f"xla_{compiler}_refusal": refused.group(0)}
    buffers = compiled_memory_gib(compiled)
    total = sum(buffers[k] for k in ("arguments", "outputs_not_aliased", "temporaries"))
    return {"fits_hbm": total <= hbm_gib, f"xla_{compiler}_gib_per_device": buffers,
            f"xla_{compiler}_total_gib_per_device": total, "collectives": collective_counts(compiled),
            "fused_attention_calls": fused_attention_calls(compiled)}


# A collective in XLA's compiled text, synchronous or the start of an asynchronous one.
_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def collective_counts(compiled) -> dict:
    """How many of each collective a compiled program runs per call (as written: a loop body counts once).
    Parameter all-gathers and gradient reductions are FSDP's own; all-to-alls, collective-permutes and
    reduce-scatters or all-reduces of activations mean XLA split a computation across devices."""
    counts = {}
    for match in _COLLECTIVE.finditer(compiled.as_text()):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def placed(abstract_tree, shardings):
    """``abstract_tree``'s shapes and dtypes laid out by ``shardings``: what a program is lowered for."""
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of ``abstract_tree`` laid out by ``shardings`` (the largest shard: FSDP's
    shards are equal; replicated arrays count whole)."""
    import jax
    import numpy as np

    sizes = jax.tree.map(lambda leaf, s: int(np.prod(s.shard_shape(leaf.shape), dtype=np.int64))
                         * np.dtype(leaf.dtype).itemsize, abstract_tree, shardings)
    return sum(jax.tree.leaves(sizes))


def plan(args) -> dict:
    """The plan on the first ``args.devices`` devices JAX has (``main`` makes them fake CPU devices)."""
    import jax

    import t2i_speed
    from common import compiled_memory_gib
    from scflow_jax import distill, precision, sharding, train_state, xla_gpu
    from scflow_jax.models import unet_sd

    config = t2i_speed.recipe_config(args.tiny, batch=args.batch or None)
    # --fsdp=-1: all devices on the fsdp axis; else the data axis takes the rest.
    config.mesh.update(dict(num_devices=args.devices, fsdp=args.fsdp, data=1 if args.fsdp == -1 else -1))
    if args.fsdp_min_size:
        config.mesh.fsdp_min_size = args.fsdp_min_size
    chips = (tpu_slice_chips(args.tpu_topology) if args.tpu_topology else
             gpu_node_devices(args.gpu_target, args.gpu_target_text, args.devices) if args.gpu_target else None)
    mesh = sharding.mesh_from_config(config, devices=chips)
    rules = sharding.ShardingRules.from_config(config)
    task = precision.configure_task(t2i_speed.random_task(config, args.tiny), config)
    teacher = unet_sd.unet_param_shapes(task.network_config)  # float32, as the state is initialised from it
    if args.sampler:  # the student, as exported, has the teacher's shapes and float32 storage
        return sampler_plan(args, task, teacher, mesh, rules, chips)
    sharding.check_global_batch(config.distill.batch_size, mesh, "--batch")
    optimizer = train_state.make_optimizer(config.distill.optimizer)
    disc_optimizer = train_state.make_optimizer(config.disc.optimizer)

    init_fn = distill.state_initializer(task, optimizer, disc_optimizer, jax.random.PRNGKey(0))
    summary = sharding.ShardingSummary()
    abstract = jax.eval_shape(init_fn, teacher)  # what distill.build_distill initialises, shapes only
    shardings = sharding.state_shardings(abstract, mesh, rules, summary)
    teacher_shardings = sharding.state_shardings(teacher, mesh, rules)
    frozen_teacher = precision.frozen_params(teacher, config)  # as the step holds it (bf16 kernels)
    gib = 2 ** 30
    parts = {name: per_device_bytes(getattr(abstract, name), getattr(shardings, name))
             for name in ("params", "opt_state", "target_params", "ema_params", "disc_params", "disc_opt_state")}
    parts["teacher"] = per_device_bytes(frozen_teacher, teacher_shardings)
    state_bytes = sum(parts.values())
    out = {"tiny": args.tiny, "devices": mesh.size, "device_kind": mesh.devices.flat[0].device_kind,
           "tpu_topology": args.tpu_topology or None, "gpu_target": args.gpu_target or None,
           "mesh": {"data": mesh.shape[sharding.DATA_AXIS], "fsdp": mesh.shape[sharding.FSDP_AXIS]},
           "batch": config.distill.batch_size, "compute_dtype": config.precision.compute_dtype,
           "remat": config.model.remat,
           "student_params": train_state.count_params(abstract.params),
           "disc_params": train_state.count_params(abstract.disc_params),
           "sharding": summary.describe(),
           "state_gib_per_device": {k: v / gib for k, v in parts.items()},
           "state_gib_per_device_total": state_bytes / gib,
           "hbm_gib": args.hbm_gib,
           "left_for_activations_gib": args.hbm_gib - state_bytes / gib}
    if args.compile:
        options = xla_gpu.step_compiler_options(mesh, args.overlap_collectives)
        out["step_compiler_options"] = options
        step = distill.make_train_step(distill.networks(task, mesh, rules), config.scflow, optimizer, disc_optimizer,
                                       jax.random.PRNGKey(1), out_shardings=(shardings, sharding.replicated(mesh)),
                                       compiler_options=options)
        example = t2i_speed.RandomBatches(range(config.distill.batch_size), task.latent_shape, 0).batch(0)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                 for k, v in example.items()}
        frozen = {"teacher_params": placed(frozen_teacher, teacher_shardings),
                  "null_cond": jax.ShapeDtypeStruct(task.null_cond.shape, task.null_cond.dtype,
                                                    sharding=sharding.replicated(mesh))}
        start = time.perf_counter()
        lowered = step.lower(placed(abstract, shardings), batch, frozen)
        if not chips:
            compiled = lowered.compile()
            out["xla_cpu_estimate_gib_per_device"] = compiled_memory_gib(compiled)
            out["collectives"] = collective_counts(compiled)
        elif args.tpu_topology:
            out.update(compiled_fit(lowered, args.hbm_gib, state_bytes / gib, "tpu"))
            out["libtpu_init_args"] = os.environ.get("LIBTPU_INIT_ARGS", "")
        else:
            out.update(compiled_fit(lowered, args.hbm_gib, state_bytes / gib, "gpu"))
            out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        out["compile_s"] = time.perf_counter() - start
    return out


def sampler_plan(args, task, abstract_params, mesh, rules, chips) -> dict:
    """The evaluation sampler's program (``generate.sampler_program``, ``args.sampler`` Euler steps of the
    student at global batch ``args.batch``, default the recipe's evaluation batch) compiled for ``mesh``:
    its buffers per device and its collectives. The student is held as the samplers hold it
    (``sharding.sampler_shardings``), or split over fsdp like the training state (``--sampler_split``).
    The VAE decode runs after this program and is not in it."""
    import jax
    import jax.numpy as jnp

    from common import compiled_memory_gib, fused_attention_calls
    from scflow_jax import sharding
    from scflow_jax.evaluation import generate

    batch = args.batch or task.config.eval.batch_size
    sharding.check_global_batch(batch, mesh, "--batch")
    held = (sharding.state_shardings(abstract_params, mesh, rules) if args.sampler_split
            else sharding.sampler_shardings(abstract_params, mesh))
    program = generate.sampler_program(generate.euler_sample_fn(task.velocity_fn, num_steps=args.sampler),
                                       latent_shape=task.latent_shape, seed=0, mesh=mesh)
    rows = sharding.batch_sharding(mesh)
    null = task.null_cond
    start = time.perf_counter()
    compiled = program.lower(
        placed(abstract_params, held),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((batch,) + tuple(null.shape), null.dtype, sharding=rows), None).compile()
    buffers = compiled_memory_gib(compiled)
    return {"program": "sampler", "sampler_steps": args.sampler, "student_held": "split" if args.sampler_split
            else "whole", "tiny": args.tiny, "devices": mesh.size, "device_kind": mesh.devices.flat[0].device_kind,
            "tpu_topology": args.tpu_topology or None, "gpu_target": args.gpu_target or None,
            "mesh": {"data": mesh.shape[sharding.DATA_AXIS], "fsdp": mesh.shape[sharding.FSDP_AXIS]},
            "batch": batch, "compute_dtype": task.config.precision.compute_dtype,
            "student_gib_per_device": per_device_bytes(abstract_params, held) / 2 ** 30,
            "collectives": collective_counts(compiled), "fused_attention_calls": fused_attention_calls(compiled),
            "compiler": "cpu" if not chips else "tpu" if args.tpu_topology else "gpu",
            "xla_gib_per_device": buffers, "compile_s": time.perf_counter() - start}


def main(argv=None):
    args = parse_args(argv)
    if "jax" not in sys.modules:  # (an importer that already started JAX, a test, brings its own devices)
        use_fake_cpu_devices(1 if args.tpu_topology or args.gpu_target else args.devices)
    if args.gpu_target and "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
        # Without a GPU to autotune on, XLA:GPU's default Triton tiling fails on some of the SD UNet's
        # matmuls ("Couldn't find output tile sizes"); cuBLAS takes them instead, as it does on the card
        # whenever it wins the autotuning.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_triton_gemm=false".strip()
    if args.tpu_hbm_cap_mib:  # read by libtpu when plan() first asks it for the slice, not at jax's import
        cap = f"--xla_tpu_max_hbm_size_mib={args.tpu_hbm_cap_mib}"
        os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {cap}".strip()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.dirname(here))
    from common import record

    return record("memory_plan", plan(args), print_only=args.no_record)


if __name__ == "__main__":
    main()
