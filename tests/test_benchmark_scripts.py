"""The accelerator benchmark (benchmarks/t2i_speed.py) runs end to end on tiny networks, so the script that
measures on a lent GPU is known to work before the GPU time is spent. Heavy: about two minutes of compiling.
The CPU profile (benchmarks/profile_step.py) reads XLA's programs and traces right, and the in-process A/B
(benchmarks/ab_speed.py) builds a commit's code beside the working tree's. The PyTorch program of the issue-8 work
(benchmarks/torch_step.py) builds the same networks as ours, versus_torch.py pairs the two right, and
passes_versus_torch.py times each network pass in both. The remat probe
(benchmarks/remat_probe.py) compiles gradients with and without remat; the attention check
(benchmarks/attention_check.py) catches a device attention that differs from XLA's."""
import collections
import json
import math
import os
import subprocess
import sys
import types

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import ab_speed  # noqa: E402
import common  # noqa: E402
import allocators  # noqa: E402
import conv_forms  # noqa: E402
import profile_step  # noqa: E402
import remat_probe  # noqa: E402
import t2i_speed  # noqa: E402
import versus_torch  # noqa: E402

from scflow_jax import train_state  # noqa: E402
from scflow_jax.models.unet_adm import ADMUNet  # noqa: E402
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


def test_remat_probe_compiles_both_forms_and_the_remat_unet_recomputes():
    out = remat_probe.probe(sd15=False)
    # 64 forward matmuls; backward, each one's weight gradient and all but the first one's input gradient.
    assert out["chain"]["without_remat"]["dots"] == 3 * 64 - 1
    unet = out["sd_unet"]
    # The remat UNet's blocks are recomputed in the backward pass: more convolutions in the compiled program.
    assert unet["with_remat"]["convolutions"] > unet["without_remat"]["convolutions"] > 0
    for case in ("chain", "sd_unet"):
        figures = out[case]
        assert figures["without_remat"]["temp_mib"] > 0
        assert figures["temp_ratio_with_over_without"] == pytest.approx(
            figures["with_remat"]["temp_mib"] / figures["without_remat"]["temp_mib"])
        # jaxlib 0.10.2's XLA:CPU (Python 3.11's) gives remat programs the same temporaries as plain ones;
        # from 0.11.2 on, the checkpointed blocks must cut them (measured: 0.31 for the chain, 0.41 for the UNet).
        if _jaxlib_version() >= (0, 11, 2):
            assert figures["temp_ratio_with_over_without"] < 0.6, (case, figures)


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


def _jaxlib_version() -> tuple:
    import jaxlib
    return tuple(int(part) for part in jaxlib.__version__.split(".")[:3])


@pytest.mark.parametrize("form", sorted(set(conv_forms.FORMS) - {"native"}))
def test_conv_forms_compute_the_native_convolution_and_its_gradients(form):
    """The speed comparisons of benchmarks/conv_forms.py are between forms of the same convolution."""
    import jax
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 5), np.float32)
    w = rng.standard_normal((3, 3, 5, 6), np.float32)
    ct = rng.standard_normal((2, 8, 8, 6), np.float32)
    ref = conv_forms._fwd_bwd(conv_forms.native)(x, w, ct)
    np.testing.assert_allclose(conv_forms.FORMS[form](x, w), conv_forms.native(x, w), rtol=1e-5, atol=1e-4)
    for got, want in zip(jax.jit(conv_forms._fwd_bwd(conv_forms.FORMS[form]))(x, w, ct), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _conv(x, w, stride=1, padding="SAME", dilation=1):
    import jax
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _program_flops(fn, *args):
    """(profile_step's FLOPs over the program's operations, XLA's own count of the program)."""
    import jax
    lowered = jax.jit(fn).lower(*args)
    operations = profile_step.parse_hlo(lowered.compile().as_text())
    cost = lowered.cost_analysis()
    return sum(op.flops for op in operations.values()), (cost if isinstance(cost, dict) else cost[0])["flops"]


@pytest.mark.parametrize("case", ["same", "strided", "dilated_valid", "gradients", "strided_gradients", "matmul"])
def test_profile_counts_convolution_and_matmul_flops_as_xla_does(case):
    """Padding taps, strides, dilations and the transposed convolutions of gradients (whose inputs are
    dilated) all change what a convolution costs; the profile's rates need XLA's own count."""
    import jax
    import jax.numpy as jnp
    x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5))
    grads = lambda stride: lambda x, w: jax.grad(lambda x, w: _conv(x, w, stride).sum(), (0, 1))(x, w)  # noqa: E731
    fn, args = {"same": (_conv, (x, w)),
                "strided": (lambda x, w: _conv(x, w, 2), (x, w)),
                "dilated_valid": (lambda x, w: _conv(x, w, 1, "VALID", 2), (x, w)),
                "gradients": (grads(1), (x, w)),
                "strided_gradients": (grads(2), (x, w)),
                "matmul": (lambda a, b: jnp.tanh(a @ b), (jnp.ones((6, 4)), jnp.ones((4, 7))))}[case]
    ours, xla = _program_flops(fn, *args)
    assert ours > 0 and ours == pytest.approx(xla, rel=1e-6)


