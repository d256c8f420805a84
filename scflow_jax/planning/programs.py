"""What a plan compiles, built as the stages build it, from shapes alone: the distill stage's step
over its sharded state, or the evaluation sampler's program.

The one module of the planner that knows the stage and task modules. What it uses of them:
``tasks.build_task``, ``tasks.task_class`` (``pretrained_teacher``: a latent recipe) and a recipe
task's ``_text_encoder`` / ``null_cond`` / ``batches``, replaced for shapes;
``distill.validate_distill_config``, ``distill.state_initializer``, ``distill.networks``,
``distill.make_train_step``; ``precision.configure_task``, ``precision.frozen_params``;
``train_state.make_optimizer``, ``train_state.count_params``; ``xla_gpu.from_config``;
``evaluation.generate.sampler_program``, ``generate.euler_sample_fn``; and from ``sharding`` the
mesh, batch and FSDP rules the trainer applies.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax import distill, precision, sharding, tasks, train_state, xla_gpu
from scflow_jax.evaluation import generate
from scflow_jax.models import clip, unet_sd, weights
from scflow_jax.models.vae import VAEConfig
from scflow_jax.planning.xla_memory import per_device_bytes, placed

# Tiny stand-ins of SD 1.5's UNet and VAE (the same families, the same 77 x 768 text states and
# 8x downsampling), for plans and benchmarks that check wiring, not figures.
TINY_UNET = unet_sd.UNetSDConfig(
    sample_size=8,
    block_out_channels=(32, 32),
    layers_per_block=1,
    cross_attention_dim=768,
    norm_num_groups=8,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = VAEConfig(
    block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64
)


class ShapesOnly:
    """Mixed into a latent recipe's task class for planning: its networks and shapes, no weights.
    The text encoder is its config alone (``text_config``, a field of the mixed class: the
    discriminator's condition shape), the empty prompt's condition zeros of its shape, and a batch
    zeros of the dataset's shapes."""

    @property
    def _text_encoder(self):
        return self.text_config, None, None

    @property
    def null_cond(self):
        if self.unconditional:
            return None
        return np.zeros(
            (self.text_config.max_position_embeddings, self.text_config.hidden_size), np.float32
        )

    def batches(self, global_batch: int, seed: int, process_rows=None):
        rows = global_batch if process_rows is None else len(process_rows)
        example = {"image": np.zeros((rows,) + tuple(self.latent_shape), np.float32)}
        if not self.unconditional:
            example["cond"] = np.zeros((rows,) + self.null_cond.shape, np.float32)
        return _OneBatch(example)


@dataclasses.dataclass
class _OneBatch:
    example: dict

    def batch(self, step: int) -> dict:
        del step
        return self.example


# The model folders a recipe reads its architecture from, and what a plan takes where one is not
# set: the config.json of the reference network, or of its tiny stand-in.
_REFERENCE_NETWORKS = {
    "model.vae_path": (
        "vae",
        {"_class_name": "AutoencoderKL"},
        "SD's VAE",
        {
            "_class_name": "AutoencoderKL",
            **{
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(TINY_VAE).items()
            },
        },
    ),
    "model.teacher_path": (
        "unet",
        unet_sd.UNetSDConfig().to_dict(),
        "SD 1.5's UNet",
        TINY_UNET.to_dict(),
    ),
}


def _text_config(config) -> tuple[clip.CLIPTextConfig, str]:
    path = config.model.get("text_encoder_path")
    if not path:
        return clip.CLIPTextConfig(), "CLIP ViT-L/14's (config.model.text_encoder_path not set)"
    nested = os.path.join(path, "text_encoder")
    folder = nested if os.path.isdir(nested) else path
    raw = weights.read_json(os.path.join(folder, "config.json"), what="CLIP text encoder config")
    return clip.CLIPTextConfig.from_dict(raw), f"config.model.text_encoder_path={path}"


def recipe_task(config, tiny_networks: bool = False) -> tuple[Any, dict]:
    """The recipe's task from the ``config.json`` of each model folder the config names (no weights
    read), and where each network's architecture came from. A folder not named is the recipe's
    reference network (SD 1.5's UNet, SD's VAE, CLIP ViT-L/14's text encoder), so a recipe plans
    before anything is downloaded; with ``tiny_networks`` (``config.plan.tiny_networks``, which
    the recipes' :tiny variants set) its tiny stand-in (:data:`TINY_UNET`, :data:`TINY_VAE`)."""
    architecture = {}
    with tempfile.TemporaryDirectory() as reference:
        probe = copy.deepcopy(config)
        with probe.unlocked():
            for field, (folder, contents, what, tiny) in _REFERENCE_NETWORKS.items():
                group, name = field.split(".")
                if field == "model.teacher_path" and "adm" in config.model:
                    architecture["adm"] = "config.model.adm"  # the ADM teacher is built from it
                    continue
                if probe[group].get(name):
                    architecture[name] = f"config.{field}={probe[group][name]}"
                    continue
                os.makedirs(os.path.join(reference, folder))
                with open(os.path.join(reference, folder, "config.json"), "w") as f:
                    json.dump(tiny if tiny_networks else contents, f)
                probe[group][name] = os.path.join(reference, folder)
                architecture[name] = (
                    f"{'a tiny stand-in of ' if tiny_networks else ''}{what} "
                    f"(config.{field} not set)"
                )
        task = tasks.build_task(probe)
    fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    fields["config"] = config
    if not task.unconditional:
        fields["text_config"], architecture["text_encoder_path"] = _text_config(config)
    # A dataclass, so that text_config survives dataclasses.replace (precision.configure_task).
    cls = dataclasses.dataclass(eq=False)(
        type(
            f"ShapesOnly{type(task).__name__}",
            (ShapesOnly, type(task)),
            {"__annotations__": {"text_config": Any}, "text_config": None},
        )
    )
    return cls(**fields), architecture


def build_task(config, tiny_networks: bool = False) -> tuple[Any, dict]:
    """The config's task for planning and where its architecture came from."""
    if tasks.task_class(config).pretrained_teacher:  # a latent recipe: planned from its folders
        return recipe_task(config, tiny_networks)
    return tasks.build_task(config), {"model": "config.model"}


def teacher_shapes(task):
    """The flow network's float32 parameter shapes (the teacher's, and so the student's)."""
    if hasattr(task, "abstract_params"):
        return task.abstract_params()
    return jax.eval_shape(task.init_params, jax.random.PRNGKey(0))


def _example(task, batch_size: int, mesh) -> dict:
    """One global batch's shapes, split over the mesh as the trainer splits it."""
    rows = sharding.batch_sharding(mesh)
    example = task.batches(batch_size, seed=0).batch(0)
    return {
        k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=rows)
        for k, v in example.items()
    }


