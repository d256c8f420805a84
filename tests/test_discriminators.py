"""Tests for scflow_jax.models.discriminators (CPU, small configs).

Full-model ``init`` on CPU is dominated by XLA compiling the RNG for every parameter shape, so
shape/dtype checks use ``jax.eval_shape`` (exact, no compilation) and numerical checks fill the
model's parameters from numpy with the same N(0, 1) / zero-bias distribution the initialisers
use. The real initialisers are exercised directly on single layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scflow_jax.models.discriminators import (
    EqualizedConv,
    EqualizedDense,
    StyleGANDiscriminator,
    blur_downsample_2x,
    fir_filter_2d,
    minibatch_stddev,
)

# Small channel widths keep the CPU tests fast; the architecture logic is identical.
SMALL = dict(channel_base=256, channel_max=32)


def _n_params(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))


def _shapes(module, *args):
    """(variables, output) as ShapeDtypeStructs, without running or compiling anything."""
    out, variables = jax.eval_shape(
        lambda *a: module.init_with_output(jax.random.PRNGKey(0), *a), *args
    )
    return variables, out


def _numpy_params(module, *args, seed=0):
    """Parameters with the initialisers' distribution (kernels N(0,1), biases 0), built in numpy."""
    rng = np.random.default_rng(seed)
    variables, _ = _shapes(module, *args)

    def fill(path, leaf):
        if getattr(path[-1], "key", None) == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, variables)


