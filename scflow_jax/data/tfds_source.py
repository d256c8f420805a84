"""TFDS datasets as a ``prepare_data`` input: ``tfds:NAME[/CONFIG][:SPLIT]``, without TensorFlow.

The dataset is opened from its prepared files alone (``tfds.builder_from_directory`` on
``<tfds_data_dir>/NAME[/CONFIG]/<newest version>``), so neither the dataset's builder code (the
``coco_captions`` and ``celeb_a_hq`` builders call TensorFlow) nor TensorFlow runs. Records are
read raw through the builder's ``as_data_source`` (what ``tfds.data_source`` returns: random
access over array_record) and only the features prepare needs are parsed, by TFDS's NumPy parser:
the image stays encoded (PIL decodes it in prepare's worker threads, as for every other source);
the caption is a string feature (``Text`` or ``np.str_``) or a ``Sequence`` of them. Features
prepare does not use are never decoded, so they can neither fail nor cost time.

Items are the split's records in file order (fixed when the dataset was built), keyed
``SPLIT[i]``. An example with several captions (COCO's five) keeps one: the caption whose UTF-8
text has the smallest SHA-256 digest, a choice that depends on the captions alone, not on their
order or on the example's position; an example with none is skipped as ``missing_caption``.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from scflow_jax.data.sources import Source, keep_captioned, option

PREFIX = "tfds:"
SPEC_FORM = "tfds:NAME[/CONFIG][:SPLIT] (e.g. tfds:coco_captions/2014:train)"
_SPEC = re.compile(r"tfds:(?P<name>[a-z0-9_]+)(?:/(?P<config>[\w.+-]+))?(?::(?P<split>.+))?")
_READ_CHUNK = 256  # records per data-source call while listing captions
TENSORFLOW_EXTRA = "pip install 'scflow_jax[tensorflow]'"


def is_tfds_spec(value: Optional[str]) -> bool:
    return bool(value) and value.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, Optional[str], str]:
    """``tfds:NAME[/CONFIG][:SPLIT]`` -> (name, config or None, split; default ``train``)."""
    match = _SPEC.fullmatch(spec)
    if not match:
        raise ValueError(f"{option('input')}={spec!r} is not a TFDS dataset: expected {SPEC_FORM}")
    return match["name"], match["config"], match["split"] or "train"


def _versions(folder: str) -> list[str]:
    """The finished versions in ``folder`` (``1.2.0/dataset_info.json``), oldest first."""
    import tensorflow_datasets as tfds

    if not os.path.isdir(folder):
        return []
    found = [
        v
        for v in os.listdir(folder)
        if tfds.core.Version.is_valid(v)
        and os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
    ]
    return sorted(found, key=tfds.core.Version)


def _subfolders(folder: str) -> list[str]:
    return sorted(
        n
        for n in os.listdir(folder)
        if os.path.isdir(os.path.join(folder, n))
        and not n.startswith(("incomplete.", "."))
        and n != "downloads"
    )


def dataset_version_dir(data_dir: str, name: str, config: Optional[str]) -> str:
    """``data_dir/name[/config]/<newest version>``, or an error naming what ``data_dir`` holds."""
    where = f"{option('tfds_data_dir')}={data_dir}"
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"{where} does not exist (it is the folder `tfds build --data_dir` wrote to)"
        )
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        raise ValueError(
            f"{where} has no TFDS dataset {name!r}; it holds: {_subfolders(data_dir) or 'nothing'}"
        )
    configs = [c for c in _subfolders(root) if _versions(os.path.join(root, c))]
    if config is None:
        if not _versions(root) and configs:
            raise ValueError(
                f"TFDS dataset {name!r} in {data_dir} has configs {configs}: name "
                f"one in {option('input')}, e.g. tfds:{name}/{configs[0]}"
            )
        folder = root
    else:
        if config not in configs:
            raise ValueError(
                f"TFDS dataset {name!r} in {data_dir} has no config {config!r}; its "
                f"configs: {configs or 'none (use tfds:' + name + ')'}"
            )
        folder = os.path.join(root, config)
    versions = _versions(folder)
    if not versions:
        raise ValueError(
            f"{folder} holds no finished TFDS build (a version folder with "
            f"dataset_info.json); build it with `tfds build {name} "
            f"--data_dir={data_dir} --file_format=array_record`"
        )
    return os.path.join(folder, versions[-1])


def _feature_paths(features, prefix=(), depth=0) -> dict[str, tuple[tuple[str, ...], Any, int]]:
    """Every leaf feature by its ``/``-joined path: (path of dict keys, feature, Sequence depth).
    A path's parts are the keys of nested dicts (a key may itself hold a ``/``, as in COCO's
    ``image/id``); the depth counts the ``Sequence`` wrappers on the way."""
    import tensorflow_datasets as tfds

    leaves = {}
    if isinstance(features, tfds.features.Sequence):
        return _feature_paths(features.feature, prefix, depth + 1)
    if isinstance(features, tfds.features.FeaturesDict):
        for key, feature in features.items():
            leaves.update(_feature_paths(feature, prefix + (key,), depth))
        return leaves
    return {"/".join(prefix): (prefix, features, depth)}


def _is_string(feature) -> bool:
    """A scalar string: ``Text`` or ``np.str_`` (a string ``Tensor``), without a TFDS text
    encoder (whose values are token ids)."""
    import tensorflow_datasets as tfds

    return (
        isinstance(feature, tfds.features.Tensor)
        and feature.shape == ()
        and np.dtype(feature.np_dtype) == np.object_
        and getattr(feature, "encoder", None) is None
    )


def _describe(feature, depth: int) -> str:
    text = type(feature).__name__
    for _ in range(depth):
        text = f"Sequence({text})"
    return text


def _lookup(paths: dict, key: str, field: str, spec: str):
    if key not in paths:
        raise ValueError(
            f"{spec} has no feature {key!r} ({option(field)}); its features: {sorted(paths)}"
        )
    return paths[key]


def _nested(path: Sequence[str], leaf) -> dict:
    """{'a': {'b': leaf}} for the path ('a', 'b'): the shape of TFDS decoders and examples."""
    out = leaf
    for key in reversed(path):
        out = {key: out}
    return out


def _get(example: dict, path: Sequence[str]):
    for key in path:
        example = example[key]
    return example


def _parser(features, path: Sequence[str]):
    """A FeaturesDict of just the top-level feature holding ``path``: TFDS's NumPy parser ignores
    the record's other features, so they are never decoded."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({path[0]: features[path[0]]})