def _replicated_null_cond(task, mesh):
    null = task.null_cond
    if null is None:
        return None
    return jax.ShapeDtypeStruct(
        np.shape(null), np.asarray(null).dtype, sharding=sharding.replicated(mesh)
    )


@dataclasses.dataclass
class Program:
    """A program to lower and what the plan knows of it before compiling."""

    name: str  # distill_step or sampler
    lower: Callable[[], Any]  # () -> jax.stages.Lowered (tracing a large step takes minutes)
    batch: int
    state_bytes: dict  # per device, by part of what the program holds between calls
    inputs_bytes: int  # per device: the batch (or the sampler's rows) and the conditions
    parameters: dict  # counts of the networks held
    sharding_summary: str


def distill_step(config, task, mesh) -> Program:
    """The distill stage's step as ``distill.build_distill`` builds it, to be lowered for ``mesh``
    from the shapes of its state (``jax.eval_shape`` of the stage's initialiser) under the
    trainer's FSDP rules; the frozen teacher as ``precision.frozen_params`` stores it."""
    distill.validate_distill_config(config)
    batch = config.distill.batch_size
    sharding.check_global_batch(batch, mesh, "config.distill.batch_size")
    rules = sharding.ShardingRules.from_config(config)
    task = precision.configure_task(task, config)
    teacher = teacher_shapes(task)
    optimizer = train_state.make_optimizer(config.distill.optimizer)
    disc_optimizer = train_state.make_optimizer(config.disc.optimizer)
    init_fn = distill.state_initializer(task, optimizer, disc_optimizer, jax.random.PRNGKey(0))
    summary = sharding.ShardingSummary()
    abstract = jax.eval_shape(init_fn, teacher)
    shardings = sharding.state_shardings(abstract, mesh, rules, summary)
    teacher_shardings = sharding.state_shardings(teacher, mesh, rules)
    frozen_teacher = precision.frozen_params(teacher, config)
    state_bytes = {
        f.name: per_device_bytes(getattr(abstract, f.name), getattr(shardings, f.name))
        for f in dataclasses.fields(abstract)
    }
    state_bytes["teacher"] = per_device_bytes(frozen_teacher, teacher_shardings)
    example = _example(task, batch, mesh)
    frozen = {
        "teacher_params": placed(frozen_teacher, teacher_shardings),
        "null_cond": _replicated_null_cond(task, mesh),
    }
    inputs = {"batch": example, "null_cond": frozen["null_cond"]}
    inputs_bytes = per_device_bytes(inputs, jax.tree.map(lambda x: x.sharding, inputs))
    step = distill.make_train_step(
        distill.networks(task, mesh, rules),
        config.scflow,
        optimizer,
        disc_optimizer,
        jax.random.PRNGKey(1),
        out_shardings=(shardings, sharding.replicated(mesh)),
        compiler_options=xla_gpu.from_config(config, mesh),
    )
    return Program(
        "distill_step",
        lambda: step.lower(placed(abstract, shardings), example, frozen),
        batch,
        state_bytes,
        inputs_bytes,
        {
            "student": train_state.count_params(abstract.params),
            "discriminator": train_state.count_params(abstract.disc_params),
        },
        summary.describe(),
    )


def sampler(config, task, mesh, steps: int) -> Program:
    """The evaluation sampler's program (``generate.sampler_program``: ``steps`` Euler steps of the
    student, the program --mode=sample and --mode=evaluate run; the VAE decode runs after it) at
    ``config.eval.batch_size``, the student held whole on every device as the samplers hold it."""
    batch = config.eval.batch_size
    sharding.check_global_batch(batch, mesh, "config.eval.batch_size")
    task = precision.configure_task(task, config)
    student = teacher_shapes(task)  # exported float32, with the teacher's shapes
    held = sharding.sampler_shardings(student, mesh)
    example = _example(task, batch, mesh)
    program = generate.sampler_program(
        generate.euler_sample_fn(task.velocity_fn, num_steps=steps),
        latent_shape=example["image"].shape[1:],
        seed=0,
        mesh=mesh,
    )
    rows = sharding.batch_sharding(mesh)
    inputs = {
        "indices": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
        "cond": example.get("cond"),
    }
    inputs_bytes = per_device_bytes(inputs, jax.tree.map(lambda x: x.sharding, inputs))

    def lower():
        return program.lower(placed(student, held), inputs["indices"], inputs["cond"], None)

    return Program(
        "sampler",
        lower,
        batch,
        {"student": per_device_bytes(student, held)},
        inputs_bytes,
        {"student": train_state.count_params(student)},
        "student whole on every device",
    )
