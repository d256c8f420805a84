"""Shared helpers of the maths tests (tests/test_maths_*.py; not a test module).

Every expected value in those tests is derived analytically (closed forms of toy fields) or
recomputed independently in numpy from the quantities the code returns; nothing is copied from
a run. The toy "networks" here are plain closures over small parameter dicts, so nothing big
compiles.
"""

from __future__ import annotations

import ml_collections
import numpy as np

import jax.numpy as jnp

from scflow_jax import flows
from scflow_jax.losses import scflow


def rand(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def bt(t, x):
    """numpy broadcast of per-example times against x."""
    t = np.asarray(t)
    return t.reshape(t.shape + (1,) * (np.ndim(x) - t.ndim))


def softplus(x):
    x = np.asarray(x, np.float64)
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def counting(fn):
    calls = []

    def wrapped(params, t, x, cond):
        calls.append((jnp.shape(t), jnp.shape(x), jnp.shape(cond)))
        return fn(params, t, x, cond)

    return wrapped, calls


def toy_velocity(params, t, x, cond):
    """Depends on t, x and cond, so a mixed-up argument changes the value."""
    return (
        params["w"] * x
        + flows.broadcast_time(t, x)
        + flows.broadcast_time(jnp.sum(cond, axis=-1), x)
    )


# --- toy networks for prepare_generator_inputs / generator losses ------------------------

B = 8
SHAPE = (B, 2, 3)
CDIM = 4


def np_toy(w, t, x, cond):
    """numpy twin of toy_velocity."""
    return w * x + bt(t, x) + bt(np.sum(cond, axis=-1), x)


def teacher_fn(params, t, x, cond):
    """A different function from the student's, so swapped networks would show."""
    return (
        params["a"] * x
        + 2.0 * flows.broadcast_time(t, x)
        - flows.broadcast_time(jnp.mean(cond, axis=-1), x)
    )


def np_teacher(a, t, x, cond):
    return a * x + 2.0 * bt(t, x) - bt(np.mean(cond, axis=-1), x)


def toy_disc(params, x, cond):
    """Per-sample D: sum over pixels of tanh(W*x), no cross-sample coupling."""
    return jnp.sum(jnp.tanh(params["W"] * x).reshape(x.shape[0], -1), axis=-1)


def scflow_cfg(tiny_config, **edits):
    cfg = ml_collections.ConfigDict(tiny_config.scflow.to_dict())
    for k, v in edits.items():
        cfg[k] = v
    return cfg


def toy_data(seed=50):
    z0 = rand(seed, SHAPE)
    cond = rand(seed + 1, (B, CDIM))
    null = rand(seed + 2, (CDIM,))
    return jnp.asarray(z0), jnp.asarray(cond), jnp.asarray(null)


def toy_nets(teacher=teacher_fn, student=toy_velocity, disc=toy_disc):
    return scflow.SCFlowNetworks(velocity_fn=student, teacher_velocity_fn=teacher, disc_fn=disc)


def np_inputs(inp):
    return {k: (None if v is None else np.asarray(v, np.float64)) for k, v in vars(inp).items()}
