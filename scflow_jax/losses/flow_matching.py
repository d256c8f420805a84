"""Rectified-flow (flow matching) loss for training the teacher."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scflow_jax import flows


def drop_conditions(rng, cond: jax.Array, null_cond: jax.Array, drop_prob: float) -> jax.Array:
    """Replaces each example's condition by the null condition with probability drop_prob
    (what makes classifier-free guidance possible at sampling time)."""
    if drop_prob <= 0:
        return cond
    drop = jax.random.bernoulli(rng, drop_prob, (cond.shape[0],))
    null = jnp.broadcast_to(null_cond, cond.shape).astype(cond.dtype)
    return jnp.where(drop.reshape((-1,) + (1,) * (cond.ndim - 1)), null, cond)


def flow_matching_loss(
    params,
    velocity_fn: flows.VelocityFn,
    z0: jax.Array,
    cond: jax.Array,
    rng: jax.Array,
    *,
    null_cond: jax.Array | None = None,
    cond_drop_prob: float = 0.0,
):
    """``E || F(t, x_t, c) - (z1 - z0) ||^2`` with t ~ U[0, 1), z1 ~ N(0, I)."""
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    t = flows.sample_time(k_t, z0.shape[0])
    z1 = jax.random.normal(k_noise, z0.shape, z0.dtype)
    if null_cond is not None:
        cond = drop_conditions(k_drop, cond, null_cond, cond_drop_prob)
    v = velocity_fn(params, t, flows.interpolate(z0, z1, t), cond)
    loss = jnp.mean(jnp.square(v - flows.velocity_target(z0, z1)))
    return loss, {"loss_fm": loss}
