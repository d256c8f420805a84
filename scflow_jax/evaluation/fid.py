"""FID with the pytorch-fid Inception network: a mesh-sharded feature extractor, resumable float64
accumulation, and reference statistics from a folder of images.

The pieces, each usable alone:

* ``FeatureExtractor``: one jitted call per global batch, images split over the ``data`` axis of the
  mesh, features gathered to the host. Any number of images is accepted: the last, short chunk is
  zero-padded to the compiled batch size and the padded rows are dropped, so nothing is lost or
  counted twice and nothing recompiles.
* ``FIDAccumulator``: the running float64 statistics of ``frechet.RunningStatistics`` (sum of x and
  of x xᵀ on the host, so 50k samples never sit in memory) plus the number of batches consumed,
  saved atomically to an ``.npz`` every ``save_every`` batches. ``accumulate`` restarts from the
  saved batch count, so an interrupted evaluation continues where it stopped and ends with the
  statistics of an uninterrupted run.
* ``image_folder_statistics`` / ``fid_stats`` (``--mode=fid_stats``): reference ``mu``/``sigma`` of
  a folder of images, read as pytorch-fid reads them (RGB, ``ToTensor`` scaling to [0, 1] at native
  size; the network resizes).

Statistics files are pytorch-fid's ``.npz`` (``mu``, ``sigma``), read and written by ``frechet.py``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from scflow_jax import monitoring, sharding
from scflow_jax.evaluation import frechet, inception

__all__ = [
    "IMAGE_EXTENSIONS",
    "FeatureExtractor",
    "inception_feature_extractor",
    "FIDAccumulator",
    "accumulate",
    "fid_against_reference",
    "list_images",
    "load_image",
    "image_folder_statistics",
    "validate_fid_stats_config",
    "fid_stats",
]

logger = logging.getLogger(__name__)

# pytorch-fid's list (fid_score.IMAGE_EXTENSIONS); matched case-insensitively here.
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})


# --------------------------------------------------------------------------------------------------
# Sharded feature extraction


class FeatureExtractor:
    """``extractor(images) -> [N, D] float32 features`` on host, computed ``batch_size`` images at a
    time.

    ``apply_fn(params, images) -> [B, D]`` is jitted once per image shape with the images split over
    the mesh's ``data`` axis and ``params`` replicated. ``batch_size`` is the global batch (a
    multiple of the device count). In a multi-process run every process passes the same images; each
    feeds its own rows and the features are gathered to every process.
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, jax.Array], jax.Array],
        params: Any,
        mesh: jax.sharding.Mesh,
        batch_size: int,
        *,
        field: str = "batch_size",
    ):
        self.batch_size = int(batch_size)
        sharding.check_global_batch(self.batch_size, mesh, field)
        self._mesh = mesh
        batch_sharding = sharding.batch_sharding(mesh)
        self._params = sharding.put_replicated(params, mesh)
        self._fn = jax.jit(
            apply_fn,
            in_shardings=(sharding.replicated(mesh), batch_sharding),
            out_shardings=batch_sharding,
        )

    def _one_batch(self, chunk: np.ndarray) -> np.ndarray:
        n = chunk.shape[0]
        # Copies of the last image fill the compiled shape; they are sliced off below and never
        # reach the statistics.
        images = sharding.shard_global_batch(sharding.pad_batch(chunk, self.batch_size), self._mesh)
        return sharding.to_host(self._fn(self._params, images)).astype(np.float32)[:n]

    def __call__(self, images: Any) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(
                f"FeatureExtractor needs a non-empty batch [N, ...] of images, got shape "
                f"{images.shape}"
            )
        return np.concatenate(
            [
                self._one_batch(images[i : i + self.batch_size])
                for i in range(0, images.shape[0], self.batch_size)
            ]
        )


def inception_feature_extractor(
    inception_path: str,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    *,
    dtype: Any = jnp.float32,
    field: str = "batch_size",
) -> FeatureExtractor:
    """The FID feature extractor: pytorch-fid's Inception from ``inception_path``; images
    ``[N, H, W, 3]`` in ``[0, 1]`` (any H, W) -> ``[N, 2048]`` pool features."""
    model = inception.InceptionV3FID(dtype=dtype)
    params = inception.load_inception(inception_path)
    return FeatureExtractor(
        lambda p, x: model.apply({"params": p}, x), params, mesh, batch_size, field=field
    )


# --------------------------------------------------------------------------------------------------
# Resumable accumulation


