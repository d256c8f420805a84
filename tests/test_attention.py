"""models/attention.py: the attention every platform runs, and which kernel GPU and
TPU programs get.

This machine has no GPU and no CUDA plugin, so cuDNN's kernel cannot be traced here: the dispatch is
checked with a stand-in for it, in programs exported for CUDA, TPU and the CPU (jax.export lowers
for a platform without its devices). --mode=plan with a GPU target compiles the real kernel."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from scflow_jax.models import attention

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
import common  # noqa: E402


def _qkv(tokens: int, keys: int, dtype=jnp.float32, heads: int = 2, head_dim: int = 8):
    rngs = jax.random.split(jax.random.PRNGKey(0), 3)
    return tuple(
        jax.random.normal(r, (2, n, heads, head_dim), dtype)
        for r, n in zip(rngs, (tokens, keys, keys))
    )


def _written_out(q, k, v):
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) / np.sqrt(
        q.shape[-1]
    )
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))


@pytest.mark.parametrize(
    "keys", [16, 7]
)  # self-attention, and cross-attention to an odd number of keys
def test_attention_is_softmax_of_scaled_logits(keys):
    _assert_attention(attention.dot_product_attention, *_qkv(16, keys))


def _assert_attention(fn, q, k, v):
    """``fn`` computes :func:`_written_out`, values and gradients."""
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), _written_out(q, k, v), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: (_written_out(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_query_chunks_compute_the_same_attention():
    q, k, v = _qkv(32, 24)
    _assert_attention(functools.partial(attention.query_chunked_attention, chunk=8), q, k, v)
    with pytest.raises(ValueError, match="30 queries are not a multiple of chunk=8"):
        attention.query_chunked_attention(q[:, :30], k, v, chunk=8)


def _marked_stand_in(q, k, v):
    """Not attention: a cube root, which neither XLA's attention nor the UNet computes, marks where
    this branch was lowered."""
    return jnp.cbrt(q)


@pytest.fixture
def stand_in(monkeypatch):
    """cuDNN's kernel replaced by :func:`_marked_stand_in`; ``stand_in(takes)`` sets whether cuDNN
    takes the shapes. jax caches traced programs, and the choice is made when tracing, so the caches
    are emptied around each test."""
    monkeypatch.setattr(attention, "cudnn_attention", _marked_stand_in)
    jax.clear_caches()
    yield lambda takes: monkeypatch.setattr(
        attention, "cudnn_takes", lambda *shapes_and_dtype: takes
    )
    jax.clear_caches()


def _exported_text(platform: str, q, k, v) -> str:
    return export.export(jax.jit(attention.dot_product_attention), platforms=[platform])(
        q, k, v
    ).mlir_module()


def test_the_fused_kernel_goes_only_into_gpu_programs(stand_in):
    stand_in(True)
    q, k, v = _qkv(16, 16, jnp.bfloat16)
    gpu, cpu = _exported_text("cuda", q, k, v), _exported_text("cpu", q, k, v)
    assert "stablehlo.cbrt" in gpu and "stablehlo.exponential" not in gpu
    assert "stablehlo.exponential" in cpu and "stablehlo.cbrt" not in cpu
    assert "stablehlo.while" not in _exported_text("tpu", q, k, v)  # 16 queries: no chunks
    # Run here, the program is the CPU's: XLA's attention.
    np.testing.assert_allclose(
        np.asarray(attention.dot_product_attention(q, k, v), np.float32),
        np.asarray(attention.xla_attention(q, k, v), np.float32),
    )


def test_tpu_programs_attend_by_query_chunks_where_queries_and_keys_are_long(stand_in, monkeypatch):
    stand_in(True)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    chunked = lambda *shape: "stablehlo.while" in _exported_text("tpu", *_qkv(*shape))  # noqa: E731
    assert chunked(32, 16)
    assert (
        not chunked(32, 8) and not chunked(8, 32) and not chunked(36, 16)
    )  # short, or no whole chunks
    assert "stablehlo.while" not in _exported_text("cpu", *_qkv(32, 16))


def test_gpu_programs_attend_by_query_chunks_where_cudnn_refuses_long_attention(
    stand_in, monkeypatch
):
    stand_in(False)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    short, long = _exported_text("cuda", *_qkv(16, 7)), _exported_text("cuda", *_qkv(32, 16))
    assert "stablehlo.exponential" in short and "stablehlo.while" not in short
    assert "stablehlo.while" in long and "stablehlo.cbrt" not in long


def test_the_environment_can_keep_xla_attention_everywhere(stand_in, monkeypatch):
    stand_in(True)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    monkeypatch.setenv("SCFLOW_ATTENTION", "xla")
    gpu = _exported_text("cuda", *_qkv(32, 16, jnp.bfloat16))
    assert "stablehlo.exponential" in gpu and "stablehlo.cbrt" not in gpu
    assert "stablehlo.while" not in _exported_text("tpu", *_qkv(32, 16))
    monkeypatch.setenv("SCFLOW_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match=r"SCFLOW_ATTENTION='cudnn' must be 'auto' .* or 'xla'"):
        attention.dot_product_attention(*_qkv(16, 16))


def test_cudnn_is_not_offered_where_jax_cannot_trace_it():
    # No CUDA plugin in this suite's venv: jax refuses to trace cuDNN's kernel, so
    # nothing asks for it.
    if any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        pytest.skip("JAX's CUDA plugin is installed: cuDNN may well take these shapes")
    assert attention.cudnn_takes((2, 64, 8, 40), (2, 64, 8, 40), jnp.bfloat16) is False


def test_fused_attention_flops_count_what_xla_counts_for_the_written_out_attention():
    # The two custom calls as jax lowers them for a GPU (backend configs shortened), queries
    # 4x256x8x40 against 64 keys.
    types = "(tensor<4x256x8x40xbf16>, tensor<4x64x8x40xbf16>, tensor<4x64x8x40xbf16>"
    text = (
        f'%13:3 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%arg0, %arg1, %arg2) '
        f'{{api_version = 2 : i32, backend_config = "{{\\22fmha_scale\\22: 0.158}}", '
        f'result_layouts = [dense<[3, 1, 2, 0]> : tensor<4xindex>]}} : {types}) -> '
        f'(tensor<4x8x256x40xbf16>, tensor<4x8x256xf32>, tensor<0xui8>)\n'
        f'%12:4 = stablehlo.custom_call @__cudnn$fmhaSoftmaxBackward(%1#1, %1#2, %1#3, %1#5, %9, '
        f'%1#6) {{api_version = 2 : i32}} : {types}, tensor<4x8x256xf32>) -> '
        f'(tensor<4x8x256x40xbf16>)\n'
        f'%14 = stablehlo.custom_call @other(%arg0) {{}} : '
        f'(tensor<4x256x8x40xbf16>) -> tensor<1xf32>'
    )
    one_matmul = 2 * 4 * 256 * 64 * 8 * 40
    assert common.fused_attention_flops(text) == (2 + 4) * one_matmul
    # XLA's own count of the same attention written out, forward and backward, is within its
    # softmax's few FLOPs per logit of that.
    q, k, v = (jax.ShapeDtypeStruct((4, n, 8, 40), jnp.bfloat16) for n in (256, 64, 64))
    squares = lambda *a: (attention.xla_attention(*a).astype(jnp.float32) ** 2).sum()  # noqa: E731
    lowered = jax.jit(jax.grad(squares, argnums=(0, 1, 2))).lower(q, k, v)
    assert common.xla_flops(lowered) == pytest.approx(6 * one_matmul, rel=0.05)


def test_the_sd_unet_attends_through_this_module(stand_in):
    from scflow_jax.models import unet_sd

    stand_in(True)
    config = unet_sd.UNetSDConfig(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    model = unet_sd.UNet2DConditionModel(config, dtype=jnp.bfloat16)
    shapes = (
        unet_sd.unet_param_shapes(config),
        jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 7, 16), jnp.float32),
    )
    apply = jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs))
    assert "stablehlo.cbrt" in export.export(apply, platforms=["cuda"])(*shapes).mlir_module()
    assert "stablehlo.cbrt" not in export.export(apply, platforms=["cpu"])(*shapes).mlir_module()
