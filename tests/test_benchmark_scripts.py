"""The accelerator benchmark (benchmarks/t2i_speed.py) runs end to end on tiny networks, so the script that
measures on a lent GPU is known to work before the GPU time is spent. Heavy: about two minutes of compiling."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import conv_forms  # noqa: E402
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


def test_peak_part_reports_the_matmul_rate_of_its_own_timing():
    out = t2i_speed.main(["--part=peak", "--tiny", "--no_record"])
    assert out["matmul_n"] == 256 and out["median_s"] > 0
    assert out["bf16_matmul_tflops"] == pytest.approx(2 * 256 ** 3 / out["median_s"] / 1e12)


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
