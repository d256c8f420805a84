"""One process of the two-process tests (tests/test_multihost.py); not a test module.

Usage: python tests/multihost_worker.py SPEC_JSON, where SPEC_JSON holds process_id,
num_processes, port, workdir, out (result file of this process), overrides (dotted
config fields) and job. Joins the cluster through scflow_jax.distributed, then

* job "distill" (default): runs the real distill stage (trainer loop, collective Orbax
  checkpoints, process-0 logging) and records every step's metrics;
* job "generate": runs the sample stage (``sample.write_samples``) on the prompts
  ``prompts`` and the evaluation sampler (``digits_eval.generate``) on ``num_samples``
  samples of the teacher at ``config.distill.teacher_params``, and records the images
  this process got back and the files it wrote.
"""

import dataclasses
import json
import sys


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from jax._src import distributed as jax_distributed  # its client's barrier (test only)

    from scflow_jax import distill, distributed, sharding
    from scflow_jax.default_config import get_config

    config = get_config("tiny")
    for dotted, value in spec["overrides"].items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.distributed.coordinator_address = f"localhost:{spec['port']}"
    config.distributed.num_processes = spec["num_processes"]
    config.distributed.process_id = spec["process_id"]
    config.distributed.initialization_timeout = 120
    distributed.initialize(config.distributed)
    if spec.get("job", "distill") == "generate":
        return generate(spec, config, jax_distributed.global_state.client)

    recorded = []
    build = distill.build_distill

    def recording_build(*args, **kwargs):
        setup = build(*args, **kwargs)
        compiled = []

        def recording_step(state, batch):
            if not compiled:
                # Gloo gives up on a collective after 30 s: on a loaded machine one process
                # can still be compiling that long after the other starts the first step.
                # Compile ahead of time, then meet at a barrier outside gloo.
                compiled.append(setup.jitted_step.lower(state, batch, setup.frozen).compile())
                jax_distributed.global_state.client.wait_at_barrier("step_compiled", 600_000)
            state, metrics = compiled[0](state, batch, setup.frozen)
            recorded.append({k: float(v) for k, v in sharding.to_host(metrics).items()})
            return state, metrics

        return dataclasses.replace(setup, train_step=recording_step)

    distill.build_distill = recording_build
    result = distill.distill(config, spec["workdir"])
    import jax

    params = sharding.to_host(result.state.params)
    with open(spec["out"], "w") as f:
        json.dump(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "metrics": recorded,
                "param_sum": float(sum(abs(x).sum() for x in jax.tree.leaves(params))),
            },
            f,
        )


def generate(spec: dict, config, client) -> None:
    import jax
    import numpy as np

    from scflow_jax import monitoring, sample, sharding
    from scflow_jax.evaluation import digits_eval
    from scflow_jax.tasks import build_task

    # Gloo gives up on a collective after 30 s, and one process may still be compiling that
    # long after the other reaches a gather: meet at a barrier outside gloo before each.
    gathers = []
    to_host = sharding.to_host

    def synced_to_host(array):
        gathers.append(list(array.shape))  # the global batch as computed (padding included)
        client.wait_at_barrier(f"gather_{len(gathers)}", 600_000)
        return to_host(array)

    written = []
    save_png = monitoring.save_png

    def recording_save_png(path, grid):
        written.append(path)
        save_png(path, grid)

    sharding.to_host, monitoring.save_png = synced_to_host, recording_save_png
    (out_dir,) = sample.write_samples(config, spec["workdir"], spec["prompts"])

    task = build_task(config)
    mesh = sharding.mesh_from_config(config)
    params = task.load_flow_params(config.distill.teacher_params, mesh, "teacher parameters")
    n = spec["num_samples"]
    images = digits_eval.generate(
        task,
        params,
        digits_eval.per_sample_noise(config.seed, n, task.image_shape),
        digits_eval.prompted_labels(n),
        num_steps=2,
        guidance=1.5,
        batch_size=config.eval.batch_size,
        mesh=mesh,
    )
    np.save(spec["out"] + ".npy", images)
    with open(spec["out"], "w") as f:
        json.dump(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "out_dir": out_dir,
                "written": written,
                "gathers": gathers,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
