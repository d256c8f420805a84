"""2x nearest upsampling followed by a 3x3 convolution, as one layer (the ADM UNet's
``Upsample.conv`` and up-ResBlocks' ``in_layers_2``, the VAE decoder's ``Upsample``), with
``nn.Conv``'s parameters."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["UpsampleConv", "upsample_nearest"]


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UpsampleConv(nn.Module):
    """2x nearest upsampling, then ``nn.Conv(features, (3, 3), padding 1)``: its parameters
    (``kernel`` [3, 3, Cin, Cout], ``bias``, float32), computed in ``dtype``."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(
            upsample_nearest(x.astype(self.dtype)),
            kernel.astype(self.dtype),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)
