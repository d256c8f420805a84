"""Scaling of the distillation step on the devices present: time, throughput, memory, MFU.

Usage:
  python benchmarks/scaling.py [--steps=10] [--peak-tflops=197] [--record]
      [--config=configs/default.py[:tiny]] [--config.mesh.fsdp=4] [--config.distill.batch_size=256]
  (on several hosts: add --multihost and run the same command on every host)

Reports per-step time (median of --steps timed steps after --warmup), examples/s, peak memory
(device memory_stats where the backend has them, else this process's peak RSS), the FLOPs of
the step (XLA's cost analysis of the lowered program, common.xla_flops), and MFU = FLOPs per
device / step time / (--peak-tflops x 1e12), --peak-tflops being one device's peak (e.g. 197 for a TPU v5e chip
in bf16, 989 for an H100 SXM in dense bf16). The teacher is random (drawn on the host), so no
trained teacher is needed. --record appends the result to benchmarks/results.json.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import machine, random_params, record, time_train_steps, xla_flops  # noqa: E402
from scflow_jax import distill, distributed, sharding, train_state  # noqa: E402
from scflow_jax.tasks import build_task  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_float("peak-tflops", 0.0, "one device's peak TFLOP/s for MFU (0: no MFU)")
flags.DEFINE_bool("record", False, "append the result to benchmarks/results.json")
flags.DEFINE_bool("multihost", False, "jax.distributed.initialize first (config.distributed)")
FLAGS = flags.FLAGS


def peak_memory() -> dict:
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return {"source": "device memory_stats",
                "peak_bytes_per_device_max": max(s["peak_bytes_in_use"] for s in stats)}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"source": "process peak RSS", "peak_rss_bytes": rss_kib * 1024}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if FLAGS.multihost or config.distributed.enabled:
        distributed.initialize(config.distributed)
    task = build_task(config)
    # A random teacher drawn on the host (no zero layer, no device program to compile).
    teacher = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    setup = distill.build_distill(config, workdir="", teacher_params=teacher)
    batch_size = config.distill.batch_size
    batches = [sharding.shard_batch(setup.data.batch(s), setup.mesh)
               for s in range(min(4, FLAGS.steps + FLAGS.warmup))]

    start = time.perf_counter()
    lowered = setup.jitted_step.lower(setup.state, batches[0], setup.frozen)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # The lowered program is the global one (before SPMD partitioning): its FLOPs split evenly
    # over the devices (data parallel and FSDP both compute every example once).
    flops = xla_flops(lowered) / jax.device_count()

    state, _, times = time_train_steps(compiled, setup.state, batches, setup.frozen,
                                       warmup=FLAGS.warmup, steps=FLAGS.steps)
    step_s = statistics.median(times)

    mesh = setup.mesh
    result = {
        "config": {"model": config.model.to_dict(), "distill_batch": batch_size,
                   "compute_dtype": config.precision.compute_dtype,
                   "remat": config.model.get("remat", "none")},
        "mesh": {"data": mesh.shape[sharding.DATA_AXIS], "fsdp": mesh.shape[sharding.FSDP_AXIS],
                 "processes": jax.process_count()},
        "student_params": train_state.count_params(state.params),
        "compile_s": compile_s, "steps_timed": len(times),
        "step_s_median": step_s, "step_s_min": min(times),
        "examples_per_s": batch_size / step_s,
        "flops_per_step_per_device": flops,
        "memory": peak_memory(),
    }
    if flops is not None and FLAGS["peak-tflops"].value > 0:
        result["mfu"] = flops / step_s / (FLAGS["peak-tflops"].value * 1e12)
        result["peak_tflops_per_device"] = FLAGS["peak-tflops"].value
    if jax.process_index() == 0:
        if FLAGS.record:
            record("scaling_distill", result)
        else:
            import json
            print(json.dumps({"machine": machine(), **result}, indent=2), flush=True)


if __name__ == "__main__":
    app.run(main)
