"""End-to-end runs (library and real CLI) and the errors bad input must produce.

The end-to-end run is the session's shared ``main.run(config, wd, "all")`` (scflow_testlib),
also used by test_training.py; tests that write into a workdir use a copy of it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time

import jax
import numpy as np
import pytest
from PIL import Image

import scflow_testlib as lib
from scflow_jax import (
    checkpoint,
    distill,
    evaluate,
    layout,
    main,
    sample,
    sharding,
    teacher,
    trainer,
)
from scflow_jax.data.pipeline import InMemoryBatches
from scflow_jax.tasks import build_task, digits as digits_task

PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def shared():
    return lib.shared_run()


@pytest.fixture(scope="module")
def copied_wd(shared, tmp_path_factory):
    """A private copy of the finished shared workdir (for tests that write into it)."""
    dst = str(tmp_path_factory.mktemp("copied") / "wd")
    shutil.copytree(shared.workdir, dst)
    return dst


def _results(workdir):
    with open(layout.results_path(workdir)) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- end to end
def test_all_mode_runs_every_stage_and_writes_every_output(shared):
    wd, config = shared.workdir, shared.config
    assert shared.exit_code == 0
    assert shared.stage_calls == ["train_teacher", "distill", "evaluate"]
    assert not shared.teacher_preempted and not shared.distill_preempted
    assert int(shared.teacher_state.step) == config.teacher.num_steps
    assert int(shared.distill_state.step) == config.distill.num_steps
    for stage in ("teacher", "distill"):
        assert checkpoint.params_exist(os.path.join(wd, stage, "params")), stage
        events = glob.glob(os.path.join(wd, stage, "tensorboard", "events.out.tfevents.*"))
        assert events and all(os.path.getsize(e) > 0 for e in events), stage

    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f) == json.loads(json.dumps(config.to_dict()))

    rows = _results(wd)
    assert rows == json.loads(json.dumps(shared.eval_rows))
    assert isinstance(rows, list)
    for row in rows:
        assert set(row) == {"model", "sampler", "steps", "cfg", "fd", "accuracy", "num_samples"}, (
            row
        )
        assert row["num_samples"] == config.eval.num_samples
        assert row["sampler"] == "euler"
        assert np.isfinite(row["fd"]) and row["fd"] >= 0
        assert 0.0 <= row["accuracy"] <= 1.0
    got = sorted((r["model"], r["steps"], r["cfg"]) for r in rows)
    cfgs = sorted({1.0, float(config.eval.teacher_guidance)})
    assert len(cfgs) == 2
    want = sorted(
        [("teacher", s, g) for s in config.eval.teacher_steps for g in cfgs]
        + [("student", s, 1.0) for s in config.eval.student_steps]
    )
    assert got == want

    grids = sorted(os.listdir(os.path.join(wd, "eval", "grids")))
    assert grids == sorted(f"{m}_euler_{s}steps_cfg{g:g}.png" for m, s, g in want)
    per = config.eval.grid_per_digit
    for name in grids:
        with Image.open(os.path.join(wd, "eval", "grids", name)) as im:
            assert im.size == (per * 33 + 1, 10 * 33 + 1), name  # 8x8 digits, upscaled x4


def test_all_again_skips_every_stage(shared, monkeypatch):
    wd = shared.workdir
    path = layout.results_path(wd)
    before, mtime = open(path, "rb").read(), os.stat(path).st_mtime_ns
    ckpts = {
        s: sorted(os.listdir(os.path.join(wd, s, "checkpoints"))) for s in ("teacher", "distill")
    }

    def must_not_run(*_):
        raise AssertionError("a finished stage ran again")

    for mod, name in ((teacher, "train_teacher"), (distill, "distill"), (evaluate, "evaluate")):
        monkeypatch.setattr(mod, name, must_not_run)
    start = time.perf_counter()
    assert main.run(shared.config, wd, "all") == 0
    assert time.perf_counter() - start < 30
    assert open(path, "rb").read() == before and os.stat(path).st_mtime_ns == mtime
    assert ckpts == {
        s: sorted(os.listdir(os.path.join(wd, s, "checkpoints"))) for s in ("teacher", "distill")
    }


def test_sample_mode_writes_pngs_and_grid(shared, copied_wd):
    config = shared.config
    assert main.run(config, copied_wd, "sample", prompts=PROMPTS) == 0
    out = os.path.join(
        copied_wd, "samples", f"student_{config.sample.sampler}_{config.sample.num_steps}steps"
    )
    per = config.sample.num_per_prompt
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png") and f != "grid.png")
    assert pngs == sorted(f"{i:03d}_{j:02d}.png" for i in range(len(PROMPTS)) for j in range(per))
    with Image.open(os.path.join(out, pngs[0])) as im:
        assert im.size == (8, 8)
    with Image.open(os.path.join(out, "grid.png")) as im:
        assert im.size == (per * 33 + 1, len(PROMPTS) * 33 + 1)
    with open(os.path.join(out, "prompts.txt")) as f:
        assert f.read().split("\n")[: len(PROMPTS)] == PROMPTS


# ----------------------------------------------------------------------- the real CLI
@pytest.fixture(scope="module")
def cli_runs(copied_wd, tmp_path_factory):
    """Three real ``python -m scflow_jax.main`` processes, started together (each is mostly
    interpreter start-up): a valid run on a finished workdir, and two bad overrides."""
    bad_wd = str(tmp_path_factory.mktemp("cli_bad") / "wd")
    results_before = open(layout.results_path(copied_wd), "rb").read()
    tiny = "--config=configs/default.py:tiny"
    procs = {
        "ok": lib.start_cli(copied_wd, "all", *lib.cli_flags(**{"eval.num_samples": 20})),
        "unknown_key": lib.start_cli(
            bad_wd, "train_teacher", tiny, "--config.teacher.no_such_field=1"
        ),
        "bad_type": lib.start_cli(bad_wd, "train_teacher", tiny, "--config.teacher.num_steps=abc"),
    }
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            out[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {"runs": out, "workdir": copied_wd, "bad_wd": bad_wd, "results_before": results_before}


def test_cli_runs_with_override_and_skips_finished_stages(cli_runs):
    code, _, stderr = cli_runs["runs"]["ok"]
    assert code == 0, stderr[-3000:]
    wd = cli_runs["workdir"]
    for stage in ("train_teacher", "distill", "evaluate"):
        assert re.search(rf"\[{stage}\] already complete .*skipped", stderr), (
            stage,
            stderr[-3000:],
        )
    with open(os.path.join(wd, "config.json")) as f:
        saved = json.load(f)
    assert saved["eval"]["num_samples"] == 20  # the --config.eval.num_samples override
    assert saved["scflow"]["target_ema"] == lib.OVERRIDES["scflow.target_ema"]
    assert open(layout.results_path(wd), "rb").read() == cli_runs["results_before"]


def test_cli_unknown_config_key_fails_naming_it(cli_runs):
    code, _, stderr = cli_runs["runs"]["unknown_key"]
    assert code != 0
    assert "no_such_field" in stderr, stderr[-3000:]
    assert not os.path.exists(os.path.join(cli_runs["bad_wd"], "config.json"))


def test_cli_wrong_type_fails_naming_the_field(cli_runs):
    code, _, stderr = cli_runs["runs"]["bad_type"]
    assert code != 0
    assert "num_steps" in stderr and "abc" in stderr, stderr[-3000:]
    assert not os.path.exists(os.path.join(cli_runs["bad_wd"], "config.json"))


# ------------------------------------------------------------------------- bad input
def test_batch_not_divisible_by_devices(tmp_path):
    config = lib.make_config(num_devices=-1, **{"teacher.batch_size": 12})
    assert len(jax.devices()) == 8
    with pytest.raises(ValueError) as e:
        main.run(config, str(tmp_path / "wd"), "train_teacher")
    msg = str(e.value)
    assert "config.teacher.batch_size" in msg and "12" in msg and "8" in msg, msg


def test_tiny_config_evaluation_fits_the_8_device_test_mesh(tiny_config, tmp_path):
    # An empty workdir: a fitting batch gets as far as "nothing to evaluate".
    with pytest.raises(FileNotFoundError, match="nothing to evaluate"):
        evaluate.evaluate(tiny_config, str(tmp_path / "wd"))


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_regular_file"
    blocker.write_text("not a directory")
    workdir = str(blocker / "wd")  # fails for root too, unlike chmod
    with pytest.raises(PermissionError) as e:
        main.run(lib.make_config(), workdir, "train_teacher")
    assert workdir in str(e.value)


def _leaf_paths(tree) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_distill_with_teacher_from_other_channels_names_parameter_and_shapes(shared, tmp_path):
    teacher_path = os.path.join(shared.workdir, "teacher", "params")
    config = lib.make_config(**{"model.channels": 8, "distill.teacher_params": teacher_path})
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        distill.distill(config, str(tmp_path / "wd"))
    msg = str(e.value)
    m = re.search(
        r"parameter '([^']+)' has shape (\([^)]*\)) in the checkpoint but the "
        r"configuration builds (\([^)]*\))",
        msg,
    )
    assert m, msg
    saved = _leaf_paths(lib.abstract_params(build_task(shared.config)))
    expected = _leaf_paths(lib.abstract_params(build_task(config)))
    name = m.group(1)
    assert name in saved and name in expected, msg
    assert m.group(2) == str(saved[name]) and m.group(3) == str(expected[name])
    assert saved[name] != expected[name]
    assert teacher_path in msg


def test_teacher_export_from_other_architecture_names_first_missing_parameter(shared, tmp_path):
    teacher_path = os.path.join(shared.workdir, "teacher", "params")
    config = lib.make_config(**{"model.num_res_blocks": 2, "distill.teacher_params": teacher_path})
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        distill.distill(config, str(tmp_path / "wd"))
    msg = str(e.value)
    m = re.search(r"parameter '([^']+)' is expected by the configuration but missing", msg)
    assert m, msg
    saved = _leaf_paths(lib.abstract_params(build_task(shared.config)))
    expected = _leaf_paths(lib.abstract_params(build_task(config)))
    missing = [k for k in expected if k not in saved]
    assert missing and m.group(1) in missing, msg


def test_resume_from_checkpoint_of_other_config_names_parameter(shared):
    """What a resumed run does with a checkpoint from another config (channels=16 checkpoint,
    channels=8 configuration): a new Checkpointer checks the tree before restoring."""
    config = lib.make_config(**{"model.channels": 8})
    _, _, _, init_fn = lib.teacher_init(config)
    abstract = jax.eval_shape(init_fn)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    ckpt = checkpoint.Checkpointer(os.path.join(shared.workdir, "teacher", "checkpoints"))
    try:
        with pytest.raises(checkpoint.CheckpointMismatchError) as e:
            ckpt.restore(abstract, sharding.state_shardings(abstract, mesh))
    finally:
        ckpt.close()
    msg = str(e.value)
    assert re.search(
        r"parameter '[^']+' has shape \(.*\) in the checkpoint but the "
        r"configuration builds \(.*\)",
        msg,
    ), msg


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A teacher run whose batches turn NaN from the 4th step on (checkpoint every 3)."""
    bad_from = 3  # 0-based step index: step 4 is the first bad one

    class NaNBatches(InMemoryBatches):
        def batch(self, step):
            b = super().batch(step)
            if step >= bad_from:
                b = dict(b, image=np.full_like(b["image"], np.nan))
            return b

    config = lib.make_config(**{"teacher.num_steps": 8, "teacher.checkpoint_every": 3})
    workdir = str(tmp_path_factory.mktemp("nan") / "wd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digits_task, "InMemoryBatches", NaNBatches)
        with pytest.raises(trainer.NonFiniteLossError) as e:
            main.run(config, workdir, "train_teacher")
    return {
        "config": config,
        "workdir": workdir,
        "error": e.value,
        "ckpt_dir": os.path.join(workdir, "teacher", "checkpoints"),
    }


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(nan_run):
    msg = str(nan_run["error"])
    assert "nan" in msg.lower() and "[teacher]" in msg, msg
    assert re.search(r"at step 4\b", msg), msg
    assert re.search(r"last good checkpoint is step 3\b", msg), msg
    assert not os.path.exists(os.path.join(nan_run["workdir"], "teacher", "params"))
    ckpt = checkpoint.Checkpointer(nan_run["ckpt_dir"])
    try:
        assert ckpt.all_steps() == [3]  # nothing non-finite was checkpointed
    finally:
        ckpt.close()


def test_nan_loss_error_names_the_loss_term(nan_run):
    msg = str(nan_run["error"])
    assert re.search(r"non-finite loss_fm at step 4\b", msg), msg


def test_nan_last_good_checkpoint_is_intact_on_disk(nan_run):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        raw = ckptr.restore(os.path.join(nan_run["ckpt_dir"], "3", "default"))
    assert int(np.asarray(raw["step"])) == 3
    leaves = jax.tree.leaves(raw)
    assert len(leaves) > 10 and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_nan_last_good_checkpoint_loads_with_checkpointer(nan_run):
    config = nan_run["config"]
    _, _, _, init_fn = lib.teacher_init(config)
    abstract = jax.eval_shape(init_fn)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    ckpt = checkpoint.Checkpointer(nan_run["ckpt_dir"])
    try:
        restored = lib.to_host(ckpt.restore(abstract, sharding.state_shardings(abstract, mesh)))
    finally:
        ckpt.close()
    assert int(restored.step) == 3
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


@pytest.mark.parametrize(
    "field,value,exc,needles",
    [
        ("scflow.init_threshold", 1.5, ValueError, ["config.scflow.init_threshold", "1.5"]),
        ("scflow.trunc_threshold", -0.1, ValueError, ["config.scflow.trunc_threshold", "-0.1"]),
        (
            "distill.teacher_params",
            "/nonexistent",
            FileNotFoundError,
            ["/nonexistent", "config.distill.teacher_params"],
        ),
    ],
)
def test_distill_rejects_bad_settings(field, value, exc, needles, tmp_path):
    config = lib.make_config(**{field: value})
    with pytest.raises(exc) as e:
        distill.distill(config, str(tmp_path / "wd"))
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_distill_rejects_all_terms_disabled(tmp_path):
    config = lib.make_config(**{f"scflow.lambda_{n}": 0.0 for n in ("con", "rf", "gan", "inv")})
    with pytest.raises(ValueError) as e:
        distill.distill(config, str(tmp_path / "wd"))
    msg = str(e.value)
    assert "disabled" in msg and "lambda" in msg, msg


# ------------------------------------------------------------------------- sample mode
def test_read_prompts_rejects_empty_file(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        sample.read_prompts([], str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.read_prompts([], str(tmp_path / "missing.txt"))


def test_sample_rejects_words_outside_vocabulary(shared, copied_wd):
    with pytest.raises(ValueError) as e:
        main.run(shared.config, copied_wd, "sample", prompts=["a handwritten digit eleven"])
    assert "eleven" in str(e.value) and "vocabulary" in str(e.value)


def test_sample_mode_rejects_empty_prompts_file(shared, copied_wd, tmp_path, monkeypatch):
    empty = tmp_path / "prompts.txt"
    empty.write_text("")
    seen = []
    monkeypatch.setattr(sample, "write_samples", lambda c, w, p: seen.append(p))
    with pytest.raises(ValueError, match="no prompts"):
        main.run(shared.config, copied_wd, "sample", prompts=(), prompts_file=str(empty))


def test_sample_mode_uses_exactly_the_prompts_file(shared, copied_wd, tmp_path, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS[0] + "\n")
    seen = []
    monkeypatch.setattr(sample, "write_samples", lambda c, w, p: seen.append(list(p)))
    assert main.run(shared.config, copied_wd, "sample", prompts=(), prompts_file=str(path)) == 0
    assert seen == [[PROMPTS[0]]]
