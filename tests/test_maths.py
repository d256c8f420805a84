"""Maths checks of the flow conventions, samplers, losses and optimizer (CPU, tiny arrays).

Every expected value is derived analytically (closed forms of toy fields) or recomputed
independently in numpy from the quantities the code returns; nothing is copied from a run.
The toy "networks" are plain closures over small parameter dicts, so nothing big compiles.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from scflow_jax import flows, sampling, train_state
from scflow_jax.losses import adversarial, flow_matching, scflow


def _rand(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _bt(t, x):
    """numpy broadcast of per-example times against x."""
    t = np.asarray(t)
    return t.reshape(t.shape + (1,) * (np.ndim(x) - t.ndim))


def _softplus(x):
    x = np.asarray(x, np.float64)
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# =========================================================================================
# 1. flows
# =========================================================================================


def test_interpolate_endpoints_and_linearity():
    z0, z1 = _rand(0, (3, 2, 4)), _rand(1, (3, 2, 4))
    np.testing.assert_array_equal(flows.interpolate(z0, z1, jnp.zeros(3)), z0)
    np.testing.assert_array_equal(flows.interpolate(z0, z1, jnp.ones(3)), z1)
    t = np.array([0.1, 0.5, 0.9], np.float32)
    x = np.asarray(flows.interpolate(z0, z1, t))
    np.testing.assert_allclose(x, _bt(t, z0) * z1 + (1 - _bt(t, z0)) * z0, rtol=1e-6, atol=1e-6)
    # Linear in t: x_t(a) + x_t(b) = 2 x_t((a+b)/2); per-example times stay per example.
    a, b = np.array([0.2, 0.0, 0.6], np.float32), np.array([0.4, 1.0, 0.8], np.float32)
    lhs = flows.interpolate(z0, z1, a) + flows.interpolate(z0, z1, b)
    np.testing.assert_allclose(lhs, 2 * flows.interpolate(z0, z1, (a + b) / 2), atol=1e-5)
    # d x_t / dt is the velocity target z1 - z0.
    dxdt = jax.jacfwd(lambda s: flows.interpolate(z0, z1, jnp.full((3,), s)))(0.3)
    np.testing.assert_allclose(dxdt, flows.velocity_target(z0, z1), atol=1e-6)
    np.testing.assert_allclose(flows.velocity_target(z0, z1), z1 - z0, atol=0)


@pytest.mark.parametrize("t", [0.0, 0.37, 0.999, 1.0])
def test_data_prediction_with_true_velocity_recovers_data(t):
    z0, z1 = _rand(2, (4, 5)), _rand(3, (4, 5))
    tt = jnp.full((4,), t)
    x = flows.interpolate(z0, z1, tt)
    np.testing.assert_allclose(flows.data_prediction(x, tt, z1 - z0), z0, atol=2e-6)
    np.testing.assert_allclose(flows.noise_prediction(x, tt, z1 - z0), z1, atol=2e-6)


def test_euler_move_forward_then_back_is_identity():
    x, v = _rand(4, (3, 2, 2)), _rand(5, (3, 2, 2))
    t0 = jnp.array([0.9, 0.5, 0.2])
    t1 = jnp.array([0.6, 0.55, 0.0])
    y = flows.euler_move(x, t0, t1, v)
    np.testing.assert_allclose(y, x + _bt(np.asarray(t1 - t0), x) * v, atol=1e-6)
    np.testing.assert_allclose(flows.euler_move(y, t1, t0, v), x, atol=1e-6)
    # Along the straight path an Euler move with z1 - z0 lands exactly on the path.
    z0, z1 = _rand(6, (3, 4)), _rand(7, (3, 4))
    moved = flows.euler_move(flows.interpolate(z0, z1, t0), t0, t1, z1 - z0)
    np.testing.assert_allclose(moved, flows.interpolate(z0, z1, t1), atol=2e-6)


def test_classifier_free_guidance_endpoints_and_formula():
    vc, vn = _rand(8, (2, 3)), _rand(9, (2, 3))
    np.testing.assert_allclose(flows.classifier_free_guidance(vc, vn, 1.0), vc, atol=1e-6)
    np.testing.assert_allclose(flows.classifier_free_guidance(vc, vn, 0.0), vn, atol=0)
    np.testing.assert_allclose(
        flows.classifier_free_guidance(vc, vn, 1.5), vn + 1.5 * (vc - vn), rtol=1e-6, atol=1e-6
    )


def _counting(fn):
    calls = []

    def wrapped(params, t, x, cond):
        calls.append((jnp.shape(t), jnp.shape(x), jnp.shape(cond)))
        return fn(params, t, x, cond)

    return wrapped, calls


def _toy_velocity(params, t, x, cond):
    """Depends on t, x and cond, so a mixed-up argument changes the value."""
    return (
        params["w"] * x
        + flows.broadcast_time(t, x)
        + flows.broadcast_time(jnp.sum(cond, axis=-1), x)
    )


def test_guided_velocity_matches_two_call_formula_with_one_doubled_call():
    params = {"w": jnp.float32(0.7)}
    batch = 3
    t = jnp.array([0.1, 0.5, 0.9])
    x = jnp.asarray(_rand(10, (batch, 2, 2)))
    cond = jnp.asarray(_rand(11, (batch, 4)))
    null = jnp.asarray(_rand(12, (4,)))
    fn, calls = _counting(_toy_velocity)
    v = flows.guided_velocity(fn, params, t, x, cond, null, 2.5)
    assert len(calls) == 1, calls
    assert calls[0] == ((2 * batch,), (2 * batch, 2, 2), (2 * batch, 4))
    v_cond = _toy_velocity(params, t, x, cond)
    v_null = _toy_velocity(params, t, x, jnp.broadcast_to(null, cond.shape))
    np.testing.assert_allclose(
        v,
        np.asarray(v_null) + 2.5 * (np.asarray(v_cond) - np.asarray(v_null)),
        rtol=1e-5,
        atol=1e-5,
    )
    # Guidance 1 (or no null condition) is a single conditional call on the plain batch.
    calls.clear()
    np.testing.assert_allclose(flows.guided_velocity(fn, params, t, x, cond, null, 1.0), v_cond)
    np.testing.assert_allclose(flows.guided_velocity(fn, params, t, x, cond, None, 3.0), v_cond)
    assert [c[1][0] for c in calls] == [batch, batch]


def test_sample_time_ranges():
    t = np.asarray(flows.sample_time(jax.random.key(0), 4000))
    assert t.shape == (4000,) and t.dtype == np.float32
    assert t.min() >= 0.0 and t.max() < 1.0
    assert 0.47 < t.mean() < 0.53 and t.min() < 0.01 and t.max() > 0.99
    k = np.asarray(flows.sample_time(jax.random.key(1), 4000, integer_timesteps=True)) * 1000
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert k.min() >= 0 and np.round(k).max() <= 999
    assert len(np.unique(np.round(k))) > 900  # uses the whole range 0..999


def test_floor_to_timestep():
    t = jnp.array([0.0, 0.0015, 0.2567, 0.5, 0.9999, 1.0])
    np.testing.assert_allclose(
        flows.floor_to_timestep(t), [0.0, 0.001, 0.256, 0.5, 0.999, 1.0], atol=1e-7
    )
    np.testing.assert_allclose(flows.floor_to_timestep(jnp.array([0.26]), 10), [0.2], atol=1e-7)


def test_wrap_diffusers_rectified_flow_scales_time_and_negates():
    seen = {}

    def unet_apply(params, x, timestep, cond):
        seen["timestep"] = np.asarray(timestep)
        return params * x + cond

    vf = flows.wrap_diffusers_rectified_flow(unet_apply)
    x, cond = _rand(13, (2, 3)), _rand(14, (2, 3))
    t = jnp.array([0.25, 0.999])
    v = vf(2.0, t, x, cond)
    np.testing.assert_allclose(seen["timestep"], [250.0, 999.0], rtol=1e-6)
    np.testing.assert_allclose(v, -(2.0 * x + cond), rtol=1e-6)


# =========================================================================================
# 2. sampling
# =========================================================================================


def _const_field(v):
    return lambda params, t, x, cond: jnp.broadcast_to(v, x.shape)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 7])
def test_sampling_constant_field_is_exact(method, num_steps):
    z1, v = _rand(20, (2, 3)), _rand(21, (2, 3))
    out = sampling.sample(_const_field(v), None, z1, None, num_steps=num_steps, method=method)
    np.testing.assert_allclose(out, z1 - v, atol=2e-6)


def test_one_euler_step_is_one_step_map():
    params = {"w": jnp.float32(-0.4)}
    z1, cond = _rand(22, (3, 4)), _rand(23, (3, 2))
    out = sampling.sample(_toy_velocity, params, z1, cond, num_steps=1)
    # z1 - F(1, z1, c), in numpy.
    expected = z1 - (-0.4 * z1 + 1.0 + cond.sum(-1)[:, None])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 3, 8])
def test_sampling_linear_field_matches_closed_form(num_steps):
    a = 0.8
    lin = lambda params, t, x, cond: a * x  # noqa: E731
    z1 = _rand(24, (2, 5))
    h = 1.0 / num_steps
    euler = sampling.sample(lin, None, z1, None, num_steps=num_steps, method="euler")
    np.testing.assert_allclose(euler, (1 - a * h) ** num_steps * z1, rtol=1e-5, atol=1e-6)
    # Heun per step: x_e = (1-ah)x; x' = x - h/2 (a x + a x_e) = (1 - ah + (ah)^2/2) x.
    heun = sampling.sample(lin, None, z1, None, num_steps=num_steps, method="heun")
    np.testing.assert_allclose(
        heun, (1 - a * h + (a * h) ** 2 / 2) ** num_steps * z1, rtol=1e-5, atol=1e-6
    )
    # Both approach the exact solution exp(-a) z1, Heun more closely.
    exact = np.exp(-a) * z1
    if num_steps > 1:
        assert np.abs(heun - exact).max() < np.abs(euler - exact).max()


def test_sampling_uses_the_time_grid():
    """A time-dependent field: x' = x - h * t_i per Euler step, so x_N = z1 - h * sum t_i."""
    tf = lambda params, t, x, cond: flows.broadcast_time(t, x) * jnp.ones_like(x)  # noqa: E731
    z1 = _rand(25, (2, 3))
    out = sampling.sample(tf, None, z1, None, num_steps=4)
    np.testing.assert_allclose(out, z1 - 0.25 * (1 + 0.75 + 0.5 + 0.25), atol=1e-6)
    # Heun integrates a linear-in-t field exactly: x(0) = z1 - int_0^1 t dt = z1 - 0.5.
    out = sampling.sample(tf, None, z1, None, num_steps=3, method="heun")
    np.testing.assert_allclose(out, z1 - 0.5, atol=1e-6)


