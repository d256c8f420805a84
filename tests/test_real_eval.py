"""Evaluation of the latent recipes: prompts files, seed-stable sharded generation, FID/CLIP rows,
resume.

A fake task implements what evaluation asks of a task (scflow_jax/tasks/base.py) with an analytic
velocity field, a small deterministic "decoder" and a hashed "text encoder", so every test runs in
seconds; FID uses a tiny feature function (the same FeatureExtractor path as Inception) except in
one test with the real Inception network.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import clip_testlib
from scflow_jax import checkpoint, layout, main, sampling, sharding
from scflow_jax.evaluation import clip_score, fid, frechet, generate, prompts, real_eval, results
from scflow_jax.tasks.latent import LatentTask

LATENT = (4, 4, 2)
COND = (3, 5)
CAPTIONS = [
    "the cat",
    "a dog",
    "the dog",
    "cat",
    "dog and the cat",
    "a cat",
    "the the",
    "dog",
    "cat cat",
    "a dog and a cat",
    "the dog cat",
]  # 11: ragged against batches of 8 and 4
FEATURE_DIM = 6


# --------------------------------------------------------------------------------------------------
# A fake recipe task


def _decode(latents):
    # 4x4x2 latents -> 8x8x3 images in [-1, 1] (nearest upsampling and a fixed channel mix).
    mix = jnp.asarray([[0.8, -0.3, 0.5], [0.2, 0.9, -0.6]], jnp.float32)
    up = jnp.repeat(jnp.repeat(latents, 2, axis=1), 2, axis=2)
    return jnp.tanh(up @ mix)


@dataclasses.dataclass(eq=False)
class FakeTask:
    unconditional: bool = False
    latent_shape: tuple = LATENT
    encoded: list = dataclasses.field(default_factory=list)

    def velocity_fn(self, params, t, x, cond):
        v = params["a"] * x + 0.3 * t[:, None, None, None]
        if cond is not None:
            v = v + jnp.mean(cond, axis=(1, 2))[:, None, None, None] * params["b"]
        return v

    decode = staticmethod(jax.jit(_decode))

    @property
    def null_cond(self):
        return np.zeros(COND, np.float32)

    def encode_prompts(self, texts):
        self.encoded.extend(texts)
        codes = [
            [sum(map(ord, t)) % 97 / 97.0 + k for k in range(COND[0] * COND[1])] for t in texts
        ]
        return np.asarray(codes, np.float32).reshape((len(texts),) + COND) / 10.0

    def load_teacher_params(self):
        return {"a": np.asarray([0.5, -0.2], np.float32), "b": np.asarray([1.0, 0.4], np.float32)}

    # --mode=evaluate runs a task's evaluation: the latent recipes' (real_eval), as theirs do.
    evaluate = LatentTask.evaluate
    evaluation_done = LatentTask.evaluation_done


STUDENT = {"a": np.asarray([0.3, 0.1], np.float32), "b": np.asarray([-0.5, 0.8], np.float32)}


def _tiny_features(params, images):
    return jnp.tanh(images.reshape(images.shape[0], -1) @ params)


def _extractor(mesh, batch_size):
    w = np.random.default_rng(4).normal(size=(8 * 8 * 3, FEATURE_DIM)).astype(np.float32) / 8
    return fid.FeatureExtractor(_tiny_features, w, mesh, batch_size)


def _config(tmp_path, *, num_samples=-1, batch_size=8, devices=-1, clip=False, unconditional=False):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.mesh = dict(data=-1, num_devices=devices)
    c.data = dict(name="fake_recipe")
    c.fid = dict(inception_path=None)
    c.eval = dict(real_eval.EVAL_DEFAULTS)
    c.eval.update(
        num_samples=num_samples,
        batch_size=batch_size,
        student_steps=(1, 2),
        teacher_steps=(3,),
        teacher_guidance=1.0 if unconditional else 1.5,
        fid_reference=str(tmp_path / "ref.npz"),
        save_every=1,
    )
    if not unconditional:
        path = tmp_path / "prompts.txt"
        path.write_text("\n".join(CAPTIONS) + "\n")
        c.eval.prompts_file = str(path)
    if clip:
        c.eval.clip_path = _clip_folder(tmp_path)
    rng = np.random.default_rng(0)
    frechet.save_statistics(
        str(tmp_path / "ref.npz"), rng.normal(size=FEATURE_DIM) * 0.1, np.eye(FEATURE_DIM) * 0.05
    )
    return c


def _clip_folder(tmp_path):
    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        clip_testlib.clip_model(seed=2).save_pretrained(folder)
        clip_testlib.write_tokenizer(folder)
    return folder


def _workdir(tmp_path, name="work"):
    wd = str(tmp_path / name)
    checkpoint.save_params(os.path.join(wd, "distill", "params"), STUDENT)
    return wd


def _run(config, wd, task=None, **kw):
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    return real_eval.evaluate_recipe(
        config,
        wd,
        task or FakeTask(unconditional=config.eval.prompts_file is None),
        feature_extractor=_extractor(mesh, config.eval.batch_size),
        feature_dim=FEATURE_DIM,
        mesh=mesh,
        **kw,
    )


def _state(wd, row):
    with np.load(os.path.join(wd, "eval", "state", f"{row}.npz")) as data:
        return {k: data[k] for k in data.files}


def _sampler(params, task, *, devices, batch_size, steps=1, guidance=1.0):
    mesh = sharding.make_mesh(num_devices=devices)
    return generate.ShardedSampler(
        generate.euler_sample_fn(task.velocity_fn, num_steps=steps, guidance=guidance),
        sharding.put_replicated(params, mesh),
        latent_shape=LATENT,
        seed=3,
        batch_size=batch_size,
        mesh=mesh,
        null_cond=task.null_cond if guidance != 1.0 else None,
        decode=task.decode,
    )


# --------------------------------------------------------------------------------------------------
# Prompts files


def test_prompt_file_formats(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat \n  the dog\r\nlast line")  # no final newline, CRLF, surrounding spaces
    assert prompts.load_prompts(str(text)) == ["a cat", "the dog", "last line"]
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps(["x", " y "]))
    assert prompts.load_prompts(str(listed)) == ["x", "y"]
    captions = tmp_path / "c.json"
    captions.write_text(json.dumps({"captions": ["one", "two"]}))
    assert prompts.load_prompts(str(captions)) == ["one", "two"]
    # COCO captions annotations: first caption of each image (file order), images by ascending
    # image_id.
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [
                    {"image_id": 9, "id": 1, "caption": "nine first\n"},
                    {"image_id": 2, "id": 2, "caption": "two first"},
                    {"image_id": 9, "id": 3, "caption": "nine second"},
                    {"image_id": 2, "id": 4, "caption": "two second"},
                    {"image_id": 5, "id": 5, "caption": "five"},
                ],
            }
        )
    )
    assert prompts.load_prompts(str(coco)) == ["two first", "five", "nine first"]


def test_prompt_file_errors_name_the_file_and_lines(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match=r"prompts file .*empty.txt is empty"):
        prompts.load_prompts(str(empty))
    holes = tmp_path / "holes.txt"
    holes.write_text("a\n\nb\n  \nc\n")
    with pytest.raises(ValueError, match=r"holes.txt has empty line\(s\) 2, 4 \(1-based\)"):
        prompts.load_prompts(str(holes))
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        prompts.load_prompts(str(tmp_path / "missing.txt"))
    for content, message in (
        (["a", 3], r"entries 1 \(0-based\) are not strings"),
        (["a", " "], r"entries 1 \(0-based\) are empty"),
        ({"other": 1}, r"needs a 'captions' list or COCO 'annotations'; found keys \['other'\]"),
        ({"annotations": [{"caption": "x"}]}, r"annotations\[0\] is not a COCO caption"),
        ([], "holds no prompts"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            prompts.load_prompts(str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text("[\"a\",")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        prompts.load_prompts(str(broken))


def test_more_samples_than_prompts_is_an_error_not_a_cycle():
    assert prompts.prompts_for_samples(["a", "b", "c"], 2) == ["a", "b"]
    assert prompts.prompts_for_samples(["a", "b", "c"], -1) == ["a", "b", "c"]
    with pytest.raises(
        ValueError, match=r"config.eval.num_samples=4 but p.txt holds only 3 prompts"
    ):
        prompts.prompts_for_samples(
            ["a", "b", "c"], 4, source="p.txt", field="config.eval.num_samples"
        )
    with pytest.raises(ValueError, match="positive integer or -1"):
        prompts.prompts_for_samples(["a"], 0)


# --------------------------------------------------------------------------------------------------
# Generation


def test_noise_of_a_sample_depends_only_on_seed_and_index():
    z = np.asarray(sampling.sample_noise(7, jnp.asarray([5, 0, 5]), LATENT))
    for row, i in zip(z, (5, 0, 5)):
        np.testing.assert_array_equal(
            row, jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), i), LATENT)
        )


def test_images_do_not_depend_on_device_count_or_batch_size_and_a_ragged_batch_is_exact():
    task = FakeTask()
    params = task.load_teacher_params()
    cond_fn = lambda idx: task.encode_prompts([CAPTIONS[i] for i in idx])  # noqa: E731
    runs = {}
    for devices, batch_size in (
        (1, 4),
        (8, 8),
        (8, 16),
    ):  # 11 samples: ragged last batch of 3, 3 and 11
        sampler = _sampler(
            params, task, devices=devices, batch_size=batch_size, steps=2, guidance=1.5
        )
        runs[devices, batch_size] = generate.generate_images(
            sampler, num_samples=len(CAPTIONS), cond_fn=cond_fn
        )
    reference = runs[1, 4]
    assert reference.shape == (len(CAPTIONS), 8, 8, 3)
    for images in runs.values():
        np.testing.assert_allclose(images, reference, rtol=0, atol=1e-6)
    # Sample 10 alone (its own batch, padded) is the same image as inside a full run.
    sampler = _sampler(params, task, devices=8, batch_size=8, steps=2, guidance=1.5)
    alone = sharding.to_host(sampler(np.asarray([10]), cond_fn([10])))[:1]
    np.testing.assert_allclose(alone[0], reference[10], rtol=0, atol=1e-6)
    # Guidance and step count change the images (the program really uses them).
    plain = generate.generate_images(
        _sampler(params, task, devices=8, batch_size=8, steps=2), num_samples=11, cond_fn=cond_fn
    )
    assert np.abs(plain - reference).max() > 1e-3


def test_sampler_compiles_once_for_full_and_ragged_batches():
    task = FakeTask(unconditional=True)
    traces = []

    def sample_fn(params, z1, cond, null):
        traces.append(z1.shape)
        return z1 * params["a"]

    mesh = sharding.make_mesh(num_devices=8)
    sampler = generate.ShardedSampler(
        sample_fn,
        sharding.put_replicated(task.load_teacher_params(), mesh),
        latent_shape=LATENT,
        seed=0,
        batch_size=8,
        mesh=mesh,
    )
    out = generate.generate_images(sampler, num_samples=19)
    assert out.shape == (19,) + LATENT and traces == [(8,) + LATENT]
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the number of devices"):
        generate.ShardedSampler(
            sample_fn, {}, latent_shape=LATENT, seed=0, batch_size=12, mesh=mesh, field="batch_size"
        )


# --------------------------------------------------------------------------------------------------
# The evaluate stage

ROW_KEYS = set(results.RESULT_KEYS) | {
    "fid",
    "clip_score",
    "clip_cosine",
    "row",
    "fid_reference",
    "prompts_file",
}


def test_text_to_image_rows_fid_and_clip_score_match_direct_computation(tmp_path):
    config = _config(tmp_path, clip=True)
    config.eval.write_images = True
    wd = _workdir(tmp_path)
    task = FakeTask()
    rows = _run(config, wd, task)

    names = [r["row"] for r in rows]
    assert names == [
        "student_euler_1steps_cfg1_n11",
        "student_euler_2steps_cfg1_n11",
        "teacher_euler_3steps_cfg1.5_n11",
    ]
    with open(layout.results_path(wd)) as f:
        saved = json.load(f)
    assert saved == rows
    for r in saved:
        assert set(r) == ROW_KEYS
        assert r["fd"] is None and r["accuracy"] is None and r["num_samples"] == len(CAPTIONS)
        assert r["sampler"] == "euler" and np.isfinite(r["fid"]) and np.isfinite(r["clip_score"])
    assert [(r["model"], r["steps"], r["cfg"]) for r in saved] == [
        ("student", 1, 1.0),
        ("student", 2, 1.0),
        ("teacher", 3, 1.5),
    ]
    assert real_eval.is_done(wd)

    # Direct computation on one device for the teacher row: same images, FID and CLIP score.
    images = generate.generate_images(
        _sampler(task.load_teacher_params(), task, devices=1, batch_size=4, steps=3, guidance=1.5),
        num_samples=len(CAPTIONS),
        cond_fn=lambda idx: task.encode_prompts([CAPTIONS[i] for i in idx]),
    )
    mesh1 = sharding.make_mesh(num_devices=1)
    mu, sigma = frechet.feature_statistics(_extractor(mesh1, 4)((images + 1) / 2))
    assert saved[2]["fid"] == pytest.approx(
        fid.fid_against_reference(mu, sigma, config.eval.fid_reference), rel=1e-5, abs=1e-6
    )
    from scflow_jax.models.clip import load_clip_tokenizer
    from scflow_jax.models.clip_vision import load_clip

    model, params = load_clip(config.eval.clip_path)
    direct = clip_score.clip_score(
        model, params, load_clip_tokenizer(config.eval.clip_path, max_length=16), images, CAPTIONS
    )
    assert saved[2]["clip_cosine"] == pytest.approx(direct["mean_cosine"], abs=1e-5)
    assert saved[2]["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-3)

    # Every sample written once as a PNG, numbered by sample index.
    for name in names:
        files = sorted(os.listdir(os.path.join(wd, "eval", "images", name)))
        assert files == [f"{i:06d}.png" for i in range(len(CAPTIONS))]

    # A rerun regenerates nothing (every row's state is complete) and does not duplicate rows.
    task_again = FakeTask()
    again = _run(config, wd, task_again)
    assert task_again.encoded == [] and again == rows
    with open(layout.results_path(wd)) as f:
        assert json.load(f) == rows


def test_resume_after_interruption_equals_an_uninterrupted_run_on_another_device_count(tmp_path):
    config = _config(tmp_path)  # 11 prompts: 2 batches of 8 per row, the last one ragged (3)
    uninterrupted = _run(config, _workdir(tmp_path, "full"))

    class Interrupt(Exception):
        pass

    wd = _workdir(tmp_path, "interrupted")
    mesh8 = sharding.make_mesh(num_devices=8)
    inner = _extractor(mesh8, 8)
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) == 4:  # row 1 done (2 batches), row 2 stopped after its first batch
            raise Interrupt()
        return inner(images)

    with pytest.raises(Interrupt):
        real_eval.evaluate_recipe(
            config, wd, FakeTask(), feature_extractor=failing, feature_dim=FEATURE_DIM, mesh=mesh8
        )
    assert calls == [8, 3, 8, 3]
    assert int(_state(wd, "student_euler_2steps_cfg1_n11")["num_batches"]) == 1
    assert not real_eval.is_done(wd)

    config.mesh.num_devices = 1  # resumed on one device: same batches, same samples
    task = FakeTask()
    resumed = _run(config, wd, task)
    # Only row 2's second batch and row 3 are generated again.
    assert task.encoded == CAPTIONS[8:] + CAPTIONS
    for got, want in zip(resumed, uninterrupted, strict=True):
        assert {**got, "fid": None} == {**want, "fid": None}
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-5)
    for name in (r["row"] for r in resumed):
        a, b = _state(wd, name), _state(os.path.join(tmp_path, "full"), name)
        assert int(a["count"]) == int(b["count"]) == len(CAPTIONS)
        np.testing.assert_allclose(a["sum"], b["sum"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a["sum_outer"], b["sum_outer"], rtol=1e-6, atol=1e-6)


def test_a_state_from_another_job_is_refused(tmp_path):
    config = _config(tmp_path, num_samples=10, batch_size=8, unconditional=True)
    config.eval.student_steps = (1,)
    config.eval.teacher_steps = ()
    wd = _workdir(tmp_path)
    _run(config, wd)
    config.eval.batch_size = 16  # the saved batch count means other samples now
    with pytest.raises(ValueError, match="belongs to another evaluation"):
        _run(config, wd)


def test_unconditional_rows_and_config_errors_name_the_field(tmp_path):
    config = _config(tmp_path, num_samples=9, unconditional=True)
    wd = _workdir(tmp_path)
    rows = _run(config, wd)
    assert [r["clip_score"] for r in rows] == [None] * 3 and all(
        np.isfinite(r["fid"]) for r in rows
    )
    assert all(r["prompts_file"] is None and r["num_samples"] == 9 for r in rows)

    def error(match, **changes):
        unconditional = changes.pop("unconditional", True)
        c = _config(tmp_path, num_samples=9, unconditional=unconditional)
        for k, v in changes.items():
            c.eval[k] = v
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            real_eval.evaluate_recipe(
                c,
                _workdir(tmp_path, "errors"),
                FakeTask(unconditional=unconditional),
                feature_extractor=np.asarray,
                feature_dim=FEATURE_DIM,
            )

    error(r"config.eval.teacher_guidance=1.5 needs a conditional model", teacher_guidance=1.5)
    error(r"config.eval.clip_path=.* but this task is unconditional", clip_path=str(tmp_path))
    error(
        r"config.eval.fid_reference=.*nope.npz is not a file",
        fid_reference=str(tmp_path / "nope.npz"),
    )
    error("nothing to measure", fid_reference=None)
    error(r"config.eval.batch_size=6 is not divisible by the number of devices", batch_size=6)
    error(r"config.eval.student_steps=\(0,\) must hold positive integers", student_steps=(0,))
    error(r"config.eval.num_samples=1 must be an integer >= 2", num_samples=1)
    error("config.eval.prompts_file must be set", unconditional=False, prompts_file=None)
    error(
        r"config.eval.num_samples=12 but .*prompts.txt holds only 11 prompts",
        unconditional=False,
        num_samples=12,
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    error(r"prompts file .*empty.txt is empty", unconditional=False, prompts_file=str(empty))
    bare = _config(tmp_path, num_samples=9, unconditional=True)
    with pytest.raises(
        FileNotFoundError, match="no student parameters at .*run --mode=distill first"
    ):
        _run(bare, str(tmp_path / "no_student"))
    with pytest.raises(
        ValueError, match="config.fid.inception_path=None must be pytorch-fid's Inception"
    ):
        real_eval.evaluate_recipe(bare, wd, FakeTask(unconditional=True))


def test_evaluate_mode_dispatches_latent_recipes_to_real_eval(tmp_path, monkeypatch):
    import scflow_jax.tasks

    config = _config(tmp_path, num_samples=9, unconditional=True)
    config.eval.student_steps, config.eval.teacher_steps = (1,), ()
    wd = _workdir(tmp_path)
    seen = []
    original = real_eval.evaluate_recipe
    mesh = sharding.make_mesh()

    def fake_evaluate_recipe(cfg, workdir, task):
        seen.append((cfg.data.name, workdir, task))
        return original(
            cfg, workdir, task, feature_extractor=_extractor(mesh, 8), feature_dim=FEATURE_DIM
        )

    monkeypatch.setattr(scflow_jax.tasks, "build_task", lambda cfg: FakeTask(unconditional=True))
    monkeypatch.setattr(real_eval, "evaluate_recipe", fake_evaluate_recipe)
    assert main.run(config, wd, "evaluate") == 0
    assert (
        len(seen) == 1 and seen[0][:2] == ("fake_recipe", wd) and isinstance(seen[0][2], FakeTask)
    )
    assert real_eval.is_done(wd)


@pytest.mark.slow  # 40-80 s on the shared, loaded 2-core CPU (Inception compile + 299 px forward)
@pytest.mark.filterwarnings(
    "ignore::scipy.linalg.LinAlgWarning"
)  # 3 samples: a singular covariance
def test_real_inception_path(tmp_path):
    """Once through the real FID network: a pytorch-fid-format weights file (random Inception
    weights) loaded by the converter, 2048-d statistics of generated 8x8 images."""
    import torch

    from scflow_jax.evaluation import inception

    rng = np.random.default_rng(1)
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(inception.abstract_params())[0]:
        keys = tuple(getattr(k, "key", k) for k in path)
        if len(leaf.shape) == 4:  # He-normal HWIO kernels, stored in torch's OIHW layout
            value = rng.normal(0, (2 / np.prod(leaf.shape[:3])) ** 0.5, leaf.shape).transpose(
                3, 2, 0, 1
            )
        else:  # BatchNorm: unit scale and variance, zero shift and mean
            value = np.full(leaf.shape, 1.0 if keys[-1] in ("scale", "var") else 0.0)
        state[inception.torch_key(keys)] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
    weights = str(tmp_path / "pt_inception.pth")
    torch.save(state, weights)

    config = _config(tmp_path, num_samples=3, unconditional=True)
    config.eval.student_steps, config.eval.teacher_steps = (1,), ()
    config.fid.inception_path = weights
    frechet.save_statistics(
        config.eval.fid_reference, np.zeros(inception.FEATURE_DIM), np.eye(inception.FEATURE_DIM)
    )
    config.mesh.num_devices, config.eval.batch_size = 1, 4
    wd = _workdir(tmp_path)
    rows = real_eval.evaluate_recipe(config, wd, FakeTask(unconditional=True))
    assert np.isfinite(rows[0]["fid"]) and rows[0]["num_samples"] == 3
    state = _state(wd, rows[0]["row"])
    assert int(state["count"]) == 3 and state["sum"].shape == (inception.FEATURE_DIM,)
