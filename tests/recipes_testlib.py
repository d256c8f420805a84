"""The latent recipes' tiny assets for the recipe tests (test_recipes.py,
test_discriminator_conventions.py; not a test module): the shipped configs loaded from configs/,
and tiny random weights written in the real formats (ADM teacher, SD teacher, VAE, CLIP text
encoder and tokenizer).
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import clip_testlib
from scflow_jax.models import clip, unet_adm, unet_sd, unet_sd_weights, weights
from scflow_jax.models.vae import VAE, VAEConfig, vae_state_dict_key
from scflow_jax.tasks import celebahq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_VAE = VAEConfig(
    block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64
)
# One cross-attention level plus the cross-attention mid block: the smallest graph of the family
# (compile time dominates these tests).
TINY_UNET = unet_sd.UNetSDConfig(
    sample_size=8,
    block_out_channels=(16,),
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
)


def load_config(name: str, variant: str = "tiny"):
    spec = importlib.util.spec_from_file_location(
        f"recipe_{name}", os.path.join(REPO, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def random_params(abstract, seed: int):
    """Random float32 parameters for a tree of shapes, in NumPy (compiling a tiny model's init costs
    tens of seconds on a loaded CPU): fan-in-scaled normal kernels, norm scales near 1, small
    non-zero biases and embeddings. Nothing is zero, so zero-initialised output layers do not make
    the tests trivial."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name, shape = path[-1].key, spec.shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(shape[:-1]))
        return (1.0 + 0.05 * noise) if name == "scale" else 0.05 * noise

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _shapes(module, *inputs):
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_vae(folder: str) -> str:
    params = random_params(VAE(TINY_VAE).param_shapes(), 1)
    cfg = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(TINY_VAE).items()
    }
    _write_json(os.path.join(folder, "config.json"), {"_class_name": "AutoencoderKL", **cfg})
    weights.write_safetensors(
        os.path.join(folder, "diffusion_pytorch_model.safetensors"),
        weights.state_dict_from_params(params, vae_state_dict_key),
    )
    return folder


def write_text_encoder(folder: str, max_length: int) -> tuple[str, str]:
    text_config = clip.CLIPTextConfig.tiny(
        vocab_size=len(clip_testlib.VOCAB), max_position_embeddings=max_length
    )
    params = random_params(
        _shapes(clip.CLIPTextTransformer(text_config), jnp.zeros((1, 4), jnp.int32)), 2
    )
    encoder = os.path.join(folder, "text_encoder")
    _write_json(os.path.join(encoder, "config.json"), dataclasses.asdict(text_config))
    weights.write_safetensors(
        os.path.join(encoder, "model.safetensors"),
        weights.state_dict_from_params(params, clip.clip_key_function("text_model.")),
    )
    return encoder, clip_testlib.write_tokenizer(os.path.join(folder, "tokenizer"))


def celeba_config(tmp_path):
    config = load_config("celebahq256")
    config.model.vae_path = write_vae(str(tmp_path / "vae"))
    adm_config = celebahq.adm_config(config, TINY_VAE.latent_channels)
    params = random_params(
        _shapes(unet_adm.ADMUNet(adm_config), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,))), 3
    )
    config.model.teacher_path = str(tmp_path / "model_480.safetensors")
    weights.write_safetensors(
        config.model.teacher_path, weights.state_dict_from_params(params, unet_adm.torch_key)
    )
    return config


def t2i_config(tmp_path):
    config = load_config("t2i_sd15")
    config.model.vae_path = write_vae(str(tmp_path / "vae"))
    config.model.text_encoder_path, config.model.tokenizer_path = write_text_encoder(
        str(tmp_path), 16
    )
    teacher = random_params(unet_sd.unet_param_shapes(TINY_UNET), 5)
    config.model.teacher_path = unet_sd_weights.export_unet_sd(
        TINY_UNET, teacher, str(tmp_path / "instaflow" / "unet")
    )
    return config
