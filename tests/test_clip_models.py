"""Loading CLIP (text tower, vision tower, two-tower model), the tokenizer and the image
preprocessing."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_testlib as lib
from scflow_jax.models import weights
from scflow_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextTransformer,
    load_clip_text,
    load_clip_tokenizer,
)
from scflow_jax.models.clip_vision import (
    CLIP,
    CLIPConfig,
    CLIPVisionConfig,
    load_clip,
    preprocess_images,
)

PARITY_ATOL = 1e-4  # max abs error, float32


def _ids_and_mask(batch=3, seq=10, eos_positions=(4, 9, 2), seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, lib.BOS, size=(batch, seq)).astype(np.int32)
    ids[:, 0] = lib.BOS
    for b, p in enumerate(eos_positions):
        ids[b, p:] = lib.EOS  # padded with eos after the first one, as the tokenizer does
    mask = (np.arange(seq)[None] <= np.asarray(eos_positions)[:, None]).astype(np.int32)
    return ids, mask


def _pixels_nchw(batch=2, size=16, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _max_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref.detach().numpy())))


@pytest.mark.parity
def test_text_with_projection_parity(tmp_path):
    import torch

    hf = lib.text_with_projection()
    hf.save_pretrained(str(tmp_path))
    ids, mask = _ids_and_mask()
    clip, params = load_clip(str(tmp_path))
    assert clip.config.vision is None and clip.config.projection_dim == lib.PROJECTION_DIM
    assert set(params) == {"text_model", "text_projection"}
    config, text_params = load_clip_text(str(tmp_path))  # the same tower for SD conditioning
    for m in (None, mask):
        torch_mask = None if m is None else torch.from_numpy(m).long()
        with torch.no_grad():
            out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch_mask)
            hf_pooled = hf.text_model(
                input_ids=torch.from_numpy(ids).long(), attention_mask=torch_mask
            ).pooler_output
        hidden, pooled = CLIPTextTransformer(config).apply({"params": text_params}, ids, m)
        assert _max_err(hidden, out.last_hidden_state) <= PARITY_ATOL
        assert _max_err(pooled, hf_pooled) <= PARITY_ATOL
        pooled, projected = clip.text_features(params, ids, m)
        assert _max_err(pooled, hf_pooled) <= PARITY_ATOL
        assert _max_err(projected, out.text_embeds) <= PARITY_ATOL
        assert float(np.std(out.text_embeds.numpy())) > 0.1


@pytest.mark.parity
def test_vision_with_projection_parity(tmp_path):
    import torch

    hf = lib.vision_with_projection()
    hf.save_pretrained(str(tmp_path))
    clip, params = load_clip(str(tmp_path))
    assert clip.config.text is None and clip.config.vision == CLIPVisionConfig(**lib.VISION)
    pixels = _pixels_nchw()
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pixels))
        hf_pooled = hf.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output
    pooled, projected = clip.image_features(params, pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    assert _max_err(pooled, hf_pooled) <= PARITY_ATOL
    assert _max_err(projected, out.image_embeds) <= PARITY_ATOL
    with pytest.raises(ValueError, match="no text tower"):
        clip.text_features(params, np.zeros((1, 4), np.int32))


@pytest.mark.parity
def test_full_clip_model_parity_and_text_loader_layouts(tmp_path):
    import torch

    hf = lib.clip_model(seed=1)
    hf.save_pretrained(str(tmp_path / "clip"))
    clip, params = load_clip(str(tmp_path / "clip"))
    assert clip.config == CLIPConfig(
        text=CLIPTextConfig.from_dict(lib.TEXT),
        vision=CLIPVisionConfig(**lib.VISION),
        projection_dim=lib.PROJECTION_DIM,
    )
    ids, mask = _ids_and_mask()
    pixels = _pixels_nchw(seed=2)
    with torch.no_grad():
        text = hf.text_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        )
        vision = hf.vision_model(pixel_values=torch.from_numpy(pixels))
        text_embeds = hf.text_projection(text.pooler_output)
        image_embeds = hf.visual_projection(vision.pooler_output)
    t_pooled, t_proj = clip.text_features(params, ids, mask)
    v_pooled, v_proj = clip.image_features(params, pixels.transpose(0, 2, 3, 1))
    assert _max_err(t_pooled, text.pooler_output) <= PARITY_ATOL
    assert _max_err(t_proj, text_embeds) <= PARITY_ATOL
    assert _max_err(v_pooled, vision.pooler_output) <= PARITY_ATOL
    assert _max_err(v_proj, image_embeds) <= PARITY_ATOL

    # load_clip_text reads the text tower of: the full CLIPModel, a diffusers pipeline's
    # text_encoder/ (a CLIPTextModel; transformers 5 saves its keys without the text_model. prefix)
    # and a CLIPTextModel file as older transformers wrote it (SD 1.5's text_encoder:
    # text_model. prefix and a position_ids buffer).
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(hf.config.text_config)
    encoder.load_state_dict(hf.text_model.state_dict())
    encoder.save_pretrained(str(tmp_path / "pipeline" / "text_encoder"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tmp_path / "pipeline" / "text_encoder" / "config.json", legacy / "config.json")
    source = weights.read_safetensors(
        str(tmp_path / "pipeline" / "text_encoder" / "model.safetensors")
    )
    assert not any(k.startswith("text_model.") for k in source)
    prefixed = {f"text_model.{k}": np.array(v) for k, v in source.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    weights.write_safetensors(str(legacy / "model.safetensors"), prefixed)
    for folder in (tmp_path / "clip", tmp_path / "pipeline", legacy):
        config, text_params = load_clip_text(str(folder))
        assert config == clip.config.text
        _, pooled = CLIPTextTransformer(config).apply({"params": text_params}, ids, mask)
        assert _max_err(pooled, text.pooler_output) <= PARITY_ATOL, folder


def test_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    folder = lib.write_tokenizer(str(tmp_path / "pipeline" / "tokenizer"))
    tok = load_clip_tokenizer(
        str(tmp_path / "pipeline"), max_length=8
    )  # pipeline root: uses tokenizer/
    ids, mask = tok(["the cat", "A dog", "cat cat cat cat cat cat cat cat"])
    v = {t: i for i, t in enumerate(lib.VOCAB)}
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 8)
    assert ids[0].tolist() == [lib.BOS, v["the</w>"], v["cat</w>"]] + [lib.EOS] * 5
    assert ids[1].tolist() == [lib.BOS, v["a</w>"], v["dog</w>"]] + [lib.EOS] * 5  # lower-cased
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (
        ids[2].tolist() == [lib.BOS] + [v["cat</w>"]] * 6 + [lib.EOS] and mask[2].all()
    )  # truncated, eos kept
    assert tok.eos_token_id == lib.EOS
    reference = CLIPTokenizer.from_pretrained(folder, local_files_only=True)(
        ["the cat", "A dog", "cat cat cat cat cat cat cat cat"],
        padding="max_length",
        max_length=8,
        truncation=True,
    )
    np.testing.assert_array_equal(ids, np.asarray(reference["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(reference["attention_mask"]))
    assert load_clip_tokenizer(folder)(["the"])[0].shape == (1, 77)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(weights.WeightsError, match=f"{empty}.*no tokenizer files"):
        load_clip_tokenizer(str(empty))


def _smooth_images(rng, n, h, w):
    coarse = rng.uniform(0, 1, (n, h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    img = np.asarray(jax.image.resize(jnp.asarray(coarse), (n, h, w, 3), "linear"))
    return np.clip(img + 0.03 * rng.normal(size=img.shape), 0, 1)


@pytest.mark.parity
def test_preprocessing_matches_clip_image_processor():
    import torch
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    lo = (0 - np.asarray(processor.image_mean)) / np.asarray(processor.image_std)
    hi = (1 - np.asarray(processor.image_mean)) / np.asarray(processor.image_std)
    rng = np.random.default_rng(0)
    for h, w in ((512, 512), (160, 100), (64, 64)):  # shrink, non-square with a crop, enlarge
        # Float input: the same resize kernel; we clip the bicubic overshoot (the processor does not
        # on floats).
        x = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        ref = processor(
            images=torch.from_numpy(x.transpose(0, 3, 1, 2)), do_rescale=False, return_tensors="np"
        )["pixel_values"].transpose(0, 2, 3, 1)
        ours = np.asarray(preprocess_images(jnp.asarray(x), value_range=(0.0, 1.0)))
        assert ours.shape == (2, 224, 224, 3)
        assert np.max(np.abs(ours - np.clip(ref, lo, hi))) <= 1e-4
        # uint8 input (the processor's usual PIL-like path) on smooth images: bounded by the uint8
        # rounding.
        u8 = np.round(_smooth_images(rng, 2, h, w) * 255).astype(np.uint8)
        ref = processor(images=list(u8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = np.asarray(preprocess_images(jnp.asarray(u8 / 127.5 - 1.0)))  # [-1, 1] input
        diff = np.abs(ours - ref)
        assert diff.max() <= 0.03 and diff.mean() <= 0.006, (h, w, diff.max(), diff.mean())


def test_vision_tower_shapes_and_errors():
    clip = CLIP(CLIPConfig(text=None, vision=CLIPVisionConfig(**lib.VISION), projection_dim=8))
    params = clip.init(jax.random.PRNGKey(0))
    assert params["vision_model"]["pre_layrnorm"]["scale"].shape == (32,)
    assert params["vision_model"]["embeddings"]["class_embedding"].shape == (32,)
    assert "bias" not in params["vision_model"]["embeddings"]["patch_embedding"]
    assert "bias" not in params["visual_projection"]
    pooled, projected = clip.image_features(params, jnp.zeros((3, 16, 16, 3)))
    assert pooled.shape == (3, 32) and projected.shape == (3, 8)
    with pytest.raises(ValueError, match="patches"):
        clip.image_features(params, jnp.zeros((1, 24, 24, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        clip.image_features(params, jnp.zeros((1, 3, 16, 16)))
    bf16 = CLIP(clip.config, dtype=jnp.bfloat16)
    p16 = bf16.image_features(params, jnp.ones((1, 16, 16, 3)))[1]
    p32 = clip.image_features(params, jnp.ones((1, 16, 16, 3)))[1]
    assert p16.dtype == jnp.float32 and float(jnp.max(jnp.abs(p16 - p32))) < 0.05


def test_bad_clip_folders(tmp_path):
    clip = CLIP(CLIPConfig(text=CLIPTextConfig.from_dict(lib.TEXT), vision=None, projection_dim=8))
    params = clip.init(jax.random.PRNGKey(0))
    from flax import traverse_util

    from scflow_jax.models.clip import clip_key_function

    key_for = clip_key_function("")
    state = {
        key_for(path): np.asarray(v).T if path[-1] == "kernel" else np.asarray(v)
        for path, v in traverse_util.flatten_dict(params).items()
    }
    folder = tmp_path / "text"
    folder.mkdir()
    with pytest.raises(weights.WeightsError, match="config.json not found"):
        load_clip(str(folder))
    config = {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "projection_dim": 8,
        **lib.TEXT,
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match="model.safetensors"):
        load_clip(str(folder))
    weights.write_safetensors(str(folder / "model.safetensors"), state)
    _, loaded = load_clip(str(folder))  # our own export round-trips
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), b)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(
        weights.WeightsError, match=r"missing key\(s\): text_model\.encoder\.layers\.2\."
    ):
        load_clip(str(folder))
    with pytest.raises(
        weights.WeightsError, match=r"missing key\(s\): text_model\.encoder\.layers\.2\."
    ):
        load_clip_text(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "projection_dim": 16}))
    with pytest.raises(weights.WeightsError, match=r"shape mismatch.*text_projection\.weight"):
        load_clip(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[:-100])
    with pytest.raises(weights.WeightsError, match="truncated or corrupted"):
        load_clip(str(folder))
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(weights.WeightsError, match="not a valid safetensors"):
        load_clip_text(str(folder))
