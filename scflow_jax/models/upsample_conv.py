"""2x nearest upsampling followed by a 3x3 convolution, as one layer (the ADM UNet's ``Upsample.conv``
and up-ResBlocks' ``in_layers_2``, the VAE decoder's ``Upsample``), with ``nn.Conv``'s parameters.
CPU programs compute it on the input's own grid (``platform_forms.upsample_nearest_conv3x3``)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from scflow_jax.models.platform_forms import upsample_nearest, upsample_nearest_conv3x3

__all__ = ["UpsampleConv", "upsample_nearest"]


class UpsampleConv(nn.Module):
    """2x nearest upsampling, then ``nn.Conv(features, (3, 3), padding 1)``: the same parameters
    (``kernel`` [3, 3, Cin, Cout], ``bias``, float32), computed in ``dtype``."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return upsample_nearest_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype),
                                        bias.astype(self.dtype))
