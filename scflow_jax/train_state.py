"""Train states as flax.struct pytrees: everything a run needs to resume, nothing else.

Frozen inputs (the teacher's parameters, the null-prompt embedding) are not part of the
state: they are reloaded from their own source, so a resumed run can never overwrite them.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class FlowTrainState:
    """Teacher (rectified-flow) training: parameters, their EMA and the optimizer state."""

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree


@flax.struct.dataclass
class DistillState:
    """SCFlow distillation (SCFLOW_SPEC.md section 2).

    params: the student S_theta; target_params: S_theta- (EMA mu, consistency targets);
    ema_params: the evaluation EMA used for sampling; disc_*: the discriminator and its optimizer.
    """

    step: jax.Array
    params: PyTree
    target_params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    disc_params: PyTree
    disc_opt_state: PyTree


def ema_update(ema: PyTree, new: PyTree, rate: float | jax.Array) -> PyTree:
    """``ema <- rate*ema + (1-rate)*new`` leaf by leaf (rate may be traced)."""
    return jax.tree.map(lambda e, n: rate * e + (1.0 - rate) * n.astype(e.dtype), ema, new)


def warmed_up_ema_rate(rate: float, step: jax.Array) -> jax.Array:
    """``min(rate, (1+step)/(10+step))``: an EMA that starts from a random init forgets it
    quickly instead of carrying ``rate**steps`` of it (30% after 1200 steps at 0.999)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(rate, (1.0 + step) / (10.0 + step))


def global_norm(tree: PyTree) -> jax.Array:
    return optax.global_norm(tree)


def count_params(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with constant learning rate (optionally linear warm-up) and optional clipping.

    ``cfg``: learning_rate, b1, b2, weight_decay, grad_clip (0 disables), lr_warmup_steps.
    Clipping is part of the optax chain, so it applies at every step, not just the first.
    """
    lr = cfg.learning_rate
    if cfg.get("lr_warmup_steps", 0):
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.lr_warmup_steps)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.grad_clip and cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