class FIDAccumulator:
    """Float64 running statistics plus the number of batches consumed, checkpointed to
    ``state_path``.

    ``fingerprint`` describes the job (data, sample count, batch size, network); resuming from a
    state saved with another fingerprint is refused, so a changed evaluation never silently mixes in
    old features.
    """

    _KEYS = ("num_batches", "fingerprint")

    def __init__(
        self,
        dim: int | None = None,
        *,
        state_path: str | None = None,
        save_every: int = 0,
        fingerprint: str = "",
    ):
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: never), got {save_every}")
        if save_every and not state_path:
            raise ValueError("FIDAccumulator: save_every > 0 needs a state_path to save to")
        self.statistics = frechet.RunningStatistics(dim)
        self.num_batches = 0
        self.state_path = state_path
        self.save_every = int(save_every)
        self.fingerprint = fingerprint

    @property
    def num_samples(self) -> int:
        return self.statistics.count

    @classmethod
    def restore_or_create(
        cls, state_path: str, dim: int | None = None, *, save_every: int = 0, fingerprint: str = ""
    ) -> "FIDAccumulator":
        """Resumes from ``state_path`` if it exists, else starts empty."""
        acc = cls(dim, state_path=state_path, save_every=save_every, fingerprint=fingerprint)
        if not epath.Path(state_path).exists():
            return acc
        with frechet.read_npz(state_path) as data:
            missing = [k for k in cls._KEYS if k not in data.files]
            if missing:
                raise ValueError(
                    f"FID accumulator state {state_path} is missing key(s) {missing}; "
                    f"delete it to start the evaluation over"
                )
            saved = str(data["fingerprint"])
            if saved != fingerprint:
                raise ValueError(
                    f"FID accumulator state {state_path} belongs to another evaluation "
                    f"(saved for {saved!r}, this run is {fingerprint!r}); delete it to start over"
                )
            try:
                acc.statistics = frechet.RunningStatistics.from_state_dict(dict(data))
            except ValueError as e:
                raise ValueError(f"FID accumulator state {state_path}: {e}") from None
            acc.num_batches = int(data["num_batches"])
        if dim is not None and acc.statistics.dim not in (None, dim):
            raise ValueError(
                f"FID accumulator state {state_path} holds {acc.statistics.dim}-d statistics, "
                f"expected {dim}-d"
            )
        logger.info(
            "resuming FID statistics from %s: %d batches, %d samples",
            state_path,
            acc.num_batches,
            acc.num_samples,
        )
        return acc

    def add_batch(self, features: Any) -> None:
        """Adds one batch of features; saves the state every ``save_every`` batches."""
        self.statistics.update(features)
        self.num_batches += 1
        if self.save_every and self.num_batches % self.save_every == 0:
            self.save()

    def save(self) -> None:
        """Writes the state atomically (main process only: every process holds the same
        statistics)."""
        if self.state_path is None:
            raise ValueError("FIDAccumulator.save needs a state_path")
        if monitoring.is_main_process():
            frechet.write_npz_atomic(
                self.state_path,
                num_batches=np.asarray(self.num_batches, np.int64),
                fingerprint=np.asarray(self.fingerprint),
                **self.statistics.state_dict(),
            )


def accumulate(
    extract: Callable[[np.ndarray], np.ndarray],
    get_batch: Callable[[int], Any],
    num_batches: int,
    accumulator: FIDAccumulator,
) -> FIDAccumulator:
    """Feeds batches ``accumulator.num_batches .. num_batches - 1`` (``get_batch(i)`` -> images)
    through ``extract`` into ``accumulator``; a restored accumulator therefore continues where it
    stopped.

    ``get_batch`` must be a pure function of the batch index (fixed file order, ``fold_in(seed, i)``
    noise) so a resumed run sees the same batches as an uninterrupted one. Saves the final state
    when it has a path.
    """
    if accumulator.num_batches > num_batches:
        raise ValueError(
            f"the FID accumulator has consumed {accumulator.num_batches} batches but this "
            f"evaluation has only {num_batches}"
        )
    for i in range(accumulator.num_batches, num_batches):
        accumulator.add_batch(extract(get_batch(i)))
    if accumulator.state_path is not None and accumulator.save_every:
        accumulator.save()
    return accumulator


def fid_against_reference(mu: Any, sigma: Any, reference_path: str) -> float:
    """FID between statistics ``(mu, sigma)`` and the ``.npz`` at ``reference_path`` (pytorch-fid
    format).

    Reference statistics of another feature dimension raise ``ValueError`` naming the file and both
    dims.
    """
    mu = np.asarray(mu, np.float64)
    ref_mu, ref_sigma = frechet.load_statistics(reference_path, expected_dim=mu.shape[-1])
    return frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma)


# --------------------------------------------------------------------------------------------------
# Reference statistics from a folder of images


