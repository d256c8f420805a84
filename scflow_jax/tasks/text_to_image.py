"""``t2i_sd15``: text-to-image in SD 1.5 latents (4x64x64).

Teacher: a diffusers rectified-flow UNet (InstaFlow / 2-rectified flow:
``unet_sd_weights.load_unet_sd`` + ``flows.wrap_diffusers_rectified_flow``), guided against the
empty prompt; prompts through the CLIP text encoder; discriminator: the teacher's UNet encoder with
a new head (SCFLOW_SPEC.md section 5). Export: a diffusers UNet folder, as the teacher ships.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import numpy as np

from scflow_jax import flows
from scflow_jax.models import clip, unet_discriminator, unet_sd, unet_sd_weights, weights
from scflow_jax.tasks.latent import LatentTask, required_path

TEACHER_FIELD = ("model.teacher_path", "teacher UNet (diffusers folder)")


class TextToImageTask(LatentTask):
    dataset_kind: ClassVar[str] = "text_to_image"
    unconditional: ClassVar[bool] = False
    disc_takes_time: ClassVar[bool] = True

    @classmethod
    def build(cls, config, vae_config, latent_shape) -> "TextToImageTask":
        path = required_path(config, *TEACHER_FIELD)
        folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        unet_config = unet_sd.UNetSDConfig.from_dict(
            weights.read_json(os.path.join(folder, "config.json"), what="teacher UNet config")
        )
        if unet_config.in_channels != latent_shape[-1]:
            raise ValueError(
                f"teacher UNet takes {unet_config.in_channels} channels but the VAE "
                f"(config.model.vae_path) makes {latent_shape[-1]}"
            )
        disc = unet_discriminator.UNetDiscriminator(
            unet_config,
            head_channels=config.disc.head_channels,
            head_groups=config.disc.head_groups,
        )
        return cls(
            config=config,
            latent_shape=latent_shape,
            vae_config=vae_config,
            network_config=unet_config,
            model=unet_sd.UNet2DConditionModel(unet_config),
            discriminator=disc,
        )

    def velocity_fn(self, params, t, x, cond):
        """The diffusers UNet takes 1000 t and predicts z0 - z1: flows.py converts."""
        return flows.wrap_diffusers_rectified_flow(
            lambda p, x, ts, c: self.model.apply({"params": p}, x, ts, c)
        )(params, t, x, cond)

    def load_teacher_params(self) -> Any:
        """The pretrained teacher through its converter (float32 NumPy tree)."""
        path = required_path(self.config, "model.teacher_path", "teacher checkpoint")
        config, params = unet_sd_weights.load_unet_sd(path)
        if config != self.network_config:
            raise weights.WeightsError(
                f"teacher UNet config at {path} differs from the one this "
                f"task was built from (the folder changed since)"
            )
        return params

    def abstract_params(self) -> Any:
        return unet_sd.unet_param_shapes(self.network_config)

    # -- conditioning ----------------------------------------------------------------------

    @functools.cached_property
    def _text_encoder(self):
        path = required_path(self.config, "model.text_encoder_path", "CLIP text encoder")
        tok_path = required_path(self.config, "model.tokenizer_path", "CLIP tokenizer")
        text_config, params = clip.load_clip_text(path)
        # Prompts fill every position (77 for CLIP ViT-L/14), as the data preparation encodes
        # captions.
        tokenizer = clip.load_clip_tokenizer(
            tok_path, max_length=text_config.max_position_embeddings
        )
        return text_config, params, tokenizer

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> CLIP last hidden states float32 [N, L, D] (SD's framing: padded with
        end-of-text to L tokens, no attention mask, as SD 1.5 pipelines and the data
        preparation encode captions)."""
        text_config, params, tokenizer = self._text_encoder
        ids, _ = tokenizer(list(prompts))
        return np.asarray(clip.encode_text(params, text_config, ids), np.float32)

    @functools.cached_property
    def null_cond(self) -> np.ndarray:
        """The empty prompt's embedding (teacher CFG)."""
        return self.encode_prompts([""])[0]

    @property
    def grid_prompts(self) -> list[str]:
        return list(self.config.sample.prompts) or [""]

    @property
    def grid_rows(self) -> int:
        return len(self.grid_prompts)

    def grid_conditions(self, per_row: int) -> np.ndarray:
        return np.repeat(self.encode_prompts(self.grid_prompts), per_row, axis=0)

    # -- discriminator ---------------------------------------------------------------------

    def disc_fn(self, disc_params, x, cond, t=None):
        return self.discriminator.apply(
            {"params": disc_params}, x, flows.diffusers_timestep(t), cond
        )

    def init_disc_params(self, rng, teacher_params=None) -> Any:
        """A fresh head on the teacher's encoder (spec section 2)."""
        text_config = self._text_encoder[0]
        cond_shape = (text_config.max_position_embeddings, text_config.hidden_size)
        return unet_discriminator.init_from_teacher(
            self.discriminator, rng, teacher_params, self.latent_shape, cond_shape
        )

    def export_params(self, params, out_dir: str) -> str:
        """A diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
        that ``diffusers.UNet2DConditionModel.from_pretrained`` loads."""
        return unet_sd_weights.export_unet_sd(
            self.network_config, params, os.path.join(out_dir, "unet")
        )
