"""Observability: a console progress line with ETA, TensorBoard scalars and image grids.

TensorBoard files are written with tensorboardX (no TensorFlow in the core install; see
ARCHITECTURE.md), to a local or ``gs://`` logdir. Only process 0 writes, so a multi-host run
produces one set of files.
Output files (JSON, PNG and the bytes of any other file) are written atomically through
etils.epath, so a workdir may be local or a ``gs://`` bucket.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath


def is_main_process() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    """Scalars and images as TensorBoard event files in ``logdir`` (process 0 only), local or
    remote.

    tensorboardX writes a local event file. For a remote ``logdir`` (``gs://...``) that file lives
    in a temporary folder and is copied to ``logdir`` through etils.epath (as every other output),
    at most every ``upload_every_s`` seconds and at ``close``: a preempted run loses at most that
    much of its curves. Bucket objects cannot be appended to, so each copy rewrites the whole file;
    once a file passes ``max_file_bytes`` the writer starts the next one, which bounds what a copy
    sends (TensorBoard reads every event file of a folder).
    """

    def __init__(
        self, logdir: str, *, upload_every_s: float = 60.0, max_file_bytes: int = 16 << 20
    ):
        self._writer = None
        if not is_main_process():
            return
        self._logdir = os.fspath(logdir)
        self._remote = is_remote(self._logdir)
        self._upload_every_s, self._max_file_bytes = upload_every_s, max_file_bytes
        self._local_dir = tempfile.mkdtemp(prefix="scflow_tb_") if self._remote else self._logdir
        self._uploaded_sizes: dict[str, int] = {}
        self._last_upload = time.monotonic()
        self._segment = 0
        self._open()

    def _open(self) -> None:
        from tensorboardX import SummaryWriter

        # The suffix tells the current file from finished ones, and keeps the files of one run
        # apart when two start within the same second.
        self._suffix = f".{self._segment:04d}"
        self._writer = SummaryWriter(
            logdir=self._local_dir, flush_secs=30, filename_suffix=self._suffix
        )

    def _upload(self) -> bool:
        """Copies every local event file that changed since its last copy to the remote logdir
        (what the writer has flushed or closed); returns whether all copies succeeded. A failed
        copy is logged and retried at the next upload: curves must not stop a training run."""
        self._last_upload = time.monotonic()
        for name in sorted(os.listdir(self._local_dir)):
            size = os.path.getsize(os.path.join(self._local_dir, name))
            if self._uploaded_sizes.get(name) == size:
                continue
            target = f"{self._logdir.rstrip('/')}/{name}"
            try:
                with open(os.path.join(self._local_dir, name), "rb") as f:
                    write_bytes_atomic(target, f.read())
            except Exception as e:  # noqa: BLE001 (any storage error: network, permissions, quota)
                logging.warning(
                    "could not copy TensorBoard events to %s (%s); will retry", target, e
                )
                return False
            self._uploaded_sizes[name] = size
        return True

    def _after_write(self) -> None:
        if not self._remote or time.monotonic() - self._last_upload < self._upload_every_s:
            return
        self._writer.flush()
        if not self._upload():
            return
        current = [
            size for name, size in self._uploaded_sizes.items() if name.endswith(self._suffix)
        ]
        if max(current, default=0) >= self._max_file_bytes:
            self._writer.close()  # later records go to a new file
            self._segment += 1
            self._open()
            self._upload()
        # A finished file, once copied at its final size, is only needed in the bucket.
        for name in os.listdir(self._local_dir):
            path = os.path.join(self._local_dir, name)
            if not name.endswith(self._suffix) and self._uploaded_sizes.get(
                name
            ) == os.path.getsize(path):
                os.remove(path)
                del self._uploaded_sizes[name]

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)
            self._after_write()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``images``: name -> uint8 [H, W, C]."""
        if self._writer:
            for name, image in images.items():
                self._writer.add_image(name, image, step, dataformats="HWC")
            self._after_write()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
            if self._remote:
                if self._upload():
                    shutil.rmtree(self._local_dir, ignore_errors=True)
                else:
                    logging.warning(
                        "TensorBoard events not copied to %s are kept in %s",
                        self._logdir,
                        self._local_dir,
                    )
            self._writer = None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 in [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


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
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = images[i]
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
            logging.info(
                "[%s] step %d/%d | %s | %.2f steps/s | ETA %s",
                self.stage,
                step,
                self.total,
                shown,
                rate,
                format_duration(eta),
            )
        return {"steps_per_sec": rate}
