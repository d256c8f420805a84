"""Forward cost of the full SD 1.5 UNet (random float32 weights): XLA FLOPs, parameter count, seconds per call.

Usage: python benchmarks/unet_sd_forward.py [--flops-only] [--batch N] [--dtype float32|bfloat16] [--no-record]

Two inputs: a 64x64 latent (512 px images) and a 32x32 latent (256 px), both with 77x768 text states. FLOPs come
from ``jax.jit(f).lower(...).compile().cost_analysis()`` and need no parameters in memory (the program is lowered
from shapes); ``--flops-only`` stops there. Otherwise the parameters are initialised on the device and each forward
is timed (1 warm-up, 3 repeats). Appends one entry to benchmarks/results.json unless ``--no-record``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import record, time_calls, xla_flops  # noqa: E402
from scflow_jax.models import unet_sd  # noqa: E402

LATENT_SIDES = (64, 32)
TEXT_TOKENS, TEXT_DIM = 77, 768


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-only", action="store_true", help="lower and compile only; no parameters, no timing")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to results.json")
    args = parser.parse_args()

    config = unet_sd.UNetSDConfig()
    dtype = jnp.dtype(args.dtype)
    param_shapes = unet_sd.unet_param_shapes(config)
    num_params = int(sum(np.prod(s.shape) for s in jax.tree.leaves(param_shapes)))
    print(f"SD 1.5 UNet: {num_params:,} parameters", flush=True)
    forward = jax.jit(unet_sd.make_unet_apply(config, dtype=dtype))
    params = None if args.flops_only else unet_sd.init_unet_sd(config, jax.random.PRNGKey(0))

    results = {}
    for side in LATENT_SIDES:
        shapes = (jax.ShapeDtypeStruct((args.batch, side, side, config.in_channels), jnp.float32),
                  jax.ShapeDtypeStruct((args.batch,), jnp.float32),
                  jax.ShapeDtypeStruct((args.batch, TEXT_TOKENS, TEXT_DIM), jnp.float32))
        start = time.perf_counter()
        lowered = forward.lower(param_shapes, *shapes)
        compiled = lowered.compile()
        entry = {"latent": [side, side], "compile_s": time.perf_counter() - start}
        entry["flops"] = xla_flops(lowered)
        entry["gflops_per_sample"] = entry["flops"] / args.batch / 1e9
        if params is not None:
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal(shapes[0].shape), jnp.float32)
            t = jnp.full(shapes[1].shape, 500.0, jnp.float32)
            c = jnp.asarray(rng.standard_normal(shapes[2].shape), jnp.float32)
            entry["forward"] = time_calls(lambda: compiled(params, x, t, c), warmup=1, repeats=3)
        print(f"latent {side}x{side}: {entry}", flush=True)
        results[f"latent{side}"] = entry

    out = {"batch": args.batch, "dtype": args.dtype, "params": num_params, **results}
    record("unet_sd_forward" + ("_flops" if args.flops_only else ""), out, print_only=args.no_record)


if __name__ == "__main__":
    main()
