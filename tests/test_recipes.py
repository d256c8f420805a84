"""The latent recipes (configs/celebahq256.py, configs/t2i_sd15.py) end to end on CPU, through the
real loaders.

Each ``:tiny`` recipe gets tiny random weights written here in the real formats (ADM teacher:
guided-diffusion-named ``.safetensors``; SD teacher: a diffusers UNet folder via ``export_unet_sd``;
VAE: a diffusers AutoencoderKL folder; CLIP: a transformers text-encoder folder and a BPE
tokenizer), then distils a few steps, samples and exports. The dataset is prepared from random
images by --mode=prepare_data (the tiny VAE, and CLIP for captions) and read by ``LatentBatches``;
evaluation runs ``real_eval.evaluate_recipe`` with a tiny feature extractor in place of Inception.
Parity tolerance (export -> diffusers): max abs error <= 1e-4 in float32.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import scflow_testlib
from recipes_testlib import TINY_UNET, TINY_VAE, celeba_config, load_config, t2i_config, write_vae
from scflow_jax import checkpoint, distill, main, precision, sample, sharding, tasks
from scflow_jax.evaluation import fid, frechet, real_eval
from scflow_jax.models import unet_adm, unet_sd, unet_sd_weights
from scflow_jax.tasks import celebahq

TOL = 1e-4  # max abs error, float32 (export parity)


CAPTIONS = ["a cat", "the dog", "a dog", "the cat"]


def prepare_data(config, tmp_path, n: int = 8) -> str:
    """--mode=prepare_data on ``n`` random 64 px images (+ captions for text-to-image) with the
    recipe's VAE (and text encoder): the prepared folder ``LatentBatches`` reads in distillation."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    p = config.data.prepare
    p.input, p.output, p.vae = str(images), str(tmp_path / "prepared"), config.model.vae_path
    if p.kind == "text_to_image":
        p.text_encoder, p.tokenizer = config.model.text_encoder_path, config.model.tokenizer_path
    assert main.run(config, str(tmp_path / "prepare_wd"), "prepare_data") == 0
    config.data.path = p.output
    return p.output


FEATURE_DIM = 6


def evaluate_tiny(config, task, workdir, tmp_path):
    """--mode=evaluate's library call on the distilled student, with a tiny random feature extractor
    standing in for Inception (real_eval's own tests cover the Inception path): returns the rows."""
    rng = np.random.default_rng(4)
    reference = str(tmp_path / "reference.npz")
    frechet.save_statistics(
        reference, rng.normal(size=FEATURE_DIM) * 0.1, np.eye(FEATURE_DIM) * 0.05
    )
    config.eval.fid_reference = reference
    if not task.unconditional:
        captions = tmp_path / "captions.txt"
        captions.write_text("\n".join(CAPTIONS * (config.eval.num_samples // len(CAPTIONS))) + "\n")
        config.eval.prompts_file = str(captions)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    size = config.data.image_size
    w = rng.normal(size=(size * size * 3, FEATURE_DIM)).astype(np.float32) / size
    extractor = fid.FeatureExtractor(
        lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p), w, mesh, config.eval.batch_size
    )
    return real_eval.evaluate_recipe(
        config, workdir, task, feature_extractor=extractor, feature_dim=FEATURE_DIM, mesh=mesh
    )


def _check_rows(rows, config):
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("student", s) for s in config.eval.student_steps
    ]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)


