"""Where the time of the issue-8 work goes on the CPU: core-seconds by kind of XLA operation.

Profiles one SCFlow iteration and 1-step sampling of 64 latents (the work of ``distill_step.py``) with
``jax.profiler`` and sorts every operation of the compiled program into convolutions, matmuls, reductions,
layout changes (transposes, copies, pads, concatenations, with whatever elementwise work XLA fused into them)
and other elementwise work (normalisation, activations, optimiser updates). Convolutions and matmuls also
get their FLOPs from the HLO, hence their rate.

The process pins itself to one core before JAX starts. On more cores XLA:CPU runs convolutions and matmuls
asynchronously in its thread pool: their trace events cover only the dispatch, and the operations queued
behind them look slower than they are. On one core every operation runs to completion on the traced thread,
so the durations add up to the iteration and each is the operation's own cost. Core-seconds divided by the
core count is then the best wall time perfect parallel scaling could give.

Usage: python benchmarks/profile_step.py [--full] [--calls N] [--trace-dir DIR] [--no-record]
Prints one JSON line and appends it to benchmarks/results.json (unless --no-record). CPU only; run it as
its own process (the pinning must precede JAX's start).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CATEGORIES = ("convolution", "matmul", "reduction", "layout", "elementwise", "other")
# Operations that move data into a new layout or size. A fusion containing one is a layout change (its
# elementwise work rides along); bitcasts, reshapes, broadcasts and slices inside a fusion are views.
_MOVING_OPS = {"copy", "transpose", "pad", "concatenate"}
_LAYOUT_OPS = _MOVING_OPS | {"slice", "dynamic-slice", "dynamic-update-slice", "reshape", "bitcast", "broadcast"}
_ELEMENTWISE_OPS = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "exponential",
                    "log", "sqrt", "rsqrt", "tanh", "logistic", "select", "compare", "convert", "abs", "power",
                    "clamp", "sign", "floor", "and", "or", "not", "iota", "constant"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<type>.+?) "
                          r"(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)(?P<attrs>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+) .*\{\s*$")
_SHAPE = re.compile(r"^\w+\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Operation:
    """One instruction of the compiled program, as the profile needs it."""
    category: str
    flops: float  # convolutions and matmuls only; 0 for the rest
    source: str   # the jax op_name it came from (which network and layer), if XLA kept it


def _dims(type_text: str) -> list[int]:
    match = _SHAPE.match(type_text)
    return [int(d) for d in match["dims"].split(",") if d] if match else []


def _valid_taps(in_size: int, out_size: int, size: int, stride: int, pad_low: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that land on a real input element,
    not on padding or on the holes of a dilated input: XLA counts only these."""
    last = (in_size - 1) * lhs_dilate
    return sum(1 for o in range(out_size) for k in range(size)
               if 0 <= (p := o * stride + k * rhs_dilate - pad_low) <= last and p % lhs_dilate == 0)


def _conv_flops(out_dims, lhs_dims, attrs: str) -> float:
    """2 x multiply-adds, counting (as XLA does) only the taps that meet real input elements."""
    window = re.search(r"window=\{([^}]*)\}", attrs)
    labels = re.search(r"dim_labels=(\w+)_\w+->(\w+)", attrs)
    if not (window and labels and lhs_dims):
        return 0.0
    fields = dict(item.split("=") for item in window.group(1).split())
    spatial = len(fields["size"].split("x"))

    def per_dim(key, default):
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * spatial

    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * spatial
    lhs_labels, out_labels = labels.groups()
    taps = math.prod(_valid_taps(lhs_dims[lhs_labels.index(str(i))], out_dims[out_labels.index(str(i))], *args)
                     for i, args in enumerate(zip(per_dim("size", 1), per_dim("stride", 1), pads,
                                                  per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1))))
    groups = re.search(r"feature_group_count=(\d+)", attrs)
    in_features = lhs_dims[lhs_labels.index("f")] / (int(groups.group(1)) if groups else 1)
    return 2.0 * out_dims[out_labels.index("b")] * out_dims[out_labels.index("f")] * taps * in_features


def _dot_flops(out_dims, lhs_dims, attrs: str) -> float:
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    sizes = [lhs_dims[int(d)] for d in contracting.group(1).split(",") if d] if contracting else []
    return 2.0 * math.prod(out_dims) * math.prod(sizes)


