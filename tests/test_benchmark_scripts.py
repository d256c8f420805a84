"""The accelerator benchmark (benchmarks/t2i_speed.py) runs end to end on tiny networks, so the script that
measures on a lent GPU is known to work before the GPU time is spent. Heavy: about two minutes of compiling.
The attention check (benchmarks/attention_check.py) catches a device attention that differs from XLA's, and
every script writes its results where it is asked (common.record)."""
import json
import math
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402
import t2i_speed  # noqa: E402

from scflow_jax import train_state  # noqa: E402
from scflow_jax.models import unet_sd  # noqa: E402


@pytest.mark.heavy
def test_generate_part_times_unet_and_vae_decode():
    out = t2i_speed.main(["--part=generate", "--tiny", "--no_record", "--batch_sizes=1,2", "--repeats=2",
                          "--peak_tflops=1"])
    expected_unet = train_state.count_params(unet_sd.unet_param_shapes(t2i_speed.TINY_UNET))
    assert out["unet_params"] == expected_unet and out["image_px"] == 64
    assert [b["batch"] for b in out["batches"]] == [1, 2]
    for entry in out["batches"]:
        assert entry["median_s"] > 0 and entry["images_per_s"] == pytest.approx(entry["batch"] / entry["median_s"])
        # UNet + decoder of a 64 px image: well over the UNet's share alone, and the same per image at any batch.
        assert entry["gflop_per_image"] > 0.01
        assert entry["mfu"] == pytest.approx(entry["achieved_tflops_per_device"] / 1.0)
    assert out["batches"][0]["gflop_per_image"] == pytest.approx(out["batches"][1]["gflop_per_image"], rel=0.02)


@pytest.mark.heavy
def test_distill_part_runs_the_recipe_step_with_every_term():
    out = t2i_speed.main(["--part=distill", "--tiny", "--no_record", "--batch=8", "--steps=1", "--warmup=0",
                          "--peak_tflops=1"])
    assert out["compute_dtype"] == "bfloat16" and out["remat"] == "full"
    terms = out["loss_terms"]
    assert all(math.isfinite(v) for v in terms.values())
    # Warm-ups are off: the GAN, reflow and inverse terms are all live (non-zero).
    assert all(abs(terms[k]) > 0 for k in ("loss_con", "loss_rf", "loss_gan", "loss_inv", "loss_disc"))
    # Remat recomputes forwards: the program with it does strictly more work than the model needs.
    assert out["hardware_gflop"] > out["model_gflop"] > 0
    # Eight fake devices share the global program's FLOPs.
    assert out["mfu"] == pytest.approx(out["model_gflop"] / 1e3 / 8 / out["step_s_median"])
    # The compiler's plan per device: the donated state comes back in place, and the step needs scratch.
    memory = out["xla_memory_gib_per_device"]
    assert memory["arguments"] > 0 and memory["temporaries"] > 0
    assert memory["outputs_not_aliased"] < 0.01 * memory["arguments"]


def test_peak_part_reports_the_matmul_rate_of_its_own_timing():
    out = t2i_speed.main(["--part=peak", "--tiny", "--no_record"])
    assert out["matmul_n"] == 256 and out["median_s"] > 0
    assert out["bf16_matmul_tflops"] == pytest.approx(2 * 256 ** 3 / out["median_s"] / 1e12)


class _Compiled:
    """A compiled program's memory analysis, as XLA reports it (``None``: a backend without one)."""

    def __init__(self, analysis, text: str = ""):
        self.analysis, self.text = analysis, text

    def memory_analysis(self):
        return self.analysis

    def as_text(self):
        return self.text


def _analysis(arguments, outputs, aliased, temporaries):
    gib = 2 ** 30
    return types.SimpleNamespace(argument_size_in_bytes=int(arguments * gib), output_size_in_bytes=int(outputs * gib),
                                 alias_size_in_bytes=int(aliased * gib), temp_size_in_bytes=int(temporaries * gib))


def test_compiled_memory_gib_reads_the_buffer_assignment_and_says_when_there_is_none():
    assert common.compiled_memory_gib(_Compiled(_analysis(3, 3.5, 3, 0.25))) == {
        "arguments": 3.0, "outputs_not_aliased": 0.5, "temporaries": 0.25}
    assert common.compiled_memory_gib(_Compiled(None)) == {"note": "no memory analysis on this backend"}


def test_attention_check_compares_the_device_attention_with_xla(monkeypatch):
    import attention_check
    from scflow_jax.models import attention

    out = attention_check.main(["--tiny", "--no_record", "--rows=2"])
    assert [(c["queries"], c["keys"]) for c in out["cases"]] == list(map(tuple, (s[:2] for s in
                                                                                   attention_check.TINY_CASES)))
    for case in out["cases"]:  # on this CPU both sides are XLA's attention
        assert case["kernel"] == "xla_attention" and set(case["relative_difference"].values()) == {0.0}
        assert case["kernel_fwd_bwd_ms"] > 0 and case["xla_fwd_bwd_ms"] > 0
    # A kernel that computes something else is caught, by how much and against what.
    monkeypatch.setattr(attention, "dot_product_attention", lambda q, k, v: 1.1 * attention.xla_attention(q, k, v))
    with pytest.raises(SystemExit, match=r"relative difference of 0\.\d+ exceeds --tolerance=0.05: the device's "
                                         r"attention does not compute XLA's"):
        attention_check.main(["--tiny", "--no_record", "--rows=2"])


def test_record_writes_where_it_is_asked_with_the_date_and_machine(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "DEFAULT_RESULTS", str(tmp_path / "runs" / "results.json"))
    monkeypatch.delenv(common.RESULTS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_some_flag=1")
    common.record("one", {"figure": 1.0})
    assert json.loads(capsys.readouterr().out)["figure"] == 1.0
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path / "env" / "results.json"))
    common.record("two", {"figure": 2.0})
    common.record("three", {"figure": 3.0}, path=str(tmp_path / "flag.json"))
    common.record("printed", {"figure": 4.0}, print_only=True)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"figure": 4.0}
    common.record("four", {"figure": 5.0})
    files = {"runs/results.json": ["one"], "env/results.json": ["two", "four"],
             "flag.json": ["three"]}
    for file, names in files.items():
        with open(tmp_path / file) as f:
            entries = json.load(f)
        assert [e["benchmark"] for e in entries] == names
        for entry in entries:
            assert entry["date"].endswith("+00:00")
            machine = entry["machine"]
            assert machine["xla_flags"] == "--xla_some_flag=1"
            assert machine["jax"] and machine["jaxlib"]
    assert sorted(os.listdir(tmp_path / "env")) == ["results.json"]  # the temporary file is gone


def test_scripts_take_the_results_path_and_either_spelling_of_no_record(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    common.add_output_flags(parser)
    assert parser.parse_args(["--no-record"]).no_record
    assert parser.parse_args(["--no_record"]).no_record
    args = parser.parse_args([f"--results={tmp_path / 'r.json'}"])
    assert args.results == str(tmp_path / "r.json") and not args.no_record
    out = t2i_speed.main(["--part=peak", "--tiny", f"--results={tmp_path / 'r.json'}"])
    with open(tmp_path / "r.json") as f:
        assert json.load(f) == [out] and out["benchmark"] == "t2i_speed_peak"
