"""StyleGAN2-ADA-style "resnet" discriminator in Flax Linen (NHWC).

Clean-room implementation from the architecture description:

* equalized learning rate: weights are stored ~N(0, 1) and scaled by 1/sqrt(fan_in) at
  run time, so every layer sees the same effective learning rate under Adam;
* every 2x downsampling is preceded by a [1, 3, 3, 1] FIR low-pass (anti-aliasing) filter;
* one residual block per resolution from ``resolution`` down to 8, then a 4x4 epilogue with
  a minibatch-stddev layer and (optionally) projection conditioning.

Parameters are stored in float32; ``dtype`` only sets the compute dtype. Logits are float32.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models.platform_forms import strided_conv

# Leaky ReLU slope and the gain that restores unit variance after it (He et al.).
_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)
# 1-D taps of the binomial low-pass filter used for every 2x downsampling.
_FIR_TAPS = (1.0, 3.0, 3.0, 1.0)


def _activate(x: jax.Array, activation: str) -> jax.Array:
    if activation == "lrelu":
        return nn.leaky_relu(x, negative_slope=_LRELU_SLOPE) * jnp.asarray(_LRELU_GAIN, x.dtype)
    if activation == "linear":
        return x
    raise ValueError(f"unknown activation {activation!r} (expected 'lrelu' or 'linear')")


def fir_filter_2d(taps=_FIR_TAPS) -> np.ndarray:
    """Separable 2-D FIR filter: outer product of ``taps``, normalised to sum to 1 (DC gain 1)."""
    f = np.asarray(taps, dtype=np.float32)
    f2 = np.outer(f, f)
    return f2 / f2.sum()


def _fir_1d(x: jax.Array, axis: int, stride: int) -> jax.Array:
    """Correlates ``x`` with the normalised 1-D taps along ``axis`` ("valid"), at ``stride``."""
    taps = np.asarray(_FIR_TAPS, np.float32) / np.sum(_FIR_TAPS)
    n_out = (x.shape[axis] - len(taps)) // stride + 1
    out = 0.0
    for k, tap in enumerate(taps):
        window = jax.lax.slice_in_dim(x, k, k + stride * (n_out - 1) + 1, stride=stride, axis=axis)
        out = out + jnp.asarray(tap, x.dtype) * window
    return out


def blur(
    x: jax.Array, pad: tuple[int, int], stride: int = 1, pad_mode: str = "constant"
) -> jax.Array:
    """FIR low-pass on an NHWC map, with explicit (before, after) padding on H and W.

    The 2-D filter is separable (outer product of the 1-D taps), so it runs as weighted sums of
    shifted slices along H then W. XLA fuses these into elementwise loops; a depthwise
    convolution (feature_group_count=C) is an order of magnitude slower on CPU, and R1
    differentiates this twice. ``pad_mode`` is passed to ``jnp.pad``; the discriminator uses
    zero padding ("constant"), as StyleGAN2 does. The filter is symmetric, so correlation ==
    convolution here.
    """
    if pad != (0, 0):
        x = jnp.pad(x, ((0, 0), pad, pad, (0, 0)), mode=pad_mode)
    return _fir_1d(_fir_1d(x, axis=1, stride=stride), axis=2, stride=stride)


def _down_pad(kernel_size: int, down: int = 2, num_taps: int = len(_FIR_TAPS)) -> tuple[int, int]:
    # Total padding that makes "blur, then k x k conv with stride `down`" map H -> H / down.
    p = (num_taps - down) + (kernel_size - 1)
    return ((p + 1) // 2, p // 2)


def blur_downsample_2x(x: jax.Array, pad_mode: str = "constant") -> jax.Array:
    """Anti-aliased 2x downsampling: FIR blur evaluated at stride 2. [B,H,W,C] -> [B,H/2,W/2,C]."""
    return blur(x, _down_pad(1), stride=2, pad_mode=pad_mode)


class EqualizedConv(nn.Module):
    """k x k conv with equalized learning rate, optional 2x blur-downsampling and activation.

    With ``down=2`` the input is padded and blurred first and the conv then runs with stride 2,
    so H x W becomes H/2 x W/2 (for k=1 this is a blur-downsample followed by a 1x1 conv).
    """

    features: int
    kernel_size: int = 3
    down: int = 1
    use_bias: bool = True
    activation: str = "lrelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        in_ch = x.shape[-1]
        # Stored weights are N(0, 1); the run-time 1/sqrt(fan_in) scale equalises learning rates.
        kernel = self.param(
            "kernel", nn.initializers.normal(stddev=1.0), (k, k, in_ch, self.features), jnp.float32
        )
        w = (kernel * (1.0 / math.sqrt(in_ch * k * k))).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.down == 1:
            # Odd kernel, stride 1: symmetric zero padding keeps the spatial size.
            padding = [((k - 1) // 2, k // 2)] * 2
            stride = 1
        elif self.down == 2:
            x = blur(x, _down_pad(k))
            padding = "VALID"
            stride = 2
        else:
            raise ValueError(f"EqualizedConv supports down in (1, 2), got {self.down}")
        if stride == 1:
            y = jax.lax.conv_general_dilated(
                x,
                w,
                window_strides=(1, 1),
                padding=padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        else:
            y = strided_conv(x, w, stride)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return _activate(y, self.activation)


class EqualizedDense(nn.Module):
    """Dense layer with equalized learning rate (weights N(0,1), scaled by 1/sqrt(fan_in))."""

    features: int
    use_bias: bool = True
    activation: str = "linear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_f = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.normal(stddev=1.0), (in_f, self.features), jnp.float32
        )
        w = (kernel * (1.0 / math.sqrt(in_f))).astype(self.dtype)
        y = jnp.dot(x.astype(self.dtype), w)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return _activate(y, self.activation)


def minibatch_stddev(x: jax.Array, group_size: int = 4, num_channels: int = 1) -> jax.Array:
    """Append ``num_channels`` minibatch-stddev feature maps to an NHWC tensor.

    The batch is split into groups of G = min(group_size, B) samples; following StyleGAN2 the
    groups are strided (group m holds samples m, m + B/G, m + 2B/G, ...). For each group the
    std over its members of every feature is averaged over H, W and the channels of each of
    the ``num_channels`` channel slices, and broadcast back to every member and pixel. This
    lets D see sample diversity and penalise mode collapse. Computed in float32.
    """
    b, h, w, c = x.shape
    g = min(group_size, b)
    if g < 1 or b % g != 0:
        raise ValueError(
            f"batch size {b} must be divisible by the minibatch-stddev group size "
            f"min(mbstd_group_size={group_size}, batch)={g}"
        )
    f = num_channels
    if f < 1 or c % f != 0:
        raise ValueError(f"channels {c} must be divisible by mbstd_num_channels={num_channels}")
    m = b // g
    y = x.astype(jnp.float32).reshape(g, m, h, w, f, c // f)
    y = y - jnp.mean(y, axis=0)
    y = jnp.sqrt(jnp.mean(jnp.square(y), axis=0) + 1e-8)  # [M, H, W, F, c/F]
    y = jnp.mean(y, axis=(1, 2, 4))  # [M, F]
    y = jnp.tile(y, (g, 1))  # [B, F]: sample n belongs to group n % M
    y = jnp.broadcast_to(y[:, None, None, :], (b, h, w, f)).astype(x.dtype)
    return jnp.concatenate([x, y], axis=-1)


class DiscriminatorBlock(nn.Module):
    """Residual block: (skip(x) + conv1_down(conv0(x))) * sqrt(0.5); halves the resolution."""

    tmp_channels: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Linear, bias-free skip so the residual sum stays zero-mean; sqrt(0.5) keeps unit variance.
        y = EqualizedConv(
            self.out_channels,
            1,
            down=2,
            use_bias=False,
            activation="linear",
            dtype=self.dtype,
            name="skip",
        )(x)
        x = EqualizedConv(self.tmp_channels, 3, dtype=self.dtype, name="conv0")(x)
        x = EqualizedConv(self.out_channels, 3, down=2, dtype=self.dtype, name="conv1")(x)
        return (y + x) * jnp.asarray(math.sqrt(0.5), x.dtype)


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2-ADA "resnet" discriminator. x [B, H, W, C] (NHWC) -> float32 logits [B]."""

    resolution: int
    in_channels: int
    channel_base: int = 16384
    channel_max: int = 512
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    cond_dim: int = 0
    dtype: Any = jnp.float32

    # The authors' latent training feeds this D's raw logit to the softplus losses (no sigmoid).
    OUTPUT_SIGMOID = False

    def _channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @nn.compact
    def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
        r = self.resolution
        if r < 8 or r & (r - 1) != 0:
            raise ValueError(f"resolution must be a power of 2 >= 8, got {r}")
        if x.ndim != 4 or x.shape[1:] != (r, r, self.in_channels):
            raise ValueError(f"expected input [B, {r}, {r}, {self.in_channels}], got {x.shape}")
        if self.cond_dim > 0 and cond is None:
            raise ValueError(f"cond_dim={self.cond_dim} but no cond was given")
        if self.cond_dim == 0 and cond is not None:
            raise ValueError("cond was given but cond_dim=0 (unconditional discriminator)")

        x = x.astype(self.dtype)
        x = EqualizedConv(self._channels(r), 1, dtype=self.dtype, name="fromrgb")(x)
        res = r
        while res >= 8:
            x = DiscriminatorBlock(
                self._channels(res), self._channels(res // 2), dtype=self.dtype, name=f"b{res}"
            )(x)
            res //= 2

        # Epilogue at 4x4.
        c4 = self._channels(4)
        if self.mbstd_num_channels > 0:
            x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_channels)
        x = EqualizedConv(c4, 3, dtype=self.dtype, name="b4_conv")(x)
        x = x.reshape(x.shape[0], -1)
        x = EqualizedDense(c4, activation="lrelu", dtype=self.dtype, name="b4_fc")(x)

        if self.cond_dim == 0:
            out = EqualizedDense(1, dtype=self.dtype, name="b4_out")(x)
            return out[:, 0].astype(jnp.float32)

        # Projection conditioning: logit = <phi(x), cmap(cond)> / sqrt(cmap_dim).
        cmap_dim = c4
        out = EqualizedDense(cmap_dim, dtype=self.dtype, name="b4_out")(x)
        cmap = EqualizedDense(cmap_dim, activation="lrelu", dtype=self.dtype, name="mapping_fc0")(
            cond
        )
        cmap = EqualizedDense(cmap_dim, dtype=self.dtype, name="mapping_fc1")(cmap)
        logits = jnp.sum(out.astype(jnp.float32) * cmap.astype(jnp.float32), axis=-1) / math.sqrt(
            cmap_dim
        )
        return logits
