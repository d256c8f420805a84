"""The SD 1.5 UNet's converter and exporter (``models/unet_sd.py``'s network): diffusers checkpoints
to Flax parameters and back, through one name mapping (``unet_sd_key``) used in both directions."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from scflow_jax.models import weights
from scflow_jax.models.unet_sd import UNetSDConfig, unet_param_shapes

__all__ = ["unet_sd_key", "load_unet_sd", "export_unet_sd", "WEIGHT_FILES"]


_LIST_MODULES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
)

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bf16.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def unet_sd_key(path: Tuple[str, ...]) -> str:
    """The diffusers state-dict key of a Flax parameter path."""
    return weights.hf_style_key(path, _LIST_MODULES)


def _read_weights(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".index.json"):  # sharded checkpoint: {"weight_map": {key: shard file}}
        index = weights.read_json(path, what="sharded UNet checkpoint index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise weights.WeightsError(f"{path} has no 'weight_map'")
        out: Dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(weights.read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(".safetensors"):
        return weights.read_safetensors(path)
    return weights.read_torch_state_dict(path)


def _resolve(path: str, config) -> Tuple[UNetSDConfig, str]:
    """(config, weights file) for a pipeline folder, a UNet folder or a single weights file."""
    if os.path.isdir(path):
        folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        if config is None:
            config = weights.read_json(os.path.join(folder, "config.json"), what="SD UNet config")
        weights_file = weights.find_file(folder, WEIGHT_FILES, what="SD UNet weights")
    elif os.path.isfile(path):
        if config is None:
            raise weights.WeightsError(
                f"{path} is a single weights file: pass config= (a UNetSDConfig, a "
                "config.json dict or the path of a config.json)"
            )
        weights_file = path
    else:
        raise weights.WeightsError(f"SD UNet: {path} does not exist")
    if isinstance(config, str):
        config = weights.read_json(config, what="SD UNet config")
    if isinstance(config, Mapping):
        try:
            config = UNetSDConfig.from_dict(config)
        except (ValueError, TypeError) as e:
            raise weights.WeightsError(f"SD UNet config for {path}: {e}") from None
    if not isinstance(config, UNetSDConfig):
        raise TypeError(
            f"config must be a UNetSDConfig, a dict or a path, got {type(config).__name__}"
        )
    return config, weights_file


class _FlaxStyleInit:
    """A parameter of ``load_unet_sd(..., allow_partial=True)`` that the checkpoint lacks,
    materialised by ``np.asarray`` only if it is used: Flax's default initialisation, seeded by the
    parameter's shape."""

    def __init__(self, leaf_name: str, spec):
        self.leaf_name, self.shape, self.dtype = leaf_name, tuple(spec.shape), spec.dtype

    def __array__(self, dtype=None, copy=None):
        if self.leaf_name == "scale":
            value = np.ones(self.shape)
        elif (
            self.leaf_name == "kernel"
        ):  # LeCun normal: fan-in is every axis but the last (HWIO, (in, out))
            rng = np.random.default_rng(abs(hash(self.shape)) % 2**32)
            value = rng.standard_normal(self.shape) / np.sqrt(np.prod(self.shape[:-1]))
        else:
            value = np.zeros(self.shape)
        return value.astype(dtype or self.dtype)


def load_unet_sd(
    path: str,
    *,
    config: Union[UNetSDConfig, Mapping[str, Any], str, None] = None,
    allow_partial: bool = False,
) -> Tuple[UNetSDConfig, Dict[str, Any]]:
    """Converts a diffusers UNet2DConditionModel checkpoint to ``(config, params)`` (params: float32
    NumPy tree).

    ``path`` is a diffusers pipeline folder (its ``unet/`` is used), a UNet folder (``config.json``
    plus ``diffusion_pytorch_model[.fp16|.bf16].safetensors``, a sharded ``.safetensors.index.json``
    or a ``.bin``), or a single ``.safetensors`` file together with ``config``. Tensors are
    memory-mapped and converted one at a time, so the peak is one float32 copy of the parameters
    plus the mapped file. fp16/bf16 checkpoints load into float32. Missing, unexpected and
    shape-mismatched keys are reported by name (``weights.WeightsError``); ``allow_partial=True``
    initialises missing or mismatched ones in the manner of Flax's defaults (LeCun-scaled normal
    kernels, zero biases, unit norm scales) and ignores unexpected ones. Nothing is downloaded.
    """
    config, weights_file = _resolve(path, config)
    source = _read_weights(weights_file)
    expected = unet_param_shapes(config)
    # Fallback leaves are generated only for the keys that are missing, so allow_partial costs no
    # extra copy.
    fallback = (
        weights.unflatten_params(
            {
                path: _FlaxStyleInit(path[-1], spec)
                for path, spec in weights.flatten_params(expected).items()
            }
        )
        if allow_partial
        else None
    )
    params = weights.assemble_params(
        expected,
        source,
        unet_sd_key,
        what=f"SD UNet from {weights_file}",
        allow_partial=allow_partial,
        fallback=fallback,
    )
    return config, params


def export_unet_sd(
    config: UNetSDConfig, params: Mapping[str, Any], folder: str, *, dtype: Optional[Any] = None
) -> str:
    """Writes a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    that ``diffusers.UNet2DConditionModel.from_pretrained(folder)`` loads; ``dtype`` (e.g.
    ``np.float16``) casts the tensors, default: as stored (float32). The file is written atomically.
    Returns ``folder``."""
    expected = weights.flatten_params(unet_param_shapes(config))
    flat = weights.flatten_params(params)
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - set(expected))
        raise weights.WeightsError(
            f"export_unet_sd: parameters do not match the config (missing {missing[:10]}, "
            f"unexpected {extra[:10]})"
        )
    tensors = weights.state_dict_from_params(params, unet_sd_key, dtype=dtype)
    os.makedirs(folder, exist_ok=True)
    weights.write_safetensors(
        os.path.join(folder, "diffusion_pytorch_model.safetensors"),
        tensors,
        metadata={"format": "pt"},
    )
    config_path = os.path.join(folder, "config.json")
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2)
    os.replace(config_path + ".tmp", config_path)
    return folder
