"""Stage ``train_teacher``: a rectified-flow teacher trained from scratch on the task data."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from absl import logging

from scflow_jax import checkpoint, recipes, sharding, train_state, trainer
from scflow_jax.data.pipeline import InMemoryBatches
from scflow_jax.losses import flow_matching
from scflow_jax.tasks import Task, build_task

STAGE = "teacher"


def stage_dirs(workdir: str) -> trainer.StageDirs:
    return trainer.StageDirs(os.path.join(workdir, STAGE))


def is_done(workdir: str) -> bool:
    return checkpoint.params_exist(stage_dirs(workdir).params)


def make_train_step(task: Task, cfg, optimizer, mesh, root_key):
    """The jitted, donated teacher step: flow-matching loss, AdamW, EMA."""
    null_cond = sharding.put_replicated(jnp.asarray(task.null_cond), mesh)

    def step_fn(state: train_state.FlowTrainState, batch, null_cond):
        rng = jax.random.fold_in(root_key, state.step)
        loss_fn = functools.partial(
            flow_matching.flow_matching_loss, velocity_fn=task.velocity_fn, z0=batch["image"],
            cond=batch["cond"], rng=rng, null_cond=null_cond,
            cond_drop_prob=cfg.cond_drop_prob)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            ema_params=train_state.ema_update(
                state.ema_params, params, train_state.warmed_up_ema_rate(cfg.ema_rate, state.step)))
        return new_state, {**aux, "grad_norm": train_state.global_norm(grads)}

    jitted = jax.jit(step_fn, donate_argnums=(0,))
    return lambda state, batch: jitted(state, batch, null_cond)


def train_teacher(config, workdir: str) -> None:
    if recipes.is_recipe(config):
        raise ValueError(f"config.data.name={config.data.name!r} distills a pretrained teacher "
                         f"(config.model.teacher_path): there is no train_teacher stage")
    cfg = config.teacher
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    sharding.check_global_batch(cfg.batch_size, mesh, "config.teacher.batch_size")
    task = build_task(config)
    dirs = stage_dirs(workdir)
    optimizer = train_state.make_optimizer(cfg.optimizer)
    init_key, root_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))

    def init_fn():
        params = task.init_params(init_key)
        return train_state.FlowTrainState(step=jnp.zeros((), jnp.int32), params=params,
                                          ema_params=params, opt_state=optimizer.init(params))

    state, abstract, shardings = trainer.init_state(init_fn, mesh)
    trainer.log_parameter_overview(state.params, "teacher")
    logging.info("[teacher] %d parameters, %d training examples, global batch %d",
                 train_state.count_params(state.params), len(task.train["image"]),
                 cfg.batch_size)
    data = InMemoryBatches({k: task.train[k] for k in ("image", "cond")}, cfg.batch_size,
                           seed=config.seed)
    grid = task.grid_sampler(config.seed, num_steps=16)
    result = trainer.run_loop(
        stage=STAGE, dirs=dirs, loop=trainer.LoopConfig(
            cfg.num_steps, cfg.log_every, cfg.checkpoint_every, cfg.keep_checkpoints,
            cfg.sample_every),
        state=state, abstract_state=abstract, state_shardings=shardings,
        train_step=make_train_step(task, cfg, optimizer, mesh, root_key),
        batch_fn=data.batch, mesh=mesh,
        sample_images=lambda state: grid(state.ema_params), grid_rows=len(task.prompts) - 1)
    if not result.preempted:
        # The EMA is the teacher that distillation and evaluation use.
        checkpoint.save_params(dirs.params, result.state.ema_params)
        logging.info("[teacher] done: parameters exported to %s", dirs.params)
    return result
