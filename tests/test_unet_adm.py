"""ADM UNet (LFM teacher): converter, architecture, parity with an independent PyTorch re-statement,
LFM wrapper.

The PyTorch re-statement of guided-diffusion's UNetModel (``tests/torch_restatements.py``,
guided-diffusion's attribute names) is independent of the Flax code: it is both the key/shape
generator for the converter tests and the numerical reference (parity: max abs error <= 1e-4 in
float32).
"""

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_restatements import TorchADM

from scflow_jax import flows
from scflow_jax.models import weights
from scflow_jax.models.unet_adm import ADMConfig, ADMUNet, adm_params_from_state_dict, load_unet_adm
from scflow_jax.models.weights import WeightsError

PARITY_TOL = 1e-4  # max abs error, float32

# Tiny configurations (a few 10k parameters) covering every option of the architecture.
TINY = ADMConfig(
    in_channels=3,
    model_channels=16,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_heads=2,
    use_scale_shift_norm=True,
    num_groups=4,
)
VARIANTS = {
    "scale_shift_legacy": TINY,
    "plain_norm_new_order_head_channels": dataclasses.replace(
        TINY, use_scale_shift_norm=False, use_new_attention_order=True, num_head_channels=8
    ),
    "updown_classes_heads_upsample": dataclasses.replace(
        TINY, resblock_updown=True, num_classes=5, num_heads_upsample=4, num_res_blocks=2
    ),
    "no_conv_resample_attention_everywhere": dataclasses.replace(
        TINY, conv_resample=False, attention_resolutions=(1, 2), use_new_attention_order=True
    ),
}
SIZE = 8


def _random_torch_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = TorchADM(cfg)
    with (
        torch.no_grad()
    ):  # every parameter random, including the ones the reference zero-initialises
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 1.0 / math.sqrt(p[0].numel())))
    return model.eval()


def _save_pth(tmp_path, obj, name="model.pth"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def _inputs(cfg, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, SIZE, SIZE, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1, (batch,)).astype(np.float32)
    y = None if cfg.num_classes is None else rng.integers(0, cfg.num_classes, (batch,))
    return x, t, y


def _apply(cfg, params, x, t, y=None):
    return np.asarray(
        ADMUNet(cfg).apply(
            {"params": params},
            jnp.asarray(x),
            jnp.asarray(t),
            None if y is None else jnp.asarray(y),
        )
    )


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    """(torch model, path of its .pth with LFM's 'module.' prefix, converted params) for TINY."""
    model = _random_torch_model(TINY)
    path = _save_pth(
        tmp_path_factory.mktemp("adm"), {f"module.{k}": v for k, v in model.state_dict().items()}
    )
    return model, path, load_unet_adm(path, TINY)


# --------------------------------------------------------------------------------------------------
# Parity and conversion


@pytest.mark.parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_torch_restatement(tmp_path, variant):
    cfg = VARIANTS[variant]
    model = _random_torch_model(cfg)
    params = load_unet_adm(
        _save_pth(tmp_path, model.state_dict()), cfg
    )  # every key used, every shape matched
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        ref = (
            model(
                torch.from_numpy(t),
                torch.from_numpy(x).permute(0, 3, 1, 2),
                None if y is None else torch.from_numpy(y),
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
    out = _apply(cfg, params, x, t, y)
    assert out.shape == (3, SIZE, SIZE, cfg.out_channels) and out.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # a meaningful comparison, not two zeros
    assert np.abs(out - ref).max() <= PARITY_TOL


@pytest.mark.parametrize(
    "preset, size, count", [("lfm_celeba256", 32, 153_099_524), ("speed_benchmark", 16, 4_751_364)]
)
def test_presets_convert_from_reference_layout(preset, size, count):
    """The real configs against the re-statement's state dict, built on torch's meta device (no
    memory) and read as zero-stride arrays: every key used and every shape matched at full size."""
    cfg = getattr(ADMConfig, preset)()
    with torch.device("meta"):
        state = TorchADM(cfg).state_dict()
    assert sum(v.numel() for v in state.values()) == count
    source = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}
    params = adm_params_from_state_dict(source, cfg, what=preset)
    assert sum(a.size for a in jax.tree.leaves(params)) == count
    expected = jax.eval_shape(
        lambda: ADMUNet(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 4)), jnp.zeros((1,)))
    )["params"]
    assert jax.tree.map(lambda a: a.shape, expected) == jax.tree.map(lambda a: a.shape, params)


