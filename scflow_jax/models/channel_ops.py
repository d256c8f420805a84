"""Per-channel broadcasts and sums written so that XLA:CPU runs their big reductions as matmuls.

Why: a bias or norm statistic of shape [C] (or [B, C]) broadcast over an NHWC map has, as its
gradient, a sum over the large leading axes with C kept minor. XLA:CPU splits such a sum over its
threads as a reduce-window that runs at about 1/8 of the speed of the same sum written as a
product with a vector of ones (measured on the project's 2-core AVX-512 CPU, jax 0.10.2: the
channel sums of a [64, 16, 16, 192] map take 8.7 ms as ``x.sum((0, 1, 2))``, 1.0 ms as
``ones @ x.reshape(-1, 192)``; a conv bias add and its gradient 9.9 ms against 2.2 ms). Such
sums are the bias gradients of every conv and the statistics and parameter gradients of every
GroupNorm in the UNets.

``broadcast_channels`` keeps the plain (fusible) broadcast as its value and writes only its
derivative as an outer product with ones (a ``custom_jvp``), so forward, reverse and higher-order
derivatives all work, and the transposed derivative (the gradient) is a matrix-vector product.
``channel_sums`` is the forward sum as such a product. Off CPU both are the plain broadcast and
sum: GPUs and TPUs reduce well and fuse the broadcast into neighbouring kernels.

``expand_groups`` gives each channel its group's value (a GroupNorm statistic) as a product with a
0/1 matrix on CPU, so that the per-channel values are made once instead of being recomputed with
index arithmetic inside every elementwise loop that reads them.

``Conv`` and ``GroupNorm`` are ``nn.Conv`` and ``nn.GroupNorm`` (``use_fast_variance=False``)
with the same parameter names, shapes and initialisation, built on these two.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp


def _matmul_reductions() -> bool:
    return jax.default_backend() == "cpu"


def _as_rows(v, shape):
    """``v`` [C] or [B, C] viewed so that it broadcasts against ``shape`` [..., C] / [B, ..., C]."""
    return v if v.ndim == 1 else v.reshape((v.shape[0],) + (1,) * (len(shape) - 2) + (v.shape[-1],))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _broadcast_channels(v, shape):
    return jnp.broadcast_to(_as_rows(v, shape), shape)


@_broadcast_channels.defjvp
def _broadcast_channels_jvp(shape, primals, tangents):
    (v,), (dv,) = primals, tangents
    if dv.ndim == 1:
        ones = jnp.ones((math.prod(shape[:-1]),), dv.dtype)
        tangent = jnp.einsum("n,c->nc", ones, dv)
    else:
        ones = jnp.ones((shape[0], math.prod(shape[1:-1])), dv.dtype)  # b a batch axis of the dot
        tangent = jnp.einsum("bn,bc->bnc", ones, dv)
    return _broadcast_channels(v, shape), tangent.reshape(shape)


def broadcast_channels(v: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``v`` [C] broadcast to ``shape`` [..., C], or ``v`` [B, C] to ``shape`` [B, ..., C]."""
    shape = tuple(shape)
    if not _matmul_reductions():
        return jnp.broadcast_to(_as_rows(v, shape), shape)
    return _broadcast_channels(v, shape)


def channel_sums(x: jax.Array, *, per_sample: bool) -> jax.Array:
    """Sums of ``x`` [B, ..., C] over all axes but the channels -> [C], or, ``per_sample``, over all
    axes but the first and the channels -> [B, C]."""
    c = x.shape[-1]
    if not _matmul_reductions():
        return x.sum(axis=tuple(range(1 if per_sample else 0, x.ndim - 1)))
    if per_sample:
        # With b a batch axis of the dot, x is read in place (as "n,bnc" XLA would transpose x first).
        rows = x.reshape(x.shape[0], -1, c)
        return jnp.einsum("bn,bnc->bc", jnp.ones(rows.shape[:2], x.dtype), rows)
    rows = x.reshape(-1, c)
    return jnp.einsum("n,nc->c", jnp.ones((rows.shape[0],), x.dtype), rows)


def expand_groups(v: jax.Array, group: int) -> jax.Array:
    """``v`` [B, G] -> [B, G * group]: each value repeated for the ``group`` channels of its group.

    On CPU as a product with a 0/1 matrix (exact: one nonzero term per output), because XLA fuses
    a repeat into the big elementwise loops that read the per-channel values, where its index
    arithmetic made them several times slower (the issue-8 UNet's 1-step sampling on one core of
    the 2-core CPU: its elementwise loops, mostly normalise + SiLU, took 94.5 core-ms with the
    repeat and 41.9 without, in profiles at the same matmul rate).
    """
    if group == 1:
        return v
    if not _matmul_reductions():
        return jnp.repeat(v, group, axis=-1)
    groups = v.shape[-1]
    indicator = jnp.arange(groups * group)[None, :] // group == jnp.arange(groups)[:, None]
    return v @ indicator.astype(v.dtype)


def _channel_last_dimension_numbers(ndim: int):
    spatial = tuple(range(1, ndim - 1))
    return jax.lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                        rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                        out_spec=(0, ndim - 1) + spatial)


class Conv(nn.Module):
    """Channel-last convolution with bias: ``nn.Conv``'s parameters (``kernel`` [*kernel_size, Cin,
    Cout], ``bias`` [Cout], float32) and result; the bias is added with ``broadcast_channels``."""

    features: int
    kernel_size: Sequence[int]
    strides: Union[None, Sequence[int]] = None
    padding: Any = "SAME"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel_size = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, kernel_size + (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, tuple(self.strides or (1,) * len(kernel_size)), self.padding,
                                         dimension_numbers=_channel_last_dimension_numbers(x.ndim))
        return y + broadcast_channels(bias, y.shape)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)`` on [B, ..., C] in float32 (same
    parameters ``scale`` and ``bias`` [C]): mean, then the mean square of the deviations, per sample
    and group; the sums as ``channel_sums`` and the broadcasts as ``broadcast_channels``."""

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x = x.astype(jnp.float32)
        batch, group = x.shape[0], c // self.num_groups
        count = math.prod(x.shape[1:-1]) * group

        def group_mean_per_channel(v):  # [B, ..., C] -> [B, C]: each channel gets its group's mean
            sums = channel_sums(v, per_sample=True).reshape(batch, self.num_groups, group).sum(-1) / count
            return expand_groups(sums, group)

        deviation = x - broadcast_channels(group_mean_per_channel(x), x.shape)
        inv_std = jax.lax.rsqrt(group_mean_per_channel(deviation * deviation) + self.epsilon)
        return deviation * broadcast_channels(inv_std * scale, x.shape) + broadcast_channels(bias, x.shape)
