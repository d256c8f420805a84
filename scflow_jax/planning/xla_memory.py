"""What XLA says a compiled program needs per device, and what a tree of arrays takes per device
under its shardings: the arithmetic of a plan, apart from what it plans."""

from __future__ import annotations

import re

import jax
import numpy as np

GIB = 2**30


def compiled_memory_gib(compiled) -> dict:
    """XLA's buffer assignment of a compiled program, per device, in GiB: its arguments, outputs not
    aliased to (donated) arguments, and temporaries. Known before the program runs, so a step that
    then fails to allocate still says what it asked for."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"note": "no memory analysis on this backend"}
    return {
        "arguments": analysis.argument_size_in_bytes / GIB,
        "outputs_not_aliased": (analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / GIB,
        "temporaries": analysis.temp_size_in_bytes / GIB,
    }


def fused_attention_calls(compiled) -> int:
    """Calls of cuDNN's fused attention, forward or backward, in a compiled program
    (models/attention.py; 0: every attention is XLA's)."""
    return compiled.as_text().count('custom_call_target="__cudnn$fmha')


# A collective in XLA's compiled text, synchronous or the start of an asynchronous one.
_COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def collective_counts(compiled) -> dict:
    """How many of each collective a compiled program runs per call (as written: a loop body counts
    once). Parameter all-gathers and gradient reductions are FSDP's own; all-to-alls,
    collective-permutes and reduce-scatters or all-reduces of activations mean XLA split a
    computation across devices."""
    counts = {}
    for match in _COLLECTIVE.finditer(compiled.as_text()):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


# XLA:TPU refuses a program whose temporaries exceed the chip's memory, naming both sizes (unit K,
# M or G).
_TPU_OUT_OF_HBM = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMG])\) exceeds available HBM \(([\d.]+)([KMG])\)"
)
_TO_GIB = {"K": 2.0**-20, "M": 2.0**-10, "G": 1.0}


def compile_for_plan(lowered, compiler_options: dict | None = None) -> dict:
    """Compiles ``lowered`` and reads what it needs per device: ``buffers`` (XLA's arguments,
    outputs not aliased, temporaries; GiB), ``collectives`` and ``fused_attention_calls``.

    XLA:TPU rematerialises to fit its memory limit and refuses a program it cannot fit, naming the
    temporaries it got down to: that refusal is an answer too, ``refused`` with those
    ``temporaries`` and XLA:TPU's ``limit_gib``. Under the chip's own limit it means the program
    does not fit; under a lower limit (``config.plan.tpu_hbm_cap_mib``) it is the fit test that
    ends early, the least temporaries XLA:TPU reached short of compiling the whole program. Any
    other compile error propagates. XLA:GPU and XLA:CPU compile whatever the size."""
    try:
        compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        refused = _TPU_OUT_OF_HBM.search(str(error))
        if not refused:
            raise
        needed, unit, limit, limit_unit = refused.groups()
        return {
            "refused": refused.group(0),
            "buffers": {"temporaries": float(needed) * _TO_GIB[unit]},
            "limit_gib": float(limit) * _TO_GIB[limit_unit],
        }
    buffers = compiled_memory_gib(compiled)
    if "note" in buffers:
        raise RuntimeError(
            f"XLA gives no memory analysis of programs compiled for "
            f"{jax.default_backend()} here; plan the state alone with "
            f"config.plan.compile=False"
        )
    return {
        "buffers": buffers,
        "collectives": collective_counts(compiled),
        "fused_attention_calls": fused_attention_calls(compiled),
    }


def fit(compiled: dict, planned_arguments_gib: float, usable_gib: float) -> dict:
    """Per device: the step's ``total`` (XLA's arguments, outputs not aliased and temporaries;
    after a refusal, the least temporaries plus the planned arguments), whether it ``fits``
    ``usable_gib`` and the GiB ``left``."""
    buffers = compiled["buffers"]
    if "refused" in compiled:
        total = buffers["temporaries"] + planned_arguments_gib
    else:
        total = sum(buffers[k] for k in ("arguments", "outputs_not_aliased", "temporaries"))
    return {"total": total, "fits": total <= usable_gib, "left": usable_gib - total}


def placed(abstract_tree, shardings):
    """``abstract_tree``'s shapes and dtypes laid out by ``shardings``: what a program is lowered
    for."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of ``abstract_tree`` laid out by ``shardings`` (the largest shard:
    FSDP's shards are equal; replicated arrays count whole)."""
    sizes = jax.tree.map(
        lambda leaf, s: (
            int(np.prod(s.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        ),
        abstract_tree,
        shardings,
    )
    return sum(jax.tree.leaves(sizes))
