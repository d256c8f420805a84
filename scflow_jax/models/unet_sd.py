"""Stable Diffusion's UNet (diffusers ``UNet2DConditionModel``) in Flax Linen (its converter and exporter:
``unet_sd_weights.py``).

The default configuration is SD 1.5's (~860M parameters); tiny configurations build for tests. ``UNetSDConfig``'s
fields are the keys of diffusers' ``unet/config.json`` and mean what they mean there, including the historical
misnomer that ``attention_head_dim`` is the *number of heads* per block (diffusers derives the head width as
``channels // attention_head_dim``; SD 1.5 has 8 heads of width 40, 80, 160, 160).

Layout: activations are NHWC (``sample`` is ``[B, H, W, C]``), text states ``[B, L, cross_attention_dim]``,
timesteps a scalar or ``[B]`` in diffusers' scale (0..1000). Parameters are float32; ``dtype`` sets the compute
dtype (GroupNorm/LayerNorm statistics and the attention softmax stay in float32); outputs are float32.

The parameter tree mirrors diffusers' module names, so a checkpoint key is the Flax path joined by ``.`` with
``ModuleList`` indices split off (``weights.hf_style_key``)::

    conv_in/kernel                                        <- conv_in.weight (OIHW -> HWIO)
    time_embedding/linear_{1,2}/{kernel,bias}             <- time_embedding.linear_{1,2}.{weight.T,bias}
    down_blocks_0/resnets_1/{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}/...
    down_blocks_0/attentions_0/{norm,proj_in,proj_out}/...
    down_blocks_0/attentions_0/transformer_blocks_0/{norm1,norm2,norm3}/{scale,bias}
    down_blocks_0/attentions_0/transformer_blocks_0/attn1/{to_q,to_k,to_v,to_out_0}/...
    down_blocks_0/attentions_0/transformer_blocks_0/ff/{net_0/proj,net_2}/...
    down_blocks_0/downsamplers_0/conv/...
    mid_block/{resnets_0,attentions_0,resnets_1}/...
    up_blocks_1/{resnets_2,attentions_2,upsamplers_0/conv}/...
    conv_norm_out/{scale,bias}, conv_out/{kernel,bias}

(``proj_in``/``proj_out`` are 1x1 convs, or Linears when ``use_linear_projection``; both map by the same name.)
diffusers has no legacy attention names for this model: its ``query/key/value/proj_attn`` renaming only
concerns the plain ``Attn*Block2D``/``UNetMidBlock2D`` blocks, which SD UNets do not use.

The encoder half (``conv_in``, ``time_proj``/``time_embedding``, ``down_blocks_*``, ``mid_block``) is
``UNet2DConditionModel.encode``; see its docstring and ``encoder_params`` for how the text-to-image
discriminator reuses the teacher's weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import attention
from scflow_jax.models.timestep import sinusoidal_embedding

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
IntOrTuple = Union[int, Tuple[int, ...]]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": nn.relu,
}

# config.json keys of UNet2DConditionModel that select features this port does not implement, with the values that
# mean "feature off". A config that sets any of them to something else is refused by name rather than converted
# into a different network.
_FEATURES_OFF: Dict[str, Any] = {
    "num_attention_heads": None,  # diffusers itself refuses it (attention_head_dim carries the head count)
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}


def _feature_is_off(name: str, value: Any) -> bool:
    off = _FEATURES_OFF[name]
    if value == off or (name == "mid_block_only_cross_attention" and value is False):
        return True
    # A per-block list of "off" values (only_cross_attention: [false, false, ...]) is off too.
    return isinstance(value, (list, tuple)) and all(v == off for v in value)


@dataclasses.dataclass(frozen=True)
class UNetSDConfig:
    """Hyperparameters of ``UNet2DConditionModel``, named as in diffusers' ``config.json``; defaults are SD 1.5's.

    Per-block fields (``layers_per_block``, ``attention_head_dim``, ``cross_attention_dim``,
    ``transformer_layers_per_block``) take an int for every block or one value per down block; the up path uses
    them reversed, the mid block uses the last.
    """

    sample_size: Optional[int] = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: Tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 768
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = (
        8  # diffusers' name; the NUMBER of heads (see the module docstring)
    )
    use_linear_projection: bool = False
    upcast_attention: bool = False  # accepted; the softmax always runs in float32 here
    time_embedding_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        # Lists from JSON become tuples so the config stays hashable (it is a static module attribute).
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("UNetSDConfig.block_out_channels must not be empty")
        # diffusers accepts a "UNetRes" prefix on block type names and strips it.
        strip = lambda t: t[len("UNetRes") :] if t.startswith("UNetRes") else t  # noqa: E731
        object.__setattr__(self, "down_block_types", tuple(strip(t) for t in self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(strip(t) for t in self.up_block_types))
        for name, allowed in (
            ("down_block_types", DOWN_BLOCK_TYPES),
            ("up_block_types", UP_BLOCK_TYPES),
        ):
            types = getattr(self, name)
            if len(types) != n:
                raise ValueError(
                    f"UNetSDConfig.{name} has {len(types)} entries but block_out_channels has {n}"
                )
            for t in types:
                if t not in allowed:
                    raise ValueError(
                        f"UNetSDConfig.{name}: unsupported block type {t!r} (supported: {allowed})"
                    )
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(
                f"UNetSDConfig.mid_block_type: unsupported block type {self.mid_block_type!r} "
                f"(supported: {MID_BLOCK_TYPES})"
            )
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(
                f"UNetSDConfig.act_fn: unsupported activation {self.act_fn!r} "
                f"(supported: {sorted(ACTIVATIONS)})"
            )
        for name in (
            "layers_per_block",
            "attention_head_dim",
            "cross_attention_dim",
            "transformer_layers_per_block",
        ):
            v = getattr(self, name)
            if isinstance(v, tuple):
                if len(v) != n or not all(isinstance(x, int) for x in v):
                    raise ValueError(
                        f"UNetSDConfig.{name} must be an int or {n} ints (one per down block), "
                        f"got {v!r}"
                    )
            elif not isinstance(v, int):
                raise ValueError(
                    f"UNetSDConfig.{name} must be an int or a tuple of ints, got {v!r}"
                )
        if self.norm_num_groups is None or any(
            c % self.norm_num_groups for c in self.block_out_channels
        ):
            raise ValueError(
                f"UNetSDConfig.norm_num_groups ({self.norm_num_groups}) must divide every entry of "
                f"block_out_channels {self.block_out_channels}"
            )
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            raise ValueError(
                "UNetSDConfig.cross_attention_dim: per-block values must be equal (one set of text "
                f"states feeds every block), got {self.cross_attention_dim}"
            )
        heads = self.per_block("attention_head_dim")
        for c, h in zip(self.block_out_channels, heads):
            if c % h:
                raise ValueError(
                    f"UNetSDConfig.attention_head_dim: {h} heads do not divide {c} channels"
                )
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 != 1:
                raise ValueError(f"UNetSDConfig.{name} must be odd, got {getattr(self, name)}")

    def per_block(self, name: str) -> Tuple[int, ...]:
        """A per-block field as one value per down block."""
        v = getattr(self, name)
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetSDConfig":
        """From a diffusers ``config.json`` dict: unknown keys (``_class_name``, ``_diffusers_version``,
        ``sample_size``...) are ignored, keys of features this port lacks must have their "off" value, otherwise
        a ``ValueError`` names the key."""
        for name in _FEATURES_OFF:
            if name in d and not _feature_is_off(name, d[name]):
                raise ValueError(
                    f"UNet config field {name!r} = {d[name]!r} is not supported by this port "
                    f"(only {_FEATURES_OFF[name]!r})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("mid_block_type", "") is None:
            raise ValueError(
                "UNet config field 'mid_block_type' = None is not supported by this port "
                f"(only {MID_BLOCK_TYPES})"
            )
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """A diffusers ``config.json`` dict (``UNet2DConditionModel.from_config`` builds the same network)."""
        out: Dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks (names of submodules = diffusers attribute names)


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
    """Multi-head attention with diffusers' names (``to_q``, ``to_k``, ``to_v`` without bias, ``to_out.0``)."""

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
        o = attention.dot_product_attention(
            q, k, v
        )  # cuDNN's fused kernel on NVIDIA GPUs where it can
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
        """Nearest-neighbour resize to ``size`` (2x unless the skip it meets is odd-sized), then a 3x3
        conv."""
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
    """``CrossAttnDownBlock2D`` (``has_attention``) or ``DownBlock2D``: returns the output and its skips."""

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


