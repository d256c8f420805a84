"""FID: the pytorch-fid Inception in Flax, sharded float64 statistics, resume, reference stats from
images.

Parity tests build pytorch-fid's own ``InceptionV3`` (its FID blocks, random weights, nothing
downloaded) and compare 2048-d pool features: max abs error <= 1e-4 in fp32.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scflow_jax import sharding
from scflow_jax.evaluation import fid, frechet, inception
from scflow_jax.models.weights import WeightsError

PARITY_TOL = 1e-4  # max abs error of fp32 features against the PyTorch reference


# --------------------------------------------------------------------------------------------------
# A pytorch-fid Inception with random weights


def _build_reference_inception(monkeypatch_ctx):
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True)`` with the FID
    blocks, built by pytorch-fid's ``fid_inception_v3`` with the weights download replaced by a
    random torchvision state dict.

    Random weights are scaled so that activations neither die nor explode through the ~40 layers
    (He-normal convolutions, BatchNorm gains around 1, random running statistics): the features then
    depend on the input (checked by the test) and fp32 rounding is not amplified.
    Returns ``(model, inner)``: ``inner`` is the torchvision module whose ``state_dict()`` is the
    weights file.
    """
    import pytorch_fid.inception as pfi
    import torch
    import torchvision

    def fake_download(url, progress=True):
        return torchvision.models.inception_v3(
            weights=None, aux_logits=False, init_weights=False, num_classes=1008
        ).state_dict()

    captured = {}
    original = pfi.fid_inception_v3

    def capture():
        captured["inner"] = original()
        return captured["inner"]

    monkeypatch_ctx.setattr(pfi, "load_state_dict_from_url", fake_download)
    monkeypatch_ctx.setattr(pfi, "fid_inception_v3", capture)
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=gen)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.7, 1.3, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    model.eval()
    return model, captured["inner"]


@pytest.fixture(scope="module")
def reference_inception(tmp_path_factory):
    """(torch model, path of its pytorch-fid-format weights file); built once for the module."""
    import torch

    with pytest.MonkeyPatch.context() as mp:
        model, inner = _build_reference_inception(mp)
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
    state = inner.state_dict()
    assert "fc.weight" in state and any(
        k.endswith("num_batches_tracked") for k in state
    )  # must be ignorable
    torch.save(state, path)
    return model, path


def _torch_features(model, images_nhwc):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))[0]
    return out.reshape(out.shape[0], -1).numpy()


# --------------------------------------------------------------------------------------------------
# Inception parity