def test_time_grid():
    np.testing.assert_allclose(sampling.time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0], atol=0)
    np.testing.assert_allclose(sampling.time_grid(1), [1.0, 0.0], atol=0)
    assert sampling.time_grid(7).shape == (8,)


def test_make_sampler_jitted_equals_unjitted():
    params = {"w": jnp.float32(0.3)}
    z1, cond = _rand(26, (3, 4)), _rand(27, (3, 2))
    null = np.zeros((2,), np.float32)
    for guidance in (1.0, 2.0):
        sampler = sampling.make_sampler(
            _toy_velocity, num_steps=3, method="heun", guidance=guidance
        )
        eager = sampling.sample(
            _toy_velocity,
            params,
            z1,
            cond,
            num_steps=3,
            method="heun",
            null_cond=null,
            guidance=guidance,
        )
        np.testing.assert_allclose(sampler(params, z1, cond, null), eager, rtol=1e-5, atol=1e-5)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="num_steps"):
        sampling.sample(_const_field(1.0), None, jnp.zeros((1, 2)), None, num_steps=0)
    with pytest.raises(ValueError, match="rk4"):
        sampling.sample(_const_field(1.0), None, jnp.zeros((1, 2)), None, num_steps=2, method="rk4")
    with pytest.raises(ValueError, match="rng"):
        sampling.sample(
            _const_field(1.0), None, jnp.zeros((1, 2)), None, num_steps=2, stochastic_beta=0.5
        )


