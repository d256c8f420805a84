"""Stage ``train_teacher``: a rectified-flow teacher trained from scratch on the task data."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from scflow_jax import checkpoint, layout, precision, sharding, tasks, train_state, trainer, xla_gpu
from scflow_jax.losses import flow_matching

STAGE = layout.TEACHER


def is_done(config, workdir: str) -> bool:
    return checkpoint.params_exist(layout.stage_dirs(workdir, STAGE).params)


def split_microbatches(batch: dict, num_micro: int, mesh) -> dict:
    """[B, ...] -> [num_micro, B / num_micro, ...] where microbatch j holds rows j, j+k, ...

    Strided rather than contiguous: every device then holds an equal part of every
    microbatch, so each accumulation step uses all devices with no data movement.
    """
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def check_grad_accum(cfg, mesh, field: str = "config.teacher") -> int:
    steps = cfg.get("grad_accum_steps", 1)
    if steps < 1:
        raise ValueError(f"{field}.grad_accum_steps={steps} must be >= 1")
    micro = cfg.batch_size // steps
    if cfg.batch_size % steps or micro % mesh.devices.size:
        raise ValueError(
            f"{field}.batch_size={cfg.batch_size} must split into {field}.grad_accum_steps="
            f"{steps} microbatches that each divide over the {mesh.devices.size} devices "
            f"(a multiple of {steps * mesh.devices.size})"
        )
    return steps


def make_train_step(
    task: tasks.Task,
    cfg,
    optimizer,
    mesh,
    root_key,
    state_shardings=None,
    compiler_options=None,
    rules: sharding.ShardingRules | None = None,
):
    """The jitted, donated teacher step: flow-matching loss, AdamW, EMA.

    With ``cfg.grad_accum_steps = k > 1`` the global batch is processed as k microbatches
    in a ``lax.scan`` and their gradients are averaged before one optimizer update
    (microbatch j draws its noise from ``fold_in(step_key, j)``). ``compiler_options``: XLA
    options of this program (xla_gpu.step_compiler_options); ``rules``: the FSDP rules that
    split the parameters (xla_gpu.network_for_mesh).
    """
    null_cond = sharding.put_replicated(jnp.asarray(task.null_cond), mesh)
    num_micro = check_grad_accum(cfg, mesh)
    velocity_fn = xla_gpu.network_for_mesh(task.velocity_fn, mesh, rules)

    def loss_and_grads(params, batch, rng, null_cond):
        loss_fn = functools.partial(
            flow_matching.flow_matching_loss,
            velocity_fn=velocity_fn,
            z0=batch["image"],
            cond=batch["cond"],
            rng=rng,
            null_cond=null_cond,
            cond_drop_prob=cfg.cond_drop_prob,
        )
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return aux, grads

    def step_fn(state: train_state.FlowTrainState, batch, null_cond):
        rng = jax.random.fold_in(root_key, state.step)
        if num_micro == 1:
            aux, grads = loss_and_grads(state.params, batch, rng, null_cond)
        else:

            def accumulate(grad_sum, micro):
                index, microbatch = micro
                aux, grads = loss_and_grads(
                    state.params, microbatch, jax.random.fold_in(rng, index), null_cond
                )
                return jax.tree.map(jnp.add, grad_sum, grads), aux

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grad_sum, auxs = jax.lax.scan(
                accumulate,
                zeros,
                (jnp.arange(num_micro), split_microbatches(batch, num_micro, mesh)),
            )
            grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
            aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=train_state.ema_update(
                state.ema_params, params, train_state.warmed_up_ema_rate(cfg.ema_rate, state.step)
            ),
        )
        return new_state, {**aux, "grad_norm": train_state.global_norm(grads)}

    # Explicit output shardings keep the state's layout fixed from step to step.
    out = (
        {}
        if state_shardings is None
        else {"out_shardings": (state_shardings, sharding.replicated(mesh))}
    )
    jitted = jax.jit(step_fn, donate_argnums=(0,), compiler_options=compiler_options, **out)
    return lambda state, batch: jitted(state, batch, null_cond)


def train_teacher(config, workdir: str):
    if tasks.task_class(config).pretrained_teacher:
        raise ValueError(
            f"config.data.name={config.data.name!r} distills a pretrained teacher "
            f"(config.model.teacher_path): there is no train_teacher stage"
        )
    cfg = config.teacher
    mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(cfg.batch_size, mesh, "config.teacher.batch_size")
    check_grad_accum(cfg, mesh)
    task = precision.configure_task(tasks.build_task(config), config)
    dirs = layout.stage_dirs(workdir, STAGE)
    optimizer = train_state.make_optimizer(cfg.optimizer)
    init_key, root_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))

    def init_fn():
        params = task.init_params(init_key)
        return train_state.FlowTrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=optimizer.init(params),
        )

    rules = sharding.ShardingRules.from_config(config)
    state, abstract, shardings = trainer.init_state(init_fn, mesh, rules)
    data = task.batches(
        cfg.batch_size,
        seed=config.seed,
        process_rows=sharding.process_batch_indices(mesh, cfg.batch_size),
    )
    trainer.log_parameter_overview(state.params, "teacher")
    logging.info(
        "[teacher] %d parameters, %d training examples, global batch %d",
        train_state.count_params(state.params),
        data.num_examples,
        cfg.batch_size,
    )
    grid = task.grid_sampler(config.seed, num_steps=16)
    result = trainer.run_loop(
        stage=STAGE,
        dirs=dirs,
        loop=trainer.LoopConfig.from_stage_config(cfg),
        state=state,
        abstract_state=abstract,
        state_shardings=shardings,
        train_step=make_train_step(
            task,
            cfg,
            optimizer,
            mesh,
            root_key,
            shardings,
            compiler_options=xla_gpu.from_config(config, mesh),
            rules=rules,
        ),
        batch_fn=data.batch,
        mesh=mesh,
        # Replicated parameters make the grid a replicated array every process can read.
        sample_images=lambda state: grid(sharding.put_replicated(state.ema_params, mesh)),
        grid_rows=task.grid_rows,
    )
    if not result.preempted:
        # The EMA is the teacher that distillation and evaluation use.
        checkpoint.save_params(dirs.params, result.state.ema_params)
        logging.info("[teacher] done: parameters exported to %s", dirs.params)
    return result
