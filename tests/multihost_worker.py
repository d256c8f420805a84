"""One process of the two-process test (tests/test_multihost.py); not a test module.

Usage: python tests/multihost_worker.py SPEC_JSON, where SPEC_JSON holds process_id,
num_processes, port, workdir, out (result file of this process) and overrides (dotted
config fields). Joins the cluster through scflow_jax.distributed, runs the real distill
stage (trainer loop, collective Orbax checkpoints, process-0 logging) and records every
step's metrics.
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
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": jax.device_count(), "metrics": recorded,
                   "param_sum": float(sum(abs(x).sum() for x in jax.tree.leaves(params)))}, f)


if __name__ == "__main__":
    main(sys.argv[1])
