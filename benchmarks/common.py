"""Shared helpers for benchmarks: timing with block_until_ready and the results file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax

RESULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def time_calls(fn, *, warmup: int, repeats: int) -> dict:
    """Seconds per call of ``fn()`` (which must return jax arrays), compile excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "mean_s": statistics.fmean(times)}


def machine() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
            else __import__("jaxlib").__version__}


def record(name: str, result: dict) -> dict:
    """Appends ``result`` under ``name`` with the date and machine to the results file."""
    entry = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc)
             .isoformat(timespec="seconds"), "machine": machine(), **result}
    entries = []
    if os.path.exists(RESULTS_FILE):
        with open(RESULTS_FILE) as f:
            entries = json.load(f)
    entries.append(entry)
    tmp = RESULTS_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=2)
    os.replace(tmp, RESULTS_FILE)
    print(json.dumps(entry), flush=True)
    return entry
