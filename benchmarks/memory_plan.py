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

Usage:
  python benchmarks/memory_plan.py --devices=8 --fsdp=8 [--batch=40] [--hbm_gib=16] [--compile]
  --tiny: the tiny test networks (for tests; the figures mean nothing).
Runs on the CPU with --devices fake host devices. Prints one JSON line and appends it to
benchmarks/results.json unless --no_record.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="devices of the mesh (fake CPU devices)")
    parser.add_argument("--fsdp", type=int, default=-1, help="size of the mesh's fsdp axis (-1: all devices)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the recipe's)")
    parser.add_argument("--hbm_gib", type=float, default=16.0,
                        help="memory of one device, GiB (16: a TPU v5e chip; 80: an H100)")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the step for the fake devices and report XLA:CPU's buffer sizes "
                             "(arguments: a check of the plan; temporaries: XLA:CPU's own, no fit test)")
    parser.add_argument("--fsdp_min_size", type=int, default=0,
                        help="smallest array FSDP splits, in elements (0: the config's, 2**16)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (tests)")
    parser.add_argument("--no_record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices={args.devices} must be >= 1")
    if args.hbm_gib <= 0:
        parser.error(f"--hbm_gib={args.hbm_gib} must be > 0")
    return args


def use_fake_cpu_devices(count: int) -> None:
    """Before JAX starts: the CPU platform only, with ``count`` host devices."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


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
    from scflow_jax import distill, precision, sharding, train_state
    from scflow_jax.models import unet_sd

    config = t2i_speed.recipe_config(args.tiny, batch=args.batch or None)
    # --fsdp=-1: all devices on the fsdp axis; else the data axis takes the rest.
    config.mesh.update(dict(num_devices=args.devices, fsdp=args.fsdp, data=1 if args.fsdp == -1 else -1))
    if args.fsdp_min_size:
        config.mesh.fsdp_min_size = args.fsdp_min_size
    mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(config.distill.batch_size, mesh, "--batch")
    rules = sharding.ShardingRules.from_config(config)
    task = precision.configure_task(t2i_speed.random_task(config, args.tiny), config)
    teacher = unet_sd.unet_param_shapes(task.network_config)  # float32, as the state is initialised from it
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
    out = {"tiny": args.tiny, "devices": mesh.size,
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
        step = distill.make_train_step(distill.networks(task), config.scflow, optimizer, disc_optimizer,
                                       jax.random.PRNGKey(1), out_shardings=(shardings, sharding.replicated(mesh)))
        placed = lambda tree, where: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, where)
        example = t2i_speed.RandomBatches(range(config.distill.batch_size), task.latent_shape, 0).batch(0)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                 for k, v in example.items()}
        frozen = {"teacher_params": placed(frozen_teacher, teacher_shardings),
                  "null_cond": jax.ShapeDtypeStruct(task.null_cond.shape, task.null_cond.dtype,
                                                    sharding=sharding.replicated(mesh))}
        start = time.perf_counter()
        compiled = step.lower(placed(abstract, shardings), batch, frozen).compile()
        out["compile_s"] = time.perf_counter() - start
        out["xla_cpu_estimate_gib_per_device"] = compiled_memory_gib(compiled)
    return out


def main(argv=None):
    args = parse_args(argv)
    if "jax" not in sys.modules:  # (an importer that already started JAX, a test, brings its own devices)
        use_fake_cpu_devices(args.devices)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.dirname(here))
    from common import record

    return record("memory_plan", plan(args), print_only=args.no_record)


if __name__ == "__main__":
    main()