def test_stochastic_sampling():
    params = {"w": jnp.float32(0.5)}
    z1, cond = _rand(28, (3, 4)), _rand(29, (3, 2))
    det = sampling.sample(_toy_velocity, params, z1, cond, num_steps=1)
    sto = sampling.sample(
        _toy_velocity, params, z1, cond, num_steps=1, stochastic_beta=0.0, rng=jax.random.key(0)
    )
    np.testing.assert_allclose(sto, det, rtol=1e-6, atol=1e-6)
    # Two steps, beta = 0: x_half = 0.5*x0_hat + 0.5*z1, then x0 = x_half - 0.5 F(0.5, x_half).
    sto2 = sampling.sample(
        _toy_velocity, params, z1, cond, num_steps=2, stochastic_beta=0.0, rng=jax.random.key(0)
    )
    c = cond.sum(-1)[:, None]
    x0_hat = z1 - 1.0 * (0.5 * z1 + 1.0 + c)
    x_half = 0.5 * x0_hat + 0.5 * z1
    np.testing.assert_allclose(sto2, x_half - 0.5 * (0.5 * x_half + 0.5 + c), rtol=1e-5, atol=1e-5)
    # beta = 1 re-noises with fresh noise: the result depends on the key.
    a = sampling.sample(
        _toy_velocity, params, z1, cond, num_steps=2, stochastic_beta=1.0, rng=jax.random.key(0)
    )
    b = sampling.sample(
        _toy_velocity, params, z1, cond, num_steps=2, stochastic_beta=1.0, rng=jax.random.key(1)
    )
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2)])
def test_sample_is_one_program_with_a_loop(method, per_step):
    fn, calls = _counting(_toy_velocity)
    params = {"w": jnp.float32(0.5)}
    z1, cond = jnp.zeros((2, 3)), jnp.zeros((2, 2))
    lowered = jax.jit(
        lambda p, z, c: sampling.sample(fn, p, z, c, num_steps=4, method=method)
    ).lower(params, z1, cond)
    assert "while" in lowered.as_text()
    # The network is traced once per loop body, not once per step.
    assert len(calls) == per_step
    assert sampling.network_calls(4, method, 1.0) == 4 * per_step
    assert sampling.network_calls(4, method, 1.5) == 8 * per_step


# =========================================================================================
# 3. flow matching loss
# =========================================================================================


def test_flow_matching_loss_is_velocity_regression():
    z0 = jnp.asarray(_rand(30, (16, 3, 2)))
    cond = jnp.zeros((16, 2))

    def exact_plus_c(params, t, x, c):
        # (x_t - z0)/t = z1 - z0 exactly on the straight path; + params shifts every element.
        return (x - z0) / flows.broadcast_time(t, x) + params

    rng = jax.random.key(3)
    loss, aux = flow_matching.flow_matching_loss(0.0, exact_plus_c, z0, cond, rng)
    assert float(loss) < 1e-6 and float(aux["loss_fm"]) == float(loss)
    loss, _ = flow_matching.flow_matching_loss(0.3, exact_plus_c, z0, cond, rng)
    np.testing.assert_allclose(loss, 0.09, rtol=1e-3)
    grad = jax.grad(lambda p: flow_matching.flow_matching_loss(p, exact_plus_c, z0, cond, rng)[0])(
        0.3
    )
    np.testing.assert_allclose(grad, 0.6, rtol=1e-3)


def test_flow_matching_noise_and_times_are_standard():
    seen = {}

    def zero(params, t, x, c):
        seen["t"], seen["c"] = np.asarray(t), np.asarray(c)
        return jnp.zeros_like(x)

    z0 = jnp.zeros((1000, 4))
    cond = jnp.ones((1000, 2))
    loss, _ = flow_matching.flow_matching_loss(
        None, zero, z0, cond, jax.random.key(0), null_cond=jnp.zeros((2,)), cond_drop_prob=0.5
    )
    # With z0 = 0 the loss is mean(z1^2) ~ 1 (chi-square mean over 4000 elements, sd 0.022).
    assert 0.9 < float(loss) < 1.1
    assert seen["t"].min() >= 0 and seen["t"].max() < 1 and 0.45 < seen["t"].mean() < 0.55
    dropped = np.all(seen["c"] == 0, axis=-1)
    assert np.all(dropped | np.all(seen["c"] == 1, axis=-1))
    assert 0.45 < dropped.mean() < 0.55


def test_drop_conditions():
    cond = jnp.asarray(_rand(31, (4000, 2, 3)) + 5.0)
    null = jnp.asarray(_rand(32, (2, 3)))
    out = np.asarray(flow_matching.drop_conditions(jax.random.key(0), cond, null, 1.0))
    np.testing.assert_array_equal(out, np.broadcast_to(null, cond.shape))
    out = np.asarray(flow_matching.drop_conditions(jax.random.key(0), cond, null, 0.0))
    np.testing.assert_array_equal(out, cond)
    out = np.asarray(flow_matching.drop_conditions(jax.random.key(0), cond, null, 0.5))
    is_null = np.all(out == np.asarray(null)[None], axis=(1, 2))
    is_cond = np.all(out == np.asarray(cond), axis=(1, 2))
    assert np.all(is_null ^ is_cond)  # whole examples are swapped, never parts
    assert 0.45 < is_null.mean() < 0.55


# =========================================================================================
# 4. SCFlow objective
# =========================================================================================


def test_pseudo_huber():
    x, y = _rand(40, (3, 5)), _rand(41, (3, 5))
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


