"""--mode=plan (scflow_jax/planning): what each device holds of a recipe's distillation state under
FSDP, XLA's buffers for the compiled step, the targets (this host, CPU devices, deviceless GPUs and
TPU slices) and every bad setting, named by its config field.

This suite installs neither JAX's CUDA plugin nor libtpu: the GPU and TPU paths are tested up to
the compiler (target files, pool arithmetic, XLA:TPU's refusal, the error that names the missing
extra); the CPU target runs whole."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import types

import jax
import pytest

import scflow_testlib
from scflow_jax import main, train_state
from scflow_jax.models import unet_sd
from scflow_jax.planning import plan_mode, programs, report, targets, xla_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# Text states of CLIP ViT-L/14, which the plan takes for the t2i recipe without a text encoder
# folder; the tiny stand-ins of SD's UNet and VAE.
TEXT_TOKENS, TEXT_DIM = 77, 768
TINY_UNET, TINY_VAE = programs.TINY_UNET, programs.TINY_VAE
H100_BYTES = 84929347584  # gpu_targets/h100.txtpb's device_memory_size


def load_config(name: str, variant: str = ""):
    spec = importlib.util.spec_from_file_location(
        f"plan_{name}", os.path.join(REPO, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _write_json(path, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return os.path.dirname(path)


def tiny_t2i(tmp_path, *, devices: int, fsdp: int, batch: int = 8, **plan):
    """The SD 1.5 recipe as configured (bf16 compute, remat), on a tiny UNet and VAE given by their
    config.json alone (a plan reads no weights), at 64 px."""
    config = load_config("t2i_sd15")
    config.data.image_size = 64
    config.disc.update(dict(head_channels=16, head_groups=4))
    config.model.teacher_path = _write_json(
        str(tmp_path / "unet" / "config.json"), TINY_UNET.to_dict()
    )
    vae = {"_class_name": "AutoencoderKL", **dataclasses.asdict(TINY_VAE)}
    config.model.vae_path = _write_json(str(tmp_path / "vae" / "config.json"), vae)
    config.mesh.update(dict(num_devices=devices, fsdp=fsdp, data=-1, fsdp_min_size=1024))
    config.distill.batch_size = batch
    config.plan.update({"compile": False, "output": str(tmp_path / "plan.json"), **plan})
    return config


def test_plan_splits_the_state_over_fsdp_and_keeps_it_whole_without(tmp_path):
    whole = plan_mode.plan(tiny_t2i(tmp_path / "whole", devices=4, fsdp=1), str(tmp_path))
    split = plan_mode.plan(tiny_t2i(tmp_path / "split", devices=4, fsdp=4), str(tmp_path))
    assert whole["mesh"] == {"data": 4, "fsdp": 1} and split["mesh"] == {"data": 1, "fsdp": 4}
    assert whole["architecture"]["teacher_path"].startswith("config.model.teacher_path=")
    student = train_state.count_params(unet_sd.unet_param_shapes(TINY_UNET))
    assert split["parameters"]["student"] == whole["parameters"]["student"] == student
    parts = whole["gib_per_device"]["state"]
    # Replicated: every device holds the float32 student; Adam two moments of it (and a step
    # count); the target and the eval EMA one copy each; the teacher one with its kernels in bf16
    # (the recipe computes in bf16), its vectors in float32.
    assert parts["params"] * GIB == 4 * student
    assert parts["target_params"] == parts["ema_params"] == parts["params"]
    shapes = jax.tree.leaves(unet_sd.unet_param_shapes(TINY_UNET))
    assert parts["teacher"] * GIB == sum(
        (2 if leaf.ndim >= 2 else 4) * math.prod(leaf.shape) for leaf in shapes
    )
    assert parts["params"] / 2 < parts["teacher"] < parts["params"] * 0.6
    assert parts["disc_params"] * GIB == 4 * whole["parameters"]["discriminator"]
    assert 2 * parts["params"] <= parts["opt_state"] <= 2 * parts["params"] + 64 / GIB
    gib = whole["gib_per_device"]
    assert gib["state_total"] == pytest.approx(sum(parts.values()))
    # Without a compile, the total is what the devices hold between steps plus their rows of the
    # batch: 2 of 8 latents of 8x8x4 and their text states, and the replicated empty prompt's.
    text = TEXT_TOKENS * TEXT_DIM
    assert gib["inputs"] * GIB == 4 * (2 * (8 * 8 * 4 + text) + text)
    assert gib["total"] == pytest.approx(gib["state_total"] + gib["inputs"])
    assert whole["fits"] is None and whole["xla"] is None
    assert whole["left_gib"] == pytest.approx(whole["usable_gib"] - gib["total"])
    # FSDP over 4: each device holds at least a quarter (small arrays stay whole), far less than
    # all.
    for name, replicated in parts.items():
        if name != "step":
            assert replicated / 4 <= split["gib_per_device"]["state"][name] < replicated / 2, name
    # The record is the JSON file, and the table shows its rows.
    with open(tmp_path / "split" / "plan.json") as f:
        assert json.load(f)["gib_per_device"] == split["gib_per_device"]
    table = report.format_table(whole)
    assert "student optimizer moments" in table and "state fits (step not compiled)" in table


def test_plan_of_the_sd15_recipe_without_any_model_folder_takes_its_reference_networks(tmp_path):
    """The recipe's state per device, from the reference architectures alone (nothing
    downloaded): SD 1.5's UNet of 859.5M parameters, the teacher-encoder discriminator of 354.0M
    (the UNet's encoder and the authors' head)."""
    config = load_config("t2i_sd15")
    config.mesh.update(dict(num_devices=8, fsdp=8, data=-1))
    config.plan.update(dict(compile=False, output=str(tmp_path / "plan.json")))
    out = plan_mode.plan(config, str(tmp_path))
    assert out["parameters"] == {"student": 859_520_964, "discriminator": 353_958_913}
    assert "not set" in out["architecture"]["teacher_path"]
    assert "not set" in out["architecture"]["vae_path"]
    assert out["batch"] == 40 and out["batch_per_device"] == 5
    assert out["gib_per_device"]["state_total"] == pytest.approx(2.708, abs=0.001)


def test_plan_of_a_tiny_recipe_variant_needs_no_model_folder(tmp_path):
    """The recipes' :tiny variants plan tiny stand-ins of the networks no folder names, as every
    other variant plans the reference ones; a folder that is named still decides."""
    t2i = load_config("t2i_sd15", "tiny")
    t2i.plan.update(dict(compile=False, output=str(tmp_path / "t2i.json")))
    out = plan_mode.plan(t2i, str(tmp_path))
    assert out["parameters"]["student"] == train_state.count_params(
        unet_sd.unet_param_shapes(TINY_UNET)
    )
    assert out["architecture"]["teacher_path"].startswith("a tiny stand-in of SD 1.5's UNet")
    celeba = load_config("celebahq256", "tiny")
    celeba.plan.update(dict(compile=False, output=str(tmp_path / "celeba.json")))
    out = plan_mode.plan(celeba, str(tmp_path))
    assert out["architecture"] == {
        "adm": "config.model.adm",
        "vae_path": "a tiny stand-in of SD's VAE (config.model.vae_path not set)",
    }
    assert out["gib_per_device"]["inputs"] * GIB == 4 * 4 * 8 * 8 * 4  # 4 latents of 8x8x4
    named = tiny_t2i(tmp_path / "named", devices=1, fsdp=1, tiny_networks=True)
    named.model.teacher_path = _write_json(
        str(tmp_path / "other" / "config.json"),
        dataclasses.replace(TINY_UNET, layers_per_block=2).to_dict(),
    )
    out = plan_mode.plan(named, str(tmp_path))
    assert out["architecture"]["teacher_path"] == f"config.model.teacher_path={tmp_path / 'other'}"
    assert out["parameters"]["student"] > train_state.count_params(
        unet_sd.unet_param_shapes(TINY_UNET)
    )


def _plan(tmp_path, **kw):
    return plan_mode.plan(tiny_t2i(tmp_path, **kw), str(tmp_path))


def test_plan_names_a_batch_the_mesh_cannot_split_and_every_bad_setting(tmp_path):
    with pytest.raises(ValueError, match=r"config.distill.batch_size=6 is not divisible .* \(4 = "):
        _plan(tmp_path, devices=4, fsdp=1, batch=6)
    with pytest.raises(ValueError, match=r"num_devices=16 but 8 devices"):
        _plan(tmp_path, devices=16, fsdp=1, batch=16)
    bad = (
        (dict(memory_gib=-1.0), "config.plan.memory_gib=-1.0 must be a number >= 0"),
        (dict(sampler_steps=-1), "config.plan.sampler_steps=-1 must be a number >= 0"),
        (dict(tpu_hbm_cap_mib=1024), "config.plan.tpu_hbm_cap_mib=1024 needs a TPU target"),
        (
            dict(target="h900"),
            "config.plan.target='h900' is not a target: .*a GPU \\(a100-80g, h100, h200",
        ),
        (
            dict(target="cpu:0"),
            "config.plan.target='cpu:0': the device count after ':' must be a positive",
        ),
        (dict(target="h100:-2"), "config.plan.target='h100:-2': the device count"),
    )
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            _plan(tmp_path, devices=4, fsdp=1, **settings)
    config = tiny_t2i(tmp_path, devices=4, fsdp=1)
    config.plan.hbm = 16
    with pytest.raises(ValueError, match=r"config.plan has unknown fields \['hbm'\]"):
        plan_mode.plan(config, str(tmp_path))
    # A config given as plain dicts (no ConfigDict to check the types first).
    for plan, message in (
        ({"compile": "yes"}, "config.plan.compile='yes' must be True or False"),
        ({"tiny_networks": 1}, "config.plan.tiny_networks=1 must be True or False"),
        ({"sampler_steps": 1.5}, "config.plan.sampler_steps=1.5 must be an integer"),
        ({"memory_gib": "16"}, "config.plan.memory_gib='16' must be a number >= 0"),
        ({"target": 5}, "config.plan.target=5 must be a string"),
    ):
        with pytest.raises(ValueError, match=message):
            plan_mode.plan_settings({"plan": plan})
    assert plan_mode.plan_settings({})["target"].kind == "host"  # a config without the group


def test_plan_on_cpu_devices_takes_those_present_and_names_a_shortfall(tmp_path):
    jax.devices()  # the session's 8 fake CPU devices run already
    out = _plan(tmp_path, devices=-1, fsdp=2, **{"target": "cpu:2"})
    assert out["devices"] == 2 and out["mesh"] == {"data": 1, "fsdp": 2}
    assert out["target"] == "cpu:2"
    with pytest.raises(
        targets.PlanTargetError, match=r"asks for 16 CPU devices, but JAX started with 8"
    ):
        _plan(tmp_path, devices=-1, fsdp=1, batch=16, **{"target": "cpu:16"})
    assert _plan(tmp_path, devices=2, fsdp=1, memory_gib=3.5)["usable_gib"] == 3.5


def test_plan_of_the_sampler_holds_the_student_whole_and_moves_nothing(tmp_path):
    config = tiny_t2i(tmp_path, devices=4, fsdp=4, sampler_steps=2, compile=True)
    config.eval.batch_size = 8
    config.mesh.fsdp_min_size = 64
    out = plan_mode.plan(config, str(tmp_path))
    student = 4 * train_state.count_params(unet_sd.unet_param_shapes(TINY_UNET)) / GIB
    assert out["program"] == "sampler" and out["batch"] == 8
    assert out["gib_per_device"]["state"] == {"student": pytest.approx(student)}
    # Whole on every device, the student's program needs no collective at all.
    assert out["collectives"] == {}
    assert out["gib_per_device"]["temporaries"] > 0 and out["fits"] is True
    config.eval.batch_size = 6
    with pytest.raises(ValueError, match=r"config.eval.batch_size=6 is not divisible"):
        plan_mode.plan(config, str(tmp_path))


class _Compiled:
    """A compiled program's memory analysis, as XLA reports it (``None``: a backend without one)."""

    def __init__(self, analysis, text: str = ""):
        self.analysis, self.text = analysis, text

    def memory_analysis(self):
        return self.analysis

    def as_text(self):
        return self.text


