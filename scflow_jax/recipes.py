"""The paper's two latent recipes (SCFLOW_SPEC.md section 7) as tasks the stages run.

``celebahq256``: unconditional CelebA-HQ 256 in SD-VAE latents (4x32x32), the LFM ADM flow teacher
(``load_unet_adm`` + ``flows.wrap_lfm_flow``), the StyleGAN2 latent discriminator of spec section 5.

``t2i_sd15``: text-to-image in SD 1.5 latents (4x64x64), a diffusers rectified-flow UNet teacher (InstaFlow /
2-rectified flow: ``load_unet_sd`` + ``flows.wrap_diffusers_rectified_flow``), prompts through the CLIP text
encoder, the teacher guided (CFG against the empty prompt), the UNet-encoder discriminator of spec section 5.

Every weight comes from a local path named by a config field (``config.model.teacher_path``, ``vae_path``,
``text_encoder_path``, ``tokenizer_path``); data from a prepared latent dataset (``config.data.path``, read by
``scflow_jax.data.latents.LatentBatches``). Heavy things load on first use: distillation never loads the VAE
weights, sampling never reads the data.

The interface the stages use (shared with the digits ``tasks.Task``):
``velocity_fn``, ``disc_fn`` (+ ``disc_takes_time``), ``init_disc_params(rng, teacher_params)``, ``null_cond``,
``pretrained_teacher`` / ``load_teacher_params()``, ``load_flow_params(path, mesh, what)``,
``batches(global_batch, seed, process_rows)``, ``grid_sampler(seed, num_steps)`` / ``grid_rows``; and, for latent recipes,
``decode``, ``encode_prompts``, ``latent_shape``, ``unconditional``, ``image_size``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scflow_jax import checkpoint, flows, precision, sampling, sharding
from scflow_jax.evaluation import generate
from scflow_jax.models import clip, discriminators, unet_adm, unet_discriminator, unet_sd, vae as vae_lib, weights

RECIPES = ("celebahq256", "t2i_sd15")


def is_recipe(config) -> bool:
    return config.data.name in RECIPES


def required_path(config, field: str, what: str) -> str:
    """``config.<field>`` (a dotted name), which must be set and exist; the error names the field."""
    group, name = field.split(".")
    value = config[group][name]
    if not value:
        raise ValueError(f"config.{field} is not set: give the local path of the {what} "
                         f"(--config.{field}=PATH); nothing is downloaded")
    if not os.path.exists(value):
        raise FileNotFoundError(f"config.{field}={value!r} ({what}) does not exist")
    return value


def latent_shape_for(config, vae_config: vae_lib.VAEConfig) -> tuple[int, int, int]:
    """(h, w, c) of the latents of ``config.data.image_size`` images under this VAE."""
    size, factor = config.data.image_size, vae_config.downsample_factor
    if size <= 0 or size % factor:
        raise ValueError(f"config.data.image_size={size} is not a positive multiple of the VAE's downsampling "
                         f"factor {factor}")
    return size // factor, size // factor, vae_config.latent_channels


def _read_vae_config(path: str) -> vae_lib.VAEConfig:
    folder = os.path.join(path, "vae") if os.path.isfile(os.path.join(path, "vae", "config.json")) else path
    return vae_lib.VAEConfig.from_dict(weights.read_json(os.path.join(folder, "config.json"), what="VAE config"))


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted functions are cached per task
class LatentTask:
    """What a latent recipe's stages need; built by ``build_recipe_task``."""

    pretrained_teacher: ClassVar[bool] = True

    config: Any                           # the run's ConfigDict
    latent_shape: tuple[int, int, int]
    vae_config: vae_lib.VAEConfig
    network_config: Any                   # unet_adm.ADMConfig or unet_sd.UNetSDConfig
    # Linen modules; precision.configure_task replaces them with their bf16/remat versions.
    model: Any                            # ADMUNet or UNet2DConditionModel (teacher = student)
    discriminator: Any                    # StyleGANDiscriminator or UNetDiscriminator

    @property
    def unconditional(self) -> bool:
        return isinstance(self.network_config, unet_adm.ADMConfig)

    @property
    def disc_takes_time(self) -> bool:
        return isinstance(self.discriminator, unet_discriminator.UNetDiscriminator)

    def velocity_fn(self, params, t, x, cond):
        """The network in the project convention (flows.py), through the teacher's wrapper."""
        if self.unconditional:  # LFM: time as is, velocity as is; no condition
            return flows.wrap_lfm_flow(
                lambda p, x, t, c: self.model.apply({"params": p}, x, t))(params, t, x, cond)
        return flows.wrap_diffusers_rectified_flow(
            lambda p, x, ts, c: self.model.apply({"params": p}, x, ts, c))(params, t, x, cond)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    # -- weights -----------------------------------------------------------------------------------------------

    def load_teacher_params(self):
        """The pretrained teacher through its real converter (float32 NumPy tree)."""
        path = required_path(self.config, "model.teacher_path", "teacher checkpoint")
        if isinstance(self.network_config, unet_adm.ADMConfig):
            return unet_adm.load_unet_adm(path, self.network_config,
                                          subkey=self.config.model.teacher_subkey or None)
        config, params = unet_sd.load_unet_sd(path)
        if config != self.network_config:
            raise weights.WeightsError(f"teacher UNet config at {path} differs from the one this task was built "
                                       f"from (the folder changed since)")
        return params

    def abstract_params(self):
        if isinstance(self.network_config, unet_adm.ADMConfig):
            side = self.network_config.downsample_factor
            x = jnp.zeros((1, side, side, self.latent_shape[-1]), jnp.float32)
            model = unet_adm.ADMUNet(self.network_config)
            return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.float32))["params"]
        return unet_sd.unet_param_shapes(self.network_config)

    def load_flow_params(self, path: str, mesh, what: str):
        """Flow-network parameters exported by a stage (the student), checked by name and shape,
        whole on every device of ``mesh`` (``sharding.sampler_shardings``)."""
        abstract = self.abstract_params()
        return checkpoint.load_params(path, abstract, sharding.sampler_shardings(abstract, mesh), what=what)

    @functools.cached_property
    def _vae(self) -> tuple[vae_lib.VAE, Any]:
        path = required_path(self.config, "model.vae_path", "VAE (diffusers AutoencoderKL folder)")
        return vae_lib.load_vae(path, dtype=precision.decode_dtype(self.config))

    def decode(self, latents) -> jax.Array:
        """Scaled latents [B, h, w, c] -> images in [-1, 1], NHWC float32."""
        vae, params = self._vae
        return vae.latents_to_images(params, jnp.asarray(latents, jnp.float32))

    # -- conditioning --------------------------------------------------------------------------------------------

    @functools.cached_property
    def _text_encoder(self):
        if self.unconditional:
            raise ValueError(f"config.data.name={self.config.data.name!r} is unconditional: it has no prompts")
        path = required_path(self.config, "model.text_encoder_path", "CLIP text encoder")
        tok_path = required_path(self.config, "model.tokenizer_path", "CLIP tokenizer")
        text_config, params = clip.load_clip_text(path)
        # Prompts fill every position (77 for CLIP ViT-L/14), as the data preparation encodes captions.
        tokenizer = clip.load_clip_tokenizer(tok_path, max_length=text_config.max_position_embeddings)
        return text_config, params, tokenizer

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> CLIP last hidden states float32 [N, L, D] (SD's framing: padded with end-of-text to L
        tokens, no attention mask, as SD 1.5 pipelines and the data preparation encode captions)."""
        text_config, params, tokenizer = self._text_encoder
        ids, _ = tokenizer(list(prompts))
        return np.asarray(clip.encode_text(params, text_config, ids), np.float32)

    @functools.cached_property
    def null_cond(self) -> Optional[np.ndarray]:
        """The empty prompt's embedding (teacher CFG); None for unconditional recipes."""
        return None if self.unconditional else self.encode_prompts([""])[0]

    # -- discriminator -------------------------------------------------------------------------------------------

    def disc_fn(self, disc_params, x, cond, t=None):
        if self.disc_takes_time:
            return self.discriminator.apply({"params": disc_params}, x, flows.diffusers_timestep(t), cond)
        return self.discriminator.apply({"params": disc_params}, x, None)

    def init_disc_params(self, rng, teacher_params=None):
        """Latent StyleGAN D: random; UNet-encoder D: fresh head + the teacher's encoder (spec section 2)."""
        if self.disc_takes_time:
            text_config = self._text_encoder[0]
            cond_shape = (text_config.max_position_embeddings, text_config.hidden_size)
            return unet_discriminator.init_from_teacher(self.discriminator, rng, teacher_params,
                                                        self.latent_shape, cond_shape)
        x = jnp.zeros((4,) + self.latent_shape, jnp.float32)
        return self.discriminator.init(rng, x, None)["params"]

    # -- data and monitoring -------------------------------------------------------------------------------------

    def batches(self, global_batch: int, seed: int, process_rows=None):
        """The prepared latent dataset at ``config.data.path`` (``scflow_jax.data.latents.LatentBatches``)."""
        path = required_path(self.config, "data.path", "prepared latent dataset (--mode=prepare_data)")
        from scflow_jax.data.latents import LatentBatches  # the data-preparation module

        data = LatentBatches(path, global_batch, seed, hflip=self.config.data.hflip, process_rows=process_rows)
        if data.scaling_factor != self.vae_config.scaling_factor:
            raise ValueError(f"config.data.path={path} was prepared with latent scaling factor "
                             f"{data.scaling_factor}, but the VAE at config.model.vae_path scales by "
                             f"{self.vae_config.scaling_factor}")
        if data.latent_shape != self.latent_shape:
            raise ValueError(f"config.data.path={path} holds latents of shape {data.latent_shape}, but "
                             f"config.data.image_size={self.image_size} with this VAE gives {self.latent_shape}")
        kind = "latents" if self.unconditional else "text_to_image"
        if data.metadata["kind"] != kind:
            raise ValueError(f"config.data.path={path} is a {data.metadata['kind']!r} dataset; "
                             f"config.data.name={self.config.data.name!r} needs {kind!r}")
        return data

    @property
    def grid_prompts(self) -> list[str]:
        return list(self.config.sample.prompts) or [""]

    @property
    def grid_rows(self) -> int:
        return 2 if self.unconditional else len(self.grid_prompts)

    def grid_sampler(self, seed: int, num_steps: int, per_row: int = 4):
        """A ``params -> images`` of ``grid_rows`` x ``per_row`` decoded samples (one row per prompt)."""
        n = self.grid_rows * per_row
        cond = None if self.unconditional else jnp.asarray(
            np.repeat(self.encode_prompts(self.grid_prompts), per_row, axis=0))
        z1 = generate.sample_noise(seed, jnp.arange(n), self.latent_shape)
        run = jax.jit(lambda p: sampling.sample(self.velocity_fn, p, z1, cond, num_steps=num_steps))
        return lambda params: np.asarray(self.decode(run(params)))