@pytest.mark.parity
def test_resize_matches_torch_bilinear_without_antialias():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (320, 320), (32, 48), (512, 400), (299, 299)]:
        x = rng.random((2, h, w, 3), dtype=np.float32)
        ref = (
            F.interpolate(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                size=(299, 299),
                mode="bilinear",
                align_corners=False,
            )
            .numpy()
            .transpose(0, 2, 3, 1)
        )
        ours = np.asarray(inception.resize_for_inception(jnp.asarray(x)))
        assert np.abs(ours - ref).max() <= 1e-6, (h, w)
    # jax.image.resize's default (antialias on downsampling) is NOT torch's resize: the reason for
    # antialias=False.
    x = rng.random((1, 320, 320, 3), dtype=np.float32)
    ref = (
        F.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    antialiased = np.asarray(jax.image.resize(jnp.asarray(x), (1, 299, 299, 3), "bilinear"))
    assert np.abs(antialiased - ref).max() > 1e-2


@pytest.mark.parity
def test_inception_features_match_pytorch_fid(reference_inception):
    model, path = reference_inception
    params = inception.load_inception(path)
    apply = jax.jit(inception.InceptionV3FID().apply)
    rng = np.random.default_rng(1)
    for size in (64, 320):  # upsampling and downsampling to 299
        images = rng.random((2, size, size, 3), dtype=np.float32)
        ref = _torch_features(model, images)
        ours = np.asarray(apply({"params": params}, images))
        assert ours.shape == ref.shape == (2, inception.FEATURE_DIM)
        # The comparison means something only if the features depend on the image.
        assert np.abs(ref[0] - ref[1]).max() > 100 * PARITY_TOL
        err = np.abs(ours - ref).max()
        assert err <= PARITY_TOL, f"{size}x{size}: max abs error {err:.3g} > {PARITY_TOL}"


@pytest.mark.parity
def test_load_inception_rejects_other_networks(reference_inception, tmp_path):
    import torch

    _, path = reference_inception
    # Another network entirely: every key is reported.
    other = str(tmp_path / "other.pth")
    torch.save(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict(), other
    )
    with pytest.raises(WeightsError) as info:
        inception.load_inception(other)
    msg = str(info.value)
    assert other in msg and "missing" in msg and "Conv2d_1a_3x3.conv.weight" in msg
    assert "unexpected" in msg and "0.weight" in msg
    # torchvision's ImageNet Inception (it has AuxLogits): named as unexpected, not silently
    # accepted.
    state = torch.load(path, weights_only=True)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    aux = str(tmp_path / "with_aux.pth")
    torch.save(state, aux)
    with pytest.raises(WeightsError, match="AuxLogits.fc.weight"):
        inception.load_inception(aux)


@pytest.mark.parity
def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(2)
    dim = 16
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = a @ a.T / dim, b @ b.T / dim
    ours = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    ref = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


@pytest.mark.parity
def test_fid_stats_mode_matches_pytorch_fid_on_a_folder(reference_inception, tmp_path):
    """--mode=fid_stats end to end (PNG files, the CLI dispatch, 8-device mesh, a ragged last batch)
    against pytorch-fid's own calculate_activation_statistics on the same files and network."""
    from PIL import Image
    from pytorch_fid.fid_score import calculate_activation_statistics

    from scflow_jax import main
    from scflow_jax.default_config import get_config

    model, path = reference_inception
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            images_dir / f"{i}.png"
        )
    config = get_config("tiny")
    config.fid.inception_path = path
    config.fid.images_dir = str(images_dir)
    config.fid.output_npz = str(tmp_path / "ref.npz")
    config.fid.batch_size = 8  # 5 images: one padded batch on 8 devices
    assert main.run(config, str(tmp_path / "work"), "fid_stats") == 0
    mu, sigma = frechet.load_statistics(config.fid.output_npz, expected_dim=inception.FEATURE_DIM)

    files = sorted(str(p) for p in images_dir.glob("*.png"))
    ref_mu, ref_sigma = calculate_activation_statistics(
        files, model, batch_size=2, dims=2048, device="cpu", num_workers=0
    )
    assert np.abs(mu - ref_mu).max() <= PARITY_TOL
    assert np.abs(sigma - ref_sigma).max() <= PARITY_TOL


# --------------------------------------------------------------------------------------------------
# Sharding, ragged batches, resume (a tiny feature function: the logic under test is the same for
# Inception)

FEATURE_DIM = 6


def _tiny_features(params, images):
    flat = images.reshape(images.shape[0], -1)
    return jnp.tanh(flat @ params["w"]) + params["b"]


def _tiny_params():
    rng = np.random.default_rng(4)
    return {
        "w": rng.normal(size=(4 * 4 * 3, FEATURE_DIM)).astype(np.float32) / 4,
        "b": rng.normal(size=(FEATURE_DIM,)).astype(np.float32),
    }


def _images(n, seed=5):
    return np.random.default_rng(seed).random((n, 4, 4, 3), dtype=np.float32)


def _extractor(num_devices, batch_size=8):
    mesh = sharding.make_mesh(num_devices=num_devices)
    return fid.FeatureExtractor(_tiny_features, _tiny_params(), mesh, batch_size)


