"""Multi-process runs: distributed start-up errors, and two real JAX processes.

The two-process test starts two real JAX processes on localhost (CPU collectives through
gloo), each with 2 fake devices, on a (data=2, fsdp=2) mesh, and checks that they reach the
same losses and parameters as one process with 4 devices and pure data parallelism.
Tolerances: 1e-5 on losses and metrics (reductions run in a different order on different
meshes), 1e-4 on parameters after several Adam steps. A second two-process test runs the
sample stage and the evaluation sampler: the same images as one process (1e-6), gathered
to both processes, files written by process 0 only.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import scflow_testlib as lib
from scflow_jax import checkpoint, distill, distributed, layout, sample, sharding
from scflow_jax.evaluation import digits_eval
from scflow_jax.tasks import build_task

REPO = lib.REPO_ROOT
TOL = dict(rtol=1e-5, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- distributed start-up
def test_process_id_out_of_range_is_named(tiny_config):
    tiny_config.distributed.update(num_processes=2, process_id=2)
    with pytest.raises(
        ValueError,
        match=r"config.distributed.process_id=2 must lie in "
        r"\[0, config.distributed.num_processes=2\)",
    ):
        distributed.initialize(tiny_config.distributed)


def _cli_multihost(tmp_path, process_id: int, port: int, timeout_s: int):
    cmd = lib.cli_command(
        str(tmp_path / "wd"),
        "distill",
        "--config=configs/default.py:tiny",
        "--multihost",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}",
        f"--config.distributed.initialization_timeout={timeout_s}",
    )
    return subprocess.run(
        cmd, cwd=REPO, env=lib.subprocess_env(), capture_output=True, text=True, timeout=120
    )


def test_unreachable_coordinator_fails_with_a_clear_message(tmp_path):
    proc = _cli_multihost(tmp_path, process_id=1, port=free_port(), timeout_s=3)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "did not accept connections within 3 s" in proc.stderr, proc.stderr[-2000:]
    assert "config.distributed.coordinator_address" in proc.stderr


def test_missing_processes_fail_with_a_clear_message(tmp_path):
    # Process 0 of 2 starts alone: the cluster never completes.
    proc = _cli_multihost(tmp_path, process_id=0, port=free_port(), timeout_s=3)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "did not form within 3 s" in proc.stderr, proc.stderr[-2000:]
    assert "not all of the 2 processes (config.distributed.num_processes)" in proc.stderr


# ------------------------------------------------------------------- two real processes
OVERRIDES = {
    "distill.num_steps": 3,
    "distill.checkpoint_every": 2,
    "distill.log_every": 1,
    "distill.sample_every": 0,
    "mesh.fsdp_min_size": 256,
}


def _reference_run(config, workdir):
    recorded = []
    build = distill.build_distill

    def recording_build(*args, **kwargs):
        import dataclasses

        setup = build(*args, **kwargs)
        step = setup.train_step

        def recording_step(state, batch):
            state, metrics = step(state, batch)
            recorded.append({k: float(v) for k, v in lib.to_host(metrics).items()})
            return state, metrics

        return dataclasses.replace(setup, train_step=recording_step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "build_distill", recording_build)
        distill.distill(config, workdir)
    return recorded


def _start_workers(tmp_path, job: str, overrides: dict, **spec_fields) -> list:
    """Two tests/multihost_worker.py processes running ``job``, each with 2 CPU devices, on
    a (data=2, fsdp=2) mesh; returns (process, result file) pairs."""
    port = free_port()
    env = lib.subprocess_env()
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2"
    )
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for i in range(2):
        out = str(tmp_path / f"out{i}.json")
        spec = {
            "process_id": i,
            "num_processes": 2,
            "port": port,
            "out": out,
            "job": job,
            "workdir": str(tmp_path / "multi"),
            **spec_fields,
            "overrides": {
                **lib.OVERRIDES,
                **overrides,
                "mesh.num_devices": -1,
                "mesh.data": 2,
                "mesh.fsdp": 2,
            },
        }
        spec_path = tmp_path / f"spec{i}.json"
        spec_path.write_text(json.dumps(spec))
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.join(REPO, "tests", "multihost_worker.py"),
                        str(spec_path),
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
                out,
            )
        )
    return procs


def _finish_workers(procs) -> list[dict]:
    """Waits for the workers; their result files, in process order."""
    logs = []
    for p, _ in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    for (p, _), log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    results = [json.load(open(out)) for _, out in procs]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["device_count"] == 4 for r in results)
    return results


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_match_one_process(tmp_path):
    teacher_path = str(tmp_path / "teacher_params")
    lib.export_perturbed_teacher(teacher_path)
    overrides = {**OVERRIDES, "distill.teacher_params": teacher_path}

    # Two processes x 2 devices, FSDP inside each process, data parallel across them.
    procs = _start_workers(tmp_path, "distill", overrides)

    # Meanwhile: one process, 4 devices, pure data parallelism, the same global batch.
    config = lib.make_config(num_devices=4)
    for k, v in overrides.items():
        lib.set_field(config, k, v)
    reference = _reference_run(config, str(tmp_path / "single"))

    results = _finish_workers(procs)

    assert len(reference) == 3
    for r in results:
        assert len(r["metrics"]) == 3
        for step, (got, want) in enumerate(zip(r["metrics"], reference)):
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_allclose(got[k], want[k], err_msg=f"step {step + 1} {k}", **TOL)
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"], rel=1e-7)

    # Exported students agree; checkpoints were written collectively; one TensorBoard file.
    abstract = lib.abstract_params(build_task(config))
    mesh = sharding.make_mesh(-1, 1)

    def load(wd):
        return lib.to_host(
            checkpoint.load_params(
                layout.student_params_path(wd),
                abstract,
                sharding.state_shardings(abstract, mesh),
                what=wd,
            )
        )

    # Parameters get 1e-4: Adam divides by sqrt(v), which amplifies the rounding differences
    # of near-zero gradients (the losses above agree to 1e-5).
    lib.assert_trees_close(
        load(str(tmp_path / "multi")),
        load(str(tmp_path / "single")),
        what="exported student",
        rtol=1e-4,
        atol=1e-4,
    )
    multi = layout.stage_dirs(str(tmp_path / "multi"), layout.DISTILL)
    assert checkpoint.Checkpointer(multi.checkpoints).all_steps() == [2, 3]
    assert len(glob.glob(os.path.join(multi.tensorboard, "events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_sample_and_generate_like_one_process(tmp_path):
    """The sample stage and the evaluation sampler in two processes (each feeding its own rows
    of host batches every process holds, results gathered to both, files written by process
    0 only) give the images of one process with 4 devices."""
    teacher_path = str(tmp_path / "teacher_params")
    lib.export_perturbed_teacher(teacher_path)
    prompts = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit two"]
    # 3 prompts x 3 = 9 samples, padded to 12 for 4 devices; 12 evaluation samples in
    # batches of 8 leave a ragged last batch.
    overrides = {
        "distill.teacher_params": teacher_path,
        "sample.model": "teacher",
        "sample.num_per_prompt": 3,
        "eval.batch_size": 8,
    }
    num_samples = 12
    procs = _start_workers(
        tmp_path, "generate", overrides, prompts=prompts, num_samples=num_samples
    )

    config = lib.make_config(num_devices=4)
    for k, v in overrides.items():
        lib.set_field(config, k, v)
    (single_dir,) = sample.write_samples(config, str(tmp_path / "single"), prompts)
    task = build_task(config)
    mesh = sharding.mesh_from_config(config)
    want = digits_eval.generate(
        task,
        task.load_flow_params(teacher_path, mesh, "teacher"),
        digits_eval.per_sample_noise(config.seed, num_samples, task.image_shape),
        digits_eval.prompted_labels(num_samples),
        num_steps=2,
        guidance=1.5,
        batch_size=8,
        mesh=mesh,
    )

    results = _finish_workers(procs)
    for r, (_, out) in zip(results, procs):
        got = np.load(out + ".npy")  # every process holds every sample
        assert got.shape == want.shape == (num_samples,) + task.image_shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Each process computed its rows of one global batch (not a copy of the whole batch):
    # sample: 9 rows padded to 12; evaluation: two batches of 8.
    shape = list(task.image_shape)
    assert (
        results[0]["gathers"] == results[1]["gathers"] == [[12] + shape, [8] + shape, [8] + shape]
    )
    multi_dir = results[0]["out_dir"]
    names = sorted(os.listdir(single_dir))
    assert sorted(os.listdir(multi_dir)) == names and len(names) == 9 + 2  # + grid, prompts
    assert sorted(os.path.basename(p) for p in results[0]["written"]) == sorted(
        n for n in names if n.endswith(".png")
    )
    assert results[1]["written"] == []  # process 1 writes no file
    for name in names:
        if name.endswith(".png"):
            a, b = (
                np.asarray(Image.open(os.path.join(d, name)), np.int32)
                for d in (single_dir, multi_dir)
            )
            assert np.abs(a - b).max() <= 1, name  # float rounding may move one uint8 level