def _tree_max_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["celebahq256", "t2i_sd15"])
def test_configs_carry_the_published_settings(name):
    c = load_config(name, None)
    spec = {
        "celebahq256": dict(
            delta=0.1,
            tau=0.4,
            warm=(1000, 0, 1000),
            lr=(2e-5, 1e-4),
            wd=0.0,
            cfg=1.0,
            r1=1.0,
            noise=False,
            integer=False,
            batch=64,
            size=256,
        ),
        "t2i_sd15": dict(
            delta=0.1,
            tau=0.1,
            warm=(0, 500, 500),
            lr=(1e-5, 1e-5),
            wd=1e-2,
            cfg=1.5,
            r1=0.0,
            noise=True,
            integer=True,
            batch=40,
            size=512,
        ),
    }[name]
    s = c.scflow
    assert (s.init_threshold, s.trunc_threshold) == (spec["delta"], spec["tau"])
    assert (s.warmup_rf, s.warmup_gan, s.warmup_inv) == spec["warm"]
    assert (c.distill.optimizer.learning_rate, c.disc.optimizer.learning_rate) == spec["lr"]
    assert c.distill.optimizer.weight_decay == c.disc.optimizer.weight_decay == spec["wd"]
    assert (s.target_ema, s.eval_ema, s.teacher_cfg, s.r1_gamma) == (
        0.9,
        0.9999,
        spec["cfg"],
        spec["r1"],
    )
    assert (s.disc_noise_inputs, s.integer_timesteps) == (spec["noise"], spec["integer"])
    assert (c.distill.batch_size, c.data.image_size) == (spec["batch"], spec["size"])
    assert c.model.teacher_path is None and c.model.vae_path is None and c.data.path is None
    if name == "celebahq256":
        assert celebahq.adm_config(c, 4) == unet_adm.ADMConfig.lfm_celeba256()
        assert (c.disc.channel_base, c.disc.channel_max) == (16384, 512)
    else:
        assert (c.disc.head_channels, c.disc.head_groups) == (256, 32)
        assert (c.precision.compute_dtype, c.precision.param_dtype, c.model.remat) == (
            "bfloat16",
            "float32",
            "full",
        )


def test_missing_paths_and_bad_resolution_name_the_field(tmp_path):
    config = load_config("celebahq256")
    with pytest.raises(ValueError, match=r"config\.model\.vae_path is not set"):
        tasks.build_task(config)
    config.model.vae_path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.model\.vae_path="):
        tasks.build_task(config)
    config.model.vae_path = write_vae(str(tmp_path / "vae"))
    task = tasks.build_task(config)
    with pytest.raises(ValueError, match=r"config\.model\.teacher_path is not set"):
        task.load_teacher_params()
    with pytest.raises(ValueError, match=r"config\.data\.path is not set"):
        task.batches(4, seed=0)
    config.data.image_size = 60
    with pytest.raises(ValueError, match=r"config\.data\.image_size=60 .* factor 8"):
        tasks.build_task(config)
    t2i = load_config("t2i_sd15")
    t2i.model.vae_path = config.model.vae_path
    with pytest.raises(ValueError, match=r"config\.model\.teacher_path is not set"):
        tasks.build_task(t2i)


def test_decoder_runs_in_the_configured_decode_dtype(tmp_path):
    """config.precision.decode_dtype sets the VAE decoder's compute dtype; images stay float32 in
    [-1, 1] and a bfloat16 decode stays close to the float32 one."""
    config = load_config("celebahq256")
    config.model.vae_path = write_vae(str(tmp_path / "vae"))
    latents = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, TINY_VAE.latent_channels))
    images = {}
    for name in ("float32", "bfloat16"):
        config.precision.decode_dtype = name
        task = tasks.build_task(config)
        assert task._vae[0].dtype == jnp.dtype(name)
        images[name] = task.decode(latents)
        assert images[name].dtype == jnp.float32 and images[name].shape == (2, 64, 64, 3)
    difference = float(jnp.abs(images["bfloat16"] - images["float32"]).max())
    assert 0 < difference < 0.1
    config.precision.decode_dtype = "float16"
    with pytest.raises(ValueError, match=r"config\.precision\.decode_dtype='float16'"):
        precision.validate(config)


