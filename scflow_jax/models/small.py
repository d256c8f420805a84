"""The small networks of the embedded default: a UNet with self- and cross-attention.

A scaled-down relative of the SD 1.5 UNet (ResNet blocks with a time embedding, transformer
blocks that attend to the text encoder's hidden states), sized so teacher training,
distillation and evaluation on 8x8 digits finish within minutes on a 2-core CPU.
The network is native to the project convention: ``F(t, x, c)`` with t in [0, 1] predicts
the velocity ``z1 - z0`` (see flows.py); no wrapper is needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scflow_jax.models.timestep import sinusoidal_embedding


def _groups(channels: int, preferred: int = 32) -> int:
    g = min(preferred, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding as a scale and shift."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        h = nn.silu(nn.GroupNorm(_groups(x.shape[-1]), dtype=self.dtype)(x))
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
        scale, shift = jnp.split(
            nn.Dense(2 * self.out_channels, dtype=self.dtype)(nn.silu(temb)), 2, -1
        )
        h = nn.GroupNorm(_groups(self.out_channels), dtype=self.dtype)(h)
        h = h * (1 + scale[:, None, None]) + shift[:, None, None]
        # Zero-initialised last conv: each block starts as the identity, which keeps
        # deep stacks stable from the first step.
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(
            nn.silu(h)
        )
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)
        return x + h


class TransformerBlock(nn.Module):
    """Self-attention over pixels, cross-attention to the text tokens, then an MLP."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        tokens = nn.Dense(c, dtype=self.dtype)(
            nn.GroupNorm(_groups(c), dtype=self.dtype)(x).reshape(b, h * w, c)
        )

        def attn():
            return nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)

        y = nn.LayerNorm(dtype=self.dtype)(tokens)
        tokens = tokens + attn()(y, y)
        tokens = tokens + attn()(nn.LayerNorm(dtype=self.dtype)(tokens), context.astype(self.dtype))
        y = nn.Dense(4 * c, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(tokens))
        tokens = tokens + nn.Dense(c, dtype=self.dtype)(nn.gelu(y))
        out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros)(tokens)
        return x + out.reshape(b, h, w, c)


class SmallUNet(nn.Module):
    """UNet over NHWC inputs; ``attention_levels`` index the resolutions that get attention."""

    out_channels: int = 1
    channels: int = 64
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: Sequence[int] = (1,)
    num_heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, context):
        """x [B, H, W, C], t [B] in [0, 1], context [B, L, D] -> velocity [B, H, W, out]."""
        temb_dim = 4 * self.channels
        temb = sinusoidal_embedding(1000.0 * t, self.channels)  # t in [0, 1] over the usual 0..1000
        temb = nn.Dense(temb_dim, dtype=self.dtype)(temb)
        temb = nn.Dense(temb_dim, dtype=self.dtype)(nn.silu(temb))

        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, self.dtype)(h, temb)
                if level in self.attention_levels:
                    h = TransformerBlock(self.num_heads, self.dtype)(h, context)
                skips.append(h)
            if level != len(self.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], self.dtype)(h, temb)
        h = TransformerBlock(self.num_heads, self.dtype)(h, context)
        h = ResBlock(h.shape[-1], self.dtype)(h, temb)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.channels * mult, self.dtype)(h, temb)
                if level in self.attention_levels:
                    h = TransformerBlock(self.num_heads, self.dtype)(h, context)
            if level != 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                h = nn.Conv(c, (3, 3), dtype=self.dtype)(h)

        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=self.dtype)(h))
        out = nn.Conv(
            self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros
        )(h)
        return out.astype(jnp.float32)
