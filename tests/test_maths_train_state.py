"""Maths checks of the train state's EMA update and the optimizer (CPU, tiny arrays)."""

from __future__ import annotations

import ml_collections
import numpy as np

import jax
import jax.numpy as jnp
import optax

from maths_testlib import rand
from scflow_jax import train_state


def test_ema_update():
    ema = {"a": rand(160, (3,)), "b": {"c": rand(161, (2, 2))}}
    new = {"a": rand(162, (3,)), "b": {"c": rand(163, (2, 2))}}
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
    params = {"p": jnp.asarray(rand(170, (5,)))}
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
    params = {"p": jnp.asarray(rand(180, (4,)))}
    g = {"p": jnp.asarray(rand(181, (4,)))}
    # First AdamW step: m_hat = g, v_hat = g^2 -> update = -lr * (g/(|g|+eps) + wd * p).
    upd = _run_updates(train_state.make_optimizer(_opt_cfg(weight_decay=0.1)), params, [g])[0]
    gn, pn = np.asarray(g["p"], np.float64), np.asarray(params["p"], np.float64)
    np.testing.assert_allclose(upd, -1e-2 * (gn / (np.abs(gn) + 1e-8) + 0.1 * pn), rtol=1e-5)
    # Linear warm-up from 0: the first update is zero, the next ones grow.
    ups = _run_updates(train_state.make_optimizer(_opt_cfg(lr_warmup_steps=4)), params, [g] * 3)
    assert np.all(ups[0] == 0) and np.abs(ups[1]).max() > 0
    assert np.abs(ups[2]).max() > np.abs(ups[1]).max()
    assert isinstance(train_state.make_optimizer(_opt_cfg()), optax.GradientTransformation)