def test_prompts_file_with_empty_lines_names_them(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\nthe dog\n  \na dog\n")
    with pytest.raises(ValueError, match=r"empty line\(s\) 2, 4 "):
        sample.read_prompts([], str(path))
    path.write_text("a cat\nthe dog\n")
    assert sample.read_prompts(["a dog"], str(path)) == ["a dog", "a cat", "the dog"]


# ------------------------------------------------------------------------------------------- celeba
@pytest.mark.slow
def test_celebahq256_tiny_distill_sample_export(tmp_path):
    config = celeba_config(tmp_path)
    task = tasks.build_task(config)
    assert task.unconditional and task.null_cond is None and task.latent_shape == (8, 8, 4)
    teacher = task.load_teacher_params()
    prepare_data(config, tmp_path)
    workdir = str(tmp_path / "run")
    result = distill.distill(config, workdir)
    assert int(result.state.step) == config.distill.num_steps
    student = result.state.ema_params
    assert 0 < _tree_max_diff(student, teacher) < 1.0  # moved, and only a little (eval EMA 0.9999)

    assert main.run(config, workdir, "sample") == 0
    for steps in config.sample.num_steps:
        out = os.path.join(workdir, "samples", f"student_euler_{steps}steps")
        files = sorted(f for f in os.listdir(out) if f != "grid.png")
        assert files == [f"{i:05d}.png" for i in range(config.sample.num_images)]
        assert _png(os.path.join(out, files[0])).shape == (64, 64, 3)
        assert os.path.isfile(os.path.join(out, "grid.png"))

    assert main.run(config, workdir, "export") == 0
    exported = unet_adm.load_unet_adm(
        os.path.join(workdir, "export", "model.safetensors"), task.network_config
    )
    assert _tree_max_diff(exported, student) == 0.0
    _check_rows(evaluate_tiny(config, task, workdir, tmp_path), config)

    other = load_config("celebahq256")
    other.model.vae_path, other.data.path, other.data.image_size = (
        config.model.vae_path,
        config.data.path,
        128,
    )
    with pytest.raises(ValueError, match=r"holds latents of shape \(8, 8, 4\).*image_size=128"):
        tasks.build_task(other).batches(4, seed=0)


def test_the_recipe_student_is_loaded_whole_on_an_fsdp_mesh(tmp_path, monkeypatch):
    """--mode=sample and --mode=evaluate hold the exported student whole
    (sharding.sampler_shardings)."""
    # FSDP's default rules leave the tiny network whole; split even its kernels, as they split the
    # real ones.
    monkeypatch.setattr(
        sharding, "ShardingRules", functools.partial(sharding.ShardingRules, fsdp_min_size=1)
    )
    config = celeba_config(tmp_path)
    config.mesh.update(dict(num_devices=8, fsdp=4))
    task, mesh = tasks.build_task(config), sharding.mesh_from_config(config)
    student = task.load_teacher_params()
    assert any(
        not s.is_fully_replicated for s in jax.tree.leaves(sharding.state_shardings(student, mesh))
    )
    checkpoint.save_params(str(tmp_path / "student"), student)
    loaded = task.load_flow_params(str(tmp_path / "student"), mesh, "student parameters")
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(loaded))
    assert _tree_max_diff(loaded, student) == 0.0


def test_recipe_has_no_teacher_training_stage(tmp_path):
    config = celeba_config(tmp_path)
    with pytest.raises(ValueError, match="pretrained teacher"):
        main.run(config, str(tmp_path / "run"), "train_teacher")


def test_bf16_compute_reaches_the_recipe_sample_and_evaluate_samplers(tmp_path, monkeypatch):
    config = celeba_config(tmp_path)
    config.precision.compute_dtype = "bfloat16"
    config.sample.model = "teacher"
    seen = scflow_testlib.stop_at_sampler(monkeypatch)
    with pytest.raises(scflow_testlib.SamplerReached):
        sample.write_samples(config, str(tmp_path / "run"), None)
    reference = str(tmp_path / "reference.npz")
    frechet.save_statistics(reference, np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM))
    config.eval.update(fid_reference=reference, student_steps=(), teacher_steps=(1,))
    with pytest.raises(scflow_testlib.SamplerReached):
        real_eval.evaluate_recipe(
            config,
            str(tmp_path / "run"),
            tasks.build_task(config),
            feature_extractor=lambda x: x,
            feature_dim=FEATURE_DIM,
        )
    assert seen == [jnp.bfloat16, jnp.bfloat16]


def test_latent_task_serves_any_process_rows(tmp_path, monkeypatch):
    """The batch source gets the rows the mesh places on this process, contiguous or not."""
    from scflow_jax.data import latents

    config = celeba_config(tmp_path)
    config.data.path = str(tmp_path)
    task = tasks.build_task(config)

    class Source:  # a prepared dataset that matches the task
        scaling_factor, latent_shape = task.vae_config.scaling_factor, task.latent_shape
        metadata = {"kind": "latents"}

        def __init__(self, path, global_batch, seed, *, hflip, process_rows):
            self.process_rows = process_rows

    monkeypatch.setattr(latents, "LatentBatches", Source)
    rows = np.array([0, 2, 4, 6])  # interleaved with another process's 1, 3, 5, 7
    assert task.batches(8, seed=0, process_rows=rows).process_rows is rows