class _Lowered:
    """A lowered program whose compile returns ``result`` or raises it, and records its options."""

    def __init__(self, result):
        self.result, self.options = result, []

    def compile(self, compiler_options=None):
        self.options.append(compiler_options)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _analysis(arguments, outputs, aliased, temporaries):
    return types.SimpleNamespace(
        argument_size_in_bytes=int(arguments * GIB),
        output_size_in_bytes=int(outputs * GIB),
        alias_size_in_bytes=int(aliased * GIB),
        temp_size_in_bytes=int(temporaries * GIB),
    )


def test_compiled_memory_gib_reads_the_buffer_assignment_and_says_when_there_is_none():
    assert xla_memory.compiled_memory_gib(_Compiled(_analysis(3, 3.5, 3, 0.25))) == {
        "arguments": 3.0,
        "outputs_not_aliased": 0.5,
        "temporaries": 0.25,
    }
    assert xla_memory.compiled_memory_gib(_Compiled(None)) == {
        "note": "no memory analysis on this backend"
    }
    with pytest.raises(RuntimeError, match="config.plan.compile=False"):
        xla_memory.compile_for_plan(_Lowered(_Compiled(None)))


def _refusal(needed: str, limit: str) -> Exception:
    """XLA:TPU's error for a step whose temporaries it could not bring under its memory limit."""
    return jax.errors.JaxRuntimeError(
        f"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        f"temporaries ({needed}) exceeds available HBM ({limit})."
    )


