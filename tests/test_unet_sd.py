"""Tests for scflow_jax.models.unet_sd: the SD UNet, its converter and exporter, against diffusers
(torch, CPU).

Parity tolerance: max abs error <= 1e-4 in float32 (TOL). Tiny random diffusers UNets are built
here, every weight perturbed (conv_out and proj_out are zero-initialised in diffusers, which would
make parity trivial), and saved with ``save_pretrained`` to tmp folders. One jitted apply per
configuration is shared by the tests that use it.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scflow_jax import flows
from scflow_jax.models import unet_sd, unet_sd_weights, weights
from scflow_jax.models.unet_sd import UNet2DConditionModel, UNetSDConfig

TOL = 1e-4  # max abs error, float32

# The brief's tiny UNet: every block type (CrossAttnDown, Down, Up, CrossAttnUp), 1x1-conv
# projections.
TINY = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
    attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
# Linear projections, per-block head counts, two transformer layers per attention module,
# cross-attention on both levels.
TINY_LINEAR = dict(
    TINY,
    use_linear_projection=True,
    attention_head_dim=[2, 4],
    transformer_layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
TOKENS = 7


def _torch_unet(config: dict, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(batch=2, height=16, width=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, 4)).astype(np.float32)  # NHWC (ours)
    t = np.array([10.0, 700.5], np.float32)[:batch]
    c = rng.standard_normal((batch, TOKENS, 32)).astype(np.float32)
    return x, t, c


def _torch_forward(model, x, t, c, *, mid_block=False):
    """diffusers' output (or its mid-block output) as NHWC NumPy; inputs are NHWC."""
    import torch

    captured = {}
    hook = model.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    try:
        with torch.no_grad():
            out = model(
                torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                torch.from_numpy(t),
                torch.from_numpy(c),
            ).sample
    finally:
        hook.remove()
    out = captured["mid"] if mid_block else out
    return out.float().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: UNetSDConfig):
    return jax.jit(unet_sd.make_unet_apply(config))


def _ours(config, params, x, t, c):
    return np.asarray(_jitted_apply(config)(params, x, t, c))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny diffusers UNet and its torch model."""
    model = _torch_unet(TINY)
    folder = str(tmp_path_factory.mktemp("unet_tiny"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parity
def test_forward_matches_diffusers_conv_projection(tiny_folder):
    folder, model = tiny_folder
    config, params = unet_sd_weights.load_unet_sd(folder)
    assert config.use_linear_projection is False
    x, t, c = _inputs()
    ref = _torch_forward(model, x, t, c)
    assert np.std(ref) > 0.1  # a real signal, not the zero output of an untrained conv_out
    assert _max_err(_ours(config, params, x, t, c), ref) <= TOL


@pytest.mark.parity
def test_forward_matches_diffusers_linear_projection_odd_size(tmp_path):
    """use_linear_projection, per-block heads, 2 transformer layers, and a 9x10 latent (the up path
    then resizes to the odd skip size, like diffusers' upsample_size)."""
    model = _torch_unet(TINY_LINEAR, seed=3)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = unet_sd_weights.load_unet_sd(str(tmp_path))
    assert config.use_linear_projection and config.attention_head_dim == (2, 4)
    assert (
        params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].ndim == 2
    )  # a Linear, not a 1x1 conv
    x, t, c = _inputs(height=9, width=10)
    ref = _torch_forward(model, x, t, c)
    assert np.std(ref) > 0.1
    assert _max_err(_ours(config, params, x, t, c), ref) <= TOL


@pytest.mark.parity
def test_encoder_half_matches_diffusers_mid_block(tiny_folder):
    folder, model = tiny_folder
    config, params = unet_sd_weights.load_unet_sd(folder)
    x, t, c = _inputs()
    ref = _torch_forward(model, x, t, c, mid_block=True)
    assert ref.shape == (2, 8, 8, 64)
    enc_params = unet_sd.encoder_params(params)
    assert sorted(enc_params) == [
        "conv_in",
        "down_blocks_0",
        "down_blocks_1",
        "mid_block",
        "time_embedding",
    ]
    ours = jax.jit(
        functools.partial(UNet2DConditionModel(config).apply, method=UNet2DConditionModel.encode)
    )({"params": enc_params}, x, t, c)
    assert _max_err(ours, ref) <= TOL


@pytest.mark.parity
def test_velocity_adapter_is_minus_unet_at_1000t(tiny_folder):
    folder, model = tiny_folder
    config, params = unet_sd_weights.load_unet_sd(folder)
    x, _, c = _inputs()
    t = np.array([0.0105, 0.7005], np.float32)
    velocity_fn = flows.wrap_diffusers_rectified_flow(_jitted_apply(config))
    ref = -_torch_forward(model, x, np.asarray(flows.diffusers_timestep(jnp.asarray(t))), c)
    assert _max_err(velocity_fn(params, jnp.asarray(t), x, c), ref) <= TOL


