"""Stable Diffusion's UNet (diffusers ``UNet2DConditionModel``) in Flax Linen: the top-level network
(its configuration: ``unet_sd_config.py``; its building blocks: ``unet_sd_blocks.py``; its converter
and exporter: ``unet_sd_weights.py``).

The default configuration is SD 1.5's (~860M parameters); tiny configurations build for tests.
``UNetSDConfig``'s fields are the keys of diffusers' ``unet/config.json`` and mean what they mean
there, including the historical misnomer that ``attention_head_dim`` is the *number of heads* per
block (diffusers derives the head width as ``channels // attention_head_dim``; SD 1.5 has 8 heads of
width 40, 80, 160, 160).

Layout: activations are NHWC (``sample`` is ``[B, H, W, C]``), text states
``[B, L, cross_attention_dim]``, timesteps a scalar or ``[B]`` in diffusers' scale (0..1000).
Parameters are float32; ``dtype`` sets the compute dtype (GroupNorm/LayerNorm statistics and the
attention softmax stay in float32); outputs are float32.

The parameter tree mirrors diffusers' module names, so a checkpoint key is the Flax path joined by
``.`` with ``ModuleList`` indices split off (``weights.hf_style_key``)::

    conv_in/kernel                             <- conv_in.weight (OIHW -> HWIO)
    time_embedding/linear_{1,2}/{kernel,bias}  <- time_embedding.linear_{1,2}.{weight.T,bias}
    down_blocks_0/resnets_1/{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}/...
    down_blocks_0/attentions_0/{norm,proj_in,proj_out}/...
    down_blocks_0/attentions_0/transformer_blocks_0/{norm1,norm2,norm3}/{scale,bias}
    down_blocks_0/attentions_0/transformer_blocks_0/attn1/{to_q,to_k,to_v,to_out_0}/...
    down_blocks_0/attentions_0/transformer_blocks_0/ff/{net_0/proj,net_2}/...
    down_blocks_0/downsamplers_0/conv/...
    mid_block/{resnets_0,attentions_0,resnets_1}/...
    up_blocks_1/{resnets_2,attentions_2,upsamplers_0/conv}/...
    conv_norm_out/{scale,bias}, conv_out/{kernel,bias}

(``proj_in``/``proj_out`` are 1x1 convs, or Linears when ``use_linear_projection``; both map by the
same name.) diffusers has no legacy attention names for this model: its
``query/key/value/proj_attn`` renaming only concerns the plain ``Attn*Block2D``/``UNetMidBlock2D``
blocks, which SD UNets do not use.

The encoder half (``conv_in``, ``time_proj``/``time_embedding``, ``down_blocks_*``, ``mid_block``)
is ``UNet2DConditionModel.encode``; see its docstring and ``encoder_params`` for how the
text-to-image discriminator reuses the teacher's weights.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from scflow_jax.models.timestep import sinusoidal_embedding
from scflow_jax.models.unet_sd_blocks import DownBlock, MidBlock, TimestepEmbedding, UpBlock
from scflow_jax.models.unet_sd_config import ACTIVATIONS, UNetSDConfig

__all__ = [
    "UNetSDConfig",
    "UNet2DConditionModel",
    "init_unet_sd",
    "unet_param_shapes",
    "encoder_params",
    "ENCODER_PARAM_GROUPS",
    "make_unet_apply",
]

Dtype = Any
# --------------------------------------------------------------------------------------------------
# The UNet


class UNet2DConditionModel(nn.Module):
    """diffusers' ``UNet2DConditionModel`` (see the module docstring for layouts and names).

    ``remat`` rematerialises every resnet and every attention module (``Transformer2DModel``) in the
    backward pass, as diffusers' gradient checkpointing does; the parameter tree is unchanged.
    """

    config: UNetSDConfig = UNetSDConfig()
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        channels = cfg.block_out_channels
        n = len(channels)
        layers = cfg.per_block("layers_per_block")
        heads = cfg.per_block("attention_head_dim")
        tlayers = cfg.per_block("transformer_layers_per_block")
        common = dict(config=cfg, remat=self.remat, dtype=self.dtype)
        k_in = cfg.conv_in_kernel
        self.conv_in = nn.Conv(channels[0], (k_in, k_in), padding=k_in // 2, dtype=self.dtype)
        self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=self.dtype)
        self.down_blocks = [
            DownBlock(
                out_channels=channels[i],
                num_layers=layers[i],
                heads=heads[i],
                transformer_layers=tlayers[i],
                has_attention=cfg.down_block_types[i] == "CrossAttnDownBlock2D",
                add_downsample=i < n - 1,
                **common,
            )
            for i in range(n)
        ]
        self.mid_block = MidBlock(
            out_channels=channels[-1],
            num_layers=1,
            heads=heads[-1],
            transformer_layers=tlayers[-1],
            **common,
        )
        rev = lambda t: tuple(reversed(t))  # noqa: E731
        self.up_blocks = [
            UpBlock(
                out_channels=rev(channels)[i],
                num_layers=rev(layers)[i] + 1,
                heads=rev(heads)[i],
                transformer_layers=rev(tlayers)[i],
                has_attention=cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                add_upsample=i < n - 1,
                **common,
            )
            for i in range(n)
        ]
        self.conv_norm_out = nn.GroupNorm(
            cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype
        )
        k_out = cfg.conv_out_kernel
        self.conv_out = nn.Conv(
            cfg.out_channels, (k_out, k_out), padding=k_out // 2, dtype=self.dtype
        )

    def _check_inputs(self, sample, encoder_hidden_states):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet2DConditionModel expects NHWC samples with {cfg.in_channels} channels, "
                f"got shape {sample.shape}"
            )
        if encoder_hidden_states.ndim != 3:
            raise ValueError(
                "UNet2DConditionModel expects encoder_hidden_states [B, L, D], got shape "
                f"{encoder_hidden_states.shape}"
            )

    def _down(self, sample, timesteps, encoder_hidden_states):
        cfg = self.config
        self._check_inputs(sample, encoder_hidden_states)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
        t_emb = sinusoidal_embedding(
            timesteps,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        temb = self.time_embedding(t_emb.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        return x, skips, temb, context

    def encode(self, sample, timesteps, encoder_hidden_states):
        """The encoder half: conv_in, time embedding, down blocks, mid block -> the mid-block
        feature ``[B, H / 2**(n-1), W / 2**(n-1), block_out_channels[-1]]`` (8x8x1280 for SD 1.5 at
        64x64), float32.

        Its parameters are the sub-tree ``encoder_params(full_params)`` (keys
        ``ENCODER_PARAM_GROUPS``: conv_in, time_embedding, down_blocks_*, mid_block), with the same
        paths as in the full UNet; ``model.init(..., method=UNet2DConditionModel.encode)`` creates
        exactly that sub-tree. A discriminator that holds this module as a submodule ``unet`` and
        calls ``self.unet.encode(...)`` has its copy under ``["unet"]``.
        """
        return self._down(sample, timesteps, encoder_hidden_states)[0].astype(jnp.float32)

    def __call__(self, sample, timesteps, encoder_hidden_states):
        """The noise (or, for rectified-flow teachers, ``z0 - z1``) prediction, NHWC float32."""
        x, skips, temb, context = self._down(sample, timesteps, encoder_hidden_states)
        for block in self.up_blocks:
            used, skips = skips[-block.num_layers :], skips[: -block.num_layers]
            # Upsample to the size of the skip the next block meets (2x unless that level was
            # odd-sized).
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, used, temb, context, size)
        x = ACTIVATIONS[self.config.act_fn](self.conv_norm_out(x))
        return self.conv_out(x).astype(jnp.float32)


ENCODER_PARAM_GROUPS = ("conv_in", "time_embedding", "down_blocks_", "mid_block")


def encoder_params(unet_params: Mapping[str, Any]) -> Dict[str, Any]:
    """The sub-tree of full UNet parameters that ``UNet2DConditionModel.encode`` uses."""
    return {
        k: v
        for k, v in unet_params.items()
        if any(k == g or (g.endswith("_") and k.startswith(g)) for g in ENCODER_PARAM_GROUPS)
    }


def _init_inputs(config: UNetSDConfig):
    """The smallest inputs that build every parameter (shapes do not depend on the spatial size)."""
    side = 2 ** (len(config.block_out_channels) - 1)
    cross = config.per_block("cross_attention_dim")
    return (
        jnp.zeros((1, side, side, config.in_channels), jnp.float32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 1, cross[0]), jnp.float32),
    )


def unet_param_shapes(config: UNetSDConfig) -> Dict[str, Any]:
    """The parameter tree as ``jax.ShapeDtypeStruct``s (no memory, no compute)."""
    model = UNet2DConditionModel(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), *_init_inputs(config))["params"]


def init_unet_sd(config: UNetSDConfig, rng: jax.Array) -> Dict[str, Any]:
    """Random float32 parameters (Flax default initialisers, not diffusers')."""
    return jax.jit(UNet2DConditionModel(config).init)(rng, *_init_inputs(config))["params"]


def make_unet_apply(config: UNetSDConfig, *, dtype: Dtype = jnp.float32, remat: bool = False):
    """``unet_apply(params, x, timestep, encoder_hidden_states) -> u`` (x NHWC, timestep in
    diffusers' 0..1000): the form ``flows.wrap_diffusers_rectified_flow`` turns into a project
    velocity field ``F(t, x, c) = -unet_apply(params, x, 1000 t, c)``."""
    model = UNet2DConditionModel(config, dtype=dtype, remat=remat)

    def unet_apply(params, x, timestep, encoder_hidden_states):
        return model.apply({"params": params}, x, timestep, encoder_hidden_states)

    return unet_apply