def test_compile_for_plan_reads_xla_buffers_or_xla_tpu_s_out_of_memory_refusal():
    text = (
        "%ag = f32[8,4] all-gather-start(f32[4,4] %p)\n"
        "%t = (f32[2], f32[2]) all-to-all(f32[2] %x, f32[2] %y)\n"
        "%g = f32[8] all-gather(f32[4] %q), dimensions={0}\n"
        "%name.all-reduce = f32[2] add(%a, %b)\n"
        "%fa = (bf16[4,8,256,40], f32[4,8,256]) custom-call(%q, %k, %v), "
        'custom_call_target="__cudnn$fmhaSoftmax"'
    )
    lowered = _Lowered(_Compiled(_analysis(3, 3.5, 3, 9.25), text))
    compiled = xla_memory.compile_for_plan(lowered, {"xla_gpu_enable_triton_gemm": False})
    assert lowered.options == [{"xla_gpu_enable_triton_gemm": False}]
    # An instruction's name is no collective.
    assert compiled["collectives"] == {"all-gather": 2, "all-to-all": 1}
    assert compiled["fused_attention_calls"] == 1
    verdict = xla_memory.fit(compiled, planned_arguments_gib=2.9, usable_gib=16.0)
    assert verdict == {"total": pytest.approx(12.75), "fits": True, "left": pytest.approx(3.25)}
    assert xla_memory.fit(compiled, 2.9, 12.5)["fits"] is False
    # Under the chip's own limit a refusal is a no, with the temporaries XLA:TPU could not get
    # below.
    refused = xla_memory.compile_for_plan(_Lowered(_refusal("24.31G", "15.75G")))
    assert refused["limit_gib"] == 15.75 and refused["buffers"] == {"temporaries": 24.31}
    assert xla_memory.fit(refused, 2.7, 16.0)["fits"] is False
    # Under a lower limit (config.plan.tpu_hbm_cap_mib) the least temporaries reached decide, with
    # the planned state and batch, against the chip.
    capped = xla_memory.compile_for_plan(_Lowered(_refusal("9216.00M", "1024.00M")))
    assert capped["buffers"] == {"temporaries": 9.0} and capped["limit_gib"] == 1.0
    assert xla_memory.fit(capped, 2.7, 16.0) == {
        "total": 11.7,
        "fits": True,
        "left": pytest.approx(4.3),
    }
    assert xla_memory.fit(capped, 2.7, 11.5)["fits"] is False
    # Any other compile failure is not a fit answer: it propagates.
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        xla_memory.compile_for_plan(
            _Lowered(jax.errors.JaxRuntimeError("INTERNAL: a compiler bug"))
        )


