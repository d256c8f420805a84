"""Maths checks of the adversarial losses: the discriminator objective, the non-saturating
GAN losses and the R1 penalty (CPU, tiny arrays; toy discriminator from maths_testlib).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from maths_testlib import B, SHAPE, rand, scflow_cfg, sigmoid, softplus, toy_disc, toy_nets
from scflow_jax.losses import adversarial, scflow


def test_discriminator_objective_matches_formulas(tiny_config):
    cfg = scflow_cfg(tiny_config, r1_gamma=2.0)
    real, fake = rand(130, SHAPE), rand(131, SHAPE)
    dp = {"W": jnp.asarray(rand(132, SHAPE[1:]))}
    loss, aux = scflow.discriminator_objective(
        dp,
        jnp.asarray(real),
        jnp.asarray(fake),
        None,
        jnp.full((B,), 0.5),
        jax.random.key(0),
        nets=toy_nets(),
        cfg=cfg,
    )
    W = np.asarray(dp["W"], np.float64)[None]
    d = lambda x: np.tanh(W * x).reshape(B, -1).sum(-1)  # noqa: E731
    gan = np.mean(softplus(-d(real))) + np.mean(softplus(d(fake)))
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
            nets=toy_nets(),
            cfg=cfg,
        )[0]
    )(jnp.asarray(fake))
    assert float(jnp.max(jnp.abs(g_fake))) == 0.0


@pytest.mark.parametrize("sigmoid_head", [False, True])
def test_gan_losses_are_softplus_formulas(sigmoid_head):
    real, fake = rand(140, (7,), 3.0), rand(141, (7,), 3.0)
    h = (lambda x: sigmoid(x)) if sigmoid_head else (lambda x: np.asarray(x, np.float64))
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
    x = jnp.asarray(rand(150, shape))
    params = {"W": jnp.asarray(rand(151, shape[1:]))}
    gamma = 0.7
    r1, logits = adversarial.r1_penalty(toy_disc, params, x, None, gamma)
    np.testing.assert_allclose(logits, toy_disc(params, x, None), rtol=1e-6)
    # Central differences of each sample's logit w.r.t. its own pixels.
    eps = 1e-2
    xn = np.asarray(x)
    grads = np.zeros(shape)
    for idx in np.ndindex(*shape):
        e = np.zeros(shape, np.float32)
        e[idx] = eps
        up = np.asarray(toy_disc(params, jnp.asarray(xn + e), None), np.float64)
        down = np.asarray(toy_disc(params, jnp.asarray(xn - e), None), np.float64)
        grads[idx] = (up[idx[0]] - down[idx[0]]) / (2 * eps)
    expected = 0.5 * gamma * np.mean(np.sum(grads.reshape(shape[0], -1) ** 2, -1))
    np.testing.assert_allclose(r1, expected, rtol=2e-2)
    assert float(r1) > 0
