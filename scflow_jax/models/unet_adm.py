"""The ADM UNet of guided-diffusion ("UNetModel"), as the LFM latent flow-matching teachers use it,
in Flax Linen.

Written from the architecture description (openai/guided-diffusion ``unet.py``; VinAIResearch/LFM
``models/guided_diffusion/unet.py`` is a copy with the call order ``model(t, x, y)``), NHWC:

* ``input_blocks``: a 3x3 conv, then per level ``num_res_blocks`` x (ResBlock [+ attention]) and,
  except at the last level, a 2x downsampling (strided conv, average pool, or a ResBlock with
  ``down``);
* ``middle_block``: ResBlock, attention, ResBlock (attention always, whatever
  ``attention_resolutions`` says);
* ``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` x (concat skip,
  ResBlock [+ attention]), the last of each level but the top followed by a 2x upsampling;
* ``out``: GroupNorm, SiLU, zero-initialised 3x3 conv.

``attention_resolutions`` are *downsample factors* (1 = input resolution, 2 = half, ...), as
UNetModel takes them. guided-diffusion's ``script_util`` converts image resolutions into factors
first; LFM does not: its ``--attn_resolution 16 8`` reaches UNetModel unchanged, so on 32x32 latents
with four levels (factors 1, 2, 4, 8) only factor 8 (the 4x4 level) has attention, plus the middle
block.

Time is the raw value given (LFM: t in [0, 1], no 1000x scale) fed to the sinusoidal embedding;
which time a teacher expects is stated by its wrapper in ``flows.py``. GroupNorm (32 groups,
eps 1e-5) runs in float32 whatever the compute ``dtype``; attention softmax too. Parameters are
float32.

Module names mirror the PyTorch attribute names with ``.`` written as ``_``
(``input_blocks_1_0/in_layers_2``), so the converter is one rule: every ``_<n>`` becomes ``.<n>``
(see ``torch_key``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import weights
from scflow_jax.models.timestep import sinusoidal_embedding
from scflow_jax.models.upsample_conv import UpsampleConv, upsample_nearest
from scflow_jax.models.weights import WeightsError

__all__ = ["ADMConfig", "ADMUNet", "torch_key", "adm_params_from_state_dict", "load_unet_adm"]

# PyTorch's default Linear/Conv weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so a model trained
# from scratch starts like the reference (biases start at zero here; they are tiny there).
_torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_zeros = (
    nn.initializers.zeros
)  # guided-diffusion's zero_module: residual branches start as the identity


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    """Options of guided-diffusion's UNetModel (``dims=2``, no fp16 flag: use the module's
    ``dtype``)."""

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Tuple[int, ...]  # downsample factors, see the module docstring
    channel_mult: Tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    conv_resample: bool = True
    num_classes: Optional[int] = None
    num_heads: int = 1
    num_head_channels: Optional[int] = (
        None  # if set, heads = channels // num_head_channels (num_heads ignored)
    )
    num_heads_upsample: Optional[int] = None  # heads in output_blocks; None = num_heads
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False  # False: QKVAttentionLegacy (split heads, then q/k/v)
    num_groups: int = 32  # GroupNorm32 in the reference; smaller only for tiny test models

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"ADMConfig.channel_mult must be non-empty positive ints, got {self.channel_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ADMConfig.dropout must be in [0, 1), got {self.dropout}")
        for ch in {self.model_channels * m for m in self.channel_mult}:
            if ch % self.num_groups:
                raise ValueError(
                    f"ADMConfig: {ch} channels are not divisible into {self.num_groups} norm groups"
                )
            self.heads(ch, upsample=False)
            self.heads(ch, upsample=True)

    def heads(self, channels: int, *, upsample: bool) -> int:
        """Attention heads of a block with ``channels`` channels (output_blocks use
        ``num_heads_upsample``)."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"ADMConfig: {channels} channels not divisible by num_head_channels "
                    f"{self.num_head_channels}"
                )
            return channels // self.num_head_channels
        n = (
            self.num_heads_upsample
            if upsample and self.num_heads_upsample is not None
            else self.num_heads
        )
        if n < 1 or channels % n:
            raise ValueError(
                f"ADMConfig: {channels} channels not divisible into {n} attention heads"
            )
        return n

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def lfm_celeba256(cls) -> "ADMConfig":
        """LFM ``celeb256_f8_adm`` (SCFlow's CelebA-HQ 256 teacher) on 4x32x32 SD-VAE latents.

        From LFM ``bash_scripts/run.sh`` / ``test_args/celeb256_adm.txt`` and the argparse defaults
        of ``train_flow_latent.py``: nf 256, ch_mult 1 2 2 2, 2 res blocks, attention factors 16 8
        (only 8 exists: the 4x4 level), 4 heads, no num_head_channels, scale-shift norm, no resblock
        up/down, legacy attention order, conv resampling, dropout 0, unconditional.
        """
        return cls(
            in_channels=4,
            model_channels=256,
            out_channels=4,
            num_res_blocks=2,
            attention_resolutions=(16, 8),
            channel_mult=(1, 2, 2, 2),
            num_heads=4,
            use_scale_shift_norm=True,
        )

    @classmethod
    def speed_benchmark(cls) -> "ADMConfig":
        """The fixed benchmark network of issue 8: 4x16x16 latents, 64 channels, mult (1, 2, 2),
        1 res block per level, attention at the 8x8 level (factor 2) and in the middle, 4 heads,
        scale-shift norm, dropout 0, reference defaults elsewhere (conv resampling, no resblock
        up/down, legacy order): 4,751,364 parameters (resblock_updown=True would give 5,463,108)."""
        return cls(
            in_channels=4,
            model_channels=64,
            out_channels=4,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 2, 2),
            num_heads=4,
            use_scale_shift_norm=True,
        )


