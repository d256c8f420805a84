"""models/platform_forms.py: each CPU form computes its plain form's function (values and
derivatives), programs get the form of the platform they are lowered for, and no other module
chooses by platform; models/upsample_conv.py's layer is nn.Conv on the upsampled map."""

import ast
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from scflow_jax.models import platform_forms, upsample_conv

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scflow_jax")


def test_upsample_nearest_repeats_each_pixel_2x2():
    x = jnp.arange(6.0).reshape(1, 2, 3, 1)
    up = np.asarray(upsample_conv.upsample_nearest(x))[0, :, :, 0]
    np.testing.assert_array_equal(up, np.kron(np.arange(6.0).reshape(2, 3), np.ones((2, 2))))


@pytest.mark.parametrize("kernel,stride,size", [(3, 2, 9), (1, 2, 8), (3, 1, 6), (4, 2, 11)])
def test_strided_conv_as_matmul_is_the_convolution_to_second_order(kernel, stride, size):
    """R1 differentiates D twice: the two forms agree in value, gradient and the gradient's
    gradient."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 5, 7))

    def r1_like(form):
        def penalty(w, x):
            grad_x = jax.grad(lambda x: jnp.sum(jnp.tanh(form(x, w, stride))))(x)
            return jnp.sum(grad_x**2)

        return jax.grad(penalty)(w, x)

    got, want = (
        platform_forms.strided_conv_as_matmul(x, w, stride),
        platform_forms.strided_conv_plain(x, w, stride),
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        r1_like(platform_forms.strided_conv_as_matmul),
        r1_like(platform_forms.strided_conv_plain),
        rtol=1e-4,
        atol=1e-4,
    )


def _exported(fn, *shapes, platform):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))
    return export.export(grads, platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_programs_get_the_form_of_the_platform_they_are_lowered_for(platform):
    """The CPU form in CPU programs only (whatever the host): the strided conv and its gradients
    are products there, convolutions elsewhere."""
    strided = _exported(
        lambda x, w: platform_forms.strided_conv(x, w, 2),
        (1, 5, 5, 2),
        (3, 3, 2, 4),
        platform=platform,
    )
    assert ("stablehlo.convolution" in strided) == (platform != "cpu")
    assert ("stablehlo.dot_general" in strided) == (platform == "cpu")


def test_upsample_module_has_the_conv_parameters_and_adds_its_bias():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3, 4)), jnp.float32)
    module = upsample_conv.UpsampleConv(6, bias_init=jax.nn.initializers.normal(1.0))
    params = module.init(jax.random.key(0), x)["params"]
    conv = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)))
    conv_params = conv.init(jax.random.key(0), upsample_conv.upsample_nearest(x))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv_params)
    want = conv.apply({"params": params}, upsample_conv.upsample_nearest(x))
    np.testing.assert_allclose(module.apply({"params": params}, x), want, atol=2e-5, rtol=1e-5)


# The model modules allowed to choose by platform: this one's home, and the attention kernels.
PLATFORM_CHOOSERS = {"platform_forms.py", "attention.py"}


def _platform_choices(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in ("platform_dependent", "default_backend")
    ]


def test_only_the_named_model_modules_choose_by_platform():
    models = os.path.join(PACKAGE, "models")
    choosers = {
        name
        for name in os.listdir(models)
        if name.endswith(".py") and _platform_choices(os.path.join(models, name))
    }
    assert choosers == PLATFORM_CHOOSERS