def adm_config(config, latent_channels: int) -> unet_adm.ADMConfig:
    """The ADM UNet of ``config.model.adm`` on ``latent_channels``-channel latents."""
    m = config.model.adm
    return unet_adm.ADMConfig(
        in_channels=latent_channels, out_channels=latent_channels, model_channels=m.model_channels,
        channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions), num_heads=m.num_heads,
        use_scale_shift_norm=m.use_scale_shift_norm, dropout=m.dropout, num_groups=m.num_groups)


def _adm_task(config, vae_config, latent_shape) -> LatentTask:
    network_config = adm_config(config, latent_shape[-1])
    if latent_shape[0] % network_config.downsample_factor:
        raise ValueError(f"latents of {latent_shape[0]} pixels (config.data.image_size={config.data.image_size}) "
                         f"are not divisible by the ADM UNet's {network_config.downsample_factor}x downsampling "
                         f"(config.model.adm.channel_mult)")
    disc = discriminators.StyleGANDiscriminator(
        resolution=latent_shape[0], in_channels=latent_shape[-1], channel_base=config.disc.channel_base,
        channel_max=config.disc.channel_max, mbstd_group_size=config.disc.mbstd_group_size)
    return LatentTask(config=config, latent_shape=latent_shape, vae_config=vae_config,
                      network_config=network_config, model=unet_adm.ADMUNet(network_config), discriminator=disc)


