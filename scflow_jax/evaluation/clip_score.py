"""CLIP score of generated images against their captions, in JAX.

For each (image, caption) pair, c = cosine(image_embed, text_embed) of the projected CLIP
embeddings, with the image preprocessed like ``CLIPImageProcessor``
(``clip_vision.preprocess_images``) and the caption tokenised by the CLIP tokenizer (truncated to 77
tokens). Reported forms:

* ``clip_score``: 100 x mean over samples of max(c, 0), the formula of torchmetrics' documentation
  (and, up to its weight 2.5 instead of 100, of Hessel et al.'s CLIPScore).
* ``clip_score_torchmetrics``: 100 x max(mean c, 0), what torchmetrics' ``CLIPScore.compute``
  actually returns (it clamps the mean). The two agree whenever no cosine is negative, which holds
  for a real CLIP model on real pairs (cosines ~0.2-0.35).
* ``mean_cosine``: mean c in [-1, 1], the 0-1 form the InstaFlow and SCFlow papers quote (e.g.
  0.304).

Only sums and a count are kept (float64, on the host), so evaluations of any size need no memory;
each batch is one jitted call (the last, smaller batch is padded so nothing recompiles).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models.clip import CLIPTokenizerHandle
from scflow_jax.models.clip_vision import CLIP, CLIPModel, preprocess_images

__all__ = ["clip_cosines", "CLIPScoreAccumulator", "CLIPScore", "clip_score"]


@functools.partial(jax.jit, static_argnames=("clip", "value_range"))
def clip_cosines(
    clip: CLIP,
    params: Any,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: Optional[jax.Array] = None,
    *,
    value_range: Tuple[float, float] = (-1.0, 1.0),
) -> jax.Array:
    """Per-pair cosine similarity [B] (float32) of images [B, H, W, 3] (NHWC floats in
    ``value_range``: (-1, 1) for decoder outputs, (0, 1) or (0, 255) also work) and token ids [B, L]
    of their captions."""
    if clip.config.text is None or clip.config.vision is None:
        raise ValueError("CLIP score needs a CLIP model with both towers (a CLIPModel checkpoint)")
    variables = params if "params" in params else {"params": params}
    pixels = preprocess_images(images, value_range=value_range, size=clip.config.vision.image_size)
    _, image_embeds = clip.module.apply(variables, pixels, method=CLIPModel.image_features)
    _, text_embeds = clip.module.apply(
        variables, input_ids, attention_mask, method=CLIPModel.text_features
    )
    image_embeds = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return jnp.sum(image_embeds * text_embeds, axis=-1)


@dataclasses.dataclass
class CLIPScoreAccumulator:
    """Running sums of per-sample cosines; ``result()`` gives every reported form (see the module
    docstring)."""

    sum_cosine: float = 0.0
    sum_clamped_cosine: float = 0.0
    count: int = 0

    def update(self, cosines: Any) -> None:
        c = np.asarray(cosines, np.float64).reshape(-1)
        self.sum_cosine += float(c.sum())
        self.sum_clamped_cosine += float(np.maximum(c, 0.0).sum())
        self.count += int(c.size)

    def merge(self, other: "CLIPScoreAccumulator") -> "CLIPScoreAccumulator":
        """Sums of two accumulators (e.g. from several processes)."""
        return CLIPScoreAccumulator(
            self.sum_cosine + other.sum_cosine,
            self.sum_clamped_cosine + other.sum_clamped_cosine,
            self.count + other.count,
        )

    def result(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("CLIP score of zero samples: call update() first")
        mean = self.sum_cosine / self.count
        return {
            "clip_score": 100.0 * self.sum_clamped_cosine / self.count,
            "clip_score_torchmetrics": 100.0 * max(mean, 0.0),
            "mean_cosine": mean,
            "count": self.count,
        }


class CLIPScore:
    """Batched CLIP score: ``update(images, captions)`` per batch, then ``result()``.

    ``images``: NHWC floats in ``value_range`` (default (-1, 1), the VAE decoder's range). Batches
    smaller than the first one are padded to its size, so the whole evaluation compiles once.
    """

    def __init__(
        self,
        clip: CLIP,
        params: Any,
        tokenizer: CLIPTokenizerHandle,
        *,
        value_range: Tuple[float, float] = (-1.0, 1.0),
    ):
        self.clip, self.params, self.tokenizer = clip, params, tokenizer
        self.value_range = tuple(float(v) for v in value_range)
        self.accumulator = CLIPScoreAccumulator()
        self._batch_size: Optional[int] = None

    def update(self, images: Any, captions: Sequence[str]) -> np.ndarray:
        """Adds a batch; returns its per-sample cosines."""
        n = len(captions)
        if images.shape[0] != n:
            raise ValueError(f"{images.shape[0]} images but {n} captions")
        ids, mask = self.tokenizer(captions)
        self._batch_size = self._batch_size or n
        pad = max(self._batch_size - n, 0)
        if pad:  # repeat the last sample; its copies are dropped below
            images, ids, mask = (
                jnp.concatenate([jnp.asarray(a), jnp.repeat(jnp.asarray(a[-1:]), pad, axis=0)])
                for a in (images, ids, mask)
            )
        cosines = np.asarray(
            clip_cosines(
                self.clip, self.params, jnp.asarray(images), ids, mask, value_range=self.value_range
            )
        )[:n]
        self.accumulator.update(cosines)
        return cosines

    def result(self) -> Dict[str, float]:
        return self.accumulator.result()


def clip_score(
    clip: CLIP,
    params: Any,
    tokenizer: CLIPTokenizerHandle,
    images: Any,
    captions: Sequence[str],
    *,
    batch_size: int = 64,
    value_range: Tuple[float, float] = (-1.0, 1.0),
) -> Dict[str, float]:
    """CLIP score of in-memory ``images`` [N, H, W, 3] and ``captions`` (N strings), in batches of
    ``batch_size``."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scorer = CLIPScore(clip, params, tokenizer, value_range=value_range)
    for start in range(0, len(captions), batch_size):
        scorer.update(
            images[start : start + batch_size], list(captions[start : start + batch_size])
        )
    return scorer.result()
