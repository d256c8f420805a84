"""CLIP text transformer (the text encoder of CLIP ViT-L/14 used by Stable Diffusion 1.5) in Flax
Linen.

The parameter tree mirrors the module hierarchy of Hugging Face ``CLIPTextModel`` so that a
converter can load its safetensors by a mechanical renaming (indented rows continue the path and
the key of the row above them)::

    embeddings/token_embedding/embedding       <- embeddings.token_embedding.weight
    embeddings/position_embedding/embedding    <- embeddings.position_embedding.weight
    encoder/layers_{i}/                        <- encoder.layers.{i}.
        self_attn/{q,k,v,out}_proj/kernel      <- self_attn.{q,k,v,out}_proj.weight.T
        self_attn/{q,k,v,out}_proj/bias        <- self_attn.{q,k,v,out}_proj.bias
        layer_norm{1,2}/{scale,bias}           <- layer_norm{1,2}.{weight,bias}
        mlp/{fc1,fc2}/{kernel,bias}            <- mlp.{fc1,fc2}.{weight.T,bias}
    final_layer_norm/{scale,bias}              <- final_layer_norm.{weight,bias}

(Older transformers releases prefix every HF key with ``text_model.``.)

Architecture: token + learned absolute position embeddings, a stack of pre-LayerNorm transformer
blocks with causal multi-head self-attention and an MLP (fc1 -> activation -> fc2), then a final
LayerNorm. The pooled output is the final-normed hidden state at the first end-of-text token.

Computation runs in ``dtype``; parameters are stored in float32; LayerNorm and softmax run in
float32.

The encoder (``CLIPEncoderLayer``/``CLIPEncoder``) is shared with the vision tower in
``clip_vision.py``: it reads only ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
``num_attention_heads``, ``head_dim``, ``hidden_act`` and ``layer_norm_eps`` from its config, which
both tower configs provide.

Loading: ``load_clip_text`` reads the text tower from a diffusers ``text_encoder/`` folder or any
transformers CLIP folder (``CLIPTextModel``, ``CLIPTextModelWithProjection``, full ``CLIPModel``);
``load_clip_tokenizer`` loads the matching tokenizer with transformers, offline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import weights

__all__ = [
    "CLIPTextConfig",
    "CLIPAttention",
    "CLIPMLP",
    "CLIPEncoderLayer",
    "CLIPEncoder",
    "CLIPTextEmbeddings",
    "CLIPTextTransformer",
    "encode_text",
    "ACTIVATIONS",
    "load_clip_text",
    "load_clip_tokenizer",
    "CLIPTokenizerHandle",
]

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,  # HF alias of the same tanh approximation
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of the CLIP text transformer. Defaults are those of CLIP ViT-L/14
    (SD 1.5)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """Builds a config from an HF ``config.json`` dict.

        Accepts either a ``CLIPTextConfig``-style dict or a full ``CLIPConfig`` dict, whose nested
        ``"text_config"`` (and legacy ``"text_config_dict"``, which takes precedence) is read.
        Unknown keys are ignored; missing keys keep this class's defaults (ViT-L/14). A list-valued
        ``eos_token_id`` uses its first entry.
        """
        d = dict(d)
        if isinstance(d.get("text_config"), dict) or isinstance(d.get("text_config_dict"), dict):
            nested = dict(d.get("text_config") or {})
            nested.update(d.get("text_config_dict") or {})
            d = nested
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if eos:
                kwargs["eos_token_id"] = eos[0]
            else:
                kwargs.pop("eos_token_id")
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "eos_token_id",
        ):
            if k in kwargs:
                kwargs[k] = int(kwargs[k])
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        return cls(**kwargs)

    @classmethod
    def tiny(
        cls,
        vocab_size: int,
        max_position_embeddings: int,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 64,
        **overrides,
    ) -> "CLIPTextConfig":
        """A small config for demos and tests. The eos token defaults to the last vocabulary id (as
        in CLIP's own tokenizer, where <|endoftext|> is the last token); ``overrides`` may set any
        other field."""
        kwargs = dict(
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            eos_token_id=vocab_size - 1,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


_INIT = nn.initializers.normal(stddev=0.02)


def _layer_norm(config: Any, name: str) -> nn.LayerNorm:
    # Computed in float32 regardless of the model dtype.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name
    )


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_INIT,
        bias_init=nn.initializers.zeros,
        name=name,
    )


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF ``CLIPAttention``
    names)."""

    config: Any  # CLIPTextConfig or clip_vision.CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        """x: [B, L, D]; mask: boolean, broadcastable to [B, 1, L, L] (True = attend)."""
        cfg = self.config
        b, seq, d = x.shape
        h, hd = cfg.num_attention_heads, cfg.head_dim
        q = _dense(d, self.dtype, "q_proj")(x).reshape(b, seq, h, hd)
        k = _dense(d, self.dtype, "k_proj")(x).reshape(b, seq, h, hd)
        v = _dense(d, self.dtype, "v_proj")(x).reshape(b, seq, h, hd)
        q = q * jnp.asarray(hd**-0.5, dtype=q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if mask is not None:
            # A large finite negative (not -inf) keeps fully masked rows finite instead of NaN.
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, seq, d)
        return _dense(d, self.dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
    config: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.config.hidden_act]
        x = _dense(self.config.intermediate_size, self.dtype, "fc1")(x)
        x = act(x)
        return _dense(self.config.hidden_size, self.dtype, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        residual = x
        y = _layer_norm(self.config, "layer_norm1")(x).astype(self.dtype)
        y = CLIPAttention(self.config, dtype=self.dtype, name="self_attn")(y, mask)
        x = residual + y
        residual = x
        y = _layer_norm(self.config, "layer_norm2")(x).astype(self.dtype)
        y = CLIPMLP(self.config, dtype=self.dtype, name="mlp")(y)
        return residual + y


class CLIPEncoder(nn.Module):
    """The stack of ``CLIPEncoderLayer``s of either tower (text: causal mask; vision:
    ``mask=None``)."""

    config: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, dtype=self.dtype, name=f"layers_{i}")(x, mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"Sequence length {seq_len} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        token = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="token_embedding",
        )
        position = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="position_embedding",
        )
        positions = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
        return token(input_ids) + position(positions)