# ---------------------------------------------------------------------------------------------------------------------
# The UNet


class UNet2DConditionModel(nn.Module):
    """diffusers' ``UNet2DConditionModel`` (see the module docstring for layouts and names).

    ``remat`` rematerialises every resnet and every attention module (``Transformer2DModel``) in the backward pass,
    as diffusers' gradient checkpointing does; the parameter tree is unchanged.
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
        """The encoder half: conv_in, time embedding, down blocks, mid block -> the mid-block feature
        ``[B, H / 2**(n-1), W / 2**(n-1), block_out_channels[-1]]`` (8x8x1280 for SD 1.5 at 64x64), float32.

        Its parameters are the sub-tree ``encoder_params(full_params)`` (keys ``ENCODER_PARAM_GROUPS``: conv_in,
        time_embedding, down_blocks_*, mid_block), with the same paths as in the full UNet; ``model.init(...,
        method=UNet2DConditionModel.encode)`` creates exactly that sub-tree. A discriminator that holds this
        module as a submodule ``unet`` and calls ``self.unet.encode(...)`` has its copy under ``["unet"]``.
        """
        return self._down(sample, timesteps, encoder_hidden_states)[0].astype(jnp.float32)

    def __call__(self, sample, timesteps, encoder_hidden_states):
        """The noise (or, for rectified-flow teachers, ``z0 - z1``) prediction, NHWC float32."""
        x, skips, temb, context = self._down(sample, timesteps, encoder_hidden_states)
        for block in self.up_blocks:
            used, skips = skips[-block.num_layers :], skips[: -block.num_layers]
            # Upsample to the size of the skip the next block meets (2x unless that level was odd-sized).
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, used, temb, context, size)
        x = ACTIVATIONS[self.config.act_fn](self.conv_norm_out(x))
        return self.conv_out(x).astype(jnp.float32)


ENCODER_PARAM_GROUPS = ("conv_in", "time_embedding", "down_blocks_", "mid_block")


def encoder_params(unet_params: Mapping[str, Any]) -> Dict[str, Any]:
    """The encoder half's sub-tree of full UNet parameters (what ``UNet2DConditionModel.encode`` uses)."""
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
    """``unet_apply(params, x, timestep, encoder_hidden_states) -> u`` (x NHWC, timestep in diffusers' 0..1000):
    the form ``flows.wrap_diffusers_rectified_flow`` turns into a project velocity field
    ``F(t, x, c) = -unet_apply(params, x, 1000 t, c)``."""
    model = UNet2DConditionModel(config, dtype=dtype, remat=remat)

    def unet_apply(params, x, timestep, encoder_hidden_states):
        return model.apply({"params": params}, x, timestep, encoder_hidden_states)

    return unet_apply