# --- toy networks for prepare_generator_inputs / generator losses ------------------------

B = 8
SHAPE = (B, 2, 3)
CDIM = 4


def _np_toy(w, t, x, cond):
    """numpy twin of _toy_velocity."""
    return w * x + _bt(t, x) + _bt(np.sum(cond, axis=-1), x)


def _teacher_fn(params, t, x, cond):
    """A different function from the student's, so swapped networks would show."""
    return (
        params["a"] * x
        + 2.0 * flows.broadcast_time(t, x)
        - flows.broadcast_time(jnp.mean(cond, axis=-1), x)
    )


def _np_teacher(a, t, x, cond):
    return a * x + 2.0 * _bt(t, x) - _bt(np.mean(cond, axis=-1), x)


def _toy_disc(params, x, cond):
    """Per-sample D: sum over pixels of tanh(W*x), no cross-sample coupling."""
    return jnp.sum(jnp.tanh(params["W"] * x).reshape(x.shape[0], -1), axis=-1)


def _cfg(tiny_config, **edits):
    cfg = ml_collections.ConfigDict(tiny_config.scflow.to_dict())
    for k, v in edits.items():
        cfg[k] = v
    return cfg


def _data(seed=50):
    z0 = _rand(seed, SHAPE)
    cond = _rand(seed + 1, (B, CDIM))
    null = _rand(seed + 2, (CDIM,))
    return jnp.asarray(z0), jnp.asarray(cond), jnp.asarray(null)


def _nets(teacher=_teacher_fn, student=_toy_velocity, disc=_toy_disc):
    return scflow.SCFlowNetworks(velocity_fn=student, teacher_velocity_fn=teacher, disc_fn=disc)


def _np_inputs(inp):
    return {k: (None if v is None else np.asarray(v, np.float64)) for k, v in vars(inp).items()}


def test_prepare_generator_inputs_targets_truncation_and_cfg(tiny_config):
    cfg = _cfg(tiny_config, teacher_cfg=1.5, trunc_threshold=0.4, init_threshold=0.3)
    z0, cond, null = _data()
    teacher, tcalls = _counting(_teacher_fn)
    student, scalls = _counting(_toy_velocity)
    tp, sp = {"a": jnp.float32(0.6)}, {"w": jnp.float32(-0.3)}
    inp = scflow.prepare_generator_inputs(
        jax.random.key(7),
        z0,
        cond,
        teacher_params=tp,
        target_params=sp,
        null_cond=null,
        nets=_nets(teacher, student),
        cfg=cfg,
    )
    # One teacher call (CFG on the doubled batch), one target call (t-, t+ doubled batch).
    assert [c[1][0] for c in tcalls] == [2 * B]
    assert [c[1][0] for c in scalls] == [2 * B]
    n = _np_inputs(inp)
    z0n, condn, nulln = (np.asarray(a, np.float64) for a in (z0, cond, null))
    t, tm, z1 = n["t"], n["t_minus"], n["z1"]
    np.testing.assert_allclose(n["z0"], z0n)
    np.testing.assert_allclose(n["cond"], condn)
    np.testing.assert_allclose(n["x_t"], _bt(t, z0n) * z1 + (1 - _bt(t, z0n)) * z0n, atol=1e-6)
    assert np.all(t >= 0) and np.all(t < 1)
    d_minus = t - tm
    assert np.all(d_minus >= -1e-7) and np.all(d_minus <= np.minimum(t, 0.3) + 1e-6)
    # Teacher with CFG 1.5 and the null prompt, then an Euler step down to t-.
    v_c = _np_teacher(0.6, t, n["x_t"], condn)
    v_n = _np_teacher(0.6, t, n["x_t"], np.broadcast_to(nulln, condn.shape))
    v_t = v_n + 1.5 * (v_c - v_n)
    x_minus = n["x_t"] - _bt(d_minus, z0n) * v_t
    pred = x_minus - _bt(tm, z0n) * _np_toy(-0.3, tm, x_minus, condn)
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
    cfg = _cfg(tiny_config, teacher_cfg=1.0, trunc_threshold=0.0, init_threshold=delta)
    z0, cond, null = _data(60)
    zero = lambda params, t, x, c: jnp.zeros_like(x)  # noqa: E731
    inp = scflow.prepare_generator_inputs(
        jax.random.key(8),
        z0,
        cond,
        teacher_params={"a": jnp.float32(0.6)},
        target_params=None,
        null_cond=null,
        nets=_nets(student=zero),
        cfg=cfg,
    )
    n = _np_inputs(inp)
    condn = np.asarray(cond, np.float64)
    v_t = _np_teacher(0.6, n["t"], n["x_t"], condn)  # teacher_cfg = 1: conditional only
    np.testing.assert_allclose(
        n["target_minus"], n["x_t"] - _bt(n["t"] - n["t_minus"], v_t) * v_t, atol=1e-5
    )
    d_plus = ((n["target_plus"] - n["x_t"]) / v_t).reshape(B, -1)
    np.testing.assert_allclose(d_plus, np.broadcast_to(d_plus[:, :1], d_plus.shape), atol=1e-4)
    d_plus = d_plus[:, 0]
    assert np.all(d_plus >= -1e-6) and np.all(d_plus <= np.minimum(1 - n["t"], delta) + 1e-5)
    assert d_plus.max() > 1e-3


def test_prepare_generator_inputs_without_inverse_or_teacher(tiny_config):
    cfg = _cfg(tiny_config, lambda_inv=0.0, use_teacher=False, trunc_threshold=0.0)
    z0, cond, null = _data(70)

    def no_teacher(*args):
        raise AssertionError("the teacher must not be called when use_teacher=False")

    student, scalls = _counting(_toy_velocity)
    inp = scflow.prepare_generator_inputs(
        jax.random.key(9),
        z0,
        cond,
        teacher_params=None,
        target_params={"w": jnp.float32(0.2)},
        null_cond=null,
        nets=_nets(teacher=no_teacher, student=student),
        cfg=cfg,
    )
    assert inp.target_plus is None
    assert [c[1][0] for c in scalls] == [B]  # only t-: no doubled batch
    n = _np_inputs(inp)
    z0n, condn = np.asarray(z0, np.float64), np.asarray(cond, np.float64)
    tm = n["t_minus"]
    # Consistency training: x- lies on the straight path at t-.
    x_minus = _bt(tm, z0n) * n["z1"] + (1 - _bt(tm, z0n)) * z0n
    expected = x_minus - _bt(tm, z0n) * _np_toy(0.2, tm, x_minus, condn)
    np.testing.assert_allclose(n["target_minus"], expected, rtol=1e-4, atol=1e-5)


