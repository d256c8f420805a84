"""Speed of the SD 1.5 text-to-image recipe on the devices present: the SCFlow distillation step
(time, examples/s, memory, MFU, on one device or a mesh of many) and 1-step 512 px generation
(UNet + VAE decode: images/s, latency).

Both parts run the recipe's own code (``configs/t2i_sd15.py``: bf16 compute over float32 master
weights, full remat, teacher CFG 1.5 against the empty prompt, the teacher-encoder discriminator
on noised inputs) on random weights and random data, so no checkpoint or dataset is needed: the
networks have SD 1.5's architecture (UNet ~860M parameters, VAE decoder ~50M), the text states
are random [77, 768] arrays in place of CLIP's. Every SCFlow term is on (warm-ups set to 0).

Usage:
  python benchmarks/t2i_speed.py --part=generate [--batch_sizes=1,32] [--dtype=bfloat16]
  python benchmarks/t2i_speed.py --part=distill [--batch=20] [--steps=5]
  python benchmarks/t2i_speed.py --part=peak        (a bf16 matmul: the device's usable peak)
  --tiny: tiny networks at 64 px, a CPU smoke run whose figures mean nothing.

Scaling: the distill part runs on every device present as a (data, fsdp) mesh, ``--batch`` being
the global batch. ``--fsdp=N`` splits the state over N of them (-1: all), ``--overlap_collectives``
measures XLA's asynchronous collectives against the synchronous ones the trainer compiles on
several GPUs, and ``--multihost`` joins a multi-process run first (``config.distributed``; run the
same command on every host). Its record gives the mesh, the step time, examples/s, the peak memory
of the busiest device and the FLOPs per device.

MFU = model FLOPs / time / peak. Model FLOPs are XLA's count of the step lowered WITHOUT remat
(what the algorithm needs); the count with the recomputation is reported as ``hardware_gflop``
(both from the lowered program: on a GPU the compiled one's count omits cuDNN's convolutions;
cuDNN's fused attention counts as its written-out matmuls, ``common.fused_attention_flops``). The
peak is --peak_tflops, else the dense bf16 datasheet figure of a known device
(``DATASHEET_BF16_TFLOPS``); --part=peak measures what a large matmul reaches. Prints one
JSON line per part and appends it to the results file (common.py) unless --no_record.
``benchmarks/accelerator.sh`` runs all parts on one GPU in one call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import (  # noqa: E402
    add_output_flags,
    matmul_rate,
    random_params,
    record,
    time_calls,
    time_train_steps,
    xla_flops,
)
from scflow_jax import distill, distributed, precision, sampling, sharding  # noqa: E402
from scflow_jax import train_state  # noqa: E402
from scflow_jax.models import clip, unet_discriminator, unet_sd  # noqa: E402
from scflow_jax.models.vae import VAE, VAEConfig  # noqa: E402
from scflow_jax.planning.programs import TINY_UNET, TINY_VAE  # noqa: E402
from scflow_jax.planning.xla_memory import compiled_memory_gib, fused_attention_calls  # noqa: E402
from scflow_jax.tasks.text_to_image import TextToImageTask  # noqa: E402

# Dense bf16 matrix peak per device (vendor datasheets, TFLOP/s), matched against device_kind.
DATASHEET_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v4": 275.0,
}
TEXT_TOKENS, TEXT_DIM = 77, 768
_START = time.perf_counter()


def progress(message: str) -> None:
    """A timestamped line on stderr: where a slow part spends its time (compiles take minutes)."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(eq=False)
class RandomT2ITask(TextToImageTask):
    """The text-to-image recipe's task on random data, with no files: random text states stand in
    for CLIP's (same shape), and each batch is random latents with random text states."""

    @property
    def _text_encoder(self):  # only its config is used (the discriminator's condition shape)
        return clip.CLIPTextConfig(), None, None

    @property
    def null_cond(self):
        return np.random.default_rng(7).standard_normal((TEXT_TOKENS, TEXT_DIM)).astype(np.float32)

    def batches(self, global_batch: int, seed: int, process_rows=None):
        rows = np.arange(global_batch) if process_rows is None else np.asarray(process_rows)
        return RandomBatches(rows, self.latent_shape, seed)


