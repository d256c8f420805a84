"""Training-loop guarantees: device-count independence, checkpoints, kill/SIGTERM resume,
the frozen teacher, EMA rules, warm-ups without recompilation, gradient clipping.

Cost control (2-core CPU, compile-bound): one test configuration for every run
(scflow_testlib.make_config), one session-wide ``main.run(..., "all")`` reused by both test
files, and module-scoped fixtures so each distinct program is traced once per module.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import scflow_testlib as lib
from scflow_jax import checkpoint, sharding, train_state

N_TEACHER = 3  # teacher steps compared across device counts
N_DISTILL = 4  # distill steps: covers every warm-up switch (2 and 3)


@pytest.fixture(scope="module")
def shared():
    run = lib.shared_run()
    assert run.exit_code == 0
    return run


@pytest.fixture(scope="module")
def teacher_runs():
    """The same N_TEACHER teacher steps on a 1-device and an 8-device mesh."""
    return {n: lib.run_teacher_steps(lib.make_config(num_devices=n), N_TEACHER) for n in (1, 8)}


@pytest.fixture(scope="module")
def perturbed_teacher(shared, tmp_path_factory):
    """The shared teacher export plus seeded noise, saved as a new export.

    30 steps leave the teacher's output almost input-independent (its last conv starts at
    zero), which makes the self-corrected reflow loss ~1e-9, too small for the warm-up test
    to see. The noise gives a teacher whose velocity depends on (t, x) without any extra
    training or compilation (only the teacher path changes)."""
    params = lib.load_exported_params(
        shared.config, os.path.join(shared.workdir, "teacher", "params")
    )
    rng = np.random.default_rng(0)
    noisy = jax.tree.map(
        lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(p.dtype), params
    )
    path = str(tmp_path_factory.mktemp("teacher") / "params")
    checkpoint.save_params(path, noisy)
    return path


@pytest.fixture(scope="module")
def distill_runs(perturbed_teacher, tmp_path_factory):
    """N_DISTILL distill steps from the same teacher export, on 1 and 8 devices."""
    workdir = str(tmp_path_factory.mktemp("distill_runs"))
    return {
        n: lib.run_distill_steps(
            lib.make_config(num_devices=n, **{"distill.teacher_params": perturbed_teacher}),
            workdir,
            N_DISTILL,
        )
        for n in (1, 8)
    }


# --------------------------------------------------------------- device-count independence
def test_teacher_step_same_on_1_and_8_devices(teacher_runs):
    (m1, s1), (m8, s8) = teacher_runs[1], teacher_runs[8]
    assert len(m1) == len(m8) == N_TEACHER
    for step, (a, b) in enumerate(zip(m1, m8), start=1):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(
                a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"teacher step {step} metric {k}"
            )
    assert int(s1.step) == int(s8.step) == N_TEACHER
    lib.assert_trees_close(s1.params, s8.params, rtol=1e-4, atol=1e-5, what="teacher params")
    lib.assert_trees_close(s1.ema_params, s8.ema_params, rtol=1e-4, atol=1e-5, what="teacher EMA")
    # The steps did something (so the comparison is not between two initial states).
    assert all(np.isfinite(m["loss_fm"]) and m["grad_norm"] > 0 for m in m1)
    assert any(
        np.any(p != e) for p, e in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s1.ema_params))
    )


def test_distill_step_same_on_1_and_8_devices(distill_runs):
    r1, r8 = distill_runs[1], distill_runs[8]
    lib.assert_trees_equal(r1.teacher_loaded, r8.teacher_loaded, "teacher as loaded")
    for step, (a, b) in enumerate(zip(r1.metrics, r8.metrics), start=1):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(
                a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"distill step {step} metric {k}"
            )
    # Gradients: Adam's first/second moments (opt_state mu, nu) are running sums of the
    # gradients, so they compare the gradients of every step. They agree to fp32 noise
    # (observed relative L2 difference well below 1e-6).
    f1, f8, f0 = r1.states[-1], r8.states[-1], r1.states[0]

    def rel_l2(a, b):
        a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
        b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
        return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)

    def floats(tree):  # the float leaves, not the step counts
        return [x for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating)]

    for field in ("opt_state", "disc_opt_state"):
        a, b = floats(getattr(f1, field)), floats(getattr(f8, field))
        assert len(a) == len(b) > 0
        for moments in (a[: len(a) // 2], a[len(a) // 2 :]):  # mu leaves, then nu leaves
            assert any(np.any(x != 0) for x in moments)
        ratio = rel_l2(a, b)
        assert ratio < 1e-4, (field, ratio)
    # Parameters: Adam divides by sqrt(v) + eps, so for elements whose gradient is near zero
    # the reduction-order noise of the sharded sums becomes a visible part of that element's
    # step (observed: up to 7% of the total movement, 1.6e-3 relative L2). A sharding bug
    # (e.g. per-device gradients) changes every element's step, i.e. O(1) relative.
    lr = lib.make_config().distill.optimizer.learning_rate
    for field in ("params", "target_params", "ema_params", "disc_params"):
        a, b, t = (jax.tree.leaves(getattr(s, field)) for s in (f1, f8, f0))
        lib.assert_trees_close(a, b, rtol=1e-4, atol=0.25 * N_DISTILL * lr, what=f"distill {field}")
        ratio = rel_l2([x - z for x, z in zip(a, t)], [y - z for y, z in zip(b, t)])
        assert ratio < 1e-2, (field, ratio)
    # The student actually moved away from the teacher.
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(f1.params), jax.tree.leaves(r1.teacher_loaded))
    )
    assert moved > 1e-5


# -------------------------------------------------------------------------- checkpoints


def _teacher_abstract(config):
    _, _, _, init_fn = lib.teacher_init(config)
    return jax.eval_shape(init_fn)


def _save_and_restore(state, abstract, config, directory, step):
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    shardings = sharding.state_shardings(abstract, mesh)
    ckpt = checkpoint.Checkpointer(directory)
    try:
        ckpt.save(step, sharding.put_replicated(state, mesh), force=True)
        ckpt.wait()
        assert ckpt.latest_step() == step
        return lib.to_host(ckpt.restore(abstract, shardings))
    finally:
        ckpt.close()


def test_teacher_checkpoint_round_trip_is_bit_identical(teacher_runs, tmp_path):
    """A run to step k, saved and restored with the abstract state the stage builds."""
    config = lib.make_config()
    _, state = teacher_runs[1]
    assert int(state.step) == N_TEACHER
    restored = _save_and_restore(
        state, _teacher_abstract(config), config, str(tmp_path / "ckpt"), N_TEACHER
    )
    assert int(restored.step) == N_TEACHER
    lib.assert_trees_equal(restored, state, "teacher checkpoint")


def test_distill_checkpoint_round_trip_is_bit_identical(distill_runs, tmp_path):
    """A distill state (discriminator, optimizer states, EMAs) survives save + restore."""
    config = lib.make_config()
    state = distill_runs[1].states[-1]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = _save_and_restore(state, abstract, config, str(tmp_path / "ckpt"), N_DISTILL)
    lib.assert_trees_equal(restored, state, "distill checkpoint")


def test_stage_checkpoints_restore_in_a_new_checkpointer(shared):
    """What a resumed process does: a fresh Checkpointer on the stage's directory restores
    the final checkpoint to exactly the state the stage returned."""
    config = shared.config
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    for stage, abstract, returned, final in (
        ("teacher", _teacher_abstract(config), shared.teacher_state, lib.TEACHER_STEPS),
        (
            "distill",
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shared.distill_state),
            shared.distill_state,
            config.distill.num_steps,
        ),
    ):
        ckpt = checkpoint.Checkpointer(os.path.join(shared.workdir, stage, "checkpoints"))
        try:
            assert ckpt.latest_step() == final
            restored = ckpt.restore(abstract, sharding.state_shardings(abstract, mesh), final)
        finally:
            ckpt.close()
        lib.assert_trees_equal(lib.to_host(restored), returned, f"{stage} checkpoint")


def test_teacher_export_is_the_final_ema(shared):
    exported = lib.load_exported_params(
        shared.config, os.path.join(shared.workdir, "teacher", "params")
    )
    lib.assert_trees_equal(exported, shared.teacher_state.ema_params, "teacher export")
    student = lib.load_exported_params(
        shared.config, os.path.join(shared.workdir, "distill", "params")
    )
    lib.assert_trees_equal(student, shared.distill_state.ema_params, "student export")


# --------------------------------------------------------------- SIGTERM, SIGKILL, resume
class _Reader:
    """Drains a subprocess's stderr on a thread, keeping every line."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for line in stream:
            self.lines.append(line)

    def wait_for(self, pattern: str, proc, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                m = regex.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if proc.poll() is not None:
                self._thread.join(5)
                if seen >= len(self.lines):
                    break
            time.sleep(0.01)
        raise AssertionError(
            f"no line matching {pattern!r} (rc={proc.poll()}):\n" + "".join(self.lines[-40:])
        )

    def text(self) -> str:
        self._thread.join(30)
        return "".join(self.lines)


def _steps_on_disk(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """A real CLI teacher run that gets SIGTERM once its loop is running (its first progress
    line: the handler is installed by then)."""
    workdir = str(tmp_path_factory.mktemp("signals") / "wd")
    proc = lib.start_cli(workdir, "train_teacher", *lib.cli_flags())
    reader = _Reader(proc)
    try:
        reader.wait_for(r"\[teacher\] step \d+/%d" % lib.TEACHER_STEPS, proc, timeout=300)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = reader.text()
    m = re.search(r"stopped at step (\d+) after SIGTERM", log)
    return {
        "workdir": workdir,
        "rc": rc,
        "log": log,
        "reached": int(m.group(1)) if m else None,
        "ckpt_dir": os.path.join(workdir, "teacher", "checkpoints"),
    }


def test_sigterm_cli_exits_0_mid_training_without_export(sigterm_run):
    log = sigterm_run["log"]
    assert sigterm_run["rc"] == 0, log[-3000:]
    assert sigterm_run["reached"] is not None, log[-3000:]
    assert 0 < sigterm_run["reached"] < lib.TEACHER_STEPS
    assert not os.path.exists(os.path.join(sigterm_run["workdir"], "teacher", "params")), (
        "a preempted run must not export parameters"
    )


def test_sigterm_cli_leaves_a_checkpoint_at_the_step_reached(sigterm_run):
    assert sigterm_run["reached"] is not None
    assert _steps_on_disk(sigterm_run["ckpt_dir"])[-1:] == [sigterm_run["reached"]], sigterm_run[
        "log"
    ][-3000:]


def _teacher_with_sigterm(workdir, monkeypatch, *, in_batch=None, in_report=None):
    """An in-process teacher run (log every 2, checkpoint every 10) that sends itself SIGTERM
    while preparing the batch of step ``in_batch`` (0-based) or while logging step
    ``in_report``: the two places a real signal can land."""
    from scflow_jax import main, monitoring, teacher
    from scflow_jax.data.pipeline import InMemoryBatches
    from scflow_jax.tasks import digits as digits_task

    class SignalBatches(InMemoryBatches):
        def batch(self, step):
            if step == in_batch:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().batch(step)

    original_report = monitoring.Progress.report

    def report(self, step, scalars):
        if step == in_report:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_report(self, step, scalars)

    monkeypatch.setattr(digits_task, "InMemoryBatches", SignalBatches)
    monkeypatch.setattr(monitoring.Progress, "report", report)
    captured = {}
    original_train = teacher.train_teacher

    def train(config, wd):
        captured["result"] = original_train(config, wd)
        return captured["result"]

    monkeypatch.setattr(teacher, "train_teacher", train)
    code = main.run(lib.make_config(), workdir, "train_teacher")
    return code, captured["result"]


def test_sigterm_during_a_step_saves_a_checkpoint_there(tmp_path, monkeypatch):
    workdir = str(tmp_path / "wd")
    code, result = _teacher_with_sigterm(workdir, monkeypatch, in_batch=4)
    assert code == 0 and result.preempted
    reached = int(result.state.step)
    assert reached == 5  # the step in flight completes
    ckpt_dir = os.path.join(workdir, "teacher", "checkpoints")
    assert _steps_on_disk(ckpt_dir) == [reached]
    assert not os.path.exists(os.path.join(workdir, "teacher", "params"))
    with ocp.StandardCheckpointer() as ckptr:
        raw = ckptr.restore(os.path.join(ckpt_dir, str(reached), "default"))
    assert int(np.asarray(raw["step"])) == reached
    lib.assert_trees_equal(raw["params"], lib.to_host(result.state.params), "saved state")


def test_sigterm_while_logging_saves_a_checkpoint_there(tmp_path, monkeypatch):
    workdir = str(tmp_path / "wd")
    code, result = _teacher_with_sigterm(workdir, monkeypatch, in_report=2)
    assert code == 0 and result.preempted
    reached = int(result.state.step)  # 2, or 3 if a fix defers the stop to the next step
    assert 2 <= reached < lib.OVERRIDES["teacher.checkpoint_every"]
    assert _steps_on_disk(os.path.join(workdir, "teacher", "checkpoints")) == [reached]


def test_sigkill_and_rerun_match_the_uninterrupted_run(shared, sigterm_run):
    """Continues the SIGTERM workdir with the same command: rerun, SIGKILL as soon as the
    rerun's first checkpoint directory appears, rerun to completion; the export equals the
    uninterrupted run's (the session's in-process run of the same configuration) bit for bit."""
    workdir = sigterm_run["workdir"]
    ckpt_dir = sigterm_run["ckpt_dir"]
    params_dir = os.path.join(workdir, "teacher", "params")
    before = max(_steps_on_disk(ckpt_dir), default=0)
    flags = lib.cli_flags()

    proc = lib.start_cli(workdir, "train_teacher", *flags)
    reader = _Reader(proc)
    try:
        deadline = time.monotonic() + 300
        while not any(s > before for s in _steps_on_disk(ckpt_dir)):
            assert proc.poll() is None, "exited before it could be killed:\n" + reader.text()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == -signal.SIGKILL
    assert not os.path.exists(params_dir), "killed before the end: no export expected"
    killed_at = max(_steps_on_disk(ckpt_dir))
    assert before < killed_at < lib.TEACHER_STEPS

    proc = lib.start_cli(workdir, "train_teacher", *flags)
    reader = _Reader(proc)
    rc = proc.wait(timeout=300)
    log = reader.text()
    assert rc == 0, log[-3000:]
    assert re.search(r"resumed from checkpoint step \d+", log), log[-3000:]
    assert _steps_on_disk(ckpt_dir)[-1] == lib.TEACHER_STEPS

    config = lib.make_config()
    got = lib.load_exported_params(config, params_dir)
    want = lib.load_exported_params(config, os.path.join(shared.workdir, "teacher", "params"))
    lib.assert_trees_equal(got, want, "resumed vs uninterrupted teacher export")


# ------------------------------------------------------------ teacher, EMAs, warm-ups
def test_states_start_as_copies_of_the_teacher(distill_runs):
    run = distill_runs[1]
    init = run.states[0]
    assert int(init.step) == 0
    for field in ("params", "target_params", "ema_params"):
        lib.assert_trees_equal(getattr(init, field), run.teacher_loaded, f"initial {field}")


def test_teacher_is_bit_identical_after_distillation(shared, distill_runs, perturbed_teacher):
    run = distill_runs[1]
    # The frozen device arrays passed to every step are unchanged...
    lib.assert_trees_equal(run.teacher_after, run.teacher_loaded, "teacher after steps")
    # ...and so is the export on disk.
    reloaded = lib.load_exported_params(shared.config, perturbed_teacher)
    lib.assert_trees_equal(reloaded, run.teacher_loaded, "reloaded teacher export")
    # The session's full distill stage (checkpoints, export of the student) left the
    # teacher export it read exactly as the teacher stage returned it.
    reloaded = lib.load_exported_params(
        shared.config, os.path.join(shared.workdir, "teacher", "params")
    )
    lib.assert_trees_equal(
        reloaded, shared.teacher_state.ema_params, "teacher export vs the teacher stage's result"
    )


def test_target_and_eval_ema_follow_their_rules(distill_runs):
    run = distill_runs[1]
    cfg = lib.make_config().scflow
    mu, r = cfg.target_ema, cfg.eval_ema
    assert (mu, r) == (0.7, 0.4)
    teacher = run.teacher_loaded
    after1 = run.states[1]
    leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
    moved = 0.0
    for t, s, tgt, ema in zip(
        leaves(teacher),
        leaves(after1.params),
        leaves(after1.target_params),
        leaves(after1.ema_params),
    ):
        np.testing.assert_allclose(tgt, mu * t + (1 - mu) * s, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ema, r * t + (1 - r) * s, rtol=0, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(s - t))))
    # The check discriminates: the student moved far more than the tolerance.
    assert moved > 1e-4
    # And the rules hold at every later step (EMA of the previous EMA).
    for prev, cur in zip(run.states[1:], run.states[2:]):
        for p_t, p_e, s, tgt, ema in zip(
            leaves(prev.target_params),
            leaves(prev.ema_params),
            leaves(cur.params),
            leaves(cur.target_params),
            leaves(cur.ema_params),
        ):
            np.testing.assert_allclose(tgt, mu * p_t + (1 - mu) * s, rtol=0, atol=1e-6)
            np.testing.assert_allclose(ema, r * p_e + (1 - r) * s, rtol=0, atol=1e-6)


