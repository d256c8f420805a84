"""``--mode=plan``: does this config's step fit the target's devices at its batch and mesh, and how
much is left? Answered from XLA's own compiled program, on this host, before the hardware is rented.

The state is never allocated: its shapes come from ``jax.eval_shape`` of the distill stage's
initialiser, its shardings from the trainer's FSDP rules, each array's bytes per device from its
shard shape (programs.py). So the state figures are exact for any backend. The step is then
compiled for the target (targets.py): XLA's buffer assignment gives its arguments, outputs and
temporaries per device, the temporaries being that compiler's (XLA:CPU's are no guide to a GPU's).
"""

from __future__ import annotations

import datetime
import os
import time

import jax

from scflow_jax import monitoring, sharding
from scflow_jax.planning import programs, report, targets
from scflow_jax.planning.xla_memory import GIB, compile_for_plan, fit

# config.plan's fields and their defaults (a config without the group plans with these).
PLAN_DEFAULTS = dict(
    target="",  # "" this host's devices; cpu[:N]; h100[:N], a100-80g, .txtpb; v5e:2x4
    output="",  # the JSON record; "" = <workdir>/plan.json
    compile=True,  # False: the state alone, in seconds (no temporaries, no fit verdict)
    memory_gib=0.0,  # > 0: a device's usable memory, instead of the target's
    tpu_hbm_cap_mib=0,  # TPU: a lower XLA:TPU limit, so that it refuses early with its least
    # temporaries
    sampler_steps=0,  # > 0: plan the evaluation sampler of this many Euler steps, not the step
    tiny_networks=False,  # recipes: tiny stand-ins for the networks whose model folder is not set
)


def plan_settings(config) -> dict:
    """``config.plan`` over :data:`PLAN_DEFAULTS`, checked; errors name the field."""
    given = config.get("plan") or {}
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    unknown = sorted(set(given) - set(PLAN_DEFAULTS))
    if unknown:
        raise ValueError(
            f"config.plan has unknown fields {unknown}; known: {sorted(PLAN_DEFAULTS)}"
        )
    settings = {**PLAN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    for field in ("compile", "tiny_networks"):
        if not isinstance(settings[field], bool):
            raise ValueError(f"config.plan.{field}={settings[field]!r} must be True or False")
    for field in ("memory_gib", "tpu_hbm_cap_mib", "sampler_steps"):
        value = settings[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"config.plan.{field}={value!r} must be a number >= 0")
    for field in ("tpu_hbm_cap_mib", "sampler_steps"):
        if settings[field] != int(settings[field]):
            raise ValueError(f"config.plan.{field}={settings[field]!r} must be an integer")
        settings[field] = int(settings[field])
    settings["target"] = targets.parse_target(settings["target"])
    if settings["tpu_hbm_cap_mib"] and settings["target"].kind != "tpu":
        raise ValueError(
            f"config.plan.tpu_hbm_cap_mib={settings['tpu_hbm_cap_mib']} needs a TPU "
            f"target (config.plan.target=v5e:2x4, ...), not "
            f"{settings['target'].spec!r}"
        )
    if settings["tpu_hbm_cap_mib"] and not settings["compile"]:
        raise ValueError(
            "config.plan.tpu_hbm_cap_mib limits XLA:TPU's compile: it needs "
            "config.plan.compile=True"
        )
    return settings


def _environment() -> dict:
    import jaxlib

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
    }


def plan(config, workdir: str) -> dict:
    """Plans ``config``'s distill step (or, with ``config.plan.sampler_steps``, its evaluation
    sampler) on ``config.plan.target``: prints the table, writes the record as JSON to
    ``config.plan.output`` (default ``<workdir>/plan.json``) and returns it. Call it before anything
    starts JAX's backends (``targets.prepare_backends``)."""
    settings = plan_settings(config)
    target = settings["target"]
    targets.prepare_backends(target)
    devices = targets.devices(target, settings["tpu_hbm_cap_mib"])
    mesh = sharding.mesh_from_config(config, devices=devices)
    task, architecture = programs.build_task(config, settings["tiny_networks"])
    if settings["sampler_steps"]:
        program = programs.sampler(config, task, mesh, settings["sampler_steps"])
    else:
        program = programs.distill_step(config, task, mesh)
    usable, source = targets.usable_memory(target, list(mesh.devices.flat), settings["memory_gib"])
    state = {k: v / GIB for k, v in program.state_bytes.items()}
    gib = {"state": state, "state_total": sum(state.values()), "inputs": program.inputs_bytes / GIB}
    record = {
        "program": program.name,
        "data": config.data.name,
        "architecture": architecture,
        "target": target.spec or "this host",
        "compiler": target.compiler,
        "device_kind": mesh.devices.flat[0].device_kind,
        "devices": mesh.size,
        "mesh": {"data": mesh.shape[sharding.DATA_AXIS], "fsdp": mesh.shape[sharding.FSDP_AXIS]},
        "batch": program.batch,
        "batch_per_device": program.batch / mesh.size,
        "compute_dtype": config.precision.compute_dtype,
        "remat": config.model.get("remat", "none"),
        "parameters": program.parameters,
        "sharding": program.sharding_summary,
        "usable_gib": usable,
        "usable_source": source,
        "xla": None,
    }
    planned_arguments = gib["state_total"] + gib["inputs"]
    if settings["compile"]:
        start = time.perf_counter()
        # Without a GPU to autotune on, XLA:GPU's default Triton tiling fails on some of the SD
        # UNet's matmuls ("Couldn't find output tile sizes"); cuBLAS takes them, as it does on the
        # card wherever it wins the autotuning.
        options = {"xla_gpu_enable_triton_gemm": False} if target.kind == "gpu" else None
        compiled = compile_for_plan(program.lower(), options)
        record["compile_s"] = time.perf_counter() - start
        verdict = fit(compiled, planned_arguments, usable)
        gib.update(
            temporaries=compiled["buffers"]["temporaries"],
            outputs_not_aliased=compiled["buffers"].get("outputs_not_aliased", 0.0),
            total=verdict["total"],
        )
        record.update(
            fits=verdict["fits"],
            left_gib=verdict["left"],
            xla={k: v for k, v in compiled.items() if k in ("refused", "limit_gib", "buffers")},
            collectives=compiled.get("collectives"),
            fused_attention_calls=compiled.get("fused_attention_calls"),
        )
    else:
        gib["total"] = planned_arguments
        record.update(fits=None, left_gib=usable - planned_arguments)
    record["gib_per_device"] = gib
    record.update(_environment())
    output = settings["output"] or os.path.join(workdir, "plan.json")
    if monitoring.is_main_process():
        monitoring.write_json_atomic(output, record)
        print(report.format_table(record) + f"\nWritten to {output}", flush=True)
    return record