def test_sharded_statistics_do_not_depend_on_device_count_and_count_a_ragged_batch_exactly():
    images = _images(37)  # 4 full batches of 8 and a ragged one of 5
    expected = np.asarray(_tiny_features(_tiny_params(), jnp.asarray(images)), np.float64)
    results = {}
    for devices in (1, 8):
        extract = _extractor(devices)
        acc = fid.accumulate(
            extract, lambda i: images[i * 8 : (i + 1) * 8], 5, fid.FIDAccumulator(FEATURE_DIM)
        )
        assert acc.num_samples == 37 and acc.num_batches == 5
        results[devices] = acc.statistics.statistics()
        assert extract(images[:3]).shape == (
            3,
            FEATURE_DIM,
        )  # a short call returns exactly its rows
        assert extract(images).shape == (37, FEATURE_DIM)  # a long call is chunked
    ref_mu, ref_sigma = frechet.feature_statistics(expected)
    for mu, sigma in results.values():
        np.testing.assert_allclose(mu, ref_mu, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sigma, ref_sigma, rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[1][0], results[8][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[1][1], results[8][1], rtol=0, atol=1e-6)


def test_batch_size_must_divide_devices():
    with pytest.raises(
        ValueError, match="config.fid.batch_size=12 is not divisible by the number of devices"
    ):
        fid.FeatureExtractor(
            _tiny_features,
            _tiny_params(),
            sharding.make_mesh(num_devices=8),
            12,
            field="config.fid.batch_size",
        )


def test_interrupted_accumulation_resumes_to_the_uninterrupted_statistics(tmp_path):
    images = _images(45)
    extract = _extractor(8)
    get_batch = lambda i: images[i * 8 : (i + 1) * 8]  # noqa: E731
    full = fid.accumulate(extract, get_batch, 6, fid.FIDAccumulator(FEATURE_DIM))

    state = str(tmp_path / "acc.npz")
    fetched = []

    def interrupted(i):
        if i == 4:
            raise KeyboardInterrupt("simulated preemption")
        fetched.append(i)
        return get_batch(i)

    acc = fid.FIDAccumulator.restore_or_create(state, FEATURE_DIM, save_every=3, fingerprint="job")
    with pytest.raises(KeyboardInterrupt):
        fid.accumulate(extract, interrupted, 6, acc)
    assert fetched == [0, 1, 2, 3]

    fetched.clear()
    resumed = fid.FIDAccumulator.restore_or_create(
        state, FEATURE_DIM, save_every=3, fingerprint="job"
    )
    assert (resumed.num_batches, resumed.num_samples) == (
        3,
        24,
    )  # saved after batch 3; batch 4 is redone
    fid.accumulate(extract, lambda i: fetched.append(i) or get_batch(i), 6, resumed)
    assert fetched == [3, 4, 5]
    assert resumed.num_samples == full.num_samples == 45
    for ours, ref in zip(resumed.statistics.statistics(), full.statistics.statistics()):
        np.testing.assert_array_equal(ours, ref)

    with pytest.raises(ValueError, match="belongs to another evaluation"):
        fid.FIDAccumulator.restore_or_create(state, FEATURE_DIM, fingerprint="another job")


def test_reference_statistics_of_another_dimension_are_refused(tmp_path):
    path = str(tmp_path / "digits_ref.npz")
    frechet.save_statistics(path, np.zeros(64), np.eye(64))
    with pytest.raises(ValueError, match=r"digits_ref.npz holds 64-d features .* are 2048-d"):
        fid.fid_against_reference(np.zeros(2048), np.eye(2048), path)
    assert fid.fid_against_reference(np.ones(64), np.eye(64), path) == pytest.approx(64.0)


def test_image_listing_is_recursive_and_an_empty_folder_is_an_error(tmp_path):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        fid.list_images(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        fid.list_images(str(tmp_path / "missing"))
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    Image.fromarray(pixels).save(folder / "b.PNG")
    Image.fromarray(pixels).save(folder / "sub" / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    files = fid.list_images(str(folder))
    assert [os.path.relpath(f, folder) for f in files] == ["b.PNG", os.path.join("sub", "a.jpg")]
    image = fid.load_image(files[0])
    assert image.dtype == np.float32 and image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image, pixels.astype(np.float32) / 255)
    # Images of different sizes in one batch are each brought to 299x299 (what the network's resize
    # would do).
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(folder / "c.png")
    batch = fid._stack_images([files[0], str(folder / "c.png")])
    assert batch.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(
        batch[0], np.asarray(inception.resize_for_inception(image[None]))[0], atol=1e-6
    )


def test_fid_stats_config_errors_name_the_field(tmp_path):
    from scflow_jax.default_config import get_config

    config = get_config("tiny")
    with pytest.raises(ValueError, match="config.fid.inception_path must be set"):
        fid.validate_fid_stats_config(config)
    config.fid.inception_path = str(tmp_path / "missing.pth")
    config.fid.images_dir = str(tmp_path)
    config.fid.output_npz = str(tmp_path / "out.npz")
    config.fid.batch_size = 8
    with pytest.raises(ValueError, match="config.fid.inception_path=.*missing.pth is not a file"):
        fid.validate_fid_stats_config(config)
    (tmp_path / "w.pth").write_bytes(b"")
    config.fid.inception_path = str(tmp_path / "w.pth")
    config.fid.batch_size = 0
    with pytest.raises(ValueError, match="config.fid.batch_size=0 must be a positive integer"):
        fid.validate_fid_stats_config(config)