def test_report_shows_a_refusal_and_a_verdict_in_the_table_s_units():
    record = {
        "program": "distill_step",
        "data": "t2i_sd15",
        "batch": 40,
        "batch_per_device": 5.0,
        "devices": 8,
        "device_kind": "TPU v5 lite",
        "target": "v5e:2x4",
        "mesh": {"data": 1, "fsdp": 8},
        "compute_dtype": "bfloat16",
        "remat": "full",
        "compiler": "XLA:TPU",
        "usable_gib": 16.0,
        "usable_source": "HBM of a v5e chip",
        "fits": True,
        "left_gib": 5.94,
        "xla": {"refused": "...", "limit_gib": 1.0, "buffers": {"temporaries": 7.35}},
        "gib_per_device": {
            "state": {
                "params": 0.4,
                "opt_state": 0.8,
                "target_params": 0.4,
                "ema_params": 0.4,
                "teacher": 0.2,
                "disc_params": 0.17,
                "disc_opt_state": 0.33,
                "step": 4 / GIB,
            },
            "state_total": 2.7,
            "inputs": 0.01,
            "temporaries": 7.35,
            "outputs_not_aliased": 0.0,
            "total": 10.06,
        },
    }
    rows = dict(report.state_rows(record["gib_per_device"]["state"]))
    assert rows == {
        "student parameters": 0.4,
        "student optimizer moments": 0.8,
        "target + eval EMAs": 0.8,
        "teacher (frozen)": 0.2,
        "discriminator + its moments": pytest.approx(0.5),
    }
    table = report.format_table(record)
    assert "GiB per device" in table and "XLA:TPU refused under 1" in table
    assert "yes, 5.94 left" in table
    record["gib_per_device"]["total"], record["fits"], record["left_gib"] = 0.5, False, -0.25
    table = report.format_table(record)
    assert "MiB per device" in table and "no, 256.00 short" in table


