"""channel_ops: the same values, derivatives and parameters as the plain broadcasts and sums and as
flax's nn.Conv / nn.GroupNorm, on both of its paths (matmul reductions on CPU, plain elsewhere).
Tolerance: 1e-5 relative to the largest magnitude (fp32; only the summation order differs)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scflow_jax.models import channel_ops


@pytest.fixture(params=["matmul", "plain"])
def path(request, monkeypatch):
    monkeypatch.setattr(channel_ops, "_matmul_reductions", lambda: request.param == "matmul")
    return request.param


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        assert np.max(np.abs(x - y)) <= tol * max(np.max(np.abs(y)), 1e-6), np.max(np.abs(x - y))


def _data(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_matmul_path_is_the_cpu_default():
    assert channel_ops._matmul_reductions() == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("per_sample", [False, True])
def test_broadcast_and_sums_match_plain_ops_with_derivatives(path, per_sample):
    shape = (3, 4, 5, 6)
    v = _data((3, 6) if per_sample else (6,))
    x, ct = _data(shape, 1), _data(shape, 2)
    plain = lambda v: jnp.broadcast_to(v[:, None, None, :] if per_sample else v, shape)  # noqa: E731
    ours = lambda v: channel_ops.broadcast_channels(v, shape)  # noqa: E731
    _close(ours(v), plain(v), tol=0)
    _close(jax.vjp(ours, v)[1](ct), jax.vjp(plain, v)[1](ct))
    _close(jax.jvp(ours, (v,), (v * 2,)), jax.jvp(plain, (v,), (v * 2,)))
    # Second order (R1-style grad of grad) through a nonlinearity.
    second = lambda f: jax.grad(lambda v: jnp.sum(jax.grad(lambda v: jnp.sum(jnp.sin(f(v)) * x))(v) ** 2))(v)  # noqa: E731
    _close(second(ours), second(plain))
    axes = (1, 2) if per_sample else (0, 1, 2)
    _close(channel_ops.channel_sums(x, per_sample=per_sample), x.sum(axes))


@pytest.mark.parametrize("group", [1, 3])
def test_expand_groups_is_an_exact_repeat_with_its_gradient(path, group):
    v = _data((2, 4))
    repeat = lambda v: jnp.repeat(v, group, axis=-1)  # noqa: E731
    ours = lambda v: channel_ops.expand_groups(v, group)  # noqa: E731
    _close(ours(v), repeat(v), tol=0)
    ct = _data((2, 4 * group), 1)
    _close(jax.vjp(ours, v)[1](ct), jax.vjp(repeat, v)[1](ct))


def _check_module_matches(ours, reference, x, perturb_seed=3):
    params = reference.init(jax.random.key(0), x)
    ours_params = ours.init(jax.random.key(0), x)
    # Same names, shapes and initial values.
    assert jax.tree.structure(ours_params) == jax.tree.structure(params)
    _close(ours_params, params, tol=0)
    rng = np.random.default_rng(perturb_seed)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape, np.float32)), params)
    _close(ours.apply(params, x), reference.apply(params, x))
    ct = _data(reference.apply(params, x).shape, 4)
    grads = lambda m: jax.vjp(lambda p, x: jnp.tanh(m.apply(p, x)), params, x)[1](ct)  # noqa: E731
    _close(grads(ours), grads(reference))


@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (2, 6, 8)])
def test_group_norm_matches_flax(path, shape):
    x = _data(shape) * 3 + 1
    _check_module_matches(channel_ops.GroupNorm(4, 1e-5),
                          nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False), x)


@pytest.mark.parametrize("kernel,strides,padding,shape", [((3, 3), (1, 1), ((1, 1), (1, 1)), (2, 5, 5, 3)),
                                                          ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 6, 6, 3)),
                                                          ((1,), None, "SAME", (2, 7, 3))])
def test_conv_matches_flax(path, kernel, strides, padding, shape):
    kw = dict(strides=strides, padding=padding, kernel_init=nn.initializers.lecun_normal())
    _check_module_matches(channel_ops.Conv(4, kernel, **kw), nn.Conv(4, kernel, **kw), _data(shape))