def test_lfm_attention_factors():
    """LFM passes "16 8" unconverted: on 32x32 latents only the 4x4 level (factor 8) and the middle
    attend."""
    with torch.device("meta"):
        keys = TorchADM(ADMConfig.lfm_celeba256()).state_dict().keys()
    attention_blocks = sorted({k.rsplit(".qkv.", 1)[0] for k in keys if ".qkv." in k})
    assert attention_blocks == [
        "input_blocks.10.1",
        "input_blocks.11.1",
        "middle_block.1",
        "output_blocks.0.1",
        "output_blocks.1.1",
        "output_blocks.2.1",
    ]


def test_nested_checkpoint_safetensors_and_prefix(tmp_path, tiny_converted):
    model, _, params = tiny_converted
    state = model.state_dict()
    content = {
        "epoch": 11,
        "global_step": 5,
        "args": argparse.Namespace(nf=16, exp="celeb256_f8_adm"),
        "model_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer": {"state": {}},
    }
    path = _save_pth(tmp_path, content, "content.pth")

    def same(a, b):
        return jax.tree.all(jax.tree.map(np.array_equal, a, b))

    assert same(load_unet_adm(path, TINY, subkey="model_dict"), params)
    with pytest.raises(
        WeightsError, match="not a plain"
    ):  # the shared reader stays strict unless told
        weights.read_torch_state_dict(path, subkey="model_dict")
    with pytest.raises(WeightsError, match="subkey"):
        load_unet_adm(path, TINY)  # top level is the training checkpoint, not a state dict
    with pytest.raises(WeightsError, match="'ema'"):
        load_unet_adm(path, TINY, subkey="ema")
    st = str(tmp_path / "model.safetensors")
    weights.write_safetensors(st, {k: v.numpy() for k, v in state.items()})
    assert same(load_unet_adm(st, TINY), params)
    with pytest.raises(WeightsError, match="subkey"):
        load_unet_adm(st, TINY, subkey="model_dict")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_missing_key_is_named(tmp_path, tiny_converted):
    state = _state(tiny_converted[0])
    del state["middle_block.1.qkv.weight"]
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): middle_block\.1\.qkv\.weight"):
        load_unet_adm(_save_pth(tmp_path, state), TINY)


def test_partial_load_keeps_the_rest(tmp_path, tiny_converted):
    state = _state(tiny_converted[0])
    del state["out.2.weight"]
    params = load_unet_adm(_save_pth(tmp_path, state), TINY, allow_partial=True)
    np.testing.assert_array_equal(params["out_0"]["scale"], tiny_converted[2]["out_0"]["scale"])
    assert not np.any(params["out_2"]["kernel"])  # the fresh init: zero_module


def test_unexpected_key_is_named(tmp_path, tiny_converted):
    state = _state(tiny_converted[0])
    state["input_blocks.1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(
        WeightsError, match=r"unexpected key\(s\): input_blocks\.1\.0\.extra\.weight"
    ):
        load_unet_adm(_save_pth(tmp_path, state), TINY)


def test_wrong_shape_is_named(tmp_path, tiny_converted):
    state = _state(tiny_converted[0])
    state["time_embed.0.weight"] = torch.zeros(64, 8)
    with pytest.raises(
        WeightsError, match=r"shape mismatch.*time_embed\.0\.weight: checkpoint \[64, 8\]"
    ):
        load_unet_adm(_save_pth(tmp_path, state), TINY)


def test_pickled_module_is_refused(tmp_path):
    path = _save_pth(tmp_path, TorchADM(TINY))
    with pytest.raises(WeightsError, match="not a plain PyTorch state dict"):
        load_unet_adm(path, TINY)


def test_module_prefix_clash_is_refused(tmp_path, tiny_converted):
    state = _state(tiny_converted[0])
    state["module.out.2.bias"] = state["out.2.bias"]
    with pytest.raises(WeightsError, match="'out.2.bias' appears both"):
        load_unet_adm(_save_pth(tmp_path, state), TINY)


# --------------------------------------------------------------------------------------------------
# Behaviour of the Flax module


def test_zero_initialised_output_then_perturbations(tiny_converted):
    x, t, _ = _inputs(TINY)
    init = ADMUNet(TINY).init(jax.random.key(0), jnp.asarray(x), jnp.asarray(t))["params"]
    assert np.all(_apply(TINY, init, x, t) == 0.0)  # zero_module on out.2
    assert not np.any(init["middle_block_1"]["proj_out"]["kernel"])
    assert not np.any(init["input_blocks_1_0"]["out_layers_3"]["kernel"])
    params = tiny_converted[2]
    base = _apply(TINY, params, x, t)
    bumped = jax.tree.map(lambda a: a, params)
    bumped["middle_block_1"]["qkv"]["kernel"] = params["middle_block_1"]["qkv"]["kernel"] + 0.5
    assert np.abs(_apply(TINY, bumped, x, t) - base).max() > 1e-3


