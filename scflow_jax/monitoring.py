"""Observability: a console progress line with ETA, TensorBoard scalars and image grids.

TensorBoard files are written with tensorboardX (no TensorFlow in the core install; see
ARCHITECTURE.md). Only process 0 writes, so a multi-host run produces one set of files.
Output files (JSON, PNG and the bytes of any other file) are written atomically through
etils.epath, so a workdir may be local or a ``gs://`` bucket.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath


def is_main_process() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    """Scalars and images to ``logdir`` as TensorBoard event files (process 0 only)."""

    def __init__(self, logdir: str):
        self._writer = None
        if is_main_process():
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``images``: name -> uint8 [H, W, C]."""
        if self._writer:
            for name, image in images.items():
                self._writer.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 in [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 [H', W', C] grid with ``rows`` rows (N % rows == 0)."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill a grid of {rows} rows")
    cols = n // rows
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    return grid


def is_remote(path) -> bool:
    """A URL such as ``gs://bucket/run`` rather than a local path (checkpoint.absolute's test)."""
    return "://" in os.fspath(path)


def write_bytes_atomic(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` (local or ``gs://``, through etils.epath) so that readers
    never see half a file.

    Local paths: a temporary file in the same folder, then a rename over the target (atomic
    on POSIX). Object stores (GCS): one object write is atomic already (the new object
    becomes visible only once its upload completes) and a rename there is a copy plus a
    delete, so the object is written in place; object stores have no folders to create."""
    target = epath.Path(path)
    if is_remote(path):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj) -> None:
    """``obj`` as indented JSON, written atomically (``write_bytes_atomic``)."""
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode("utf-8"))


def save_png(path, grid: np.ndarray) -> None:
    """A uint8 [H, W, C] image (C = 1 or 3) as a PNG file, local or ``gs://``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Steps/s (over the last interval) and ETA for a run of ``total`` steps."""

    def __init__(self, stage: str, start_step: int, total: int):
        self.stage, self.total = stage, total
        self._last_step, self._last_time = start_step, time.perf_counter()

    def report(self, step: int, scalars: Mapping[str, float]) -> dict:
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        if is_main_process():
            logging.info("[%s] step %d/%d | %s | %.2f steps/s | ETA %s", self.stage, step,
                         self.total, shown, rate, format_duration(eta))
        return {"steps_per_sec": rate}