# ---------------------------------------------------------------------------------------------- t2i
@pytest.fixture(scope="module")
def t2i_assets(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("t2i")
    config = t2i_config(tmp_path)
    return config, tasks.build_task(config), tmp_path


@pytest.mark.slow
@pytest.mark.heavy
def test_t2i_tiny_distill_sample_export(t2i_assets, tmp_path):
    config, task, _ = t2i_assets
    prepare_data(config, tmp_path)
    workdir = str(tmp_path / "run")
    result = distill.distill(config, workdir)
    assert not task.unconditional and task.latent_shape == (8, 8, 4)
    np.testing.assert_allclose(task.null_cond, task.encode_prompts([""])[0])
    assert int(result.state.step) == config.distill.num_steps
    assert _tree_max_diff(result.state.ema_params, task.load_teacher_params()) > 0

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\nthe dog\na dog\n")
    config.sample.prompts_file = str(prompts)
    assert main.run(config, workdir, "sample") == 0
    out = os.path.join(workdir, "samples", "student_euler_1steps")
    per = config.sample.num_per_prompt
    assert sorted(os.listdir(out)) == sorted(
        ["grid.png", "prompts.txt"] + [f"{i:03d}_{j:02d}.png" for i in range(3) for j in range(per)]
    )
    grid = _png(os.path.join(out, "grid.png"))
    assert grid.shape == (3 * 65 + 1, per * 65 + 1, 3)

    assert main.run(config, workdir, "export") == 0
    loaded_config, exported = unet_sd_weights.load_unet_sd(os.path.join(workdir, "export", "unet"))
    assert loaded_config == TINY_UNET
    assert _tree_max_diff(exported, result.state.ema_params) == 0.0
    _check_rows(evaluate_tiny(config, task, workdir, tmp_path), config)


@pytest.mark.parity
def test_t2i_export_matches_diffusers(t2i_assets, tmp_path):
    """Teacher folder -> load_unet_sd -> export_unet_sd (what --mode=export writes) -> diffusers."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    config, task, _ = t2i_assets
    folder = unet_sd_weights.export_unet_sd(
        task.network_config, task.load_teacher_params(), str(tmp_path / "unet")
    )
    _, params = unet_sd_weights.load_unet_sd(folder)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 250.0], np.float32)
    cond = task.encode_prompts(["a cat", "the dog"])
    ours = np.asarray(jax.jit(unet_sd.make_unet_apply(task.network_config))(params, x, t, cond))
    model = TorchUNet.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = (
            model(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                torch.from_numpy(t),
                encoder_hidden_states=torch.from_numpy(np.array(cond)),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    err = float(np.max(np.abs(ours - theirs)))
    assert np.abs(theirs).max() > 0.1 and err <= TOL, err


def test_t2i_discriminator_starts_from_the_teacher_encoder(t2i_assets):
    config, task, _ = t2i_assets
    teacher = task.load_teacher_params()
    params = jax.jit(task.init_disc_params)(jax.random.PRNGKey(0), teacher)
    assert _tree_max_diff(params["unet"], unet_sd.encoder_params(teacher)) == 0.0
    assert set(params) == {"unet", "head_down", "head_norm", "head_out"}
    assert params["head_down"]["kernel"].shape == (4, 4, TINY_UNET.block_out_channels[-1], 16)
    assert params["head_out"]["kernel"].shape == (3 * 3 * 16, 1)  # the 8x8 mid feature -> 3x3
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3,) + task.latent_shape), jnp.float32)
    cond = jnp.asarray(task.encode_prompts(["a cat", "the dog", ""]))
    t = jnp.array([0.1, 0.5, 0.9])
    disc_fn = jax.jit(task.disc_fn)
    logits = disc_fn(params, x, cond, t)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    assert len(set(np.asarray(logits).round(6))) == 3  # depends on each sample
    assert float(jnp.abs(disc_fn(params, x, cond, t[::-1]) - logits).max()) > 0  # and on its time
    # The recipe's bf16 compute with per-block remat (configs/t2i_sd15.py): same parameter tree,
    # close logits.
    full = load_config("t2i_sd15", None)
    configured = precision.configure_task(task, full)
    for module in (configured.model, configured.discriminator):
        assert module.dtype == jnp.bfloat16 and module.remat is True
    low_logits = jax.jit(configured.disc_fn)(params, x, cond, t)
    assert low_logits.dtype == jnp.float32
    np.testing.assert_allclose(low_logits, logits, atol=0.1)
