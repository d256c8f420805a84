"""Maths checks of the SCFlow generator objective: its regression terms, warm-ups, the GAN
term and the shared one-step sample (CPU, tiny arrays; toy networks and numpy references
from maths_testlib).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from maths_testlib import (
    B,
    CDIM,
    SHAPE,
    bt,
    counting,
    np_inputs,
    np_toy,
    rand,
    scflow_cfg,
    softplus,
    toy_data,
    toy_nets,
    toy_velocity,
)
from scflow_jax.losses import scflow


def _full_loss(tiny_config, **edits):
    """The objective's regression terms (no GAN term: no discriminator)."""
    cfg = scflow_cfg(tiny_config, lambda_gan=0.0, **edits)
    z0, cond, null = toy_data(90)
    nets = toy_nets()

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
    z0_hat = jnp.asarray(rand(91, SHAPE))
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
    cfg = scflow_cfg(tiny_config)
    z0, cond, _ = toy_data(95)
    nets = toy_nets()
    dp = {"W": jnp.asarray(rand(96, SHAPE[1:]))}
    z0_hat = jnp.asarray(rand(97, SHAPE))
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
    np.testing.assert_allclose(f(z0_hat, dp), np.mean(softplus(-logits)), rtol=1e-5)


def _np_regression_terms(n, w, z0_hat, huber_c, use_teacher):
    """Independent numpy evaluation of the generator terms for the toy student."""
    z0, z1, cond, t, x_t = n["z0"], n["z1"], n["cond"], n["t"], n["x_t"]
    current = x_t - bt(t, x_t) * np_toy(w, t, x_t, cond)

    def dist(a, b):
        d = a - b
        return np.mean(np.sqrt(d * d + huber_c**2) - huber_c) if use_teacher else np.mean(d * d)

    terms = {"loss_con": dist(current, n["target_minus"])}
    if n["target_plus"] is not None:
        terms["loss_inv"] = dist(current, n["target_plus"])
    if use_teacher:
        x_tilde = bt(t, z1) * z1 + (1 - bt(t, z1)) * z0_hat
        x0_tilde = x_tilde - bt(t, x_tilde) * np_toy(w, t, x_tilde, cond)
        terms["loss_rf"] = np.mean((x0_tilde - z0_hat) ** 2)
    else:
        terms["loss_rf"] = np.mean((current - z0) ** 2)
    return terms


@pytest.mark.parametrize("use_teacher", [True, False])
def test_generator_regression_terms_and_warmups(tiny_config, use_teacher):
    cfg = scflow_cfg(
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
    z0, cond, null = toy_data(100)
    nets = toy_nets()
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
    z0_hat = rand(101, SHAPE)
    n = np_inputs(inp)
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
    z0, cond, null = toy_data(110)
    nets = toy_nets()
    for off, present in [
        ("lambda_inv", {"loss_con", "loss_rf"}),
        ("lambda_rf", {"loss_con", "loss_inv"}),
    ]:
        cfg = scflow_cfg(tiny_config, lambda_gan=0.0, **{off: 0.0})
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
        student, calls = counting(toy_velocity)
        loss, terms = scflow.generator_objective(
            {"w": jnp.float32(0.25)},
            jnp.asarray(rand(111, SHAPE)),
            inp,
            jnp.asarray(100, jnp.int32),
            None,
            None,
            nets=toy_nets(student=student),
            cfg=cfg,
        )
        assert set(terms) == present
        # Without L_rf the student runs on the plain batch (no x~_t half).
        assert calls[0][1][0] == (B if off == "lambda_rf" else 2 * B)
        n = np_inputs(inp)
        expected = _np_regression_terms(
            n, 0.25, rand(111, SHAPE).astype(np.float64), cfg.huber_c, True
        )
        lam = {"loss_con": cfg.lambda_con, "loss_rf": cfg.lambda_rf, "loss_inv": cfg.lambda_inv}
        np.testing.assert_allclose(loss, sum(lam[k] * expected[k] for k in present), rtol=1e-4)
    cfg = scflow_cfg(tiny_config, lambda_gan=0.0, lambda_rf=0.1)
    assert not scflow.gan_enabled(cfg) and scflow.needs_one_step_sample(cfg)
    cfg = scflow_cfg(tiny_config, lambda_gan=0.0, use_teacher=False)
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
    cfg = scflow_cfg(tiny_config, **{**settings, **edits})
    z0, cond, null = toy_data(150)
    nets = toy_nets()
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
    return cfg, inp, nets, {"W": jnp.asarray(rand(151, SHAPE[1:]))}


def test_generator_objective_holds_the_gan_term_with_its_weight_and_warmup(tiny_config):
    """L = L_con + l_rf L_rf + l_G L_G + l_inv L_inv: L_G = mean softplus(-D(z0_hat)) enters
    with l_G once its warm-up is over, and it alone gives L a gradient w.r.t. z0_hat."""
    cfg, inp, nets, dp = _gan_setup(tiny_config)
    z0_hat = jnp.asarray(rand(152, SHAPE))
    params, key = {"w": jnp.float32(0.25)}, jax.random.key(0)
    expected = _np_regression_terms(
        np_inputs(inp), 0.25, np.asarray(z0_hat, np.float64), cfg.huber_c, True
    )
    logits = np.tanh(np.asarray(dp["W"], np.float64)[None] * np.asarray(z0_hat, np.float64))
    expected["loss_gan"] = np.mean(softplus(-logits.reshape(B, -1).sum(-1)))
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
    student, calls = counting(toy_velocity)
    nets = toy_nets(student=student)
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
    z1, cond = rand(120, SHAPE), rand(121, (B, CDIM))
    out = scflow.one_step_sample(toy_velocity, {"w": jnp.float32(0.3)}, jnp.asarray(z1), cond)
    np.testing.assert_allclose(out, z1 - np_toy(0.3, np.ones(B), z1, cond), rtol=1e-5, atol=1e-5)