def test_prepare_generator_inputs_integer_timesteps(tiny_config):
    """Networks see floor(1000 t)/1000; Euler moves use the continuous step."""
    cfg = _cfg(tiny_config, integer_timesteps=True, trunc_threshold=0.0, lambda_inv=0.0)
    z0, cond, null = _data(80)
    seen = {}

    def teacher(params, t, x, c):
        seen["teacher_t"] = np.asarray(t)
        return _teacher_fn(params, t, x, c)

    def student(params, t, x, c):
        seen["target_t"] = np.asarray(t)
        return _toy_velocity(params, t, x, c)

    inp = scflow.prepare_generator_inputs(
        jax.random.key(10),
        z0,
        cond,
        teacher_params={"a": jnp.float32(0.6)},
        target_params={"w": jnp.float32(0.2)},
        null_cond=null,
        nets=_nets(teacher, student),
        cfg=cfg,
    )
    n = _np_inputs(inp)
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
    v_t = _np_teacher(0.6, n["t"], n["x_t"], condn)
    x_minus = n["x_t"] - _bt(n["t"] - n["t_minus"], v_t) * v_t
    tn = np.asarray(seen["target_t"], np.float64)
    expected = x_minus - _bt(n["t_minus"], v_t) * _np_toy(0.2, tn, x_minus, condn)
    np.testing.assert_allclose(n["target_minus"], expected, rtol=1e-4, atol=1e-5)


def _full_loss(tiny_config, **edits):
    """The objective's regression terms (no GAN term: no discriminator)."""
    cfg = _cfg(tiny_config, lambda_gan=0.0, **edits)
    z0, cond, null = _data(90)
    nets = _nets()

    def loss(params, target_params, teacher_params, z0_hat, step):
        inp = scflow.prepare_generator_inputs(
            jax.random.key(11),
            z0,
            cond,
            teacher_params=teacher_params,
            target_params=target_params,
            null_cond=null,
            nets=nets,
            cfg=cfg,
        )
        return scflow.generator_objective(params, z0_hat, inp, step, None, None, nets=nets, cfg=cfg)

    return loss, cfg, (z0, cond, null), nets


def test_generator_regression_gradients_are_stopped(tiny_config):
    loss, cfg, (z0, cond, null), nets = _full_loss(
        tiny_config, teacher_cfg=1.5, trunc_threshold=0.2
    )
    sp, tgt, tp = {"w": jnp.float32(0.3)}, {"w": jnp.float32(-0.2)}, {"a": jnp.float32(0.5)}
    z0_hat = jnp.asarray(_rand(91, SHAPE))
    step = jnp.asarray(0, jnp.int32)
    f = lambda *a: loss(*a)[0]  # noqa: E731
    g_student, g_target, g_teacher, g_hat = jax.grad(f, argnums=(0, 1, 2, 3))(
        sp, tgt, tp, z0_hat, step
    )
    assert abs(float(g_student["w"])) > 1e-4
    assert float(g_target["w"]) == 0.0
    assert float(g_teacher["a"]) == 0.0
    assert float(jnp.max(jnp.abs(g_hat))) == 0.0
    # ... while all of them change the loss value (so the zero gradients are not trivial).
    base = float(f(sp, tgt, tp, z0_hat, step))
    assert abs(float(f(sp, {"w": jnp.float32(0.4)}, tp, z0_hat, step)) - base) > 1e-5
    assert abs(float(f(sp, tgt, {"a": jnp.float32(0.9)}, z0_hat, step)) - base) > 1e-5
    assert abs(float(f(sp, tgt, tp, z0_hat + 1.0, step)) - base) > 1e-5


def test_generator_adversarial_loss_gradients(tiny_config):
    cfg = _cfg(tiny_config)
    z0, cond, _ = _data(95)
    nets = _nets()
    dp = {"W": jnp.asarray(_rand(96, SHAPE[1:]))}
    z0_hat = jnp.asarray(_rand(97, SHAPE))
    t_minus = jnp.full((B,), 0.3)

    def f(z, d):
        return scflow.generator_adversarial_loss(
            z, d, cond, t_minus, jax.random.key(0), nets=nets, cfg=cfg
        )

    g_z, g_d = jax.grad(f, argnums=(0, 1))(z0_hat, dp)
    assert float(jnp.max(jnp.abs(g_z))) > 1e-4
    assert float(jnp.max(jnp.abs(g_d["W"]))) == 0.0
    # Value: mean softplus(-D) on the raw logit (the toy D's networks have no sigmoid head).
    logits = np.tanh(np.asarray(dp["W"])[None] * np.asarray(z0_hat)).reshape(B, -1).sum(-1)
    np.testing.assert_allclose(f(z0_hat, dp), np.mean(_softplus(-logits)), rtol=1e-5)


def _np_regression_terms(n, w, z0_hat, huber_c, use_teacher):
    """Independent numpy evaluation of the generator terms for the toy student."""
    z0, z1, cond, t, x_t = n["z0"], n["z1"], n["cond"], n["t"], n["x_t"]
    current = x_t - _bt(t, x_t) * _np_toy(w, t, x_t, cond)

    def dist(a, b):
        d = a - b
        return np.mean(np.sqrt(d * d + huber_c**2) - huber_c) if use_teacher else np.mean(d * d)

    terms = {"loss_con": dist(current, n["target_minus"])}
    if n["target_plus"] is not None:
        terms["loss_inv"] = dist(current, n["target_plus"])
    if use_teacher:
        x_tilde = _bt(t, z1) * z1 + (1 - _bt(t, z1)) * z0_hat
        x0_tilde = x_tilde - _bt(t, x_tilde) * _np_toy(w, t, x_tilde, cond)
        terms["loss_rf"] = np.mean((x0_tilde - z0_hat) ** 2)
    else:
        terms["loss_rf"] = np.mean((current - z0) ** 2)
    return terms


