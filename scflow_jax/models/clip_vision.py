"""CLIP vision tower, the two-tower CLIP model (for CLIP score) and CLIP's image preprocessing, in
JAX.

Parameter names mirror Hugging Face ``CLIPModel`` (and ``CLIPVisionModelWithProjection`` /
``CLIPTextModelWithProjection``), so loading is the mechanical renaming of
``weights.hf_style_key`` (indented rows continue the path and the key of the row above them)::

    vision_model/                                 <- vision_model.
        embeddings/patch_embedding/kernel         <- embeddings.patch_embedding.weight (no bias)
        embeddings/class_embedding                <- embeddings.class_embedding
        embeddings/position_embedding/embedding   <- embeddings.position_embedding.weight
        pre_layrnorm/{scale,bias}                 <- pre_layrnorm.{weight,bias}  (HF's spelling)
        encoder/layers_{i}/...                    <- encoder.layers.{i}.... (same layer as text)
        post_layernorm/{scale,bias}               <- post_layernorm.{weight,bias}
    visual_projection/kernel                      <- visual_projection.weight.T
    text_projection/kernel                        <- text_projection.weight.T
    text_model/...                                <- text_model.... (see clip.py)

The encoder layers are ``clip.CLIPEncoder``: one implementation for both towers. Pixel inputs are
NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from scflow_jax.models import weights
from scflow_jax.models.clip import (
    ACTIVATIONS,
    CLIPEncoder,
    CLIPTextConfig,
    CLIPTextTransformer,
    clip_key_function,
    is_clip_buffer,
    read_clip_folder,
)

__all__ = [
    "CLIPVisionConfig",
    "CLIPConfig",
    "CLIPVisionTransformer",
    "CLIPModel",
    "CLIP",
    "load_clip",
    "preprocess_images",
    "CLIP_MEAN",
    "CLIP_STD",
]

Dtype = Any
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyperparameters of the CLIP vision transformer. Defaults are CLIP ViT-L/14 (224 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CLIPVisionConfig":
        """From a ``CLIPVisionConfig`` dict or a full ``CLIPConfig`` dict (its
        ``vision_config``)."""
        if isinstance(d.get("vision_config"), dict) or isinstance(
            d.get("vision_config_dict"), dict
        ):
            d = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model: one or both towers and the shared embedding width. A tower that is ``None`` is
    absent (a ``CLIPTextModelWithProjection`` or ``CLIPVisionModelWithProjection`` checkpoint)."""

    text: Optional[CLIPTextConfig] = CLIPTextConfig()
    vision: Optional[CLIPVisionConfig] = CLIPVisionConfig()
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CLIPConfig":
        """From a transformers ``config.json`` of ``CLIPModel`` (both towers),
        ``CLIPTextModelWithProjection`` or ``CLIPVisionModelWithProjection`` (one tower). A missing
        ``projection_dim`` is transformers' 512."""
        if any(
            isinstance(d.get(k), dict)
            for k in ("text_config", "vision_config", "text_config_dict", "vision_config_dict")
        ):
            text, vision = CLIPTextConfig.from_dict(d), CLIPVisionConfig.from_dict(d)
        elif d.get("model_type") == "clip_vision_model" or any(
            "Vision" in a for a in d.get("architectures", [])
        ):
            text, vision = None, CLIPVisionConfig.from_dict(d)
        else:
            text, vision = CLIPTextConfig.from_dict(d), None
        return cls(text=text, vision=vision, projection_dim=int(d.get("projection_dim") or 512))


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_INIT,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        b, gh, gw, d = patches.shape
        if gh * gw != cfg.num_patches:
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape} give {gh}x{gw} patches; the position "
                f"embedding has {cfg.num_patches} (image_size={cfg.image_size})"
            )
        patches = patches.reshape(b, gh * gw, d)  # row-major over (H, W), as torch's flatten(2)
        cls_token = self.param("class_embedding", _INIT, (d,), jnp.float32)
        cls_token = jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls_token, patches], axis=1)
        position = nn.Embed(
            cfg.num_patches + 1,
            d,
            embedding_init=_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="position_embedding",
        )
        return x + position(jnp.arange(cfg.num_patches + 1)[None])


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class CLIPVisionTransformer(nn.Module):
    """HF ``CLIPVisionTransformer``: pixels [B, H, W, C] (already preprocessed) ->
    ``(last_hidden_state [B, 1 + N, D], pooled [B, D])`` with pooled = post_layernorm(CLS)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"pixel_values must be NHWC [batch, height, width, {cfg.num_channels}], "
                f"got shape {pixel_values.shape}"
            )
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg.layer_norm_eps, "pre_layrnorm")(x).astype(self.dtype)
        x = CLIPEncoder(cfg, dtype=self.dtype, name="encoder")(x, None)
        pooled = _layer_norm(cfg.layer_norm_eps, "post_layernorm")(x[:, 0]).astype(self.dtype)
        return x, pooled


class CLIPModel(nn.Module):
    """The two towers and their projections (``use_bias=False``); either tower may be absent (see
    ``CLIPConfig``).

    ``text_features`` / ``image_features`` return ``(pooled, projected)`` in float32; the projected
    embeddings are not normalised (as transformers' ``get_text_features`` / ``get_image_features``).
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        dense = functools.partial(
            nn.Dense,
            cfg.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_INIT,
        )
        if cfg.text is not None:
            self.text_model = CLIPTextTransformer(cfg.text, dtype=self.dtype)
            self.text_projection = dense()
        if cfg.vision is not None:
            self.vision_model = CLIPVisionTransformer(cfg.vision, dtype=self.dtype)
            self.visual_projection = dense()

    def text_features(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None):
        if self.config.text is None:
            raise ValueError("this CLIP checkpoint has no text tower")
        _, pooled = self.text_model(input_ids, attention_mask)
        return pooled.astype(jnp.float32), self.text_projection(pooled).astype(jnp.float32)

    def image_features(self, pixel_values: jax.Array):
        if self.config.vision is None:
            raise ValueError("this CLIP checkpoint has no vision tower")
        _, pooled = self.vision_model(pixel_values)
        return pooled.astype(jnp.float32), self.visual_projection(pooled).astype(jnp.float32)

    def __call__(
        self, input_ids: Optional[jax.Array] = None, pixel_values: Optional[jax.Array] = None
    ):
        """Both projected embeddings (``None`` for an absent input); used by ``init``."""
        text = self.text_features(input_ids)[1] if input_ids is not None else None
        image = self.image_features(pixel_values)[1] if pixel_values is not None else None
        return text, image


def _variables(params) -> Dict[str, Any]:
    return params if "params" in params else {"params": params}


@dataclasses.dataclass(frozen=True)
class CLIP:
    """A configured CLIP model; methods take the parameter tree explicitly and are jitted per input
    shape."""

    config: CLIPConfig = CLIPConfig()
    dtype: Dtype = jnp.float32

    @property
    def module(self) -> CLIPModel:
        return CLIPModel(self.config, self.dtype)

    def _init_inputs(self):
        cfg = self.config
        ids = jnp.zeros((1, 1), jnp.int32) if cfg.text is not None else None
        pixels = None
        if cfg.vision is not None:
            s = cfg.vision.image_size
            pixels = jnp.zeros((1, s, s, cfg.vision.num_channels), jnp.float32)
        return ids, pixels

    def init(self, rng: jax.Array) -> Dict[str, Any]:
        return self.module.init(rng, *self._init_inputs())["params"]

    def param_shapes(self) -> Dict[str, Any]:
        return jax.eval_shape(self.module.init, jax.random.PRNGKey(0), *self._init_inputs())[
            "params"
        ]

    @functools.partial(jax.jit, static_argnums=0)
    def text_features(self, params, input_ids, attention_mask=None) -> Tuple[jax.Array, jax.Array]:
        """Token ids [B, L] (and optional mask) ->
        ``(pooled [B, D_text], projected [B, projection_dim])``."""
        return self.module.apply(
            _variables(params),
            jnp.asarray(input_ids, jnp.int32),
            attention_mask,
            method=CLIPModel.text_features,
        )

    @functools.partial(jax.jit, static_argnums=0)
    def image_features(self, params, pixel_values) -> Tuple[jax.Array, jax.Array]:
        """Preprocessed pixels [B, S, S, 3] (``preprocess_images``) -> ``(pooled, projected)``."""
        return self.module.apply(_variables(params), pixel_values, method=CLIPModel.image_features)


def load_clip(
    path: str, *, allow_partial: bool = False, dtype: Dtype = jnp.float32
) -> Tuple[CLIP, Dict[str, Any]]:
    """Loads a transformers CLIP folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``): a full ``CLIPModel`` (e.g. ``openai/clip-vit-large-patch14`` or
    ``-base-patch32``) or a one-tower ``CLIPTextModelWithProjection`` /
    ``CLIPVisionModelWithProjection``.

    Returns ``(clip, params)``. ``logit_scale`` (not needed for embeddings) and ``position_ids``
    buffers are ignored; every other missing, unexpected or mis-shaped tensor raises
    ``WeightsError`` naming it.
    """
    raw, source, file = read_clip_folder(path, what="CLIP model")
    clip = CLIP(CLIPConfig.from_dict(raw), dtype=dtype)
    params = weights.assemble_params(
        clip.param_shapes(),
        source,
        clip_key_function(""),
        what=f"CLIP model from {file}",
        ignore_unused=lambda k: is_clip_buffer(k) or k == "logit_scale",
        allow_partial=allow_partial,
        fallback=clip.init(jax.random.PRNGKey(0)) if allow_partial else None,
    )
    return clip, params


# --------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess_images(
    images: jax.Array,
    *,
    value_range: Tuple[float, float] = (-1.0, 1.0),
    size: int = 224,
    crop_size: Optional[int] = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jax.Array:
    """JAX version of transformers' ``CLIPImageProcessor`` for float images NHWC in ``value_range``:
    resize the shortest side to ``size`` (bicubic, antialiased when shrinking), center crop to
    ``crop_size`` (default ``size``), normalise with CLIP's mean/std. Traceable (shapes are static),
    so it jits with the model.

    Numerical difference from ``CLIPImageProcessor`` (torchvision backend in transformers 5): on
    float inputs the resize kernel is the same (antialiased Keys cubic, a = -0.5, as PIL's bicubic)
    and the outputs agree to ~1e-6, except that values overshooting [0, 1] after the resize are
    clipped here (a uint8 image cannot overshoot). On uint8 inputs (PIL images, the usual way the
    processor is fed) it resizes in fixed point with the two separable passes each rounded and
    clipped to uint8: on smooth images that differs from this float pipeline by ~0.0045 mean and
    < 0.03 max after normalisation (half a grey level is 0.5/255/std ~ 0.0075); on pure noise the
    intermediate clipping can differ by up to 0.1. tests/test_clip_vision.py checks both bounds.
    """
    lo, hi = value_range
    x = (jnp.asarray(images, jnp.float32) - lo) / (hi - lo)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be NHWC [batch, height, width, 3], got shape {x.shape}")
    b, h, w, c = x.shape
    # transformers' get_resize_output_image_size(default_to_square=False): short side = size, long
    # side truncated.
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
    x = jnp.clip(x, 0.0, 1.0)
    crop = crop_size or size
    top, left = (
        int(round((new_h - crop) / 2.0)),
        int(round((new_w - crop) / 2.0)),
    )  # torchvision's center_crop
    x = x[:, top : top + crop, left : left + crop]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
