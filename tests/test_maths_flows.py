"""Maths checks of the flow conventions, the samplers and the flow-matching loss (CPU, tiny
arrays; toy fields and numpy references from maths_testlib).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from maths_testlib import bt, counting, rand, toy_velocity
from scflow_jax import flows, sampling
from scflow_jax.losses import flow_matching


# =========================================================================================
# flows
# =========================================================================================


def test_interpolate_endpoints_and_linearity():
    z0, z1 = rand(0, (3, 2, 4)), rand(1, (3, 2, 4))
    np.testing.assert_array_equal(flows.interpolate(z0, z1, jnp.zeros(3)), z0)
    np.testing.assert_array_equal(flows.interpolate(z0, z1, jnp.ones(3)), z1)
    t = np.array([0.1, 0.5, 0.9], np.float32)
    x = np.asarray(flows.interpolate(z0, z1, t))
    np.testing.assert_allclose(x, bt(t, z0) * z1 + (1 - bt(t, z0)) * z0, rtol=1e-6, atol=1e-6)
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
    z0, z1 = rand(2, (4, 5)), rand(3, (4, 5))
    tt = jnp.full((4,), t)
    x = flows.interpolate(z0, z1, tt)
    np.testing.assert_allclose(flows.data_prediction(x, tt, z1 - z0), z0, atol=2e-6)
    np.testing.assert_allclose(flows.noise_prediction(x, tt, z1 - z0), z1, atol=2e-6)


def test_euler_move_forward_then_back_is_identity():
    x, v = rand(4, (3, 2, 2)), rand(5, (3, 2, 2))
    t0 = jnp.array([0.9, 0.5, 0.2])
    t1 = jnp.array([0.6, 0.55, 0.0])
    y = flows.euler_move(x, t0, t1, v)
    np.testing.assert_allclose(y, x + bt(np.asarray(t1 - t0), x) * v, atol=1e-6)
    np.testing.assert_allclose(flows.euler_move(y, t1, t0, v), x, atol=1e-6)
    # Along the straight path an Euler move with z1 - z0 lands exactly on the path.
    z0, z1 = rand(6, (3, 4)), rand(7, (3, 4))
    moved = flows.euler_move(flows.interpolate(z0, z1, t0), t0, t1, z1 - z0)
    np.testing.assert_allclose(moved, flows.interpolate(z0, z1, t1), atol=2e-6)


def test_classifier_free_guidance_endpoints_and_formula():
    vc, vn = rand(8, (2, 3)), rand(9, (2, 3))
    np.testing.assert_allclose(flows.classifier_free_guidance(vc, vn, 1.0), vc, atol=1e-6)
    np.testing.assert_allclose(flows.classifier_free_guidance(vc, vn, 0.0), vn, atol=0)
    np.testing.assert_allclose(
        flows.classifier_free_guidance(vc, vn, 1.5), vn + 1.5 * (vc - vn), rtol=1e-6, atol=1e-6
    )


def test_guided_velocity_matches_two_call_formula_with_one_doubled_call():
    params = {"w": jnp.float32(0.7)}
    batch = 3
    t = jnp.array([0.1, 0.5, 0.9])
    x = jnp.asarray(rand(10, (batch, 2, 2)))
    cond = jnp.asarray(rand(11, (batch, 4)))
    null = jnp.asarray(rand(12, (4,)))
    fn, calls = counting(toy_velocity)
    v = flows.guided_velocity(fn, params, t, x, cond, null, 2.5)
    assert len(calls) == 1, calls
    assert calls[0] == ((2 * batch,), (2 * batch, 2, 2), (2 * batch, 4))
    v_cond = toy_velocity(params, t, x, cond)
    v_null = toy_velocity(params, t, x, jnp.broadcast_to(null, cond.shape))
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
    x, cond = rand(13, (2, 3)), rand(14, (2, 3))
    t = jnp.array([0.25, 0.999])
    v = vf(2.0, t, x, cond)
    np.testing.assert_allclose(seen["timestep"], [250.0, 999.0], rtol=1e-6)
    np.testing.assert_allclose(v, -(2.0 * x + cond), rtol=1e-6)


# =========================================================================================
# sampling
# =========================================================================================


def _const_field(v):
    return lambda params, t, x, cond: jnp.broadcast_to(v, x.shape)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 7])
def test_sampling_constant_field_is_exact(method, num_steps):
    z1, v = rand(20, (2, 3)), rand(21, (2, 3))
    out = sampling.sample(_const_field(v), None, z1, None, num_steps=num_steps, method=method)
    np.testing.assert_allclose(out, z1 - v, atol=2e-6)


def test_one_euler_step_is_one_step_map():
    params = {"w": jnp.float32(-0.4)}
    z1, cond = rand(22, (3, 4)), rand(23, (3, 2))
    out = sampling.sample(toy_velocity, params, z1, cond, num_steps=1)
    # z1 - F(1, z1, c), in numpy.
    expected = z1 - (-0.4 * z1 + 1.0 + cond.sum(-1)[:, None])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 3, 8])
def test_sampling_linear_field_matches_closed_form(num_steps):
    a = 0.8
    lin = lambda params, t, x, cond: a * x  # noqa: E731
    z1 = rand(24, (2, 5))
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
    z1 = rand(25, (2, 3))
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
    z1, cond = rand(26, (3, 4)), rand(27, (3, 2))
    null = np.zeros((2,), np.float32)
    for guidance in (1.0, 2.0):
        sampler = sampling.make_sampler(toy_velocity, num_steps=3, method="heun", guidance=guidance)
        eager = sampling.sample(
            toy_velocity,
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
    z1, cond = rand(28, (3, 4)), rand(29, (3, 2))
    det = sampling.sample(toy_velocity, params, z1, cond, num_steps=1)
    sto = sampling.sample(
        toy_velocity, params, z1, cond, num_steps=1, stochastic_beta=0.0, rng=jax.random.key(0)
    )
    np.testing.assert_allclose(sto, det, rtol=1e-6, atol=1e-6)
    # Two steps, beta = 0: x_half = 0.5*x0_hat + 0.5*z1, then x0 = x_half - 0.5 F(0.5, x_half).
    sto2 = sampling.sample(
        toy_velocity, params, z1, cond, num_steps=2, stochastic_beta=0.0, rng=jax.random.key(0)
    )
    c = cond.sum(-1)[:, None]
    x0_hat = z1 - 1.0 * (0.5 * z1 + 1.0 + c)
    x_half = 0.5 * x0_hat + 0.5 * z1
    np.testing.assert_allclose(sto2, x_half - 0.5 * (0.5 * x_half + 0.5 + c), rtol=1e-5, atol=1e-5)
    # beta = 1 re-noises with fresh noise: the result depends on the key.
    a = sampling.sample(
        toy_velocity, params, z1, cond, num_steps=2, stochastic_beta=1.0, rng=jax.random.key(0)
    )
    b = sampling.sample(
        toy_velocity, params, z1, cond, num_steps=2, stochastic_beta=1.0, rng=jax.random.key(1)
    )
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2)])
def test_sample_is_one_program_with_a_loop(method, per_step):
    fn, calls = counting(toy_velocity)
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
# flow matching loss
# =========================================================================================


def test_flow_matching_loss_is_velocity_regression():
    z0 = jnp.asarray(rand(30, (16, 3, 2)))
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
    cond = jnp.asarray(rand(31, (4000, 2, 3)) + 5.0)
    null = jnp.asarray(rand(32, (2, 3)))
    out = np.asarray(flow_matching.drop_conditions(jax.random.key(0), cond, null, 1.0))
    np.testing.assert_array_equal(out, np.broadcast_to(null, cond.shape))
    out = np.asarray(flow_matching.drop_conditions(jax.random.key(0), cond, null, 0.0))
    np.testing.assert_array_equal(out, cond)
    out = np.asarray(flow_matching.drop_conditions(jax.random.key(0), cond, null, 0.5))
    is_null = np.all(out == np.asarray(null)[None], axis=(1, 2))
    is_cond = np.all(out == np.asarray(cond), axis=(1, 2))
    assert np.all(is_null ^ is_cond)  # whole examples are swapped, never parts
    assert 0.45 < is_null.mean() < 0.55
