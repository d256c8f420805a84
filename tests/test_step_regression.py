"""Guards the loss values of one SCFlow iteration on a fixed seed (issue 8: speed work must keep the
losses bit-for-bit or within float32 tolerance). The step is benchmarks/distill_step.py's issue-8
work (every term on, R1, the StyleGAN D's raw logit in the GAN losses) at a tiny size, with every
layer perturbed away from zero so each term depends on every layer. The expected values were
recorded from this code on jax 0.10.2 (CPU). Reordering float32 sums moves them by up to ~1.5e-5
relative (measured: channel sums computed as dots against plain sums), so the tolerance is 5e-5; a
change that moves any value further changed the computation."""

import os
import sys

import jax
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import distill_step  # noqa: E402

from scflow_jax import sharding  # noqa: E402

EXPECTED = {  # metric@iteration (0: first step from the initial state, 1: the next)
    "d_accuracy@0": 0.5,
    "d_fake@0": -0.378233016,
    "d_gap@0": 0.0968436599,
    "d_real@0": -0.281389356,
    "disc_grad_norm@0": 0.351962864,
    "grad_norm@0": 0.211684525,
    "loss@0": 0.396499008,
    "loss_con@0": 0.306010097,
    "loss_disc@0": 1.37163949,
    "loss_gan@0": 0.903479934,
    "loss_inv@0": 0.000727557344,
    "loss_rf@0": 0.000681431498,
    "r1@0": 0.0281062592,
    "d_accuracy@1": 0.5,
    "d_fake@1": -0.264680982,
    "d_gap@1": -0.0118332803,
    "d_real@1": -0.276514262,
    "disc_grad_norm@1": 0.326768517,
    "grad_norm@1": 0.175512269,
    "loss@1": 0.252398551,
    "loss_con@1": 0.168514743,
    "loss_disc@1": 1.41560364,
    "loss_gan@1": 0.836842656,
    "loss_inv@1": 0.00129477517,
    "loss_rf@1": 0.000700460398,
    "r1@1": 0.0280717146,
}


def test_one_iteration_keeps_its_loss_values():
    b = distill_step.build(
        False, sharding.make_mesh(1, 1), setup=distill_step.tiny_setup(), perturb=0.05
    )
    state, metrics = b["step"](b["state"], b["batch"], b["frozen"])
    _, metrics2 = b["step"](state, b["batch"], b["frozen"])
    got = {
        f"{k}@{i}": float(v)
        for i, m in enumerate((metrics, metrics2))
        for k, v in jax.device_get(m).items()
    }
    assert set(got) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert got[name] == pytest.approx(value, rel=5e-5, abs=1e-8), name
