"""SCFlow ablations on the embedded default, over several seeds: the demo table with each term
removed.

Usage: python benchmarks/ablations.py [--seeds=0,1,2] [--variants=scflow,no_gan,...]
                                      [--workdir=runs/ablations] [--results=PATH] [--config.x=y ...]

For each seed the teacher is trained once (``config.seed`` = the seed: teacher, data order, held-out
split and distillation all reseeded), then every variant is distilled from it and evaluated: full
SCFlow (whose evaluation also has the teacher rows), no GAN, no self-corrected reflow, no inverse
term, consistency only. Each run lives in ``<workdir>/seed<s>/<variant>``, so an interrupted call
resumes where it stopped. Prints, per variant and table row, the mean ± sample standard deviation
over the seeds and the per-seed values, and records them (``--results=PATH``, see
``common.record``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import record  # noqa: E402
from scflow_jax import distill, evaluate, layout, teacher  # noqa: E402

VARIANTS = {
    "scflow": {},
    "no_gan": {"lambda_gan": 0.0},
    "no_reflow": {"lambda_rf": 0.0},
    "no_inverse": {"lambda_inv": 0.0},
    "consistency_only": {"lambda_gan": 0.0, "lambda_rf": 0.0, "lambda_inv": 0.0},
}
METRICS = ("fd", "accuracy")


def row_key(row: dict) -> str:
    return f"{row['model']} {row['steps']} steps cfg {row['cfg']:g}"


def summarize(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Rows of several seeds' tables -> one row per (model, steps, cfg) with each metric's mean,
    sample standard deviation (0 for one seed) and per-seed values, in the first seed's row
    order."""
    seeds = sorted(per_seed)
    order = [row_key(r) for r in per_seed[seeds[0]]]
    by_key = {s: {row_key(r): r for r in rows} for s, rows in per_seed.items()}
    out = []
    for key in order:
        if not all(key in by_key[s] for s in seeds):
            raise ValueError(f"row {key!r} is missing for some seeds: {seeds}")
        first = by_key[seeds[0]][key]
        row = {
            "model": first["model"],
            "steps": first["steps"],
            "cfg": first["cfg"],
            "seeds": seeds,
        }
        for metric in METRICS:
            values = [float(by_key[s][key][metric]) for s in seeds]
            row[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        out.append(row)
    return out


def format_summary(rows: list[dict]) -> str:
    """A markdown table: model, steps, CFG, FD and accuracy as mean ± std."""
    lines = ["| model | steps | CFG | FD ↓ | prompt accuracy ↑ |", "|---|---|---|---|---|"]
    for r in rows:
        fd, acc = r["fd"], r["accuracy"]
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['cfg']:.1f} | {fd['mean']:.2f} ± {fd['std']:.2f} "
            f"| {acc['mean']:.3f} ± {acc['std']:.3f} |"
        )
    return "\n".join(lines)


def _seed_config(base, seed: int, overrides: dict, teacher_params: str, with_teacher_rows: bool):
    config = copy.deepcopy(base)
    with config.unlocked():
        config.seed = seed
        config.distill.teacher_params = teacher_params
        for key, value in overrides.items():
            config.scflow[key] = value
        if not with_teacher_rows:  # the teacher rows are the same for every variant of a seed
            config.eval.teacher_steps = ()
    return config


def run_seed(base, seed: int, variants: list[str], root: str) -> dict[str, list[dict]]:
    """Trains (or reuses) the seed's teacher, then distills and evaluates each variant; their
    tables."""
    seed_dir = os.path.join(root, f"seed{seed}")
    teacher_dir = os.path.join(seed_dir, "teacher")
    config = copy.deepcopy(base)
    with config.unlocked():
        config.seed = seed
    if not teacher.is_done(config, teacher_dir):
        teacher.train_teacher(config, teacher_dir)
    teacher_params = layout.stage_dirs(teacher_dir, layout.TEACHER).params
    tables, classifier = {}, None
    for name in variants:
        config = _seed_config(
            base, seed, VARIANTS[name], teacher_params, with_teacher_rows=name == "scflow"
        )
        workdir = os.path.join(seed_dir, name)
        if not distill.is_done(config, workdir):
            distill.distill(config, workdir)
        # The digit classifier of a seed is the same for every variant (same data, seed and steps).
        cached = os.path.join(layout.eval_dir(workdir), "classifier")
        if classifier and not os.path.exists(cached):
            shutil.copytree(classifier, cached)
        if evaluate.is_done(config, workdir):
            with open(layout.results_path(workdir)) as f:
                tables[name] = json.load(f)
        else:
            tables[name] = evaluate.evaluate(config, workdir)
        classifier = classifier or cached
    return tables


def _define_flags():
    """The command line, defined only when run as a script: the tests import this module beside
    scflow_jax.main, whose absl flags share names with these."""
    global _CONFIG, _WORKDIR, _SEEDS, _VARIANTS, _RESULTS
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    )
    _WORKDIR = flags.DEFINE_string("workdir", "runs/ablations", "Root directory of the runs.")
    _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) to run.")
    _VARIANTS = flags.DEFINE_list("variants", None, "Variants to run (default: all).")
    _RESULTS = flags.DEFINE_string(
        "results",
        None,
        "Results file (default: $SCFLOW_BENCHMARK_RESULTS, else runs/benchmarks/results.json).",
    )


def main(_):
    variants = _VARIANTS.value or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as e:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from e
    per_variant = {name: {} for name in variants}
    for seed in seeds:
        for name, rows in run_seed(_CONFIG.value, seed, variants, _WORKDIR.value).items():
            per_variant[name][seed] = rows
    summary = {name: summarize(tables) for name, tables in per_variant.items()}
    for name, rows in summary.items():
        print(f"\n== {name} (seeds {seeds}) ==\n{format_summary(rows)}", flush=True)
    record(
        "ablations",
        {
            "seeds": seeds,
            "overrides": {k: VARIANTS[k] for k in variants},
            "distill_steps": _CONFIG.value.distill.num_steps,
            "summary": summary,
        },
        path=_RESULTS.value,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