@pytest.mark.parametrize("use_teacher", [True, False])
def test_generator_regression_terms_and_warmups(tiny_config, use_teacher):
    cfg = _cfg(
        tiny_config,
        lambda_con=1.0,
        lambda_rf=0.3,
        lambda_inv=0.2,
        warmup_rf=10,
        warmup_inv=5,
        huber_c=0.05,
        use_teacher=use_teacher,
        trunc_threshold=0.2,
        lambda_gan=0.0,
    )
    z0, cond, null = _data(100)
    nets = _nets()
    inp = scflow.prepare_generator_inputs(
        jax.random.key(12),
        z0,
        cond,
        teacher_params={"a": jnp.float32(0.4)},
        target_params={"w": jnp.float32(0.1)},
        null_cond=null,
        nets=nets,
        cfg=cfg,
    )
    z0_hat = _rand(101, SHAPE)
    n = _np_inputs(inp)
    expected = _np_regression_terms(n, 0.25, z0_hat.astype(np.float64), 0.05, use_teacher)
    for step, weights in [
        (0, dict(loss_con=1.0)),
        (5, dict(loss_con=1.0, loss_inv=0.2)),
        (9, dict(loss_con=1.0, loss_inv=0.2)),
        (10, dict(loss_con=1.0, loss_inv=0.2, loss_rf=0.3)),
    ]:
        loss, terms = scflow.generator_objective(
            {"w": jnp.float32(0.25)},
            jnp.asarray(z0_hat),
            inp,
            jnp.asarray(step, jnp.int32),
            None,
            None,
            nets=nets,
            cfg=cfg,
        )
        assert set(terms) == {"loss_con", "loss_inv", "loss_rf"}
        for k in terms:
            np.testing.assert_allclose(terms[k], expected[k], rtol=1e-4, err_msg=k)
        manual = sum(wt * expected[k] for k, wt in weights.items())
        np.testing.assert_allclose(loss, manual, rtol=1e-4, err_msg=f"step {step}")


def test_zero_lambda_terms_are_absent(tiny_config):
    z0, cond, null = _data(110)
    nets = _nets()
    for off, present in [
        ("lambda_inv", {"loss_con", "loss_rf"}),
        ("lambda_rf", {"loss_con", "loss_inv"}),
    ]:
        cfg = _cfg(tiny_config, lambda_gan=0.0, **{off: 0.0})
        inp = scflow.prepare_generator_inputs(
            jax.random.key(13),
            z0,
            cond,
            teacher_params={"a": jnp.float32(0.4)},
            target_params={"w": jnp.float32(0.1)},
            null_cond=null,
            nets=nets,
            cfg=cfg,
        )
        assert (inp.target_plus is None) == (off == "lambda_inv")
        student, calls = _counting(_toy_velocity)
        loss, terms = scflow.generator_objective(
            {"w": jnp.float32(0.25)},
            jnp.asarray(_rand(111, SHAPE)),
            inp,
            jnp.asarray(100, jnp.int32),
            None,
            None,
            nets=_nets(student=student),
            cfg=cfg,
        )
        assert set(terms) == present
        # Without L_rf the student runs on the plain batch (no x~_t half).
        assert calls[0][1][0] == (B if off == "lambda_rf" else 2 * B)
        n = _np_inputs(inp)
        expected = _np_regression_terms(
            n, 0.25, _rand(111, SHAPE).astype(np.float64), cfg.huber_c, True
        )
        lam = {"loss_con": cfg.lambda_con, "loss_rf": cfg.lambda_rf, "loss_inv": cfg.lambda_inv}
        np.testing.assert_allclose(loss, sum(lam[k] * expected[k] for k in present), rtol=1e-4)
    cfg = _cfg(tiny_config, lambda_gan=0.0, lambda_rf=0.1)
    assert not scflow.gan_enabled(cfg) and scflow.needs_one_step_sample(cfg)
    cfg = _cfg(tiny_config, lambda_gan=0.0, use_teacher=False)
    assert not scflow.needs_one_step_sample(cfg)


def _gan_setup(tiny_config, **edits):
    """Every term on, the GAN term warming up until step 5, and a toy discriminator."""
    settings = dict(
        lambda_con=1.0,
        lambda_rf=0.3,
        lambda_inv=0.2,
        lambda_gan=0.4,
        warmup_rf=0,
        warmup_inv=0,
        warmup_gan=5,
        trunc_threshold=0.2,
    )
    cfg = _cfg(tiny_config, **{**settings, **edits})
    z0, cond, null = _data(150)
    nets = _nets()
    inp = scflow.prepare_generator_inputs(
        jax.random.key(14),
        z0,
        cond,
        teacher_params={"a": jnp.float32(0.4)},
        target_params={"w": jnp.float32(0.1)},
        null_cond=null,
        nets=nets,
        cfg=cfg,
    )
    return cfg, inp, nets, {"W": jnp.asarray(_rand(151, SHAPE[1:]))}


