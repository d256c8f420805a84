"""Shared helpers of the training, CLI, sharding and multi-process tests (not a test module).

Compile time dominates these tests on a small CPU machine, so every run here uses ONE
test configuration (``make_config``): the tiny variant plus a few overrides, on a 1-device
mesh unless a test asks for 8 devices. The same programs are then traced once per process
and compiled once per machine (persistent compile cache, which subprocesses share through
``subprocess_env``).

``shared_run()`` runs ``main.run(config, workdir, "all")`` once per pytest session (whichever
test file asks first) and records what each stage returned, so both test files reuse one
trained teacher, one distilled student and one evaluation.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Applied on top of get_config("tiny") for every run of these tests (in-process and CLI),
# so that in-process references and subprocess runs build identical programs.
OVERRIDES = {
    "mesh.num_devices": 1,
    # Enough steps that a subprocess can be signalled mid-run; still ~1 s of compute.
    "teacher.num_steps": 30,
    "teacher.checkpoint_every": 10,
    "teacher.log_every": 2,
    # Without the 200-step lr warm-up the teacher moves in 30 steps, so its output depends
    # on its input and every SCFlow term is visibly non-zero in the distillation tests.
    "teacher.optimizer.lr_warmup_steps": 0,
    # Warm-ups and EMA rates the distillation tests check (distinct from each other and from
    # the defaults, so a swapped or ignored setting shows).
    "scflow.warmup_rf": 2,
    "scflow.warmup_inv": 3,
    "scflow.warmup_gan": 2,
    "scflow.target_ema": 0.7,
    "scflow.eval_ema": 0.4,
}
TEACHER_STEPS = OVERRIDES["teacher.num_steps"]


def set_field(config, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def make_config(num_devices: int = 1, **extra):
    """The test configuration; ``extra`` maps dotted names (with '__' for '.') to values."""
    from scflow_jax.default_config import get_config

    config = get_config("tiny")
    for k, v in OVERRIDES.items():
        set_field(config, k, v)
    set_field(config, "mesh.num_devices", num_devices)
    for k, v in extra.items():
        set_field(config, k.replace("__", "."), v)
    return config


def cli_flags(**extra) -> list[str]:
    """The CLI spelling of ``make_config()`` (plus dotted ``extra`` overrides)."""
    flags = ["--config=configs/default.py:tiny"]
    for k, v in {**OVERRIDES, **extra}.items():
        flags.append(f"--config.{k}={v}")
    return flags


def subprocess_env() -> dict:
    """The test session's environment (8 fake CPU devices) plus its compile cache."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def cli_command(workdir: str, mode: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scflow_jax.main",
        f"--workdir={workdir}",
        f"--mode={mode}",
        *flags,
    ]


def start_cli(workdir: str, mode: str, *flags: str, **popen_kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(workdir, mode, *flags),
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


# ------------------------------------------------------------------------ state helpers
def to_host(tree: Any) -> Any:
    """A numpy copy (safe against later donation of the device buffers)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_trees_equal(a: Any, b: Any, what: str = "") -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"{what}: tree structures differ"
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=f"{what}: leaf {jax.tree_util.keystr(path)}"
        )


def assert_trees_close(a: Any, b: Any, *, rtol: float, atol: float, what: str = "") -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"{what}: tree structures differ"
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(
            np.asarray(x),
            np.asarray(y),
            rtol=rtol,
            atol=atol,
            err_msg=f"{what}: leaf {jax.tree_util.keystr(path)}",
        )


def abstract_params(task) -> Any:
    return jax.eval_shape(task.init_params, jax.random.PRNGKey(0))


def load_exported_params(config, path: str) -> Any:
    """A stage's exported parameter tree as numpy."""
    from scflow_jax import checkpoint, sharding
    from scflow_jax.tasks import build_task

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    abstract = abstract_params(build_task(config))
    return to_host(
        checkpoint.load_params(path, abstract, sharding.state_shardings(abstract, mesh), what=path)
    )


# ---------------------------------------------------------- stage pieces, as stages build them
def teacher_init(config):
    """What teacher.train_teacher builds before its loop: (task, optimizer, root_key, init_fn)."""
    from scflow_jax import train_state
    from scflow_jax.tasks import build_task

    task = build_task(config)
    optimizer = train_state.make_optimizer(config.teacher.optimizer)
    init_key, root_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))

    def init_fn():
        params = task.init_params(init_key)
        return train_state.FlowTrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=optimizer.init(params),
        )

    return task, optimizer, root_key, init_fn


def export_perturbed_teacher(path: str) -> None:
    """Exports the tiny config's teacher parameters, perturbed so that the zero-initialised output
    layers do not make every term trivial."""
    from scflow_jax import checkpoint
    from scflow_jax.default_config import get_config
    from scflow_jax.tasks import build_task

    task = build_task(get_config("tiny"))
    params = task.init_params(jax.random.PRNGKey(5))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    checkpoint.save_params(path, params)


def run_teacher_steps(config, num_steps: int):
    """``num_steps`` teacher steps through teacher.make_train_step: (per-step metrics, state)."""
    from scflow_jax import sharding, teacher, trainer
    from scflow_jax.data.pipeline import InMemoryBatches

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    task, optimizer, root_key, init_fn = teacher_init(config)
    state, _, _ = trainer.init_state(init_fn, mesh)
    step = teacher.make_train_step(task, config.teacher, optimizer, mesh, root_key)
    data = InMemoryBatches(
        {k: task.train[k] for k in ("image", "cond")}, config.teacher.batch_size, seed=config.seed
    )
    metrics = []
    for s in range(num_steps):
        state, m = step(state, sharding.shard_batch(data.batch(s), mesh))
        metrics.append(to_host(m))
    return metrics, to_host(state)


