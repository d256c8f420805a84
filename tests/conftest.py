"""Test session setup: 8 fake CPU devices (set before JAX starts) and a compile cache.

With 8 host devices every test can build a 1-device mesh (``config.mesh.num_devices=1``)
or an 8-device one in the same process, which is how device-count independence is checked.
The persistent compilation cache lets tests that build identical programs (the same tiny
config in several stages) compile once per session.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from scflow_jax import xla_cpu  # noqa: E402

xla_cpu.apply_defaults()  # the same XLA:CPU settings as the CLI; children inherit XLA_FLAGS

import jax  # noqa: E402
import pytest  # noqa: E402


def _let_cuda_torchvision_import_beside_cpu_torch():
    """PyPI's torchvision is built against CUDA torch; beside the CPU torch the Makefile installs,
    its compiled extension does not load and ``import torchvision`` then fails in
    ``torchvision._meta_registrations`` ("operator torchvision::nms does not exist"): that module
    registers fake-tensor kernels for the detection ops the extension would have defined. The tests
    use torchvision only for pytorch-fid's Inception (plain ``torch.nn`` layers), so in that pairing
    the module is replaced by an empty one; everything else imported from torchvision is its own
    code. Any other pairing is left alone."""
    import importlib.metadata
    import sys
    import types

    try:
        torch_version = importlib.metadata.version("torch")
        torchvision_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return
    if torch_version.endswith("+cpu") and not torchvision_version.endswith("+cpu"):
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))


_let_cuda_torchvision_import_beside_cpu_torch()

_CACHE = os.environ.get(
    "SCFLOW_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "scflow_jax_test_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def tiny_config():
    """The embedded default shrunk for tests (unlocked copy: tests may edit it)."""
    from scflow_jax.default_config import get_config

    return get_config("tiny")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random diffusers VAE, CLIP text model and tokenizer, saved as the data-preparation
    tests load them (test_data_prepare.py, test_prepare_tfds.py)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    import clip_testlib as lib
    from vae_testlib import torch_vae

    root = tmp_path_factory.mktemp("models")
    torch_vae().save_pretrained(str(root / "vae"))
    lib._seed(0)
    lib.randomise(CLIPTextModel(CLIPTextConfig(**lib.TEXT))).save_pretrained(
        str(root / "text_encoder")
    )
    lib.write_tokenizer(str(root / "tokenizer"))
    return {k: str(root / k) for k in ("vae", "text_encoder", "tokenizer")}