@dataclasses.dataclass
class RandomBatches:
    rows: np.ndarray
    latent_shape: tuple
    seed: int

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        n = len(self.rows)
        return {
            "image": rng.standard_normal((n,) + tuple(self.latent_shape), np.float32),
            "cond": rng.standard_normal((n, TEXT_TOKENS, TEXT_DIM), np.float32),
        }


def recipe_config(tiny: bool, batch: int | None, fsdp: int = 1, overlap_collectives: bool = False):
    """``configs/t2i_sd15.py`` with every term on from step 0, at global ``batch`` (None: the
    recipe's), on every device present with ``fsdp`` of them on the fsdp axis (-1: all)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import t2i_sd15  # noqa: E402

    config = t2i_sd15.get_config()
    if tiny:
        config.data.image_size = 64
        config.disc.update(dict(head_channels=16, head_groups=4))
    # Steady state: every term on (the recipe warms the GAN and inverse terms up for 500 steps).
    config.scflow.update(dict(warmup_rf=0, warmup_gan=0, warmup_inv=0))
    if batch is not None:
        config.distill.batch_size = batch
    config.mesh.update(
        dict(
            num_devices=-1,
            fsdp=fsdp,
            data=1 if fsdp == -1 else -1,
            overlap_collectives=overlap_collectives,
        )
    )
    return config


def random_task(config, tiny: bool) -> RandomT2ITask:
    unet_config, vae_config = (
        (TINY_UNET, TINY_VAE) if tiny else (unet_sd.UNetSDConfig(), VAEConfig())
    )
    side = config.data.image_size // vae_config.downsample_factor
    disc = unet_discriminator.UNetDiscriminator(
        unet_config, head_channels=config.disc.head_channels, head_groups=config.disc.head_groups
    )
    return RandomT2ITask(
        config=config,
        latent_shape=(side, side, vae_config.latent_channels),
        vae_config=vae_config,
        network_config=unet_config,
        model=unet_sd.UNet2DConditionModel(unet_config),
        discriminator=disc,
    )


def peak_tflops(args) -> tuple[float | None, str]:
    if args.peak_tflops > 0:
        return args.peak_tflops, "--peak_tflops"
    kind = jax.devices()[0].device_kind
    for name, value in DATASHEET_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return value, f"datasheet dense bf16 ({name})"
    return None, f"unknown device {kind!r}: pass --peak_tflops"


def device_memory() -> dict:
    """Peak memory of this process's busiest device (memory_stats, where the backend has them),
    else the process's peak resident memory (CPU)."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if all("peak_bytes_in_use" in s for s in stats):
        busiest = max(stats, key=lambda s: s["peak_bytes_in_use"])
        keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
        return {
            "source": "device memory_stats, busiest device",
            **{k: busiest[k] for k in keys if k in busiest},
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"source": "process peak RSS", "peak_rss_bytes": rss_kib * 1024}


def with_mfu(result: dict, model_flops: float, seconds: float, args, devices: int = 1) -> dict:
    """Adds achieved TFLOP/s per device and MFU; ``model_flops`` is the global (lowered) program's
    count, which data parallelism and FSDP split evenly over the ``devices`` of the mesh."""
    peak, source = peak_tflops(args)
    per_device = model_flops / devices / seconds
    result["achieved_tflops_per_device"] = per_device / 1e12
    result["peak_tflops"], result["peak_source"] = peak, source
    result["mfu"] = None if peak is None else per_device / (peak * 1e12)
    return result


# --------------------------------------------------------------------------------------------------


def run_peak(args) -> dict:
    """A large bf16 matmul: what the device's matrix units reach through XLA."""
    rate = matmul_rate(jnp.bfloat16, 256 if args.tiny else 8192)
    tflops = rate.pop("gflop_s") / 1e3
    return {"part": "peak", **rate, "bf16_matmul_tflops": tflops}


