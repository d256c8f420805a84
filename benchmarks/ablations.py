"""SCFlow ablations on the embedded default: the evaluation table with each term removed.

Usage: python benchmarks/ablations.py [--workdir=runs/ablations] [--config.x=y ...]
Trains the teacher once (shared), then distills and evaluates each variant in its own
workdir: full SCFlow, no GAN, no reflow, no inverse, consistency only. Writes every table to
benchmarks/results.json (and prints them). Takes several times the demo's run time.
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the CLI's XLA:CPU settings, before JAX starts

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import record  # noqa: E402
from scflow_jax import distill, evaluate, layout, teacher  # noqa: E402
from scflow_jax.evaluation import results  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablations", "Root directory of the runs.")

VARIANTS = {
    "scflow": {},
    "no_gan": {"lambda_gan": 0.0},
    "no_reflow": {"lambda_rf": 0.0},
    "no_inverse": {"lambda_inv": 0.0},
    "consistency_only": {"lambda_gan": 0.0, "lambda_rf": 0.0, "lambda_inv": 0.0},
}


def main(_):
    base = _CONFIG.value
    teacher_dir = os.path.join(_WORKDIR.value, "teacher_run")
    if not teacher.is_done(base, teacher_dir):
        teacher.train_teacher(base, teacher_dir)
    tables = {}
    for name, overrides in VARIANTS.items():
        config = copy.deepcopy(base)
        with config.unlocked():
            config.distill.teacher_params = layout.stage_dirs(teacher_dir, layout.TEACHER).params
            for key, value in overrides.items():
                config.scflow[key] = value
            if name != "scflow":  # the teacher rows are the same for every variant
                config.eval.teacher_steps = ()
        workdir = os.path.join(_WORKDIR.value, name)
        if not distill.is_done(config, workdir):
            distill.distill(config, workdir)
        rows = evaluate.evaluate(config, workdir)
        tables[name] = rows
        print(f"\n== {name} ==\n{results.format_table(rows)}", flush=True)
    record("ablations", {"overrides": VARIANTS, "tables": tables,
                         "distill_steps": base.distill.num_steps})


if __name__ == "__main__":
    app.run(main)
