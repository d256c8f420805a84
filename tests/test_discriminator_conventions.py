"""Each discriminator family as the authors have it (SCFLOW_SPEC.md sections 3-5): which output the
GAN losses take, the text-to-image head's shapes, the time of D's noised inputs, integer timesteps,
and D's health metrics."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recipes_testlib
from scflow_jax import distill, flows
from scflow_jax.default_config import get_config
from scflow_jax.losses import adversarial, scflow
from scflow_jax.models import unet_sd
from scflow_jax.models.discriminators import StyleGANDiscriminator
from scflow_jax.models.unet_discriminator import UNetDiscriminator
from scflow_jax.tasks import build_task


def _softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


# -------------------------------------------------------------------------------- integer timesteps
def test_timestep_index_is_exact_for_every_k_over_1000():
    k = np.arange(1001)
    made = {
        "k/1000 (correctly rounded)": k.astype(np.float32) / np.float32(1000),
        "k*0.001": k.astype(np.float32) * np.float32(0.001),
        "k/1000 under jit": np.asarray(jax.jit(lambda i: i.astype(jnp.float32) / 1000.0)(k)),
    }
    assert (
        np.floor(made["k/1000 (correctly rounded)"] * np.float32(1000)) != k
    ).any()  # the plain floor's miss
    for how, t in made.items():
        for mode, fn in (("eager", flows.timestep_index), ("jit", jax.jit(flows.timestep_index))):
            got = np.asarray(fn(t))
            assert (got == k).all(), (how, mode, k[got != k])
            # The network time k/1000 maps back to k (floored times are fixed points).
            assert (np.asarray(fn(flows.floor_to_timestep(t))) == k).all(), (how, mode)
    # Times between timesteps still floor: 0.2509 is in timestep 250, 0.9999 in 999.
    assert np.asarray(flows.timestep_index(np.float32([0.2509, 0.9999, 0.0004]))).tolist() == [
        250,
        999,
        0,
    ]


# ------------------------------------------------------------------------------- sigmoid per family
def test_family_conventions():
    assert StyleGANDiscriminator.OUTPUT_SIGMOID is False
    assert UNetDiscriminator.OUTPUT_SIGMOID is True


def _disc_loss_takes(nets, disc_params, real, fake, cond, t_minus, cfg):
    """Which output the built networks' D loss takes: 'logit' or 'sigmoid' (the other one must not
    match)."""
    _, aux = scflow.discriminator_objective(
        disc_params, real, fake, cond, t_minus, jax.random.key(0), nets=nets, cfg=cfg
    )
    disc = scflow.discriminator_at(nets, t_minus, cfg)
    if cfg.disc_noise_inputs:
        eps = jax.random.normal(jax.random.key(0), real.shape, real.dtype)
        s = scflow.network_time(t_minus, cfg)
        real, fake = (scflow.noised_for_discriminator(x, s, eps) for x in (real, fake))
    lr, lf = np.asarray(disc(disc_params, real, cond)), np.asarray(disc(disc_params, fake, cond))
    as_logit = np.mean(_softplus(-lr)) + np.mean(_softplus(lf))
    as_sigmoid = np.mean(_softplus(-1 / (1 + np.exp(-lr)))) + np.mean(
        _softplus(1 / (1 + np.exp(-lf)))
    )
    assert abs(as_logit - as_sigmoid) > 1e-3  # the two readings are told apart
    got = float(aux["loss_disc"])
    return (
        "logit"
        if abs(got - as_logit) < 1e-5 * max(1.0, abs(as_logit))
        else (
            "sigmoid"
            if abs(got - as_sigmoid) < 1e-5 * max(1.0, abs(as_sigmoid))
            else f"neither: {got}"
        )
    )


def test_embedded_default_latent_d_takes_raw_logits():
    config = (
        get_config()
    )  # the shipped default (the task only depends on its data/model/disc groups)
    assert config.scflow.sigmoid_head is None
    task = build_task(get_config("tiny"))
    nets = distill.networks(task, sigmoid_head=config.scflow.sigmoid_head)
    assert nets.sigmoid_head is False
    rng = np.random.default_rng(0)
    real, fake = (
        jnp.asarray(rng.standard_normal((4,) + task.image_shape), jnp.float32) * 2 for _ in range(2)
    )
    cond = jnp.asarray(task.conditions(np.arange(4)))
    params = jax.jit(task.init_disc_params)(jax.random.PRNGKey(1))
    assert (
        _disc_loss_takes(nets, params, real, fake, cond, jnp.full((4,), 0.5), config.scflow)
        == "logit"
    )


@pytest.mark.parametrize("recipe,expected", [("celebahq256", "logit"), ("t2i_sd15", "sigmoid")])
def test_recipe_d_losses_follow_the_family(tmp_path, recipe, expected):
    shipped = recipes_testlib.load_config(recipe, None)
    assert shipped.scflow.sigmoid_head is None
    config = getattr(
        recipes_testlib, {"celebahq256": "celeba_config", "t2i_sd15": "t2i_config"}[recipe]
    )(tmp_path)
    with config.unlocked():
        config.scflow = shipped.scflow  # the shipped recipe's SCFlow settings on tiny networks
    task = build_task(config)
    nets = distill.networks(task, sigmoid_head=config.scflow.sigmoid_head)
    assert nets.sigmoid_head is (expected == "sigmoid")
    teacher = task.load_teacher_params()
    params = jax.jit(task.init_disc_params)(jax.random.PRNGKey(1), teacher)
    rng = np.random.default_rng(0)
    real, fake = (
        jnp.asarray(rng.standard_normal((4,) + task.latent_shape), jnp.float32) * 3
        for _ in range(2)
    )
    cond = (
        None if task.unconditional else jnp.asarray(task.encode_prompts(["a cat", "the dog"] * 2))
    )
    t_minus = jnp.asarray([0.1005, 0.3, 0.6, 0.9], jnp.float32)
    assert _disc_loss_takes(nets, params, real, fake, cond, t_minus, config.scflow) == expected


def test_sigmoid_head_against_the_convention_is_logged(caplog):
    caplog.set_level(logging.WARNING)
    d = StyleGANDiscriminator(resolution=8, in_channels=1)
    assert adversarial.sigmoid_head_for(d, None) is False and not caplog.records
    assert adversarial.sigmoid_head_for(d, False) is False and not caplog.records
    assert adversarial.sigmoid_head_for(d, True) is True
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "config.scflow.sigmoid_head=True" in message and "StyleGANDiscriminator" in message


# ------------------------------------------------------------------------------- text-to-image head
def test_t2i_head_shapes_on_the_sd15_layout():
    d = UNetDiscriminator(
        unet_sd.UNetSDConfig(), head_channels=256, head_groups=32
    )  # SD 1.5 defaults
    x, t, cond = jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768))
    mid = jax.eval_shape(
        lambda: unet_sd.UNet2DConditionModel(d.unet_config).init_with_output(
            jax.random.PRNGKey(0), x, t, cond, method=unet_sd.UNet2DConditionModel.encode
        )[0]
    )
    assert mid.shape == (1, 8, 8, 1280)
    params = jax.eval_shape(d.init, jax.random.PRNGKey(0), x, t, cond)["params"]
    assert set(params) == {"unet", "head_down", "head_norm", "head_out"}
    assert params["head_down"]["kernel"].shape == (4, 4, 1280, 256)  # 8x8 -> 3x3 without padding
    assert params["head_norm"]["scale"].shape == (256,)
    assert params["head_out"]["kernel"].shape == (2304, 1)  # 3 * 3 * 256 -> 1
    assert jax.eval_shape(d.apply, {"params": params}, x, t, cond).shape == (1,)


def test_t2i_head_on_too_small_a_mid_feature_names_the_latent_size():
    config = unet_sd.UNetSDConfig(
        sample_size=8,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
    )
    d = UNetDiscriminator(config, head_channels=8, head_groups=4)
    with pytest.raises(
        ValueError, match=r"latents of 8x8 give 2x2.*at least 16x16.*config.data.image_size"
    ):
        jax.eval_shape(
            d.init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, 8, 8, 4)),
            jnp.zeros((1,)),
            jnp.zeros((1, 3, 8)),
        )


# ---------------------------------------------------------- D's noised input at the time it is told
def test_d_noise_level_equals_the_time_it_is_told(tiny_config):
    cfg = tiny_config.scflow
    cfg.update(dict(disc_noise_inputs=True, integer_timesteps=True, r1_gamma=0.0))
    seen = []

    def disc_fn(params, x, cond, t):
        seen.append((x, t))
        return jnp.sum(x.reshape(x.shape[0], -1), -1) * params

    nets = scflow.SCFlowNetworks(
        velocity_fn=None, teacher_velocity_fn=None, disc_fn=disc_fn, disc_takes_time=True
    )
    shape = (3, 4, 4, 2)
    t_minus = jnp.asarray([0.2519, 0.5, 0.0991], jnp.float32)  # floored: 0.251, 0.5, 0.099
    zeros, key = jnp.zeros(shape), jax.random.key(7)
    scflow.discriminator_objective(
        jnp.float32(1.0), zeros, zeros, None, t_minus, key, nets=nets, cfg=cfg
    )
    scflow.generator_adversarial_loss(
        zeros, jnp.float32(1.0), None, t_minus, key, nets=nets, cfg=cfg
    )
    eps = np.asarray(jax.random.normal(key, shape))
    told = np.asarray(flows.floor_to_timestep(t_minus))
    np.testing.assert_allclose(told, [0.251, 0.5, 0.099], atol=1e-7)
    assert len(seen) == 3  # real and fake in the D step, the one-step sample in the G step
    for x, t in seen:
        np.testing.assert_allclose(
            np.asarray(t), told, rtol=1e-6
        )  # (the task scales it for the UNet)
        # x = s * eps + (1 - s) * 0: its noise level is exactly the time D is given.
        np.testing.assert_allclose(
            np.asarray(x), told[:, None, None, None] * eps, rtol=1e-5, atol=1e-7
        )


# --------------------------------------------------------------------------------------- D's health
def test_health_metrics():
    real = jnp.asarray([2.0, 1.0, -1.0, 3.0])
    fake = jnp.asarray([-2.0, 0.5, -0.5, -1.0])
    h = {k: float(v) for k, v in adversarial.health(real, fake).items()}
    assert h["d_real"] == pytest.approx(1.25) and h["d_fake"] == pytest.approx(-0.75)
    assert h["d_gap"] == pytest.approx(2.0)
    assert h["d_accuracy"] == pytest.approx(0.5 * (3 / 4 + 3 / 4))
    chance = adversarial.health(jnp.zeros(8) + 0.1, jnp.zeros(8) + 0.1)
    assert float(chance["d_gap"]) == 0.0 and float(chance["d_accuracy"]) == 0.5


# ----------------------------------------------------------------------------------------- warm-ups
@pytest.mark.parametrize("field", ["warmup_rf", "warmup_gan", "warmup_inv"])
@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_warmups_name_the_field(tiny_config, field, value):
    cfg = tiny_config.scflow
    with cfg.ignore_type():
        cfg[field] = value
    with pytest.raises(ValueError, match=f"config.scflow.{field}="):
        distill.validate_scflow_config(cfg)
