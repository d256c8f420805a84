"""Scaled dot-product attention over [batch, tokens, heads, head_dim] without the full logits where
the hardware allows.

XLA computes attention as written: the [batch, heads, queries, keys] logits and probabilities are
real buffers, float32 for the softmax, and under differentiation they are kept for the backward
pass. At 512 px the SD UNet attends over 64x64 = 4096 tokens, where those buffers dominate a
training step's memory. ``jax.nn.dot_product_attention`` does not avoid that by itself:
``implementation=None`` means XLA. :func:`dot_product_attention` chooses per platform
(``lax.platform_dependent``, so a program compiled for a GPU or TPU from a CPU host, as
``--mode=plan`` does, gets that platform's choice):

- NVIDIA GPUs: cuDNN's fused (flash) attention, which never forms the logits, wherever cuDNN takes
  the shapes and dtype both forward and under differentiation: bf16 and fp16, head dims up to its
  limit. Not the 77-token cross-attention (cuDNN's training path refuses odd key counts), whose
  logits are small.
- Long attention that cuDNN does not take, on TPUs and GPUs (float32 compute, AMD's): XLA's
  attention over 512 queries at a time (:func:`query_chunked_attention`), each chunk recomputed in
  the backward pass, where queries and keys are both longer than 512.
- On the CPU, and for everything shorter: XLA's attention as written. The parity tests against
  PyTorch run this path.

The kernels differ by rounding only (summation order); the chunks compute each query's row exactly
as the whole does.

``SCFLOW_ATTENTION=xla`` in the environment keeps XLA's attention as written everywhere (the way
around a cuDNN that fails where jax's checks passed it); ``auto``, the default, chooses as above.
It is read when a program is traced, and jax reuses traced programs, so set it before the process
starts.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

# Queries per chunk, where attention goes by chunks: [rows, heads, 512, keys] logits at a time.
QUERY_CHUNK = 512


def xla_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def query_chunked_attention(q, k, v, chunk: int | None = None):
    """XLA's attention for ``chunk`` (default :data:`QUERY_CHUNK`) queries at a time (a
    ``lax.map``), each chunk checkpointed so that the backward pass recomputes its logits:
    [B, N, chunk, S] of them live at once, not [B, N, T, S]. T must be a multiple of ``chunk``."""
    chunk = chunk or QUERY_CHUNK
    b, t, n, h = q.shape
    if t % chunk:
        raise ValueError(
            f"query_chunked_attention: {t} queries are not a multiple of chunk={chunk}"
        )
    chunks = q.reshape(b, t // chunk, chunk, n, h).swapaxes(0, 1)
    out = lax.map(jax.checkpoint(lambda queries: xla_attention(queries, k, v)), chunks)
    return out.swapaxes(0, 1).reshape(b, t, n, h)


@functools.lru_cache(maxsize=None)
def cudnn_takes(q_shape: tuple, kv_shape: tuple, dtype) -> bool:
    """Whether cuDNN's fused attention accepts queries of ``q_shape`` and keys/values of
    ``kv_shape`` in ``dtype``, forward and backward. jax checks when it traces the kernel (cuDNN
    present, its version, head dim, sequence lengths, dtype); tracing its gradient abstractly runs
    every check, and any refusal means XLA does the work."""
    q = jax.ShapeDtypeStruct(q_shape, dtype)
    kv = jax.ShapeDtypeStruct(kv_shape, dtype)

    def summed(q, k, v):
        return cudnn_attention(q, k, v).astype(jnp.float32).sum()

    try:
        jax.eval_shape(jax.grad(summed, argnums=(0, 1, 2)), q, kv, kv)
    except Exception:  # jax raises RuntimeError, NotImplementedError or ValueError, by check
        return False
    return True


def attention_setting() -> str:
    """``SCFLOW_ATTENTION``: ``auto`` (the default) or ``xla``."""
    value = os.environ.get("SCFLOW_ATTENTION", "auto")
    if value not in ("auto", "xla"):
        raise ValueError(
            f"SCFLOW_ATTENTION={value!r} must be 'auto' (cuDNN's fused attention on NVIDIA "
            f"GPUs, query chunks for other long attention on GPUs and TPUs) or 'xla' (XLA's "
            f"attention as written everywhere)"
        )
    return value


def platform_kernels(q, k, v) -> dict:
    """The kernels :func:`dot_product_attention` lowers for these operands, by platform (the others
    get :func:`xla_attention`)."""
    if attention_setting() == "xla":
        return {}
    queries, keys = q.shape[1], k.shape[1]
    long = queries > QUERY_CHUNK and keys > QUERY_CHUNK and queries % QUERY_CHUNK == 0
    kernels = dict.fromkeys(("cuda", "rocm", "tpu"), query_chunked_attention) if long else {}
    if (
        k.shape == v.shape
        and q.dtype == k.dtype == v.dtype
        and cudnn_takes(q.shape, k.shape, q.dtype)
    ):
        kernels["cuda"] = cudnn_attention
    return kernels


def dot_product_attention(q, k, v):
    """softmax(q k^T / sqrt(head_dim)) v for q [B, T, N, H] and k, v [B, S, N, H]; the module
    docstring says which kernel each platform runs."""
    kernels = platform_kernels(q, k, v)
    if not kernels:
        return xla_attention(q, k, v)
    return lax.platform_dependent(q, k, v, default=xla_attention, **kernels)
