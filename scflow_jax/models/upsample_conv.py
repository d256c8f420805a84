"""2x nearest upsampling followed by a 3x3 convolution, computed on the input's own grid (CPU).

Why: in the ADM UNet and the VAE decoder an upsampling is followed by a 3x3 conv (the ADM's
``Upsample.conv`` and up-ResBlocks' ``in_layers_2``, the VAE decoder's ``Upsample``). Every output
pixel of that conv reads a 3x3 window of the upsampled map, which holds only 2x2 distinct input
pixels, so the conv is four 2x2 convs of the input, one per output phase (row and column parity),
with the 3x3 kernel's taps summed onto 2x2: 2.25x fewer FLOPs, and no 4x-sized upsampled map to
write, transpose for the weight gradient and read again. On the project's 2-core CPU (jax 0.10.2)
forward and backward of a 128-channel layer at batch 64 took 46 against 74 ms (8x8 -> 16x16) and 12
against 24 ms (4x4 -> 8x8), and the SD VAE's 256 px decode 3.52 against 3.78 s (float32, batch 1);
the results agree with the plain form within float32 rounding (the summed taps change the order of
additions). The SD UNet's ``Upsample2D`` is the same layer but stays as written everywhere: at its
small, wide maps the phase form was the slower one here (docs/performance.md; batch 1,
float32, forward: 0.24x, 0.48x and 0.94x the plain form's speed from 8, 16 and 32 px inputs of 1280,
1280 and 640 channels; 1.7-2.3x faster at the VAE's three layers).

GPU and TPU programs keep the plain form: not measured there. The form, bias included (its gradient
goes through ``channel_ops`` on CPU only), is chosen for the platform a program is lowered for
(``lax.platform_dependent``, as ``attention`` does), so a program compiled for a GPU or TPU from a
CPU host (--mode=plan) is the one the device would run.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import channel_ops

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# _TAPS[phase, j, k]: how much 3x3 tap k contributes to 2x2 tap j of an output row (or column) of the given parity.
# Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i; output row 2i+1 reads i, i, i+1.
_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                  [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _by_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    phase_kernels = jnp.einsum("rjk,sml,klio->rsjmio", _TAPS, _TAPS, kernel.astype(jnp.float32)).astype(kernel.dtype)
    rows = []
    for r in range(2):  # even output rows read input rows (i-1, i): one row of padding above; odd ones (i, i+1)
        columns = [jax.lax.conv_general_dilated(x, phase_kernels[r, s], (1, 1), ((1 - r, r), (1 - s, s)),
                                                dimension_numbers=_DIMENSIONS) for s in range(2)]
        rows.append(jnp.stack(columns, axis=3))  # [B, H, W, 2 (column parity), C]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])


def phase_form(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The CPU programs' form: four 2x2 convs of ``x``, the bias's gradient a matrix-vector product."""
    y = _by_phases(x, kernel)
    return y + channel_ops.broadcast_channels(bias, y.shape)


def plain_form(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The GPU and TPU programs' form: the upsampled map convolved, the bias added."""
    y = jax.lax.conv_general_dilated(upsample_nearest(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=_DIMENSIONS)
    return y + bias


def upsample_nearest_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``conv(upsample_nearest(x), kernel) + bias`` with zero padding 1 (size kept). ``kernel`` [3, 3, Cin, Cout],
    ``bias`` [Cout]. :func:`phase_form` in CPU programs, :func:`plain_form` in GPU and TPU ones."""
    return jax.lax.platform_dependent(x, kernel, bias, cpu=phase_form, default=plain_form)


class UpsampleConv(nn.Module):
    """2x nearest upsampling, then ``channel_ops.Conv(features, (3, 3), padding 1)``: the same parameters
    (``kernel`` [3, 3, Cin, Cout], ``bias``), computed by ``upsample_nearest_conv3x3``."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return upsample_nearest_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))
