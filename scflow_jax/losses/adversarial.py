"""Non-saturating GAN losses and the R1 gradient penalty (SCFLOW_SPEC.md section 4)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (disc_params, x, cond) -> logits [B]
DiscriminatorFn = Callable[..., jax.Array]


def head(logits: jax.Array, sigmoid_head: bool) -> jax.Array:
    """The reference squashes D's logit with a sigmoid before the softplus losses
    (``disc.sigmoid_head``); without it the logit is used as is."""
    return jax.nn.sigmoid(logits) if sigmoid_head else logits


def generator_loss(fake_logits: jax.Array, *, sigmoid_head: bool = False) -> jax.Array:
    """Non-saturating generator loss ``mean softplus(-D(fake))``."""
    return jnp.mean(jax.nn.softplus(-head(fake_logits, sigmoid_head)))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, *,
                       sigmoid_head: bool = False) -> jax.Array:
    """``mean softplus(-D(real)) + mean softplus(D(fake))``."""
    return (jnp.mean(jax.nn.softplus(-head(real_logits, sigmoid_head)))
            + jnp.mean(jax.nn.softplus(head(fake_logits, sigmoid_head))))


def r1_penalty(disc_fn: DiscriminatorFn, disc_params, x_real: jax.Array, cond,
               gamma: float) -> tuple[jax.Array, jax.Array]:
    """``(gamma/2) * mean_batch ||grad_x D(x_real)||^2`` and the real logits.

    The gradient is of the summed logits, as StyleGAN2 computes it; with a minibatch-stddev
    layer that includes the small cross-sample terms.
    """
    logits, vjp = jax.vjp(lambda x: disc_fn(disc_params, x, cond), x_real)
    (grad_x,) = vjp(jnp.ones_like(logits))
    sq_norm = jnp.sum(jnp.square(grad_x).reshape(grad_x.shape[0], -1), axis=-1)
    return 0.5 * gamma * jnp.mean(sq_norm), logits