def choose_caption(captions) -> Optional[str]:
    """One caption of an example: a single string as it is; of several, the one whose UTF-8 text
    has the smallest SHA-256 digest (independent of their order); None if there are none."""
    if isinstance(captions, (bytes, str)):
        captions = [captions]
    texts = [(c.decode("utf-8") if isinstance(c, bytes) else str(c)).strip() for c in captions]
    if not texts:
        return None
    return min(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).digest())


def _decode_or_explain(parser, record: bytes, decoders, key: str, feature, depth: int, spec: str):
    try:
        return parser.deserialize_example_np(record, decoders=decoders)
    except ModuleNotFoundError as e:
        if e.name != "tensorflow" and "'tensorflow'" not in str(e):
            raise
        raise ValueError(
            f"{spec}: TFDS decodes feature {key!r} ({_describe(feature, depth)}) only with "
            f"TensorFlow, which prepare_data does not use. Export the dataset to a parquet file or "
            f"an image folder with tfds.load (TensorFlow: {TENSORFLOW_EXTRA}) and prepare that"
        ) from None


def tfds_source(
    spec: str, data_dir: Optional[str], image_key: str, caption_key: str, need_captions: bool
) -> Source:
    import tensorflow_datasets as tfds

    name, config, split = parse_spec(spec)
    data_dir = os.path.abspath(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR))
    version_dir = dataset_version_dir(data_dir, name, config)
    builder = tfds.builder_from_directory(version_dir)
    info = builder.info
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if not info.available_file_formats() & random_access:
        stored = ", ".join(sorted(f.value for f in info.available_file_formats())) or "unknown"
        raise ValueError(
            f"{spec}: {version_dir} is stored as {stored}; prepare_data reads TFDS datasets with "
            f"tfds.data_source, which needs array_record. Convert it once with "
            f"`tfds convert_format --dataset_version_dir={version_dir} "
            f"--out_file_format=array_record` (reading "
            f"tfrecord needs TensorFlow: {TENSORFLOW_EXTRA}), or rebuild it with "
            f"`tfds build {name} --file_format=array_record`"
        )
    base_split = split.split("[", 1)[0]
    if base_split not in info.splits:
        raise ValueError(
            f"{spec}: TFDS dataset {info.full_name} has no split {base_split!r}; its "
            f"splits: {sorted(info.splits)}"
        )

    paths = _feature_paths(info.features)
    image_path, image_feature, image_depth = _lookup(paths, image_key, "image_column", spec)
    if not isinstance(image_feature, tfds.features.Image) or image_depth:
        raise ValueError(
            f"{spec}: feature {image_key!r} ({option('image_column')}) is "
            f"{_describe(image_feature, image_depth)}, not a tfds.features.Image"
        )
    if np.dtype(image_feature.np_dtype) != np.uint8:
        raise ValueError(
            f"{spec}: feature {image_key!r} holds {image_feature.np_dtype} images; "
            f"prepare_data reads 8-bit images"
        )
    try:
        records = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        num_items = len(records)  # a reversed slice (train[4:2]) fails only here
    except ValueError as e:
        raise ValueError(
            f"{option('input')}={spec}: split {split!r} is not a valid slice of "
            f"{sorted(info.splits)}: {e}"
        ) from None
    if not num_items:
        raise ValueError(f"{option('input')}={spec}: the split has no examples")
    keys = [f"{split}[{i}]" for i in range(num_items)]
    name_and_config = info.full_name.rsplit("/", 1)[0]
    origin = f"tfds:{name_and_config}:{split} (version {info.version}, {version_dir})"

    captions: list = [None] * num_items
    if need_captions:
        caption_path, caption_feature, depth = _lookup(paths, caption_key, "caption_column", spec)
        if not _is_string(caption_feature) or depth > 1:
            raise ValueError(
                f"{spec}: feature {caption_key!r} ({option('caption_column')}) is "
                f"{_describe(caption_feature, depth)}; captions are a string feature "
                f"(Text, np.str_) or a Sequence of them (one is chosen per image)"
            )
        parser = _parser(info.features, caption_path)
        for start in range(0, num_items, _READ_CHUNK):
            for i, record in enumerate(
                records.__getitems__(range(start, min(start + _READ_CHUNK, num_items))), start
            ):
                example = _decode_or_explain(
                    parser, record, None, caption_key, caption_feature, depth, spec
                )
                captions[i] = choose_caption(_get(example, caption_path))

    image_parser = _parser(info.features, image_path)
    skip = _nested(image_path, tfds.decode.SkipDecoding())  # the encoded bytes, for PIL

    def fetch(indices):
        raw = records.__getitems__(list(indices))
        return [
            _get(
                _decode_or_explain(image_parser, r, skip, image_key, image_feature, 0, spec),
                image_path,
            )
            for r in raw
        ]

    keys, captions, rows, missing = keep_captioned(
        keys, captions, list(range(num_items)), need_captions
    )
    return Source(
        f"TFDS {info.full_name} {split}",
        keys,
        captions,
        lambda idx: fetch([rows[i] for i in idx]),
        {"missing_caption": missing, "ignored_files": []},
        origin,
    )
