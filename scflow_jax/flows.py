"""The one place where time and sign conventions of flow matching live.

Convention (SCFLOW_SPEC.md section 1): ``z0`` is data, ``z1 ~ N(0, I)`` is noise, time runs
from t = 0 (data) to t = 1 (noise), ``x_t = t*z1 + (1-t)*z0`` and a velocity network
``F(t, x, c)`` predicts ``z1 - z0``. Every loss and sampler in the project speaks only this
convention; teachers trained with another one are wrapped here, once, at the model boundary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from scflow_jax import paired_batch

# A velocity function in the project convention: (params, t [B], x [B, ...], cond) -> v.
VelocityFn = Callable[..., jax.Array]

# Diffusers-style rectified-flow UNets (InstaFlow, 2-rectified flow) index time in [0, 1000].
DIFFUSERS_TIMESTEP_SCALE = 1000.0


def broadcast_time(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes per-example times [B] so they broadcast against x [B, ...]."""
    t = jnp.asarray(t, dtype=x.dtype)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(z0: jax.Array, z1: jax.Array, t: jax.Array) -> jax.Array:
    """The straight path ``x_t = t*z1 + (1-t)*z0`` (t per example)."""
    tb = broadcast_time(t, z0)
    return tb * z1 + (1.0 - tb) * z0


def velocity_target(z0: jax.Array, z1: jax.Array) -> jax.Array:
    """d x_t / d t along the straight path: the regression target of rectified flow."""
    return z1 - z0


def data_prediction(x: jax.Array, t: jax.Array, velocity: jax.Array) -> jax.Array:
    """Jump from (t, x) to t = 0 along the predicted velocity: ``x - t*v``."""
    return x - broadcast_time(t, x) * velocity


def noise_prediction(x: jax.Array, t: jax.Array, velocity: jax.Array) -> jax.Array:
    """Jump from (t, x) to t = 1 along the predicted velocity: ``x + (1-t)*v``."""
    return x + (1.0 - broadcast_time(t, x)) * velocity


def euler_move(x: jax.Array, t_from: jax.Array, t_to: jax.Array, velocity: jax.Array) -> jax.Array:
    """One Euler step of the ODE dx/dt = v from t_from to t_to (either direction)."""
    return x + broadcast_time(t_to - t_from, x) * velocity


def sample_time(
    rng: jax.Array, batch: int, *, integer_timesteps: bool = False, num_timesteps: int = 1000
) -> jax.Array:
    """Training times: t ~ U[0, 1), or t = k/num_timesteps with k ~ U{0..num_timesteps-1}."""
    if integer_timesteps:
        k = jax.random.randint(rng, (batch,), 0, num_timesteps)
        return k.astype(jnp.float32) / num_timesteps
    return jax.random.uniform(rng, (batch,), dtype=jnp.float32)


# Float32 rounding puts N*t for t = k/N up to about 2*k ulps from k, below it as often as above
# (k/1000 divided with correct rounding gives 250.99998 for k = 251). Times within this many
# timesteps below an integer count as that integer: ~1e-4 timesteps at N = 1000, far below any
# schedule's resolution.
_TIMESTEP_ROUNDING = 8 * float(jnp.finfo(jnp.float32).eps)


def timestep_index(t: jax.Array, num_timesteps: int = 1000) -> jax.Array:
    """``floor(num_timesteps * t)`` as int32, exact for every ``t = k/num_timesteps`` however the
    division that made ``t`` rounded (a plain floor gives k-1 for some k)."""
    scaled = jnp.asarray(t, jnp.float32) * num_timesteps
    return jnp.floor(scaled + _TIMESTEP_ROUNDING * num_timesteps).astype(jnp.int32)


def floor_to_timestep(t: jax.Array, num_timesteps: int = 1000) -> jax.Array:
    """Network time for integer-timestep models: ``timestep_index(t) / num_timesteps``."""
    return timestep_index(t, num_timesteps).astype(jnp.float32) / num_timesteps


def classifier_free_guidance(
    v_cond: jax.Array, v_null: jax.Array, scale: float | jax.Array
) -> jax.Array:
    """``F_w = F(c_null) + w * (F(c) - F(c_null))``; w = 1 is the conditional model."""
    return v_null + scale * (v_cond - v_null)


def guided_velocity(velocity_fn: VelocityFn, params, t, x, cond, null_cond, scale) -> jax.Array:
    """Classifier-free guided velocity with one network call on the doubled batch.

    ``scale`` may be a Python float: 1.0 (or no null condition) skips the unconditional half.
    """
    if null_cond is None or (isinstance(scale, (int, float)) and scale == 1.0):
        return velocity_fn(params, t, x, cond)
    null = jnp.broadcast_to(null_cond, cond.shape).astype(cond.dtype)
    v_cond, v_null = paired_batch.split(
        velocity_fn(
            params, paired_batch.join(t, t), paired_batch.join(x, x), paired_batch.join(cond, null)
        )
    )
    return classifier_free_guidance(v_cond, v_null, scale)


# --- Teachers with other conventions, wrapped once -------------------------------------


def diffusers_timestep(t: jax.Array) -> jax.Array:
    """Our t in [0, 1] -> the diffusers rectified-flow UNet's timestep in [0, 1000]."""
    return DIFFUSERS_TIMESTEP_SCALE * t


def velocity_from_diffusers_output(u: jax.Array) -> jax.Array:
    """Diffusers rectified-flow UNets predict ``u ~= z0 - z1``; our velocity is ``z1 - z0``."""
    return -u


def wrap_diffusers_rectified_flow(unet_apply: Callable[..., jax.Array]) -> VelocityFn:
    """Turns ``unet_apply(params, x, timestep_0_1000, cond) -> u`` into a project VelocityFn."""

    def velocity_fn(params, t, x, cond):
        return velocity_from_diffusers_output(unet_apply(params, x, diffusers_timestep(t), cond))

    return velocity_fn


# The noise LFM's path keeps at t = 0 (see wrap_lfm_flow).
LFM_SIGMA_MIN = 1e-5


def wrap_lfm_flow(unet_apply: Callable[..., jax.Array]) -> VelocityFn:
    """Turns an LFM latent flow-matching network ``unet_apply(params, x, t, cond) -> v`` into a
    VelocityFn.

    LFM's convention (``train_flow_latent.py``, ``test_flow_latent.py``): z0 is the data latent, z1
    the noise, t ~ U[0, 1) is fed to the network as is (no 1000x scale; the ADM sinusoidal embedding
    sees t in [0, 1]), ``x_t = (1-t)*z0 + (s + (1-s)*t)*z1`` with s = LFM_SIGMA_MIN, and the
    regression target is ``d x_t/dt = (1-s)*z1 - z0``; sampling integrates the ODE from t = 1 to
    t = 0. This is the project convention up to s: the path differs from ours by ``s*(1-t)*z1`` and
    the velocity by ``-s*z1`` (a 1e-5 fraction of the noise, far below the teacher's own error), so
    ``F(t, x, c) = v_LFM(t, x, c)``: no time change, no sign change.
    """

    def velocity_fn(params, t, x, cond):
        return unet_apply(params, x, t, cond)

    return velocity_fn
