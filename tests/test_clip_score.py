"""CLIP score against transformers' torch CLIP on a tiny random model."""

import numpy as np
import pytest

import clip_testlib as lib
from scflow_jax.evaluation.clip_score import CLIPScore, CLIPScoreAccumulator, clip_score
from scflow_jax.models.clip import load_clip_tokenizer
from scflow_jax.models.clip_vision import load_clip

CAPTIONS = ["the cat", "a dog", "the dog", "cat", "dog dog the cat", "a cat and the dog"]


def test_accumulator_forms():
    acc = CLIPScoreAccumulator()
    acc.update([0.3, -0.1])
    acc.update(np.array([[0.2]]))
    r = acc.result()
    assert r["count"] == 3
    assert r["clip_score"] == pytest.approx(100 * (0.3 + 0 + 0.2) / 3)
    assert r["clip_score_torchmetrics"] == pytest.approx(100 * (0.3 - 0.1 + 0.2) / 3)
    assert r["mean_cosine"] == pytest.approx(0.4 / 3)
    neg = CLIPScoreAccumulator()
    neg.update([-0.2, -0.4])
    assert neg.result()["clip_score_torchmetrics"] == 0.0 and neg.result()[
        "mean_cosine"
    ] == pytest.approx(-0.3)
    merged = acc.merge(neg).result()
    assert merged["count"] == 5 and merged["mean_cosine"] == pytest.approx((0.4 - 0.6) / 5)
    with pytest.raises(ValueError, match="zero samples"):
        CLIPScoreAccumulator().result()


@pytest.mark.parity
def test_clip_score_matches_transformers(tmp_path):
    import torch
    from transformers import CLIPImageProcessor, CLIPTokenizer

    hf = lib.clip_model(seed=1)
    hf.save_pretrained(str(tmp_path / "clip"))
    lib.write_tokenizer(str(tmp_path / "clip"))
    clip, params = load_clip(str(tmp_path / "clip"))
    tokenizer = load_clip_tokenizer(str(tmp_path / "clip"), max_length=16)

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (len(CAPTIONS), 32, 32, 3)).astype(
        np.float32
    )  # decoder range, shrunk to 16 px
    # Reference: transformers' processor and model, as torchmetrics uses them
    # (float images in [0, 1]).
    processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    pixels = processor(
        images=torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2),
        do_rescale=False,
        return_tensors="pt",
    )["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(str(tmp_path / "clip"), local_files_only=True)(
        CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        image_embeds = hf.get_image_features(pixel_values=pixels).pooler_output
        text_embeds = hf.get_text_features(**tokens).pooler_output
    ref = (
        torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        .numpy()
        .astype(np.float64)
    )
    # A random model whose mean cosine is negative but not every cosine: the two clamping forms
    # differ.
    assert np.mean(ref) < 0 < np.max(ref)

    scorer = CLIPScore(clip, params, tokenizer)
    got = np.concatenate(
        [scorer.update(images[:4], CAPTIONS[:4]), scorer.update(images[4:], CAPTIONS[4:])]
    )
    assert np.max(np.abs(got - ref)) <= 1e-4  # parity tolerance (float32); measured 2.4e-7
    r = scorer.result()
    assert r["count"] == len(CAPTIONS)
    assert r["clip_score"] == pytest.approx(100 * np.mean(np.maximum(ref, 0)), abs=1e-2)
    assert r["clip_score_torchmetrics"] == pytest.approx(100 * max(np.mean(ref), 0), abs=1e-2)
    assert r["mean_cosine"] == pytest.approx(np.mean(ref), abs=1e-4)
    one_shot = clip_score(clip, params, tokenizer, images, CAPTIONS, batch_size=4)
    assert one_shot["mean_cosine"] == pytest.approx(r["mean_cosine"], abs=1e-6)
    # [0, 1] images give the same cosines as the same images in [-1, 1].
    zero_one = clip_score(
        clip, params, tokenizer, (images + 1) / 2, CAPTIONS, value_range=(0.0, 1.0)
    )
    assert zero_one["mean_cosine"] == pytest.approx(r["mean_cosine"], abs=1e-5)
    with pytest.raises(ValueError, match="captions"):
        scorer.update(images[:2], CAPTIONS[:3])
