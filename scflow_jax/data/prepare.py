"""Data preparation: images (and captions) -> VAE posteriors (and CLIP text states) in array_record
shards.

    python -m scflow_jax.data.prepare --kind=latents --input=celeba_hq/ --output=data/celebahq256 \\
        --vae=sd-vae-ft-mse/ --image_size=256
    python -m scflow_jax.data.prepare --kind=text_to_image --input=pairs.parquet \\
        --output=data/t2i --vae=sd15/ --text_encoder=sd15/ --tokenizer=sd15/ --image_size=512

Inputs: a folder of images (recursive; for ``text_to_image`` each image needs a same-name ``.txt``
caption), an LMDB folder (``data.mdb``; the CelebA-HQ release of NVAE/DDGAN/LFM, values raw RGB or
encoded images, keys ``"0"``, ``"1"``, ...; needs ``pip install lmdb``), a parquet file (image
bytes + caption columns), a webdataset tar (``key.jpg`` + ``key.txt``) or a TFDS dataset built as
array_record (``tfds:NAME[/CONFIG][:SPLIT]`` under ``--tfds_data_dir``; ``--image_column`` and
``--caption_column`` name its features; see tfds_source.py).

Each image is center-cropped to a square and resized to ``image_size`` with PIL's bicubic filter
(ADM's and LDM's choice; Pillow widens the filter support when downscaling, so it antialiases, and
unlike Lanczos it has little ringing), mapped to [-1, 1] and encoded by the VAE jitted over a
``data`` mesh (the last, ragged batch is padded and the padding dropped). Captions are tokenized to
the text encoder's length and encoded without an attention mask, as SD 1.5's pipeline does.

Resumable: the file order is deterministic (sorted folder walk, LMDB key order, parquet row order,
tar member order, TFDS record order), shard ``i`` holds items
``[i * examples_per_shard, (i + 1) * examples_per_shard)``, and each shard is written under a
temporary name and renamed, then its report (``shard_reports/<shard>.json``). A rerun with the same
settings skips the shards whose file and report exist. Unreadable images are skipped and reported,
like images without captions and ignored files, in the printed report and
``metadata.json["skipped"]``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from scflow_jax import monitoring, sharding
from scflow_jax.data import latents, tfds_source
from scflow_jax.data.sources import (
    Source,
    folder_source,
    lmdb_source,
    option,
    parquet_source,
    require_path,
    tar_source,
)

PLAN_FILE = "prepare_plan.json"
REPORTS_DIR = "shard_reports"
DEFAULT_IMAGE_SIZE = {"latents": 256, "text_to_image": 512}
_PLAN_FIELDS = (
    "kind",
    "source",
    "vae",
    "text_encoder",
    "tokenizer",
    "image_size",
    "latent_dtype",
    "examples_per_shard",
    "image_column",
    "caption_column",
    "num_items",
    "num_shards",
    "keys_sha256",
)


def open_source(
    path: str,
    kind: str,
    image_column: str = "image",
    caption_column: str = "caption",
    tfds_data_dir: Optional[str] = None,
) -> Source:
    need_captions = kind == "text_to_image"
    if tfds_source.is_tfds_spec(path):
        return tfds_source.tfds_source(
            path, tfds_data_dir, image_column, caption_column, need_captions
        )
    require_path(path, "input")
    return dataclasses.replace(
        _open_path(path, need_captions, image_column, caption_column), origin=os.path.abspath(path)
    )


def _open_path(path: str, need_captions: bool, image_column: str, caption_column: str) -> Source:
    if os.path.isfile(os.path.join(path, "data.mdb")):
        if need_captions:
            raise ValueError(
                f"{option('input')}={path} is an LMDB of images without captions: use "
                f"--kind=latents, or a caption folder/parquet/tar for text_to_image"
            )
        return lmdb_source(path)
    if os.path.isdir(path):
        return folder_source(path, need_captions)
    if path.endswith(".parquet"):
        return parquet_source(path, image_column, caption_column, need_captions)
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        return tar_source(path, need_captions)
    raise ValueError(
        f"{option('input')}={path}: expected a folder of images, an LMDB folder (data.mdb), a "
        f".parquet file, a webdataset .tar or a TFDS dataset (tfds:NAME[/CONFIG][:SPLIT])"
    )


# --------------------------------------------------------------------------------------------------
# Images


def _pil_image(payload):
    from PIL import Image, UnidentifiedImageError

    if isinstance(payload, str):
        return Image.open(payload)
    if isinstance(
        payload, tuple
    ):  # LMDB value: an encoded image, or raw RGB bytes of a square image (NVAE's format)
        data = payload[1]
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            side = int(round((len(data) / 3) ** 0.5))
            if 3 * side * side != len(data):
                raise
            return Image.fromarray(np.frombuffer(data, np.uint8).reshape(side, side, 3), "RGB")
    if payload is None:
        raise ValueError("no image bytes")
    return Image.open(io.BytesIO(payload))


def load_image(payload, image_size: int) -> np.ndarray:
    """A payload -> uint8 [image_size, image_size, 3]: EXIF orientation applied, center square crop,
    bicubic resize."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(_pil_image(payload)).convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(
        image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box), np.uint8
    )


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def _load_or_error(payload, image_size):
    try:
        return load_image(payload, image_size), None
    except Exception as e:  # anything PIL raises on a bad file; reported by key, never silent
        return None, f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# Encoding


