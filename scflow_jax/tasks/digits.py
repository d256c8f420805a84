"""The embedded default: scikit-learn's 8x8 digits as a tiny text-to-image task.

The teacher is trained here (--mode=train_teacher), in pixel space. The digits prompts are
encoded once by a frozen, seeded CLIP-architecture text encoder into a condition table;
examples carry their row of it, exactly as a real text-to-image dataset carries precomputed
CLIP hidden states. Evaluation: evaluation/digits_eval.py (a small digit classifier's FD and
prompt accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scflow_jax import checkpoint, sampling, sharding
from scflow_jax.data import digits
from scflow_jax.data.pipeline import InMemoryBatches
from scflow_jax.data.tokenizer import WordTokenizer
from scflow_jax.evaluation import digits_eval
from scflow_jax.models import clip, discriminators, small


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted samplers are cached per task
class DigitsTask:
    image_shape: tuple[int, int, int]
    train: dict[str, np.ndarray]  # image [N,H,W,C], cond [N,L,D], label [N]
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    cond_table: np.ndarray  # [num_prompts, L, D]; the last row is the null prompt
    prompts: list[str]
    text: Any  # config.text: the frozen text encoder's settings
    model: Any  # the flow network (teacher, student, target, EMA)
    discriminator: Any

    pretrained_teacher: ClassVar[bool] = False
    sample_grid_upscale: ClassVar[int] = 4  # 8x8 digits
    disc_takes_time: ClassVar[bool] = False
    unconditional: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config) -> "DigitsTask":
        # Only the fields that shape the task form the cache key.
        key = {k: config[k].to_dict() for k in ("data", "text", "model", "disc")}
        key["seed"] = config.seed
        return _digits_task(json.dumps(key, sort_keys=True))

    @property
    def null_cond(self) -> np.ndarray:
        return self.cond_table[-1]

    def conditions(self, labels: np.ndarray) -> np.ndarray:
        return self.cond_table[np.asarray(labels)]

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Any prompts in the digits vocabulary (an error names the words outside it)."""
        return encode_prompts(self.text, prompts)

    def batches(self, global_batch: int, seed: int, process_rows=None) -> InMemoryBatches:
        return InMemoryBatches(
            {k: self.train[k] for k in ("image", "cond")},
            global_batch,
            seed=seed,
            process_rows=process_rows,
        )

    @property
    def grid_rows(self) -> int:
        return len(self.prompts) - 1

    def velocity_fn(self, params, t, x, cond):
        """The network in the project convention (flows.py): F(t, x, c) ~ z1 - z0."""
        return self.model.apply({"params": params}, x, t, cond)

    def grid_sampler(self, seed: int, num_steps: int, per_prompt: int = 8):
        """A jitted ``params -> images`` of ``per_prompt`` Euler samples of every non-null
        prompt, in prompt order (one grid row per prompt)."""
        labels = np.repeat(np.arange(len(self.prompts) - 1), per_prompt)
        cond = jnp.asarray(self.conditions(labels))
        z1 = jax.random.normal(jax.random.PRNGKey(seed), (len(labels),) + self.image_shape)
        run = jax.jit(lambda p: sampling.sample(self.velocity_fn, p, z1, cond, num_steps=num_steps))
        return lambda params: np.asarray(run(params))

    def sample_images(self, params, cond, num_samples: int, *, num_steps: int, config, mesh):
        """All samples as one global batch (padded to a multiple of the device count) from
        ``normal(PRNGKey(config.seed), [num_samples, ...])``: every process computes the same
        noise and conditions, feeds its own rows and gets every image back."""
        cfg = config.sample
        z1 = np.asarray(
            jax.random.normal(jax.random.PRNGKey(config.seed), (num_samples,) + self.image_shape)
        )
        batch = sharding.shard_global_batch(
            sharding.pad_batch({"z1": z1, "cond": cond}, sharding.padded_size(num_samples, mesh)),
            mesh,
        )
        images = jax.jit(
            lambda p, z, c, n: sampling.sample(
                self.velocity_fn,
                p,
                z,
                c,
                num_steps=num_steps,
                method=cfg.sampler,
                null_cond=n,
                guidance=cfg.guidance,
            )
        )(params, batch["z1"], batch["cond"], sharding.put_replicated(self.null_cond, mesh))
        return sharding.to_host(images)[:num_samples]

    def init_params(self, rng) -> Any:
        b = 2
        x = jnp.zeros((b,) + self.image_shape, jnp.float32)
        cond = jnp.zeros((b,) + self.cond_table.shape[1:], jnp.float32)
        return self.model.init(rng, x, jnp.zeros((b,), jnp.float32), cond)["params"]

    def abstract_params(self) -> Any:
        return jax.eval_shape(self.init_params, jax.random.PRNGKey(0))

    def load_teacher_params(self) -> Any:
        raise ValueError(
            "config.data.name='digits' trains its teacher (--mode=train_teacher); "
            "its parameters are read from config.distill.teacher_params"
        )

    def load_flow_params(self, path: str, mesh, what: str) -> Any:
        """Flow-network parameters exported by a stage, checked name by name against this
        task's architecture, whole on every device of ``mesh`` (``sharding.sampler_shardings``)."""
        abstract = self.abstract_params()
        return checkpoint.load_params(
            path, abstract, sharding.sampler_shardings(abstract, mesh), what=what
        )

    def disc_fn(self, disc_params, x, cond):
        """D(x, c): the prompt enters as the mean of its token states (projection head)."""
        pooled = jnp.mean(cond, axis=1) if self.discriminator.cond_dim else None
        return self.discriminator.apply({"params": disc_params}, x, pooled)

    def init_disc_params(self, rng, teacher_params=None) -> Any:
        del teacher_params  # D starts random
        b = 4
        x = jnp.zeros((b,) + self.image_shape, jnp.float32)
        pooled = jnp.zeros((b, self.cond_table.shape[-1]), jnp.float32)
        return self.discriminator.init(rng, x, pooled if self.discriminator.cond_dim else None)[
            "params"
        ]

    def evaluate(self, config, workdir: str) -> list[dict]:
        return digits_eval.evaluate(config, workdir, self)

    @classmethod
    def evaluation_done(cls, workdir: str) -> bool:
        return digits_eval.is_done(workdir)

    def export_params(self, params, out_dir: str) -> str:
        raise ValueError(
            "--mode=export writes a student in its pretrained teacher's format; "
            "config.data.name='digits' trains its own teacher and has none"
        )


