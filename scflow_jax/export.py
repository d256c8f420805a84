"""Stage ``export``: the distilled student in its teacher's own format (the task chooses it:
a diffusers UNet folder, a guided-diffusion ``.safetensors``), for use outside this project."""

from __future__ import annotations

import jax

from scflow_jax import checkpoint, layout, sharding, tasks


def export_student(config, workdir: str, *, task: tasks.Task | None = None) -> str:
    """Writes the student (the eval EMA at ``<workdir>/distill/params``) to
    ``config.export.output_dir`` (default ``<workdir>/export``); returns the written path."""
    task = task or tasks.build_task(config)
    path = layout.student_params_path(workdir)
    if not checkpoint.params_exist(path):
        raise FileNotFoundError(f"no distilled student at {path}: run --mode=distill first")
    mesh = sharding.make_mesh(1, 1)
    params = jax.device_get(task.load_flow_params(path, mesh, what="student parameters"))
    return task.export_params(params, layout.export_dir(config, workdir))
