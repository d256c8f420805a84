"""prepare_data from a TFDS dataset (scflow_jax.data.tfds_source), without TensorFlow.

The tests build two tiny array_record TFDS datasets with ``GeneratorBasedBuilder``, as a user's
``tfds build --file_format=array_record`` would (images given as encoded bytes, which TFDS stores
without TensorFlow): ``tiny_faces`` (images and a label, one corrupt image) and ``tiny_coco/2014``
(COCO-captions-style: ``image``, ``image/id``, ``captions`` = Sequence({text, id}) with 0 to 5
captions, ``objects``, and a single ``title`` string). Models are conftest's tiny VAE and CLIP
text encoder (the ``models`` fixture).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_testlib import IMAGES, SIZE, check_text_records, mtimes, reference_posterior
from scflow_jax import main
from scflow_jax.data import latents, prepare, tfds_source
from scflow_jax.data.latents import LatentDataset

CORRUPT = b"not a png"
# Per example: its image and its captions. The third has none (skipped as missing_caption); the
# SHA-256 choice differs from "the first caption" for some examples (asserted below).
COCO = [
    ("a.png", ["a cat on a mat", "the cat sits", "one cat"]),
    ("b.png", ["a dog"]),
    ("sub/c.png", []),
    ("sub/d.png", ["two dogs", "dogs playing", "a pair of dogs", "dogs", "the dogs run"]),
    ("sub/e.png", ["  a cat and a dog  ", "cat, dog"]),
]


class TinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=2)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, data in enumerate(list(IMAGES.values()) + [CORRUPT]):
            yield f"face{i}", {"image": data, "label": i % 2}


class TinyCoco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(),
                    "image/id": np.int64,
                    "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
                    "objects": tfds.features.Sequence(
                        {"label": tfds.features.ClassLabel(num_classes=3)}
                    ),
                    "title": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (name, captions) in enumerate(COCO):
            yield (
                i,
                {
                    "image": IMAGES[name],
                    "image/id": i,
                    "title": f"picture {name}",
                    "captions": {"text": captions, "id": list(range(len(captions)))},
                    "objects": {"label": [i % 3]},
                },
            )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    TinyFaces(data_dir=root, file_format="array_record").download_and_prepare()
    TinyCoco(data_dir=root, config="2014", file_format="array_record").download_and_prepare()
    return root


def _stored_examples(data_dir, name, split="train"):
    """The split as a user reads it with TFDS (images left encoded), in TFDS's record order."""
    ds = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return [ds[i] for i in range(len(ds))]


def _sha_choice(captions):
    texts = [c.strip() for c in captions]
    return min(texts, key=lambda t: hashlib.sha256(t.encode()).digest()) if texts else None


def test_choose_caption_is_independent_of_order():
    captions = [c for _, cs in COCO for c in cs]
    chosen = tfds_source.choose_caption(captions)
    assert chosen == _sha_choice(captions)
    assert tfds_source.choose_caption(captions[::-1]) == chosen
    assert tfds_source.choose_caption([c.encode() for c in captions]) == chosen  # TFDS gives bytes
    assert tfds_source.choose_caption(b" one caption ") == "one caption"
    assert tfds_source.choose_caption([]) is None


