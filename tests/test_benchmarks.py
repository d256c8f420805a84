"""The benchmark scripts (benchmarks/) run on tiny networks, so a script that measures on a lent GPU
is known to work before the GPU time is spent: the SD 1.5 recipe's speed (t2i_speed.py, end to end:
heavy, about two minutes of compiling), the forward costs (forward_cost.py), the device attention
check (attention_check.py), and where every script writes its results (common.record)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import common  # noqa: E402
import forward_cost  # noqa: E402
import t2i_speed  # noqa: E402

from scflow_jax import train_state  # noqa: E402
from scflow_jax.models import unet_sd  # noqa: E402


@pytest.mark.heavy
def test_generate_part_times_unet_and_vae_decode():
    out = t2i_speed.main(
        [
            "--part=generate",
            "--tiny",
            "--no_record",
            "--batch_sizes=1,2",
            "--repeats=2",
            "--peak_tflops=1",
        ]
    )
    expected_unet = train_state.count_params(unet_sd.unet_param_shapes(t2i_speed.TINY_UNET))
    assert out["unet_params"] == expected_unet and out["image_px"] == 64
    assert [b["batch"] for b in out["batches"]] == [1, 2]
    for entry in out["batches"]:
        assert entry["median_s"] > 0
        assert entry["images_per_s"] == pytest.approx(entry["batch"] / entry["median_s"])
        # UNet + decoder of a 64 px image: well over the UNet's share alone, and the same per image
        # at any batch.
        assert entry["gflop_per_image"] > 0.01
        assert entry["mfu"] == pytest.approx(entry["achieved_tflops_per_device"] / 1.0)
    assert out["batches"][0]["gflop_per_image"] == pytest.approx(
        out["batches"][1]["gflop_per_image"], rel=0.02
    )


@pytest.mark.heavy
def test_distill_part_runs_the_recipe_step_with_every_term_on_a_mesh():
    out = t2i_speed.main(
        [
            "--part=distill",
            "--tiny",
            "--no_record",
            "--batch=8",
            "--steps=1",
            "--warmup=0",
            "--peak_tflops=1",
            "--fsdp=2",
        ]
    )
    assert out["compute_dtype"] == "bfloat16" and out["remat"] == "full"
    # The session's eight fake devices, two of them on the fsdp axis.
    assert out["mesh"] == {"data": 4, "fsdp": 2, "processes": 1} and out["devices"] == 8
    terms = out["loss_terms"]
    assert all(math.isfinite(v) for v in terms.values())
    # Warm-ups are off: the GAN, reflow and inverse terms are all live (non-zero).
    live = ("loss_con", "loss_rf", "loss_gan", "loss_inv", "loss_disc")
    assert all(abs(terms[k]) > 0 for k in live)
    # Remat recomputes forwards: the program with it does strictly more work than the model needs.
    assert out["hardware_gflop"] > out["model_gflop"] > 0
    assert out["hardware_gflop_per_device"] == pytest.approx(out["hardware_gflop"] / 8)
    # Eight fake devices share the global program's FLOPs.
    assert out["mfu"] == pytest.approx(out["model_gflop"] / 1e3 / 8 / out["step_s_median"])
    assert out["examples_per_s"] == pytest.approx(8 / out["step_s_median"])
    # The compiler's plan per device: the donated state comes back in place, and the step needs
    # scratch.
    memory = out["xla_memory_gib_per_device"]
    assert memory["arguments"] > 0 and memory["temporaries"] > 0
    assert memory["outputs_not_aliased"] < 0.01 * memory["arguments"]
    assert out["memory"]["source"] == "process peak RSS" and out["memory"]["peak_rss_bytes"] > 0


def test_peak_part_reports_the_matmul_rate_of_its_own_timing():
    out = t2i_speed.main(["--part=peak", "--tiny", "--no_record"])
    assert out["matmul_n"] == 256 and out["median_s"] > 0
    assert out["bf16_matmul_tflops"] == pytest.approx(2 * 256**3 / out["median_s"] / 1e12)


def test_t2i_speed_names_a_bad_mesh(capsys):
    with pytest.raises(SystemExit):
        t2i_speed.main(["--part=distill", "--tiny", "--no_record", "--fsdp=0"])
    assert "--fsdp=0 must be a positive size or -1" in capsys.readouterr().err


def test_forward_cost_counts_per_sample_and_times_each_network():
    one = forward_cost.main(
        ["--tiny", "--no_record", "--networks=unet,vae", "--sizes=8,16", "--repeats=1"]
    )
    two = forward_cost.main(
        ["--tiny", "--no_record", "--networks=unet,vae", "--sizes=8", "--batch=2", "--flops_only"]
    )
    unet, vae = one["unet_sd"], one["vae_decoder"]
    tiny_unet = unet_sd.unet_param_shapes(t2i_speed.TINY_UNET)
    assert unet["params"] == train_state.count_params(tiny_unet)
    assert [e["latent"] for e in unet["latents"]] == [[8, 8], [16, 16]]
    assert [e["image_px"] for e in vae["latents"]] == [64, 128]
    for entry in unet["latents"] + vae["latents"]:
        assert entry["median_s"] > 0 and entry["compile_s"] > 0
        assert entry["samples_per_s"] == pytest.approx(1 / entry["median_s"])
    # Four times the pixels, more work but at most about four times (the text and time paths do not
    # grow); per sample, the batch does not matter.
    for net in ("unet_sd", "vae_decoder"):
        small, large = (e["gflop_per_sample"] for e in one[net]["latents"])
        assert 2 < large / small < 4.3, net
        assert two[net]["latents"][0]["gflop_per_sample"] == pytest.approx(small, rel=0.02)
        assert "median_s" not in two[net]["latents"][0]  # --flops_only: nothing timed


def test_forward_cost_counts_the_fid_inception_from_shapes():
    out = forward_cost.main(
        ["--no_record", "--networks=inception", "--inception_batch=2", "--flops_only"]
    )
    # InceptionV3 at 299 px: 5.7 G multiply-adds per image.
    assert out["inception"]["gflop_per_sample"] == pytest.approx(11.0, rel=0.05)
    assert out["inception"]["params"] > 2e7 and out["inception"]["input"] == [299, 299]


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--networks=unet,clip"], "--networks: ['clip']; choose from unet, vae, inception"),
        (["--networks= , "], "--networks: none given"),
        (["--sizes=64,x"], "--sizes='64,x' must be comma-separated integers"),
        (["--sizes=0"], "--sizes=[0] must all be >= 1"),
        (["--batch=0"], "--batch=0 must be >= 1"),
        (["--repeats=0"], "--repeats=0 must be >= 1"),
    ],
)
def test_forward_cost_names_bad_flags(flags, says, capsys):
    with pytest.raises(SystemExit):
        forward_cost.parse_args(flags)
    assert says in capsys.readouterr().err


def test_attention_check_compares_the_device_attention_with_xla(monkeypatch):
    import attention_check
    from scflow_jax.models import attention

    out = attention_check.main(["--tiny", "--no_record", "--rows=2"])
    assert [(c["queries"], c["keys"]) for c in out["cases"]] == [
        case[:2] for case in attention_check.TINY_CASES
    ]
    for case in out["cases"]:  # on this CPU both sides are XLA's attention
        assert case["kernel"] == "xla_attention"
        assert set(case["relative_difference"].values()) == {0.0}
        assert case["kernel_fwd_bwd_ms"] > 0 and case["xla_fwd_bwd_ms"] > 0
    # A kernel that computes something else is caught, by how much and against what.
    monkeypatch.setattr(
        attention, "dot_product_attention", lambda q, k, v: 1.1 * attention.xla_attention(q, k, v)
    )
    with pytest.raises(
        SystemExit,
        match=r"relative difference of 0\.\d+ exceeds --tolerance=0.05: "
        r"the device's attention does not compute XLA's",
    ):
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
    files = {
        "runs/results.json": ["one"],
        "env/results.json": ["two", "four"],
        "flag.json": ["three"],
    }
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
