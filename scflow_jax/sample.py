"""Stage ``sample``: prompts (or, for an unconditional task, a number of images) -> PNG files and
a grid, from the student (the distilled eval EMA) or the teacher, at each step count of
``config.sample.num_steps``.

Writes ``<workdir>/samples/<model>_<sampler>_<N>steps/``: one PNG per sample (``<prompt>_<k>.png``,
or ``<index>.png`` without prompts), ``grid.png`` (a row per prompt) and ``prompts.txt``. How the
samples are drawn (noise, batches, decoding) is the task's ``sample_images``.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from scflow_jax import checkpoint, layout, monitoring, precision, sharding, tasks
from scflow_jax.evaluation import prompts as prompts_lib

MODELS = ("student", "teacher")


def read_prompts(prompts, prompts_file: str | None) -> list[str]:
    """Prompts from the config/CLI list and/or a file (``evaluation.prompts.load_prompts``
    formats: one per line, or JSON). Empty lines inside a file are refused with their line
    numbers: a skipped line would shift every later prompt's output file name."""
    out = [p for p in (prompts or ())]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts file {prompts_file!r} does not exist")
        with open(prompts_file, encoding="utf-8") as f:
            if f.read().strip():  # a blank file adds nothing (then: "no prompts" below)
                out += prompts_lib.load_prompts(prompts_file)
    if not out:
        raise ValueError("no prompts: set config.sample.prompts, --prompt or --prompts_file")
    return out


def run(config, workdir: str, prompts=(), prompts_file: str | None = None):
    """--mode=sample: prompts given on the command line (flags or a file) replace the config's
    list; an unconditional task takes none."""
    if tasks.build_task(config).unconditional:
        return write_samples(config, workdir, None)
    prompts_file = prompts_file or config.sample.get("prompts_file")
    given = list(prompts) or ([] if prompts_file else list(config.sample.prompts))
    return write_samples(config, workdir, read_prompts(given, prompts_file))


def _write_outputs(
    out_dir: str, names: list[str], images: np.ndarray, grid: np.ndarray, prompts: list[str] | None
) -> None:
    """One PNG per sample, ``grid.png`` and ``prompts.txt`` (local or gs://), by process 0 only."""
    if not monitoring.is_main_process():
        return
    for name, image in zip(names, images):
        monitoring.save_png(os.path.join(out_dir, name), monitoring.to_uint8(image))
    monitoring.save_png(os.path.join(out_dir, "grid.png"), grid)
    if prompts:
        monitoring.write_bytes_atomic(
            os.path.join(out_dir, "prompts.txt"), ("\n".join(prompts) + "\n").encode("utf-8")
        )


def _model_params(config, workdir: str, task, mesh):
    """The sampled network's parameters, whole on every device."""
    model = config.sample.model
    if model == "teacher":
        return tasks.load_teacher(
            task, config, workdir, lambda abstract: sharding.sampler_shardings(abstract, mesh)
        )
    path = layout.student_params_path(workdir)
    if not checkpoint.params_exist(path):
        raise FileNotFoundError(f"no student parameters at {path}: run --mode=distill first")
    return task.load_flow_params(path, mesh, what="student parameters")


def write_samples(config, workdir: str, prompts: list[str] | None) -> list[str]:
    """The samples of ``prompts`` (``config.sample.num_per_prompt`` each), or of
    ``config.sample.num_images`` unconditional images, at every step count; returns the output
    folders. Every process computes the same images; process 0 writes them."""
    cfg = config.sample
    if cfg.model not in MODELS:
        raise ValueError(f"config.sample.model={cfg.model!r}; expected one of {MODELS}")
    task = precision.configure_task(tasks.build_task(config), config)
    if task.unconditional:
        if prompts:
            raise ValueError(
                f"config.data.name={config.data.name!r} is unconditional: it takes "
                f"no prompts (set config.sample.num_images)"
            )
        num, rows = cfg.num_images, max(1, int(np.sqrt(cfg.num_images)))
        while num % rows:
            rows -= 1
        cond, names = None, [f"{i:05d}.png" for i in range(num)]
    else:
        per = cfg.num_per_prompt
        num, rows = len(prompts) * per, len(prompts)
        cond = np.repeat(task.encode_prompts(prompts), per, axis=0)  # checks the prompts first
        names = [f"{i // per:03d}_{i % per:02d}.png" for i in range(num)]
    mesh = sharding.mesh_from_config(config)
    params = _model_params(config, workdir, task, mesh)

    steps = cfg.num_steps if isinstance(cfg.num_steps, (tuple, list)) else (cfg.num_steps,)
    out_dirs = []
    for num_steps in steps:
        images = task.sample_images(
            params, cond, num, num_steps=num_steps, config=config, mesh=mesh
        )
        out_dir = layout.samples_dir(workdir, cfg.model, cfg.sampler, num_steps)
        grid = monitoring.image_grid(images, rows=rows, upscale=task.sample_grid_upscale)
        _write_outputs(out_dir, names, images, grid, prompts)
        logging.info("[sample] %d images at %d steps written to %s", num, num_steps, out_dir)
        out_dirs.append(out_dir)
    return out_dirs
