"""Guards the loss values of one SCFlow iteration on a fixed seed (issue 8: speed work must keep the losses
bit-for-bit or within float32 tolerance). The step is benchmarks/distill_step.py's issue-8 work (every term
on, R1, StyleGAN D) at a tiny size, with every layer perturbed away from zero so each term depends on every
layer. The expected values were recorded from this code on jax 0.10.2 (CPU). Reordering float32 sums moves them
by up to ~1.5e-5 relative (measured: the CPU channel sums of models/channel_ops.py against plain sums), so the
tolerance is 5e-5; a change that moves any value further changed the computation."""
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import distill_step  # noqa: E402

from scflow_jax import sharding  # noqa: E402

EXPECTED = {  # metric@iteration (0: first step from the initial state, 1: the next)
    "d_fake@0": -0.378233135,
    "d_real@0": -0.281389296,
    "disc_grad_norm@0": 0.102766506,
    "grad_norm@0": 0.143269643,
    "loss@0": 0.357240826,
    "loss_con@0": 0.306010097,
    "loss_disc@0": 1.41875577,
    "loss_gan@0": 0.510898232,
    "loss_inv@0": 0.000727556297,
    "loss_rf@0": 0.000681431091,
    "r1@0": 0.0281062536,
    "d_fake@1": -0.273049563,
    "d_real@1": -0.284328759,
    "disc_grad_norm@1": 0.118455142,
    "grad_norm@1": 0.146396324,
    "loss@1": 0.218784913,
    "loss_con@1": 0.168511569,
    "loss_disc@1": 1.43426418,
    "loss_gan@1": 0.500740409,
    "loss_inv@1": 0.00129293464,
    "loss_rf@1": 0.000700066157,
    "r1@1": 0.0280587096,
}


def test_one_iteration_keeps_its_loss_values():
    b = distill_step.build(False, sharding.make_mesh(1, 1), setup=distill_step.tiny_setup(), perturb=0.05)
    state, metrics = b["step"](b["state"], b["batch"], b["frozen"])
    _, metrics2 = b["step"](state, b["batch"], b["frozen"])
    got = {f"{k}@{i}": float(v) for i, m in enumerate((metrics, metrics2)) for k, v in jax.device_get(m).items()}
    assert set(got) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert got[name] == pytest.approx(value, rel=5e-5, abs=1e-8), name