def test_gpu_targets_read_their_card_and_fit_jax_s_allocator_pool(monkeypatch, tmp_path):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert targets.known_gpus() == ["a100-80g", "h100", "h200"]
    h100 = targets.parse_target("h100")
    assert (h100.kind, h100.count, h100.compiler) == ("gpu", None, "XLA:GPU")
    assert "NVIDIA H100" in h100.gpu_target_text and targets.parse_target("h100:2").count == 2
    usable, source = targets.usable_memory(h100, [])
    assert usable == pytest.approx(0.75 * H100_BYTES / GIB)  # JAX's default pool
    assert "JAX's pool" in source
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    assert targets.usable_memory(h100, [])[0] == pytest.approx(0.92 * H100_BYTES / GIB)
    assert targets.usable_memory(h100, [], memory_gib=70.0) == (70.0, "config.plan.memory_gib")
    for bad_fraction in ("0.0", "1.5", "most"):
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", bad_fraction)
        with pytest.raises(
            targets.PlanTargetError,
            match=f"XLA_PYTHON_CLIENT_MEM_FRACTION='{bad_fraction}' must be a number in",
        ):
            targets.usable_memory(h100, [])
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    for name, gib in (("a100-80g", 79.26), ("h200", 141.0)):
        usable = targets.usable_memory(targets.parse_target(name), [])[0]
        assert usable == pytest.approx(0.92 * gib, abs=0.01)
    # A target file of one's own, by path, with a GPU count.
    own = tmp_path / "card.txtpb"
    own.write_text(h100.gpu_target_text.replace(str(H100_BYTES), str(48 * GIB)))
    mine = targets.parse_target(f"{own}:4")
    assert mine.count == 4 and targets.usable_memory(mine, [])[0] == pytest.approx(0.92 * 48)
    not_a_target = tmp_path / "notes.txt"
    not_a_target.write_text("gpu: an H100\n")
    with pytest.raises(targets.PlanTargetError, match="has no gpu_device_info.device_memory_size"):
        targets.parse_target(str(not_a_target))
    # Without JAX's CUDA plugin (this suite's venv), or a target it cannot read: the field and the
    # extra.
    unreadable = dataclasses.replace(
        targets.parse_target("h100:2"), gpu_target_text="not a target {"
    )
    missing = r"config.plan.target='h100:2': no GPU compiler .*pip install -e '\.\[plan-gpu\]'"
    with pytest.raises(targets.PlanTargetError, match=missing):
        targets.devices(unreadable)


