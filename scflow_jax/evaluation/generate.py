"""Sharded, seed-stable sample generation for evaluation and the latent recipes' sample stage.

Sample i starts from ``z1_i = normal(fold_in(PRNGKey(seed), i), latent_shape)``, drawn inside the
compiled program from the sample's index. Its image therefore depends on (seed, i) and the model
only: not on the batch size, the batch it falls in, the number of devices or processes. A run of N
samples is cut into ``ceil(N / batch_size)`` global batches; batch b holds samples
``b*B .. min((b+1)*B, N) - 1``, so the last batch may be short. It is padded to the compiled size
(copies of its last sample) and the copies are dropped on the way out: exactly N samples come back
and nothing recompiles.

``ShardedSampler`` is one compiled program per (model, step count, guidance): ``params`` are an
argument (not baked into the program as constants), the batch is split over the mesh's batch axes
(each process feeds only its own devices' rows: ``sharding.shard_global_batch``), and the task's
``decode`` (latents -> images) runs on the sharded output. ``generate_images`` collects a whole run
on every process's host (``sharding.to_host``) for small jobs such as ``--mode=sample``; the
FID/CLIP evaluation (real_eval.py) consumes batches one by one instead.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from scflow_jax import monitoring, sampling, sharding

__all__ = [
    "euler_sample_fn",
    "sampler_program",
    "ShardedSampler",
    "num_batches",
    "batch_indices",
    "generate_images",
    "write_pngs",
]

# sample_fn(params, z1 [B, *latent_shape], cond [B, ...] or None, null_cond or None) -> latents,
# traceable.
SampleFn = Callable[[Any, jax.Array, Any, Any], jax.Array]


def euler_sample_fn(
    velocity_fn, *, num_steps: int, guidance: float = 1.0, method: str = "euler"
) -> SampleFn:
    """The ODE sampler of sampling.py as a ``SampleFn`` with a fixed step count and guidance
    scale."""

    def sample_fn(params, z1, cond, null_cond):
        return sampling.sample(
            velocity_fn,
            params,
            z1,
            cond,
            num_steps=num_steps,
            method=method,
            null_cond=null_cond,
            guidance=guidance,
        )

    return sample_fn


def num_batches(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def batch_indices(batch: int, num_samples: int, batch_size: int) -> np.ndarray:
    """Sample indices of global batch ``batch`` (the last one may be short)."""
    if not 0 <= batch < num_batches(num_samples, batch_size):
        raise IndexError(
            f"batch {batch} out of range: {num_samples} samples make "
            f"{num_batches(num_samples, batch_size)} batches of {batch_size}"
        )
    return np.arange(batch * batch_size, min((batch + 1) * batch_size, num_samples), dtype=np.int32)


def sampler_program(
    sample_fn: SampleFn, *, latent_shape: Sequence[int], seed: int, mesh: jax.sharding.Mesh
):
    """``ShardedSampler``'s compiled program: ``(params, indices, cond, null_cond) -> latents``,
    each sample from its own noise (``sampling.sample_noise``), the latents split over the mesh's
    batch axes."""
    shape = tuple(int(d) for d in latent_shape)

    def program(params, indices, cond, null_cond):
        return sample_fn(params, sampling.sample_noise(seed, indices, shape), cond, null_cond)

    return jax.jit(program, out_shardings=sharding.batch_sharding(mesh))


class ShardedSampler:
    """``sampler(indices, cond) -> images [batch_size, ...]`` (a global array split over ``data``;
    rows past ``len(indices)`` are padding to drop).

    Every process passes the same global ``indices`` (<= ``batch_size`` of them) and ``cond``
    (``[n, ...]``, or None for an unconditional model); each device reads its own rows. ``decode``
    (latents -> images, e.g. the VAE decoder) is applied to the sharded latents outside the sampler
    program; None returns latents.
    """

    def __init__(
        self,
        sample_fn: SampleFn,
        params: Any,
        *,
        latent_shape: Sequence[int],
        seed: int,
        batch_size: int,
        mesh: jax.sharding.Mesh,
        null_cond: Any = None,
        decode: Optional[Callable[[jax.Array], jax.Array]] = None,
        field: str = "batch_size",
    ):
        sharding.check_global_batch(batch_size, mesh, field)
        self.batch_size = int(batch_size)
        self._mesh = mesh
        self._params = params
        self._null = (
            None if null_cond is None else sharding.put_replicated(np.asarray(null_cond), mesh)
        )
        self._decode = decode
        self._program = sampler_program(sample_fn, latent_shape=latent_shape, seed=seed, mesh=mesh)

    def __call__(self, indices: np.ndarray, cond: Optional[np.ndarray] = None) -> jax.Array:
        indices = np.asarray(indices, np.int32)
        n = len(indices)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} samples, got {n}")
        if cond is not None and len(cond) != n:
            raise ValueError(f"{n} sample indices but {len(cond)} conditions")
        # Copies of the last sample fill the compiled shape; callers keep the first n rows.
        batch = sharding.shard_global_batch(
            sharding.pad_batch({"indices": indices, "cond": cond}, self.batch_size), self._mesh
        )
        latents = self._program(self._params, batch["indices"], batch["cond"], self._null)
        return latents if self._decode is None else self._decode(latents)


def generate_images(
    sampler: ShardedSampler,
    *,
    num_samples: int,
    cond_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> np.ndarray:
    """All ``num_samples`` images of ``sampler`` on the host, in sample order;
    ``cond_fn(indices) -> cond`` gives each batch's conditions (None: unconditional)."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be positive")
    out = []
    for b in range(num_batches(num_samples, sampler.batch_size)):
        idx = batch_indices(b, num_samples, sampler.batch_size)
        out.append(
            sharding.to_host(sampler(idx, None if cond_fn is None else cond_fn(idx)))[: len(idx)]
        )
    return np.concatenate(out)


def write_pngs(folder: str, indices: Sequence[int], images: np.ndarray) -> None:
    """``<folder>/<index:06d>.png`` for each image in [-1, 1] (main process only)."""
    if not monitoring.is_main_process():
        return
    for i, image in zip(indices, monitoring.to_uint8(images)):
        monitoring.save_png(os.path.join(folder, f"{int(i):06d}.png"), image)