def test_profile_sorts_operations_by_the_work_they_do():
    import jax
    import jax.numpy as jnp
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))

    def program(x, w):
        y = _conv(x, w)
        # The reshape ends the exp fusion in a bitcast: a view, so that fusion is still elementwise.
        return jnp.transpose(y, (3, 0, 1, 2)) * 2.0, jnp.sum(y, axis=(0, 1, 2)), (jnp.exp(x) + 1.0).reshape(2, -1)

    operations = profile_step.parse_hlo(jax.jit(program).lower(x, w).compile().as_text())
    kinds = collections.Counter(op.category for op in operations.values())
    assert kinds["convolution"] == 1 and kinds["reduction"] >= 1 and kinds["layout"] >= 1
    exp_fusion = [op.category for op in operations.values() if op.source.endswith("/add")]
    assert exp_fusion and set(exp_fusion) == {"elementwise"}
    conv = next(op for op in operations.values() if op.category == "convolution")
    assert conv.flops == 2 * 2 * 8 * 8 * 4 * 4 * 9 - 2 * 2 * 4 * 4 * (4 * 8 * 3 - 4)  # border taps skipped
    assert "conv_general_dilated" in conv.source


@pytest.mark.parametrize("source, expected", [
    ("jit(step_fn)/ADMUNet/output_blocks_3_2/conv/conv_general_dilated", ("ADMUNet", "forward")),
    ("jit(step_fn)/transpose(jvp(ADMUNet))/output_blocks_3_2/conv", ("ADMUNet", "backward")),
    ("jit(step_fn)/jvp(transpose(jvp(StyleGANDiscriminator)))/b16/conv1", ("StyleGANDiscriminator", "backward")),
    ("jit(sample)/while/body/closed_call/ADMUNet/input_blocks_1_0/jit(silu)/mul", ("ADMUNet", "forward")),
    ("jit(step_fn)/transpose(jvp(jit(pseudo_huber)))/sub", ("other", "backward")),
    ("jit(step_fn)/jit(_uniform)/while", ("other", "forward")),
    ("", ("unattributed", "forward")),
])
def test_profile_attributes_operations_to_networks_and_passes(source, expected):
    assert profile_step.network_and_pass(source) == expected


def test_profile_summary_is_per_call_and_ignores_other_programs():
    ops = {"conv.1": profile_step.Operation("convolution", 4e9, "net/conv"),
           "fusion.2": profile_step.Operation("layout", 0.0, "net/transpose"),
           "fusion.3": profile_step.Operation("elementwise", 0.0, "net/silu")}
    times = collections.Counter({"conv.1": 40e6, "fusion.2": 8e6, "fusion.3": 2e6, "other_program.7": 99e6})
    ops["fusion.4"] = profile_step.Operation("layout", 0.0, "net/pad")
    times["fusion.4"] = 4e6
    out = profile_step.summarize(times, ops, calls=2, top=1)
    cats = out["categories"]
    assert out["core_ms_total"] == pytest.approx(27.0)
    assert cats["convolution"]["core_ms"] == pytest.approx(20.0)
    assert cats["convolution"]["share"] == pytest.approx(20 / 27)
    assert cats["convolution"]["gflop_s_per_core"] == pytest.approx(4.0 / 0.020)  # 4 GFLOP per call in 20 ms
    assert cats["matmul"]["core_ms"] == 0 and "gflop_s_per_core" not in cats["matmul"]
    assert cats["layout"]["core_ms"] == pytest.approx(6.0) and cats["layout"]["ops"] == 2
    assert [op["name"] for op in cats["layout"]["top_ops"]] == ["fusion.2"]  # the heavier of the two
    assert cats["layout"]["top_ops"][0]["source"] == "net/transpose"
    assert out["networks_core_ms"] == {"other": {"forward": pytest.approx(27.0), "backward": 0.0}}


