"""ODE samplers from t = 1 (noise) to t = 0 (data), each compiled as one XLA program.

The whole trajectory is a ``lax.fori_loop`` inside one jitted function, so XLA fuses the
update arithmetic into the network calls and no Python loop dispatches per step.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from scflow_jax import flows

SAMPLERS = ("euler", "heun")


def time_grid(num_steps: int) -> jax.Array:
    """Uniform grid 1, 1-1/N, ..., 1/N, 0 (N+1 points)."""
    return 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


def grid_time(i, num_steps) -> jax.Array:
    """Point i of ``time_grid(num_steps)``; works for a traced ``num_steps`` too."""
    return 1.0 - jnp.asarray(i, jnp.float32) / jnp.asarray(num_steps, jnp.float32)


def sample_noise(seed: int, indices: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``[len(indices), *shape]``: row k is ``normal(fold_in(PRNGKey(seed), indices[k]), shape)``,
    so sample i starts from the same noise whatever batch it is drawn in."""
    key = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape)))(indices)


def sample(
    velocity_fn: flows.VelocityFn,
    params: Any,
    z1: jax.Array,
    cond: Any,
    *,
    num_steps: int,
    method: str = "euler",
    null_cond: Any = None,
    guidance: float = 1.0,
    stochastic_beta: float | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Integrates dx/dt = F(t, x, c) from t = 1 to t = 0 on the uniform grid.

    ``num_steps`` may be a traced integer: one compiled program then serves every step count
    (the loop becomes a while loop with a dynamic trip count).

    euler: ``x <- x - (1/N) F(t_i, x)``; N = 1 is the one-step map ``z1 - F(1, z1)``.
    heun: second-order predictor-corrector (2 network calls per step).
    stochastic_beta: consistency-style sampling, ``x_next = (1-t')x0_hat + t'((1-b)z1 + b*eps)``,
    re-noising the data prediction at each step (needs ``rng``).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
    if isinstance(num_steps, int) and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if stochastic_beta is not None and rng is None:
        raise ValueError("stochastic sampling (stochastic_beta set) needs an rng key")
    batch = z1.shape[0]

    def velocity(t_scalar, x):
        t = jnp.full((batch,), t_scalar, dtype=jnp.float32)
        return flows.guided_velocity(velocity_fn, params, t, x, cond, null_cond, guidance)

    def body(i, x):
        t, t_next = grid_time(i, num_steps), grid_time(i + 1, num_steps)
        v = velocity(t, x)
        if stochastic_beta is not None:
            x0_hat = flows.data_prediction(x, t, v)
            eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            renoise = (1.0 - stochastic_beta) * z1 + stochastic_beta * eps
            return (1.0 - t_next) * x0_hat + t_next * renoise
        x_euler = flows.euler_move(x, t, t_next, v)
        if method == "euler":
            return x_euler
        v_next = velocity(t_next, x_euler)
        return flows.euler_move(x, t, t_next, 0.5 * (v + v_next))

    return jax.lax.fori_loop(0, num_steps, body, z1)


def make_sampler(
    velocity_fn: flows.VelocityFn, *, num_steps: int, method: str = "euler", guidance: float = 1.0
):
    """A jitted ``(params, z1, cond, null_cond) -> x0`` for a fixed step count and guidance."""
    fn = functools.partial(
        sample, velocity_fn, num_steps=num_steps, method=method, guidance=guidance
    )
    return jax.jit(
        lambda params, z1, cond, null_cond=None: fn(params, z1, cond, null_cond=null_cond)
    )


def network_calls(num_steps: int, method: str, guidance: float) -> int:
    """Network evaluations per sample, for throughput accounting."""
    per_step = 2 if method == "heun" else 1
    return num_steps * per_step * (2 if guidance != 1.0 else 1)
