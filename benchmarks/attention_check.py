"""The attention the SD UNet runs on this device (models/attention.py) against XLA's as written, on
the SD 1.5 UNet's attention shapes in bf16: do values and gradients agree, and how long does each
take?

On an NVIDIA GPU the first is cuDNN's fused kernel wherever it takes the shapes, elsewhere query
chunks or XLA's own; this is the check that cuDNN's kernel, which a CPU host can compile but never
run, computes the same attention on the card. For each case it reports the kernel used, the largest
difference of the output and of the three gradients relative to the largest magnitude of XLA's
(bf16 rounding is ~4e-3), and the median time of the forward + backward pass of each.

Usage: python benchmarks/attention_check.py [--rows=16] [--tiny] [--results=PATH]
           [--no_record]
  --tiny: short sequences, for a CPU smoke run (every case is then XLA's on both sides).
Prints one JSON line and appends it to the results file (common.py) unless --no_record. Exits
non-zero when a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import (
    add_output_flags,
    exit_past_tolerance,
    forward_and_backward,  # noqa: E402
    record,
    relative_difference,
    time_calls,
)
from scflow_jax.models import attention  # noqa: E402

# (queries, keys, heads, head dim) of the SD 1.5 UNet at 512 px: self-attention at the 64x64, 32x32
# and 16x16 levels, and the cross-attention to 77 text tokens at 64x64.
SD15_CASES = ((4096, 4096, 8, 40), (1024, 1024, 8, 80), (256, 256, 8, 160), (4096, 77, 8, 40))
TINY_CASES = ((64, 64, 2, 8), (64, 7, 2, 8))


def kernel_name(q, k, v) -> str:
    platform = jax.devices()[0].platform
    kernel = attention.platform_kernels(q, k, v).get("cuda" if platform == "gpu" else platform)
    return getattr(kernel, "__name__", "xla_attention")


def check_case(rows: int, queries: int, keys: int, heads: int, head_dim: int) -> dict:
    rngs = jax.random.split(jax.random.PRNGKey(queries + keys), 4)
    q = jax.random.normal(rngs[0], (rows, queries, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(r, (rows, keys, heads, head_dim), jnp.bfloat16) for r in rngs[1:3])
    cotangent = jax.random.normal(rngs[3], q.shape, jnp.bfloat16)
    ours, xla = (
        forward_and_backward(attention.dot_product_attention),
        forward_and_backward(attention.xla_attention),
    )
    got, want = ours(q, k, v, cotangent), xla(q, k, v, cotangent)
    names = ("output", "grad_q", "grad_k", "grad_v")
    case = {
        "rows": rows,
        "queries": queries,
        "keys": keys,
        "heads": heads,
        "head_dim": head_dim,
        "kernel": kernel_name(q, k, v),
        "relative_difference": {n: relative_difference(a, b) for n, a, b in zip(names, got, want)},
    }
    for name, fn in (("kernel", ours), ("xla", xla)):
        case[f"{name}_fwd_bwd_ms"] = (
            1e3 * time_calls(lambda: fn(q, k, v, cotangent), warmup=2, repeats=10)["median_s"]
        )
    return case


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        default=16,
        help="batch rows (XLA's side holds [rows, 8, 4096, 4096] float32 logits: 8 GiB at 16)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="largest relative difference allowed"
    )
    parser.add_argument("--tiny", action="store_true", help="short sequences (CPU smoke run)")
    add_output_flags(parser)
    args = parser.parse_args(argv)
    cases = [check_case(args.rows, *shape) for shape in (TINY_CASES if args.tiny else SD15_CASES)]
    out = record(
        "attention_check",
        {
            "tiny": args.tiny,
            "device_kind": jax.devices()[0].device_kind,
            "attention_setting": attention.attention_setting(),
            "cases": cases,
        },
        print_only=args.no_record,
        path=args.results,
    )
    exit_past_tolerance(
        "attention_check", cases, args.tolerance, "the device's attention does not compute XLA's"
    )
    return out


if __name__ == "__main__":
    main()
