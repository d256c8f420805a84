"""Shared helpers for benchmarks: timing with block_until_ready, XLA's FLOP counts, random weights
and the results file.

Results go where the user asks: a script's ``--results=PATH``, else ``$SCFLOW_BENCHMARK_RESULTS``,
else ``runs/benchmarks/results.json`` under the repository (git-ignored). Each entry carries the
date, the machine, the jax and jaxlib versions and XLA_FLAGS; the project's current figures live in
docs/performance.md, not in a history of runs in the tree."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ENV = "SCFLOW_BENCHMARK_RESULTS"
DEFAULT_RESULTS = os.path.join(REPO_ROOT, "runs", "benchmarks", "results.json")


def time_calls(fn, *, warmup: int, repeats: int) -> dict:
    """Seconds per call of ``fn()`` (which must return jax arrays), compile excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
    }


def time_train_steps(compiled_step, state, batches: list, frozen, *, warmup: int, steps: int):
    """Runs ``warmup + steps`` iterations of a compiled ``(state, batch, frozen) -> (state,
    metrics)`` step, cycling through ``batches``; returns the final state, the last metrics and the
    seconds of each timed step (the state is threaded through, as in training)."""
    times, metrics = [], None
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled_step(state, batches[i % len(batches)], frozen)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return state, metrics, times


def forward_and_backward(fn):
    """Jitted ``(*operands, cotangent) -> (fn(*operands), *gradients of <fn(*operands),
    cotangent>)``: one call gives the output and every operand's gradient, as the device checks
    compare them."""

    def run(*operands_and_cotangent):
        *operands, cotangent = operands_and_cotangent
        out, vjp = jax.vjp(fn, *operands)
        return (out,) + vjp(cotangent)

    return jax.jit(run)


def relative_difference(got, want) -> float:
    """The largest absolute difference of two arrays relative to ``want``'s largest magnitude, in
    float32: how the device checks compare a kernel with its reference."""
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def exit_past_tolerance(script: str, entries: list, tolerance: float, meaning: str) -> None:
    """Exits, naming the figure and what it means, where an entry's ``relative_difference``
    exceeds ``tolerance``."""
    worst = max(max(entry["relative_difference"].values()) for entry in entries)
    if worst > tolerance:
        raise SystemExit(
            f"{script}: a relative difference of {worst:.3g} exceeds "
            f"--tolerance={tolerance}: {meaning}"
        )


def xla_flops(lowered) -> float:
    """XLA's FLOP count of a jitted program's ``Lowered`` stage (``jax.jit(f).lower(...)``), plus
    the FLOPs of cuDNN's fused attention, which is already a custom call there
    (:func:`fused_attention_flops`).

    Count the lowered program, not the compiled one: on a GPU the compiled program's count leaves
    out the convolutions XLA hands to cuDNN (on an H100, 14.6 GFLOP for the issue-8 step whose
    lowered count is 218 GFLOP); on the CPU the two agree within 2%. ``cost_analysis()`` is a dict
    on new jax and a list of dicts (one per program) on older ones."""
    cost = lowered.cost_analysis()
    if isinstance(cost, dict):
        cost = [cost]
    counted = float(sum(c.get("flops", 0.0) for c in cost or [] if c))
    return counted + fused_attention_flops(lowered.as_text())


# A call of cuDNN's fused attention in a lowered (StableHLO) program, forward or backward, with the
# shapes of its first two operands, queries [B, T, N, H] and keys [B, S, N, H] (jax's layout).
_FUSED_ATTENTION = re.compile(
    r"stablehlo\.custom_call @__cudnn\$fmhaSoftmax(Backward)?\(.*?\} : "
    r"\(tensor<(\d+)x(\d+)x(\d+)x(\d+)x\w+>, tensor<\d+x(\d+)x"
)


def fused_attention_flops(lowered_text: str) -> float:
    """FLOPs of the cuDNN fused attention calls in a lowered program, counted as XLA counts the same
    attention written out (models/attention.py), whose cost analysis sees custom calls as free: the
    forward's two matmuls (q k^T, then p v), 4 B N T S H, and the backward's four (dv, dp, dq, dk),
    8 B N T S H. The kernel's recomputation of q k^T in the backward is hardware work, like
    remat."""
    flops = 0.0
    for match in _FUSED_ATTENTION.finditer(lowered_text):
        backward, batch, queries, heads, head_dim, keys = match.groups()
        flops += (
            (8 if backward else 4)
            * int(batch)
            * int(queries)
            * int(keys)
            * int(heads)
            * int(head_dim)
        )
    return flops


def matmul_rate(dtype, n: int, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Timing of one n x n x n matmul in ``dtype`` through XLA (default precision, accumulating in
    float32, as the benchmarked programs run) and its FLOP rate: what the device's matrix units
    reach, the ceiling for work made of convolutions and matmuls."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
    t = time_calls(lambda: matmul(a, b), warmup=warmup, repeats=repeats)
    return {"matmul_n": n, **t, "gflop_s": 2 * n**3 / t["median_s"] / 1e9}


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),  # e.g. tcmalloc (docs/performance.md)
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__
        if hasattr(jax.lib, "__version__")
        else __import__("jaxlib").__version__,
    }


def results_path(path: str | None = None) -> str:
    """Where results go: ``path`` (a script's --results), else $SCFLOW_BENCHMARK_RESULTS, else the
    git-ignored ``runs/benchmarks/results.json``."""
    return path or os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS


def add_output_flags(parser) -> None:
    """``--results=PATH`` and ``--no_record`` (also spelled ``--no-record``) for argparse."""
    parser.add_argument(
        "--results",
        default=None,
        help=f"JSON file the entry is appended to (default ${RESULTS_ENV}, "
        f"else runs/benchmarks/results.json)",
    )
    parser.add_argument(
        "--no_record",
        "--no-record",
        dest="no_record",
        action="store_true",
        help="print the result only; write nothing",
    )


def record(name: str, result: dict, *, print_only: bool = False, path: str | None = None) -> dict:
    """Appends ``result`` under ``name`` with the date and machine to the results file
    (:func:`results_path` of ``path``), and prints it as one JSON line; ``print_only`` (the scripts'
    --no_record) prints ``result`` alone and writes nothing."""
    if print_only:
        print(json.dumps(result), flush=True)
        return result
    entry = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **result,
    }
    file = results_path(path)
    entries = []
    if os.path.exists(file):
        with open(file) as f:
            entries = json.load(f)
    entries.append(entry)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=2)
    os.replace(tmp, file)
    print(json.dumps(entry), flush=True)
    return entry


def random_params(abstract_tree, seed: int = 0):
    """Random parameters of the given shapes, drawn on the host: no device program to compile (on a
    GPU, jitting a large network's init compiles for minutes). Kernels ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.02), everything else ~ N(0, 0.02): no zero layer XLA could simplify away, and
    activations of a sensible size through the network."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        x = rng.standard_normal(shape, dtype=np.float32)
        if name == "kernel" and len(shape) >= 2:
            return x / np.float32(np.sqrt(np.prod(shape[:-1])))
        if name == "scale":
            return 1 + np.float32(0.02) * x
        return np.float32(0.02) * x

    return jax.tree_util.tree_map_with_path(draw, abstract_tree)