def test_time_dependence_and_batch_independence(tiny_converted):
    params = tiny_converted[2]
    x, t, _ = _inputs(TINY, batch=3)
    out = _apply(TINY, params, x, t)
    same_x = np.repeat(x[:1], 3, axis=0)
    by_time = _apply(TINY, params, same_x, np.array([0.0, 0.5, 1.0], np.float32))
    assert (
        np.abs(by_time[0] - by_time[1]).max() > 1e-3
        and np.abs(by_time[1] - by_time[2]).max() > 1e-3
    )
    # Sample 0 alone (batch of 3 copies) equals sample 0 among others: no leak across the batch.
    alone = _apply(TINY, params, same_x, np.full(3, t[0], np.float32))
    np.testing.assert_allclose(alone[0], out[0], atol=1e-5)
    # A scalar time broadcasts over the batch.
    np.testing.assert_allclose(_apply(TINY, params, same_x, np.float32(t[0])), alone, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_output(tiny_converted):
    params = tiny_converted[2]
    x, t, _ = _inputs(TINY)
    ref = _apply(TINY, params, x, t)
    out = np.asarray(ADMUNet(TINY, dtype=jnp.bfloat16).apply({"params": params}, x, t))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()  # bf16 has 8 mantissa bits


def test_dropout_needs_rng_only_when_not_deterministic():
    cfg = dataclasses.replace(TINY, dropout=0.5)
    x, t, _ = _inputs(cfg)
    model = ADMUNet(cfg)
    params = model.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(t))["params"]
    params = jax.tree.map(lambda a: a + 0.1, params)  # make the zero-initialised branches matter
    a = model.apply({"params": params}, x, t)
    np.testing.assert_array_equal(a, model.apply({"params": params}, x, t))
    d1 = model.apply(
        {"params": params}, x, t, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    d2 = model.apply(
        {"params": params}, x, t, deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    assert np.abs(d1 - a).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="norm groups"):
        dataclasses.replace(TINY, num_groups=32)
    with pytest.raises(ValueError, match="attention heads"):
        dataclasses.replace(TINY, num_heads=3)
    with pytest.raises(ValueError, match="num_head_channels"):
        dataclasses.replace(TINY, num_head_channels=12)
    x, t, _ = _inputs(TINY)
    with pytest.raises(ValueError, match="multiples of 2"):
        ADMUNet(TINY).init(jax.random.key(0), jnp.zeros((1, 7, 7, 3)), jnp.zeros((1,)))
    with pytest.raises(ValueError, match="labels"):
        ADMUNet(TINY).init(
            jax.random.key(0), jnp.asarray(x), jnp.asarray(t), jnp.zeros((3,), jnp.int32)
        )


# --------------------------------------------------------------------------------------------------
# LFM convention wrapper (flows.py)


def test_lfm_wrapper_gives_project_velocity():
    """A fake LFM network: the exact velocity of LFM's path towards one data point z0. Wrapped, it
    must give the project velocity z1 - z0 on the project path, jump to z0 with x - t*F, and sample
    z0 in one Euler step; any rescaled time or flipped sign would miss by O(1)."""
    s = flows.LFM_SIGMA_MIN
    rng = np.random.default_rng(0)
    z0, z1 = (jnp.asarray(rng.standard_normal((4, 2, 2, 3)), jnp.float32) for _ in range(2))

    def lfm_apply(params, x, t, cond):
        tb = flows.broadcast_time(t, x)
        noise = (x - (1 - tb) * params) / (s + (1 - s) * tb)  # invert LFM's x_t for z1
        return (1 - s) * noise - params

    velocity_fn = flows.wrap_lfm_flow(lfm_apply)
    t = jnp.array([1.0, 0.7, 0.5, 0.3])  # LFM's offset costs O(s/t): exact enough away from t = 0
    x_t = flows.interpolate(z0, z1, t)
    v = velocity_fn(z0, t, x_t, None)
    np.testing.assert_allclose(v, flows.velocity_target(z0, z1), atol=1e-4)
    np.testing.assert_allclose(flows.data_prediction(x_t, t, v), z0, atol=1e-4)
    one_step = flows.euler_move(
        z1, jnp.ones(4), jnp.zeros(4), velocity_fn(z0, jnp.ones(4), z1, None)
    )
    np.testing.assert_allclose(one_step, z0, atol=1e-4)


def test_lfm_wrapper_runs_the_adm_unet(tiny_converted):
    params = tiny_converted[2]
    x, t, _ = _inputs(TINY)

    def apply(p, x_, t_, cond):
        return ADMUNet(TINY).apply({"params": p}, x_, t_, cond)

    np.testing.assert_array_equal(
        flows.wrap_lfm_flow(apply)(params, t, x, None), _apply(TINY, params, x, t)
    )
