"""Speed of the embedded default: teacher and distillation steps/s, sampling images/s.

Usage: python benchmarks/default_speed.py [--config.x=y ...] [--results=PATH]
Appends one entry to the results file (common.py: --results, else $SCFLOW_BENCHMARK_RESULTS,
else runs/benchmarks/results.json). Compile time is reported separately.
"""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import record, time_calls  # noqa: E402
from scflow_jax import distill, sampling, sharding, teacher, train_state, trainer  # noqa: E402
from scflow_jax.tasks import build_task  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
)
_RESULTS = flags.DEFINE_string("results", None, "JSON file the entry is appended to (common.py)")


def _compiled_seconds(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(_):
    config = _CONFIG.value
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    task = build_task(config)
    out = {
        "config": {
            "model": config.model.to_dict(),
            "teacher_batch": config.teacher.batch_size,
            "distill_batch": config.distill.batch_size,
        }
    }

    # Teacher step.
    opt = train_state.make_optimizer(config.teacher.optimizer)
    init = lambda: (  # noqa: E731
        lambda p: train_state.FlowTrainState(
            step=jnp.zeros((), jnp.int32), params=p, ema_params=p, opt_state=opt.init(p)
        )
    )(task.init_params(jax.random.PRNGKey(0)))
    state, _, _ = trainer.init_state(init, mesh)
    out["teacher_params"] = train_state.count_params(state.params)
    step = teacher.make_train_step(task, config.teacher, opt, mesh, jax.random.PRNGKey(1))
    bs = config.teacher.batch_size
    batch = sharding.shard_batch({k: task.train[k][:bs] for k in ("image", "cond")}, mesh)
    holder = {"s": state}

    def teacher_call():
        holder["s"], m = step(holder["s"], batch)
        return m

    out["teacher_compile_s"] = _compiled_seconds(teacher_call)
    t = time_calls(teacher_call, warmup=2, repeats=20)
    out["teacher_step"] = {
        **t,
        "steps_per_s": 1.0 / t["median_s"],
        "examples_per_s": bs / t["median_s"],
    }

    # Distillation step (all terms on).
    teacher_params = holder["s"].ema_params
    d_opt = train_state.make_optimizer(config.distill.optimizer)
    disc_opt = train_state.make_optimizer(config.disc.optimizer)
    dstate, _, _ = trainer.init_state(
        functools.partial(
            distill.init_distill_state,
            task.init_disc_params,
            teacher_params,
            d_opt,
            disc_opt,
            jax.random.PRNGKey(2),
        ),
        mesh,
    )
    dstep = distill.make_train_step(
        distill.networks(task), config.scflow, d_opt, disc_opt, jax.random.PRNGKey(3)
    )
    frozen = {
        "teacher_params": teacher_params,
        "null_cond": sharding.put_replicated(jnp.asarray(task.null_cond), mesh),
    }
    dbs = config.distill.batch_size
    dbatch = sharding.shard_batch({k: task.train[k][:dbs] for k in ("image", "cond")}, mesh)
    dholder = {"s": dstate}

    def distill_call():
        dholder["s"], m = dstep(dholder["s"], dbatch, frozen)
        return m

    out["distill_compile_s"] = _compiled_seconds(distill_call)
    t = time_calls(distill_call, warmup=2, repeats=10)
    out["distill_step"] = {
        **t,
        "steps_per_s": 1.0 / t["median_s"],
        "examples_per_s": dbs / t["median_s"],
    }

    # Sampling throughput at a fixed batch of 256.
    n = 256
    z1 = jax.random.normal(jax.random.PRNGKey(4), (n,) + task.image_shape)
    cond = jnp.asarray(task.conditions(jnp.arange(n) % 10))
    null = jnp.asarray(task.null_cond)
    out["sampling"] = {}
    for steps, guidance in ((1, 1.0), (4, 1.0), (32, 1.0), (32, 1.5)):
        run = jax.jit(
            functools.partial(sampling.sample, task.velocity_fn, num_steps=steps, guidance=guidance)
        )
        fn = lambda: run(dholder["s"].ema_params, z1, cond, null_cond=null)  # noqa: E731
        compile_s = _compiled_seconds(fn)
        t = time_calls(fn, warmup=1, repeats=5)
        out["sampling"][f"euler{steps}_cfg{guidance:g}"] = {
            **t,
            "batch": n,
            "images_per_s": n / t["median_s"],
            "compile_s": compile_s,
        }
    record("default_speed", out, path=_RESULTS.value)


if __name__ == "__main__":
    app.run(main)
