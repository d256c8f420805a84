"""Shared helpers of the data-preparation tests (test_data_prepare.py, test_prepare_tfds.py;
not a test module): a few PNGs of assorted sizes and modes, and the references the prepared
records are checked against. The tiny VAE / CLIP text model both use is conftest's ``models``.
"""

import io
import os

import numpy as np
from PIL import Image

from scflow_jax.data import prepare
from scflow_jax.models import clip
from scflow_jax.models.vae import load_vae

SIZE = 16  # the tiny VAE has one downsampling: 8x8x4 latents


def _png_bytes(seed, size=(20, 16), mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


# Non-square, grayscale, RGBA and already-square images; "bad.png" is not an image.
IMAGES = {
    "a.png": _png_bytes(0),
    "b.png": _png_bytes(1, (16, 24), "L"),
    "sub/c.png": _png_bytes(2, (16, 16), "RGBA"),
    "sub/d.png": _png_bytes(3, (33, 17)),
    "sub/e.png": _png_bytes(4, (40, 40)),
}


def reference_posterior(vae_path, payloads):
    vae, params = load_vae(vae_path)
    x = np.stack([prepare.to_model_range(prepare.load_image(p, SIZE)) for p in payloads])
    posterior = vae.encode(params, x)  # unsharded, one call
    return np.asarray(posterior.mean), np.asarray(posterior.std)


def mtimes(output):
    return {
        n: os.stat(os.path.join(output, n)).st_mtime_ns
        for n in os.listdir(output)
        if n.endswith("array_record")
    }


def _tokenize_and_encode(models, captions):
    config, params = clip.load_clip_text(models["text_encoder"])
    ids, _ = clip.load_clip_tokenizer(
        models["tokenizer"], max_length=config.max_position_embeddings
    )(captions)
    return np.asarray(clip.encode_text(params, config, ids))


def check_text_records(ds, models, expected_captions):
    records = [ds[i] for i in range(len(ds))]
    assert [r["caption"] for r in records] == expected_captions
    cond = np.stack([r["cond"] for r in records])
    assert cond.dtype.name == "bfloat16" and cond.shape == (len(records), 16, 32)
    reference = _tokenize_and_encode(models, expected_captions)
    np.testing.assert_allclose(
        cond.astype(np.float32), reference, rtol=1e-2, atol=1e-2
    )  # bf16 storage
    return records
