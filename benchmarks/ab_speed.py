"""The issue-8 work at two versions of the code, compiled in one process and timed in alternation.

Why: this machine's speed drifts by tens of percent within an hour (its two-core f32 matmul read
201-306 GFLOP/s on one day), so two runs of ``distill_step.py`` minutes apart cannot show a change
of 5-10%. Here both versions share the process and the hour: the base commit's ``scflow_jax`` and
``benchmarks/distill_step.py`` are exported with ``git archive`` into a temporary folder and
imported under other names (``scflow_jax_base``, ``distill_step_base``); each version builds the
same work (same seeds), and their iterations and 1-step samplings of 64 are called in turn, the
order flipped every round. The first iteration's metrics of both are reported side by side, so a
speed change that moved the losses shows.

Usage: python benchmarks/ab_speed.py --base <commit> [--rounds 20] [--tiny] [--no-record]
The base must have ``distill_step.build(full, mesh, setup=None)`` (commit 075b9e6 or later).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import record  # noqa: E402

BASE_PACKAGE = "scflow_jax_base"


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=os.path.dirname(HERE), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def export_base(commit: str, into: str) -> None:
    """The base's package as ``scflow_jax_base`` and its benchmark modules as ``*_base`` under ``into``."""
    archive = os.path.join(into, "base.tar")
    git("archive", "--output", archive, commit, "scflow_jax", "benchmarks/distill_step.py", "benchmarks/common.py")
    subprocess.run(["tar", "-xf", archive, "-C", into], check=True)
    os.rename(os.path.join(into, "scflow_jax"), os.path.join(into, BASE_PACKAGE))
    for name in ("distill_step", "common"):
        os.rename(os.path.join(into, "benchmarks", f"{name}.py"), os.path.join(into, f"{name}_base.py"))
    for folder, _, files in os.walk(into):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path) as f:
                    text = f.read()
                text = re.sub(r"\bscflow_jax\b", BASE_PACKAGE, text)
                text = re.sub(r"^from common import", "from common_base import", text, flags=re.M)
                with open(path, "w") as f:
                    f.write(text)


def build_version(distill_step, sampling, tiny: bool, mesh) -> dict:
    """Compiled iteration (threading its donated state) and 1-step sampler of one version, with the first
    iteration's metrics."""
    b = distill_step.build(False, mesh, setup=distill_step.tiny_setup() if tiny else None)
    step = b["step"].lower(b["state"], b["batch"], b["frozen"]).compile()
    z1 = jax.random.normal(jax.random.PRNGKey(4), (64,) + b["latent_shape"])
    params = jax.tree.map(lambda a: a.copy(), b["state"].ema_params)  # the step donates the state's buffers
    sampler = jax.jit(functools.partial(sampling.sample, b["nets"].velocity_fn, cond=None, num_steps=1))
    sample = functools.partial(sampler.lower(params, z1).compile(), params, z1)
    holder = {"state": b["state"]}

    def iteration():
        holder["state"], metrics = step(holder["state"], b["batch"], b["frozen"])
        return metrics

    metrics = {k: float(v) for k, v in jax.device_get(iteration()).items()}
    return {"iteration": iteration, "sample_1step_64": sample, "metrics": metrics}


def time_in_turn(versions: dict, rounds: int) -> dict:
    """Seconds per call of each version's programs, called in turn (order flipped every round) after a warm-up."""
    for version in versions.values():
        for kind in ("iteration", "sample_1step_64"):
            jax.block_until_ready(version[kind]())
    times = {(name, kind): [] for name in versions for kind in ("iteration", "sample_1step_64")}
    order = list(versions)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            for kind in ("iteration", "sample_1step_64", "sample_1step_64"):
                start = time.perf_counter()
                jax.block_until_ready(versions[name][kind]())
                times[name, kind].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git commit to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=20, help="timed iterations of each version")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the script, measures nothing)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    try:
        base_commit = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except SystemExit:
        raise SystemExit(f"--base {args.base!r} is not a commit of this repository") from None

    import distill_step
    from scflow_jax import sampling, sharding
    mesh = sharding.make_mesh(-1, -1)
    # The base's modules stay importable for the whole run: nothing may be missing if they import lazily.
    with tempfile.TemporaryDirectory() as scratch:
        export_base(base_commit, scratch)
        sys.path.insert(0, scratch)
        import distill_step_base
        sampling_base = __import__(f"{BASE_PACKAGE}.sampling", fromlist=["sample"])
        versions = {"base": build_version(distill_step_base, sampling_base, args.tiny, mesh),
                    "head": build_version(distill_step, sampling, args.tiny, mesh)}
        times = time_in_turn(versions, args.rounds)

    dirty = git("status", "--porcelain", "--", "scflow_jax", "benchmarks/distill_step.py", "benchmarks/common.py")
    out = {"config": "tiny" if args.tiny else "issue8_small", "base": base_commit,
           "head": git("rev-parse", "HEAD") + ("+uncommitted" if dirty else ""), "rounds": args.rounds}
    for kind in ("iteration", "sample_1step_64"):
        entry = {name: {"median_s": float(np.median(times[name, kind])), "min_s": min(times[name, kind]),
                        "calls": len(times[name, kind])} for name in versions}
        entry["head_over_base_median"] = entry["head"]["median_s"] / entry["base"]["median_s"]
        entry["head_over_base_min"] = entry["head"]["min_s"] / entry["base"]["min_s"]
        out[kind] = entry
    out["first_iteration_metrics"] = {name: v["metrics"] for name, v in versions.items()}
    return record("ab_speed", out, print_only=args.no_record)


if __name__ == "__main__":
    main()
