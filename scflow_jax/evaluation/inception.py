"""The FID Inception network (pytorch-fid's ``InceptionV3``, 2048-d pool features) in Flax Linen,
NHWC.

This is the network every published FID number is computed with: TensorFlow's 2015-12-05 Inception
graph as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``), i.e. torchvision's
Inception-v3 layout with the FID-specific blocks:

* ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C), ``Mixed_7b`` (E_1): the pooling branch averages with
  ``count_include_pad=False`` (TensorFlow does not count the zero padding);
* ``Mixed_7c`` (E_2): the pooling branch is a 3x3 *max* pool (a quirk of the TF graph, kept for
  comparability);
* every convolution is bias-free and followed by BatchNorm (eps 0.001) in inference mode and a ReLU;
* input handling of ``resize_input=True, normalize_input=True``: bilinear resize to 299x299 with
  half-pixel centres (``align_corners=False``) and *no* antialiasing (torch's ``F.interpolate``
  default; ``jax.image.resize`` antialiases when downsampling unless told not to, which changes
  320->299 features by up to 0.16 per pixel), then ``[0, 1] -> [-1, 1]``.

BatchNorm is kept as an explicit inference-only layer with its four tensors as parameters
(``scale``, ``bias``, ``mean``, ``var``) rather than folded into the convolution at conversion: the
converter then only maps names (the house rule for every converter), each leaf is the checkpoint
tensor unchanged (so a conversion can be checked key by key), and the extra per-channel multiply-add
is fused by XLA into the convolution's epilogue.

``load_inception(path)`` converts pytorch-fid's weights file; nothing is downloaded (see the README
for where to get the file).
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax.models import weights

__all__ = [
    "INCEPTION_SIZE",
    "FEATURE_DIM",
    "InceptionV3FID",
    "resize_for_inception",
    "load_inception",
    "torch_key",
    "abstract_params",
    "init_random_params",
]

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

Pair = Tuple[int, int]


def resize_for_inception(images: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, 299, 299, C]`` exactly as
    ``F.interpolate(mode='bilinear', align_corners=False)``.

    ``antialias=False`` is what makes this torch's resize: with it the triangle kernel spans one
    input pixel on each side whatever the scale, i.e. plain bilinear interpolation between the two
    nearest pixels (the edge renormalisation of ``jax.image.resize`` equals torch's clamping of the
    source coordinate). An image already 299x299 is returned unchanged (``jax.image.resize`` skips
    unit-scale axes).
    """
    b, _, _, c = images.shape
    return jax.image.resize(
        images, (b, INCEPTION_SIZE, INCEPTION_SIZE, c), method="bilinear", antialias=False
    )


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode: ``(x - mean) / sqrt(var + eps) * scale + bias`` with fixed
    statistics."""

    eps: float = BN_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        # Combined in float32, then applied as one multiply-add in the compute dtype.
        multiplier = scale * jax.lax.rsqrt(var + self.eps)
        return x * multiplier.astype(self.dtype) + (bias - mean * multiplier).astype(self.dtype)


class BasicConv2d(nn.Module):
    """Conv (no bias, explicit symmetric padding as in torch) -> BatchNorm -> ReLU."""

    features: int
    kernel_size: Pair
    strides: Pair = (1, 1)
    padding: Pair = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((self.padding[0],) * 2, (self.padding[1],) * 2),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv",
        )(x)
        x = FrozenBatchNorm(dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_no_pad_count(x):
    # TensorFlow's SAME average pool divides by the number of real (unpadded) pixels.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """pytorch-fid's FIDInceptionA (Mixed_5b..5d)."""

    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=(0, 0): BasicConv2d(  # noqa: E731
            f, k, padding=p, dtype=self.dtype, name=name
        )
        branch1x1 = conv(64, (1, 1), "branch1x1")(x)
        branch5x5 = conv(48, (1, 1), "branch5x5_1")(x)
        branch5x5 = conv(64, (5, 5), "branch5x5_2", (2, 2))(branch5x5)
        branch3x3dbl = conv(64, (1, 1), "branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), "branch3x3dbl_2", (1, 1))(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), "branch3x3dbl_3", (1, 1))(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), "branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a, unchanged in the FID network): grid reduction
    35 -> 17."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        branch3x3 = BasicConv2d(384, (3, 3), strides=(2, 2), dtype=self.dtype, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(
            96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2"
        )(branch3x3dbl)
        branch3x3dbl = BasicConv2d(
            96, (3, 3), strides=(2, 2), dtype=self.dtype, name="branch3x3dbl_3"
        )(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid's FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions."""

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, name, p=(0, 0): BasicConv2d(  # noqa: E731
            f, k, padding=p, dtype=self.dtype, name=name
        )
        branch1x1 = conv(192, (1, 1), "branch1x1")(x)
        branch7x7 = conv(c7, (1, 1), "branch7x7_1")(x)
        branch7x7 = conv(c7, (1, 7), "branch7x7_2", (0, 3))(branch7x7)
        branch7x7 = conv(192, (7, 1), "branch7x7_3", (3, 0))(branch7x7)
        dbl = conv(c7, (1, 1), "branch7x7dbl_1")(x)
        dbl = conv(c7, (7, 1), "branch7x7dbl_2", (3, 0))(dbl)
        dbl = conv(c7, (1, 7), "branch7x7dbl_3", (0, 3))(dbl)
        dbl = conv(c7, (7, 1), "branch7x7dbl_4", (3, 0))(dbl)
        dbl = conv(192, (1, 7), "branch7x7dbl_5", (0, 3))(dbl)
        branch_pool = conv(192, (1, 1), "branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a, unchanged in the FID network): grid reduction 17 -> 8."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=(0, 0), s=(1, 1): BasicConv2d(  # noqa: E731
            f, k, strides=s, padding=p, dtype=self.dtype, name=name
        )
        branch3x3 = conv(192, (1, 1), "branch3x3_1")(x)
        branch3x3 = conv(320, (3, 3), "branch3x3_2", s=(2, 2))(branch3x3)
        branch7x7x3 = conv(192, (1, 1), "branch7x7x3_1")(x)
        branch7x7x3 = conv(192, (1, 7), "branch7x7x3_2", (0, 3))(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), "branch7x7x3_3", (3, 0))(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), "branch7x7x3_4", s=(2, 2))(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (``pool="avg"``, Mixed_7b) and FIDInceptionE_2 (``pool="max"``,
    Mixed_7c)."""

    pool: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=(0, 0): BasicConv2d(  # noqa: E731
            f, k, padding=p, dtype=self.dtype, name=name
        )
        branch1x1 = conv(320, (1, 1), "branch1x1")(x)
        b3 = conv(384, (1, 1), "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), "branch3x3_2a", (0, 1))(b3),
                conv(384, (3, 1), "branch3x3_2b", (1, 0))(b3),
            ],
            axis=-1,
        )
        dbl = conv(448, (1, 1), "branch3x3dbl_1")(x)
        dbl = conv(384, (3, 3), "branch3x3dbl_2", (1, 1))(dbl)
        dbl = jnp.concatenate(
            [
                conv(384, (1, 3), "branch3x3dbl_3a", (0, 1))(dbl),
                conv(384, (3, 1), "branch3x3dbl_3b", (1, 0))(dbl),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_no_pad_count(x)
        elif self.pool == "max":
            # Padding with -inf, as torch's max_pool2d does.
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
        branch_pool = conv(192, (1, 1), "branch_pool")(pooled)
        return jnp.concatenate([branch1x1, b3, dbl, branch_pool], axis=-1)


class InceptionV3FID(nn.Module):
    """pytorch-fid's ``InceptionV3([3])``: images ``[B, H, W, 3]`` in ``[0, 1]`` -> pool features
    ``[B, 2048]``.

    Any input size is accepted; with ``resize_input`` (the FID setting) it is resized to 299x299
    first. Features are returned in float32 whatever the compute ``dtype``.
    """

    resize_input: bool = True
    normalize_input: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"InceptionV3FID expects [B, H, W, 3] RGB images in [0, 1], got shape "
                f"{images.shape}"
            )
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_for_inception(x)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = x.astype(self.dtype)
        d = self.dtype
        x = BasicConv2d(32, (3, 3), strides=(2, 2), dtype=d, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), dtype=d, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv2d(80, (1, 1), dtype=d, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, dtype=d, name="Mixed_5b")(x)
        x = InceptionA(64, dtype=d, name="Mixed_5c")(x)
        x = InceptionA(64, dtype=d, name="Mixed_5d")(x)
        x = InceptionB(dtype=d, name="Mixed_6a")(x)
        x = InceptionC(128, dtype=d, name="Mixed_6b")(x)
        x = InceptionC(160, dtype=d, name="Mixed_6c")(x)
        x = InceptionC(160, dtype=d, name="Mixed_6d")(x)
        x = InceptionC(192, dtype=d, name="Mixed_6e")(x)
        x = InceptionD(dtype=d, name="Mixed_7a")(x)
        x = InceptionE("avg", dtype=d, name="Mixed_7b")(x)
        x = InceptionE("max", dtype=d, name="Mixed_7c")(x)
        # Adaptive average pool to 1x1, accumulated in float32.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# Converter

_BN_LEAF_TO_TORCH = {
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_key(path: Tuple[str, ...]) -> str:
    """The pytorch-fid state-dict key of a Flax leaf: module names are identical,
    ``kernel`` -> ``weight`` and the BatchNorm leaves ->
    ``weight``/``bias``/``running_mean``/``running_var``."""
    *modules, leaf = path
    leaf = (
        "weight" if leaf == "kernel" else _BN_LEAF_TO_TORCH[leaf] if modules[-1] == "bn" else leaf
    )
    return ".".join([*modules, leaf])


def _ignored_key(key: str) -> bool:
    # The 1008-way logits layer is not part of the pool features; BN's step counter is bookkeeping.
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def abstract_params() -> Any:
    """Shapes and dtypes of the parameter tree (no computation, no memory)."""
    dummy = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3FID().init, jax.random.PRNGKey(0), dummy)["params"]


def load_inception(path: str) -> dict:
    """Converts pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict) to the
    parameters of ``InceptionV3FID`` (a nested dict of float32 NumPy arrays).

    ``fc.*`` (the logits layer) and ``*.num_batches_tracked`` are ignored; any other difference from
    the FID network (a torchvision Inception with ``AuxLogits``, another network entirely) raises
    ``WeightsError`` naming the missing, unexpected and mis-shaped keys.
    """
    source = weights.read_torch_state_dict(path)
    return weights.assemble_params(
        abstract_params(),
        source,
        torch_key,
        what=f"FID Inception-v3 from {path}",
        ignore_unused=_ignored_key,
    )


def init_random_params(seed: int = 0) -> dict:
    """Random parameters (for benchmarks and tests; FID needs ``load_inception``)."""
    dummy = jnp.zeros((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    params = jax.jit(InceptionV3FID().init)(jax.random.PRNGKey(seed), dummy)["params"]
    return jax.tree.map(np.asarray, params)
