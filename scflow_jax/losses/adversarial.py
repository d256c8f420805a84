"""Non-saturating GAN losses and the R1 gradient penalty (SCFLOW_SPEC.md section 4)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging

# (disc_params, x, cond) -> logits [B]
DiscriminatorFn = Callable[..., jax.Array]


def head(logits: jax.Array, sigmoid_head: bool) -> jax.Array:
    """What the softplus losses see: ``sigmoid(logit)`` for discriminators that end in a sigmoid
    (the authors' text-to-image D), the logit itself otherwise (their latent StyleGAN2 D)."""
    return jax.nn.sigmoid(logits) if sigmoid_head else logits


def health(real_logits: jax.Array, fake_logits: jax.Array) -> dict[str, jax.Array]:
    """D's mean logits, their gap (real minus fake) and its accuracy on the batch (a real logit
    above 0, a fake one below: the sigmoid's 0.5 either way). At chance: gap ~0, accuracy ~0.5."""
    real_mean, fake_mean = jnp.mean(real_logits), jnp.mean(fake_logits)
    accuracy = 0.5 * (
        jnp.mean((real_logits > 0).astype(jnp.float32))
        + jnp.mean((fake_logits < 0).astype(jnp.float32))
    )
    return {
        "d_real": real_mean,
        "d_fake": fake_mean,
        "d_gap": real_mean - fake_mean,
        "d_accuracy": accuracy,
    }


def sigmoid_head_for(discriminator, setting: bool | None = None) -> bool:
    """Whether the GAN losses squash ``discriminator``'s logit: its family's convention
    (``OUTPUT_SIGMOID``: True for the text-to-image UNet-encoder D, False for the StyleGAN2 D),
    unless ``setting`` (``config.scflow.sigmoid_head``) overrides it, which is logged: an
    ablation."""
    convention = bool(getattr(discriminator, "OUTPUT_SIGMOID", False))
    if setting is None:
        return convention
    if bool(setting) != convention:
        logging.warning(
            "config.scflow.sigmoid_head=%s goes against the convention of %s, whose GAN "
            "losses take %s (an ablation)",
            bool(setting),
            type(discriminator).__name__,
            "sigmoid(D)" if convention else "D's raw logit",
        )
    return bool(setting)


def generator_loss(fake_logits: jax.Array, *, sigmoid_head: bool = False) -> jax.Array:
    """Non-saturating generator loss ``mean softplus(-D(fake))``."""
    return jnp.mean(jax.nn.softplus(-head(fake_logits, sigmoid_head)))


def discriminator_loss(
    real_logits: jax.Array, fake_logits: jax.Array, *, sigmoid_head: bool = False
) -> jax.Array:
    """``mean softplus(-D(real)) + mean softplus(D(fake))``."""
    return jnp.mean(jax.nn.softplus(-head(real_logits, sigmoid_head))) + jnp.mean(
        jax.nn.softplus(head(fake_logits, sigmoid_head))
    )


def r1_penalty(
    disc_fn: DiscriminatorFn, disc_params, x_real: jax.Array, cond, gamma: float
) -> tuple[jax.Array, jax.Array]:
    """``(gamma/2) * mean_batch ||grad_x D(x_real)||^2`` and the real logits.

    The gradient is of the summed logits, as StyleGAN2 computes it; with a minibatch-stddev
    layer that includes the small cross-sample terms.
    """
    logits, vjp = jax.vjp(lambda x: disc_fn(disc_params, x, cond), x_real)
    (grad_x,) = vjp(jnp.ones_like(logits))
    sq_norm = jnp.sum(jnp.square(grad_x).reshape(grad_x.shape[0], -1), axis=-1)
    return 0.5 * gamma * jnp.mean(sq_norm), logits
