"""Where a run keeps its files: the workdir layout every stage reads and writes.

The workdir is the only run state. Stages find each other's outputs here, never by importing
one another:

    <workdir>/config.json                the run's configuration
    <workdir>/teacher/                   --mode=train_teacher (tasks without a pretrained teacher)
    <workdir>/distill/                   --mode=distill
        checkpoints/ tensorboard/ samples/   the training loop's (trainer.py)
        params/                          the stage's result: the teacher's / the student's EMA
    <workdir>/eval/                      --mode=evaluate: results.json and its working files
    <workdir>/samples/<model>_<sampler>_<N>steps/   --mode=sample
    <workdir>/export/                    --mode=export (unless config.export.output_dir)
"""

from __future__ import annotations

import dataclasses
import os

TEACHER = "teacher"
DISTILL = "distill"
TRAINING_STAGES = (TEACHER, DISTILL)


@dataclasses.dataclass
class StageDirs:
    """The folders of a training stage."""

    root: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def params(self) -> str:
        """The stage's exported result (written once the last step is done)."""
        return os.path.join(self.root, "params")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tensorboard")

    @property
    def samples(self) -> str:
        return os.path.join(self.root, "samples")


def stage_dirs(workdir: str, stage: str) -> StageDirs:
    if stage not in TRAINING_STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {TRAINING_STAGES}")
    return StageDirs(os.path.join(workdir, stage))


def teacher_params_path(config, workdir: str) -> str:
    """A trained teacher's parameters: ``config.distill.teacher_params``, by default the
    train_teacher stage's export."""
    return config.distill.teacher_params or stage_dirs(workdir, TEACHER).params


def student_params_path(workdir: str) -> str:
    """The distilled student (the eval EMA) that sampling, evaluation and export read."""
    return stage_dirs(workdir, DISTILL).params


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, "eval")


def results_path(workdir: str) -> str:
    """The evaluation's rows (JSON list), one per model, step count and guidance."""
    return os.path.join(eval_dir(workdir), "results.json")


def samples_dir(workdir: str, model: str, sampler: str, num_steps: int) -> str:
    return os.path.join(workdir, "samples", f"{model}_{sampler}_{num_steps}steps")


def export_dir(config, workdir: str) -> str:
    return config.export.output_dir or os.path.join(workdir, "export")