def _randn(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cond(b, cond_dim):
    return jax.nn.one_hot(jnp.arange(b) % cond_dim, cond_dim) if cond_dim else None


@pytest.mark.parametrize("resolution", [8, 16, 32])
@pytest.mark.parametrize("cond_dim", [0, 10])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtype(resolution, cond_dim, dtype):
    b = 4
    d = StyleGANDiscriminator(
        resolution=resolution, in_channels=3, cond_dim=cond_dim, dtype=dtype, **SMALL
    )
    x = jnp.zeros((b, resolution, resolution, 3))
    variables, logits = _shapes(d, x, _cond(b, cond_dim))
    assert logits.shape == (b,)
    assert logits.dtype == jnp.float32
    # Parameters are stored in float32 whatever the compute dtype.
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
    # One residual block per resolution from `resolution` down to 8.
    names = set(variables["params"])
    assert {k for k in names if k.startswith("b") and k[1:].isdigit()} == {
        f"b{r}" for r in (8, 16, 32) if r <= resolution
    }
    assert ("mapping_fc0" in names) == (cond_dim > 0)
    assert variables["params"]["b4_out"]["kernel"].shape == (32, 32 if cond_dim else 1)


def test_param_count_reference_config():
    """Issue 8's discriminator (4x16x16 latents, base 2048, max 128, mbstd group 4): 128 channels
    throughout; fromrgb 640 + two blocks of 311,552 + b4_conv 148,736 (129 inputs with mbstd) +
    b4_fc 262,272 + b4_out 129."""
    d = StyleGANDiscriminator(
        resolution=16, in_channels=4, channel_base=2048, channel_max=128, mbstd_group_size=4
    )
    variables, _ = _shapes(d, jnp.zeros((4, 16, 16, 4)))
    assert _n_params(variables) == 1_034_881


def test_epilogue_dense_shape_large_config():
    d = StyleGANDiscriminator(resolution=32, in_channels=4)
    variables, _ = _shapes(d, jnp.zeros((4, 32, 32, 4)))
    assert variables["params"]["b4_fc"]["kernel"].shape == (8192, 512)
    assert variables["params"]["fromrgb"]["kernel"].shape == (1, 1, 4, 512)


def test_fir_filter_normalized():
    f = fir_filter_2d()
    np.testing.assert_allclose(f, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0, rtol=1e-6)
    np.testing.assert_allclose(f.sum(), 1.0, rtol=1e-6)


def test_fir_downsample_preserves_constant_and_halves():
    x = jnp.full((2, 16, 12, 3), 2.5)
    # Edge padding: the whole output is exactly the constant.
    y = blur_downsample_2x(x, pad_mode="edge")
    assert y.shape == (2, 8, 6, 3)
    np.testing.assert_allclose(np.asarray(y), 2.5, rtol=1e-6)
    # Zero padding (what the discriminator uses): interior pixels are still the constant.
    z = blur_downsample_2x(x)
    assert z.shape == (2, 8, 6, 3)
    np.testing.assert_allclose(np.asarray(z[:, 1:-1, 1:-1]), 2.5, rtol=1e-6)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_downsampling_convs_halve_resolution(kernel_size):
    layer = EqualizedConv(7, kernel_size, down=2)
    _, y = _shapes(layer, jnp.zeros((2, 16, 16, 5)))
    assert y.shape == (2, 8, 8, 7)


def test_minibatch_stddev_identical_group_is_zero():
    g, m = 4, 2
    base = _randn(m, 4, 4, 6)
    # Groups are strided (sample n is in group n % m), so tiling makes every group identical.
    x = jnp.tile(base, (g, 1, 1, 1))
    mbstd = jax.jit(minibatch_stddev, static_argnames=("group_size", "num_channels"))
    y = mbstd(x, group_size=g, num_channels=2)
    assert y.shape == (g * m, 4, 4, 8)
    np.testing.assert_array_equal(np.asarray(y[..., :6]), np.asarray(x))
    np.testing.assert_allclose(np.asarray(y[..., 6:]), 0.0, atol=1e-3)

    # Distinct samples give a clearly non-zero std feature, constant over H and W.
    x2 = jnp.concatenate([x[:4], x[4:] + 3.0])  # groups now mix base and base + 3
    y2 = mbstd(x2, group_size=g, num_channels=1)
    assert y2.shape == (8, 4, 4, 7)
    assert float(jnp.min(y2[..., 6])) > 1.0
    np.testing.assert_allclose(
        np.asarray(y2[..., 6]), np.asarray(y2[:, :1, :1, 6]) * np.ones((1, 4, 4))
    )


def test_minibatch_stddev_group_clamped_to_batch():
    x = jnp.zeros((2, 4, 4, 3))
    assert jax.eval_shape(lambda a: minibatch_stddev(a, group_size=4), x).shape == (2, 4, 4, 4)


def test_batch_not_divisible_by_group_raises():
    with pytest.raises(ValueError, match="mbstd_group_size"):
        minibatch_stddev(jnp.zeros((6, 4, 4, 3)), group_size=4)
    d = StyleGANDiscriminator(resolution=8, in_channels=1, mbstd_group_size=4, **SMALL)
    with pytest.raises(ValueError, match="mbstd_group_size"):
        _shapes(d, jnp.zeros((6, 8, 8, 1)))


def test_equalized_lr_conv():
    cin, cout, k = 64, 64, 3
    x = _randn(8, 16, 16, cin)
    layer = EqualizedConv(cout, k, activation="linear")
    params = layer.init(jax.random.PRNGKey(1), x)
    w = np.asarray(params["params"]["kernel"])
    assert w.shape == (k, k, cin, cout)
    # Stored weights are N(0, 1), not N(0, 1/fan_in) (which would give std 1/24 here).
    assert 0.95 < w.std() < 1.05
    np.testing.assert_array_equal(np.asarray(params["params"]["bias"]), 0.0)
    var = float(jnp.var(layer.apply(params, x)))
    assert 0.75 < var < 1.33, var  # ~0.92: zero padding shrinks the border pixels
    # With lrelu * sqrt(2) the second moment is preserved too.
    m2 = float(jnp.mean(jnp.square(EqualizedConv(cout, k, activation="lrelu").apply(params, x))))
    assert 0.75 < m2 < 1.33, m2  # without the sqrt(2) gain this would be ~0.5


def test_equalized_lr_dense():
    x = _randn(256, 512)
    layer = EqualizedDense(256)
    params = layer.init(jax.random.PRNGKey(1), x)
    assert 0.95 < float(jnp.std(params["params"]["kernel"])) < 1.05
    var = float(jnp.var(layer.apply(params, x)))
    assert 0.75 < var < 1.33, var


@pytest.mark.parametrize("cond_dim", [0, 10])
def test_input_gradients_finite_and_nonzero(cond_dim):
    b = 4
    d = StyleGANDiscriminator(resolution=16, in_channels=4, cond_dim=cond_dim, **SMALL)
    x = _randn(b, 16, 16, 4)
    cond = _cond(b, cond_dim)
    params = _numpy_params(d, x, cond)
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda p, inp, c: jnp.sum(d.apply(p, inp, c)), argnums=1)
    )
    logits, grad = value_and_grad(params, x, cond)
    assert bool(jnp.isfinite(logits))
    assert grad.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    # Every sample's logit depends on its own pixels.
    assert bool(jnp.all(jnp.sum(jnp.abs(grad), axis=(1, 2, 3)) > 0))


