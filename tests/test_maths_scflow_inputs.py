"""Maths checks of the SCFlow objective's ingredients: distances, local step sizes, term
weights and the generator's inputs and targets (CPU, tiny arrays; toy networks and numpy
references from maths_testlib).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from maths_testlib import (
    B,
    SHAPE,
    bt,
    counting,
    np_inputs,
    np_teacher,
    np_toy,
    rand,
    scflow_cfg,
    teacher_fn,
    toy_data,
    toy_nets,
    toy_velocity,
)
from scflow_jax.losses import scflow


def test_pseudo_huber():
    x, y = rand(40, (3, 5)), rand(41, (3, 5))
    c = 0.3
    d = x.astype(np.float64) - y
    np.testing.assert_allclose(
        scflow.pseudo_huber(x, y, c), np.mean(np.sqrt(d * d + c * c) - c), rtol=1e-5
    )
    small = np.full((4,), 1e-2, np.float32)
    np.testing.assert_allclose(
        scflow.pseudo_huber(small, 0 * small, 1.0), 0.5 * 1e-4 / 1.0, rtol=2e-2
    )
    big = np.array([100.0, -200.0], np.float32)
    np.testing.assert_allclose(scflow.pseudo_huber(big, 0 * big, 0.01), 150.0 - 0.01, rtol=1e-6)
    assert float(scflow.pseudo_huber(x, x, 0.01)) == 0.0
    np.testing.assert_allclose(scflow.mean_squared_error(x, y), np.mean(d * d), rtol=1e-5)


@pytest.mark.parametrize("delta", [0.1, 1.0])
def test_local_step_sizes_stay_in_range(delta):
    t = jnp.asarray(
        np.concatenate(
            [[0.0, 1.0, delta, 1 - delta], np.random.default_rng(0).uniform(size=4000)]
        ).astype(np.float32)
    )
    dm, dp = (np.asarray(a) for a in scflow.local_step_sizes(jax.random.key(0), t, delta))
    t = np.asarray(t)
    tol = 1e-7
    assert np.all(dm >= 0) and np.all(dp >= 0)
    assert np.all(dm <= np.minimum(t, delta) + tol)
    assert np.all(dp <= np.minimum(1 - t, delta) + tol)
    assert np.all(t - dm >= -tol) and np.all(t + dp <= 1 + tol)
    assert np.all(dm <= delta + tol) and np.all(dp <= delta + tol)
    # u1, u2 ~ U[0,1) independent: the normalised steps average 1/2 and are uncorrelated.
    inner = (t > 0) & (t < 1)
    u1 = dm[inner] / np.minimum(t[inner], delta)
    u2 = dp[inner] / np.minimum(1 - t[inner], delta)
    assert 0.47 < u1.mean() < 0.53 and 0.47 < u2.mean() < 0.53
    assert abs(np.corrcoef(u1, u2)[0, 1]) < 0.06


def test_term_weight():
    for step, expected in [(0, 0.0), (4, 0.0), (5, 0.25), (100, 0.25)]:
        w = scflow.term_weight(0.25, 5, jnp.asarray(step, jnp.int32))
        assert w.dtype == jnp.float32 and float(w) == expected
    assert float(scflow.term_weight(0.1, 0, jnp.asarray(0, jnp.int32))) == np.float32(0.1)


def test_prepare_generator_inputs_targets_truncation_and_cfg(tiny_config):
    cfg = scflow_cfg(tiny_config, teacher_cfg=1.5, trunc_threshold=0.4, init_threshold=0.3)
    z0, cond, null = toy_data()
    teacher, tcalls = counting(teacher_fn)
    student, scalls = counting(toy_velocity)
    tp, sp = {"a": jnp.float32(0.6)}, {"w": jnp.float32(-0.3)}
    inp = scflow.prepare_generator_inputs(
        jax.random.key(7),
        z0,
        cond,
        teacher_params=tp,
        target_params=sp,
        null_cond=null,
        nets=toy_nets(teacher, student),
        cfg=cfg,
    )
    # One teacher call (CFG on the doubled batch), one target call (t-, t+ doubled batch).
    assert [c[1][0] for c in tcalls] == [2 * B]
    assert [c[1][0] for c in scalls] == [2 * B]
    n = np_inputs(inp)
    z0n, condn, nulln = (np.asarray(a, np.float64) for a in (z0, cond, null))
    t, tm, z1 = n["t"], n["t_minus"], n["z1"]
    np.testing.assert_allclose(n["z0"], z0n)
    np.testing.assert_allclose(n["cond"], condn)
    np.testing.assert_allclose(n["x_t"], bt(t, z0n) * z1 + (1 - bt(t, z0n)) * z0n, atol=1e-6)
    assert np.all(t >= 0) and np.all(t < 1)
    d_minus = t - tm
    assert np.all(d_minus >= -1e-7) and np.all(d_minus <= np.minimum(t, 0.3) + 1e-6)
    # Teacher with CFG 1.5 and the null prompt, then an Euler step down to t-.
    v_c = np_teacher(0.6, t, n["x_t"], condn)
    v_n = np_teacher(0.6, t, n["x_t"], np.broadcast_to(nulln, condn.shape))
    v_t = v_n + 1.5 * (v_c - v_n)
    x_minus = n["x_t"] - bt(d_minus, z0n) * v_t
    pred = x_minus - bt(tm, z0n) * np_toy(-0.3, tm, x_minus, condn)
    truncated = tm < 0.4
    assert truncated.any() and (~truncated).any(), "seed must give both kinds of rows"
    for i in range(B):
        expected = z0n[i] if truncated[i] else pred[i]
        np.testing.assert_allclose(
            n["target_minus"][i], expected, rtol=1e-4, atol=1e-5, err_msg=f"row {i}, t-={tm[i]}"
        )
    assert n["target_plus"] is not None and n["target_plus"].shape == SHAPE


def test_prepare_generator_inputs_target_plus_is_an_up_step(tiny_config):
    """With a zero target network the targets are the Euler moves themselves:
    target+ = x_t + d+ * v_T with one scalar 0 <= d+ <= min(1-t, delta) per row."""
    delta = 0.3
    cfg = scflow_cfg(tiny_config, teacher_cfg=1.0, trunc_threshold=0.0, init_threshold=delta)
    z0, cond, null = toy_data(60)
    zero = lambda params, t, x, c: jnp.zeros_like(x)  # noqa: E731
    inp = scflow.prepare_generator_inputs(
        jax.random.key(8),
        z0,
        cond,
        teacher_params={"a": jnp.float32(0.6)},
        target_params=None,
        null_cond=null,
        nets=toy_nets(student=zero),
        cfg=cfg,
    )
    n = np_inputs(inp)
    condn = np.asarray(cond, np.float64)
    v_t = np_teacher(0.6, n["t"], n["x_t"], condn)  # teacher_cfg = 1: conditional only
    np.testing.assert_allclose(
        n["target_minus"], n["x_t"] - bt(n["t"] - n["t_minus"], v_t) * v_t, atol=1e-5
    )
    d_plus = ((n["target_plus"] - n["x_t"]) / v_t).reshape(B, -1)
    np.testing.assert_allclose(d_plus, np.broadcast_to(d_plus[:, :1], d_plus.shape), atol=1e-4)
    d_plus = d_plus[:, 0]
    assert np.all(d_plus >= -1e-6) and np.all(d_plus <= np.minimum(1 - n["t"], delta) + 1e-5)
    assert d_plus.max() > 1e-3


def test_prepare_generator_inputs_without_inverse_or_teacher(tiny_config):
    cfg = scflow_cfg(tiny_config, lambda_inv=0.0, use_teacher=False, trunc_threshold=0.0)
    z0, cond, null = toy_data(70)

    def no_teacher(*args):
        raise AssertionError("the teacher must not be called when use_teacher=False")

    student, scalls = counting(toy_velocity)
    inp = scflow.prepare_generator_inputs(
        jax.random.key(9),
        z0,
        cond,
        teacher_params=None,
        target_params={"w": jnp.float32(0.2)},
        null_cond=null,
        nets=toy_nets(teacher=no_teacher, student=student),
        cfg=cfg,
    )
    assert inp.target_plus is None
    assert [c[1][0] for c in scalls] == [B]  # only t-: no doubled batch
    n = np_inputs(inp)
    z0n, condn = np.asarray(z0, np.float64), np.asarray(cond, np.float64)
    tm = n["t_minus"]
    # Consistency training: x- lies on the straight path at t-.
    x_minus = bt(tm, z0n) * n["z1"] + (1 - bt(tm, z0n)) * z0n
    expected = x_minus - bt(tm, z0n) * np_toy(0.2, tm, x_minus, condn)
    np.testing.assert_allclose(n["target_minus"], expected, rtol=1e-4, atol=1e-5)


def test_prepare_generator_inputs_integer_timesteps(tiny_config):
    """Networks see floor(1000 t)/1000; Euler moves use the continuous step."""
    cfg = scflow_cfg(tiny_config, integer_timesteps=True, trunc_threshold=0.0, lambda_inv=0.0)
    z0, cond, null = toy_data(80)
    seen = {}

    def teacher(params, t, x, c):
        seen["teacher_t"] = np.asarray(t)
        return teacher_fn(params, t, x, c)

    def student(params, t, x, c):
        seen["target_t"] = np.asarray(t)
        return toy_velocity(params, t, x, c)

    inp = scflow.prepare_generator_inputs(
        jax.random.key(10),
        z0,
        cond,
        teacher_params={"a": jnp.float32(0.6)},
        target_params={"w": jnp.float32(0.2)},
        null_cond=null,
        nets=toy_nets(teacher, student),
        cfg=cfg,
    )
    n = np_inputs(inp)
    k = n["t"] * 1000
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # t is k/1000 already
    np.testing.assert_allclose(seen["teacher_t"], n["t"], atol=1e-7)
    # t- itself is continuous (the Euler step is not floored) ...
    km = n["t_minus"] * 1000
    assert np.abs(km - np.round(km)).max() > 0.05
    # ... while the target network sees it floored to the timestep below.
    kt = seen["target_t"].astype(np.float64) * 1000
    np.testing.assert_allclose(kt, np.round(kt), atol=1e-3)
    np.testing.assert_allclose(kt, np.floor(km), atol=1e-3)
    condn = np.asarray(cond, np.float64)
    v_t = np_teacher(0.6, n["t"], n["x_t"], condn)
    x_minus = n["x_t"] - bt(n["t"] - n["t_minus"], v_t) * v_t
    tn = np.asarray(seen["target_t"], np.float64)
    expected = x_minus - bt(n["t_minus"], v_t) * np_toy(0.2, tn, x_minus, condn)
    np.testing.assert_allclose(n["target_minus"], expected, rtol=1e-4, atol=1e-5)
