"""Mixed precision and rematerialisation, applied to a task's networks from the config.

``config.precision.compute_dtype`` goes into every network that has a ``dtype`` field
(SmallUNet, the StyleGAN discriminator and the real UNet/VAE/CLIP modules all do);
parameters stay float32, and the networks return float32, so losses, optimizer updates and
EMAs stay in float32.

``config.model.remat`` picks what the backward pass keeps: ``none`` keeps every activation,
``full`` recomputes the network's forward pass, any other name is a
``jax.checkpoint_policies`` policy (``dots_saveable`` keeps matmul/conv outputs only, ...).
A network with its own ``remat`` field (per-block remat, the better choice for deep
networks) receives the name; any other Linen module is wrapped whole with ``nn.remat``,
which keeps its parameter tree unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARAM_DTYPES = {"float32": jnp.float32}


def _precision(config, field: str) -> str:
    """A config.precision field; configs without the section compute in float32."""
    return (config.get("precision") or {}).get(field, "float32")


def remat_name(config) -> str:
    """config.model.remat; configs without it (e.g. an evaluation of an injected task) keep
    every activation."""
    return (config.get("model") or {}).get("remat", "none")


def compute_dtype(config) -> Any:
    name = _precision(config, "compute_dtype")
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.precision.compute_dtype={name!r}; expected one of {sorted(COMPUTE_DTYPES)}"
        )
    return COMPUTE_DTYPES[name]


def decode_dtype(config) -> Any:
    """The VAE decoder's compute dtype for samples and evaluation
    (``config.precision.decode_dtype``). float32 by default, so that image metrics stay comparable
    with float32 decodes; bfloat16 makes the decoder, which at 512 px costs more than the one-step
    UNet, cheaper on accelerators."""
    name = _precision(config, "decode_dtype")
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.precision.decode_dtype={name!r}; expected one of {sorted(COMPUTE_DTYPES)}"
        )
    return COMPUTE_DTYPES[name]


def validate(config) -> None:
    name = _precision(config, "param_dtype")
    if name not in PARAM_DTYPES:
        raise ValueError(
            f"config.precision.param_dtype={name!r} is not supported: parameters, optimizer "
            f"moments and EMAs are kept in float32 (an EMA at rate 0.9999 does not move in "
            f"bfloat16); use compute_dtype='bfloat16' for bfloat16 compute"
        )
    compute_dtype(config)
    decode_dtype(config)
    remat_policy(remat_name(config))


def remat_policy(name: str):
    """``None`` for no remat, else the ``jax.checkpoint`` policy (``None`` policy = full)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if (
        policy is None
        or name.startswith("_")
        or name
        in (
            "save_from_both_policies",
            "save_only_these_names",
            "save_any_names_but_these",
            "save_anything_except_these_names",
            "save_and_offload_only_these_names",
        )
    ):
        raise ValueError(
            f"config.model.remat={name!r}; expected 'none', 'full' or a jax.checkpoint_policies "
            f"policy such as 'dots_saveable' or 'dots_with_no_batch_dims_saveable'"
        )
    return policy


def _init_fields(module: nn.Module) -> dict:
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.init and f.name not in ("parent", "name")
    }


def configure_module(module: nn.Module, *, dtype: Any, remat: str) -> nn.Module:
    """``module`` computing in ``dtype`` and rematerialised per ``remat``."""
    fields = _init_fields(module)
    if "dtype" in fields:
        fields["dtype"] = dtype
    elif dtype != jnp.float32:
        logging.warning("%s has no dtype field: it computes in float32", type(module).__name__)
    policy = remat_policy(remat)
    cls = type(module)
    if "remat" in fields:
        # Modules with a boolean per-block switch (the SD UNet, the UNet discriminator)
        # rematerialise their blocks fully; the others take the policy name.
        fields["remat"] = (remat != "none") if isinstance(fields["remat"], bool) else remat
    elif policy is not None:
        cls = nn.remat(cls, policy=policy)
    return cls(**fields)


def frozen_params(params, config):
    """The frozen teacher as the distill step holds it: under a bfloat16 compute dtype its kernels
    and embedding tables (leaves of rank >= 2) are stored in bfloat16.

    Every use casts them to the compute dtype anyway, so the teacher's outputs are bit-for-bit
    those of the float32 copy (tests/test_multihost.py holds the three UNet families to that),
    in half the memory. Vectors (biases, norm scales) stay float32: normalisations apply them in
    float32, and they are a small share of the parameters.
    Call it after the student, its EMAs and the discriminator are initialised from the float32
    teacher. Works on arrays (sharding kept) and on ``jax.ShapeDtypeStruct`` trees (plans)."""
    dtype = compute_dtype(config)
    if dtype == jnp.float32:
        return params

    def stored(leaf):
        if leaf.ndim < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
        return leaf.astype(dtype)

    return jax.tree.map(stored, params)


def configure_task(task, config):
    """A copy of ``task`` whose flow network and discriminator follow the config's precision
    and remat settings (the parameter trees are unchanged)."""
    validate(config)
    dtype = compute_dtype(config)
    remat = remat_name(config)
    if dtype == jnp.float32 and remat == "none":
        return task
    return dataclasses.replace(
        task,
        model=configure_module(task.model, dtype=dtype, remat=remat),
        discriminator=configure_module(task.discriminator, dtype=dtype, remat=remat),
    )