def run_generate(args) -> dict:
    """1-step generation: one UNet call (the student's Euler step from t = 1) and the VAE decode, in
    one program. Parameters are cast to the compute dtype once, as a deployment would."""
    config = recipe_config(args.tiny, batch=1)
    task = random_task(config, args.tiny)
    task = dataclasses.replace(
        task,
        model=precision.configure_module(task.model, dtype=jnp.dtype(args.dtype), remat="none"),
    )
    vae = VAE(task.vae_config, dtype=jnp.dtype(args.dtype))
    dtype = jnp.dtype(args.dtype)
    # On the host (NumPy, ml_dtypes' bfloat16): a device program for ~700 casts would compile long.
    cast = lambda tree: jax.device_put(jax.tree.map(lambda x: x.astype(dtype), tree))  # noqa: E731
    progress("initialising the UNet and VAE")
    unet_params = cast(random_params(unet_sd.unet_param_shapes(task.network_config)))
    vae_params = cast(random_params(vae.param_shapes(), seed=2))
    jax.block_until_ready((unet_params, vae_params))
    progress("initialised")

    @jax.jit
    def generate(unet_params, vae_params, z1, cond):
        latents = sampling.sample(task.velocity_fn, unet_params, z1, cond, num_steps=1)
        return vae.latents_to_images(vae_params, latents.astype(jnp.float32))

    out = {
        "part": "generate",
        "tiny": args.tiny,
        "dtype": args.dtype,
        "image_px": config.data.image_size,
        "latent_shape": list(task.latent_shape),
        "unet_params": train_state.count_params(unet_params),
        "vae_decoder_params": train_state.count_params(vae_params["decoder"])
        + train_state.count_params(vae_params["post_quant_conv"]),
        "batches": [],
    }
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rng = np.random.default_rng(batch)
        z1 = jnp.asarray(rng.standard_normal((batch,) + task.latent_shape, np.float32))
        cond = jnp.asarray(rng.standard_normal((batch, TEXT_TOKENS, TEXT_DIM), np.float32))
        start = time.perf_counter()
        lowered = generate.lower(unet_params, vae_params, z1, cond)
        compiled = lowered.compile()
        entry = {
            "batch": batch,
            "compile_s": time.perf_counter() - start,
            "fused_attention_calls": fused_attention_calls(compiled),
        }
        progress(f"batch {batch}: compiled in {entry['compile_s']:.1f}s")
        images = compiled(unet_params, vae_params, z1, cond)
        if not bool(jnp.all(jnp.isfinite(images))):
            raise FloatingPointError(f"generation at batch {batch} gave non-finite images")
        entry.update(
            time_calls(
                lambda: compiled(unet_params, vae_params, z1, cond), warmup=2, repeats=args.repeats
            )
        )
        entry["images_per_s"] = batch / entry["median_s"]
        entry["ms_per_batch"] = 1e3 * entry["median_s"]
        with_mfu(entry, xla_flops(lowered), entry["median_s"], args)
        entry["gflop_per_image"] = xla_flops(lowered) / batch / 1e9
        print(json.dumps(entry), flush=True)
        out["batches"].append(entry)
    out["memory"] = device_memory()
    return out


