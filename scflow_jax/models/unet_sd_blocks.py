"""The building blocks of Stable Diffusion's UNet (``unet_sd.UNet2DConditionModel``), in Flax Linen.

Each module's submodule names are diffusers' attribute names (``resnets_0``, ``attentions_0``,
``transformer_blocks_0``, ``to_out_0``...), so the parameter paths they create are the checkpoint
keys that ``unet_sd.py``'s module docstring lists. Layouts: NHWC activations, ``[B, L, D]`` token
states.
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import attention

from scflow_jax.models.unet_sd_config import ACTIVATIONS, UNetSDConfig

Dtype = Any


class TimestepEmbedding(nn.Module):
    time_embed_dim: int
    act_fn: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb):
        h = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(t_emb)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(
            ACTIVATIONS[self.act_fn](h)
        )


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int
    eps: float
    act_fn: str
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        act = ACTIVATIONS[self.act_fn]
        h = act(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        h = (
            h
            + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))[
                :, None, None, :
            ]
        )
        h = act(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (``to_q``, ``to_k``, ``to_v`` without bias,
    ``to_out.0``)."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.head_dim
        split = lambda a: a.reshape(a.shape[:-1] + (self.heads, self.head_dim))  # noqa: E731
        q = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x))
        k = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context))
        v = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context))
        # cuDNN's fused kernel on NVIDIA GPUs where it can.
        o = attention.dot_product_attention(q, k, v)
        o = o.reshape(o.shape[:-2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(o)


class GEGLU(nn.Module):
    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(
            nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, axis=-1
        )
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)  # net.1 is dropout


class BasicTransformerBlock(nn.Module):
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.heads, self.head_dim, dtype=self.dtype, name="attn1")(
            norm("norm1")(x)
        )
        x = x + Attention(self.heads, self.head_dim, dtype=self.dtype, name="attn2")(
            norm("norm2")(x), context
        )
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in``, transformer blocks over the H*W tokens, ``proj_out``, residual."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, hh, ww, c = x.shape
        # diffusers hard-codes eps=1e-6 for this GroupNorm.
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        # A 1x1 conv and a Linear are the same map on NHWC; only the checkpoint layout differs.
        proj = (
            (lambda name: nn.Dense(c, dtype=self.dtype, name=name))
            if self.use_linear_projection
            else (lambda name: nn.Conv(c, (1, 1), dtype=self.dtype, name=name))
        )
        h = proj("proj_in")(h).reshape(b, hh * ww, c)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.heads, c // self.heads, dtype=self.dtype, name=f"transformer_blocks_{i}"
            )(h, context)
        return x + proj("proj_out")(h.reshape(b, hh, ww, c))


class Downsample2D(nn.Module):
    out_channels: int
    padding: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:  # diffusers pads right/bottom by one in this case
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(
            self.out_channels,
            (3, 3),
            strides=2,
            padding=self.padding,
            dtype=self.dtype,
            name="conv",
        )(x)


class Upsample2D(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: Tuple[int, int]):
        """Nearest-neighbour resize to ``size`` (2x unless the skip it meets is odd-sized), then a
        3x3 conv."""
        h, w = x.shape[1:3]
        if size == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # torch's "nearest": source index floor(dst * in / out)
            rows = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32), h - 1)
            cols = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32), w - 1)
            x = x[:, rows][:, :, cols]
        return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


class _BlockCommon(nn.Module):
    """Fields shared by the down/mid/up blocks."""

    config: UNetSDConfig
    out_channels: int
    num_layers: int
    heads: int = 1
    transformer_layers: int = 1
    has_attention: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    def resnet(self, name: str, output_scale_factor: float = 1.0) -> nn.Module:
        cfg = self.config
        cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        return cls(
            self.out_channels,
            cfg.norm_num_groups,
            cfg.norm_eps,
            cfg.act_fn,
            output_scale_factor,
            dtype=self.dtype,
            name=name,
        )

    def attention(self, name: str) -> nn.Module:
        cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
        return cls(
            self.heads,
            self.transformer_layers,
            self.config.norm_num_groups,
            self.config.use_linear_projection,
            dtype=self.dtype,
            name=name,
        )


class DownBlock(_BlockCommon):
    """``CrossAttnDownBlock2D`` (``has_attention``) or ``DownBlock2D``: returns the output and its
    skips."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for j in range(self.num_layers):
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.has_attention:
                x = self.attention(f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels,
                self.config.downsample_padding,
                dtype=self.dtype,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, skips


class MidBlock(_BlockCommon):
    """``UNetMidBlock2DCrossAttn``: resnet, then (attention, resnet) ``num_layers`` times."""

    @nn.compact
    def __call__(self, x, temb, context):
        scale = self.config.mid_block_scale_factor
        x = self.resnet("resnets_0", scale)(x, temb)
        for j in range(self.num_layers):
            x = self.attention(f"attentions_{j}")(x, context)
            x = self.resnet(f"resnets_{j + 1}", scale)(x, temb)
        return x


class UpBlock(_BlockCommon):
    """``CrossAttnUpBlock2D`` (``has_attention``) or ``UpBlock2D``: consumes skips last-first."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.has_attention:
                x = self.attention(f"attentions_{j}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(
                x, upsample_size
            )
        return x