def test_bad_cond_or_resolution_raises():
    d = StyleGANDiscriminator(resolution=8, in_channels=1, cond_dim=3, **SMALL)
    with pytest.raises(ValueError, match="cond"):
        _shapes(d, jnp.zeros((4, 8, 8, 1)))
    d12 = StyleGANDiscriminator(resolution=12, in_channels=1, **SMALL)
    with pytest.raises(ValueError, match="power of 2"):
        _shapes(d12, jnp.zeros((4, 12, 12, 1)))


def _flax_params_from_torch(model):
    """The Flax discriminator's parameters from the PyTorch re-statement's (OIHW -> HWIO,
    [out, in] -> [in, out]; ``b4_fc`` reads its 4x4 input flattened NHWC here, NCHW there)."""
    params = {}
    for key, value in model.state_dict().items():
        *path, kind = key.removeprefix("blocks.").split(".")
        w = value.numpy()
        if kind == "bias":
            leaf = w
        elif w.ndim == 4:
            leaf = w.transpose(2, 3, 1, 0)
        else:
            if path == ["b4_fc"]:
                out_f, in_f = w.shape
                w = w.reshape(out_f, in_f // 16, 4, 4).transpose(0, 2, 3, 1).reshape(out_f, in_f)
            leaf = w.T
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node["kernel" if kind == "weight" else kind] = jnp.asarray(leaf)
    return params


@pytest.mark.parity
@pytest.mark.parametrize("resolution", [8, 16])
def test_matches_torch_restatement_with_r1_gradient(resolution):
    """The PyTorch re-statement of tests/torch_restatements.py is this discriminator: same parameter
    count, same logits and same input gradient (what R1 penalises) from the same weights."""
    torch = pytest.importorskip("torch")
    from torch_restatements import TorchStyleGANDiscriminator

    torch.manual_seed(0)
    model = TorchStyleGANDiscriminator(resolution, 4, mbstd_group_size=4, **SMALL)
    with torch.no_grad():  # non-zero biases, so their layout is checked too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    disc = StyleGANDiscriminator(resolution=resolution, in_channels=4, mbstd_group_size=4, **SMALL)
    params = _flax_params_from_torch(model)
    expected = _shapes(disc, jnp.zeros((2, resolution, resolution, 4)))[0]["params"]
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)
    assert _n_params(params) == sum(p.numel() for p in model.parameters())

    x = np.asarray(_randn(8, resolution, resolution, 4, seed=3))
    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
    logits_torch = model(x_torch)
    (grad_torch,) = torch.autograd.grad(logits_torch.sum(), x_torch)
    logits, grad = jax.value_and_grad(lambda x: disc.apply({"params": params}, x).sum())(
        jnp.asarray(x)
    )
    per_sample = disc.apply({"params": params}, jnp.asarray(x))
    assert (
        np.abs(logits_torch.detach().numpy()).max() > 0.1
    )  # a meaningful comparison, not two zeros
    np.testing.assert_allclose(
        np.asarray(per_sample), logits_torch.detach().numpy(), atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(float(logits), float(logits_torch.detach().sum()), rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(grad), grad_torch.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-4
    )
