"""Stage ``evaluate``: the task's quality table (``Task.evaluate``: the digits classifier's FD and
prompt accuracy; FID and CLIP score for the latent recipes), in ``<workdir>/eval/``."""

from __future__ import annotations

from scflow_jax import tasks


def evaluate(config, workdir: str) -> list[dict]:
    return tasks.build_task(config).evaluate(config, workdir)


def is_done(config, workdir: str) -> bool:
    return tasks.task_class(config).evaluation_done(workdir)
