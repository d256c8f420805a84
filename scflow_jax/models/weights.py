"""Reading foreign checkpoints and assembling Flax parameter trees from them: the one place every
converter uses.

A converter (``unet_sd.py``, ``vae.py``, ``clip.py``, ``unet_adm.py``, ``evaluation/inception.py``)
only states *names*: for each leaf of the Flax parameter tree, the key of the source tensor it comes
from. Everything else is here and shared:

* ``read_safetensors``: a streaming reader. The file is memory-mapped and each tensor is a zero-copy
  view, so a converter never holds two full copies of a model (the SD 1.5 UNet converts on a 24 GB
  machine). bf16 and fp16 are read through ``ml_dtypes``; a truncated or corrupted file is reported
  by name.
* ``read_torch_state_dict``: ``torch.load(weights_only=True)`` (torch is imported here only, on
  demand), so a ``.pth`` that pickles code is refused instead of executed.
* ``assemble_params``: walks the expected tree (from ``jax.eval_shape`` of the module's ``init``),
  pulls each tensor, applies the layout transform (PyTorch OIHW conv -> HWIO, Linear
  ``(out, in)`` -> ``(in, out)``), casts to the expected dtype, and reports *all* missing,
  unexpected and shape-mismatched keys by name. A partial load is refused unless the caller
  explicitly allows it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

__all__ = [
    "WeightsError",
    "read_safetensors",
    "read_torch_state_dict",
    "write_safetensors",
    "torch_layout",
    "torch_layout_inverse",
    "state_dict_from_params",
    "hf_style_key",
    "assemble_params",
    "flatten_params",
    "unflatten_params",
    "read_json",
    "find_file",
]


class WeightsError(ValueError):
    """A weights file or folder that cannot be converted; the message names the file and the
    keys."""


# --------------------------------------------------------------------------------------------------
# safetensors (read by hand: the format is an 8-byte little-endian header length, a JSON header,
# then raw bytes)


def _safetensors_dtypes() -> Dict[str, np.dtype]:
    import ml_dtypes  # a dependency of jax

    return {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype(np.int64),
        "I32": np.dtype(np.int32),
        "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8),
        "U8": np.dtype(np.uint8),
        "BOOL": np.dtype(np.bool_),
    }


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Returns ``{key: array}`` of read-only, memory-mapped views into the file at ``path`` (no copy
    is made).

    Raises ``WeightsError`` naming the file if it is missing, truncated or its header is not valid
    safetensors.
    """
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(
                    f"header length {header_len} does not fit in a file of {size} bytes"
                )
            header = json.loads(f.read(header_len).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    dtypes = _safetensors_dtypes()
    data_start = 8 + header_len
    buf = (
        np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros((0,), np.uint8)
    )
    out = {}
    for key, info in header.items():
        try:
            dtype = dtypes[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(
                f"{path}: malformed header entry for tensor {key!r}: {info!r}"
            ) from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or data_start + end > size or begin < 0:
            raise WeightsError(
                f"{path} is truncated or corrupted: tensor {key!r} ({info['dtype']}{list(shape)}) "
                f"needs bytes [{begin}, {end}) of a data section of {size - data_start} bytes"
            )
        out[key] = buf[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return out


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None
):
    """Writes ``tensors`` as a safetensors file, atomically (temp file + rename). Readable by the
    reference ``safetensors`` library and hence by diffusers/transformers. Values may be views
    (transposes, memmaps): each is made contiguous only while it is written, so no second copy of
    the whole model is held."""
    names = {np.dtype(v): k for k, v in _safetensors_dtypes().items()}
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    keys = sorted(tensors)
    for key in keys:
        a = np.asarray(tensors[key])
        if a.dtype not in names:
            raise WeightsError(f"cannot write tensor {key!r} of dtype {a.dtype} to safetensors")
        header[key] = {
            "dtype": names[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in keys:
            f.write(np.ascontiguousarray(np.asarray(tensors[key])).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# torch pickles


def read_torch_state_dict(
    path: str, *, subkey: Optional[str] = None, safe_globals: Sequence[Any] = ()
) -> Dict[str, np.ndarray]:
    """Reads a PyTorch ``.pth``/``.pt``/``.bin`` state dict as ``{key: float array}`` with
    ``torch.load(weights_only=True)``; a pickle that contains code (a whole pickled model) is
    refused.

    ``subkey`` selects a nested dict (e.g. ``"ema"`` or ``"model"`` in training checkpoints).
    ``safe_globals``: plain-data classes the unpickler may also rebuild, for training checkpoints
    that store them beside the weights (``argparse.Namespace`` of the run's flags); never classes
    with behaviour.
    """
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"reading the PyTorch file {path} needs torch (pip install 'scflow_jax[parity]'); "
            "safetensors files need no torch"
        ) from None
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for garbage
        raise WeightsError(
            f"{path} is not a plain PyTorch state dict (torch.load(weights_only=True) refused it: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Save the model's state_dict() rather than the pickled model object."
        ) from None
    if subkey is not None:
        if not isinstance(obj, Mapping) or subkey not in obj:
            keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(f"{path} has no entry {subkey!r} (found {keys})")
        obj = obj[subkey]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; pass subkey= to pick "
                f"the nested state dict (top-level keys: {sorted(obj)[:10]})"
            )
        if v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v.detach().cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------------
# Assembling a Flax tree

Path = Tuple[str, ...]


def flatten_params(tree: Any) -> Dict[Path, Any]:
    """``{('a', 'b', 'kernel'): leaf}`` for a nested dict of parameters."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            out[prefix] = node

    walk(tree, ())
    return out


def unflatten_params(flat: Mapping[Path, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def torch_layout(leaf_name: str, array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor, decided by the Flax leaf name and the rank:
    ``kernel`` of rank 4 is a conv (OIHW -> HWIO), of rank 2 a Linear (``(out, in)`` ->
    ``(in, out)``); everything else (biases, norm scales, embeddings) is taken as is."""
    if leaf_name == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))
        if array.ndim == 2:
            return np.transpose(array, (1, 0))
        if array.ndim == 3:  # Conv1d: OIW -> WIO
            return np.transpose(array, (2, 1, 0))
    return array


def torch_layout_inverse(leaf_name: str, array: np.ndarray) -> np.ndarray:
    """The inverse of ``torch_layout``: Flax layout -> PyTorch layout (for exporters)."""
    if leaf_name == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (3, 2, 0, 1))
        if array.ndim == 2:
            return np.transpose(array, (1, 0))
        if array.ndim == 3:
            return np.transpose(array, (2, 1, 0))
    return array