def test_latents_from_tfds_and_resume(data_dir, models, tmp_path):
    examples = _stored_examples(data_dir, "tiny_faces")
    bad = [i for i, e in enumerate(examples) if e["image"] == CORRUPT]
    good = [i for i in range(len(examples)) if i not in bad]
    assert len(bad) == 1 and len(good) == 5
    output = str(tmp_path / "faces_latents")
    settings = dict(image_size=SIZE, batch_size=8, examples_per_shard=2, tfds_data_dir=data_dir)
    metadata = prepare.prepare("latents", "tfds:tiny_faces", output, models["vae"], **settings)

    assert metadata["num_examples"] == 5 and metadata["num_shards"] == 3
    assert metadata["source"] == (
        f"tfds:tiny_faces:train (version 1.0.0, {os.path.join(data_dir, 'tiny_faces', '1.0.0')})"
    )
    assert [u["key"] for u in metadata["skipped"]["unreadable"]] == [f"train[{bad[0]}]"]
    ds = LatentDataset(output)
    assert [ds[i]["key"] for i in range(len(ds))] == [f"train[{i}]" for i in good]
    mean, std = reference_posterior(models["vae"], [examples[i]["image"] for i in good])
    np.testing.assert_allclose(np.stack([ds[i]["mean"] for i in range(5)]), mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([ds[i]["std"] for i in range(5)]), std, rtol=0, atol=1e-5)

    # The same command again rewrites only a missing shard.
    before = mtimes(output)
    victim = latents.shard_name(2, 3)
    os.remove(os.path.join(output, victim))
    again = prepare.prepare("latents", "tfds:tiny_faces", output, models["vae"], **settings)
    assert again == metadata
    after = mtimes(output)
    assert sorted(after) == sorted(before)
    assert all(after[n] == before[n] for n in before if n != victim)
    # Another split is another input: refused, naming the change.
    with pytest.raises(
        ValueError,
        match=r"source: 'tfds:tiny_faces:train .*' -> "
        r"'tfds:tiny_faces:train\[:4\] .*--output",
    ):
        prepare.prepare("latents", "tfds:tiny_faces:train[:4]", output, models["vae"], **settings)


def test_text_to_image_from_coco_style_captions(data_dir, models, tmp_path):
    examples = _stored_examples(data_dir, "tiny_coco/2014")
    texts = [[t.decode() for t in e["captions"]["text"]] for e in examples]
    expected = [_sha_choice(t) for t in texts if t]
    assert any(_sha_choice(t) != t[0].strip() for t in texts if t)  # not simply the first caption
    output = str(tmp_path / "coco_t2i")
    metadata = prepare.prepare(
        "text_to_image",
        "tfds:tiny_coco/2014:train",
        output,
        models["vae"],
        models["text_encoder"],
        models["tokenizer"],
        image_size=SIZE,
        batch_size=8,
        caption_column="captions/text",
        tfds_data_dir=data_dir,
    )
    empty = [i for i, t in enumerate(texts) if not t]
    assert metadata["skipped"]["missing_caption"] == [f"train[{i}]" for i in empty]
    assert metadata["num_examples"] == 4 and metadata["cond_shape"] == [16, 32]
    records = check_text_records(LatentDataset(output), models, expected)
    kept = [i for i, t in enumerate(texts) if t]
    assert [r["key"] for r in records] == [f"train[{i}]" for i in kept]
    mean, _ = reference_posterior(models["vae"], [examples[i]["image"] for i in kept])
    np.testing.assert_allclose(np.stack([r["mean"] for r in records]), mean, rtol=0, atol=1e-5)


def test_main_mode_prepare_data_with_a_single_caption_feature(
    data_dir, models, tiny_config, tmp_path
):
    examples = _stored_examples(data_dir, "tiny_coco/2014")
    tiny_config.data.prepare.update(
        kind="text_to_image",
        input="tfds:tiny_coco/2014",
        output=str(tmp_path / "out"),
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        image_size=SIZE,
        batch_size=8,
        caption_column="title",
        tfds_data_dir=data_dir,
    )
    assert main.run(tiny_config, str(tmp_path / "work"), "prepare_data") == 0
    check_text_records(
        LatentDataset(str(tmp_path / "out")), models, [e["title"].decode() for e in examples]
    )


def _tfrecord_copy(data_dir, tmp_path):
    """tiny_faces as dataset_info.json describes a `tfds build` with the default tfrecord format
    (writing tfrecord needs TensorFlow, so only the metadata is changed)."""
    copy = tmp_path / "tfrecord_dir"
    shutil.copytree(os.path.join(data_dir, "tiny_faces"), copy / "tiny_faces")
    info_path = copy / "tiny_faces" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    return str(copy)


