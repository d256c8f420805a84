"""The training loop shared by every stage: resume, step, observe, checkpoint, preempt.

A stage provides a jitted ``train_step(state, batch) -> (state, metrics)`` and a batch
source; this module owns everything around it. The workdir is the only run state: rerunning
the same command resumes from the stage's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath

from scflow_jax import checkpoint, layout, monitoring, sharding


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


def check_workdir_writable(workdir: str) -> None:
    """Fails early, naming the workdir, if this process cannot create files in it (local
    paths and cloud URLs such as gs://bucket/run alike)."""
    try:
        root = epath.Path(checkpoint.absolute(workdir))
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_probe_{jax.process_index()}_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def init_state(
    init_fn: Callable[..., Any], mesh, rules: sharding.ShardingRules | None = None, *args
) -> tuple[Any, Any, Any]:
    """Builds a state directly in its sharded layout: eval_shape, shardings, jit(init).

    No process ever holds the whole state: each device materialises only its shards. Arrays
    the state is built from (a pretrained teacher) go in ``args``, so they enter the compiled
    init as arguments: captured in ``init_fn`` they would be baked into the program as
    constants (gigabytes for the SD 1.5 UNet).
    """
    abstract = jax.eval_shape(init_fn, *args)
    summary = sharding.ShardingSummary()
    shardings = sharding.state_shardings(abstract, mesh, rules, summary)
    if sharding.fsdp_size(mesh) > 1 and monitoring.is_main_process():
        logging.info("train state %s", summary.describe())
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, abstract, shardings


def log_parameter_overview(params: Any, name: str) -> None:
    if monitoring.is_main_process():
        logging.info(
            "%s parameters:\n%s",
            name,
            parameter_overview.get_parameter_overview(params, include_stats=False),
        )


class _PreemptionFlag:
    """SIGTERM sets a flag; the loop then saves a checkpoint and returns cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            logging.warning("SIGTERM received: saving a checkpoint and stopping")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(stage: str, host_metrics: list[tuple[int, dict]], latest_ckpt) -> None:
    for step, metrics in host_metrics:
        bad = {
            k: float(np.asarray(v).ravel()[0])
            for k, v in metrics.items()
            if not np.all(np.isfinite(v))
        }
        if bad:
            # Loss terms first: a NaN loss makes the gradient norm NaN too, not the reverse.
            names = sorted(bad, key=lambda k: (not k.startswith("loss"), k))
            shown = ", ".join(f"{k}={bad[k]}" for k in names)
            raise NonFiniteLossError(
                f"[{stage}] non-finite {names[0]} at step {step} ({shown}); training stopped "
                f"without saving. The last good checkpoint is step {latest_ckpt} (rerun to "
                f"resume from it, e.g. with a lower learning rate)."
            )


@dataclasses.dataclass
class LoopConfig:
    num_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int = 2
    sample_every: int = 0

    @classmethod
    def from_stage_config(cls, cfg) -> "LoopConfig":
        """The loop fields of a stage's config group (``config.teacher`` or ``config.distill``)."""
        return cls(
            cfg.num_steps,
            cfg.log_every,
            cfg.checkpoint_every,
            cfg.keep_checkpoints,
            cfg.sample_every,
        )


@dataclasses.dataclass
class LoopResult:
    state: Any
    preempted: bool


def run_loop(
    *,
    stage: str,
    dirs: layout.StageDirs,
    loop: LoopConfig,
    state: Any,
    abstract_state: Any,
    state_shardings: Any,
    train_step: Callable,
    batch_fn: Callable[[int], dict],
    mesh,
    sample_images: Callable[[Any], np.ndarray] | None = None,
    grid_rows: int = 1,
) -> LoopResult:
    """Runs ``train_step`` from the latest checkpoint (or ``state``) to ``loop.num_steps``."""
    ckpt = checkpoint.Checkpointer(dirs.checkpoints, max_to_keep=loop.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(abstract_state, state_shardings, start)
        logging.info("[%s] resumed from checkpoint step %d", stage, start)
    start = int(start or 0)
    writer = monitoring.MetricWriter(dirs.tensorboard)
    progress = monitoring.Progress(stage, start, loop.num_steps)
    pending: list[tuple[int, dict]] = []

    def flush(step: int) -> None:
        host = jax.device_get(pending)
        pending.clear()
        _check_finite(stage, host, ckpt.latest_step())
        if not host:
            return
        means = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
        means.update(progress.report(step, means))
        writer.write_scalars(step, means)

    preempted = False
    try:
        with _PreemptionFlag() as preemption:
            for step in range(start, loop.num_steps):
                batch = sharding.shard_batch(batch_fn(step), mesh)
                state, metrics = train_step(state, batch)
                pending.append((step + 1, metrics))
                done = step + 1
                is_last = done == loop.num_steps
                # Read the flag once: a SIGTERM arriving later in this iteration is handled
                # in the next one, never half-handled (stop without save) in this one.
                stop = preemption.requested
                if jax.process_count() > 1:
                    # The save below is collective, so every process must take the same
                    # branch: they agree (an all-gather) at log steps only, where the loop
                    # waits for the device anyway, so a SIGTERM takes effect there.
                    stop = done % loop.log_every == 0 and sharding.any_process(stop)
                save_now = is_last or done % loop.checkpoint_every == 0 or stop
                if save_now or done % loop.log_every == 0:
                    flush(done)  # before saving: a non-finite state is never checkpointed
                if save_now:
                    ckpt.save(done, state, force=True)
                if (
                    sample_images is not None
                    and loop.sample_every
                    and (done % loop.sample_every == 0 or is_last)
                ):
                    writer.write_images(
                        done,
                        {
                            "samples": monitoring.image_grid(
                                sample_images(state), rows=grid_rows, upscale=4
                            )
                        },
                    )
                if stop and not is_last:
                    preempted = True
                    logging.warning(
                        "[%s] stopped at step %d after SIGTERM; rerun the same command to resume",
                        stage,
                        done,
                    )
                    break
    finally:
        ckpt.close()
        writer.close()
    return LoopResult(state=state, preempted=preempted)