def test_warmups_switch_terms_on_without_recompiling(distill_runs):
    run = distill_runs[1]
    cfg = lib.make_config().scflow
    assert (cfg.warmup_rf, cfg.warmup_inv, cfg.warmup_gan) == (2, 3, 2)
    assert len(run.metrics) == N_DISTILL
    for step, m in enumerate(run.metrics):  # ``step`` = state.step when the step ran
        for k in ("loss", "loss_con", "loss_rf", "loss_inv", "loss_gan", "loss_disc"):
            assert k in m and np.isfinite(m[k]), (step, k, m)
        on = {
            "rf": step >= cfg.warmup_rf,
            "inv": step >= cfg.warmup_inv,
            "gan": step >= cfg.warmup_gan,
        }
        expected = (
            cfg.lambda_con * m["loss_con"]
            + cfg.lambda_rf * m["loss_rf"] * on["rf"]
            + cfg.lambda_inv * m["loss_inv"] * on["inv"]
            + cfg.lambda_gan * m["loss_gan"] * on["gan"]
        )
        np.testing.assert_allclose(
            m["loss"], expected, rtol=1e-6, atol=1e-7, err_msg=f"step {step}: {m}"
        )
        if not any(on.values()):
            assert m["loss"] == pytest.approx(cfg.lambda_con * m["loss_con"], rel=1e-7, abs=0)
        if on["gan"]:
            assert m["loss_disc"] != 0 and m["r1"] != 0, (step, m)
        else:
            assert m["loss_disc"] == 0 and m["r1"] == 0 and m["disc_grad_norm"] == 0, (step, m)
    # Every switched-on term changes the total by more than the tolerance above, so the
    # checks tell "on" from "off".
    last = run.metrics[-1]
    for name in ("rf", "inv", "gan"):
        assert (
            cfg[f"lambda_{name}"] * abs(last[f"loss_{name}"]) > 1e-6 * abs(last["loss"]) + 1e-7
        ), (name, last)
    # One compilation for all four steps across the switches.
    assert run.traces == 1
    if run.cache_size is not None:
        assert run.cache_size == 1
    # The discriminator was frozen before the GAN warm-up and trained after it.
    s = run.states
    lib.assert_trees_equal(s[cfg.warmup_gan].disc_params, s[0].disc_params, "disc before warm-up")
    assert any(
        np.any(a != b)
        for a, b in zip(jax.tree.leaves(s[-1].disc_params), jax.tree.leaves(s[0].disc_params))
    )


