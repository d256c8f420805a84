"""Cost of the full-size SD VAE decoder (random init) at batch 1: XLA FLOPs and seconds per call.

Usage: python benchmarks/vae_forward.py [--flops-only] [--dtype=bfloat16] [--sizes=32,64] [--batch=1]
Latents are 4 x s x s (s = 32: 256 px images, s = 64: 512 px). FLOPs come from
``jax.jit(f).lower(...).compile().cost_analysis()`` (what XLA counts for the compiled program, fused
multiply-add = 2 FLOPs). Without --flops-only it also times the call (benchmarks/common.time_calls) and appends
one entry to benchmarks/results.json; only do that on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import record, time_calls, xla_flops  # noqa: E402
from scflow_jax.models.vae import VAE, VAEConfig  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-only", action="store_true", help="compile and count FLOPs; do not time or record")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sizes", default="32,64", help="latent sizes (comma-separated)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    vae = VAE(VAEConfig(), dtype=jnp.dtype(args.dtype))
    params = jax.jit(vae.init)(jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(params["decoder"])) + sum(
        x.size for x in jax.tree.leaves(params["post_quant_conv"]))
    decode = jax.jit(lambda p, z: vae.decode(p, z))
    results = []
    for s in (int(v) for v in args.sizes.split(",")):
        z = jax.random.normal(jax.random.PRNGKey(1), (args.batch, s, s, vae.config.latent_channels))
        start = time.perf_counter()
        lowered = decode.lower(params, z)
        compiled = lowered.compile()
        entry = {"latent": [vae.config.latent_channels, s, s], "image_px": s * vae.config.downsample_factor,
                 "batch": args.batch, "dtype": args.dtype, "compile_s": time.perf_counter() - start,
                 "gflops_per_sample": xla_flops(lowered) / 1e9 / args.batch}
        if not args.flops_only:
            entry.update(time_calls(lambda: compiled(params, z), warmup=2, repeats=args.repeats))
        print(entry, flush=True)
        results.append(entry)
    if not args.flops_only:
        record("vae_decoder_forward", {"decoder_params": int(n_params), "results": results})
    return results


if __name__ == "__main__":
    main()
