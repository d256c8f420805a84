"""Run outputs (JSON, PNG, .npz states, sample folders): atomic local writes, gs:// paths through
etils.epath, and process 0 as the only writer.

gs:// is served by an in-memory fsspec filesystem registered for the ``gs``/``gcs`` protocols, so
the real etils.epath GCS code path runs (epath -> fsspec) without gcsfs and without network.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend, gpath
from PIL import Image

from scflow_jax import layout, monitoring, sample
from scflow_jax.evaluation import digits_eval, frechet, generate, real_eval

BUCKET = "gs://bucket/run"


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """The objects written to gs:// (path -> bytes); the test runs in an empty tmp_path so a gs://
    path mistaken for a local one (``./gs:/bucket/...``) shows up there."""
    import importlib

    from fsspec.implementations.memory import MemoryFileSystem

    registry = importlib.import_module(
        "fsspec.registry"
    )  # the module (fsspec.registry is a mapping)

    class InMemoryGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}  # a new class (and store) per test
        pseudo_dirs = [""]

    for name in InMemoryGCS.protocol:
        monkeypatch.setitem(registry._registry, name, InMemoryGCS)
    # epath prefers tf.io.gfile for gs:// when TensorFlow is installed; keep it on fsspec (private
    # switch: if etils renames it, this fails loudly instead of reaching for the network).
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    # epath caches the fsspec filesystem of a protocol: drop it so this test's class serves gs://,
    # and so it does not outlive the test.
    cached_filesystems = epath_backend._FileSystemSpecBackend._get_filesystem
    cached_filesystems.cache_clear()
    monkeypatch.chdir(tmp_path)
    yield InMemoryGCS.store
    cached_filesystems.cache_clear()
    assert os.listdir(tmp_path) == [], "a gs:// path was written to the local disk"


def _objects(store) -> dict[str, bytes]:
    return {k: v.getvalue() for k, v in store.items()}


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


GRID = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)


# -------------------------------------------------------------------------------------------- local
def test_local_writes_create_folders_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    monitoring.write_json_atomic(str(path), [{"fd": 1.5}])
    assert json.loads(path.read_text()) == [{"fd": 1.5}]
    monitoring.save_png(str(tmp_path / "a" / "grid.png"), GRID)
    monitoring.save_png(str(tmp_path / "a" / "gray.png"), GRID[..., :1])
    np.testing.assert_array_equal(_png((tmp_path / "a" / "grid.png").read_bytes()), GRID)
    np.testing.assert_array_equal(_png((tmp_path / "a" / "gray.png").read_bytes()), GRID[..., 0])
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "gray.png", "grid.png"]
    assert os.listdir(tmp_path / "a" / "b") == ["results.json"]


def test_interrupted_local_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    monitoring.write_json_atomic(str(path), ["old"])

    def failing_rename(self, target):
        raise OSError("disk full")

    monkeypatch.setattr(gpath.PosixGPath, "replace", failing_rename)  # the rename into place
    with pytest.raises(OSError, match="disk full"):
        monitoring.write_json_atomic(str(path), ["new"])
    assert json.loads(path.read_text()) == ["old"]
    assert os.listdir(tmp_path) == ["results.json"]  # the temporary file is removed


# -------------------------------------------------------------------------------------------- gs://
def test_json_png_and_npz_go_to_gs_as_single_objects(fake_gcs):
    monitoring.write_json_atomic(f"{BUCKET}/config.json", {"seed": 0})
    monitoring.save_png(f"{BUCKET}/grid.png", GRID)
    frechet.write_npz_atomic(f"{BUCKET}/state.npz", mu=np.arange(3.0))
    objects = _objects(fake_gcs)
    # One object per file: no temporary object, no copy + delete "rename".
    assert sorted(objects) == [f"{BUCKET}/config.json", f"{BUCKET}/grid.png", f"{BUCKET}/state.npz"]
    assert json.loads(objects[f"{BUCKET}/config.json"]) == {"seed": 0}
    np.testing.assert_array_equal(_png(objects[f"{BUCKET}/grid.png"]), GRID)
    with frechet.read_npz(f"{BUCKET}/state.npz") as data:
        np.testing.assert_array_equal(data["mu"], np.arange(3.0))
    assert epath.Path(f"{BUCKET}/config.json").read_text() == json.dumps({"seed": 0}, indent=2)


def _tfrecords(data: bytes) -> list[bytes]:
    """The records of a TFRecord file (length, its crc, payload, its crc; crcs not checked here)."""
    import struct

    records, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        records.append(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
    return records


def test_tensorboard_events_go_to_gs_in_bounded_files(fake_gcs):
    from tensorboardX.proto import event_pb2

    logdir = f"{BUCKET}/tensorboard"
    # Copy at every write and start a new file past 200 bytes, so that a short run spans several
    # files.
    writer = monitoring.MetricWriter(logdir, upload_every_s=0.0, max_file_bytes=200)
    for step in range(12):
        writer.write_scalars(step, {"loss": 0.5 * step, "lr": 1e-4})
    writer.write_images(12, {"samples": GRID})
    local_dir = writer._local_dir
    writer.close()

    objects = _objects(fake_gcs)
    assert len(objects) > 1 and all(k.startswith(f"{logdir}/events.out.tfevents.") for k in objects)
    scalars, images = [], []
    for data in objects.values():
        for record in _tfrecords(data):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("image"):
                    images.append((event.step, value.tag))
                else:
                    scalars.append((value.tag, event.step, round(value.simple_value, 6)))
    # Every record written is in exactly one of the files: nothing lost at a roll-over, nothing
    # twice.
    assert sorted(scalars) == sorted(
        [("loss", s, 0.5 * s) for s in range(12)] + [("lr", s, 1e-4) for s in range(12)]
    )
    assert images == [(12, "samples")]
    assert not os.path.exists(local_dir)


def test_tensorboard_copy_failures_do_not_stop_the_run_and_are_retried(fake_gcs, monkeypatch):
    logdir = f"{BUCKET}/tensorboard"
    writer = monitoring.MetricWriter(logdir, upload_every_s=0.0, max_file_bytes=200)
    real_write = monitoring.write_bytes_atomic
    outage = {"on": True}

    def flaky_write(path, data):
        if outage["on"]:
            raise OSError("503 Service Unavailable")
        real_write(path, data)

    monkeypatch.setattr(monitoring, "write_bytes_atomic", flaky_write)
    for step in range(6):  # past the 200-byte roll-over while nothing can be copied
        writer.write_scalars(step, {"loss": float(step)})
    assert _objects(fake_gcs) == {}
    outage["on"] = False
    for step in range(6, 12):
        writer.write_scalars(step, {"loss": float(step)})
    writer.close()

    from tensorboardX.proto import event_pb2

    steps = sorted(
        event_pb2.Event.FromString(record).step
        for data in _objects(fake_gcs).values()
        for record in _tfrecords(data)
        if event_pb2.Event.FromString(record).summary.value
    )
    assert steps == list(range(12))  # the outage lost nothing

    # An outage at close: the events not copied stay on the local disk rather than being deleted.
    late = monitoring.MetricWriter(f"{BUCKET}/late", upload_every_s=3600.0)
    late.write_scalars(0, {"loss": 1.0})
    outage["on"] = True
    late.close()
    kept = os.listdir(late._local_dir)
    assert len(kept) == 1 and kept[0].startswith("events.out.tfevents.")
    assert not any(k.startswith(f"{BUCKET}/late") for k in _objects(fake_gcs))
    shutil.rmtree(late._local_dir)


def test_tensorboard_copies_wait_for_the_upload_interval(fake_gcs):
    writer = monitoring.MetricWriter(f"{BUCKET}/tensorboard", upload_every_s=3600.0)
    writer.write_scalars(0, {"loss": 1.0})
    assert _objects(fake_gcs) == {}  # nothing copied before the interval...
    writer.close()
    assert len(_objects(fake_gcs)) == 1  # ...and everything at close


def test_sample_folder_on_gs(fake_gcs):
    images = np.linspace(-1, 1, 2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    out_dir = f"{BUCKET}/samples/student_euler_1steps"
    sample._write_outputs(
        out_dir,
        ["000_00.png", "000_01.png"],
        images,
        monitoring.image_grid(images, rows=1),
        ["a handwritten digit one"],
    )
    generate.write_pngs(f"{BUCKET}/eval/images", [7], images[:1])
    objects = _objects(fake_gcs)
    assert sorted(objects) == sorted(
        [f"{out_dir}/{n}" for n in ("000_00.png", "000_01.png", "grid.png", "prompts.txt")]
        + [f"{BUCKET}/eval/images/000007.png"]
    )
    np.testing.assert_array_equal(
        _png(objects[f"{out_dir}/000_01.png"]), monitoring.to_uint8(images[1])[..., 0]
    )
    assert objects[f"{out_dir}/prompts.txt"] == b"a handwritten digit one\n"


def test_results_and_resumable_states_on_gs(fake_gcs):
    assert not digits_eval.is_done(BUCKET) and not real_eval.is_done(BUCKET)
    row = {"row": "student_1", "fid": 3.0}
    real_eval.upsert_results(BUCKET, [row])
    merged = real_eval.upsert_results(
        BUCKET, [{"row": "teacher_1", "fid": 2.0}, {**row, "fid": 1.0}]
    )
    assert (
        json.loads(epath.Path(layout.results_path(BUCKET)).read_text())
        == merged
        == [{"row": "teacher_1", "fid": 2.0}, {"row": "student_1", "fid": 1.0}]
    )
    assert digits_eval.is_done(BUCKET)

    state = f"{BUCKET}/eval/state/student_1.npz"
    acc = real_eval.RowAccumulator.restore_or_create(state, 3, save_every=1, fingerprint="job")
    features = np.arange(12.0).reshape(4, 3) ** 1.5
    acc.add_batch(features, np.array([0.25, -0.5, 0.75, 0.1]))  # saves (save_every=1)
    restored = real_eval.RowAccumulator.restore_or_create(state, 3, save_every=1, fingerprint="job")
    assert (restored.num_batches, restored.num_samples, restored.clip.count) == (1, 4, 4)
    for got, want in zip(restored.statistics.statistics(), acc.statistics.statistics()):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="belongs to another evaluation"):
        real_eval.RowAccumulator.restore_or_create(state, 3, fingerprint="another job")


# ----------------------------------------------------------------------------------- process 0 only
def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    images = np.zeros((1, 4, 4, 1), np.float32)
    sample._write_outputs(
        str(tmp_path / "samples"),
        ["000_00.png"],
        images,
        monitoring.image_grid(images, rows=1),
        ["a prompt"],
    )
    generate.write_pngs(str(tmp_path / "images"), [0], images)
    assert real_eval.upsert_results(str(tmp_path), [{"row": "r"}]) == [{"row": "r"}]
    assert os.listdir(tmp_path) == []