def encode_prompts(text, prompts: list[str]) -> np.ndarray:
    """Runs the frozen, seeded text encoder of ``text`` (config.text) once over the prompts."""
    tokenizer = WordTokenizer(digits.vocabulary(), max_length=text.max_length)
    text_config = clip.CLIPTextConfig.tiny(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=text.max_length,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        intermediate_size=text.intermediate_size,
        eos_token_id=tokenizer.eos_token_id,
    )
    ids = tokenizer(prompts)
    encoder = clip.CLIPTextTransformer(text_config)
    # Jitted: run eagerly, the init compiles each of its operations on its own (seconds).
    params = jax.jit(encoder.init)(jax.random.PRNGKey(text.init_seed), jnp.asarray(ids))
    return np.asarray(clip.encode_text(params, text_config, ids), np.float32)


@functools.lru_cache(maxsize=4)
def _digits_task(config_json: str) -> DigitsTask:
    config = ml_collections.ConfigDict(json.loads(config_json))
    split = digits.load_digits_split(config.data.heldout_fraction, seed=config.seed)
    prompts = digits.prompts()
    cond_table = encode_prompts(config.text, prompts)
    model = small.SmallUNet(
        out_channels=digits.IMAGE_SHAPE[-1],
        channels=config.model.channels,
        channel_mult=tuple(config.model.channel_mult),
        num_res_blocks=config.model.num_res_blocks,
        attention_levels=tuple(config.model.attention_levels),
        num_heads=config.model.num_heads,
    )
    disc = discriminators.StyleGANDiscriminator(
        resolution=digits.IMAGE_SHAPE[0],
        in_channels=digits.IMAGE_SHAPE[-1],
        channel_base=config.disc.channel_base,
        channel_max=config.disc.channel_max,
        mbstd_group_size=config.disc.mbstd_group_size,
        cond_dim=cond_table.shape[-1] if config.disc.conditional else 0,
    )
    train = {
        "image": split.train_images,
        "cond": cond_table[split.train_labels],
        "label": split.train_labels,
    }
    return DigitsTask(
        image_shape=digits.IMAGE_SHAPE,
        train=train,
        heldout_images=split.heldout_images,
        heldout_labels=split.heldout_labels,
        cond_table=cond_table,
        prompts=prompts,
        text=config.text,
        model=model,
        discriminator=disc,
    )