# Module-level jits with the (hashable, frozen) VAE handle and CLIP config static: repeated
# preparations in one process reuse the compiled encoders.
@functools.partial(jax.jit, static_argnums=0)
def _posterior(vae, params, images):
    posterior = vae.encode(params, images)
    return posterior.mean, posterior.std


@functools.partial(jax.jit, static_argnums=0)
def _text_states(config, params, ids):
    from scflow_jax.models import clip

    return clip.encode_text(params, config, ids).astype(jnp.bfloat16)


class Encoders:
    """The VAE (and CLIP text encoder) jitted over ``mesh``; every call runs on one fixed batch
    shape."""

    def __init__(
        self, mesh: Mesh, batch_size: int, vae, vae_params, text=None, latent_dtype="float32"
    ):
        self.mesh, self.batch_size, self.latent_dtype = mesh, batch_size, np.dtype(latent_dtype)
        self._data = sharding.batch_sharding(mesh)
        self._vae = functools.partial(_posterior, vae)
        self._vae_params = sharding.put_replicated(vae_params, mesh)
        self._text = None
        if text is not None:
            config, params, self._tokenizer = text
            self._text = functools.partial(_text_states, config)
            self._text_params = sharding.put_replicated(params, mesh)

    def _pad(self, array: np.ndarray) -> jax.Array:
        padded = np.zeros((self.batch_size,) + array.shape[1:], array.dtype)
        padded[: len(array)] = array
        return jax.device_put(padded, self._data)

    def __call__(
        self, images_uint8: np.ndarray, captions: Optional[list[str]] = None
    ) -> dict[str, np.ndarray]:
        n = len(images_uint8)
        mean, std = self._vae(self._vae_params, self._pad(to_model_range(images_uint8)))
        out = {"mean": mean, "std": std}
        if self._text is not None:
            ids, _ = self._tokenizer(list(captions))  # SD 1.5 encodes without the attention mask
            out["cond"] = self._text(self._text_params, self._pad(ids))
        out = {k: np.asarray(v)[:n] for k, v in out.items()}
        out["mean"], out["std"] = (out[k].astype(self.latent_dtype) for k in ("mean", "std"))
        return out


def encoding_mesh() -> Mesh:
    """All devices in a single-process run. With several processes each one encodes its own shards
    on its local devices, so processes never wait on each other mid-shard."""
    if jax.process_count() == 1:
        return sharding.make_mesh()
    return Mesh(np.asarray(jax.local_devices()), (sharding.DATA_AXIS,))


# --------------------------------------------------------------------------------------------------
# Shards


