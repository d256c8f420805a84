"""``celebahq256``: unconditional CelebA-HQ 256 in SD-VAE latents (4x32x32).

Teacher: the LFM latent flow-matching ADM UNet (``unet_adm.load_unet_adm`` +
``flows.wrap_lfm_flow``); discriminator: the StyleGAN2 latent D of SCFLOW_SPEC.md section 5.
Export: ``model.safetensors`` with guided-diffusion key names, as the teacher ships.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from scflow_jax import flows
from scflow_jax.models import discriminators, unet_adm, weights
from scflow_jax.tasks.latent import LatentTask, required_path


def adm_config(config, latent_channels: int) -> unet_adm.ADMConfig:
    """The ADM UNet of ``config.model.adm`` on ``latent_channels``-channel latents."""
    m = config.model.adm
    return unet_adm.ADMConfig(
        in_channels=latent_channels,
        out_channels=latent_channels,
        model_channels=m.model_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        use_scale_shift_norm=m.use_scale_shift_norm,
        dropout=m.dropout,
        num_groups=m.num_groups,
    )


class CelebAHQTask(LatentTask):
    dataset_kind: ClassVar[str] = "latents"
    unconditional: ClassVar[bool] = True
    disc_takes_time: ClassVar[bool] = False
    null_cond: ClassVar[None] = None
    grid_rows: ClassVar[int] = 2

    @classmethod
    def build(cls, config, vae_config, latent_shape) -> "CelebAHQTask":
        network_config = adm_config(config, latent_shape[-1])
        if latent_shape[0] % network_config.downsample_factor:
            raise ValueError(
                f"latents of {latent_shape[0]} pixels (config.data.image_size="
                f"{config.data.image_size}) are not divisible by the ADM UNet's "
                f"{network_config.downsample_factor}x downsampling (config.model.adm.channel_mult)"
            )
        disc = discriminators.StyleGANDiscriminator(
            resolution=latent_shape[0],
            in_channels=latent_shape[-1],
            channel_base=config.disc.channel_base,
            channel_max=config.disc.channel_max,
            mbstd_group_size=config.disc.mbstd_group_size,
        )
        return cls(
            config=config,
            latent_shape=latent_shape,
            vae_config=vae_config,
            network_config=network_config,
            model=unet_adm.ADMUNet(network_config),
            discriminator=disc,
        )

    def velocity_fn(self, params, t, x, cond):
        """LFM's network takes the time as is and predicts the velocity as is; no condition."""
        return flows.wrap_lfm_flow(lambda p, x, t, c: self.model.apply({"params": p}, x, t))(
            params, t, x, cond
        )

    def load_teacher_params(self) -> Any:
        """The pretrained teacher through its converter (float32 NumPy tree)."""
        path = required_path(self.config, "model.teacher_path", "teacher checkpoint")
        return unet_adm.load_unet_adm(
            path, self.network_config, subkey=self.config.model.teacher_subkey or None
        )

    def abstract_params(self) -> Any:
        side = self.network_config.downsample_factor
        x = jnp.zeros((1, side, side, self.latent_shape[-1]), jnp.float32)
        model = unet_adm.ADMUNet(self.network_config)
        return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.float32))[
            "params"
        ]

    def encode_prompts(self, prompts: list[str]):
        raise ValueError(
            f"config.data.name={self.config.data.name!r} is unconditional: it has no prompts"
        )

    def grid_conditions(self, per_row: int) -> None:
        return None

    def disc_fn(self, disc_params, x, cond):
        return self.discriminator.apply({"params": disc_params}, x, None)

    def init_disc_params(self, rng, teacher_params=None) -> Any:
        """The latent StyleGAN D starts random."""
        del teacher_params
        x = jnp.zeros((4,) + self.latent_shape, jnp.float32)
        return self.discriminator.init(rng, x, None)["params"]

    def export_params(self, params, out_dir: str) -> str:
        """``<out_dir>/model.safetensors`` with guided-diffusion key names (what
        ``load_unet_adm`` reads)."""
        os.makedirs(out_dir, exist_ok=True)
        file = os.path.join(out_dir, "model.safetensors")
        weights.write_safetensors(
            file,
            weights.state_dict_from_params(params, unet_adm.torch_key),
            metadata={"format": "pt"},
        )
        return file