class CLIPTextTransformer(nn.Module):
    """CLIP text encoder. Returns ``(last_hidden_state [B, L, D], pooled_output [B, D])``.

    ``attention_mask`` ([B, L], 1 = keep, 0 = masked key) is combined with the causal mask. The
    pooled output is the final-normed hidden state at the first ``eos_token_id`` in each row
    (``argmax(input_ids)`` when ``eos_token_id == 2``, HF's legacy rule). Outputs are in ``dtype``.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None
    ) -> Tuple[jax.Array, jax.Array]:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {input_ids.shape}")
        input_ids = input_ids.astype(jnp.int32)
        b, seq = input_ids.shape

        x = CLIPTextEmbeddings(cfg, dtype=self.dtype, name="embeddings")(input_ids)

        causal = jnp.tril(jnp.ones((seq, seq), dtype=jnp.bool_))[None, None, :, :]  # [1, 1, Lq, Lk]
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask).astype(jnp.bool_).reshape(b, 1, 1, seq)
            mask = jnp.logical_and(causal, keep)
        else:
            mask = causal

        x = CLIPEncoder(cfg, dtype=self.dtype, name="encoder")(x, mask)
        last_hidden_state = _layer_norm(cfg, "final_layer_norm")(x).astype(self.dtype)

        if cfg.eos_token_id == 2:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled_output = last_hidden_state[jnp.arange(b), eos_pos]
        return last_hidden_state, pooled_output


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _encode_text(params, config, input_ids, attention_mask, dtype):
    model = CLIPTextTransformer(config, dtype=dtype)
    hidden, _ = model.apply(params, input_ids, attention_mask)
    return hidden.astype(jnp.float32)


def encode_text(
    params, config: CLIPTextConfig, input_ids, attention_mask=None, *, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Jitted convenience: returns the float32 ``last_hidden_state`` [B, L, D].

    ``params`` may be the full variables dict (``{"params": ...}``) or the bare parameter tree.
    ``config`` (and ``dtype``) are static, so each distinct config compiles once.
    """
    if "params" not in params:
        params = {"params": params}
    return _encode_text(
        params,
        config,
        jnp.asarray(input_ids, dtype=jnp.int32),
        None if attention_mask is None else jnp.asarray(attention_mask),
        jnp.dtype(dtype),
    )


