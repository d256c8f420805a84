"""Digit classifier used as the feature extractor for the 8x8 digits demo metric.

The embedded demo treats scikit-learn's 8x8 digits as a tiny text-to-image task
(prompt = the digit label). Its metric mirrors FID + CLIP-style prompt
adherence with a small CNN trained on the real digits:

* ``fd``: the Fréchet distance between the classifier's penultimate features of
  generated images and those of real images (``reference_statistics``);
* ``accuracy``: the fraction of generated images the classifier assigns to the
  prompted digit.

Images are NHWC ``[B, 8, 8, 1]`` floats in ``[-1, 1]`` (``pixels / 16 * 2 - 1`` for
``sklearn.datasets.load_digits``); ``[B, 8, 8]`` is accepted and given a channel
axis. "params" below always means the full Flax variables dict ``{"params": ...}``
returned by ``DigitClassifier.init``, usable directly with ``DigitClassifier.apply``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from scflow_jax import monitoring
from scflow_jax.evaluation.frechet import feature_statistics, frechet_distance

__all__ = [
    "DigitClassifier",
    "train_digit_classifier",
    "load_or_train_classifier",
    "classify",
    "digit_metrics",
    "reference_statistics",
    "CLASSIFIER_FILENAME",
    "METADATA_FILENAME",
]

logger = logging.getLogger(__name__)

CLASSIFIER_FILENAME = "digit_classifier.msgpack"
METADATA_FILENAME = "digit_classifier.json"
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
DEFAULT_FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Small deterministic CNN for 8x8 digits:
    ``x [B, 8, 8, 1] -> (logits [B, 10], features [B, feature_dim])``."""

    feature_dim: int = DEFAULT_FEATURE_DIM
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"DigitClassifier expects images of shape [B, 8, 8, 1], got {tuple(x.shape)}"
            )
        x = x.astype(jnp.float32)
        h = nn.gelu(nn.Conv(32, (3, 3), padding="SAME", name="conv1")(x))
        h = nn.gelu(nn.Conv(64, (3, 3), strides=(2, 2), padding="SAME", name="conv2")(h))
        h = h.reshape((h.shape[0], -1))
        features = nn.gelu(nn.Dense(self.feature_dim, name="features")(h))
        logits = nn.Dense(self.num_classes, name="logits")(features)
        return logits, features


# ---------------------------------------------------------------------- helpers
def _as_images(images: Any, name: str = "images") -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3 and tuple(array.shape[1:]) == IMAGE_SHAPE[:2]:
        array = array[..., None]
    if array.ndim != 4 or tuple(array.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape [N, 8, 8, 1] (or [N, 8, 8]), got {array.shape}")
    return array


def _as_labels(labels: Any, num: int, name: str = "labels") -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (num,):
        raise ValueError(f"{name} has shape {array.shape}, expected ({num},) to match the images")
    if num and not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ValueError(f"{name} must be integer class ids, got dtype {array.dtype}")
        array = rounded
    array = array.astype(np.int32)
    if num and (array.min() < 0 or array.max() >= NUM_CLASSES):
        raise ValueError(
            f"{name} must be in [0, {NUM_CLASSES}), got range [{array.min()}, {array.max()}]"
        )
    return array


def _feature_dim_of(params: Mapping[str, Any]) -> int:
    try:
        return int(params["params"]["features"]["kernel"].shape[-1])
    except (KeyError, TypeError) as err:
        raise ValueError(
            "params must be the DigitClassifier variables dict {'params': {...}} "
            "(as returned by train_digit_classifier / load_or_train_classifier)"
        ) from err


@functools.partial(jax.jit, static_argnums=0)
def _init_from_key(feature_dim: int, key: jax.Array) -> dict:
    model = DigitClassifier(feature_dim=feature_dim)
    return model.init(key, jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32))


