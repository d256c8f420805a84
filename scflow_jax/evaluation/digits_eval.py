"""The embedded default's evaluation (``DigitsTask.evaluate``, --mode=evaluate): the 1/2/4-step
quality table.

Metrics need no downloaded weights: a small digit classifier, trained once on the real
training digits and cached in ``<workdir>/eval/classifier``, gives (a) FD, the Fréchet
distance between held-out real digits and generated samples in its penultimate features
(the small-data analogue of FID), and (b) prompt accuracy, the fraction of samples it
assigns to the prompted digit (the analogue of CLIP score).

Every row uses the same initial noise: sample i is drawn from ``fold_in(key, i)``, so a
row's numbers do not depend on the batch size or the number of devices.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from scflow_jax import checkpoint, layout, monitoring, precision, sampling, sharding
from scflow_jax.data import digits
from scflow_jax.evaluation import digits_classifier
from scflow_jax.evaluation.results import format_table


def per_sample_noise(seed: int, num_samples: int, shape: tuple) -> np.ndarray:
    """Noise of sample i depends only on (seed, i)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape)))
    return np.asarray(draw(jnp.arange(num_samples)))


def prompted_labels(num_samples: int) -> np.ndarray:
    """Balanced prompts: sample i asks for digit i mod 10."""
    return np.arange(num_samples) % digits.NUM_CLASSES


@functools.lru_cache(maxsize=8)
def _sampler(task, guidance: float):
    """One compiled program per guidance scale; the step count is a traced argument."""
    return jax.jit(
        lambda params, z1, cond, null, num_steps: sampling.sample(
            task.velocity_fn,
            params,
            z1,
            cond,
            num_steps=num_steps,
            null_cond=null,
            guidance=guidance,
        )
    )


def generate(
    task,
    params,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    num_steps: int,
    guidance: float,
    batch_size: int,
    mesh,
) -> np.ndarray:
    """Runs the sampler over all samples in sharded batches; a ragged last batch is padded
    and the padding dropped, so exactly ``len(noise)`` samples come back.

    Every process passes the same ``noise`` and ``labels``, feeds its own rows of each batch
    and gets all ``len(noise)`` images back."""
    run = _sampler(task, float(guidance))
    null = sharding.put_replicated(jnp.asarray(task.null_cond), mesh)
    out = []
    for start in range(0, len(noise), batch_size):
        z1 = noise[start : start + batch_size]
        cond = task.conditions(labels[start : start + batch_size])
        batch = sharding.pad_batch({"z1": z1, "cond": cond}, batch_size)
        batch = sharding.shard_global_batch(batch, mesh)
        images = run(params, batch["z1"], batch["cond"], null, jnp.int32(num_steps))
        out.append(sharding.to_host(images)[: len(z1)])
    return np.concatenate(out)


def _grid(images: np.ndarray, labels: np.ndarray, per_digit: int) -> np.ndarray:
    """One grid row per digit, ``per_digit`` samples each."""
    rows = [images[labels == d][:per_digit] for d in range(digits.NUM_CLASSES)]
    return monitoring.image_grid(np.concatenate(rows), rows=digits.NUM_CLASSES, upscale=4)


def evaluate(config, workdir: str, task) -> list[dict]:
    """--mode=evaluate of the digits task ``task`` (tasks/digits.py): the table of the module
    docstring, written to ``<workdir>/eval/results.json``."""
    cfg = config.eval
    mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(cfg.batch_size, mesh, "config.eval.batch_size")
    if cfg.num_samples < 2:
        raise ValueError(f"config.eval.num_samples={cfg.num_samples} must be >= 2")
    task = precision.configure_task(task, config)
    teacher_path = layout.teacher_params_path(config, workdir)
    student_path = layout.student_params_path(workdir)
    models = []
    if checkpoint.params_exist(teacher_path):
        models.append(("teacher", task.load_flow_params(teacher_path, mesh, "teacher parameters")))
    if checkpoint.params_exist(student_path):
        models.append(("student", task.load_flow_params(student_path, mesh, "student parameters")))
    if not models:
        raise FileNotFoundError(
            f"nothing to evaluate: no teacher parameters at {teacher_path} and no student at "
            f"{student_path}; run --mode=train_teacher / --mode=distill first"
        )

    out_dir = layout.eval_dir(workdir)
    classifier = digits_classifier.load_or_train_classifier(
        os.path.join(out_dir, "classifier"),
        task.train["image"],
        task.train["label"],
        seed=config.seed,
        steps=cfg.classifier_steps,
    )
    reference = digits_classifier.reference_statistics(classifier, task.heldout_images)
    noise = per_sample_noise(config.seed, cfg.num_samples, task.image_shape)
    labels = prompted_labels(cfg.num_samples)

    plan = []
    for name, params in models:
        if name == "teacher":
            guidances = sorted({1.0, float(cfg.teacher_guidance)})
            plan += [(name, params, s, g) for g in guidances for s in cfg.teacher_steps]
        else:
            plan += [(name, params, s, 1.0) for s in cfg.student_steps]

    rows = []
    for name, params, steps, guidance in plan:
        images = generate(
            task,
            params,
            noise,
            labels,
            num_steps=steps,
            guidance=guidance,
            batch_size=cfg.batch_size,
            mesh=mesh,
        )
        metrics = digits_classifier.digit_metrics(classifier, images, labels, reference)
        row = {"model": name, "sampler": "euler", "steps": int(steps), "cfg": guidance, **metrics}
        rows.append(row)
        if monitoring.is_main_process():
            monitoring.save_png(
                os.path.join(out_dir, "grids", f"{name}_euler_{steps}steps_cfg{guidance:g}.png"),
                _grid(images, labels, cfg.grid_per_digit),
            )
        logging.info(
            "[evaluate] %s euler %d steps cfg %.2f: FD %.4f, accuracy %.4f",
            name,
            steps,
            guidance,
            metrics["fd"],
            metrics["accuracy"],
        )
    if monitoring.is_main_process():
        monitoring.write_json_atomic(layout.results_path(workdir), rows)
        print(format_table(rows), flush=True)
    return rows


def is_done(workdir: str) -> bool:
    return epath.Path(layout.results_path(workdir)).is_file()
