"""Command-line entry: ``python -m scflow_jax.main --config=... --workdir=... --mode=...``.

Thin by design: parse flags, save the config, then call the library function of each stage;
what a stage does for a given task comes from the task (scflow_jax/tasks/).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from scflow_jax import monitoring, trainer

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")
MODES = (
    "all",
    "train_teacher",
    "distill",
    "evaluate",
    "sample",
    "fid_stats",
    "prepare_data",
    "export",
    "plan",
)

config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Config file (get_config(arg)); `path:arg` picks a variant, "
    "--config.a.b=value overrides a field. Default: the embedded digits demo.",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, logs, results. Rerun the same command to resume."
)
flags.DEFINE_enum(
    "mode",
    "all",
    MODES,
    "Stage to run; `all` runs each stage in turn and "
    "skips those whose final output already exists.",
)
flags.DEFINE_multi_string("prompt", [], "Prompt for --mode=sample (repeatable).")
flags.DEFINE_string("prompts_file", None, "File of prompts for --mode=sample, one per line.")
flags.DEFINE_bool(
    "multihost",
    False,
    "Join a multi-process JAX cluster first "
    "(jax.distributed.initialize, config.distributed.*); same as "
    "--config.distributed.enabled=True. Run the same command on every host.",
)


class _QuietOrbax(std_logging.Filter):
    """Orbax logs every save step at INFO through absl; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run(config, workdir: str, mode: str, prompts=(), prompts_file=None) -> int:
    """Runs ``mode``; returns the process exit code (0 also after a SIGTERM checkpoint)."""
    from scflow_jax import distill, evaluate, export, sample, tasks, teacher
    from scflow_jax.data import prepare
    from scflow_jax.evaluation import fid

    if mode == "plan":  # first: it chooses the devices JAX starts with (planning/targets.py)
        from scflow_jax import planning

        planning.plan(config, workdir)
        return 0
    trainer.check_workdir_writable(workdir)
    if monitoring.is_main_process():
        monitoring.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())

    # What --mode=all runs in turn, each with the test of its finished output.
    stages = {
        "train_teacher": (teacher.train_teacher, teacher.is_done),
        "distill": (distill.distill, distill.is_done),
        "evaluate": (evaluate.evaluate, evaluate.is_done),
    }
    # Every other mode: one library call (config, workdir).
    modes = {name: fn for name, (fn, _) in stages.items()}
    modes.update(
        {
            "sample": lambda c, w: sample.run(c, w, prompts, prompts_file),
            "export": lambda c, w: logging.info(
                "[export] student written to %s", export.export_student(c, w)
            ),
            "fid_stats": fid.fid_stats,
            "prepare_data": lambda c, w: prepare.prepare_from_config(c),
        }
    )
    if mode != "all":
        _stopped_by_sigterm(mode, modes[mode](config, workdir))
        return 0
    for name, (fn, is_done) in stages.items():
        if name == "train_teacher" and tasks.task_class(config).pretrained_teacher:
            continue  # a pretrained teacher: nothing to train
        if is_done(config, workdir):
            logging.info(
                "[%s] already complete in %s: skipped (run --mode=%s to redo)", name, workdir, name
            )
            continue
        if _stopped_by_sigterm(name, fn(config, workdir)):
            return 0
    return 0


def _stopped_by_sigterm(stage: str, result) -> bool:
    if getattr(result, "preempted", False):
        logging.warning("stopped by SIGTERM during %s; checkpoint saved", stage)
        return True
    return False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    logging.set_verbosity(logging.INFO)
    config = flags.FLAGS.config
    from scflow_jax import xla_cpu

    xla_cpu.apply_defaults()  # before any JAX backend exists
    distributed_cfg = config.get("distributed") or {}
    if flags.FLAGS.multihost or distributed_cfg.get("enabled", False):
        # Before anything creates a JAX backend: the cluster decides which devices exist.
        from scflow_jax import distributed

        try:
            distributed.initialize(distributed_cfg)
        except distributed.DistributedInitError as e:
            logging.error("%s", e)
            print(f"error: {e}", file=sys.stderr, flush=True)
            # os._exit: JAX's connecting thread may still be blocked in C++.
            os._exit(2)
    sys.exit(
        run(
            config,
            flags.FLAGS.workdir,
            flags.FLAGS.mode,
            flags.FLAGS.prompt,
            flags.FLAGS.prompts_file,
        )
    )


if __name__ == "__main__":
    app.run(main)
