"""The issue-8 work under each host memory allocator: glibc's malloc, tcmalloc, jemalloc.

Why: XLA:CPU allocates a program's temporary buffer (430 MB for the issue-8 iteration) on every
call and frees it after. glibc's malloc hands blocks that large straight to the kernel (``mmap``)
and back (``munmap``), so every call first-touches fresh pages: ~3.5 million minor page faults and
~8 s of kernel time in one run of ``distill_step.py`` on the project's 2-core CPU. An allocator
that keeps freed memory for the next call avoids that. The allocator is chosen per process
(``LD_PRELOAD``), so this script runs ``distill_step.py --no-record`` once per allocator and round,
in an order that rotates every round (the machine's speed drifts within the hour), and takes
each process's kernel time and page faults from the operating system (``wait4``).

Usage: python benchmarks/allocators.py [--rounds 3] [--allocators glibc,tcmalloc,jemalloc]
                                       [--no-record] [-- distill_step.py flags, e.g. --tiny]
The default allocators are glibc's and those of the other two found (``ldconfig``'s cache); on
Debian or Ubuntu: ``apt-get install libtcmalloc-minimal4 libjemalloc2``.
"""
from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import headline_figures, record, run_benchmark_process  # noqa: E402

# The library each allocator is preloaded from (ctypes.util.find_library's name); glibc's needs none.
LIBRARIES = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}


def preload_for(allocator: str) -> str:
    """The ``LD_PRELOAD`` value that selects ``allocator`` ("" for glibc's malloc)."""
    if allocator == "glibc":
        return ""
    if allocator not in LIBRARIES:
        raise SystemExit(f"--allocators: unknown allocator {allocator!r} (known: glibc, {', '.join(LIBRARIES)})")
    library = ctypes.util.find_library(LIBRARIES[allocator])
    if library is None:
        raise SystemExit(f"--allocators: {allocator} asked for, but lib{LIBRARIES[allocator]}.so is not installed "
                         "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4 libjemalloc2)")
    return library


def run_once(preload: str, flags: list) -> dict:
    """One ``distill_step.py --no-record`` process: its figures, wall time, kernel time and page faults."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    result = run_benchmark_process("distill_step.py", flags, env=env, what=f" with LD_PRELOAD={preload!r}")
    return {**headline_figures(result), **result["process"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per allocator")
    parser.add_argument("--allocators", default=None,
                        help="comma-separated, from glibc, tcmalloc, jemalloc (default: glibc and those installed)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("distill_step_flags", nargs="*", help="after --: passed on to distill_step.py")
    args = parser.parse_args(argv)
    if args.allocators is None:
        names = ["glibc"] + [name for name, lib in LIBRARIES.items() if ctypes.util.find_library(lib)]
    else:
        names = list(dict.fromkeys(name.strip() for name in args.allocators.split(",") if name.strip()))
        if not names:
            raise SystemExit("--allocators names no allocator (known: glibc, tcmalloc, jemalloc)")
    preloads = {name: preload_for(name) for name in names}
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")

    flags = args.distill_step_flags
    runs = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each allocator goes first in turn
            runs[name].append(run_once(preloads[name], flags))
            print(f"round {r} {name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)

    summary = {name: {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
               for name in names}
    out = {"config": "full" if "--full" in flags else "tiny" if "--tiny" in flags else "issue8_small",
           "distill_step_flags": flags, "rounds": args.rounds,
           "preload": preloads, "median_over_rounds": summary, "runs": runs}
    return record("allocators", out, print_only=args.no_record)


if __name__ == "__main__":
    main()