# --------------------------------------------------------------------------------------------------
# Loading from transformers / diffusers folders (shared with clip_vision.py)

CLIP_WEIGHT_FILES = (
    "model.safetensors",
    "model.fp16.safetensors",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
)


def read_clip_folder(path: str, *, what: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], str]:
    """``(config dict, state dict, weights file)`` of a transformers CLIP folder."""
    config = weights.read_json(os.path.join(path, "config.json"), what=what)
    file = weights.find_file(path, CLIP_WEIGHT_FILES, what=what)
    source = (
        weights.read_safetensors(file)
        if file.endswith(".safetensors")
        else weights.read_torch_state_dict(file)
    )
    return config, source, file


def clip_key_function(prefix: str) -> Callable[[Tuple[str, ...]], str]:
    """Flax path -> HF key: ``prefix`` + ``hf_style_key`` with ``encoder.layers.{i}``."""
    return lambda path: prefix + weights.hf_style_key(path, ("layers",))


def is_clip_buffer(key: str) -> bool:
    """Non-parameter entries of HF CLIP state dicts (older transformers saved the ``position_ids``
    buffers)."""
    return key.endswith("position_ids")


def load_clip_text(
    path: str, *, allow_partial: bool = False
) -> Tuple[CLIPTextConfig, Dict[str, Any]]:
    """Loads the CLIP text transformer from a local folder: a diffusers pipeline (uses
    ``text_encoder/``), a diffusers ``text_encoder/`` folder, or a transformers
    ``CLIPTextModel``/``CLIPTextModelWithProjection``/``CLIPModel`` folder (``config.json`` +
    ``model.safetensors`` or ``pytorch_model.bin``).

    Returns ``(config, params)`` with ``params`` the bare ``CLIPTextTransformer`` tree (for
    ``encode_text``). Keys may carry the ``text_model.`` prefix or not; the vision tower,
    projections, ``logit_scale`` and ``position_ids`` buffers are ignored. Missing or mis-shaped
    tensors raise ``WeightsError`` naming them.
    """
    if os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
        path = os.path.join(path, "text_encoder")
    raw, source, file = read_clip_folder(path, what="CLIP text encoder")
    config = CLIPTextConfig.from_dict(raw)
    prefix = "text_model." if any(k.startswith("text_model.") for k in source) else ""
    model, ids = CLIPTextTransformer(config), jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    fallback = model.init(jax.random.PRNGKey(0), ids)["params"] if allow_partial else None
    params = weights.assemble_params(
        expected,
        source,
        clip_key_function(prefix),
        what=f"CLIP text encoder from {file}",
        ignore_unused=lambda k: (
            is_clip_buffer(k) or not k.startswith(prefix) or _is_other_clip_part(k)
        ),
        allow_partial=allow_partial,
        fallback=fallback,
    )
    return config, params


def _is_other_clip_part(key: str) -> bool:
    return (
        key.startswith(("vision_model.", "visual_projection.", "text_projection."))
        or key == "logit_scale"
    )


# --------------------------------------------------------------------------------------------------
# Tokenizer


@dataclasses.dataclass(frozen=True)
class CLIPTokenizerHandle:
    """A transformers CLIP tokenizer with SD's framing: truncate and pad (with ``<|endoftext|>``) to
    ``max_length``. ``__call__`` returns NumPy
    ``(input_ids int32 [N, L], attention_mask int32 [N, L])``."""

    tokenizer: Any
    max_length: int = 77

    def __call__(self, captions: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        if isinstance(captions, str):
            raise TypeError("pass a list of captions, not a single string")
        out = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def load_clip_tokenizer(path: str, *, max_length: int = 77) -> CLIPTokenizerHandle:
    """Loads ``CLIPTokenizer`` from a local folder (a diffusers pipeline's ``tokenizer/``, or any
    folder with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``), without network access."""
    if os.path.isdir(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")
    has_fast = os.path.isfile(os.path.join(path, "tokenizer.json"))
    has_bpe = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    if not (has_fast or has_bpe):
        raise weights.WeightsError(
            f"CLIP tokenizer: {path} has no tokenizer files "
            "(expected tokenizer.json, or vocab.json and merges.txt)"
        )
    from transformers import CLIPTokenizer

    return CLIPTokenizerHandle(
        CLIPTokenizer.from_pretrained(path, local_files_only=True), max_length
    )