def test_profile_names_the_folder_without_a_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        profile_step.operation_times(str(tmp_path))


@pytest.mark.heavy
def test_profile_script_runs_on_one_core_and_accounts_for_the_iteration():
    """On one core every operation runs to completion on the traced thread: the durations fit inside the
    measured wall time, and the convolutions' and matmuls' FLOPs are a part of XLA's count of the program."""
    script = os.path.join(os.path.dirname(profile_step.__file__), "profile_step.py")
    done = subprocess.run([sys.executable, script, "--tiny", "--no-record", "--calls=1"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cores"] == 1 and out["config"] == "tiny"
    for name in ("iteration", "sample_1step_64"):
        entry = out[name]
        assert 0.3 * entry["traced_wall_ms"] < entry["core_ms_total"] <= entry["traced_wall_ms"]
        assert sum(c["share"] for c in entry["categories"].values()) == pytest.approx(1.0)
        heavy = entry["categories"]["convolution"]["gflop"] + entry["categories"]["matmul"]["gflop"]
        assert 0.5 * entry["xla_gflop"] < heavy <= entry["xla_gflop"] * 1.001
        assert all(op["core_ms"] > 0 for c in entry["categories"].values() for op in c["top_ops"])
        assert entry["categories"]["convolution"]["top_ops"]


def test_ab_speed_names_a_base_that_is_not_a_commit():
    with pytest.raises(SystemExit, match="--base 'no-such-commit' is not a commit"):
        ab_speed.main(["--base", "no-such-commit", "--tiny", "--no-record"])


@pytest.mark.heavy
def test_ab_speed_builds_a_commit_beside_the_working_tree():
    """Against HEAD both versions are the same code: the same first-iteration metrics, bit for bit (when the
    tree has no uncommitted change to the package, as on CI's clean checkout)."""
    script = os.path.join(os.path.dirname(ab_speed.__file__), "ab_speed.py")
    done = subprocess.run([sys.executable, script, "--base", "HEAD", "--tiny", "--rounds=1", "--no-record"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["base"] == ab_speed.git("rev-parse", "HEAD") and out["head"].startswith(out["base"])
    metrics = out["first_iteration_metrics"]
    assert set(metrics["base"]) == set(metrics["head"]) and {"loss", "loss_disc", "r1"} <= set(metrics["head"])
    assert all(math.isfinite(v) for m in metrics.values() for v in m.values())
    if not out["head"].endswith("+uncommitted"):
        assert metrics["base"] == metrics["head"]
    for kind, calls in (("iteration", 1), ("sample_1step_64", 2)):
        for version in ("base", "head"):
            assert out[kind][version]["calls"] == calls and out[kind][version]["min_s"] > 0


def test_allocators_name_an_unknown_or_missing_allocator(monkeypatch):
    assert allocators.preload_for("glibc") == ""
    with pytest.raises(SystemExit, match="unknown allocator 'mimalloc'"):
        allocators.main(["--allocators", "glibc,mimalloc", "--no-record"])
    monkeypatch.setattr(allocators.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(SystemExit, match="tcmalloc asked for, but libtcmalloc_minimal.so is not installed"):
        allocators.main(["--allocators", "tcmalloc", "--no-record"])
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        allocators.main(["--allocators", "glibc", "--rounds", "0", "--no-record"])
    with pytest.raises(SystemExit, match="--allocators names no allocator"):
        allocators.main(["--allocators", " , ", "--no-record"])


def test_allocators_report_a_failed_distill_step_process_with_its_error():
    with pytest.raises(SystemExit, match=r"(?s)distill_step.py failed with LD_PRELOAD='' \(exit 2\).*--no-such-flag"):
        allocators.main(["--allocators", "glibc", "--rounds", "1", "--no-record", "--", "--no-such-flag"])


def test_allocators_rotate_the_order_and_take_medians(monkeypatch):
    monkeypatch.setattr(allocators, "preload_for", lambda name: f"lib{name}.so")
    calls = []

    def fake_run(preload, flags):
        calls.append(preload)
        return {"iteration": float(len(calls)), "kernel_s": 1.0}
    monkeypatch.setattr(allocators, "run_once", fake_run)
    out = allocators.main(["--allocators", "a,b,c", "--rounds", "4", "--no-record", "--", "--tiny"])
    assert calls == ["liba.so", "libb.so", "libc.so", "libb.so", "libc.so", "liba.so",
                     "libc.so", "liba.so", "libb.so", "liba.so", "libb.so", "libc.so"]
    assert out["config"] == "tiny" and out["distill_step_flags"] == ["--tiny"]
    assert [run["iteration"] for run in out["runs"]["a"]] == [1.0, 6.0, 8.0, 10.0]
    assert out["median_over_rounds"]["a"] == {"iteration": 7.0, "kernel_s": 1.0}


@pytest.mark.heavy
def test_allocators_run_distill_step_and_read_the_process_usage(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    out = allocators.main(["--rounds", "1", "--allocators", "glibc", "--no-record",
                           "--", "--tiny", "--repeats", "1", "--warmup", "0"])
    (run,) = out["runs"]["glibc"]
    assert out["median_over_rounds"]["glibc"] == run and out["preload"] == {"glibc": ""}
    for figure in ("iteration", "sample_1step_64", "sample_4step_64", "matmul_gflop_s", "user_s"):
        assert run[figure] > 0, figure
    # Compiling and running a program at all faults in thousands of pages and takes kernel time.
    assert run["minor_page_faults"] > 1000 and run["kernel_s"] > 0
    assert run["process_wall_s"] > run["iteration"]


def test_torch_step_builds_our_networks_and_times_every_figure():
    pytest.importorskip("torch")
    import distill_step
    import torch_step

    out = torch_step.main(["--tiny", "--no-record", "--repeats", "2", "--warmup", "1"])
    unet_config, disc, latent_shape, batch_size, _ = distill_step.tiny_setup()
    x = jax.numpy.zeros((2,) + latent_shape)
    unet_shapes = jax.eval_shape(lambda: ADMUNet(unet_config).init(jax.random.key(0), x, jax.numpy.zeros((2,))))
    disc_shapes = jax.eval_shape(lambda: disc.init(jax.random.key(0), x))
    assert out["unet_params"] == train_state.count_params(unet_shapes) > 0
    assert out["disc_params"] == train_state.count_params(disc_shapes) > 0
    assert out["batch_size"] == batch_size and out["latent_shape"] == list(latent_shape)
    for figure in ("iteration", "sample_1step_64", "sample_4step_64", "matmul_f32"):
        assert out[figure]["min_s"] > 0 and out[figure]["median_s"] >= out[figure]["min_s"], figure
    # Every term of the objective was computed: R1 and the GAN terms need D's double and single backward.
    losses = out["last_losses"]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["r1"] > 0 and losses["loss_gan"] > 0 and losses["loss_disc"] > 0 and losses["loss_con"] > 0
    expected = (losses["loss_con"] + 0.1 * (losses["loss_inv"] + losses["loss_rf"] + losses["loss_gan"]))
    assert losses["loss"] == pytest.approx(expected, rel=1e-5)
    # Convolutions and matmuls of the iteration, forward and backward: several network evaluations' worth.
    assert out["step_gflop"] > 5 * out["network_eval_64_gflop"] * batch_size / 64 > 0


def _fake_contender_runs(monkeypatch, params=(100, 10)):
    calls = []

    def fake_run(name, flags):
        calls.append(name)
        seconds = 2.0 if name == "torch" else 1.0 + len(calls) / 10  # scflow_jax slower in each later round
        unet, disc = params if name == "torch" else (100, 10)
        return {"iteration": seconds, "sample_1step_64": seconds / 10, "sample_4step_64": seconds / 2,
                "unet_params": unet, "disc_params": disc, "kernel_s": 1.0, "flags": flags}
    monkeypatch.setattr(versus_torch, "run_once", fake_run)
    return calls


def test_versus_torch_alternates_the_order_and_takes_the_ratios(monkeypatch):
    calls = _fake_contender_runs(monkeypatch)
    out = versus_torch.main(["--rounds", "3", "--tiny", "--repeats", "5", "--no-record"])
    assert calls == ["scflow_jax", "torch", "torch", "scflow_jax", "scflow_jax", "torch"]
    assert out["config"] == "tiny" and out["runs"]["torch"][0]["flags"] == ["--repeats", "5", "--tiny"]
    # scflow_jax's iterations took 1.1, 1.4 and 1.5 s against torch's 2.0: ratios torch / scflow_jax.
    speedup = out["speedup_of_scflow_jax"]["iteration"]
    assert speedup["per_round"] == pytest.approx([2 / 1.1, 2 / 1.4, 2 / 1.5])
    assert speedup["median"] == pytest.approx(2 / 1.4)
    assert out["median_over_rounds"]["scflow_jax"]["iteration"] == pytest.approx(1.4)
    assert "flags" not in out["median_over_rounds"]["torch"]  # only numbers are summarised


def test_versus_torch_refuses_different_networks_and_bad_rounds(monkeypatch):
    _fake_contender_runs(monkeypatch, params=(100, 11))
    with pytest.raises(SystemExit, match="do not build the same networks: parameter counts 100/10 .*100/11"):
        versus_torch.main(["--rounds", "1", "--no-record"])
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        versus_torch.main(["--rounds", "0", "--no-record"])


def test_passes_versus_torch_times_every_pass_in_both_frameworks():
    pytest.importorskip("torch")
    import passes_versus_torch

    out = passes_versus_torch.main(["--tiny", "--repeats", "1", "--no-record"])
    assert list(out["parts"]) == ["unet_forward", "unet_gradient", "disc_r1_step", "disc_input_gradient"]
    assert out["unet_batch"] == 2 * out["disc_batch"] > 0
    for part, timings in out["parts"].items():
        assert timings["scflow_jax"]["min_s"] > 0 and timings["torch"]["min_s"] > 0, part
        assert timings["speedup_of_scflow_jax"] == pytest.approx(
            timings["torch"]["median_s"] / timings["scflow_jax"]["median_s"])
    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        passes_versus_torch.main(["--tiny", "--repeats", "0", "--no-record"])


def test_torch_step_and_passes_refuse_bad_arguments_and_other_backends(monkeypatch):
    pytest.importorskip("torch")
    import passes_versus_torch
    import torch_step

    with pytest.raises(SystemExit, match="--repeats must be >= 1 and --warmup >= 0, got 0 and 3"):
        torch_step.main(["--tiny", "--repeats", "0", "--no-record"])
    with pytest.raises(SystemExit, match="--repeats must be >= 1 and --warmup >= 0, got 2 and -1"):
        torch_step.main(["--tiny", "--repeats", "2", "--warmup", "-1", "--no-record"])
    monkeypatch.setattr(passes_versus_torch.jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit, match="compares CPU programs; the default backend is gpu"):
        passes_versus_torch.main(["--tiny", "--no-record"])


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


def test_upsample_forms_times_both_forms_and_catches_one_that_differs(monkeypatch, capsys):
    import upsample_forms
    from scflow_jax.models import upsample_conv

    out = upsample_forms.main(["--tiny", "--no_record", "--batch=2"])
    assert [(layer["input_side"], layer["channels"]) for layer in out["layers"]] == [
        layer[1:] for layer in upsample_forms.TINY_LAYERS]
    for layer in out["layers"]:
        assert max(layer["relative_difference"].values()) < 1e-5  # float32: the order of additions only
        for form in ("plain", "phases"):
            assert layer[f"{form}_fwd_ms"] > 0 and layer[f"{form}_fwd_bwd_ms"] > 0
        assert layer["plain_over_phases_fwd"] == layer["plain_fwd_ms"] / layer["phases_fwd_ms"]
    # A phase form that computes another layer is caught, by how much.
    monkeypatch.setitem(upsample_forms.FORMS, "phases", lambda x, k, b: 1.1 * upsample_conv.plain_form(x, k, b))
    with pytest.raises(SystemExit, match=r"relative difference of 0\.\d+ exceeds --tolerance=0.0001: the two forms "
                                         r"do not compute the same layer"):
        upsample_forms.main(["--tiny", "--no_record", "--batch=2"])
    with pytest.raises(SystemExit):
        upsample_forms.main(["--tiny", "--no_record", "--batch=0"])
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
