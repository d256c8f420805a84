"""The interface between a task and the stages: what every stage may ask of a task.

A task is the data, the networks and the conditioning of one problem (the embedded digits,
CelebA-HQ with the ADM teacher, SD 1.5 text-to-image): one module each in this package. The
stages (teacher.py, distill.py, sample.py, evaluate.py, export.py) ask only for the members of
``Task`` below, so they hold no per-task branches.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import jax
import numpy as np

from scflow_jax import checkpoint, layout


class Task(Protocol):
    """What the stages use. Networks follow the project's conventions (flows.py): times run
    from 0 (data) to 1 (noise) and ``velocity_fn`` predicts ``z1 - z0``."""

    # True: ``load_teacher_params`` reads a pretrained checkpoint and there is no train_teacher
    # stage; False: the teacher is trained from ``init_params`` by --mode=train_teacher.
    pretrained_teacher: ClassVar[bool]
    # The sample stage's grid.png shows each sample scaled up this much.
    sample_grid_upscale: ClassVar[int]

    model: Any  # the flow network's Linen module (teacher, student, EMAs)
    discriminator: Any  # D's Linen module (precision.configure_task replaces both)

    @property
    def unconditional(self) -> bool:
        """True: no prompts (``cond`` is None everywhere)."""

    @property
    def disc_takes_time(self) -> bool:
        """True: ``disc_fn`` also takes the time of its (noised) input."""

    @property
    def null_cond(self) -> np.ndarray | None:
        """The empty prompt's condition (guidance); None for an unconditional task."""

    @property
    def grid_rows(self) -> int:
        """Rows of ``grid_sampler``'s image grid."""

    # -- networks --------------------------------------------------------------------------

    def velocity_fn(self, params, t, x, cond) -> jax.Array:
        """F(t, x, c) ~ z1 - z0, the project's convention."""

    def disc_fn(self, disc_params, x, cond, *time) -> jax.Array:
        """D's logits [B]; given ``t`` too when ``disc_takes_time``."""

    def init_disc_params(self, rng, teacher_params=None) -> Any:
        """D's initial parameters (some start from the teacher's)."""

    def init_params(self, rng) -> Any:
        """Fresh flow-network parameters (the train_teacher stage)."""

    def abstract_params(self) -> Any:
        """The flow network's parameter shapes (``jax.ShapeDtypeStruct`` tree)."""

    def load_teacher_params(self) -> Any:
        """The pretrained teacher as a host (NumPy) tree (``pretrained_teacher`` tasks)."""

    def load_flow_params(self, path: str, mesh, what: str) -> Any:
        """Flow parameters a stage exported, checked against this architecture, whole on
        every device of ``mesh``."""

    # -- data and conditioning ---------------------------------------------------------------

    def batches(self, global_batch: int, seed: int, process_rows=None) -> Any:
        """A source of ``num_examples`` examples whose ``.batch(step)`` (pure in seed and step)
        gives this process's rows of the global batch: ``image`` (z0) and, if conditional,
        ``cond``."""

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> conditions [N, ...] (the task's frozen text encoder)."""

    # -- what the stages make ----------------------------------------------------------------

    def grid_sampler(self, seed: int, num_steps: int) -> Callable[[Any], np.ndarray]:
        """``params -> images`` of a fixed grid of samples (training logs)."""

    def sample_images(
        self, params, cond: np.ndarray | None, num_samples: int, *, num_steps: int, config, mesh
    ) -> np.ndarray:
        """``num_samples`` images on the host (sample i conditioned on ``cond[i]``), with the
        sampler, guidance and seed of ``config.sample`` / ``config.seed``."""

    def evaluate(self, config, workdir: str) -> list[dict]:
        """--mode=evaluate: the rows of the task's quality table."""

    @classmethod
    def evaluation_done(cls, workdir: str) -> bool:
        """Whether ``evaluate`` finished in ``workdir`` (answered without building the task)."""

    def export_params(self, params, out_dir: str) -> str:
        """Writes flow parameters in the teacher's own format; returns the written path."""


def load_teacher(task: Task, config, workdir: str, shardings_for: Callable[[Any], Any]) -> Any:
    """The teacher's parameters, placed with ``shardings_for(abstract tree)``: the task's
    pretrained checkpoint, or the trained teacher at ``layout.teacher_params_path``, checked
    name by name against the task's architecture."""
    if task.pretrained_teacher:
        host = task.load_teacher_params()
        return jax.device_put(host, shardings_for(jax.eval_shape(lambda: host)))
    path = layout.teacher_params_path(config, workdir)
    if not checkpoint.params_exist(path):
        raise FileNotFoundError(
            f"teacher parameters not found at {path} (config.distill.teacher_params; empty "
            f"means <workdir>/teacher/params, written by --mode=train_teacher)"
        )
    abstract = task.abstract_params()
    return checkpoint.load_params(
        path, abstract, shardings_for(abstract), what="teacher parameters"
    )
