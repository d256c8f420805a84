"""Where prepare_data's images (and captions) come from: folders, LMDB, parquet files and webdataset
tars (TFDS datasets: ``tfds_source.py``). Each is a ``Source``: the item keys in a deterministic
order, their captions, and a ``fetch`` of payloads by index."""

from __future__ import annotations

import dataclasses
import os
import tarfile
from typing import Callable, Optional, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def option(name: str) -> str:
    """How the user sets ``name``: the CLI flag and the config field of ``--mode=prepare_data``."""
    return f"--{name} (config.data.prepare.{name})"


def require_path(value: Optional[str], name: str) -> str:
    if not value:
        raise ValueError(f"{option(name)} is required")
    if not os.path.exists(value):
        raise FileNotFoundError(f"{option(name)}={value} does not exist")
    return value


# --------------------------------------------------------------------------------------------------
# Sources: an ordered list of items (key, optional caption) and a main-thread ``fetch`` of their raw
# payloads.


@dataclasses.dataclass
class Source:
    description: str
    keys: list[str]
    captions: Optional[list[str]]
    fetch: Callable[
        [Sequence[int]], list
    ]  # item indices -> payloads: a file path, image bytes or ("raw", bytes)
    skipped: dict[str, list]  # listing-time skips: missing_caption, ignored_files
    origin: str = ""  # what the plan and metadata record as the source


def keep_captioned(keys, captions, payloads, need_captions):
    """Drops items without a caption when captions are needed; returns the kept lists and the
    dropped keys."""
    if not need_captions:
        return keys, None, payloads, []
    kept = [i for i, c in enumerate(captions) if c is not None]
    missing = [keys[i] for i, c in enumerate(captions) if c is None]
    if not kept:
        raise ValueError(f"no image has a caption ({len(keys)} images; e.g. {keys[0]!r})")
    return (
        [keys[i] for i in kept],
        [captions[i] for i in kept],
        [payloads[i] for i in kept],
        missing,
    )


def folder_source(root: str, need_captions: bool) -> Source:
    images, ignored, texts = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(rel)
            elif ext == ".txt":
                texts.add(rel)
            else:
                ignored.append(rel)
    if not images:
        raise ValueError(
            f"{option('input')}={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it or "
            f"its subfolders"
        )
    captions, used = [], set()
    for rel in images:
        txt = os.path.splitext(rel)[0] + ".txt"
        if need_captions and txt in texts:
            with open(os.path.join(root, txt), encoding="utf-8") as f:
                captions.append(f.read().strip())
            used.add(txt)
        else:
            captions.append(None)
    ignored += sorted(texts - used)
    paths = [os.path.join(root, rel) for rel in images]
    keys, captions, paths, missing = keep_captioned(images, captions, paths, need_captions)
    return Source(
        f"folder {root}",
        keys,
        captions,
        lambda idx: [paths[i] for i in idx],
        {"missing_caption": missing, "ignored_files": ignored},
    )


def lmdb_source(root: str) -> Source:
    try:
        import lmdb
    except ImportError:
        raise ImportError(
            f"{option('input')}={root} is an LMDB; reading it needs the `lmdb` package: "
            f"pip install lmdb"
        ) from None
    env = lmdb.open(root, readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin() as txn:
        raw_keys = list(txn.cursor().iternext(keys=True, values=False))
    if not raw_keys:
        raise ValueError(f"{option('input')}={root}: the LMDB has no entries")
    text = [bytes(k).decode("utf-8", "replace") for k in raw_keys]
    order = sorted(
        range(len(text)), key=lambda i: (int(text[i]), "") if text[i].isdigit() else (-1, text[i])
    )

    def fetch(idx):
        with env.begin() as txn:
            return [("raw", bytes(txn.get(raw_keys[order[i]]))) for i in idx]

    return Source(
        f"LMDB {root}",
        [text[i] for i in order],
        None,
        fetch,
        {"missing_caption": [], "ignored_files": []},
    )


def parquet_source(
    path: str, image_column: str, caption_column: str, need_captions: bool
) -> Source:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs the `pyarrow` package: pip install pyarrow"
        ) from None
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    for name, value in (
        ("image_column", image_column),
        ("caption_column", caption_column if need_captions else None),
    ):
        if value is not None and value not in names:
            raise ValueError(
                f"{path} has no column {value!r} ({option(name)}); its columns: {names}"
            )
    starts = np.cumsum(
        [0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
    )
    keys = [f"row {i}" for i in range(int(starts[-1]))]
    if not keys:
        raise ValueError(f"{option('input')}={path}: the parquet file has no rows")
    captions = (
        file.read(columns=[caption_column]).column(0).to_pylist()
        if need_captions
        else [None] * len(keys)
    )
    cache: dict[int, list] = {}

    def fetch(rows):
        out = []
        for row in rows:
            group = int(np.searchsorted(starts, row, side="right") - 1)
            if group not in cache:  # items are fetched in order: keep one row group in memory
                cache.clear()
                cache[group] = (
                    file.read_row_group(group, columns=[image_column]).column(0).to_pylist()
                )
            value = cache[group][row - starts[group]]
            out.append(
                value.get("bytes") if isinstance(value, dict) else value
            )  # HF `Image` columns: {bytes, path}
        return out

    keys, captions, rows, missing = keep_captioned(
        keys, captions, list(range(len(keys))), need_captions
    )
    return Source(
        f"parquet {path}",
        keys,
        captions,
        lambda idx: fetch([rows[i] for i in idx]),
        {"missing_caption": missing, "ignored_files": []},
    )


def tar_source(path: str, need_captions: bool) -> Source:
    try:
        archive = tarfile.open(path)
    except tarfile.ReadError as e:
        raise ValueError(f"{option('input')}={path} is not a readable tar archive: {e}") from None
    images, texts, ignored = {}, {}, []
    for member in archive.getmembers():
        if not member.isfile():
            continue
        folder, base = os.path.split(member.name)
        stem, _, ext = base.partition(".")  # webdataset: the key is everything before the first dot
        key, ext = f"{folder}/{stem}" if folder else stem, "." + ext.lower()
        if ext in IMAGE_EXTENSIONS:
            images[key] = member
        elif ext == ".txt":
            texts[key] = member
        else:
            ignored.append(member.name)
    if not images:
        raise ValueError(
            f"{option('input')}={path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the tar"
        )
    keys = list(images)
    captions = (
        [
            archive.extractfile(texts[k]).read().decode("utf-8").strip() if k in texts else None
            for k in keys
        ]
        if need_captions
        else [None] * len(keys)
    )
    ignored += [m.name for k, m in texts.items() if k not in images or not need_captions]
    members = [images[k] for k in keys]
    keys, captions, members, missing = keep_captioned(keys, captions, members, need_captions)
    return Source(
        f"tar {path}",
        keys,
        captions,
        lambda idx: [archive.extractfile(members[i]).read() for i in idx],
        {"missing_caption": missing, "ignored_files": ignored},
    )
