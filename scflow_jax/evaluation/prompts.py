"""Caption lists for text-to-image evaluation (COCO 2017 5k, COCO 2014 30k, or any list the user
provides).

``load_prompts(path)`` reads, by file name:

* ``*.json``: a JSON list of strings; or an object with a ``"captions"`` list of strings; or a COCO
  captions annotation file (``captions_val2017.json``:
  ``{"annotations": [{"image_id", "caption"}, ...]}``), from which it takes ONE caption per image:
  the first caption of each image in file order, images in ascending ``image_id``. That is the
  zero-shot COCO protocol (one generated sample per image, conditioned on one of its captions, e.g.
  5000 for val2017), and it is deterministic, so two runs and two models see the same captions.
* anything else: text, one prompt per line (UTF-8; a final newline is fine).

Prompts are stripped of surrounding whitespace (COCO captions carry trailing spaces and newlines).
Bad input is an error naming the file: a missing or empty file, empty lines (with their line
numbers), non-string or empty JSON entries (with their index).

``prompts_for_samples(prompts, num_samples)`` takes the first ``num_samples`` prompts (-1: all of
them) and refuses more samples than prompts rather than cycling: a FID or CLIP score over repeated
captions is not the protocol the published numbers use, so reusing captions must be a deliberate
choice (repeat them in the file).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

__all__ = ["load_prompts", "prompts_for_samples"]

_SHOWN = 10  # line numbers / indices quoted in an error message


def _listing(items: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _text_prompts(path: str, text: str) -> list[str]:
    lines = text.splitlines()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(
            f"prompts file {path} has empty line(s) {_listing(empty)} (1-based); "
            f"remove them: every line is one prompt"
        )
    return [line.strip() for line in lines]


def _string_list(path: str, values: Any, where: str) -> list[str]:
    if not isinstance(values, list):
        raise ValueError(
            f"prompts file {path}: {where} must be a list of strings, got {type(values).__name__}"
        )
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"prompts file {path}: {where} entries {_listing(bad)} (0-based) are not strings"
        )
    empty = [i for i, v in enumerate(values) if not v.strip()]
    if empty:
        raise ValueError(
            f"prompts file {path}: {where} entries {_listing(empty)} (0-based) are empty"
        )
    return [v.strip() for v in values]


def _coco_first_captions(path: str, annotations: Any) -> list[str]:
    if not isinstance(annotations, list):
        raise ValueError(
            f"prompts file {path}: 'annotations' must be a list of COCO caption annotations"
        )
    first: dict[int, Any] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(
                f"prompts file {path}: annotations[{i}] is not a COCO caption annotation "
                f"(needs 'image_id' and 'caption')"
            )
        first.setdefault(ann["image_id"], ann["caption"])
    try:
        image_ids = sorted(first)
    except TypeError:
        raise ValueError(
            f"prompts file {path}: annotation image_id values of mixed types cannot be ordered"
        ) from None
    return _string_list(
        path, [first[k] for k in image_ids], "annotations[*].caption (first per image)"
    )


def _json_prompts(path: str, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts file {path} is not valid JSON: {e}") from None
    if isinstance(data, list):
        return _string_list(path, data, "the list")
    if isinstance(data, dict):
        if "captions" in data:
            return _string_list(path, data["captions"], "'captions'")
        if "annotations" in data:
            return _coco_first_captions(path, data["annotations"])
        raise ValueError(
            f"prompts file {path}: a JSON object needs a 'captions' list or COCO 'annotations'; "
            f"found keys {sorted(data)[:_SHOWN]}"
        )
    raise ValueError(
        f"prompts file {path}: expected a JSON list of strings or an object, "
        f"got {type(data).__name__}"
    )


def load_prompts(path: str) -> list[str]:
    """The prompts in ``path`` (see the module docstring for the formats); never empty."""
    if not path:
        raise ValueError("no prompts file given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist or is not a file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"prompts file {path} is empty: it must hold at least one prompt")
    is_json = path.lower().endswith(".json")
    prompts = _json_prompts(path, text) if is_json else _text_prompts(path, text)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def prompts_for_samples(
    prompts: Sequence[str],
    num_samples: int,
    *,
    source: str = "the prompts",
    field: str = "num_samples",
) -> list[str]:
    """The first ``num_samples`` prompts (-1: all); more samples than prompts is an error naming
    both counts."""
    if num_samples == -1:
        return list(prompts)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"{field}={num_samples!r} must be a positive integer or -1 (one sample per prompt)"
        )
    if num_samples > len(prompts):
        raise ValueError(
            f"{field}={num_samples} but {source} holds only {len(prompts)} prompts; prompts are "
            f"not cycled (a FID/CLIP protocol uses each caption once): lower {field} or give "
            f"more prompts"
        )
    return list(prompts[:num_samples])
