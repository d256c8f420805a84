"""scikit-learn's 8x8 digits as a tiny text-to-image task (the embedded default).

Ships inside the scikit-learn wheel, so nothing is downloaded. Each image is captioned
"a handwritten digit <name>"; the empty prompt is the null condition for guidance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = len(DIGIT_NAMES)
NULL_LABEL = NUM_CLASSES  # index of the empty prompt in the condition table
IMAGE_SHAPE = (8, 8, 1)


def caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def prompts() -> list[str]:
    """The condition table's prompts: one per digit, then the empty (null) prompt."""
    return [caption(i) for i in range(NUM_CLASSES)] + [""]


def vocabulary() -> list[str]:
    return ["a", "handwritten", "digit", *DIGIT_NAMES]


@dataclasses.dataclass
class DigitsSplit:
    train_images: np.ndarray  # [N, 8, 8, 1] float32 in [-1, 1]
    train_labels: np.ndarray  # [N] int32
    heldout_images: np.ndarray
    heldout_labels: np.ndarray


def load_digits_split(heldout_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Digits scaled to [-1, 1] (NHWC), split by a seeded, class-stratified permutation."""
    from sklearn.datasets import load_digits  # deferred: only the embedded default needs it

    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"config.data.heldout_fraction={heldout_fraction} must be in (0, 1)")
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        heldout[idx[: int(round(heldout_fraction * len(idx)))]] = True
    return DigitsSplit(images[~heldout], labels[~heldout], images[heldout], labels[heldout])
