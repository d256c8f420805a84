"""models/upsample_conv.py: nearest upsampling + 3x3 conv computed by output phases equals the plain form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from scflow_jax.models import channel_ops, upsample_conv


def _plain(x, kernel, bias):
    return jax.lax.conv_general_dilated(upsample_conv.upsample_nearest(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def test_upsample_nearest_repeats_each_pixel_2x2():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    up = np.asarray(upsample_conv.upsample_nearest(x))[0, :, :, 0]
    np.testing.assert_array_equal(up, np.kron(np.arange(6.0).reshape(2, 3), np.ones((2, 2))))


@pytest.mark.parametrize("shape, out_channels", [((2, 4, 4, 3), 5), ((3, 5, 2, 8), 8), ((1, 1, 1, 2), 3)])
def test_phases_equal_the_upsampled_convolution_with_gradients(shape, out_channels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out_channels)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((out_channels,)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], out_channels)), jnp.float32)
    assert jax.default_backend() == "cpu"  # the phase form is the one under test
    y, pullback = jax.vjp(upsample_conv.upsample_nearest_conv3x3, x, kernel, bias)
    y_ref, pullback_ref = jax.vjp(_plain, x, kernel, bias)
    assert y.shape == y_ref.shape == cotangent.shape
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(pullback(cotangent), pullback_ref(cotangent)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_programs_for_accelerators_keep_the_plain_form(platform):
    """Off CPU the upsampled map is convolved as is and the bias added as is (the CPU forms are measured on
    CPU only); the form follows the platform the program is lowered for, not the host's."""
    x, kernel, bias = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((1, 2, 2, 1), (3, 3, 1, 1), (1,)))
    with_gradients = jax.jit(jax.grad(lambda *a: jnp.sum(upsample_conv.upsample_nearest_conv3x3(*a)), argnums=(0, 1, 2)))
    text = export.export(with_gradients, platforms=[platform])(x, kernel, bias).mlir_module()
    # The gradients to x and to the kernel: a convolution each, or one per output phase.
    assert text.count("stablehlo.convolution") == (2 * 4 if platform == "cpu" else 2)
    if platform != "cpu":  # no product at all (the CPU forms' kernel taps and bias gradient are products)
        assert "stablehlo.dot_general" not in text and "stablehlo.reduce" in text


def test_module_has_the_conv_parameters_and_adds_its_bias():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3, 4)), jnp.float32)
    module = upsample_conv.UpsampleConv(6, bias_init=jax.nn.initializers.normal(1.0))
    params = module.init(jax.random.key(0), x)["params"]
    conv_params = channel_ops.Conv(6, (3, 3), padding=((1, 1), (1, 1))).init(
        jax.random.key(0), upsample_conv.upsample_nearest(x))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv_params)
    want = channel_ops.Conv(6, (3, 3), padding=((1, 1), (1, 1))).apply(
        {"params": params}, upsample_conv.upsample_nearest(x))
    np.testing.assert_allclose(module.apply({"params": params}, x), want, atol=2e-5, rtol=1e-5)
