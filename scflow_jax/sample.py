"""Stage ``sample``: prompts (or, unconditional, a number of images) -> PNG files and a grid,
from the student (the distilled eval EMA) or the teacher."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from scflow_jax import checkpoint, distill, monitoring, sampling, sharding
from scflow_jax.data import digits
from scflow_jax.data.tokenizer import WordTokenizer
from scflow_jax.evaluation import generate, prompts as prompts_lib
from scflow_jax.tasks import build_task, encode_prompts

RECIPE_MODELS = ("student", "teacher")


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


def sample_prompts(config, workdir: str, prompts: list[str]) -> str:
    """Writes ``<workdir>/samples/<model>_<steps>steps/`` with one PNG per sample and a grid."""
    cfg = config.sample
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
    task = build_task(config)
    WordTokenizer(digits.vocabulary(), config.text.max_length)(prompts)  # validates words
    if cfg.model == "student":
        path = distill.stage_dirs(workdir).params
    elif cfg.model == "teacher":
        path = distill.teacher_params_path(config, workdir)
    else:
        raise ValueError(f"config.sample.model={cfg.model!r}; expected 'student' or 'teacher'")
    if not checkpoint.params_exist(path):
        raise FileNotFoundError(f"no {cfg.model} parameters at {path}; train it first")
    params = task.load_flow_params(path, mesh, what=f"{cfg.model} parameters")

    cond_table = encode_prompts(config, prompts + [""])
    per = cfg.num_per_prompt
    cond = np.repeat(cond_table[:-1], per, axis=0)
    z1 = jax.random.normal(jax.random.PRNGKey(config.seed), (len(cond),) + task.image_shape)
    images = jax.jit(lambda p, z, c, n: sampling.sample(
        task.velocity_fn, p, z, c, num_steps=cfg.num_steps, method=cfg.sampler,
        null_cond=n, guidance=cfg.guidance))(params, z1, jnp.asarray(cond),
                                             jnp.asarray(cond_table[-1]))
    images = np.asarray(images)
    out_dir = os.path.join(workdir, "samples", f"{cfg.model}_{cfg.sampler}_{cfg.num_steps}steps")
    if monitoring.is_main_process():
        for i, image in enumerate(images):
            monitoring.save_png(os.path.join(out_dir, f"{i // per:03d}_{i % per:02d}.png"),
                                monitoring.to_uint8(image))
        monitoring.save_png(os.path.join(out_dir, "grid.png"),
                            monitoring.image_grid(images, rows=len(prompts), upscale=4))
        with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
    logging.info("[sample] %d images from %d prompts written to %s", len(images), len(prompts),
                 out_dir)
    return out_dir


def sample_recipe(config, workdir: str, prompts: list[str] | None) -> list[str]:
    """A latent recipe's samples at every step count of ``config.sample.num_steps`` (1, 2, 4):
    Euler from per-sample noise (sample i uses ``fold_in(PRNGKey(seed), i)``), VAE-decoded,
    written to ``<workdir>/samples/<model>_<N>steps/`` (one PNG per sample, ``grid.png``, and
    ``prompts.txt``). Text-to-image: ``num_per_prompt`` samples per prompt, without guidance
    (``config.sample.guidance``, 1 for the student); unconditional: ``num_images`` samples.
    Returns the output folders."""
    cfg = config.sample
    task = build_task(config)
    if cfg.model not in RECIPE_MODELS:
        raise ValueError(f"config.sample.model={cfg.model!r}; expected one of {RECIPE_MODELS}")
    mesh = sharding.mesh_from_config(config)
    if cfg.model == "student":
        path = distill.stage_dirs(workdir).params
        if not checkpoint.params_exist(path):
            raise FileNotFoundError(f"no student parameters at {path}: run --mode=distill first")
        params = task.load_flow_params(path, mesh, what="student parameters")
    else:
        params = sharding.put_replicated(task.load_teacher_params(), mesh)

    if task.unconditional:
        if prompts:
            raise ValueError(f"config.data.name={config.data.name!r} is unconditional: it takes no "
                             f"prompts (set config.sample.num_images)")
        num, rows = cfg.num_images, max(1, int(np.sqrt(cfg.num_images)))
        while num % rows:
            rows -= 1
        cond, names = None, [f"{i:05d}.png" for i in range(num)]
    else:
        per = cfg.num_per_prompt
        num, rows = len(prompts) * per, len(prompts)
        cond = np.repeat(task.encode_prompts(prompts), per, axis=0)
        names = [f"{i // per:03d}_{i % per:02d}.png" for i in range(num)]
    null_cond = None if task.null_cond is None else jnp.asarray(task.null_cond)
    steps = cfg.num_steps if isinstance(cfg.num_steps, (tuple, list)) else (cfg.num_steps,)
    # One program for every step count (a traced trip count).
    run = jax.jit(lambda p, z1, c, n, num_steps: sampling.sample(
        task.velocity_fn, p, z1, c, num_steps=num_steps, method=cfg.sampler, null_cond=n,
        guidance=cfg.guidance))
    out_dirs = []
    for num_steps in steps:
        images = []
        for start in range(0, num, cfg.batch_size):
            count = min(cfg.batch_size, num - start)
            z1 = generate.sample_noise(config.seed, jnp.arange(start, start + count), task.latent_shape)
            c = None if cond is None else jnp.asarray(cond[start:start + count])
            latents = run(params, z1, c, null_cond, jnp.int32(num_steps))
            images.append(np.asarray(task.decode(latents)))
        images = np.concatenate(images)
        out_dir = os.path.join(workdir, "samples", f"{cfg.model}_{cfg.sampler}_{num_steps}steps")
        if monitoring.is_main_process():
            for name, image in zip(names, images):
                monitoring.save_png(os.path.join(out_dir, name), monitoring.to_uint8(image))
            monitoring.save_png(os.path.join(out_dir, "grid.png"),
                                monitoring.image_grid(images, rows=rows))
            if prompts:
                with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
                    f.write("\n".join(prompts) + "\n")
        logging.info("[sample] %d images at %d steps written to %s", num, num_steps, out_dir)
        out_dirs.append(out_dir)
    return out_dirs