def _fused_computation(inst: dict) -> str | None:
    """The name of the computation a fusion instruction calls; None for other instructions."""
    called = re.search(r"calls=%?([\w.\-]+)", inst["attrs"]) if inst["op"] == "fusion" else None
    return called.group(1) if called else None


def parse_hlo(hlo_text: str) -> dict[str, Operation]:
    """Every instruction of an optimised HLO module (``compiled.as_text()``) by name: its category, its FLOPs
    (convolutions and matmuls) and its source. A fusion takes the category of the heaviest work it contains:
    convolution, then matmul, then reduction, then layout (a copy, transpose, pad or concatenation),
    else elementwise."""
    computations: dict[str, list[dict]] = {}
    dims: dict[str, list[int]] = {}
    current = None
    for line in hlo_text.splitlines():
        if (match := _INSTRUCTION.match(line)) and current is not None:
            inst = match.groupdict()
            computations[current].append(inst)
            dims[inst["name"]] = _dims(inst["type"])
        elif match := _COMPUTATION.match(line):
            current = match["name"]
            computations[current] = []

    def first_operand_dims(inst) -> list[int]:
        first = inst["args"].split(",")[0].strip().lstrip("%")
        return dims.get(first.split(" ")[-1].lstrip("%"), [])

    def flops(inst) -> float:
        if inst["op"] == "convolution":
            return _conv_flops(dims[inst["name"]], first_operand_dims(inst), inst["attrs"])
        if inst["op"] == "dot":
            return _dot_flops(dims[inst["name"]], first_operand_dims(inst), inst["attrs"])
        return 0.0

    def called_body(inst) -> list[dict]:
        """The instructions of the computation a fusion calls (empty for other instructions)."""
        return computations.get(_fused_computation(inst), [])

    def category(inst) -> str:
        body = called_body(inst)
        ops = {i["op"] for i in body} if body else {inst["op"]}
        for kind, members in (("convolution", {"convolution"}), ("matmul", {"dot"}),
                              ("reduction", {"reduce", "reduce-window"})):
            if ops & members:
                return kind
        if ops & (_MOVING_OPS if body else _LAYOUT_OPS):
            return "layout"
        return "elementwise" if body or ops & _ELEMENTWISE_OPS else "other"

    # Instructions inside fusions never run on their own: the profile sees the fusion.
    fused = {_fused_computation(inst) for body in computations.values() for inst in body} - {None}
    operations = {}
    for name, body in computations.items():
        if name in fused:
            continue
        for inst in body:
            source = re.search(r'op_name="([^"]*)"', inst["attrs"])
            operations[inst["name"]] = Operation(
                category(inst), flops(inst) + sum(flops(i) for i in called_body(inst)),
                source.group(1) if source else "")
    return operations


def operation_times(trace_dir: str) -> collections.Counter:
    """Nanoseconds per XLA operation (by instruction name) summed over a ``jax.profiler`` trace."""
    import jax
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: the trace was not written")
    times = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime)).planes:
        for line in plane.lines:
            for event in line.events:
                if "hlo_op" in dict(event.stats):
                    times[event.name] += event.duration_ns
    return times


def network_and_pass(source: str) -> tuple[str, str]:
    """(network, "forward" or "backward") of an operation from its jax op_name: the first path component
    that is a Flax module class (CamelCase) under jax's transformation wrappers, e.g.
    ``jit(step_fn)/transpose(jvp(ADMUNet))/output_blocks_3_2/conv`` -> ("ADMUNet", "backward"). Work
    outside any network (losses, optimiser, EMA) is "other"; operations XLA added without a source
    (layout copies, mostly) are "unattributed"."""
    if not source:
        return "unattributed", "forward"
    for component in source.split("/"):
        match = re.fullmatch(r"((?:[\w.]+\()*)([A-Z]\w*)\)*", component)
        if match:
            return match.group(2), "backward" if "transpose(" in match.group(1) else "forward"
    return "other", "backward" if "transpose(" in source else "forward"