def _report_path(output: str, name: str) -> str:
    return os.path.join(output, REPORTS_DIR, name.replace(".array_record", ".json"))


def _write_shard(output: str, name: str, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    final = os.path.join(output, name)
    tmp = f"{final}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
    for record in records:
        writer.write(record)
    writer.close()
    os.replace(tmp, final)


def _encode_shard(
    source: Source, items: range, encoders: Encoders, image_size: int, pool
) -> tuple[list, list]:
    """Encodes ``items`` in batches, decoding the next batch's images while the devices work on this
    one."""
    chunks = [items[j : j + encoders.batch_size] for j in range(0, len(items), encoders.batch_size)]

    def submit(chunk):
        return [pool.submit(_load_or_error, p, image_size) for p in source.fetch(list(chunk))]

    records, unreadable = [], []
    pending = submit(chunks[0]) if chunks else []
    for c, chunk in enumerate(chunks):
        loaded = [f.result() for f in pending]
        pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else []
        good = [i for i, (image, _) in zip(chunk, loaded) if image is not None]
        unreadable += [
            {"key": source.keys[i], "error": err}
            for i, (image, err) in zip(chunk, loaded)
            if image is None
        ]
        if not good:
            continue
        images = np.stack([image for image, _ in loaded if image is not None])
        captions = [source.captions[i] for i in good] if source.captions is not None else None
        encoded = encoders(images, captions)
        for row, i in enumerate(good):
            record = {k: v[row] for k, v in encoded.items()}
            record["key"] = source.keys[i]
            if captions is not None:
                record["caption"] = captions[row]
            records.append(latents.encode_record(record))
    return records, unreadable


# --------------------------------------------------------------------------------------------------
# Entry points


def _check_plan(output: str, plan: dict) -> None:
    path = os.path.join(output, PLAN_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changed = {k: (old.get(k), plan[k]) for k in plan if old.get(k) != plan[k]}
        if changed:
            detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"{output} holds a preparation with other settings or inputs ({detail}). Rerun "
                f"with the original settings to finish it, or choose another {option('output')}"
            )
    elif monitoring.is_main_process():
        monitoring.write_json_atomic(path, plan)


def prepare(
    kind: str,
    input: str,
    output: str,
    vae: str,
    text_encoder: Optional[str] = None,
    tokenizer: Optional[str] = None,
    image_size: Optional[int] = None,
    batch_size: int = 64,
    examples_per_shard: int = 1024,
    latent_dtype: str = "float32",
    image_column: str = "image",
    caption_column: str = "caption",
    tfds_data_dir: Optional[str] = None,
    num_workers: int = 8,
    mesh: Optional[Mesh] = None,
) -> dict[str, Any]:
    """Prepares (or finishes preparing) ``output``; returns its metadata. See the module
    docstring."""
    from scflow_jax.models.vae import load_vae

    if kind not in latents.KINDS:
        raise ValueError(f"{option('kind')}={kind!r}; expected one of {latents.KINDS}")
    if not output:
        raise ValueError(f"{option('output')} is required")
    if latent_dtype not in ("float32", "float16"):
        raise ValueError(f"{option('latent_dtype')}={latent_dtype!r}; expected float32 or float16")
    if examples_per_shard <= 0:
        raise ValueError(f"{option('examples_per_shard')}={examples_per_shard} must be positive")
    image_size = image_size or DEFAULT_IMAGE_SIZE[kind]
    mesh = mesh or encoding_mesh()
    if batch_size <= 0 or batch_size % mesh.devices.size:
        raise ValueError(
            f"{option('batch_size')}={batch_size} must be a positive multiple of the "
            f"{mesh.devices.size} devices of the encoding mesh"
        )
    if tfds_source.is_tfds_spec(input):
        tfds_source.parse_spec(input)  # a malformed spec fails before the models load
    else:
        require_path(input, "input")
    require_path(vae, "vae")
    if kind == "text_to_image":
        require_path(text_encoder, "text_encoder")
        require_path(tokenizer, "tokenizer")

    vae_model, vae_params = load_vae(vae)
    factor = vae_model.config.downsample_factor
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"{option('image_size')}={image_size} is not a positive multiple of the VAE's "
            f"downsampling factor {factor}"
        )
    source = open_source(input, kind, image_column, caption_column, tfds_data_dir)
    num_items = len(source.keys)
    num_shards = -(-num_items // examples_per_shard)
    plan = dict(
        kind=kind,
        source=source.origin,
        vae=os.path.abspath(vae),
        text_encoder=text_encoder and os.path.abspath(text_encoder),
        tokenizer=tokenizer and os.path.abspath(tokenizer),
        image_size=image_size,
        latent_dtype=latent_dtype,
        examples_per_shard=examples_per_shard,
        image_column=image_column,
        caption_column=caption_column,
        num_items=num_items,
        num_shards=num_shards,
        keys_sha256=hashlib.sha256("\n".join(source.keys).encode()).hexdigest(),
    )
    os.makedirs(os.path.join(output, REPORTS_DIR), exist_ok=True)
    _check_plan(output, plan)

    text = None
    if kind == "text_to_image":
        from scflow_jax.models import clip

        text_config, text_params = clip.load_clip_text(text_encoder)
        text = (
            text_config,
            text_params,
            clip.load_clip_tokenizer(tokenizer, max_length=text_config.max_position_embeddings),
        )
    encoders = Encoders(mesh, batch_size, vae_model, vae_params, text, latent_dtype)

    names = [latents.shard_name(i, num_shards) for i in range(num_shards)]
    mine = range(jax.process_index(), num_shards, jax.process_count())
    todo = [
        i
        for i in mine
        if not (
            os.path.isfile(os.path.join(output, names[i]))
            and os.path.isfile(_report_path(output, names[i]))
        )
    ]
    logging.info(
        "prepare %s: %d items from %s in %d shards; this process: %d shards, %d already finished",
        output,
        num_items,
        source.description,
        num_shards,
        len(mine),
        len(mine) - len(todo),
    )
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        for done, i in enumerate(todo):
            items = range(i * examples_per_shard, min((i + 1) * examples_per_shard, num_items))
            records, unreadable = _encode_shard(source, items, encoders, image_size, pool)
            _write_shard(output, names[i], records)
            monitoring.write_json_atomic(
                _report_path(output, names[i]),
                {"num_examples": len(records), "unreadable": unreadable},
            )
            logging.info(
                "shard %s: %d examples, %d unreadable (%d/%d, %s)",
                names[i],
                len(records),
                len(unreadable),
                done + 1,
                len(todo),
                monitoring.format_duration(time.time() - start),
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("scflow_jax.data.prepare")

    reports = []
    for name in names:
        with open(_report_path(output, name)) as f:
            reports.append(json.load(f))
    unreadable = [u for r in reports for u in r["unreadable"]]
    h = image_size // factor
    metadata = {
        "format_version": latents.FORMAT_VERSION,
        "kind": kind,
        "num_examples": sum(r["num_examples"] for r in reports),
        "num_shards": num_shards,
        "latent_shape": [h, h, vae_model.config.latent_channels],
        "latent_dtype": latent_dtype,
        "scaling_factor": vae_model.config.scaling_factor,
        "shift_factor": vae_model.config.shift_factor,
        "image_size": image_size,
        "source": source.origin,
        "vae": os.path.abspath(vae),
        "preprocessing": (
            "EXIF orientation, RGB, center square crop, PIL bicubic resize, x / 127.5 - 1"
        ),
        "skipped": {
            "unreadable": unreadable,
            **source.skipped,
            "counts": {
                "unreadable": len(unreadable),
                **{k: len(v) for k, v in source.skipped.items()},
            },
        },
    }
    if text is not None:
        metadata["cond_shape"] = [text[0].max_position_embeddings, text[0].hidden_size]
        metadata["text_encoder"] = os.path.abspath(text_encoder)
    if monitoring.is_main_process():
        monitoring.write_json_atomic(os.path.join(output, latents.METADATA_FILE), metadata)
        print(format_report(output, metadata), flush=True)
    return metadata


def format_report(output: str, metadata: dict) -> str:
    skipped = metadata["skipped"]
    lines = [
        f"Prepared {metadata['num_examples']} examples ({metadata['kind']}, latents "
        f"{'x'.join(map(str, metadata['latent_shape']))}) in {metadata['num_shards']} shards "
        f"at {output}"
    ]
    for what, entries in (
        ("unreadable images (skipped)", skipped["unreadable"]),
        ("images without a caption (skipped)", skipped["missing_caption"]),
        ("files that are neither images nor used captions (ignored)", skipped["ignored_files"]),
    ):
        if entries:
            shown = [
                e if isinstance(e, str) else f"{e['key']} ({e['error']})" for e in entries[:20]
            ]
            more = f" ... and {len(entries) - 20} more (metadata.json)" if len(entries) > 20 else ""
            lines.append(f"  {len(entries)} {what}: " + "; ".join(shown) + more)
    return "\n".join(lines)


def prepare_from_config(config) -> dict[str, Any]:
    """``--mode=prepare_data``: ``prepare(**config.data.prepare)`` on the mesh of
    ``config.mesh``."""
    mesh = (
        sharding.make_mesh(config.mesh.data, config.mesh.num_devices)
        if jax.process_count() == 1
        else None
    )
    return prepare(**config.data.prepare.to_dict(), mesh=mesh)


def _main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    f = flags.FLAGS
    prepare(
        f.kind,
        f.input,
        f.output,
        f.vae,
        f.text_encoder,
        f.tokenizer,
        f.image_size,
        f.batch_size,
        f.examples_per_shard,
        f.latent_dtype,
        f.image_column,
        f.caption_column,
        f.tfds_data_dir,
        f.num_workers,
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum(
        "kind",
        "latents",
        list(latents.KINDS),
        "latents: images -> VAE posteriors; text_to_image: "
        "image-caption pairs -> VAE posteriors + CLIP text hidden states.",
    )
    flags.DEFINE_string(
        "input",
        None,
        "Folder of images (recursive; .txt captions beside them), "
        "LMDB folder, .parquet file, webdataset .tar or TFDS dataset "
        "tfds:NAME[/CONFIG][:SPLIT].",
    )
    flags.DEFINE_string("output", None, "Output folder; rerun the same command to resume.")
    flags.DEFINE_string(
        "vae", None, "diffusers AutoencoderKL folder (or a pipeline folder with vae/)."
    )
    flags.DEFINE_string("text_encoder", None, "CLIP text encoder folder (text_to_image).")
    flags.DEFINE_string("tokenizer", None, "CLIP tokenizer folder (text_to_image).")
    flags.DEFINE_integer(
        "image_size", None, "Square resolution; default 256 (latents) / 512 (text_to_image)."
    )
    flags.DEFINE_integer(
        "batch_size", 64, "Images per encoder call; a multiple of the device count."
    )
    flags.DEFINE_integer(
        "examples_per_shard", 1024, "Items per array_record shard (the unit of resumption)."
    )
    flags.DEFINE_enum(
        "latent_dtype", "float32", ["float32", "float16"], "Storage dtype of mean and std."
    )
    flags.DEFINE_string(
        "image_column",
        "image",
        "Parquet column of image bytes (or {bytes, path} "
        "structs), or TFDS Image feature (nested keys joined by /).",
    )
    flags.DEFINE_string(
        "caption_column",
        "caption",
        "Parquet column of captions, or TFDS string "
        "feature or Sequence of them, e.g. captions/text for coco_captions.",
    )
    flags.DEFINE_string(
        "tfds_data_dir",
        None,
        "TFDS data folder of a tfds: input (default: "
        "TFDS's, $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    )
    flags.DEFINE_integer("num_workers", 8, "Threads decoding and resizing images.")
    app.run(_main)
