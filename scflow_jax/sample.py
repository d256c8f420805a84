"""Stage ``sample``: prompts -> PNG files and a grid, from the student or the teacher."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from scflow_jax import checkpoint, distill, monitoring, sampling, sharding
from scflow_jax.data import digits
from scflow_jax.data.tokenizer import WordTokenizer
from scflow_jax.tasks import build_task, encode_prompts


def read_prompts(prompts, prompts_file: str | None) -> list[str]:
    """Prompts from the config/CLI list and/or a file (one per line; blank lines skipped)."""
    out = [p for p in (prompts or ())]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts file {prompts_file!r} does not exist")
        with open(prompts_file) as f:
            out += [line.strip() for line in f if line.strip()]
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
