"""Where model code takes a CPU-specific form: the one place such forms are chosen, and the rule.

Rule: a form other than the plain one stays only where it buys at least 10% of a whole program
(the demo, the test suite, or benchmarks/distill_step.py's latent step), measured on the
project's 2-core CPU with both forms compiled in one process (docs/performance.md). It is chosen
for the platform a program is lowered for (``lax.platform_dependent``), so a program compiled for
a GPU or TPU from a CPU host, as ``--mode=plan`` does, holds the form that device runs: the plain
one.

- :func:`upsample_nearest_conv3x3` (ADM UNet, SD VAE decoder): 2x nearest upsampling and a 3x3
  conv computed as four 2x2 convs of the input, one per output row/column parity. Every output
  pixel reads a 3x3 window of the upsampled map that holds only 2x2 distinct input pixels, so
  the taps sum onto 2x2: 2.25x fewer FLOPs and no 4x-sized map to write and read back.
- :func:`strided_conv` (StyleGAN2 discriminator): a strided "VALID" conv as patch extraction and
  one matmul. R1 differentiates D twice, and the second derivative of a strided convolution is an
  input-dilated convolution, which XLA:CPU runs slowly; slices, a concatenation and a dot
  differentiate into slices, pads and dots.

Both forms compute the same function as the plain one up to float32 summation order. The one
other platform choice in the package is the attention kernel (``models/attention.py``): cuDNN's
fused attention on NVIDIA GPUs and query chunks for long attention on TPUs, chosen for memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NHWC = ("NHWC", "HWIO", "NHWC")


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ---------------------------------------------------------------------------------------------
# 2x nearest upsampling + 3x3 conv (zero padding 1)

# _PHASE_TAPS[parity, j, k]: how much 3x3 tap k adds to 2x2 tap j of an output row (or column) of
# that parity. Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i; output row
# 2i+1 reads i, i, i+1.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                        [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_conv_by_phases(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The CPU form: four 2x2 convs of ``x``, their outputs interleaved."""
    b, h, w, _ = x.shape
    taps = jnp.einsum("rjk,sml,klio->rsjmio", _PHASE_TAPS, _PHASE_TAPS,
                      kernel.astype(jnp.float32)).astype(kernel.dtype)
    rows = []
    for r in range(2):  # even output rows read input rows (i-1, i), odd ones (i, i+1)
        columns = [jax.lax.conv_general_dilated(x, taps[r, s], (1, 1), ((1 - r, r), (1 - s, s)),
                                                dimension_numbers=_NHWC) for s in range(2)]
        rows.append(jnp.stack(columns, axis=3))  # [B, H, W, 2 (column parity), C]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1]) + bias


def upsample_conv_plain(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The plain form: the upsampled map convolved."""
    return jax.lax.conv_general_dilated(upsample_nearest(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=_NHWC) + bias


def upsample_nearest_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``conv(upsample_nearest(x), kernel) + bias``, size kept; ``kernel`` [3, 3, Cin, Cout]."""
    return jax.lax.platform_dependent(x, kernel, bias, cpu=upsample_conv_by_phases,
                                      default=upsample_conv_plain)


# ---------------------------------------------------------------------------------------------
# Strided "VALID" conv


def strided_conv_as_matmul(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """The CPU form: every kernel tap's strided slice, concatenated, times the flattened kernel."""
    kh, kw = w.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    patches = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
               for i in range(kh) for j in range(kw)]
    patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", patches, w.reshape(-1, w.shape[-1]))


def strided_conv_plain(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=_NHWC)


def strided_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """A "VALID" NHWC x HWIO convolution at ``stride``."""
    return jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: strided_conv_as_matmul(x, w, stride),
        default=lambda x, w: strided_conv_plain(x, w, stride))