@dataclasses.dataclass
class DistillRun:
    metrics: list  # per step, numpy
    states: list  # states[i]: the state after i steps (numpy); states[0] = init
    teacher_loaded: Any  # the frozen teacher as loaded, copied to numpy before step 1
    teacher_after: Any  # the frozen teacher device arrays read back after the last step
    cache_size: int | None  # compiled variants of the jitted step after the run
    traces: int  # how many times the step function was traced


def run_distill_steps(config, workdir: str, num_steps: int) -> DistillRun:
    """Builds the pieces exactly as distill.distill does and runs ``num_steps`` steps."""
    from scflow_jax import distill, sharding, train_state, trainer
    from scflow_jax.data.pipeline import InMemoryBatches
    from scflow_jax.tasks import build_task

    distill.validate_scflow_config(config.scflow)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    task = build_task(config)
    teacher_params = distill.load_teacher_params(config, workdir, task, mesh)
    teacher_loaded = to_host(teacher_params)
    optimizer = train_state.make_optimizer(config.distill.optimizer)
    disc_optimizer = train_state.make_optimizer(config.disc.optimizer)
    disc_key, root_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
    state, _, _ = trainer.init_state(
        functools.partial(
            distill.init_distill_state,
            task.init_disc_params,
            teacher_params,
            optimizer,
            disc_optimizer,
            disc_key,
        ),
        mesh,
    )
    frozen = {
        "teacher_params": teacher_params,
        "null_cond": sharding.put_replicated(jnp.asarray(task.null_cond), mesh),
    }

    # Count traces with a side effect inside the traced function (works whatever jax's
    # private cache API is): wrap the task's velocity function, which every trace calls.
    traces = {"n": 0}
    original_velocity = task.velocity_fn

    class CountingTask:
        def __getattr__(self, name):
            return getattr(task, name)

        def velocity_fn(self, *args):
            traces["active"] = True
            return original_velocity(*args)

    step = distill.make_train_step(
        distill.networks(CountingTask()), config.scflow, optimizer, disc_optimizer, root_key
    )
    data = InMemoryBatches(
        {k: task.train[k] for k in ("image", "cond")},
        config.distill.batch_size,
        seed=config.seed + 1,
    )
    states, metrics = [to_host(state)], []
    for s in range(num_steps):
        traces["active"] = False
        state, m = step(state, sharding.shard_batch(data.batch(s), mesh), frozen)
        traces["n"] += int(traces["active"])
        metrics.append(to_host(m))
        states.append(to_host(state))
    cache_size = step._cache_size() if hasattr(step, "_cache_size") else None
    return DistillRun(
        metrics=metrics,
        states=states,
        teacher_loaded=teacher_loaded,
        teacher_after=to_host(frozen["teacher_params"]),
        cache_size=cache_size,
        traces=traces["n"],
    )


# ------------------------------------------------------------------------- the shared run
@dataclasses.dataclass
class SharedRun:
    workdir: str
    config: Any
    exit_code: int
    seconds: float
    teacher_state: Any  # teacher LoopResult.state (numpy), as the stage returned it
    teacher_preempted: bool
    distill_state: Any  # distill LoopResult.state (numpy)
    distill_preempted: bool
    eval_rows: list
    stage_calls: list


_SHARED: dict = {}


def shared_run() -> SharedRun:
    """``main.run(make_config(), wd, "all")`` once per session, with each stage's result."""
    if "error" in _SHARED:
        raise RuntimeError("the shared main.run(..., 'all') failed earlier") from _SHARED["error"]
    if "run" in _SHARED:
        return _SHARED["run"]
    from scflow_jax import distill, evaluate, main, teacher

    workdir = tempfile.mkdtemp(prefix="scflow_shared_")
    atexit.register(shutil.rmtree, workdir, True)
    config = make_config()
    captured: dict = {}
    calls: list = []

    def spy(name, fn):
        def wrapper(cfg, wd):
            calls.append(name)
            result = fn(cfg, wd)
            if name == "evaluate":
                captured[name] = result
            else:
                captured[name] = (to_host(result.state), result.preempted)
            return result

        return wrapper

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(teacher, "train_teacher", spy("train_teacher", teacher.train_teacher))
            mp.setattr(distill, "distill", spy("distill", distill.distill))
            mp.setattr(evaluate, "evaluate", spy("evaluate", evaluate.evaluate))
            start = time.perf_counter()
            code = main.run(config, workdir, "all")
            seconds = time.perf_counter() - start
    except BaseException as e:  # noqa: BLE001 - remembered for the other tests
        _SHARED["error"] = e
        raise
    _SHARED["run"] = SharedRun(
        workdir=workdir,
        config=config,
        exit_code=code,
        seconds=seconds,
        teacher_state=captured["train_teacher"][0],
        teacher_preempted=captured["train_teacher"][1],
        distill_state=captured["distill"][0],
        distill_preempted=captured["distill"][1],
        eval_rows=captured["evaluate"],
        stage_calls=calls,
    )
    return _SHARED["run"]


class SamplerReached(Exception):
    """Raised by ``stop_at_sampler``'s spy where a stage starts sampling (nothing compiles)."""


def stop_at_sampler(monkeypatch) -> list:
    """Makes ``sampling.sample`` record the compute dtype of the network it integrates and
    stop the stage (SamplerReached); returns the recorded dtypes."""
    from scflow_jax import sampling

    seen = []

    def spy(velocity_fn, *args, **kwargs):
        seen.append(velocity_fn.__self__.model.dtype)  # the task whose network is sampled
        raise SamplerReached

    monkeypatch.setattr(sampling, "sample", spy)
    return seen