def test_generator_objective_holds_the_gan_term_with_its_weight_and_warmup(tiny_config):
    """L = L_con + l_rf L_rf + l_G L_G + l_inv L_inv: L_G = mean softplus(-D(z0_hat)) enters
    with l_G once its warm-up is over, and it alone gives L a gradient w.r.t. z0_hat."""
    cfg, inp, nets, dp = _gan_setup(tiny_config)
    z0_hat = jnp.asarray(_rand(152, SHAPE))
    params, key = {"w": jnp.float32(0.25)}, jax.random.key(0)
    expected = _np_regression_terms(
        _np_inputs(inp), 0.25, np.asarray(z0_hat, np.float64), cfg.huber_c, True
    )
    logits = np.tanh(np.asarray(dp["W"], np.float64)[None] * np.asarray(z0_hat, np.float64))
    expected["loss_gan"] = np.mean(_softplus(-logits.reshape(B, -1).sum(-1)))
    g_gan = jax.grad(
        lambda z: scflow.generator_adversarial_loss(
            z, dp, inp.cond, inp.t_minus, key, nets=nets, cfg=cfg
        )
    )(z0_hat)
    assert float(jnp.max(jnp.abs(g_gan))) > 1e-4  # so the gradient checks tell on from off
    for step in (0, 4, 5, 9):

        def objective(p, z):
            return scflow.generator_objective(
                p, z, inp, jnp.asarray(step, jnp.int32), dp, key, nets=nets, cfg=cfg
            )

        (loss, terms), (_, g_z) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            params, z0_hat
        )
        assert set(terms) == {"loss_con", "loss_rf", "loss_inv", "loss_gan"}
        for k in terms:
            np.testing.assert_allclose(terms[k], expected[k], rtol=1e-4, err_msg=k)
        w_gan = 0.4 if step >= 5 else 0.0
        manual = (
            expected["loss_con"]
            + 0.3 * expected["loss_rf"]
            + w_gan * expected["loss_gan"]
            + 0.2 * expected["loss_inv"]
        )
        np.testing.assert_allclose(loss, manual, rtol=1e-4, err_msg=f"step {step}")
        # L_rf reads z0_hat detached: the gradient w.r.t. it is the weighted L_G's.
        np.testing.assert_allclose(
            g_z, w_gan * np.asarray(g_gan), rtol=1e-5, atol=1e-9, err_msg=f"step {step}"
        )


def test_shared_one_step_sample_gives_the_whole_objective_gradient(tiny_config):
    """generator_value_and_grad (the one-step sample computed once; L_G's gradient pulled back
    through its vjp) equals autodiff of the objective with the one-step sample recomputed from
    the parameters inside it; the student runs once at t = 1."""
    cfg, inp, _, dp = _gan_setup(tiny_config, warmup_gan=0)
    student, calls = _counting(_toy_velocity)
    nets = _nets(student=student)
    params, step, key = {"w": jnp.float32(0.25)}, jnp.asarray(3, jnp.int32), jax.random.key(1)
    shared = scflow.share_one_step_sample(params, inp.z1, inp.cond, nets=nets, cfg=cfg)
    (loss, terms), grads = scflow.generator_value_and_grad(
        params, shared, inp, step, dp, key, nets=nets, cfg=cfg
    )
    assert [c[1][0] for c in calls] == [B, 2 * B]  # t = 1 once; (x_t, x~_t) in one call

    def whole(p):
        z0_hat = scflow.one_step_sample(nets.velocity_fn, p, inp.z1, inp.cond)
        return scflow.generator_objective(p, z0_hat, inp, step, dp, key, nets=nets, cfg=cfg)

    (ref_loss, ref_terms), ref_grads = jax.value_and_grad(whole, has_aux=True)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in ref_terms:
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(grads["w"], ref_grads["w"], rtol=1e-5)
    # The pulled-back L_G gradient is a real part of it.
    local = jax.grad(
        lambda p: scflow.generator_objective(
            p, shared.value, inp, step, dp, key, nets=nets, cfg=cfg
        )[0]
    )(params)
    assert abs(float(grads["w"] - local["w"])) > 1e-3 * abs(float(grads["w"]))


def test_one_step_sample():
    z1, cond = _rand(120, SHAPE), _rand(121, (B, CDIM))
    out = scflow.one_step_sample(_toy_velocity, {"w": jnp.float32(0.3)}, jnp.asarray(z1), cond)
    np.testing.assert_allclose(out, z1 - _np_toy(0.3, np.ones(B), z1, cond), rtol=1e-5, atol=1e-5)


def test_discriminator_objective_matches_formulas(tiny_config):
    cfg = _cfg(tiny_config, r1_gamma=2.0)
    real, fake = _rand(130, SHAPE), _rand(131, SHAPE)
    dp = {"W": jnp.asarray(_rand(132, SHAPE[1:]))}
    loss, aux = scflow.discriminator_objective(
        dp,
        jnp.asarray(real),
        jnp.asarray(fake),
        None,
        jnp.full((B,), 0.5),
        jax.random.key(0),
        nets=_nets(),
        cfg=cfg,
    )
    W = np.asarray(dp["W"], np.float64)[None]
    d = lambda x: np.tanh(W * x).reshape(B, -1).sum(-1)  # noqa: E731
    gan = np.mean(_softplus(-d(real))) + np.mean(_softplus(d(fake)))
    grad = W * (1 - np.tanh(W * real) ** 2)  # analytic dD/dx per sample
    r1 = 0.5 * 2.0 * np.mean(np.sum(grad.reshape(B, -1) ** 2, -1))
    np.testing.assert_allclose(aux["loss_disc"], gan, rtol=1e-5)
    np.testing.assert_allclose(aux["r1"], r1, rtol=1e-4)
    np.testing.assert_allclose(loss, gan + r1, rtol=1e-5)
    # The fake branch is detached: no gradient to the generator's output through L_D.
    g_fake = jax.grad(
        lambda f: scflow.discriminator_objective(
            dp,
            jnp.asarray(real),
            f,
            None,
            jnp.full((B,), 0.5),
            jax.random.key(0),
            nets=_nets(),
            cfg=cfg,
        )[0]
    )(jnp.asarray(fake))
    assert float(jnp.max(jnp.abs(g_fake))) == 0.0


# =========================================================================================
# 5. adversarial losses
# =========================================================================================