def _sd_task(config, vae_config, latent_shape) -> LatentTask:
    path = required_path(config, "model.teacher_path", "teacher UNet (diffusers folder)")
    folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    unet_config = unet_sd.UNetSDConfig.from_dict(weights.read_json(os.path.join(folder, "config.json"),
                                                                   what="teacher UNet config"))
    if unet_config.in_channels != latent_shape[-1]:
        raise ValueError(f"teacher UNet takes {unet_config.in_channels} channels but the VAE "
                         f"(config.model.vae_path) makes {latent_shape[-1]}")
    disc = unet_discriminator.UNetDiscriminator(
        unet_config, head_channels=config.disc.head_channels, head_groups=config.disc.head_groups)
    return LatentTask(config=config, latent_shape=latent_shape, vae_config=vae_config,
                      network_config=unet_config, model=unet_sd.UNet2DConditionModel(unet_config),
                      discriminator=disc)


@functools.lru_cache(maxsize=2)
def _cached_task(config_json: str) -> LatentTask:
    config = ml_collections.ConfigDict(json.loads(config_json))
    vae_config = _read_vae_config(required_path(config, "model.vae_path", "VAE (diffusers AutoencoderKL folder)"))
    latent_shape = latent_shape_for(config, vae_config)
    return (_adm_task if config.data.name == "celebahq256" else _sd_task)(config, vae_config, latent_shape)


