"""Tests for scflow_jax.models.vae (diffusers AutoencoderKL in Flax and its converter)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scflow_jax.models import weights
from scflow_jax.models.vae import (
    VAE,
    DiagonalGaussian,
    VAEConfig,
    load_vae,
    rename_legacy_attention_keys,
)
from vae_testlib import TINY, torch_vae

PARITY_ATOL = 1e-4  # max abs error, float32


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    model = torch_vae()
    model.save_pretrained(str(folder / "vae"))
    return model, str(folder)


def _images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_config_from_diffusers_dict():
    d = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [128, 256, 512, 512],
        "sample_size": 256,
        "force_upcast": True,
        "latents_mean": None,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    cfg = VAEConfig.from_dict(d)
    assert cfg == VAEConfig(sample_size=256)
    assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 8
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict({**d, "up_block_types": ["UpDecoderBlock2D"] * 3})
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig(act_fn="tanh")


def test_shapes_scaling_and_posterior():
    vae = VAE(VAEConfig(**TINY))
    params = vae.init(jax.random.PRNGKey(0))
    x = jnp.asarray(_images())
    mean, logvar = vae.encode(params, x)
    assert mean.shape == logvar.shape == (2, 8, 8, 4)
    assert float(logvar.min()) >= -30 and float(logvar.max()) <= 20
    # The scaling factor is applied once: images_to_latents(mean) == scaling_factor * encode mean.
    z = vae.images_to_latents(params, x)
    np.testing.assert_allclose(np.asarray(z), 0.18215 * np.asarray(mean), rtol=1e-6, atol=1e-7)
    rec = vae.latents_to_images(params, z)
    np.testing.assert_allclose(
        np.asarray(rec), np.clip(np.asarray(vae.decode(params, mean)), -1, 1), rtol=1e-5, atol=1e-5
    )
    assert rec.shape == x.shape and float(jnp.abs(rec).max()) <= 1.0
    # Posterior sample: mean + std * eps with the given key.
    post = DiagonalGaussian(mean, logvar)
    s1 = vae.images_to_latents(params, x, jax.random.PRNGKey(3))
    eps = jax.random.normal(jax.random.PRNGKey(3), mean.shape)
    np.testing.assert_allclose(
        np.asarray(s1), 0.18215 * np.asarray(mean + post.std * eps), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(np.asarray(s1), np.asarray(z))
    with pytest.raises(ValueError, match="NHWC"):
        vae.encode(params, jnp.zeros((1, 3, 16, 16)))
    # shift_factor (SD3-style VAEs) enters the same one place.
    shifted = VAE(VAEConfig(**TINY, shift_factor=0.5))
    np.testing.assert_allclose(
        np.asarray(shifted.images_to_latents(params, x)),
        0.18215 * (np.asarray(mean) - 0.5),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bf16_and_remat_keep_the_tree():
    cfg = VAEConfig(**TINY)
    params = VAE(cfg).init(jax.random.PRNGKey(1))
    x = jnp.asarray(_images())
    ref = VAE(cfg).decode(params, VAE(cfg).encode(params, x).mean)
    remat = VAE(cfg, remat=True)
    assert jax.tree.structure(remat.param_shapes()) == jax.tree.structure(params)
    np.testing.assert_allclose(
        np.asarray(remat.decode(params, remat.encode(params, x).mean)), np.asarray(ref), atol=1e-5
    )

    def loss(p):
        return jnp.mean(remat.decode(p, jnp.ones((1, 8, 8, 4))) ** 2)

    grads = jax.grad(loss)(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    bf16 = VAE(cfg, dtype=jnp.bfloat16)
    out = bf16.decode(params, bf16.encode(params, x).mean)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


@pytest.mark.parity
def test_parity_with_diffusers(saved_vae):
    import torch

    model, folder = saved_vae
    vae, params = load_vae(folder)  # pipeline folder: uses vae/
    assert vae.config == VAEConfig(**TINY)
    x = _images(n=2, size=16)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist  # NHWC -> NCHW
        ref_mean = post.mean.numpy().transpose(0, 2, 3, 1)
        ref_logvar = post.logvar.numpy().transpose(0, 2, 3, 1)
        z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
        ref_dec = (
            model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2)))
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    mean, logvar = vae.encode(params, x)
    dec = vae.decode(params, z)
    assert np.max(np.abs(np.asarray(mean) - ref_mean)) <= PARITY_ATOL
    assert np.max(np.abs(np.asarray(logvar) - ref_logvar)) <= PARITY_ATOL
    assert np.max(np.abs(np.asarray(dec) - ref_dec)) <= PARITY_ATOL
    assert np.std(ref_dec) > 0.1  # the comparison is not between near-constant outputs


@pytest.mark.parity
def test_legacy_attention_names_load(saved_vae, tmp_path):
    from diffusers import AutoencoderKL

    model, folder = saved_vae
    _, params = load_vae(folder)
    source = weights.read_safetensors(
        os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    )
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in source.items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = np.array(value)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert set(rename_legacy_attention_keys(legacy)) == set(source)
    legacy_dir = tmp_path / "legacy_vae"
    legacy_dir.mkdir()
    shutil.copy(os.path.join(folder, "vae", "config.json"), legacy_dir / "config.json")
    weights.write_safetensors(str(legacy_dir / "diffusion_pytorch_model.safetensors"), legacy)
    _, legacy_params = load_vae(str(legacy_dir))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(legacy_params)):
        np.testing.assert_array_equal(a, b)
    # diffusers itself accepts the same legacy file and renames the same way.
    reloaded = AutoencoderKL.from_pretrained(str(legacy_dir)).eval()
    for k, v in reloaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), model.state_dict()[k].numpy())


@pytest.mark.parity
def test_bin_and_fp16_variants(saved_vae, tmp_path):
    model, folder = saved_vae
    _, params = load_vae(folder)
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert os.path.exists(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    _, bin_params = load_vae(str(tmp_path / "bin"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(bin_params)):
        np.testing.assert_array_equal(a, b)
    fp16_dir = tmp_path / "fp16"
    fp16_dir.mkdir()
    shutil.copy(os.path.join(folder, "vae", "config.json"), fp16_dir / "config.json")
    source = weights.read_safetensors(
        os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    )
    weights.write_safetensors(
        str(fp16_dir / "diffusion_pytorch_model.fp16.safetensors"),
        {k: np.asarray(v, np.float16) for k, v in source.items()},
    )
    _, fp16_params = load_vae(str(fp16_dir))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fp16_params)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a, np.float16).astype(np.float32), b)


def test_bad_folders(tmp_path):
    cfg = VAEConfig(**TINY)
    vae = VAE(cfg)
    params = vae.init(jax.random.PRNGKey(0))
    flat = {vae_key: np.asarray(v) for vae_key, v in _to_state_dict(params).items()}
    folder = tmp_path / "vae"
    folder.mkdir()
    with pytest.raises(weights.WeightsError, match="config.json not found"):
        load_vae(str(folder))
    config = {
        "_class_name": "AutoencoderKL",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match="diffusion_pytorch_model.safetensors"):
        load_vae(str(folder))
    weights.write_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), flat)
    _, loaded = load_vae(str(folder))  # round trip of our own export
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # Config/weights mismatch: two resnets per level expected, one present -> the missing keys are
    # named.
    (folder / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(
        weights.WeightsError, match=r"missing key\(s\): decoder\.up_blocks\.0\.resnets\.2"
    ):
        load_vae(str(folder))
    # Wider channels: shape mismatches named.
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    with pytest.raises(weights.WeightsError, match=r"shape mismatch.*decoder\.conv_in\.weight"):
        load_vae(str(folder))
    # allow_partial fills the missing/mismatched leaves instead.
    (folder / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    partial_vae, partial = load_vae(str(folder), allow_partial=True)
    assert partial_vae.config.layers_per_block == 2
    assert "resnets_2" in partial["decoder"]["up_blocks_0"]
    # Corrupted (truncated) safetensors.
    (folder / "config.json").write_text(json.dumps(config))
    blob = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(weights.WeightsError, match="truncated or corrupted"):
        load_vae(str(folder))


def _to_state_dict(params):
    """Our tree -> a diffusers-named state dict in PyTorch layout (the inverse of the converter)."""
    from scflow_jax.models.vae import vae_state_dict_key

    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[vae_state_dict_key(path)] = value
    return out
