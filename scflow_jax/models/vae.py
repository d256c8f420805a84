"""The Stable Diffusion autoencoder (diffusers ``AutoencoderKL``) in Flax Linen, with its weight
converter.

Images are NHWC in ``[-1, 1]``; latents are NHWC with ``latent_channels`` channels at 1/2^(levels-1)
of the image size (1/8 for SD). The parameter tree mirrors diffusers' module tree, with
``ModuleList`` entries named ``name_i``, so the converter is the mechanical renaming
``weights.hf_style_key``::

    encoder/down_blocks_1/resnets_0/conv_shortcut/kernel
        <- encoder.down_blocks.1.resnets.0.conv_shortcut.weight
    encoder/mid_block/attentions_0/to_out_0/kernel
        <- encoder.mid_block.attentions.0.to_out.0.weight
    decoder/up_blocks_0/upsamplers_0/conv/kernel
        <- decoder.up_blocks.0.upsamplers.0.conv.weight

The latent scaling (``(z - shift_factor) * scaling_factor``, diffusers' convention) happens in
exactly one place: ``VAE.images_to_latents`` and its inverse ``VAE.latents_to_images``.
``encode``/``decode`` work on unscaled latents, like diffusers' ``vae.encode``/``vae.decode``.

Computation runs in ``dtype`` (bf16 for speed); parameters are float32; GroupNorm and the attention
softmax run in float32. ``remat=True`` recomputes each ResNet block and the attention in the
backward pass (the VAE is frozen in SCFlow, so this only matters if a user trains through the
decoder).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import weights
from scflow_jax.models.upsample_conv import UpsampleConv

__all__ = [
    "VAEConfig",
    "DiagonalGaussian",
    "AutoencoderKL",
    "VAE",
    "load_vae",
    "vae_state_dict_key",
    "rename_legacy_attention_keys",
]

Dtype = Any

_ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json``. Defaults are SD 1.5's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    sample_size: int = 512
    down_block_types: Tuple[str, ...] = (_DOWN_BLOCK,) * 4
    up_block_types: Tuple[str, ...] = (_UP_BLOCK,) * 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}; supported: {sorted(_ACTIVATIONS)}")
        for field, kinds, expected in (
            ("down_block_types", self.down_block_types, _DOWN_BLOCK),
            ("up_block_types", self.up_block_types, _UP_BLOCK),
        ):
            if len(kinds) != n or any(k != expected for k in kinds):
                raise ValueError(
                    f"VAEConfig.{field}={list(kinds)}: only {n} x {expected!r} (one per entry of "
                    f"block_out_channels={list(self.block_out_channels)}) is supported"
                )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: channels {bad} are not divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VAEConfig":
        """From a diffusers ``config.json`` dict; unknown keys (``_class_name``,
        ``force_upcast``...) are ignored, missing ones keep the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            kwargs["sample_size"] = int(kwargs["sample_size"][0])
        return cls(**kwargs)


