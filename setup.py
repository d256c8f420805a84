"""Packaging for scflow_jax: SCFlow (self-corrected flow distillation) in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # Lower bounds are the versions pip resolves on Python 3.11 (jax 0.10.2, flax 0.12.8);
    # nothing caps newer releases (Python 3.12+ gets newer jax).
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "ml_collections>=1.0.0",
    "absl-py>=2.1.0",
    "clu>=0.0.12",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.10",
    "transformers>=4.46",
    "safetensors>=0.4.5",
    "pillow>=10.0",
    "scikit-learn>=1.5",
    "numpy>=1.26",
    "scipy>=1.11",
    "tensorboardX>=2.6.2",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6"],
    # gs:// workdirs: etils.epath (outputs, Orbax's metadata) reaches GCS through gcsfs when
    # TensorFlow is absent.
    "gcs": ["gcsfs"],
    # Only for building TFDS datasets (`tfds build`: coco_captions' and celeb_a_hq's builders call
    # TensorFlow) or converting tfrecord ones to array_record (`tfds convert_format`); prepare_data
    # reads array_record TFDS datasets without it.
    "tensorflow": ["tensorflow"],
    # PyTorch reference implementations, used only by parity tests and by the .pth converters.
    "parity": [
        "torch>=2.5",
        "torchvision>=0.20",
        "diffusers>=0.31",
        "transformers>=4.46",
        "pytorch-fid>=0.3.0",
    ],
    # --mode=plan for GPUs that are not here: JAX's CUDA plugin of the installed jax release
    # compiles for a deviceless card on a CPU host (jax's "cuda12-local" extra: no NVIDIA wheels,
    # no driver). cuDNN's library lets jax's checks pass its fused attention into the plan, as on
    # the card.
    "plan-gpu": ["jax[cuda12-local]>=0.10.2", "nvidia-cudnn-cu12"],
    # --mode=plan for Cloud TPU slices that are not here: libtpu of the installed jax release.
    "plan-tpu": ["jax[tpu]>=0.10.2"],
}

setup(
    name="scflow_jax",
    version="0.1.0",
    description=(
        "SCFlow: self-corrected flow distillation for one- and few-step generation, in JAX/Flax"
    ),
    long_description=open("README.md", encoding="utf-8").read()
    if __import__("os").path.exists("README.md")
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["scflow_jax", "scflow_jax.*"]),
    # The GPU cards --mode=plan knows by name (XLA GpuTargetConfig text files).
    package_data={"scflow_jax.planning": ["gpu_targets/*.txtpb"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