def run_distill(args) -> dict:
    """The recipe's distillation step (D step + G step + updates + EMAs) at --batch per step, on
    every device present as a (data, fsdp) mesh."""
    config = recipe_config(
        args.tiny, batch=args.batch, fsdp=args.fsdp, overlap_collectives=args.overlap_collectives
    )
    if args.multihost:  # before anything starts JAX's backends: the cluster decides the devices
        distributed.initialize(config.distributed)
    task = random_task(config, args.tiny)
    progress("initialising the teacher")
    teacher = random_params(unet_sd.unet_param_shapes(task.network_config))
    progress("building the distillation state")
    start = time.perf_counter()
    setup = distill.build_distill(config, workdir="", teacher_params=teacher, task=task)
    init_s = time.perf_counter() - start
    progress(f"state built in {init_s:.1f}s; compiling the step")
    batches = [sharding.shard_batch(setup.data.batch(s), setup.mesh) for s in range(2)]
    mesh = setup.mesh
    layout = {
        "data": mesh.shape[sharding.DATA_AXIS],
        "fsdp": mesh.shape[sharding.FSDP_AXIS],
        "processes": jax.process_count(),
    }

    start = time.perf_counter()
    lowered = setup.jitted_step.lower(setup.state, batches[0], setup.frozen)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    progress(f"step compiled in {compile_s:.1f}s")
    # What the step asks of each device, printed before it runs: should it then fail to allocate
    # (the recipe's batch on a small device), the log still holds the compiler's figure.
    xla_memory = compiled_memory_gib(compiled)
    print(
        json.dumps(
            {
                "part": "distill",
                "batch": args.batch,
                "mesh": layout,
                "compiled": True,
                "compile_s": compile_s,
                "xla_memory_gib_per_device": xla_memory,
                "fused_attention_calls": fused_attention_calls(compiled),
            }
        ),
        flush=True,
    )

    _, metrics, times = time_train_steps(
        compiled, setup.state, batches, setup.frozen, warmup=args.warmup, steps=args.steps
    )
    metrics = jax.device_get(metrics)
    if not all(np.isfinite(v) for v in jax.tree.leaves(metrics)):
        raise FloatingPointError(f"non-finite step metrics: {metrics}")
    step_s = float(np.median(times))
    hardware_flops = xla_flops(lowered)
    out = {
        "part": "distill",
        "tiny": args.tiny,
        "batch": args.batch,
        "mesh": layout,
        "overlap_collectives": args.overlap_collectives,
        "compute_dtype": config.precision.compute_dtype,
        "remat": config.model.remat,
        "student_params": train_state.count_params(setup.state.params),
        "disc_params": train_state.count_params(setup.state.disc_params),
        "state_init_s": init_s,
        "compile_s": compile_s,
        "steps_timed": len(times),
        "step_s_median": step_s,
        "step_s_min": min(times),
        "examples_per_s": args.batch / step_s,
        "hardware_gflop": hardware_flops / 1e9,
        "hardware_gflop_per_device": hardware_flops / mesh.size / 1e9,
        "loss_terms": {k: float(v) for k, v in metrics.items()},
        "memory": device_memory(),
        "xla_memory_gib_per_device": xla_memory,
        "fused_attention_calls": fused_attention_calls(compiled),
        "attention_setting": os.environ.get("SCFLOW_ATTENTION", "auto"),
    }
    print(json.dumps(out), flush=True)  # the timings, should the FLOP count below run out of time

    # Model FLOPs: the same step lowered without remat (lowering only; no compile, no memory).
    plain = recipe_config(args.tiny, batch=args.batch)
    plain.model.remat = "none"
    plain_task = precision.configure_task(random_task(plain, args.tiny), plain)
    plain_step = distill.make_train_step(
        distill.networks(plain_task),
        plain.scflow,
        train_state.make_optimizer(plain.distill.optimizer),
        train_state.make_optimizer(plain.disc.optimizer),
        jax.random.PRNGKey(0),
    )
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree
    )
    model_flops = xla_flops(
        plain_step.lower(abstract(setup.state), abstract(batches[0]), abstract(setup.frozen))
    )

    out["model_gflop"] = model_flops / 1e9
    out["hfu"] = hardware_flops / mesh.size / step_s / (peak_tflops(args)[0] or np.inf) / 1e12
    out["devices"] = mesh.size
    return with_mfu(out, model_flops, step_s, args, devices=mesh.size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True, choices=["generate", "distill", "peak"])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny networks at 64 px (CPU smoke run)"
    )
    parser.add_argument(
        "--batch_sizes", default="1,32", help="generate: comma-separated batch sizes"
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="generate: compute dtype",
    )
    parser.add_argument(
        "--batch", type=int, default=20, help="distill: global batch (the recipe: 20 per GPU)"
    )
    parser.add_argument("--steps", type=int, default=5, help="distill: timed steps")
    parser.add_argument(
        "--warmup", type=int, default=2, help="distill: untimed steps after compiling"
    )
    parser.add_argument(
        "--fsdp",
        type=int,
        default=1,
        help="distill: devices on the mesh's fsdp axis (-1: all; the rest data)",
    )
    parser.add_argument(
        "--overlap_collectives",
        action="store_true",
        help="distill: XLA's asynchronous collectives (config.mesh.overlap_collectives)",
    )
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="distill: join a multi-process run first (config.distributed)",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="generate: timed calls per batch size"
    )
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="one device's peak for MFU")
    add_output_flags(parser)
    args = parser.parse_args(argv)
    if args.fsdp == 0 or args.fsdp < -1:
        parser.error(f"--fsdp={args.fsdp} must be a positive size or -1")
    result = {"peak": run_peak, "generate": run_generate, "distill": run_distill}[args.part](args)
    if jax.process_index() != 0:  # one record per multi-process run
        return result
    return record(f"t2i_speed_{args.part}", result, print_only=args.no_record, path=args.results)


if __name__ == "__main__":
    main()