class DiagonalGaussian(NamedTuple):
    """The posterior q(z | x) of diffusers' ``DiagonalGaussianDistribution`` (logvar already
    clipped)."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


# --------------------------------------------------------------------------------------------------
# Modules


def _conv(
    features: int,
    dtype: Dtype,
    name: Optional[str],
    kernel: int = 3,
    stride: int = 1,
    padding: Any = 1,
) -> nn.Conv:
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _group_norm(x: jax.Array, groups: int, name: str, dtype: Dtype) -> jax.Array:
    # Float32 with the two-pass variance torch uses: the fast E[x^2]-E[x]^2 form cancels when
    # |mean| >> std.
    norm = nn.GroupNorm(
        num_groups=groups, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=name
    )
    return norm(x.astype(jnp.float32)).astype(dtype)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding: norm1-act-conv1-norm2-act-conv2 plus a
    1x1 ``conv_shortcut`` when the channel count changes."""

    out_channels: int
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.config.act_fn]
        groups = self.config.norm_num_groups
        h = act(_group_norm(x, groups, "norm1", self.dtype))
        h = _conv(self.out_channels, self.dtype, "conv1")(h)
        h = act(_group_norm(h, groups, "norm2", self.dtype))
        h = _conv(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "conv_shortcut", kernel=1, padding=0)(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """diffusers ``Attention`` as the VAE mid block uses it: GroupNorm, one head of width C over the
    H*W positions, ``to_out.0`` projection, residual."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = _group_norm(x, self.config.norm_num_groups, "group_norm", self.dtype).reshape(
            b, h * w, c
        )
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=jnp.float32)
        q, k, v = dense(name="to_q")(y), dense(name="to_k")(y), dense(name="to_v")(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c**-0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = dense(name="to_out_0")(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the bottom/right only (diffusers' ``padding=0``
    variant)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], self.dtype, "conv", stride=2, padding=0)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (``UpsampleConv``)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return UpsampleConv(x.shape[-1], self.dtype, name="conv")(x)


def _blocks(remat: bool):
    if remat:
        return nn.remat(ResnetBlock), nn.remat(SpatialSelfAttention)
    return ResnetBlock, SpatialSelfAttention


class MidBlock(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet, attention = _blocks(self.remat)
        c = x.shape[-1]
        x = resnet(c, self.config, self.dtype, name="resnets_0")(x)
        if self.config.mid_block_add_attention:
            x = attention(self.config, self.dtype, name="attentions_0")(x)
        return resnet(c, self.config, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """``layers_per_block`` ResNet blocks, then (except on the last level) a ``Downsample``."""

    out_channels: int
    add_downsample: bool
    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet, _ = _blocks(self.remat)
        for j in range(self.config.layers_per_block):
            x = resnet(self.out_channels, self.config, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """``layers_per_block + 1`` ResNet blocks, then (except on the last level) an ``Upsample``."""

    out_channels: int
    add_upsample: bool
    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        resnet, _ = _blocks(self.remat)
        for j in range(self.config.layers_per_block + 1):
            x = resnet(self.out_channels, self.config, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before
    ``quant_conv``)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        levels = len(cfg.block_out_channels)
        x = _conv(cfg.block_out_channels[0], self.dtype, "conv_in")(x.astype(self.dtype))
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock(
                channels, i < levels - 1, cfg, self.dtype, self.remat, name=f"down_blocks_{i}"
            )(x)
        x = MidBlock(cfg, self.dtype, self.remat, name="mid_block")(x)
        x = nn.silu(
            _group_norm(x, cfg.norm_num_groups, "conv_norm_out", self.dtype)
        )  # always SiLU in diffusers
        return _conv(2 * cfg.latent_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] (after ``post_quant_conv``) ->
    image [B, h*f, w*f, out_channels]."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = _conv(channels[0], self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(cfg, self.dtype, self.remat, name="mid_block")(x)
        for i, c in enumerate(channels):
            x = UpDecoderBlock(
                c, i < len(channels) - 1, cfg, self.dtype, self.remat, name=f"up_blocks_{i}"
            )(x)
        x = nn.silu(_group_norm(x, cfg.norm_num_groups, "conv_norm_out", self.dtype))
        return _conv(cfg.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``: ``encode`` -> ``DiagonalGaussian`` (unscaled latents),
    ``decode`` -> image."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.remat)
        self.decoder = Decoder(cfg, self.dtype, self.remat)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, self.dtype, None, kernel=1, padding=0)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, self.dtype, None, kernel=1, padding=0)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))  # the clip diffusers applies

    def decode(self, latents: jax.Array) -> jax.Array:
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (used to initialise every parameter)."""
        return self.decode(self.encode(images).mean)


# --------------------------------------------------------------------------------------------------
# The user-facing handle: config + jitted functions of (params, arrays)


def _check_nhwc(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{what} must be NHWC [batch, height, width, {channels}], got shape {tuple(x.shape)}"
        )


@dataclasses.dataclass(frozen=True)
class VAE:
    """A configured autoencoder. Every method takes the parameter tree (``{"params": ...}`` or bare)
    explicitly and is jitted once per (config, dtype, input shape).

    Images are NHWC float in ``[-1, 1]``. Latents passed to/returned by ``images_to_latents`` /
    ``latents_to_images`` are *scaled* (what the diffusion model sees); ``encode``/``decode`` use
    unscaled ones.
    """

    config: VAEConfig = VAEConfig()
    dtype: Dtype = jnp.float32
    remat: bool = False

    @property
    def module(self) -> AutoencoderKL:
        return AutoencoderKL(self.config, self.dtype, self.remat)

    def init(self, rng: jax.Array, image_size: int = 0) -> Dict[str, Any]:
        """Random parameters (diffusers' layout; PyTorch's init scheme is not reproduced)."""
        size = image_size or 8 * self.config.downsample_factor
        images = jnp.zeros((1, size, size, self.config.in_channels), jnp.float32)
        return self.module.init(rng, images)["params"]

    def param_shapes(self) -> Dict[str, Any]:
        size = (
            2 * self.config.downsample_factor
        )  # the parameter shapes do not depend on the image size
        images = jax.ShapeDtypeStruct((1, size, size, self.config.in_channels), jnp.float32)
        return jax.eval_shape(self.module.init, jax.random.PRNGKey(0), images)["params"]

    @functools.partial(jax.jit, static_argnums=0)
    def encode(self, params, images: jax.Array) -> DiagonalGaussian:
        """Images [B, H, W, C] in [-1, 1] -> posterior ``(mean, logvar)`` of the unscaled latents
        (float32)."""
        _check_nhwc(images, self.config.in_channels, "images")
        return self.module.apply(_variables(params), images, method=AutoencoderKL.encode)

    @functools.partial(jax.jit, static_argnums=0)
    def decode(self, params, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C], float32, not
        clipped."""
        _check_nhwc(latents, self.config.latent_channels, "latents")
        return self.module.apply(_variables(params), latents, method=AutoencoderKL.decode)

    def scale_latents(self, latents: jax.Array) -> jax.Array:
        shift = self.config.shift_factor or 0.0
        return (latents - shift) * self.config.scaling_factor

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        shift = self.config.shift_factor or 0.0
        return latents / self.config.scaling_factor + shift

    @functools.partial(jax.jit, static_argnums=0)
    def images_to_latents(
        self, params, images: jax.Array, rng: Optional[jax.Array] = None
    ) -> jax.Array:
        """Images in [-1, 1] -> scaled latents: a posterior sample if ``rng`` is given (SCFlow's
        CelebA-HQ recipe), else the posterior mean."""
        posterior = self.encode(params, images)
        z = posterior.mean if rng is None else posterior.sample(rng)
        return self.scale_latents(z)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def latents_to_images(self, params, latents: jax.Array, clip: bool = True) -> jax.Array:
        """Scaled latents -> images in [-1, 1] (clipped to that range unless ``clip=False``)."""
        images = self.decode(params, self.unscale_latents(latents))
        return jnp.clip(images, -1.0, 1.0) if clip else images


def _variables(params) -> Dict[str, Any]:
    return params if "params" in params else {"params": params}


# --------------------------------------------------------------------------------------------------
# Converter

_LIST_MODULES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "to_out",
)
_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$"
)
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def vae_state_dict_key(path: Tuple[str, ...]) -> str:
    """The diffusers state-dict key of a Flax parameter path."""
    return weights.hf_style_key(path, _LIST_MODULES)


def rename_legacy_attention_keys(state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Old diffusers VAE checkpoints name the attention projections ``query/key/value/proj_attn``;
    diffusers renames them to ``to_q/to_k/to_v/to_out.0`` on load
    (``ModelMixin._fix_state_dict_keys_on_load``). Same here; the arrays are not copied."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_ATTENTION.match(key)
        out[f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}" if m else key] = value
    return out


def _read_weights(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return weights.read_safetensors(path)
    return weights.read_torch_state_dict(path)


def load_vae(
    path: str, *, allow_partial: bool = False, dtype: Dtype = jnp.float32, remat: bool = False
) -> Tuple[VAE, Dict[str, Any]]:
    """Loads a diffusers ``AutoencoderKL`` from a local folder: a pipeline folder (uses ``vae/``) or
    a VAE folder holding ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors`` (or
    ``.bin``).

    Returns ``(vae, params)``: the configured ``VAE`` handle and the bare float32 parameter tree
    (NumPy arrays). Any missing, unexpected or mis-shaped tensor raises ``WeightsError`` naming it,
    unless ``allow_partial`` (then missing leaves keep a seeded random init).
    """
    folder = (
        os.path.join(path, "vae")
        if os.path.isfile(os.path.join(path, "vae", "config.json"))
        else path
    )
    config = VAEConfig.from_dict(
        weights.read_json(os.path.join(folder, "config.json"), what="VAE config")
    )
    file = weights.find_file(folder, _WEIGHT_FILES, what="VAE weights")
    source = rename_legacy_attention_keys(_read_weights(file))
    vae = VAE(config, dtype=dtype, remat=remat)
    params = weights.assemble_params(
        vae.param_shapes(),
        source,
        vae_state_dict_key,
        what=f"VAE from {file}",
        allow_partial=allow_partial,
        fallback=vae.init(jax.random.PRNGKey(0)) if allow_partial else None,
    )
    return vae, params