# --------------------------------------------------------------------- gradient clipping
def test_gradient_clipping_applies_at_every_step():
    """make_optimizer (what both stages use) clips at every step, not only the first."""
    opt_cfg = ml_collections.ConfigDict(
        dict(
            learning_rate=0.1, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1e-3, lr_warmup_steps=0
        )
    )
    clipped = train_state.make_optimizer(opt_cfg)
    reference = optax.adamw(0.1, b1=0.9, b2=0.999, weight_decay=0.0)
    unclipped_cfg = ml_collections.ConfigDict(dict(opt_cfg.to_dict(), grad_clip=0.0))
    unclipped = train_state.make_optimizer(unclipped_cfg)

    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    rng = np.random.default_rng(0)
    grads_seq = [
        {
            "w": jnp.asarray(rng.normal(size=(4, 3)) * 10**k, jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)) * 10**k, jnp.float32),
        }
        for k in (0, 2, -1, 1)
    ]
    s_c, s_r, s_u = clipped.init(params), reference.init(params), unclipped.init(params)
    for step, g in enumerate(grads_seq):
        norm = float(optax.global_norm(g))
        assert norm > 1e-3
        g_clip = jax.tree.map(lambda x: x * (1e-3 / norm), g)
        u_c, s_c = clipped.update(g, s_c, params)
        u_r, s_r = reference.update(g_clip, s_r, params)
        u_u, s_u = unclipped.update(g, s_u, params)
        lib.assert_trees_close(u_c, u_r, rtol=1e-5, atol=1e-7, what=f"clipped step {step}")
        if step > 0:  # Adam's first step is scale-free; later the clipping shows
            assert any(
                np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-4
                for a, b in zip(jax.tree.leaves(u_c), jax.tree.leaves(u_u))
            ), step
