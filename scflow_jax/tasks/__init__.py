"""Tasks: one module per problem, each implementing ``base.Task``; ``build_task`` picks the one
``config.data.name`` names."""

from __future__ import annotations

from scflow_jax.tasks.base import Task, load_teacher
from scflow_jax.tasks.celebahq import CelebAHQTask
from scflow_jax.tasks.digits import DigitsTask
from scflow_jax.tasks.text_to_image import TextToImageTask

__all__ = ["Task", "TASKS", "task_class", "build_task", "load_teacher"]

# config.data.name -> the task's class (its ``from_config`` builds it).
TASKS = {"digits": DigitsTask, "celebahq256": CelebAHQTask, "t2i_sd15": TextToImageTask}


def task_class(config) -> type:
    """The class of ``config.data.name``'s task: its class attributes (``pretrained_teacher``)
    answer without building it."""
    name = config.data.name
    if name not in TASKS:
        raise ValueError(
            f"config.data.name={name!r} is not a known task; expected one of {tuple(TASKS)}"
        )
    return TASKS[name]


def build_task(config) -> Task:
    """The task of ``config.data.name`` (cached per config: the stages of one run share it)."""
    return task_class(config).from_config(config)