def test_clear_errors(data_dir, models, tmp_path, monkeypatch):
    def open_(spec, kind="latents", image="image", caption="caption", where=data_dir):
        return prepare.open_source(spec, kind, image, caption, where)

    for spec in ("tfds:", "tfds:Faces", "tfds:tiny_faces/", "tfds:tiny_faces:", "tfds:a/b/c"):
        with pytest.raises(
            ValueError,
            match=r"--input \(config.data.prepare.input\)=.* is not "
            r"a TFDS dataset: expected "
            r"tfds:NAME\[/CONFIG\]\[:SPLIT\]",
        ):
            prepare.prepare("latents", spec, str(tmp_path / "out"), models["vae"], image_size=SIZE)
    with pytest.raises(FileNotFoundError, match=r"--tfds_data_dir .*nowhere does not exist"):
        open_("tfds:tiny_faces", where=str(tmp_path / "nowhere"))
    with pytest.raises(
        ValueError,
        match=r"no TFDS dataset 'faces'; it holds: \['tiny_coco', "
        r"'tiny_faces'\]",
    ):
        open_("tfds:faces")
    with pytest.raises(
        ValueError,
        match=r"has configs \['2014'\]: name one .* "
        r"tfds:tiny_coco/2014",
    ):
        open_("tfds:tiny_coco")
    with pytest.raises(ValueError, match=r"no config '2017'; its configs: \['2014'\]"):
        open_("tfds:tiny_coco/2017")
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits: \['train'\]"):
        open_("tfds:tiny_faces:validation")
    with pytest.raises(ValueError, match=r"split 'train\[4:2\]'"):
        open_("tfds:tiny_faces:train[4:2]")
    features = r"\['captions/id', 'captions/text', 'image', 'image/id', 'objects/label', 'title'\]"
    with pytest.raises(
        ValueError, match=r"no feature 'img' \(--image_column .*its features: " + features
    ):
        open_("tfds:tiny_coco/2014", image="img")
    with pytest.raises(
        ValueError,
        match=r"'title' \(--image_column .*\) is Text, not a "
        r"tfds.features.Image",
    ):
        open_("tfds:tiny_coco/2014", image="title")
    with pytest.raises(
        ValueError, match=r"no feature 'caption' \(--caption_column .*its features: " + features
    ):
        open_("tfds:tiny_coco/2014", "text_to_image")
    with pytest.raises(
        ValueError,
        match=r"'objects/label' \(--caption_column .*\) is "
        r"Sequence\(ClassLabel\); captions are a string feature",
    ):
        open_("tfds:tiny_coco/2014", "text_to_image", caption="objects/label")
    with pytest.raises(
        ValueError,
        match=r"stored as tfrecord; .*tfds convert_format "
        r"--dataset_version_dir=.*tiny_faces/1.0.0 "
        r"--out_file_format=array_record.*"
        r"scflow_jax\[tensorflow\]",
    ):
        open_("tfds:tiny_faces", where=_tfrecord_copy(data_dir, tmp_path))

    # A feature whose TFDS decoding imports TensorFlow (none of Image, Text or np.str_ does in
    # the installed TFDS; a later release or another feature type might): the error names it.
    def needs_tensorflow(self, record, decoders=None):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(tfds.features.FeaturesDict, "deserialize_example_np", needs_tensorflow)
    with pytest.raises(
        ValueError,
        match=r"decodes feature 'captions/text' \(Sequence\(Tensor\)\) "
        r"only with TensorFlow.*scflow_jax\[tensorflow\]",
    ):
        open_("tfds:tiny_coco/2014", "text_to_image", caption="captions/text")


def test_cli_reads_tfds_without_importing_tensorflow(data_dir, models, tmp_path):
    """The standalone CLI on a TFDS input, in a fresh interpreter: TensorFlow is never imported
    (where it is not installed, as here, an import would fail the run)."""
    out = tmp_path / "out"
    argv = [
        "prepare",
        "--kind=latents",
        "--input=tfds:tiny_faces:train[1:]",
        f"--output={out}",
        f"--tfds_data_dir={data_dir}",
        f"--vae={models['vae']}",
        f"--image_size={SIZE}",
        "--batch_size=2",
        "--examples_per_shard=8",
    ]
    script = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('scflow_jax.data.prepare', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow imported: False" in result.stdout
    examples = _stored_examples(data_dir, "tiny_faces", "train[1:]")
    good = [i for i, e in enumerate(examples) if e["image"] != CORRUPT]
    assert f"Prepared {len(good)} examples" in result.stdout
    ds = LatentDataset(str(out))
    assert [ds[i]["key"] for i in range(len(ds))] == [f"train[1:][{i}]" for i in good]
