"""Prepared latent datasets: the record format and the reader side (``LatentDataset``,
``LatentBatches``).

A prepared dataset is a folder written by ``scflow_jax.data.prepare``::

    metadata.json                          kind, num_examples, num_shards, latent_shape,
                                           scaling_factor, ...
    train-00000-of-00004.array_record ...  one record per example

Each record is a msgpack map (``flax.serialization``; no TensorFlow) of NumPy arrays: the VAE
posterior ``mean`` and ``std`` of the *unscaled* latents [h, w, c] (float32, or float16 if prepared
with ``--latent_dtype=float16``) and, for ``text_to_image``, the CLIP text hidden states ``cond``
[77, 768] (bfloat16) and the ``caption`` string. ``grain.python.ArrayRecordDataSource`` reads the
shards directly (``ds[i]`` -> record bytes). ``tfds.data_source`` cannot: it expects a TFDS-built
folder (``dataset_info.json``, ``features.json``) whose records are ``tf.train.Example`` protos, and
these records are msgpack.

``LatentBatches`` draws the training latent ``scaling_factor * (mean + std * eps - shift_factor)``
(a posterior sample, like LFM's ``encode(x).latent_dist.sample() * 0.18215``) and a horizontal flip,
both from a generator seeded by ``(seed, step, example index)``: the batch of a step is a pure
function of ``(seed, step)``, whatever the number of processes, so a resumed run sees the same data.

The flip is applied to the stored posterior (the W axis of ``mean`` and ``std``), not by encoding
the flipped image. The two are not identical, since the VAE's convolutions are not mirror-symmetric,
but the flipped posterior decodes to (nearly) the mirrored image and is a latent the decoder
understands; it halves preparation time and storage compared with storing a second, flipped
posterior. Pass ``hflip=False`` where exactness matters.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import serialization

from scflow_jax.data.pipeline import InMemoryBatches

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
KINDS = ("latents", "text_to_image")


def shard_name(index: int, num_shards: int) -> str:
    return f"train-{index:05d}-of-{num_shards:05d}.array_record"


def encode_record(record: dict[str, Any]) -> bytes:
    return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict[str, Any]:
    return serialization.msgpack_restore(data)


def read_metadata(data_dir: str) -> dict[str, Any]:
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared dataset (or its preparation did not "
            f"finish; rerun `python -m scflow_jax.data.prepare` with the same flags to complete it)"
        )
    with open(path) as f:
        metadata = json.load(f)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={metadata.get('format_version')!r}, this reader understands "
            f"{FORMAT_VERSION}"
        )
    if metadata.get("kind") not in KINDS:
        raise ValueError(f"{path}: kind={metadata.get('kind')!r}, expected one of {KINDS}")
    return metadata


class LatentDataset:
    """Random access to a prepared dataset: ``len(ds)``, ``ds[i]`` -> dict of NumPy arrays (and
    ``caption``)."""

    def __init__(self, data_dir: str):
        import grain.python as grain

        self.data_dir = data_dir
        self.metadata = read_metadata(data_dir)
        n = self.metadata["num_shards"]
        paths = [os.path.join(data_dir, shard_name(i, n)) for i in range(n)]
        missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{data_dir}: shards listed in {METADATA_FILE} are missing: {missing}"
            )
        self._source = grain.ArrayRecordDataSource(paths)
        if len(self._source) != self.metadata["num_examples"]:
            raise ValueError(
                f"{data_dir}: the shards hold {len(self._source)} records but {METADATA_FILE} says "
                f"num_examples={self.metadata['num_examples']}"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[int(index)])

    def get_many(self, indices) -> list[dict[str, Any]]:
        return [decode_record(r) for r in self._source.__getitems__([int(i) for i in indices])]


class LatentBatches:
    """Step-indexed training batches of a prepared dataset (the ``InMemoryBatches`` contract).

    ``batch(step)`` -> ``{"image": float32 [B_local, h, w, c]}`` plus
    ``"cond": float32 [B_local, L, D]`` for ``text_to_image`` data, holding the rows
    ``process_rows`` of the global batch (``sharding.process_batch_indices``: the rows the mesh
    places on this process's devices, contiguous or not); by default the ``process_index``-th
    contiguous slice of ``global_batch / process_count`` rows. The example order (an epoch-wise
    permutation seeded by ``(seed, epoch)``) and the row selection are ``InMemoryBatches``'s,
    applied to the example indices; an example's latent noise and flip depend on
    ``(seed, step, example index)`` only, so the processes' rows together are exactly the global
    batch a single process would load.
    """

    def __init__(
        self,
        data_dir: str,
        global_batch: int,
        seed: int,
        *,
        hflip: bool = True,
        process_rows: np.ndarray | None = None,
    ):
        import jax

        self.dataset = LatentDataset(data_dir)
        self.metadata = self.dataset.metadata
        if process_rows is None and global_batch % jax.process_count():
            raise ValueError(
                f"global batch {global_batch} is not divisible by the number of processes "
                f"({jax.process_count()})"
            )
        self._order = InMemoryBatches(
            {"index": np.arange(len(self.dataset))}, global_batch, seed, process_rows=process_rows
        )
        self.global_batch = global_batch
        self.num_examples = self._order.num_examples
        self.steps_per_epoch = self._order.steps_per_epoch
        self.seed = seed
        self.hflip = hflip
        self.scaling_factor = float(self.metadata["scaling_factor"])
        self.shift_factor = float(self.metadata.get("shift_factor") or 0.0)
        self.latent_shape = tuple(self.metadata["latent_shape"])

    def local_indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's slice of the global batch of ``step``."""
        return self._order.batch(step)["index"]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        indices = self.local_indices(step)
        images, conds = [], []
        for index, record in zip(indices, self.dataset.get_many(indices)):
            rng = np.random.default_rng([self.seed, step, int(index)])
            flip = (
                bool(rng.integers(2)) and self.hflip
            )  # always drawn, so eps does not depend on hflip
            eps = rng.standard_normal(self.latent_shape, dtype=np.float32)
            mean = record["mean"].astype(np.float32)
            std = record["std"].astype(np.float32)
            if flip:  # the W axis of [h, w, c]; eps is i.i.d., so it needs no flip
                mean, std = mean[:, ::-1], std[:, ::-1]
            images.append(self.scaling_factor * (mean + std * eps - self.shift_factor))
            if "cond" in record:
                conds.append(record["cond"].astype(np.float32))
        out = {"image": np.stack(images).astype(np.float32)}
        if self.metadata["kind"] == "text_to_image":
            out["cond"] = np.stack(conds)
        return out
