"""Stage ``sample``: prompts (or, unconditional, a number of images) -> PNG files and a grid,
from the student (the distilled eval EMA) or the teacher."""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from scflow_jax import checkpoint, distill, monitoring, precision, sampling, sharding
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


def _load_task(config):
    """The config's task computing in its ``config.precision`` dtype (parameters stay float32)."""
    return precision.configure_task(build_task(config), config)


def _write_outputs(out_dir: str, names: list[str], images: np.ndarray, grid: np.ndarray,
                   prompts: list[str] | None) -> None:
    """One PNG per sample, ``grid.png`` and ``prompts.txt`` (local or gs://), by process 0 only."""
    if not monitoring.is_main_process():
        return
    for name, image in zip(names, images):
        monitoring.save_png(os.path.join(out_dir, name), monitoring.to_uint8(image))
    monitoring.save_png(os.path.join(out_dir, "grid.png"), grid)
    if prompts:
        monitoring.write_bytes_atomic(os.path.join(out_dir, "prompts.txt"),
                                      ("\n".join(prompts) + "\n").encode("utf-8"))


def sample_prompts(config, workdir: str, prompts: list[str]) -> str:
    """Writes ``<workdir>/samples/<model>_<steps>steps/`` with one PNG per sample and a grid.

    Every process computes the same noise and conditions; each feeds its own rows of the batch
    (padded to a multiple of the device count) and gets every image back."""
    cfg = config.sample
    mesh = sharding.mesh_from_config(config)
    task = _load_task(config)
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
    z1 = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed), (len(cond),) + task.image_shape))
    batch = sharding.shard_global_batch(
        sharding.pad_batch({"z1": z1, "cond": cond}, sharding.padded_size(len(cond), mesh)), mesh)
    images = jax.jit(lambda p, z, c, n: sampling.sample(
        task.velocity_fn, p, z, c, num_steps=cfg.num_steps, method=cfg.sampler,
        null_cond=n, guidance=cfg.guidance))(params, batch["z1"], batch["cond"],
                                             sharding.put_replicated(cond_table[-1], mesh))
    images = sharding.to_host(images)[:len(cond)]
    out_dir = os.path.join(workdir, "samples", f"{cfg.model}_{cfg.sampler}_{cfg.num_steps}steps")
    _write_outputs(out_dir, [f"{i // per:03d}_{i % per:02d}.png" for i in range(len(images))], images,
                   monitoring.image_grid(images, rows=len(prompts), upscale=4), prompts)
    logging.info("[sample] %d images from %d prompts written to %s", len(images), len(prompts),
                 out_dir)
    return out_dir


def sample_recipe(config, workdir: str, prompts: list[str] | None) -> list[str]:
    """A latent recipe's samples at every step count of ``config.sample.num_steps`` (1, 2, 4):
    Euler from per-sample noise (sample i uses ``fold_in(PRNGKey(seed), i)``), VAE-decoded,
    written to ``<workdir>/samples/<model>_<N>steps/`` (one PNG per sample, ``grid.png``, and
    ``prompts.txt``). Text-to-image: ``num_per_prompt`` samples per prompt, without guidance
    (``config.sample.guidance``, 1 for the student); unconditional: ``num_images`` samples.
    Batches of ``config.sample.batch_size`` (a multiple of the device count) are split over the
    mesh (``generate.ShardedSampler``, as in evaluation), so a sample is the image the
    evaluation of the same model, seed and step count scores. Returns the output folders."""
    cfg = config.sample
    task = _load_task(config)
    if cfg.model not in RECIPE_MODELS:
        raise ValueError(f"config.sample.model={cfg.model!r}; expected one of {RECIPE_MODELS}")
    mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(cfg.batch_size, mesh, "config.sample.batch_size")
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
    steps = cfg.num_steps if isinstance(cfg.num_steps, (tuple, list)) else (cfg.num_steps,)
    out_dirs = []
    for num_steps in steps:
        sampler = generate.ShardedSampler(
            generate.euler_sample_fn(task.velocity_fn, num_steps=num_steps, guidance=cfg.guidance,
                                     method=cfg.sampler),
            params, latent_shape=task.latent_shape, seed=config.seed, batch_size=cfg.batch_size, mesh=mesh,
            null_cond=task.null_cond, decode=task.decode, field="config.sample.batch_size")
        images = generate.generate_images(sampler, num_samples=num,
                                          cond_fn=None if cond is None else lambda idx: cond[idx])
        out_dir = os.path.join(workdir, "samples", f"{cfg.model}_{cfg.sampler}_{num_steps}steps")
        _write_outputs(out_dir, names, images, monitoring.image_grid(images, rows=rows), prompts)
        logging.info("[sample] %d images at %d steps written to %s", num, num_steps, out_dir)
        out_dirs.append(out_dir)
    return out_dirs
