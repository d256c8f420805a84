"""Stage ``distill``: SCFlow distillation of the teacher into a one/few-step student.

One jitted, mesh-sharded step per iteration runs the discriminator update and then the
generator update against the updated (frozen) discriminator (SCFLOW_SPEC.md sections 3-4); the
objectives, and the one-step sample both updates share, are losses/scflow.py's. This module
holds the optimizers, the EMAs, the sharded state and the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging

from scflow_jax import checkpoint, layout, precision, sharding, tasks, train_state, trainer, xla_gpu
from scflow_jax.losses import adversarial, scflow

STAGE = layout.DISTILL


def is_done(config, workdir: str) -> bool:
    return checkpoint.params_exist(layout.stage_dirs(workdir, STAGE).params)


def validate_scflow_config(cfg) -> None:
    """Rejects settings the objective cannot honour, naming the field."""
    for field in ("init_threshold", "trunc_threshold"):
        value = cfg[field]
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"config.scflow.{field}={value} must lie in [0, 1]")
    for field in ("target_ema", "eval_ema"):
        if not 0.0 <= cfg[field] <= 1.0:
            raise ValueError(f"config.scflow.{field}={cfg[field]} must lie in [0, 1]")
    lambdas = {k: cfg[k] for k in ("lambda_con", "lambda_rf", "lambda_gan", "lambda_inv")}
    for name, value in lambdas.items():
        if value < 0:
            raise ValueError(f"config.scflow.{name}={value} must be >= 0")
    if not any(v > 0 for v in lambdas.values()):
        raise ValueError(
            "every loss term is disabled (config.scflow.lambda_con, lambda_rf, "
            "lambda_gan and lambda_inv are all 0): nothing to train"
        )
    if cfg.huber_c <= 0:
        raise ValueError(f"config.scflow.huber_c={cfg.huber_c} must be > 0")
    for field in ("warmup_rf", "warmup_gan", "warmup_inv"):
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"config.scflow.{field}={value!r} must be a whole number of steps >= 0"
            )


def validate_distill_config(config) -> None:
    validate_scflow_config(config.scflow)
    accum = config.distill.get("grad_accum_steps", 1)
    if accum != 1:
        # The D and G updates of one iteration share the one-step sample and its pullback,
        # and G is trained against the D updated on the same batch: microbatching would
        # either change the algorithm (a D update per microbatch) or keep every
        # microbatch's pullback alive at once (no memory saved).
        raise ValueError(
            f"config.distill.grad_accum_steps={accum} is not supported: the distillation "
            f"step updates the discriminator and then the generator on the same batch, so "
            f"it cannot be split into microbatches without changing the algorithm; use 1 "
            f"(and more devices, config.mesh.fsdp, or config.model.remat to fit memory)"
        )


def load_teacher_params(config, workdir: str, task: tasks.Task, mesh, rules=None):
    """The frozen teacher, checked name by name against the student's architecture and
    placed with the student's parameter shardings (FSDP rules): a pretrained checkpoint
    (through the task's converter) or the train_teacher stage's export."""
    return tasks.load_teacher(
        task, config, workdir, lambda abstract: sharding.state_shardings(abstract, mesh, rules)
    )


def _place(host_params, mesh, rules):
    return jax.device_put(
        host_params, sharding.state_shardings(jax.eval_shape(lambda: host_params), mesh, rules)
    )


def networks(
    task: tasks.Task,
    mesh=None,
    rules: sharding.ShardingRules | None = None,
    *,
    sigmoid_head: bool | None = None,
) -> scflow.SCFlowNetworks:
    """Student, target and teacher share the task's flow network; D is the task's. Given the
    ``mesh`` (and the FSDP ``rules``), each runs as ``xla_gpu.network_for_mesh`` says.
    ``sigmoid_head`` (``config.scflow.sigmoid_head``): None follows D's family convention."""

    def on_mesh(fn):
        return fn if mesh is None or fn is None else xla_gpu.network_for_mesh(fn, mesh, rules)

    return scflow.SCFlowNetworks(
        velocity_fn=on_mesh(task.velocity_fn),
        teacher_velocity_fn=on_mesh(task.velocity_fn),
        disc_fn=on_mesh(task.disc_fn),
        disc_takes_time=task.disc_takes_time,
        sigmoid_head=adversarial.sigmoid_head_for(task.discriminator, sigmoid_head),
    )


def make_train_step(
    nets: scflow.SCFlowNetworks,
    cfg,
    optimizer,
    disc_optimizer,
    root_key,
    out_shardings=None,
    compiler_options=None,
):
    """The jitted SCFlow iteration ``(state, batch, frozen) -> (state, metrics)``.

    ``cfg`` is the ``config.scflow`` group; ``batch`` holds ``image`` (z0) and ``cond``;
    ``frozen`` holds ``teacher_params`` and ``null_cond``. ``out_shardings``: (state
    shardings, metrics sharding), keeping the state's layout fixed from step to step.
    ``compiler_options``: XLA options of this program (xla_gpu.step_compiler_options).
    """
    use_gan = scflow.gan_enabled(cfg)

    def update_discriminator(state, z0, fake, cond, t_minus, rng):
        """D's AdamW step on L_D (section 4); before the GAN warm-up, computed and discarded."""
        (_, metrics), grads = jax.value_and_grad(scflow.discriminator_objective, has_aux=True)(
            state.disc_params, z0, fake, cond, t_minus, rng, nets=nets, cfg=cfg
        )
        updates, opt_state = disc_optimizer.update(grads, state.disc_opt_state, state.disc_params)
        metrics["disc_grad_norm"] = train_state.global_norm(grads)
        # Computed and discarded rather than skipped by a lax.cond: XLA:CPU runs convolution
        # gradients inside a conditional many times slower, which costs far more than the
        # update itself.
        gan_on = state.step >= cfg.warmup_gan
        keep_if_on = lambda new, old: jnp.where(gan_on, new, old)  # noqa: E731
        params = jax.tree.map(
            keep_if_on, jax.tree.map(jnp.add, state.disc_params, updates), state.disc_params
        )
        opt_state = jax.tree.map(keep_if_on, opt_state, state.disc_opt_state)
        return params, opt_state, jax.tree.map(lambda m: jnp.where(gan_on, m, 0.0), metrics)

    def step_fn(state: train_state.DistillState, batch, frozen):
        rng = jax.random.fold_in(root_key, state.step)
        k_gen, k_dnoise, k_gnoise = jax.random.split(rng, 3)
        z0, cond = batch["image"], batch.get("cond")  # no "cond": an unconditional model
        inputs = scflow.prepare_generator_inputs(
            k_gen,
            z0,
            cond,
            teacher_params=frozen["teacher_params"],
            target_params=state.target_params,
            null_cond=frozen["null_cond"],
            nets=nets,
            cfg=cfg,
        )
        one_step = scflow.share_one_step_sample(state.params, inputs.z1, cond, nets=nets, cfg=cfg)
        metrics = {}
        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        if use_gan:
            disc_params, disc_opt_state, d_metrics = update_discriminator(
                state, z0, one_step.detached(), cond, inputs.t_minus, k_dnoise
            )
            metrics.update(d_metrics)

        (total, terms), grads = scflow.generator_value_and_grad(
            state.params, one_step, inputs, state.step, disc_params, k_gnoise, nets=nets, cfg=cfg
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            target_params=train_state.ema_update(state.target_params, params, cfg.target_ema),
            ema_params=train_state.ema_update(state.ema_params, params, cfg.eval_ema),
            disc_params=disc_params,
            disc_opt_state=disc_opt_state,
        )
        metrics.update(terms)
        metrics.update(loss=total, grad_norm=train_state.global_norm(grads))
        return new_state, metrics

    out = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(step_fn, donate_argnums=(0,), compiler_options=compiler_options, **out)


def init_distill_state(init_disc_params, teacher_params, optimizer, disc_optimizer, disc_key):
    """Student, target and eval EMA all start as copies of the teacher (spec section 2);
    the discriminator from ``init_disc_params(disc_key)``."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 - distinct buffers
    disc_params = init_disc_params(disc_key)
    return train_state.DistillState(
        step=jnp.zeros((), jnp.int32),
        params=copy(teacher_params),
        target_params=copy(teacher_params),
        ema_params=copy(teacher_params),
        opt_state=optimizer.init(teacher_params),
        disc_params=disc_params,
        disc_opt_state=disc_optimizer.init(disc_params),
    )


def state_initializer(task: tasks.Task, optimizer, disc_optimizer, disc_key) -> Callable:
    """``init_fn(teacher_params) -> DistillState`` for ``task``: the discriminator is the task's,
    built from the teacher where it takes the teacher's weights (the UNet-encoder D)."""

    def init_fn(teacher):
        init_disc = functools.partial(task.init_disc_params, teacher_params=teacher)
        return init_distill_state(init_disc, teacher, optimizer, disc_optimizer, disc_key)

    return init_fn


def _ema_grid(sampler, mesh):
    # Replicated parameters make the grid a replicated array that every process can read.
    return lambda state: sampler(sharding.put_replicated(state.ema_params, mesh))


@dataclasses.dataclass
class DistillSetup:
    """Everything the distillation loop runs, built in its sharded layout."""

    mesh: jax.sharding.Mesh
    task: tasks.Task
    state: train_state.DistillState
    abstract_state: Any
    state_shardings: Any
    frozen: dict  # teacher_params, null_cond: step inputs never updated
    jitted_step: Any  # the jitted (state, batch, frozen) -> (state, metrics)
    train_step: Callable  # (state, global batch) -> (state, metrics)
    data: Any  # .batch(step): this process's rows of each global batch


def build_distill(
    config, workdir: str, teacher_params=None, task: tasks.Task | None = None
) -> DistillSetup:
    """Mesh, task, sharded state, step and data of the distill stage. ``teacher_params``
    (a host tree) replaces loading the teacher export, and ``task`` the config's task (e.g. a
    random-weight recipe task without files), both for benchmarks."""
    cfg = config.distill
    validate_distill_config(config)
    mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(cfg.batch_size, mesh, "config.distill.batch_size")
    rules = sharding.ShardingRules.from_config(config)
    task = precision.configure_task(task if task is not None else tasks.build_task(config), config)
    data = task.batches(
        cfg.batch_size,
        seed=config.seed + 1,
        process_rows=sharding.process_batch_indices(mesh, cfg.batch_size),
    )
    if teacher_params is None:
        teacher_params = load_teacher_params(config, workdir, task, mesh, rules)
    else:
        teacher_params = _place(teacher_params, mesh, rules)
    optimizer = train_state.make_optimizer(cfg.optimizer)
    disc_optimizer = train_state.make_optimizer(config.disc.optimizer)
    disc_key, root_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))

    null_cond = task.null_cond  # (recipes: encoded by the text encoder, outside any trace)
    init_fn = state_initializer(task, optimizer, disc_optimizer, disc_key)
    state, abstract, shardings = trainer.init_state(init_fn, mesh, rules, teacher_params)
    # Student, EMAs and D start from the float32 teacher; the frozen copy then halves (bf16
    # compute).
    teacher_params = precision.frozen_params(teacher_params, config)
    frozen = {
        "teacher_params": teacher_params,
        "null_cond": None
        if null_cond is None
        else sharding.put_replicated(jnp.asarray(null_cond), mesh),
    }
    nets = networks(task, mesh, rules, sigmoid_head=config.scflow.get("sigmoid_head"))
    step = make_train_step(
        nets,
        config.scflow,
        optimizer,
        disc_optimizer,
        root_key,
        out_shardings=(shardings, sharding.replicated(mesh)),
        compiler_options=xla_gpu.from_config(config, mesh),
    )
    return DistillSetup(
        mesh=mesh,
        task=task,
        state=state,
        abstract_state=abstract,
        state_shardings=shardings,
        frozen=frozen,
        jitted_step=step,
        train_step=lambda s, b: step(s, b, frozen),
        data=data,
    )


def distill(config, workdir: str):
    cfg = config.distill
    setup = build_distill(config, workdir)
    trainer.log_parameter_overview(setup.state.disc_params, "discriminator")
    logging.info(
        "[distill] student %d parameters, discriminator %d parameters",
        train_state.count_params(setup.state.params),
        train_state.count_params(setup.state.disc_params),
    )
    dirs = layout.stage_dirs(workdir, STAGE)
    result = trainer.run_loop(
        stage=STAGE,
        dirs=dirs,
        loop=trainer.LoopConfig.from_stage_config(cfg),
        state=setup.state,
        abstract_state=setup.abstract_state,
        state_shardings=setup.state_shardings,
        train_step=setup.train_step,
        batch_fn=setup.data.batch,
        mesh=setup.mesh,
        sample_images=_ema_grid(setup.task.grid_sampler(config.seed, num_steps=1), setup.mesh)
        if cfg.sample_every
        else None,
        grid_rows=setup.task.grid_rows,
    )
    if not result.preempted:
        checkpoint.save_params(dirs.params, result.state.ema_params)
        logging.info("[distill] done: student (eval EMA) exported to %s", dirs.params)
    return result