@pytest.mark.parametrize("sigmoid_head", [False, True])
def test_gan_losses_are_softplus_formulas(sigmoid_head):
    real, fake = _rand(140, (7,), 3.0), _rand(141, (7,), 3.0)
    h = (lambda x: _sigmoid(x)) if sigmoid_head else (lambda x: np.asarray(x, np.float64))
    np.testing.assert_allclose(
        adversarial.generator_loss(fake, sigmoid_head=sigmoid_head),
        np.mean(np.log1p(np.exp(-h(fake)))),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        adversarial.discriminator_loss(real, fake, sigmoid_head=sigmoid_head),
        np.mean(np.log1p(np.exp(-h(real)))) + np.mean(np.log1p(np.exp(h(fake)))),
        rtol=1e-5,
    )


def test_r1_penalty_matches_finite_differences():
    shape = (3, 2, 2)
    x = jnp.asarray(_rand(150, shape))
    params = {"W": jnp.asarray(_rand(151, shape[1:]))}
    gamma = 0.7
    r1, logits = adversarial.r1_penalty(_toy_disc, params, x, None, gamma)
    np.testing.assert_allclose(logits, _toy_disc(params, x, None), rtol=1e-6)
    # Central differences of each sample's logit w.r.t. its own pixels.
    eps = 1e-2
    xn = np.asarray(x)
    grads = np.zeros(shape)
    for idx in np.ndindex(*shape):
        e = np.zeros(shape, np.float32)
        e[idx] = eps
        up = np.asarray(_toy_disc(params, jnp.asarray(xn + e), None), np.float64)
        down = np.asarray(_toy_disc(params, jnp.asarray(xn - e), None), np.float64)
        grads[idx] = (up[idx[0]] - down[idx[0]]) / (2 * eps)
    expected = 0.5 * gamma * np.mean(np.sum(grads.reshape(shape[0], -1) ** 2, -1))
    np.testing.assert_allclose(r1, expected, rtol=2e-2)
    assert float(r1) > 0


# =========================================================================================
# 6. train state
# =========================================================================================


def test_ema_update():
    ema = {"a": _rand(160, (3,)), "b": {"c": _rand(161, (2, 2))}}
    new = {"a": _rand(162, (3,)), "b": {"c": _rand(163, (2, 2))}}
    for rate in (0.0, 0.9, 1.0):
        out = train_state.ema_update(ema, new, rate)
        for path in (("a",), ("b", "c")):
            e, nw, o = ema, new, out
            for p in path:
                e, nw, o = e[p], nw[p], o[p]
            np.testing.assert_allclose(
                o, rate * e.astype(np.float64) + (1 - rate) * nw, rtol=1e-6, atol=1e-7
            )
    # Traced rate (as in a jitted step).
    out = jax.jit(train_state.ema_update)(ema, new, jnp.float32(0.75))
    np.testing.assert_allclose(out["a"], 0.75 * ema["a"] + 0.25 * new["a"], rtol=1e-6)


def _opt_cfg(**kw):
    base = dict(
        learning_rate=1e-2, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0, lr_warmup_steps=0
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _run_updates(opt, params, grads_seq):
    state = opt.init(params)
    outs = []
    for g in grads_seq:
        upd, state = opt.update(g, state, params)
        outs.append(np.asarray(upd["p"]))
    return outs


def test_make_optimizer_clips_at_every_step():
    clip = 0.5
    params = {"p": jnp.asarray(_rand(170, (5,)))}
    rng = np.random.default_rng(171)
    # Different directions and very different norms per step: Adam's moments then depend on
    # the relative magnitudes, so clipping (or not) at each step changes the updates.
    scales = (1e6, 1e2, 1e4)
    dirs = [rng.standard_normal(5).astype(np.float32) for _ in scales]
    grads = [{"p": jnp.asarray(s * d / np.linalg.norm(d))} for s, d in zip(scales, dirs)]
    normalised = [{"p": jnp.asarray(clip * d / np.linalg.norm(d))} for d in dirs]

    clipped = _run_updates(train_state.make_optimizer(_opt_cfg(grad_clip=clip)), params, grads)
    reference = _run_updates(train_state.make_optimizer(_opt_cfg()), params, normalised)
    for i, (a, b) in enumerate(zip(clipped, reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9, err_msg=f"update {i + 1}")
    # The comparison can fail: without clipping, the same gradients give other updates.
    unclipped = _run_updates(train_state.make_optimizer(_opt_cfg()), params, grads)
    assert np.abs(unclipped[1] - reference[1]).max() > 1e-4
    # Gradients below the clip norm pass through unchanged.
    small = [{"p": g["p"] * 0.1} for g in normalised]
    np.testing.assert_allclose(
        _run_updates(train_state.make_optimizer(_opt_cfg(grad_clip=clip)), params, small)[2],
        _run_updates(train_state.make_optimizer(_opt_cfg()), params, small)[2],
        rtol=1e-6,
    )


def test_make_optimizer_is_adamw_with_warmup():
    params = {"p": jnp.asarray(_rand(180, (4,)))}
    g = {"p": jnp.asarray(_rand(181, (4,)))}
    # First AdamW step: m_hat = g, v_hat = g^2 -> update = -lr * (g/(|g|+eps) + wd * p).
    upd = _run_updates(train_state.make_optimizer(_opt_cfg(weight_decay=0.1)), params, [g])[0]
    gn, pn = np.asarray(g["p"], np.float64), np.asarray(params["p"], np.float64)
    np.testing.assert_allclose(upd, -1e-2 * (gn / (np.abs(gn) + 1e-8) + 0.1 * pn), rtol=1e-5)
    # Linear warm-up from 0: the first update is zero, the next ones grow.
    ups = _run_updates(train_state.make_optimizer(_opt_cfg(lr_warmup_steps=4)), params, [g] * 3)
    assert np.all(ups[0] == 0) and np.abs(ups[1]).max() > 0
    assert np.abs(ups[2]).max() > np.abs(ups[1]).max()
    assert isinstance(train_state.make_optimizer(_opt_cfg()), optax.GradientTransformation)