def build_recipe_task(config) -> LatentTask:
    """The task of ``config.data.name`` in ``RECIPES`` (cached per config: stages of one run share it)."""
    if config.data.name not in RECIPES:
        raise ValueError(f"config.data.name={config.data.name!r} is not a recipe; expected one of {RECIPES}")
    return _cached_task(json.dumps(config.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------------------------------------------------
# Export of the distilled student in its teacher's format


def export_student(config, workdir: str, *, task: Optional[LatentTask] = None) -> str:
    """Writes the distilled student (eval EMA, ``<workdir>/distill/params``) in the teacher's own format:
    t2i: a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
    ``diffusers.UNet2DConditionModel.from_pretrained`` loads; ADM: ``model.safetensors`` with guided-diffusion key
    names (``load_unet_adm`` reads it). Output: ``config.export.output_dir`` or ``<workdir>/export``."""
    from scflow_jax import distill  # the stage owns its paths

    task = task or build_recipe_task(config)
    path = distill.stage_dirs(workdir).params
    if not checkpoint.params_exist(path):
        raise FileNotFoundError(f"no distilled student at {path}: run --mode=distill first")
    mesh = sharding.make_mesh(1, 1)
    params = jax.device_get(task.load_flow_params(path, mesh, what="student parameters"))
    out = config.export.output_dir or os.path.join(workdir, "export")
    if isinstance(task.network_config, unet_sd.UNetSDConfig):
        return unet_sd.export_unet_sd(task.network_config, params, os.path.join(out, "unet"))
    os.makedirs(out, exist_ok=True)
    file = os.path.join(out, "model.safetensors")
    weights.write_safetensors(file, weights.state_dict_from_params(params, unet_adm.torch_key),
                              metadata={"format": "pt"})
    return file