def _init_variables(seed: int, feature_dim: int) -> dict:
    return _init_from_key(int(feature_dim), jax.random.PRNGKey(seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(feature_dim: int, variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return DigitClassifier(feature_dim=feature_dim).apply(variables, images)


# ---------------------------------------------------------------------- training
def _batch_indices(rng: np.random.Generator, num: int, steps: int, batch_size: int) -> np.ndarray:
    """[steps, batch_size] example indices drawn epoch by epoch (each epoch a fresh permutation)."""
    total = steps * batch_size
    epochs = -(-total // num)
    order = np.concatenate([rng.permutation(num) for _ in range(epochs)])
    return order[:total].reshape(steps, batch_size).astype(np.int32)


_ADAM = optax.scale_by_adam()


# One jitted step driven from Python, shared by every training run (compiled once
# per feature_dim / batch / dataset shape). On XLA:CPU a lax.scan over the steps
# runs these convolutions an order of magnitude slower than separate step calls.
@functools.partial(jax.jit, static_argnums=0)
def _train_step(
    feature_dim, params, opt_state, data_x, data_y, batch_idx, noise_key, step, rate, noise_std
):
    model = DigitClassifier(feature_dim=feature_dim)
    x = data_x[batch_idx]
    y = data_y[batch_idx]
    key = jax.random.fold_in(noise_key, step)
    x = x + noise_std * jax.random.normal(key, x.shape, x.dtype)

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    updates = jax.tree_util.tree_map(lambda u: -rate * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss


def train_digit_classifier(
    images: Any,
    labels: Any,
    *,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    noise_std: float = 0.1,
    feature_dim: int = DEFAULT_FEATURE_DIM,
) -> dict:
    """Train a ``DigitClassifier`` with Adam (cosine-decayed learning rate) and cross-entropy.

    Each training batch gets Gaussian pixel noise of std ``noise_std`` (0 disables
    it), which makes the features less brittle on slightly-off generated samples.
    Each step is one jitted call; the run is deterministic given ``seed``.
    Returns the variables dict ``{"params": ...}``.
    """
    images = _as_images(images)
    num = images.shape[0]
    labels = _as_labels(labels, num)
    if num == 0:
        raise ValueError("train_digit_classifier needs at least one training image, got 0")
    if steps < 1 or batch_size < 1:
        raise ValueError(
            f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001 or not np.isfinite(images).all():
        raise ValueError(
            f"training images must be scaled to [-1, 1] (e.g. pixels / 16 * 2 - 1 for "
            f"sklearn digits), got value range [{lo}, {hi}]"
        )

    variables = _init_variables(seed, feature_dim)
    # Adam with a cosine-decayed step size (to 10% of learning_rate); the per-step
    # rates are precomputed so the jitted step below is shared across calls.
    schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=steps, alpha=0.1)
    rates = np.asarray(schedule(np.arange(steps)), dtype=np.float32)
    params = variables["params"]
    opt_state = _ADAM.init(params)

    indices = _batch_indices(np.random.default_rng(seed), num, steps, batch_size)
    noise_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    data_x = jnp.asarray(images)
    data_y = jnp.asarray(labels)
    noise = np.float32(noise_std)

    losses = []
    for step in range(steps):
        params, opt_state, loss = _train_step(
            feature_dim,
            params,
            opt_state,
            data_x,
            data_y,
            indices[step],
            noise_key,
            np.int32(step),
            rates[step],
            noise,
        )
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses))
    if not np.isfinite(losses).all():
        raise FloatingPointError("train_digit_classifier: the training loss became non-finite")
    logger.info("digit classifier: %d steps, final loss %.4f", steps, float(losses[-10:].mean()))
    return {"params": jax.device_get(params)}


# ---------------------------------------------------------------------- inference
def classify(
    params: Mapping[str, Any], images: Any, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, 10] and features [N, feature_dim] (NumPy float32) for every image.

    Runs a jitted forward pass in batches of ``batch_size``; the ragged last batch
    is zero-padded to the batch shape (no recompilation) and the padding dropped,
    so exactly N rows come back.
    """
    images = _as_images(images)
    feature_dim = _feature_dim_of(params)
    num = images.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num == 0:
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, feature_dim), np.float32)
    batch_size = min(int(batch_size), num)
    logits_out, features_out = [], []
    for start in range(0, num, batch_size):
        batch = images[start : start + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            pad = np.zeros((batch_size - real,) + IMAGE_SHAPE, np.float32)
            batch = np.concatenate([batch, pad], axis=0)
        logits, features = _forward(feature_dim, params, jnp.asarray(batch))
        logits_out.append(np.asarray(logits)[:real])
        features_out.append(np.asarray(features)[:real])
    return np.concatenate(logits_out, axis=0), np.concatenate(features_out, axis=0)


def reference_statistics(
    params: Mapping[str, Any], real_images: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean [D] and covariance [D, D] (float64) of real images, for ``digit_metrics``."""
    _, features = classify(params, real_images)
    return feature_statistics(features)


def digit_metrics(
    params: Mapping[str, Any],
    generated_images: Any,
    prompted_labels: Any,
    reference_stats: tuple[Any, Any],
) -> dict:
    """Demo metric for generated digits.

    Returns ``{"fd": float, "accuracy": float, "num_samples": int}``: the Fréchet
    distance between the generated images' classifier features and
    ``reference_stats = (mu, sigma)`` (see ``reference_statistics``), and the fraction
    of generated images whose predicted class equals the prompted label.
    Needs at least two generated images.
    """
    images = _as_images(generated_images, "generated_images")
    num = images.shape[0]
    labels = _as_labels(prompted_labels, num, "prompted_labels")
    if num < 2:
        raise ValueError(f"digit_metrics needs at least 2 generated images, got {num}")
    mu_ref, sigma_ref = reference_stats
    logits, features = classify(params, images)
    mu, sigma = feature_statistics(features)
    fd = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
    return {"fd": fd, "accuracy": accuracy, "num_samples": int(num)}


# ---------------------------------------------------------------------- caching
def _data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return digest.hexdigest()


def load_or_train_classifier(
    cache_dir: str | os.PathLike,
    images: Any,
    labels: Any,
    *,
    seed: int = 0,
    **train_kwargs: Any,
) -> dict:
    """Load the cached classifier from ``cache_dir`` or train (and cache) a new one.

    The cache is ``digit_classifier.msgpack`` (Flax-serialised variables) plus
    ``digit_classifier.json`` (the training configuration, a fingerprint of the
    training data, the training accuracy and the training time). The cache is
    reused only if its recorded configuration (seed, steps, batch size, learning
    rate, noise, feature dim) and data fingerprint match this call; otherwise the
    classifier is retrained and the cache overwritten. Both files are written
    atomically (``monitoring.write_bytes_atomic``; ``cache_dir`` may be ``gs://``),
    weights first, so an interrupted write never pairs new metadata with old weights.
    ``train_kwargs`` are passed to ``train_digit_classifier``.
    """
    images = _as_images(images)
    labels = _as_labels(labels, images.shape[0])
    unknown = set(train_kwargs) - {
        "steps",
        "batch_size",
        "learning_rate",
        "noise_std",
        "feature_dim",
    }
    if unknown:
        raise TypeError(
            f"load_or_train_classifier got unexpected keyword argument(s) {sorted(unknown)}"
        )
    config = {
        "seed": int(seed),
        "steps": int(train_kwargs.get("steps", 1500)),
        "batch_size": int(train_kwargs.get("batch_size", 128)),
        "learning_rate": float(train_kwargs.get("learning_rate", 1e-3)),
        "noise_std": float(train_kwargs.get("noise_std", 0.1)),
        "feature_dim": int(train_kwargs.get("feature_dim", DEFAULT_FEATURE_DIM)),
        "data_sha256": _data_fingerprint(images, labels),
    }

    cache_dir = os.fspath(cache_dir)
    weights_path = os.path.join(cache_dir, CLASSIFIER_FILENAME)
    meta_path = os.path.join(cache_dir, METADATA_FILENAME)

    if epath.Path(weights_path).exists():
        reason = None
        try:
            meta = json.loads(epath.Path(meta_path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta, reason = None, f"{meta_path} is missing or unreadable"
        if meta is not None:
            stale = {k: (meta.get(k), v) for k, v in config.items() if meta.get(k) != v}
            if stale:
                reason = (
                    "cached classifier was trained with a different configuration: "
                    + ", ".join(
                        f"{k}={old!r} (now {new!r})"
                        if k != "data_sha256"
                        else "different training data"
                        for k, (old, new) in stale.items()
                    )
                )
        if reason is None:
            template = _init_variables(config["seed"], config["feature_dim"])
            try:
                params = flax.serialization.from_bytes(
                    template, epath.Path(weights_path).read_bytes()
                )
                return jax.device_get(params)
            except Exception as err:  # corrupt / incompatible file: retrain below
                reason = f"could not load {weights_path}: {err}"
        logger.warning("digit classifier cache not reused (%s); retraining", reason)

    start = time.perf_counter()
    params = train_digit_classifier(
        images,
        labels,
        seed=config["seed"],
        steps=config["steps"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        noise_std=config["noise_std"],
        feature_dim=config["feature_dim"],
    )
    train_seconds = time.perf_counter() - start
    logits, _ = classify(params, images)
    train_accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))

    monitoring.write_bytes_atomic(weights_path, flax.serialization.to_bytes(params))
    meta = dict(
        config,
        train_accuracy=train_accuracy,
        num_train=int(images.shape[0]),
        train_seconds=round(train_seconds, 3),
    )
    monitoring.write_bytes_atomic(
        meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
    )
    return params