def list_images(images_dir: str) -> list[str]:
    """Image files under ``images_dir`` (recursively, extensions of ``IMAGE_EXTENSIONS`` in any
    case), sorted."""
    if not os.path.isdir(images_dir):
        raise ValueError(f"images folder {images_dir} does not exist or is not a folder")
    files = []
    for root, dirs, names in os.walk(images_dir):
        dirs.sort()
        files.extend(
            os.path.join(root, n)
            for n in names
            if os.path.splitext(n)[1][1:].lower() in IMAGE_EXTENSIONS
        )
    if not files:
        raise ValueError(
            f"images folder {images_dir} holds no images (looked recursively for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return sorted(files)


def load_image(path: str) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1] at native size: PIL ``convert('RGB')`` then ``x / 255``,
    which is what pytorch-fid's ``ToTensor`` gives (channels last here)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0)


_resize_one = jax.jit(inception.resize_for_inception)


def _stack_images(paths: Iterable[str]) -> np.ndarray:
    images = [load_image(p) for p in paths]
    if len({im.shape for im in images}) > 1:
        # Mixed sizes cannot share a batch; resizing each to 299x299 first gives the same pixels the
        # network's own resize would (resize is per image, and is the identity at 299x299).
        images = [np.asarray(_resize_one(im[None]))[0] for im in images]
    return np.stack(images)


def image_folder_statistics(
    inception_path: str,
    images_dir: str,
    batch_size: int,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_path: str | None = None,
    save_every: int = 50,
    field: str = "batch_size",
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` (float64) of the Inception pool features of every image under ``images_dir``.

    With ``state_path`` the accumulation is checkpointed every ``save_every`` batches and resumed
    from there.
    """
    files = list_images(images_dir)
    mesh = sharding.make_mesh() if mesh is None else mesh
    extract = inception_feature_extractor(inception_path, mesh, batch_size, field=field)
    num_batches = -(-len(files) // batch_size)
    fingerprint = (
        f"images_dir={os.path.abspath(images_dir)} files={len(files)} batch_size={batch_size} "
        f"inception={os.path.abspath(inception_path)}"
    )
    if state_path:
        acc = FIDAccumulator.restore_or_create(
            state_path, inception.FEATURE_DIM, save_every=save_every, fingerprint=fingerprint
        )
    else:
        acc = FIDAccumulator(inception.FEATURE_DIM, fingerprint=fingerprint)
    accumulate(
        extract,
        lambda i: _stack_images(files[i * batch_size : (i + 1) * batch_size]),
        num_batches,
        acc,
    )
    if acc.num_samples != len(files):
        raise RuntimeError(
            f"FID statistics counted {acc.num_samples} images but {images_dir} holds {len(files)}"
        )
    return acc.statistics.statistics()


def validate_fid_stats_config(config) -> None:
    """Clear errors, naming the field, for ``--mode=fid_stats``."""
    fid = config.get("fid")
    if fid is None:
        raise ValueError(
            "config.fid is missing; --mode=fid_stats needs config.fid.inception_path, "
            "config.fid.images_dir, config.fid.output_npz and config.fid.batch_size"
        )
    for name in ("inception_path", "images_dir", "output_npz", "batch_size"):
        if fid.get(name) is None:
            raise ValueError(f"config.fid.{name} must be set for --mode=fid_stats")
    if not os.path.isfile(fid.inception_path):
        raise ValueError(
            f"config.fid.inception_path={fid.inception_path} is not a file (pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth; see the README)"
        )
    if not os.path.isdir(fid.images_dir):
        raise ValueError(f"config.fid.images_dir={fid.images_dir} is not a folder")
    if not isinstance(fid.batch_size, int) or fid.batch_size <= 0:
        raise ValueError(f"config.fid.batch_size={fid.batch_size!r} must be a positive integer")


def fid_stats(config, workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """``--mode=fid_stats``: reference statistics of ``config.fid.images_dir`` written to
    ``config.fid.output_npz``; progress is checkpointed in ``<workdir>/fid_stats/`` and resumed."""
    validate_fid_stats_config(config)
    fid = config.fid
    mesh = sharding.mesh_from_config(config)
    mu, sigma = image_folder_statistics(
        fid.inception_path,
        fid.images_dir,
        fid.batch_size,
        mesh=mesh,
        state_path=os.path.join(workdir, "fid_stats", "accumulator.npz"),
        field="config.fid.batch_size",
    )
    if monitoring.is_main_process():
        frechet.save_statistics(fid.output_npz, mu, sigma)
    logger.info("wrote FID reference statistics of %s to %s", fid.images_dir, fid.output_npz)
    return mu, sigma