def test_tpu_targets_name_a_missing_compiler_and_an_unknown_chip():
    v5e = targets.parse_target("v5e:2x4")
    assert (v5e.kind, v5e.name, v5e.compiler) == ("tpu", "v5e:2x4", "XLA:TPU")
    assert targets.usable_memory(v5e, []) == (16.0, "HBM of a v5e chip")
    assert targets.usable_memory(targets.parse_target("v5p:2x2x1"), [])[0] == 95.0
    with pytest.raises(
        targets.PlanTargetError,
        match=r"a v9x chip is not known here; give it as "
        r"config.plan.memory_gib",
    ):
        targets.usable_memory(targets.parse_target("v9x:2x2"), [])
    assert targets.usable_memory(targets.parse_target("v9x:2x2"), [], memory_gib=48.0)[0] == 48.0
    # Without libtpu (this suite's venv), or with a slice libtpu does not know: the field and the
    # extra.
    missing = r"config.plan.target='v0:9x9': no TPU compiler .*pip install -e '\.\[plan-tpu\]'"
    with pytest.raises(targets.PlanTargetError, match=missing):
        targets.devices(targets.parse_target("v0:9x9"))


@pytest.mark.heavy
def test_plan_counts_what_xla_counts_as_the_step_arguments(tmp_path):
    out = _plan(tmp_path, devices=2, fsdp=2, batch=4, compile=True)
    xla = out["xla"]["buffers"]
    # XLA's arguments per device: the state and teacher as planned, plus this device's rows of the
    # batch (latents and text states) and the replicated empty-prompt text states; a few bytes of
    # scalars aside.
    side = 64 // 8
    batch_bytes = 4 // 2 * (side * side * 4 + TEXT_TOKENS * TEXT_DIM) * 4
    null_cond_bytes = TEXT_TOKENS * TEXT_DIM * 4
    assert out["gib_per_device"]["inputs"] * GIB == batch_bytes + null_cond_bytes
    planned = out["gib_per_device"]["state_total"] * GIB + batch_bytes + null_cond_bytes
    assert xla["arguments"] * GIB == pytest.approx(planned, abs=64)
    assert xla["temporaries"] > 0 and out["fits"] is True
    assert out["gib_per_device"]["total"] == pytest.approx(
        xla["arguments"] + xla["outputs_not_aliased"] + xla["temporaries"]
    )
    assert out["collectives"].get("all-gather", 0) > 0  # FSDP's parameter gathers, at least


def test_plan_mode_runs_from_main_on_the_embedded_default(tmp_path):
    """main.run's --mode=plan on the tiny default, the state alone (seconds): the record written
    where it is asked, and nothing else."""
    config = scflow_testlib.make_config(num_devices=2)
    config.plan.update(dict(compile=False, target="cpu:2", output=str(tmp_path / "state.json")))
    assert main.run(config, str(tmp_path / "wd"), "plan") == 0
    with open(tmp_path / "state.json") as f:
        out = json.load(f)
    assert (out["program"], out["data"], out["devices"]) == ("distill_step", "digits", 2)
    assert out["gib_per_device"]["state_total"] > 0 and out["fits"] is None
    assert not os.path.exists(tmp_path / "wd")  # a plan writes nothing else


@pytest.mark.heavy
def test_plan_mode_on_the_embedded_default_compiles_for_cpu_devices(tmp_path):
    """The CLI end to end: in a process of its own the plan sets JAX's CPU device count before JAX
    starts (the session's 8 become the 2 asked for), compiles the tiny default's step and writes its
    record where it is asked to."""
    output = tmp_path / "out" / "plan.json"
    done = subprocess.run(
        scflow_testlib.cli_command(
            str(tmp_path / "wd"),
            "plan",
            "--config=configs/default.py:tiny",
            "--config.plan.target=cpu:2",
            "--config.mesh.fsdp=2",
            "--config.mesh.data=1",
            f"--config.plan.output={output}",
        ),
        cwd=REPO,
        env=scflow_testlib.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output) as f:
        out = json.load(f)
    assert (out["program"], out["data"], out["devices"], out["mesh"]) == (
        "distill_step",
        "digits",
        2,
        {"data": 1, "fsdp": 2},
    )
    xla = out["xla"]["buffers"]
    assert xla["temporaries"] > 0 and out["fits"] is True and out["compiler"] == "XLA:CPU"
    assert xla["arguments"] >= out["gib_per_device"]["state_total"]
    assert out["gib_per_device"]["total"] == pytest.approx(
        xla["arguments"] + xla["outputs_not_aliased"] + xla["temporaries"]
    )
    assert "fits" in done.stdout and "temporaries (XLA:CPU)" in done.stdout