@pytest.mark.parity
def test_fp16_checkpoint_loads_into_float32(tmp_path):
    """A half-precision variant file (diffusion_pytorch_model.fp16.safetensors) loads into float32
    params equal to the fp16 weights; the reference is the same torch model with weights rounded to
    fp16 and run in float32, so the fp32 tolerance applies."""
    model = _torch_unet(TINY).half()
    model.save_pretrained(str(tmp_path), safe_serialization=True, variant="fp16")
    assert os.listdir(str(tmp_path)).count("diffusion_pytorch_model.fp16.safetensors") == 1
    config, params = unet_sd_weights.load_unet_sd(str(tmp_path))
    leaves = jax.tree.leaves(params)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    x, t, c = _inputs()
    ref = _torch_forward(model.float(), x, t, c)
    assert _max_err(_ours(config, params, x, t, c), ref) <= TOL


@pytest.mark.parity
def test_export_round_trip_through_diffusers(tiny_folder, tmp_path):
    """convert -> export -> diffusers from_pretrained -> the same outputs as our Flax model, also in
    fp16."""
    from diffusers import UNet2DConditionModel as TorchUNet

    folder, _ = tiny_folder
    config, params = unet_sd_weights.load_unet_sd(folder)
    x, t, c = _inputs()
    ours = _ours(config, params, x, t, c)
    out = unet_sd_weights.export_unet_sd(config, params, str(tmp_path / "fp32"))
    assert (
        json.load(open(os.path.join(out, "config.json")))["_class_name"] == "UNet2DConditionModel"
    )
    reloaded = TorchUNet.from_pretrained(out).eval()
    assert _max_err(_torch_forward(reloaded, x, t, c), ours) <= TOL
    # fp16 export: diffusers reads the halves; compare with our model on the same rounded weights.
    out16 = unet_sd_weights.export_unet_sd(config, params, str(tmp_path / "fp16"), dtype=np.float16)
    reloaded16 = TorchUNet.from_pretrained(out16).eval().float()
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), params)
    assert _max_err(_torch_forward(reloaded16, x, t, c), _ours(config, rounded, x, t, c)) <= TOL
    # and our own loader reads the export back bit for bit
    _, again = unet_sd_weights.load_unet_sd(out)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again))
    )


