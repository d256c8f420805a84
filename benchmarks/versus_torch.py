"""scflow_jax against PyTorch on the issue-8 work, timed in turn on this machine: the speed ratio.

Runs ``distill_step.py`` (ours) and ``torch_step.py`` (the same work in PyTorch, see its docstring)
as separate processes, one after the other, for ``--rounds`` rounds, the order swapped every round:
this machine's speed drifts by tens of percent within the hour, so only figures measured together
compare. Per round and figure it takes the ratio PyTorch / scflow_jax (above 1: we are faster); the
summary gives the median of each figure and of each ratio over the rounds. Issue 8 asks for 1.5.

Both processes get this process's environment: prefix ``LD_PRELOAD=...`` to run both under another
malloc (``benchmarks/allocators.py``).

Usage: python benchmarks/versus_torch.py [--rounds 3] [--tiny] [--no-record]
Needs torch (``make install-test``). Prints one JSON line and appends it to benchmarks/results.json
(unless --no-record).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import headline_figures, record, run_benchmark_process  # noqa: E402

CONTENDERS = {"scflow_jax": "distill_step.py", "torch": "torch_step.py"}
TIMES = ("iteration", "sample_1step_64", "sample_4step_64")  # seconds: the ratios are of these
TARGET_RATIO = 1.5  # issue 8: at least 1.5x faster than the PyTorch reference


def run_once(name: str, flags: list) -> dict:
    """One process of ``name``'s script: its headline figures, versions and process usage."""
    result = run_benchmark_process(CONTENDERS[name], flags)
    versions = {key: result[key] for key in ("torch", "torch_threads") if key in result}
    return {**headline_figures(result), **result["process"], "unet_params": result["unet_params"],
            "disc_params": result["disc_params"], "step_gflop": result["step_gflop"], **versions}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per framework")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the script, measures nothing)")
    parser.add_argument("--repeats", type=int, default=20, help="timed iterations per process")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    flags = ["--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])

    names = list(CONTENDERS)
    runs = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(run_once(name, flags))
            print(f"round {r} {name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)

    ours, theirs = runs["scflow_jax"][0], runs["torch"][0]
    if (ours["unet_params"], ours["disc_params"]) != (theirs["unet_params"], theirs["disc_params"]):
        raise SystemExit("the two programs do not build the same networks: parameter counts "
                         f"{ours['unet_params']}/{ours['disc_params']} (scflow_jax) against "
                         f"{theirs['unet_params']}/{theirs['disc_params']} (torch)")
    ratios = [{figure: torch_run[figure] / jax_run[figure] for figure in TIMES}
              for jax_run, torch_run in zip(runs["scflow_jax"], runs["torch"])]
    numeric = lambda run: {k: v for k, v in run.items() if isinstance(v, (int, float))}  # noqa: E731
    out = {"config": "tiny" if args.tiny else "issue8_small", "rounds": args.rounds, "repeats": args.repeats,
           "ld_preload": os.environ.get("LD_PRELOAD", ""),
           "median_over_rounds": {name: {key: statistics.median(numeric(run)[key] for run in runs[name])
                                         for key in numeric(runs[name][0])} for name in names},
           "speedup_of_scflow_jax": {figure: {"median": statistics.median(r[figure] for r in ratios),
                                               "per_round": [r[figure] for r in ratios]} for figure in TIMES},
           "target_speedup": TARGET_RATIO, "runs": runs}
    return record("versus_torch", out, print_only=args.no_record)


if __name__ == "__main__":
    main()
