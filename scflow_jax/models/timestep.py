"""The sinusoidal timestep embedding, defined once for the whole model zoo.

The SD 1.5 UNet (diffusers' ``get_timestep_embedding``), the ADM UNet (guided-diffusion's
``timestep_embedding``: [cos | sin], no shift) and the small UNet of the embedded default differ
only in the arguments: which half comes first, the frequency shift, and the time scale the
caller applies (SD: 0..1000 timesteps; ADM/LFM: t in [0, 1] as is; small: 1000 t).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """[sin | cos] of ``t * exp(-log(max_period) * k / (half - freq_shift))`` (float32), swapped to
    [cos | sin] with ``flip_sin_to_cos``, zero-padded to an odd ``dim``."""
    half = dim // 2
    # The frequency table is computed in float64 and rounded once, which matches torch's float32 exp
    # to the ulp (a 1-ulp difference times t = 1000 would already move the sines by ~1e-4).
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