@pytest.mark.parity
def test_sd15_parameter_names_and_shapes_match_diffusers():
    """The full SD 1.5 UNet (built on torch's meta device: no memory) has exactly our keys and
    shapes."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    config = UNetSDConfig()
    with torch.device("meta"):
        model = TorchUNet.from_config(config.to_dict())
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {
        unet_sd_weights.unet_sd_key(path): weights.torch_layout_inverse(
            path[-1], np.empty(s.shape, np.uint8)
        ).shape
        for path, s in weights.flatten_params(unet_sd.unet_param_shapes(config)).items()
    }
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == 859_520_964


# --------------------------------------------------------------------------------------------------
# Loading paths and bad input


def test_pipeline_folder_and_single_file(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    shutil.copytree(folder, tmp_path / "pipe" / "unet")
    config, params = unet_sd_weights.load_unet_sd(str(tmp_path / "pipe"))
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with pytest.raises(weights.WeightsError, match="pass config="):
        unet_sd_weights.load_unet_sd(single)
    config2, params2 = unet_sd_weights.load_unet_sd(
        single, config=os.path.join(folder, "config.json")
    )
    assert config2 == config
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2))
    )


def _copy_with_config(folder, dest, **changes):
    shutil.copytree(folder, dest)
    path = os.path.join(dest, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))
    return str(dest)


def test_missing_config_or_weights(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    no_config = tmp_path / "no_config"
    shutil.copytree(folder, no_config)
    os.remove(no_config / "config.json")
    with pytest.raises(weights.WeightsError, match="config.json not found"):
        unet_sd_weights.load_unet_sd(str(no_config))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    os.remove(no_weights / "diffusion_pytorch_model.safetensors")
    with pytest.raises(weights.WeightsError, match="none of .*diffusion_pytorch_model.safetensors"):
        unet_sd_weights.load_unet_sd(str(no_weights))
    with pytest.raises(weights.WeightsError, match="does not exist"):
        unet_sd_weights.load_unet_sd(str(tmp_path / "nowhere"))


def test_config_weights_mismatch_names_the_first_missing_key(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    deeper = _copy_with_config(folder, tmp_path / "deeper", layers_per_block=2)
    with pytest.raises(weights.WeightsError) as err:
        unet_sd_weights.load_unet_sd(deeper)
    # keys are checked in sorted path order: attentions_1 comes before resnets_1
    assert (
        "missing key(s): down_blocks.0.attentions.1.norm.bias "
        "(for down_blocks_0/attentions_1/norm/bias)" in str(err.value)
    )
    assert "shape mismatch(es): up_blocks.0.resnets.1.conv1.weight" in str(err.value)
    # allow_partial fills the gaps (Flax-style init) and keeps what matched
    config, params = unet_sd_weights.load_unet_sd(deeper, allow_partial=True)
    source = weights.read_safetensors(os.path.join(deeper, "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(params["conv_in"]["bias"], source["conv_in.bias"])
    assert config.layers_per_block == 2
    np.testing.assert_array_equal(
        params["down_blocks_0"]["resnets_1"]["norm1"]["scale"], np.ones(32, np.float32)
    )
    assert (
        0.5 < np.std(params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]) * np.sqrt(9 * 32) < 2
    )


def test_corrupted_safetensors(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    dest = tmp_path / "corrupt"
    shutil.copytree(folder, dest)
    path = dest / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightsError, match="truncated or corrupted"):
        unet_sd_weights.load_unet_sd(str(dest))


@pytest.mark.parametrize(
    "field,value",
    [
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "timestep"),
        ("resnet_time_scale_shift", "scale_shift"),
    ],
)
def test_unsupported_config_values_are_named(tiny_folder, tmp_path, field, value):
    folder, _ = tiny_folder
    bad = _copy_with_config(folder, tmp_path / "bad", **{field: value})
    with pytest.raises(weights.WeightsError, match=field):
        unet_sd_weights.load_unet_sd(bad)


# --------------------------------------------------------------------------------------------------
# The module itself


def test_config_from_dict_ignores_unknown_keys_and_round_trips():
    d = dict(
        TINY,
        _class_name="UNet2DConditionModel",
        _diffusers_version="0.42.1",
        some_future_key=3,
        only_cross_attention=[False, False],
        num_attention_heads=None,
        dropout=0.0,
    )
    config = UNetSDConfig.from_dict(d)
    assert config.block_out_channels == (32, 64) and config.attention_head_dim == 8
    assert UNetSDConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(UNetSDConfig.from_dict(config.to_dict()))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetSDConfig.from_dict(
            dict(TINY, attention_head_dim=5)
        )  # 5 heads do not divide 32 channels
    with pytest.raises(ValueError, match="layers_per_block"):
        UNetSDConfig.from_dict(dict(TINY, layers_per_block=[1, 1, 1]))


def test_encode_init_builds_exactly_the_encoder_subtree_and_remat_keeps_the_tree():
    config = UNetSDConfig.from_dict(TINY)
    args = unet_sd._init_inputs(config)
    full = unet_sd.unet_param_shapes(config)
    enc = jax.eval_shape(
        functools.partial(UNet2DConditionModel(config).init, method=UNet2DConditionModel.encode),
        jax.random.PRNGKey(0),
        *args,
    )["params"]
    assert jax.tree.structure(enc) == jax.tree.structure(unet_sd.encoder_params(full))
    rematted = jax.eval_shape(
        UNet2DConditionModel(config, remat=True).init, jax.random.PRNGKey(0), *args
    )["params"]
    assert jax.tree.map(lambda s: s.shape, rematted) == jax.tree.map(lambda s: s.shape, full)


def test_remat_wraps_every_resnet_and_attention_module():
    """remat=True puts each resnet and each Transformer2DModel under its own rematerialisation
    (checked on the traced gradient, no compile); remat=False adds none."""
    import re

    config = UNetSDConfig.from_dict(TINY)
    x, t, c = _inputs(batch=1, height=4, width=4)
    params = unet_sd.unet_param_shapes(config)

    def remats(remat):
        apply = unet_sd.make_unet_apply(config, remat=remat)
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(apply(p, x, t, c))))(params)
        return len(re.findall(r"\b(?:remat\w*|checkpoint)\[", str(jaxpr)))

    # down: 2 resnets + 1 attention, mid: 2 + 1, up: 4 + 2
    assert remats(True) == 12
    assert remats(False) == 0


def test_layout_inverse_undoes_torch_layout():
    rng = np.random.default_rng(0)
    for shape in [(5, 3), (5, 3, 2), (5, 3, 2, 4), (7,)]:
        a = rng.standard_normal(shape)
        for leaf in ("kernel", "bias", "scale"):
            np.testing.assert_array_equal(
                weights.torch_layout_inverse(leaf, weights.torch_layout(leaf, a)), a
            )