def _group_norm(x, num_groups, dtype, name):
    """guided-diffusion's GroupNorm32 (eps 1e-5) computed in float32, returned in the compute dtype.
    Called inside a compact method, so its scale/bias sit directly under ``name`` (torch
    ``<name>.weight``/``.bias``)."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name=name
    )(x.astype(jnp.float32)).astype(dtype)


def _conv(features, kernel, dtype, name, *, strides=1, zero=False):
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        kernel_init=_zeros if zero else _torch_default_kernel,
        name=name,
    )


def _upsample_conv(features, dtype, name):
    """2x nearest upsampling + ``_conv(features, 3, ...)``, same parameters, computed without the
    upsampled map."""
    return UpsampleConv(features, dtype=dtype, kernel_init=_torch_default_kernel, name=name)


def _avg_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """Norm-SiLU-conv, time embedding (added, or as scale/shift of the second norm),
    norm-SiLU-dropout-zero conv, plus a skip (identity or 1x1 conv); optionally resampling 2x
    between the first norm and conv."""

    out_channels: int
    num_groups: int
    use_scale_shift_norm: bool
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, deterministic: bool = True):
        def norm(v, name):
            return _group_norm(v, self.num_groups, self.dtype, name)

        h = nn.silu(norm(x, "in_layers_0"))
        if self.up:
            x = upsample_nearest(x)
            h = _upsample_conv(self.out_channels, self.dtype, "in_layers_2")(h)
        else:
            if self.down:
                h, x = _avg_pool(h), _avg_pool(x)
            h = _conv(self.out_channels, 3, self.dtype, "in_layers_2")(h)
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(
            width, dtype=self.dtype, kernel_init=_torch_default_kernel, name="emb_layers_1"
        )(nn.silu(emb))
        per_pixel = lambda v: v[:, None, None, :]  # noqa: E731 - [B, C] over the pixels
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm(h, "out_layers_0") * per_pixel(1 + scale) + per_pixel(shift)
        else:
            h = norm(h + per_pixel(emb_out), "out_layers_0")
        h = nn.silu(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, self.dtype, "out_layers_3", zero=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "skip_connection")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all pixels; qkv and proj_out are kernel-1 Conv1d's, as in the reference.

    The 3C qkv channels are read per head as [q, k, v] (legacy order, ``QKVAttentionLegacy``) or as
    q, k, v blocks each split into heads (``QKVAttention``); the layout matters only for converted
    weights.
    """

    num_heads: int
    num_groups: int
    new_order: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        tokens = x.reshape(b, height * width, c)
        normed = _group_norm(tokens, self.num_groups, self.dtype, "norm")
        qkv = nn.Conv(3 * c, (1,), dtype=self.dtype, kernel_init=_torch_default_kernel, name="qkv")(
            normed
        )
        head_ch = c // self.num_heads
        if self.new_order:
            q, k, v = jnp.moveaxis(qkv.reshape(b, height * width, 3, self.num_heads, head_ch), 2, 0)
        else:
            q, k, v = jnp.moveaxis(qkv.reshape(b, height * width, self.num_heads, 3, head_ch), 3, 0)
        logits = jnp.einsum("bthc,bshc->bhts", q, k).astype(jnp.float32) / np.sqrt(head_ch)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        a = jnp.einsum("bhts,bshc->bthc", probs, v).reshape(b, height * width, c)
        h = nn.Conv(c, (1,), dtype=self.dtype, kernel_init=_zeros, name="proj_out")(a)
        return (tokens + h).reshape(b, height, width, c)


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv (``op``) or 2x2 average pooling."""

    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return _conv(x.shape[-1], 3, self.dtype, "op", strides=2)(x)
        return _avg_pool(x)


class Upsample(nn.Module):
    """2x nearest upsampling, then an optional 3x3 conv (``conv``)."""

    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return (
            _upsample_conv(x.shape[-1], self.dtype, "conv")(x)
            if self.use_conv
            else upsample_nearest(x)
        )


class ADMUNet(nn.Module):
    """x [B, H, W, in_channels] (NHWC), t [B] or scalar (raw time), y [B] int labels if
    ``num_classes`` -> [B, H, W, out_channels] float32."""

    config: ADMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, *, deterministic: bool = True):
        cfg = self.config
        if (
            x.ndim != 4
            or x.shape[-1] != cfg.in_channels
            or x.shape[1] % cfg.downsample_factor
            or x.shape[2] % cfg.downsample_factor
        ):
            raise ValueError(
                f"ADMUNet expects [B, H, W, {cfg.in_channels}] with H, W multiples of "
                f"{cfg.downsample_factor}, got {x.shape}"
            )
        if (y is None) != (cfg.num_classes is None):
            raise ValueError("ADMUNet: pass labels y if and only if config.num_classes is set")
        dt = self.dtype
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))

        emb_dim = 4 * cfg.model_channels

        def dense(n, name):
            return nn.Dense(n, dtype=dt, kernel_init=_torch_default_kernel, name=name)

        emb = sinusoidal_embedding(t, cfg.model_channels).astype(dt)
        emb = dense(emb_dim, "time_embed_2")(nn.silu(dense(emb_dim, "time_embed_0")(emb)))
        if cfg.num_classes is not None:
            emb = emb + nn.Embed(
                cfg.num_classes,
                emb_dim,
                dtype=dt,
                embedding_init=nn.initializers.normal(1.0),
                name="label_emb",
            )(y)

        def res(out_ch, name, **kw):
            return ResBlock(
                out_ch,
                cfg.num_groups,
                cfg.use_scale_shift_norm,
                cfg.dropout,
                dtype=dt,
                name=name,
                **kw,
            )

        def attn(ch, name, upsample=False):
            return AttentionBlock(
                cfg.heads(ch, upsample=upsample),
                cfg.num_groups,
                cfg.use_new_attention_order,
                dtype=dt,
                name=name,
            )

        h = _conv(cfg.model_channels * cfg.channel_mult[0], 3, dt, "input_blocks_0_0")(x.astype(dt))
        skips = [h]
        block, factor = 1, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                h = res(cfg.model_channels * mult, f"input_blocks_{block}_0")(h, emb, deterministic)
                if factor in cfg.attention_resolutions:
                    h = attn(h.shape[-1], f"input_blocks_{block}_1")(h)
                skips.append(h)
                block += 1
            if level != len(cfg.channel_mult) - 1:
                name = f"input_blocks_{block}_0"
                if cfg.resblock_updown:
                    h = res(h.shape[-1], name, down=True)(h, emb, deterministic)
                else:
                    h = Downsample(cfg.conv_resample, dtype=dt, name=name)(h)
                skips.append(h)
                block += 1
                factor *= 2

        h = res(h.shape[-1], "middle_block_0")(h, emb, deterministic)
        h = attn(h.shape[-1], "middle_block_1")(h)
        h = res(h.shape[-1], "middle_block_2")(h, emb, deterministic)

        block = 0
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(cfg.model_channels * mult, f"output_blocks_{block}_0")(
                    h, emb, deterministic
                )
                j = 1
                if factor in cfg.attention_resolutions:
                    h = attn(h.shape[-1], f"output_blocks_{block}_1", upsample=True)(h)
                    j = 2
                if level and i == cfg.num_res_blocks:
                    name = f"output_blocks_{block}_{j}"
                    if cfg.resblock_updown:
                        h = res(h.shape[-1], name, up=True)(h, emb, deterministic)
                    else:
                        h = Upsample(cfg.conv_resample, dtype=dt, name=name)(h)
                    factor //= 2
                block += 1

        h = nn.silu(_group_norm(h, cfg.num_groups, dt, "out_0"))
        return _conv(cfg.out_channels, 3, dt, "out_2", zero=True)(h).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Converter

_INDEX = re.compile(r"_(\d+)(?=_|$)")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Training checkpoints pickle the run's argparse Namespace next to the weights (LFM
# ``content.pth``).
_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def torch_key(path: Tuple[str, ...]) -> str:
    """The guided-diffusion state-dict key of a Flax leaf:
    ``("input_blocks_1_0", "in_layers_2", "kernel")`` -> ``input_blocks.1.0.in_layers.2.weight``."""
    return ".".join([_INDEX.sub(r".\1", p) for p in path[:-1]] + [_LEAF[path[-1]]])


def _example_inputs(config: ADMConfig):
    s = config.downsample_factor
    x = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    y = None if config.num_classes is None else jnp.zeros((1,), jnp.int32)
    return x, jnp.zeros((1,), jnp.float32), y


def adm_params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: ADMConfig,
    *,
    what: str,
    allow_partial: bool = False,
    seed: int = 0,
):
    """Flax parameters of ``ADMUNet(config)`` from a guided-diffusion/LFM state dict (``module.``
    prefixes of DataParallel/DDP are stripped). Every key must be used and every shape match, else
    ``WeightsError`` naming them; with ``allow_partial`` the missing leaves come from a fresh
    ``init(seed)``."""
    source = {}
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in source:
            raise WeightsError(
                f"{what}: key {name!r} appears both with and without the 'module.' prefix"
            )
        source[name] = value
    model = ADMUNet(config)
    inputs = _example_inputs(config)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(seed), *inputs))["params"]
    # Jitted: run op by op, init would compile an RNG kernel for every parameter shape.
    fallback = (
        jax.jit(model.init)(jax.random.key(seed), *inputs)["params"] if allow_partial else None
    )
    return weights.assemble_params(
        expected, source, torch_key, what=what, allow_partial=allow_partial, fallback=fallback
    )


def load_unet_adm(
    path: str, config: ADMConfig, *, subkey: Optional[str] = None, allow_partial: bool = False
):
    """Reads ADM UNet weights for ``ADMUNet(config)`` from ``path`` and returns the Flax ``params``
    tree.

    ``path``: a ``.pth``/``.pt`` state dict (LFM releases ``model_<epoch>.pth``:
    ``model.state_dict()`` of the DDP-wrapped model, keys prefixed ``module.``; its resumable
    ``content.pth`` nests them under ``subkey="model_dict"``), or a ``.safetensors`` file (no
    ``subkey``).
    """
    what = f"ADM UNet from {path}"
    if path.endswith(".safetensors"):
        if subkey is not None:
            raise WeightsError(
                f"{what}: subkey={subkey!r} applies to nested .pth checkpoints, not safetensors"
            )
        state_dict = weights.read_safetensors(path)
    else:
        state_dict = weights.read_torch_state_dict(
            path, subkey=subkey, safe_globals=_CHECKPOINT_GLOBALS
        )
    return adm_params_from_state_dict(state_dict, config, what=what, allow_partial=allow_partial)
