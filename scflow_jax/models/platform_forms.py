"""Where model code takes a CPU-specific form: the one place such forms are chosen, and the rule.

Rule: a form other than the plain one stays only where it buys at least 10% of a whole program
(the demo, the test suite, or benchmarks/distill_step.py's latent step), measured on the
project's 2-core CPU with both forms compiled in one process (docs/performance.md). It is chosen
for the platform a program is lowered for (``lax.platform_dependent``), so a program compiled for
a GPU or TPU from a CPU host, as ``--mode=plan`` does, holds the form that device runs: the plain
one.

One form meets the rule today. :func:`strided_conv` (StyleGAN2 discriminator): a strided "VALID"
conv as patch extraction and one matmul. R1 differentiates D twice, and the second derivative of a
strided convolution is an input-dilated convolution, which XLA:CPU runs slowly; slices, a
concatenation and a dot differentiate into slices, pads and dots. It computes the plain form's
function up to float32 summation order.

The one other platform choice in the package is the attention kernel (``models/attention.py``):
cuDNN's fused attention on NVIDIA GPUs and query chunks for long attention on TPUs, chosen for
memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def strided_conv_as_matmul(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """The CPU form: every kernel tap's strided slice, concatenated, times the flattened kernel."""
    kh, kw = w.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    patches = [
        x[
            :,
            i : i + stride * (out_h - 1) + 1 : stride,
            j : j + stride * (out_w - 1) + 1 : stride,
            :,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, w.reshape(-1, w.shape[-1]))


def strided_conv_plain(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=_NHWC)


def strided_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """A "VALID" NHWC x HWIO convolution at ``stride``."""
    return jax.lax.platform_dependent(
        x,
        w,
        cpu=lambda x, w: strided_conv_as_matmul(x, w, stride),
        default=lambda x, w: strided_conv_plain(x, w, stride),
    )
