"""What the paper's two latent recipes (SCFLOW_SPEC.md section 7) share: a pretrained teacher,
SD-VAE latents, a prepared latent dataset, VAE-decoded samples and the FID / CLIP-score
evaluation (evaluation/real_eval.py).

Each recipe is a subclass in its own module: ``celebahq.CelebAHQTask`` (unconditional, LFM ADM
teacher, StyleGAN2 D) and ``text_to_image.TextToImageTask`` (SD 1.5 UNet teacher, CLIP text
encoder, UNet-encoder D). Every weight comes from a local path named by a config field
(``config.model.teacher_path``, ``vae_path``, ...); data from a prepared latent dataset
(``config.data.path``, read by ``scflow_jax.data.latents.LatentBatches``). Heavy things load on
first use: distillation never loads the VAE weights, sampling never reads the data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scflow_jax import checkpoint, precision, sampling, sharding
from scflow_jax.data import latents
from scflow_jax.evaluation import generate, real_eval
from scflow_jax.models import vae as vae_lib, weights


def required_path(config, field: str, what: str) -> str:
    """``config.<field>`` (a dotted name), which must be set and exist; the error names the
    field."""
    group, name = field.split(".")
    value = config[group][name]
    if not value:
        raise ValueError(
            f"config.{field} is not set: give the local path of the {what} "
            f"(--config.{field}=PATH); nothing is downloaded"
        )
    if not os.path.exists(value):
        raise FileNotFoundError(f"config.{field}={value!r} ({what}) does not exist")
    return value


def latent_shape_for(config, vae_config: vae_lib.VAEConfig) -> tuple[int, int, int]:
    """(h, w, c) of the latents of ``config.data.image_size`` images under this VAE."""
    size, factor = config.data.image_size, vae_config.downsample_factor
    if size <= 0 or size % factor:
        raise ValueError(
            f"config.data.image_size={size} is not a positive multiple of the "
            f"VAE's downsampling factor {factor}"
        )
    return size // factor, size // factor, vae_config.latent_channels


def read_vae_config(path: str) -> vae_lib.VAEConfig:
    nested = os.path.isfile(os.path.join(path, "vae", "config.json"))
    folder = os.path.join(path, "vae") if nested else path
    return vae_lib.VAEConfig.from_dict(
        weights.read_json(os.path.join(folder, "config.json"), what="VAE config")
    )


VAE_FIELD = ("model.vae_path", "VAE (diffusers AutoencoderKL folder)")


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted functions are cached per task
class LatentTask:
    """The shared part of a latent recipe's task; built by ``from_config``."""

    pretrained_teacher: ClassVar[bool] = True
    sample_grid_upscale: ClassVar[int] = 1
    dataset_kind: ClassVar[str]  # the prepared dataset's kind (data/latents.py KINDS)

    config: Any  # the run's ConfigDict
    latent_shape: tuple[int, int, int]
    vae_config: vae_lib.VAEConfig
    network_config: Any  # the flow network's config (ADMConfig, UNetSDConfig)
    # Linen modules; precision.configure_task replaces them with their bf16/remat versions.
    model: Any  # the flow network (teacher = student)
    discriminator: Any

    @classmethod
    def from_config(cls, config) -> "LatentTask":
        """The task of ``config`` (cached per config: the stages of one run share it)."""
        return _cached_task(cls, json.dumps(config.to_dict(), sort_keys=True))

    @classmethod
    def build(
        cls, config, vae_config: vae_lib.VAEConfig, latent_shape: tuple[int, int, int]
    ) -> "LatentTask":
        """The recipe's networks on ``latent_shape`` latents."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    # -- weights ---------------------------------------------------------------------------

    def init_params(self, rng) -> Any:
        raise ValueError(
            f"config.data.name={self.config.data.name!r} distills a pretrained "
            f"teacher (config.model.teacher_path): it has no freshly initialised "
            f"flow network"
        )

    def load_flow_params(self, path: str, mesh, what: str):
        """Flow-network parameters exported by a stage (the student), checked by name and
        shape, whole on every device of ``mesh`` (``sharding.sampler_shardings``)."""
        abstract = self.abstract_params()
        return checkpoint.load_params(
            path, abstract, sharding.sampler_shardings(abstract, mesh), what=what
        )

    @functools.cached_property
    def _vae(self) -> tuple[vae_lib.VAE, Any]:
        return vae_lib.load_vae(
            required_path(self.config, *VAE_FIELD), dtype=precision.decode_dtype(self.config)
        )

    def decode(self, x) -> jax.Array:
        """Scaled latents [B, h, w, c] -> images in [-1, 1], NHWC float32."""
        vae, params = self._vae
        return vae.latents_to_images(params, jnp.asarray(x, jnp.float32))

    # -- data and monitoring -----------------------------------------------------------------

    def batches(self, global_batch: int, seed: int, process_rows=None):
        """The prepared latent dataset at ``config.data.path`` (``LatentBatches``)."""
        path = required_path(
            self.config, "data.path", "prepared latent dataset (--mode=prepare_data)"
        )
        data = latents.LatentBatches(
            path, global_batch, seed, hflip=self.config.data.hflip, process_rows=process_rows
        )
        if data.scaling_factor != self.vae_config.scaling_factor:
            raise ValueError(
                f"config.data.path={path} was prepared with latent scaling factor "
                f"{data.scaling_factor}, but the VAE at config.model.vae_path "
                f"scales by {self.vae_config.scaling_factor}"
            )
        if data.latent_shape != self.latent_shape:
            raise ValueError(
                f"config.data.path={path} holds latents of shape "
                f"{data.latent_shape}, but config.data.image_size="
                f"{self.image_size} with this VAE gives {self.latent_shape}"
            )
        if data.metadata["kind"] != self.dataset_kind:
            raise ValueError(
                f"config.data.path={path} is a {data.metadata['kind']!r} dataset; "
                f"config.data.name={self.config.data.name!r} needs "
                f"{self.dataset_kind!r}"
            )
        return data

    def grid_conditions(self, per_row: int) -> np.ndarray | None:
        """The conditions of the monitoring grid, ``per_row`` samples per row."""
        raise NotImplementedError

    def grid_sampler(self, seed: int, num_steps: int, per_row: int = 4):
        """A ``params -> images`` of ``grid_rows`` x ``per_row`` decoded samples."""
        n = self.grid_rows * per_row
        cond = self.grid_conditions(per_row)
        cond = None if cond is None else jnp.asarray(cond)
        z1 = sampling.sample_noise(seed, jnp.arange(n), self.latent_shape)
        run = jax.jit(lambda p: sampling.sample(self.velocity_fn, p, z1, cond, num_steps=num_steps))
        return lambda params: np.asarray(self.decode(run(params)))

    # -- what the stages make ----------------------------------------------------------------

    def sample_images(self, params, cond, num_samples: int, *, num_steps: int, config, mesh):
        """Euler from per-sample noise (sample i from ``fold_in(PRNGKey(seed), i)``), in
        batches of ``config.sample.batch_size`` split over the mesh (``generate.ShardedSampler``,
        as in evaluation: a sample is the image the evaluation of the same model, seed and step
        count scores), VAE-decoded."""
        cfg = config.sample
        sampler = generate.ShardedSampler(
            generate.euler_sample_fn(
                self.velocity_fn, num_steps=num_steps, guidance=cfg.guidance, method=cfg.sampler
            ),
            params,
            latent_shape=self.latent_shape,
            seed=config.seed,
            batch_size=cfg.batch_size,
            mesh=mesh,
            null_cond=self.null_cond,
            decode=self.decode,
            field="config.sample.batch_size",
        )
        return generate.generate_images(
            sampler,
            num_samples=num_samples,
            cond_fn=None if cond is None else lambda indices: cond[indices],
        )

    def evaluate(self, config, workdir: str) -> list[dict]:
        return real_eval.evaluate_recipe(config, workdir, self)

    @classmethod
    def evaluation_done(cls, workdir: str) -> bool:
        return real_eval.is_done(workdir)


@functools.lru_cache(maxsize=2)
def _cached_task(cls, config_json: str) -> LatentTask:
    config = ml_collections.ConfigDict(json.loads(config_json))
    vae_config = read_vae_config(required_path(config, *VAE_FIELD))
    return cls.build(config, vae_config, latent_shape_for(config, vae_config))
