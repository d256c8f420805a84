"""The SCFlow objective (SCFLOW_SPEC.md sections 3-4) as pure functions.

Read in this order: ``generator_objective`` is section 3's last line, every term with its weight
and warm-up; ``distillation_terms`` and ``consistency_training_terms`` are the regression terms
with and without a teacher; ``prepare_generator_inputs`` is everything the student's loss needs
that carries no gradient (teacher and target-network evaluations); ``SharedOneStepSample`` is
how one evaluation of the one-step sample serves both the discriminator update
(``discriminator_objective``, section 4) and the generator's L_G.

``cfg`` below is the ``config.scflow`` group (all Python values, read at trace time):
init_threshold (delta), trunc_threshold (tau), huber_c, lambda_con, lambda_rf, lambda_gan,
lambda_inv, warmup_rf, warmup_gan, warmup_inv, teacher_cfg, integer_timesteps, use_teacher,
r1_gamma, disc_noise_inputs. (``sigmoid_head`` is resolved once, against the discriminator
family's convention, into ``SCFlowNetworks.sigmoid_head``.)

A term whose lambda is 0 is removed at trace time (no compute); a term still warming up is
computed with weight 0, so switching it on never recompiles the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from scflow_jax import flows, paired_batch
from scflow_jax.losses import adversarial

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class SCFlowNetworks:
    """The callables of one distillation: student/target share ``velocity_fn``.

    ``disc_takes_time``: ``disc_fn`` is ``(params, x, cond, t)`` and is given the network time
    of its (noised) input, t-minus (the text-to-image UNet-encoder discriminator); otherwise
    ``(params, x, cond)``. ``sigmoid_head``: the GAN losses take ``sigmoid(D)`` instead of D's
    logit (the text-to-image D's convention; ``adversarial.head``).
    """

    velocity_fn: flows.VelocityFn
    teacher_velocity_fn: flows.VelocityFn
    disc_fn: adversarial.DiscriminatorFn | None = None
    disc_takes_time: bool = False
    sigmoid_head: bool = False


# ---------------------------------------------------------------------------------------------
# The generator objective


def generator_objective(
    params, z0_hat, inputs: GeneratorInputs, step, disc_params, rng, *, nets: SCFlowNetworks, cfg
):
    """``L = L_con + lambda_rf*L_rf + lambda_G*L_G + lambda_inv*L_inv`` (SCFLOW_SPEC.md section 3)
    of the student ``params``: ``(L, terms)``.

    ``z0_hat`` is the student's one-step sample (None when no term uses it) and ``disc_params``
    the discriminator, already updated this iteration. Differentiate w.r.t. ``params`` and
    ``z0_hat``: L_rf reads ``z0_hat`` detached, so the gradient w.r.t. it is L_G's alone, which
    ``generator_value_and_grad`` pulls back into the student.
    """
    if cfg.use_teacher:
        terms = distillation_terms(params, z0_hat, inputs, nets=nets, cfg=cfg)
    else:
        terms = consistency_training_terms(params, inputs, nets=nets, cfg=cfg)
    if gan_enabled(cfg):  # L_G = mean softplus(-D(z0_hat)), D frozen
        terms["loss_gan"] = generator_adversarial_loss(
            z0_hat, disc_params, inputs.cond, inputs.t_minus, rng, nets=nets, cfg=cfg
        )
    # A term whose lambda is 0 is absent (never computed) and adds nothing; a warming-up term
    # is computed and weighted 0, so switching it on does not recompile the step.
    loss = lambda name: terms.get(name, 0.0)  # noqa: E731
    weight = lambda lam, warmup: term_weight(lam, warmup, step)  # noqa: E731
    total = (
        cfg.lambda_con * loss("loss_con")
        + weight(cfg.lambda_rf, cfg.warmup_rf) * loss("loss_rf")
        + weight(cfg.lambda_gan, cfg.warmup_gan) * loss("loss_gan")
        + weight(cfg.lambda_inv, cfg.warmup_inv) * loss("loss_inv")
    )
    return total, terms


def distillation_terms(
    params, z0_hat, inputs: GeneratorInputs, *, nets: SCFlowNetworks, cfg
) -> dict:
    """L_con, L_inv (pseudo-Huber against the targets) and the self-corrected L_rf.

    ``cur = x_t - t*S(t, x_t)``; with L_rf also ``x~0 = x~_t - t*S(t, x~_t)`` on the straight
    coupling ``x~_t = t*z1 + (1-t)*sg(z0_hat)``, the two student evaluations sharing one network
    call. ``z0_hat`` is read detached: L_rf never sends gradient through it.
    """
    use_rf = enabled(cfg, "rf")
    t, x_t = inputs.t, inputs.x_t
    if use_rf:
        x_tilde = flows.interpolate(sg(z0_hat), inputs.z1, t)
        times, xs = paired_batch.join(t, t), paired_batch.join(x_t, x_tilde)
        conds = doubled(inputs.cond)
    else:
        times, xs, conds = t, x_t, inputs.cond
    predictions = student_data_prediction(params, times, xs, conds, nets=nets, cfg=cfg)
    current, x0_tilde = paired_batch.split(predictions) if use_rf else (predictions, None)

    huber = lambda a, b: pseudo_huber(a, b, cfg.huber_c)  # noqa: E731
    terms = {"loss_con": huber(current, inputs.target_minus)}
    if enabled(cfg, "inv"):
        terms["loss_inv"] = huber(current, inputs.target_plus)
    if use_rf:
        terms["loss_rf"] = mean_squared_error(x0_tilde, sg(z0_hat))
    return terms


def consistency_training_terms(
    params, inputs: GeneratorInputs, *, nets: SCFlowNetworks, cfg
) -> dict:
    """Without a teacher (``config.scflow.use_teacher=False``, section 3's last paragraph): the
    targets come from moves along the data direction (``prepare_generator_inputs``), the
    distances are squared errors and ``L_rf = mean((cur - z0)^2)``."""
    current = student_data_prediction(params, inputs.t, inputs.x_t, inputs.cond, nets=nets, cfg=cfg)
    terms = {"loss_con": mean_squared_error(current, inputs.target_minus)}
    if enabled(cfg, "inv"):
        terms["loss_inv"] = mean_squared_error(current, inputs.target_plus)
    if enabled(cfg, "rf"):
        terms["loss_rf"] = mean_squared_error(current, inputs.z0)
    return terms


def student_data_prediction(params, t, x, cond, *, nets: SCFlowNetworks, cfg) -> jax.Array:
    """``x - t*S(t, x, c)``: the student's jump to t = 0."""
    return flows.data_prediction(x, t, nets.velocity_fn(params, network_time(t, cfg), x, cond))


# ---------------------------------------------------------------------------------------------
# What the generator objective reads without gradient


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GeneratorInputs:
    """Everything the generator loss needs that carries no gradient (all stop-gradient)."""

    z0: jax.Array
    z1: jax.Array
    cond: Any
    t: jax.Array
    x_t: jax.Array
    t_minus: jax.Array
    target_minus: jax.Array
    target_plus: jax.Array | None


def prepare_generator_inputs(
    rng, z0, cond, *, teacher_params, target_params, null_cond, nets: SCFlowNetworks, cfg
) -> GeneratorInputs:
    """Samples (t, z1), takes one teacher Euler step down and up, and evaluates the target
    network's data predictions there (section 3, everything before the student)."""
    k_t, k_noise, k_steps = jax.random.split(rng, 3)
    batch = z0.shape[0]
    t = flows.sample_time(k_t, batch, integer_timesteps=cfg.integer_timesteps)
    z1 = jax.random.normal(k_noise, z0.shape, z0.dtype)
    x_t = flows.interpolate(z0, z1, t)
    d_minus, d_plus = local_step_sizes(k_steps, t, cfg.init_threshold)
    t_minus, t_plus = t - d_minus, t + d_plus

    if cfg.use_teacher:
        v_teacher = flows.guided_velocity(
            nets.teacher_velocity_fn,
            teacher_params,
            network_time(t, cfg),
            x_t,
            cond,
            null_cond,
            cfg.teacher_cfg,
        )
    else:  # consistency training: the data direction stands in for the teacher
        v_teacher = flows.velocity_target(z0, z1)
    x_minus = flows.euler_move(x_t, t, t_minus, v_teacher)

    bidirectional = enabled(cfg, "inv")
    if bidirectional:  # both target evaluations as one network call on the doubled batch
        x_plus = flows.euler_move(x_t, t, t_plus, v_teacher)
        times = paired_batch.join(t_minus, t_plus)
        xs = paired_batch.join(x_minus, x_plus)
        conds = doubled(cond)
    else:
        times, xs, conds = t_minus, x_minus, cond
    v_target = nets.velocity_fn(target_params, network_time(times, cfg), xs, conds)
    predictions = flows.data_prediction(xs, times, v_target)  # the target network's
    target_minus, target_plus = (
        paired_batch.split(predictions) if bidirectional else (predictions, None)
    )
    # Truncation: close to the data the target network is unreliable; the real sample is
    # the exact answer there.
    truncate = flows.broadcast_time(t_minus < cfg.trunc_threshold, z0)
    target_minus = jnp.where(truncate, z0, target_minus)
    return jax.tree.map(
        sg, GeneratorInputs(z0, z1, cond, t, x_t, t_minus, target_minus, target_plus)
    )


# ---------------------------------------------------------------------------------------------
# One one-step sample for the discriminator and the generator updates


@dataclasses.dataclass(frozen=True)
class SharedOneStepSample:
    """The student's one-step sample ``z0_hat = z1 - S(1, z1, c)``, computed once per iteration
    with ``jax.vjp``.

    The discriminator update reads it detached (``detached``); the generator update does not run
    the student at t = 1 again: ``student_gradient`` pulls the objective's gradient w.r.t.
    ``z0_hat`` (L_G's) back through the saved linearisation into the student's parameters.
    """

    value: jax.Array
    pullback: Callable[[jax.Array], tuple[Any]]

    def detached(self) -> jax.Array:
        return sg(self.value)

    def student_gradient(self, d_value: jax.Array) -> Any:
        (grads,) = self.pullback(d_value)
        return grads


def share_one_step_sample(
    params, z1: jax.Array, cond, *, nets: SCFlowNetworks, cfg
) -> SharedOneStepSample | None:
    """The iteration's ``SharedOneStepSample``; None when no term uses one."""
    if not needs_one_step_sample(cfg):
        return None
    value, pullback = jax.vjp(lambda p: one_step_sample(nets.velocity_fn, p, z1, cond), params)
    return SharedOneStepSample(value, pullback)


def generator_value_and_grad(
    params,
    one_step: SharedOneStepSample | None,
    inputs: GeneratorInputs,
    step,
    disc_params,
    rng,
    *,
    nets: SCFlowNetworks,
    cfg,
):
    """``((L, terms), dL/dparams)`` of ``generator_objective``: automatic differentiation
    through the student's evaluations at time t, plus L_G's gradient w.r.t. the shared one-step
    sample pulled back into the student (``SharedOneStepSample.student_gradient``)."""
    z0_hat = None if one_step is None else one_step.value

    def objective(p, z):
        return generator_objective(p, z, inputs, step, disc_params, rng, nets=nets, cfg=cfg)

    if not gan_enabled(cfg):  # z0_hat, if any, is read detached (L_rf): no gradient through it
        return jax.value_and_grad(objective, has_aux=True)(params, z0_hat)
    (total, terms), (grads, d_z0_hat) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        params, z0_hat
    )
    return (total, terms), jax.tree.map(jnp.add, grads, one_step.student_gradient(d_z0_hat))


# ---------------------------------------------------------------------------------------------
# The discriminator and the GAN terms


def discriminator_at(nets: SCFlowNetworks, t_minus: jax.Array, cfg) -> adversarial.DiscriminatorFn:
    """``(params, x, cond) -> logits``: D, told the time of its inputs if it takes one."""
    if not nets.disc_takes_time:
        return nets.disc_fn
    t = network_time(t_minus, cfg)
    return lambda params, x, cond: nets.disc_fn(params, x, cond, t)


def discriminator_inputs(rng, x: jax.Array, t_minus: jax.Array, cfg) -> jax.Array:
    """D's input: ``x``, or, with ``disc_noise_inputs``, ``x`` noised to the time D is told
    (``network_time(t_minus)``: the floored time for integer-timestep models), so that its
    noise level and its time input agree."""
    if not cfg.disc_noise_inputs:
        return x
    return noised_for_discriminator(
        x, network_time(t_minus, cfg), jax.random.normal(rng, x.shape, x.dtype)
    )


def discriminator_objective(
    disc_params, real, fake, cond, t_minus, rng, *, nets: SCFlowNetworks, cfg
):
    """``L_D`` with R1 on the real inputs (section 4). Real and fake share the noise.

    Besides the loss terms, the aux dict reports D's health: the mean logits, their gap
    (real minus fake) and D's accuracy on the batch (real logits > 0, fake < 0): a D at chance
    has a gap near 0 and an accuracy near 0.5."""
    if cfg.disc_noise_inputs:
        eps = jax.random.normal(rng, real.shape, real.dtype)
        s = network_time(t_minus, cfg)
        real = noised_for_discriminator(real, s, eps)
        fake = noised_for_discriminator(fake, s, eps)
    disc_fn = discriminator_at(nets, t_minus, cfg)
    if cfg.r1_gamma > 0:
        r1, real_logits = adversarial.r1_penalty(disc_fn, disc_params, real, cond, cfg.r1_gamma)
    else:
        r1, real_logits = jnp.float32(0.0), disc_fn(disc_params, real, cond)
    fake_logits = disc_fn(disc_params, sg(fake), cond)
    gan = adversarial.discriminator_loss(real_logits, fake_logits, sigmoid_head=nets.sigmoid_head)
    return gan + r1, {"loss_disc": gan, "r1": r1, **adversarial.health(real_logits, fake_logits)}


def generator_adversarial_loss(
    z0_hat, disc_params, cond, t_minus, rng, *, nets: SCFlowNetworks, cfg
):
    """``L_G = mean softplus(-D(z0_hat))`` with D frozen (gradient only to z0_hat)."""
    x = discriminator_inputs(rng, z0_hat, t_minus, cfg)
    disc_fn = discriminator_at(nets, t_minus, cfg)
    return adversarial.generator_loss(
        disc_fn(sg(disc_params), x, cond), sigmoid_head=nets.sigmoid_head
    )


# ---------------------------------------------------------------------------------------------
# Small pieces


def pseudo_huber(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
    """Elementwise ``sqrt((x-y)^2 + c^2) - c``, averaged over all elements."""
    return jnp.mean(jnp.sqrt(jnp.square(x - y) + c * c) - c)


def mean_squared_error(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(x - y))


def term_weight(lam: float, warmup: int, step: jax.Array) -> jax.Array:
    """``lam`` once ``step >= warmup``, else 0 (traced: no recompilation at the switch)."""
    return jnp.where(step >= warmup, lam, 0.0).astype(jnp.float32)


def enabled(cfg, name: str) -> bool:
    return float(cfg[f"lambda_{name}"]) > 0.0


def gan_enabled(cfg) -> bool:
    return enabled(cfg, "gan")


def needs_one_step_sample(cfg) -> bool:
    """The one-step sample feeds the GAN term and (with a teacher) the reflow term."""
    return gan_enabled(cfg) or (enabled(cfg, "rf") and cfg.use_teacher)


def network_time(t: jax.Array, cfg) -> jax.Array:
    """The time fed to networks: floored to integer timesteps for text-to-image teachers."""
    return flows.floor_to_timestep(t) if cfg.integer_timesteps else t


def local_step_sizes(rng: jax.Array, t: jax.Array, delta: float) -> tuple[jax.Array, jax.Array]:
    """``(u1*min(t, delta), u2*min(1-t, delta))``: random local steps that stay in [0, 1]."""
    u1, u2 = jax.random.uniform(rng, (2,) + t.shape, dtype=t.dtype)
    return u1 * jnp.minimum(t, delta), u2 * jnp.minimum(1.0 - t, delta)


def doubled(cond):
    """The condition of a paired batch whose halves share it; ``None`` (unconditional models)
    stays ``None``."""
    return None if cond is None else paired_batch.join(cond, cond)


def one_step_sample(velocity_fn, params, z1: jax.Array, cond) -> jax.Array:
    """The student's one-step map ``z1 - S(1, z1, c)``."""
    t1 = jnp.ones((z1.shape[0],), jnp.float32)
    return flows.data_prediction(z1, t1, velocity_fn(params, t1, z1, cond))


def noised_for_discriminator(x: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Text-to-image D input ``t*eps + (1-t)*x`` (the interpolation, with fresh noise)."""
    return flows.interpolate(x, eps, t)
