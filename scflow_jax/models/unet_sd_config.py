"""``UNetSDConfig``: the hyperparameters of Stable Diffusion's UNet
(``unet_sd.UNet2DConditionModel``), named and valued as in diffusers' ``unet/config.json``, with the
checks that refuse a config this port would build into a different network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

# The activations a config's ``act_fn`` may name (``UNetSDConfig`` checks against this table).
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": nn.relu,
}

IntOrTuple = Union[int, Tuple[int, ...]]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# config.json keys of UNet2DConditionModel that select features this port does not implement, with
# the values that mean "feature off". A config that sets any of them to something else is refused by
# name rather than converted into a different network.
_FEATURES_OFF: Dict[str, Any] = {
    # diffusers itself refuses num_attention_heads (attention_head_dim carries the head count).
    "num_attention_heads": None,
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
    """Hyperparameters of ``UNet2DConditionModel``, named as in diffusers' ``config.json``; defaults
    are SD 1.5's.

    Per-block fields (``layers_per_block``, ``attention_head_dim``, ``cross_attention_dim``,
    ``transformer_layers_per_block``) take an int for every block or one value per down block; the
    up path uses them reversed, the mid block uses the last.
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
        # Lists from JSON become tuples so the config stays hashable (it is a static module
        # attribute).
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
        """From a diffusers ``config.json`` dict: unknown keys (``_class_name``,
        ``_diffusers_version``, ``sample_size``...) are ignored, keys of features this port lacks
        must have their "off" value, otherwise a ``ValueError`` names the key."""
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
        """A diffusers ``config.json`` dict (``UNet2DConditionModel.from_config`` builds the same
        network)."""
        out: Dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
