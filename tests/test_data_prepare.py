"""Data preparation (scflow_jax.data.prepare) and the prepared-data reader
(scflow_jax.data.latents).

Everything is built in tmp folders: a tiny random diffusers AutoencoderKL and a tiny CLIP text
model and tokenizer (conftest's ``models`` fixture), a few PNGs of assorted sizes and modes
(data_testlib), and one corrupt file.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from data_testlib import IMAGES, SIZE, check_text_records, mtimes, reference_posterior
from scflow_jax.data import latents, prepare
from scflow_jax.data.latents import LatentBatches, LatentDataset

CAPTIONS = {
    "a.png": "the cat",
    "b.png": "a dog",
    "sub/c.png": "the dog",
    "sub/d.png": "cat dog",
    "sub/e.png": "a cat",
}


def _write_folder(root, captions=True, corrupt=True):
    for rel, data in IMAGES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if captions:
            path.with_suffix(".txt").write_text(CAPTIONS[rel] + "\n")
    if corrupt:
        (root / "bad.png").write_bytes(b"this is not a png")
        if captions:
            (root / "bad.txt").write_text("a cat")
    (root / "notes.json").write_text("{}")
    return str(root)


@pytest.fixture(scope="module")
def latent_data(tmp_path_factory, models):
    """6 items (one corrupt) in shards of 2, batch 8 on the 8 fake devices: every batch is ragged
    and padded."""
    root = tmp_path_factory.mktemp("prep")
    images = _write_folder(root / "images", captions=False)
    output = str(root / "out")
    metadata = prepare.prepare(
        "latents",
        images,
        output,
        models["vae"],
        image_size=SIZE,
        batch_size=8,
        examples_per_shard=2,
    )
    return images, output, metadata


def test_prepare_latents_records_and_metadata(latent_data, models):
    images, output, metadata = latent_data
    keys = ["a.png", "b.png", "sub/c.png", "sub/d.png", "sub/e.png"]  # sorted walk; bad.png skipped
    assert metadata["num_examples"] == 5 and metadata["num_shards"] == 3
    assert metadata["latent_shape"] == [8, 8, 4] and metadata["scaling_factor"] == pytest.approx(
        0.18215
    )
    assert (
        metadata["kind"] == "latents"
        and metadata["image_size"] == SIZE
        and "cond_shape" not in metadata
    )
    assert [u["key"] for u in metadata["skipped"]["unreadable"]] == ["bad.png"]
    assert "UnidentifiedImageError" in metadata["skipped"]["unreadable"][0]["error"]
    assert metadata["skipped"]["ignored_files"] == ["notes.json"]
    assert metadata["skipped"]["counts"] == {
        "unreadable": 1,
        "missing_caption": 0,
        "ignored_files": 1,
    }
    with open(os.path.join(output, "metadata.json")) as f:
        assert json.load(f) == json.loads(json.dumps(metadata))
    assert sorted(mtimes(output)) == [latents.shard_name(i, 3) for i in range(3)]

    ds = LatentDataset(output)
    assert len(ds) == 5 and ds.metadata["num_examples"] == 5
    records = [ds[i] for i in range(5)]
    assert [r["key"] for r in records] == keys
    assert records[0]["mean"].shape == (8, 8, 4) and records[0]["mean"].dtype == np.float32
    # Sharded, padded encoding == one unsharded encode of the same preprocessed images
    # (fp32, max abs err 1e-5).
    mean, std = reference_posterior(models["vae"], [os.path.join(images, k) for k in keys])
    np.testing.assert_allclose(np.stack([r["mean"] for r in records]), mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([r["std"] for r in records]), std, rtol=0, atol=1e-5)


def test_report_is_printed(tmp_path, models, capsys):
    images = _write_folder(tmp_path / "images", captions=False)
    prepare.prepare(
        "latents", images, str(tmp_path / "out"), models["vae"], image_size=SIZE, batch_size=8
    )
    printed = capsys.readouterr().out
    assert (
        "Prepared 5 examples" in printed
        and "1 unreadable images (skipped): bad.png (UnidentifiedImageError" in printed
        and "notes.json" in printed
    )


def test_resume_rewrites_only_missing_shards(latent_data, models, monkeypatch):
    images, output, metadata = latent_data
    before = mtimes(output)
    writes = []
    original = prepare._write_shard
    monkeypatch.setattr(
        prepare,
        "_write_shard",
        lambda out, name, recs: (writes.append(name), original(out, name, recs)),
    )
    again = dict(image_size=SIZE, batch_size=8, examples_per_shard=2)
    assert prepare.prepare("latents", images, output, models["vae"], **again) == metadata
    assert writes == [] and mtimes(output) == before  # finished: nothing rewritten

    victim = latents.shard_name(1, 3)
    os.remove(os.path.join(output, victim))
    time.sleep(0.01)
    assert prepare.prepare("latents", images, output, models["vae"], **again) == metadata
    after = mtimes(output)
    assert writes == [victim]
    assert all(after[n] == before[n] for n in before if n != victim) and victim in after
    assert len(LatentDataset(output)) == 5

    # Another setting or input in the same folder is refused, naming what changed.
    with pytest.raises(ValueError, match=r"image_size: 16 -> 32.*--output"):
        prepare.prepare(
            "latents",
            images,
            output,
            models["vae"],
            image_size=32,
            batch_size=8,
            examples_per_shard=2,
        )


def test_prepare_text_to_image_folder_parquet_tar(tmp_path, models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = _write_folder(tmp_path / "images")
    os.remove(os.path.join(images, "sub/d.txt"))  # a missing caption: reported and skipped
    kept = ["a.png", "b.png", "sub/c.png", "sub/e.png"]
    common = dict(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        image_size=SIZE,
        batch_size=8,
        examples_per_shard=3,
    )
    metadata = prepare.prepare("text_to_image", images, str(tmp_path / "folder"), **common)
    assert metadata["num_examples"] == 4 and metadata["cond_shape"] == [16, 32]
    assert metadata["skipped"]["missing_caption"] == ["sub/d.png"]
    assert [u["key"] for u in metadata["skipped"]["unreadable"]] == ["bad.png"]
    folder_records = check_text_records(
        LatentDataset(str(tmp_path / "folder")), models, [CAPTIONS[k] for k in kept]
    )
    mean, _ = reference_posterior(models["vae"], [os.path.join(images, k) for k in kept])
    np.testing.assert_allclose(
        np.stack([r["mean"] for r in folder_records]), mean, rtol=0, atol=1e-5
    )

    # Parquet: HF-style {bytes, path} image cells in two row groups, a null caption, a corrupt
    # image.
    rows = [(IMAGES[k], CAPTIONS[k]) for k in kept[:2]] + [
        (b"junk", "a cat"),
        (IMAGES["sub/d.png"], None),
    ]
    rows += [(IMAGES[k], CAPTIONS[k]) for k in kept[2:]]
    table = pa.table(
        {"jpg": [{"bytes": r[0], "path": None} for r in rows], "text": [r[1] for r in rows]}
    )
    pq.write_table(table, str(tmp_path / "pairs.parquet"), row_group_size=3)
    metadata = prepare.prepare(
        "text_to_image",
        str(tmp_path / "pairs.parquet"),
        str(tmp_path / "parquet"),
        image_column="jpg",
        caption_column="text",
        **common,
    )
    assert metadata["skipped"]["missing_caption"] == ["row 3"]
    assert [u["key"] for u in metadata["skipped"]["unreadable"]] == ["row 2"]
    parquet_records = check_text_records(
        LatentDataset(str(tmp_path / "parquet")), models, [CAPTIONS[k] for k in kept]
    )
    np.testing.assert_allclose(
        np.stack([r["mean"] for r in parquet_records]), mean, rtol=0, atol=1e-5
    )
    with pytest.raises(
        ValueError, match=r"no column 'caption' \(--caption_column.*\['jpg', 'text'\]"
    ):
        prepare.prepare(
            "text_to_image",
            str(tmp_path / "pairs.parquet"),
            str(tmp_path / "x"),
            image_column="jpg",
            **common,
        )

    # Plain binary image cells; --kind=latents needs no caption column.
    pq.write_table(pa.table({"image": [IMAGES[k] for k in kept]}), str(tmp_path / "images.parquet"))
    metadata = prepare.prepare(
        "latents",
        str(tmp_path / "images.parquet"),
        str(tmp_path / "binary"),
        models["vae"],
        image_size=SIZE,
        batch_size=8,
    )
    binary_records = [LatentDataset(str(tmp_path / "binary"))[i] for i in range(4)]
    np.testing.assert_allclose(
        np.stack([r["mean"] for r in binary_records]), mean, rtol=0, atol=1e-5
    )

    # Webdataset tar: key.png + key.txt; one key without a caption.
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, k in enumerate(kept + ["sub/d.png"]):
            members = {f"{i:04d}.png": IMAGES[k]}
            if k in kept:
                members[f"{i:04d}.txt"] = CAPTIONS[k].encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    metadata = prepare.prepare(
        "text_to_image", str(tmp_path / "shard.tar"), str(tmp_path / "tar"), **common
    )
    assert metadata["skipped"]["missing_caption"] == ["0004"] and metadata["num_examples"] == 4
    tar_records = check_text_records(
        LatentDataset(str(tmp_path / "tar")), models, [CAPTIONS[k] for k in kept]
    )
    np.testing.assert_allclose(np.stack([r["mean"] for r in tar_records]), mean, rtol=0, atol=1e-5)


def test_lmdb_source_with_a_stand_in_module(tmp_path, models, monkeypatch):
    """The `lmdb` package is not installed here: a stand-in with its API checks the key order
    (numeric) and the two value formats of the CelebA-HQ LMDB (raw RGB of a square image, or encoded
    bytes)."""
    import types

    raw = [
        np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        for i in range(11)
    ]
    entries = {str(i).encode(): raw[i].tobytes() for i in range(11)}
    entries[b"3"] = IMAGES["a.png"]

    class Txn:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def cursor(self):
            # LMDB orders keys bytewise: b"10" before b"2".
            return types.SimpleNamespace(
                iternext=lambda keys=True, values=False: iter(sorted(entries))
            )

        def get(self, key):
            return entries[key]

    env = types.SimpleNamespace(begin=lambda: Txn())
    monkeypatch.setitem(sys.modules, "lmdb", types.SimpleNamespace(open=lambda path, **kw: env))
    db = tmp_path / "train.lmdb"
    db.mkdir()
    (db / "data.mdb").write_bytes(b"")
    prepare.prepare(
        "latents",
        str(db),
        str(tmp_path / "out"),
        models["vae"],
        image_size=SIZE,
        batch_size=8,
        examples_per_shard=8,
    )
    ds = LatentDataset(str(tmp_path / "out"))
    assert [ds[i]["key"] for i in range(len(ds))] == [str(i) for i in range(11)]
    mean, _ = reference_posterior(
        models["vae"], [("raw", entries[str(i).encode()]) for i in (0, 3, 10)]
    )
    np.testing.assert_allclose(
        np.stack([ds[i]["mean"] for i in (0, 3, 10)]), mean, rtol=0, atol=1e-5
    )
    np.testing.assert_array_equal(
        prepare.load_image(("raw", entries[b"10"]), SIZE), raw[10]
    )  # already SIZE: exact


def test_clear_errors(tmp_path, models):
    images = _write_folder(tmp_path / "images")
    out = str(tmp_path / "out")
    t2i = dict(
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        image_size=SIZE,
        batch_size=8,
    )
    with pytest.raises(
        FileNotFoundError, match=r"--input \(config.data.prepare.input\)=.*nowhere does not exist"
    ):
        prepare.prepare("latents", str(tmp_path / "nowhere"), out, models["vae"], image_size=SIZE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures")
    with pytest.raises(ValueError, match="no images .* found"):
        prepare.prepare("latents", str(tmp_path / "empty"), out, models["vae"], image_size=SIZE)
    no_captions = _write_folder(tmp_path / "bare", captions=False)
    with pytest.raises(ValueError, match="no image has a caption"):
        prepare.prepare("text_to_image", no_captions, out, models["vae"], **t2i)
    with pytest.raises(
        ValueError,
        match=r"--image_size .*=15 is not a positive multiple of the VAE's downsampling "
        r"factor 2",
    ):
        prepare.prepare("latents", images, out, models["vae"], image_size=15)
    with pytest.raises(ValueError, match=r"--vae \(config.data.prepare.vae\) is required"):
        prepare.prepare("latents", images, out, None, image_size=SIZE)
    with pytest.raises(
        FileNotFoundError, match=r"--vae \(config.data.prepare.vae\)=.*missing_vae does not exist"
    ):
        prepare.prepare("latents", images, out, str(tmp_path / "missing_vae"), image_size=SIZE)
    with pytest.raises(
        ValueError, match=r"--text_encoder \(config.data.prepare.text_encoder\) is required"
    ):
        prepare.prepare(
            "text_to_image", images, out, models["vae"], **{**t2i, "text_encoder": None}
        )
    with pytest.raises(
        FileNotFoundError, match=r"--tokenizer \(config.data.prepare.tokenizer\)=.*does not exist"
    ):
        prepare.prepare(
            "text_to_image", images, out, models["vae"], **{**t2i, "tokenizer": str(tmp_path / "t")}
        )
    with pytest.raises(
        ValueError, match=r"--batch_size .*=12 must be a positive multiple of the 8 devices"
    ):
        prepare.prepare("latents", images, out, models["vae"], image_size=SIZE, batch_size=12)
    db = tmp_path / "celeba.lmdb"
    db.mkdir()
    (db / "data.mdb").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install lmdb"):
        prepare.prepare("latents", str(db), out, models["vae"], image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="metadata.json not found"):
        LatentDataset(str(tmp_path))


def _expected_image(ds, seed, step, index, hflip):
    """The contract, restated: scaling_factor * (mean + std * eps), eps and flip from
    rng(seed, step, index)."""
    rng = np.random.default_rng([seed, step, int(index)])
    flip = bool(rng.integers(2)) and hflip
    eps = rng.standard_normal((8, 8, 4), dtype=np.float32)
    record = ds[index]
    mean, std = (record[k][:, ::-1] if flip else record[k] for k in ("mean", "std"))
    return 0.18215 * (mean + std * eps), flip


def test_latent_batches_determinism_scaling_and_flip(latent_data):
    _, output, _ = latent_data
    batches = LatentBatches(output, global_batch=4, seed=7)
    assert (batches.global_batch, batches.num_examples, batches.steps_per_epoch) == (4, 5, 1)
    first = batches.batch(3)
    assert (
        set(first) == {"image"}
        and first["image"].shape == (4, 8, 8, 4)
        and first["image"].dtype == np.float32
    )
    np.testing.assert_array_equal(
        LatentBatches(output, 4, seed=7).batch(3)["image"], first["image"]
    )  # (seed, step)
    assert not np.allclose(batches.batch(4)["image"], first["image"])
    assert not np.allclose(LatentBatches(output, 4, seed=8).batch(3)["image"], first["image"])

    flips = []
    for step in range(4):
        for hflip in (True, False):
            got = LatentBatches(output, 4, seed=7, hflip=hflip).batch(step)["image"]
            for row, index in enumerate(batches.local_indices(step)):
                expected, flipped = _expected_image(batches.dataset, 7, step, index, hflip)
                np.testing.assert_allclose(got[row], expected, rtol=1e-6, atol=1e-6)
                flips.append(flipped)
    assert any(flips) and not all(flips)


def test_latent_batches_per_process_slices(latent_data, monkeypatch):
    _, output, _ = latent_data
    whole = LatentBatches(output, 4, seed=1)
    expected = {s: (whole.local_indices(s), whole.batch(s)["image"]) for s in (0, 2)}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        local = LatentBatches(output, 4, seed=1)
        for s, (indices, images) in expected.items():
            np.testing.assert_array_equal(local.local_indices(s), indices[2 * p : 2 * p + 2])
            np.testing.assert_array_equal(local.batch(s)["image"], images[2 * p : 2 * p + 2])
    with pytest.raises(
        ValueError, match="global batch 3 is not divisible by the number of processes"
    ):
        LatentBatches(output, 3, seed=1)


def test_latent_batches_interleaved_process_rows_make_the_global_batch(latent_data, monkeypatch):
    _, output, _ = latent_data
    whole = LatentBatches(output, 4, seed=1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # explicit rows override the default slice
    rows = ([0, 2], [3, 1])  # two processes, rows interleaved (and not sorted)
    parts = [LatentBatches(output, 4, seed=1, process_rows=r) for r in rows]
    for step in (0, 1, 5):
        want = whole.batch(step)["image"]
        got = np.full_like(want, np.nan)
        for r, part in zip(rows, parts):
            np.testing.assert_array_equal(part.local_indices(step), whole.local_indices(step)[r])
            got[r] = part.batch(step)["image"]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"process_rows holds rows outside the global batch of 4"):
        LatentBatches(output, 4, seed=1, process_rows=[2, 4])


def test_text_to_image_batches_carry_cond(tmp_path, models):
    images = _write_folder(tmp_path / "images", corrupt=False)
    prepare.prepare(
        "text_to_image",
        images,
        str(tmp_path / "out"),
        models["vae"],
        models["text_encoder"],
        models["tokenizer"],
        image_size=SIZE,
        batch_size=8,
        latent_dtype="float16",
    )
    batches = LatentBatches(str(tmp_path / "out"), 2, seed=0)
    batch = batches.batch(0)
    assert batch["image"].shape == (2, 8, 8, 4) and batch["cond"].shape == (2, 16, 32)
    assert batch["cond"].dtype == np.float32 and batches.dataset[0]["mean"].dtype == np.float16
    for row, index in enumerate(batches.local_indices(0)):
        np.testing.assert_array_equal(
            batch["cond"][row], batches.dataset[index]["cond"].astype(np.float32)
        )


def test_main_mode_prepare_data(tmp_path, models, tiny_config):
    from scflow_jax import main

    images = _write_folder(tmp_path / "images", captions=False)
    tiny_config.data.prepare.update(
        input=images, output=str(tmp_path / "out"), vae=models["vae"], image_size=SIZE, batch_size=8
    )
    assert main.run(tiny_config, str(tmp_path / "work"), "prepare_data") == 0
    assert len(LatentDataset(str(tmp_path / "out"))) == 5
    tiny_config.data.prepare.vae = None
    with pytest.raises(ValueError, match=r"config.data.prepare.vae\) is required"):
        main.run(tiny_config, str(tmp_path / "work"), "prepare_data")


def test_cli(tmp_path, models):
    images = _write_folder(tmp_path / "images", captions=False)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    cmd = [
        sys.executable,
        "-m",
        "scflow_jax.data.prepare",
        "--kind=latents",
        f"--input={images}",
        f"--output={out}",
        f"--vae={models['vae']}",
        f"--image_size={SIZE}",
        "--batch_size=4",
        "--examples_per_shard=4",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Prepared 5 examples" in result.stdout and "bad.png" in result.stdout
    assert sorted(os.listdir(out)) == [
        "metadata.json",
        "prepare_plan.json",
        "shard_reports",
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
    ]
    result = subprocess.run(
        cmd[:5] + [f"--output={out}2", "--vae="],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=root,
    )
    assert result.returncode != 0 and "--vae (config.data.prepare.vae) is required" in result.stderr