def summarize(times: collections.Counter, operations: dict[str, Operation], calls: int, top: int = 5) -> dict:
    """Core-milliseconds per call by category (with the FLOP rate of convolutions and matmuls and each
    category's ``top`` most expensive operations) and by network and pass. Trace events of other
    programs (names not in ``operations``) are left out."""
    per_category = {c: {"core_ms": 0.0, "ops": 0, "gflop": 0.0, "top_ops": []} for c in CATEGORIES}
    per_network = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for name in sorted((n for n in times if n in operations), key=times.__getitem__, reverse=True):
        op, core_ms = operations[name], times[name] / 1e6 / calls
        network, direction = network_and_pass(op.source)
        per_network[network][direction] += core_ms
        entry = per_category[op.category]
        entry["core_ms"] += core_ms
        entry["ops"] += 1
        entry["gflop"] += op.flops / 1e9
        if len(entry["top_ops"]) < top:
            entry["top_ops"].append({"name": name, "core_ms": core_ms, "source": op.source})
    total_ms = sum(e["core_ms"] for e in per_category.values())
    for entry in per_category.values():
        entry["share"] = entry["core_ms"] / total_ms if total_ms else 0.0
        if entry["gflop"]:
            entry["gflop_s_per_core"] = entry["gflop"] / (entry["core_ms"] / 1e3)
        else:
            del entry["gflop"]
    return {"core_ms_total": total_ms, "categories": per_category,
            "networks_core_ms": dict(sorted(per_network.items(), key=lambda kv: -sum(kv[1].values())))}


def profile(call, hlo_text: str, calls: int, trace_dir: str) -> dict:
    """Traces ``calls`` calls of ``call()`` (one warm run of a compiled program whose optimised HLO is
    ``hlo_text``) and summarises them."""
    import jax
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(call())
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    jax.profiler.stop_trace()
    summary = summarize(operation_times(trace_dir), parse_hlo(hlo_text), calls)
    return {"traced_wall_ms": wall_ms, **summary}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the paper's full-size ADM UNet")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (checks the script, measures nothing)")
    parser.add_argument("--calls", type=int, default=3, help="traced calls of each program")
    parser.add_argument("--trace-dir", default=None, help="keep the traces here (TensorBoard/xprof can open them)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    # One core, before JAX creates its CPU client (and with it the thread pool): see the module docstring.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from scflow_jax import xla_cpu
    xla_cpu.apply_defaults()
    import functools

    import jax

    import distill_step
    from common import matmul_rate, record, xla_flops
    from scflow_jax import sampling, sharding
    if jax.default_backend() != "cpu":
        raise SystemExit(f"profile_step.py profiles XLA:CPU; the default backend is {jax.default_backend()} "
                         "(run with JAX_PLATFORMS=cpu, or open a jax.profiler trace in xprof on accelerators)")

    # One device: with several (--xla_force_host_platform_device_count) their work would overlap in the trace.
    b = distill_step.build(args.full, sharding.make_mesh(1, 1), setup=distill_step.tiny_setup() if args.tiny else None)
    lowered_step = b["step"].lower(b["state"], b["batch"], b["frozen"])
    step = lowered_step.compile()
    holder = {"state": b["state"]}

    def iteration():  # the step donates its state: thread it through, as training does
        holder["state"], metrics = step(holder["state"], b["batch"], b["frozen"])
        return metrics

    jax.block_until_ready(iteration())  # warm
    params = holder["state"].ema_params
    z1 = jax.random.normal(jax.random.PRNGKey(4), (64,) + b["latent_shape"])
    sampler = jax.jit(functools.partial(sampling.sample, b["nets"].velocity_fn, cond=None, num_steps=1))
    lowered_sampler = sampler.lower(params, z1)
    sampler = lowered_sampler.compile()
    jax.block_until_ready(sampler(params, z1))

    out = {"config": "tiny" if args.tiny else "full" if args.full else "issue8_small",
           "cores": len(os.sched_getaffinity(0)), "calls": args.calls}
    with tempfile.TemporaryDirectory() as scratch:
        root = args.trace_dir or scratch
        # The sampler first: the iterations donate the state that holds ``params``.
        out["sample_1step_64"] = profile(lambda: sampler(params, z1), sampler.as_text(), args.calls,
                                         os.path.join(root, "sample"))
        out["iteration"] = profile(iteration, step.as_text(), args.calls, os.path.join(root, "step"))
    # The yardstick of the rates above: a large float32 matmul on the same single core.
    out["matmul_f32"] = matmul_rate(jax.numpy.float32, 256 if args.tiny else 2048)
    # XLA's count of the whole program, beside the convolutions' and matmuls' share of it above.
    out["iteration"]["xla_gflop"] = xla_flops(lowered_step) / 1e9
    out["sample_1step_64"]["xla_gflop"] = xla_flops(lowered_sampler) / 1e9
    return record("profile_step", out, print_only=args.no_record)


if __name__ == "__main__":
    main()
