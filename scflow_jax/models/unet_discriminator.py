"""The text-to-image discriminator of SCFLOW_SPEC.md section 5: the teacher UNet's encoder plus a
small head.

``UNet2DConditionModel.encode`` (conv_in, time embedding, down blocks, cross-attention mid block)
maps the noised latent, its time and the prompt states to the mid-block feature (8x8x1280 for SD 1.5
at 64x64 latents); a new head, the authors' own, turns it into one logit per sample::

    conv(-> head_channels, kernel 4, stride 2, no padding) -> GroupNorm(head_groups) -> SiLU
        -> flatten -> linear

8x8 -> 3x3, so the linear layer takes 2304 = 3*3*256 features on SD 1.5's layout; at another latent
size it takes what the conv leaves (the head adapts; the conv needs a mid feature of at least 4x4).
The authors end the head in a sigmoid; here it is the family's convention ``OUTPUT_SIGMOID`` that
the losses apply (``losses/adversarial.py``), so the logit stays available for D's health metrics.

The encoder's parameters live under ``["unet"]`` with the full UNet's paths, so
``init_from_teacher`` copies ``unet_sd.encoder_params(teacher_params)`` there and the discriminator
starts from the teacher (spec section 2). Parameters are float32; ``dtype`` sets the compute dtype
(bf16 in the recipe), ``remat`` rematerialises the UNet's resnets and attention modules in the
backward pass (the R1-free D step still differentiates through them).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from scflow_jax.models import unet_sd
from scflow_jax.models.unet_sd import UNet2DConditionModel, UNetSDConfig

__all__ = ["UNetDiscriminator", "init_from_teacher"]


class UNetDiscriminator(nn.Module):
    """x [B, h, w, C] NHWC latents, timesteps [B] in diffusers' 0..1000 scale, text states [B, L, D]
    -> float32 logits [B]."""

    unet_config: UNetSDConfig
    head_channels: int = 256
    head_groups: int = 32
    dtype: Any = jnp.float32
    remat: bool = False

    # The authors' text-to-image D ends in a sigmoid: its GAN losses take values in (0, 1).
    OUTPUT_SIGMOID = True
    HEAD_KERNEL = 4

    @nn.compact
    def __call__(self, x, timesteps, encoder_hidden_states):
        unet = UNet2DConditionModel(
            self.unet_config, dtype=self.dtype, remat=self.remat, name="unet"
        )
        h = unet.encode(x, timesteps, encoder_hidden_states).astype(self.dtype)
        if min(h.shape[1:3]) < self.HEAD_KERNEL:
            factor = x.shape[1] // h.shape[1]
            raise ValueError(
                f"the discriminator head's {self.HEAD_KERNEL}x{self.HEAD_KERNEL} conv needs a "
                f"mid-block feature of at least {self.HEAD_KERNEL}x{self.HEAD_KERNEL}; latents of "
                f"{x.shape[1]}x{x.shape[2]} give {h.shape[1]}x{h.shape[2]} (the UNet downsamples "
                f"{factor}x): use latents of at least "
                f"{self.HEAD_KERNEL * factor}x{self.HEAD_KERNEL * factor} (config.data.image_size)"
            )
        h = nn.Conv(
            self.head_channels,
            (self.HEAD_KERNEL, self.HEAD_KERNEL),
            strides=(2, 2),
            padding="VALID",
            dtype=self.dtype,
            name="head_down",
        )(h)
        # Statistics in float32 whatever the compute dtype, as in the UNet's own norms.
        h = nn.GroupNorm(self.head_groups, epsilon=1e-5, dtype=jnp.float32, name="head_norm")(
            h.astype(jnp.float32)
        )
        h = nn.silu(h).astype(self.dtype).reshape(h.shape[0], -1)
        return nn.Dense(1, dtype=self.dtype, name="head_out")(h)[:, 0].astype(jnp.float32)


def init_from_teacher(
    disc: UNetDiscriminator,
    rng: jax.Array,
    teacher_params: Mapping[str, Any],
    latent_shape,
    cond_shape,
) -> dict:
    """Discriminator parameters: a fresh head (``rng``) and the teacher UNet's encoder weights
    (copied)."""
    x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
    cond = jnp.zeros((1,) + tuple(cond_shape), jnp.float32)
    params = dict(disc.init(rng, x, jnp.zeros((1,), jnp.float32), cond)["params"])
    encoder = unet_sd.encoder_params(teacher_params)
    if set(encoder) != set(params["unet"]):
        raise ValueError(
            f"teacher UNet encoder groups {sorted(encoder)} do not match the discriminator's "
            f"{sorted(params['unet'])}"
        )
    params["unet"] = jax.tree.map(
        jnp.array, encoder
    )  # a copy: D trains it, the teacher stays frozen
    return params