def state_dict_from_params(
    params: Any,
    key_for: Callable[[Path], str],
    *,
    dtype: Any = None,
    transform: Callable[[Path, np.ndarray], np.ndarray] = lambda path, a: torch_layout_inverse(
        path[-1], a
    ),
) -> Dict[str, np.ndarray]:
    """The inverse of ``assemble_params``: ``{key_for(path): transform(path, leaf)}`` for an
    exporter, with the same ``key_for`` as the converter. Leaves stay views where possible (cast to
    ``dtype`` if given)."""
    out = {}
    for path, leaf in flatten_params(params).items():
        key = key_for(path)
        if key in out:
            raise WeightsError(
                f"two parameters map to the same key {key!r} (one is {'/'.join(path)})"
            )
        a = transform(path, np.asarray(jax.device_get(leaf)))
        out[key] = a if dtype is None else a.astype(dtype, copy=False)
    return out


_LIST_SUFFIX = re.compile(r"^(.*)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def hf_style_key(path: Path, list_modules: Iterable[str] = ()) -> str:
    """The PyTorch key of a Flax leaf whose module tree mirrors the PyTorch one: components joined
    by ``.``, ``kernel``/``scale``/``embedding`` -> ``weight``, and ``name_3`` -> ``name.3`` for the
    ``ModuleList`` names given in ``list_modules`` (``layers``, ``down_blocks``...). Other
    underscores are kept."""
    list_modules = set(list_modules)
    parts = []
    for p in path[:-1]:
        m = _LIST_SUFFIX.match(p)
        if m and m.group(1) in list_modules:
            parts.extend([m.group(1), m.group(2)])
        else:
            parts.append(p)
    parts.append(_LEAF_NAMES.get(path[-1], path[-1]))
    return ".".join(parts)


def _short_list(items: Sequence[str], limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def assemble_params(
    expected: Any,
    source: Mapping[str, np.ndarray],
    key_for: Callable[[Path], str],
    *,
    what: str,
    transform: Callable[[Path, np.ndarray], np.ndarray] = lambda path, a: torch_layout(path[-1], a),
    ignore_unused: Callable[[str], bool] = lambda key: False,
    allow_partial: bool = False,
    fallback: Any = None,
) -> Dict[str, Any]:
    """Builds the parameter tree ``expected`` (a tree of arrays or ``jax.ShapeDtypeStruct``) from
    ``source``.

    Args:
      expected: the tree to produce, typically ``jax.eval_shape(module.init, ...)["params"]``.
      source: ``{key: array}`` from ``read_safetensors`` or ``read_torch_state_dict``.
      key_for: Flax leaf path -> source key.
      what: a name for messages (``"SD UNet from /path/unet"``).
      transform: layout change applied before the shape check (default: ``torch_layout``).
      ignore_unused: source keys for which this is true are not reported as unexpected (buffers
        such as ``position_ids``, or ``num_batches_tracked``).
      allow_partial: if true, missing/mismatched leaves are taken from ``fallback`` (a tree of
        arrays like ``expected``) and unexpected keys are ignored; otherwise any problem raises
        ``WeightsError`` listing all of them by name.
    Returns:
      a nested dict of NumPy arrays in the expected dtypes.
    """
    flat_expected = flatten_params(expected)
    flat_fallback = flatten_params(fallback) if fallback is not None else {}
    used = set()
    missing, mismatched = [], []
    out = {}
    for path, spec in flat_expected.items():
        key = key_for(path)
        if key not in source:
            missing.append(f"{key} (for {'/'.join(path)})")
            continue
        used.add(key)
        value = transform(path, source[key])
        if tuple(value.shape) != tuple(spec.shape):
            mismatched.append(
                f"{key}: checkpoint {list(source[key].shape)} -> {list(value.shape)}, "
                f"model {'/'.join(path)} expects {list(spec.shape)}"
            )
            continue
        out[path] = np.asarray(value, dtype=spec.dtype)
    unexpected = sorted(k for k in source if k not in used and not ignore_unused(k))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_short_list(mismatched)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if problems and not allow_partial:
        raise WeightsError(
            f"cannot convert {what}: "
            + "; ".join(problems)
            + ". (Is this the right checkpoint for this model configuration?)"
        )
    if problems:
        for path in flat_expected:
            if path not in out:
                if path not in flat_fallback:
                    raise WeightsError(
                        f"{what}: allow_partial needs fallback parameters for {'/'.join(path)}"
                    )
                out[path] = np.asarray(flat_fallback[path])
    return unflatten_params(out)


def read_json(path: str, *, what: str) -> Dict[str, Any]:
    """Reads a ``config.json``-style file; a missing or unparsable file is a ``WeightsError`` naming
    it."""
    if not os.path.isfile(path):
        raise WeightsError(f"{what}: {path} not found (is this a model folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise WeightsError(f"{what}: {path} does not hold a JSON object")
    return out


def find_file(folder: str, candidates: Sequence[str], *, what: str) -> str:
    """The first of ``candidates`` (names relative to ``folder``) that exists, or a ``WeightsError``
    listing them."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{what}: {folder} is not a folder")
    for name in candidates:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise WeightsError(f"{what}: none of {list(candidates)} found in {folder}")
