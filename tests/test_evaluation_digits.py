"""Tests for the Fréchet-distance utilities and the digits-demo classifier metric (CPU)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from scipy.stats import ortho_group

from scflow_jax.evaluation import digits_classifier as dc
from scflow_jax.evaluation.frechet import (
    RunningStatistics,
    feature_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)

# Fewer steps than the library default (1500) keeps the session fast; it still
# clears the accuracy bar comfortably (~0.98 held out).
FIXTURE_STEPS = 600


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, 2 * dim))
    return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


# ---------------------------------------------------------------------- frechet_distance
def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # A non-trivial distance for comparison, so the check above is meaningful.
    assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(16.0, rel=1e-6)


def test_frechet_mean_shift_identity_covariance():
    rng = np.random.default_rng(1)
    m = rng.normal(size=32)
    eye = np.eye(32)
    value = frechet_distance(np.zeros(32), eye, m, eye)
    assert isinstance(value, float)
    assert value == pytest.approx(float(m @ m), rel=1e-9, abs=1e-9)


def test_frechet_diagonal_closed_form_and_rotation_invariance():
    rng = np.random.default_rng(2)
    dim = 12
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # Rotating both Gaussians by the same orthogonal map leaves the distance unchanged,
    # which exercises the non-diagonal (non-commuting entries) sqrtm path.
    q = ortho_group.rvs(dim, random_state=3)
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_frechet_is_symmetric():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    s1, s2 = _random_spd(rng, 20), _random_spd(rng, 20)
    d12 = frechet_distance(mu1, s1, mu2, s2)
    d21 = frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 1.0
    assert d12 == pytest.approx(d21, rel=1e-8)


def test_frechet_singular_covariance_is_finite():
    # Rank-deficient covariances: the distance must still be finite and correct.
    rng = np.random.default_rng(5)
    v = rng.normal(size=(6, 2))
    s = v @ v.T  # rank 2
    value = frechet_distance(np.zeros(6), s, np.ones(6), s)
    assert np.isfinite(value)
    assert value == pytest.approx(6.0, abs=1e-3)


def test_frechet_eps_retry_and_complex_handling(monkeypatch):
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def flaky_sqrtm(a, *args, **kwargs):
        seen.append(np.array(a))
        if len(seen) == 1:
            return np.full_like(a, np.nan)
        return real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-3)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
    expected = 1 + 4 + 9 + 16 - 2 * np.trace(real_sqrtm(seen[1]))
    assert value == pytest.approx(expected, rel=1e-9)

    # Tiny imaginary parts are dropped; significant ones on the diagonal are an error.
    sqrt_prod = np.diag([3.0, 8.0])
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, *args, **kw: sqrt_prod + 1e-5j)
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(30 - 22)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, *args, **kw: sqrt_prod + 1e-2j)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), s1, np.zeros(2), s2)


@pytest.mark.parametrize(
    "args, name",
    [
        ((np.zeros(8), np.eye(8), np.zeros(4), np.eye(8)), "mu2"),
        ((np.zeros(8), np.eye(8), np.zeros(8), np.eye(4)), "sigma2"),
        ((np.zeros(8), np.eye(5), np.zeros(8), np.eye(8)), "sigma1"),
        ((np.zeros((8, 2)), np.eye(8), np.zeros(8), np.eye(8)), "mu1"),
    ],
)
def test_frechet_shape_mismatch_names_argument(args, name):
    with pytest.raises(ValueError, match=rf"\b{name} has shape"):
        frechet_distance(*args)


def test_frechet_shape_message_is_specific():
    with pytest.raises(ValueError, match=r"mu2 has shape \(64,\), expected \(2048,\) to match mu1"):
        frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), np.eye(64))


# ---------------------------------------------------------------------- statistics
def test_feature_statistics_matches_numpy_and_validates():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(feats[:1])
    with pytest.raises(ValueError, match="2-D"):
        feature_statistics(feats[0])


def test_running_statistics_matches_batch_statistics():
    rng = np.random.default_rng(7)
    # A large common offset would wreck a naive sum-of-outer-products in precision.
    feats = rng.normal(size=(503, 9)) * rng.uniform(0.5, 2.0, 9) + 100.0
    batches = np.split(feats, [1, 40, 41, 200, 377])  # uneven, including a single row
    stats = RunningStatistics()
    stats.update(np.zeros((0, 9)))  # empty batch is a no-op
    for batch in batches:
        stats.update(batch)
    mu, sigma = feature_statistics(feats)
    assert stats.count == 503
    np.testing.assert_allclose(stats.mean(), mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.covariance(), sigma, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="feature dimension 3"):
        stats.update(np.zeros((2, 3)))


def test_running_statistics_merge_and_state_dict(tmp_path):
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(300, 5)) + rng.normal(size=5) * 10
    first, second = RunningStatistics(), RunningStatistics()
    for batch in np.array_split(feats[:130], 3):
        first.update(batch)
    for batch in np.array_split(feats[130:], 4):
        second.update(batch)
    whole = RunningStatistics().update(feats)
    merged = first.merge(second)
    assert merged.count == 300
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.covariance(), np.cov(feats, rowvar=False), rtol=0, atol=1e-10)
    # Merging into an empty accumulator copies the other.
    empty = RunningStatistics().merge(whole)
    np.testing.assert_allclose(empty.covariance(), whole.covariance(), rtol=0, atol=1e-12)

    # Save half-way through, resume from the saved state, finish: same result.
    partial = RunningStatistics().update(feats[:100])
    state = partial.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.savez(tmp_path / "partial.npz", **state)
    with np.load(tmp_path / "partial.npz") as loaded:
        resumed = RunningStatistics.from_state_dict(dict(loaded))
    assert resumed.count == 100
    resumed.update(feats[100:])
    np.testing.assert_allclose(resumed.mean(), whole.mean(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(resumed.covariance(), whole.covariance(), rtol=0, atol=1e-10)
    # An empty accumulator round-trips too and reports too few rows.
    empty_rt = RunningStatistics.from_state_dict(RunningStatistics(dim=5).state_dict())
    assert empty_rt.count == 0 and empty_rt.dim == 5
    with pytest.raises(ValueError, match="at least 2"):
        empty_rt.covariance()


def test_save_load_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    mu, sigma = rng.normal(size=10), _random_spd(rng, 10)
    path = tmp_path / "ref_stats.npz"
    save_statistics(path, mu, sigma)
    mu2, sigma2 = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # The file is a plain pytorch-fid style archive.
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    # The path is used verbatim (no implicit ".npz" suffix).
    save_statistics(tmp_path / "stats_no_suffix", mu, sigma)
    assert (tmp_path / "stats_no_suffix").exists()
    np.testing.assert_array_equal(load_statistics(tmp_path / "stats_no_suffix")[0], mu)


def test_load_statistics_missing_key(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"broken\.npz.*'sigma'"):
        load_statistics(path)


# ---------------------------------------------------------------------- digits classifier
def _digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 2.0 - 1.0).reshape(-1, 8, 8, 1).astype(np.float32)
    labels = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(images))
    n_train = int(0.8 * len(images))
    train, test = perm[:n_train], perm[n_train:]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def digits():
    return _digits_split()


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    x_train, y_train, _, _ = digits
    cache = tmp_path_factory.mktemp("digit_classifier_cache")
    params = dc.load_or_train_classifier(cache, x_train, y_train, seed=0, steps=FIXTURE_STEPS)
    return params, cache


def test_classifier_shapes_and_ragged_batches(trained, digits):
    params, _ = trained
    _, _, x_test, _ = digits
    logits, features = dc.classify(params, x_test, batch_size=1000)
    assert logits.shape == (len(x_test), 10) and features.shape == (len(x_test), 64)
    # 360 = 7 * 51 + 3: a ragged last batch must come back exactly, row for row.
    logits_b, features_b = dc.classify(params, x_test, batch_size=7)
    assert logits_b.shape == logits.shape and features_b.shape == features.shape
    np.testing.assert_allclose(logits_b, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features_b, features, rtol=1e-5, atol=1e-5)
    # Direct module application agrees with the batched helper.
    direct_logits, _ = dc.DigitClassifier().apply(params, x_test[:5])
    np.testing.assert_allclose(np.asarray(direct_logits), logits[:5], rtol=1e-5, atol=1e-5)


def test_classifier_accuracy_and_frechet_separation(trained, digits):
    params, cache = trained
    x_train, y_train, x_test, y_test = digits
    logits, _ = dc.classify(params, x_test)
    held_out_accuracy = float(np.mean(logits.argmax(-1) == y_test))
    assert held_out_accuracy >= 0.93, held_out_accuracy

    meta = json.loads((cache / dc.METADATA_FILENAME).read_text())
    assert meta["seed"] == 0 and meta["steps"] == FIXTURE_STEPS
    assert meta["train_accuracy"] >= 0.95

    reference = dc.reference_statistics(params, x_train)
    real = dc.digit_metrics(params, x_test, y_test, reference)
    assert real["num_samples"] == len(x_test)
    assert real["accuracy"] >= 0.93, real
    assert real["accuracy"] == pytest.approx(held_out_accuracy)

    noise = np.clip(np.random.default_rng(1).normal(size=x_test.shape), -1.0, 1.0)
    fake = dc.digit_metrics(params, noise, y_test, reference)
    assert fake["fd"] >= 5.0 * real["fd"], (real, fake)
    assert fake["accuracy"] < 0.5

    # Prompt adherence is measured against the prompted labels, not the content.
    wrong = dc.digit_metrics(params, x_test, (y_test + 1) % 10, reference)
    assert wrong["accuracy"] < 0.1
    assert wrong["fd"] == pytest.approx(real["fd"], rel=1e-9)


def test_train_digit_classifier_is_deterministic(digits):
    x_train, y_train, _, _ = digits
    a = dc.train_digit_classifier(x_train, y_train, seed=3, steps=15)
    b = dc.train_digit_classifier(x_train, y_train, seed=3, steps=15)
    c = dc.train_digit_classifier(x_train, y_train, seed=4, steps=15)
    leaves_a, leaves_b, leaves_c = (jax.tree_util.tree_leaves(t) for t in (a, b, c))
    assert all(np.array_equal(u, v) for u, v in zip(leaves_a, leaves_b))
    assert not all(np.array_equal(u, v) for u, v in zip(leaves_a, leaves_c))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        dc.train_digit_classifier(x_train * 16, y_train, steps=1)


def test_load_or_train_classifier_cache(digits, tmp_path, monkeypatch):
    x_train, y_train, _, _ = digits
    real_train = dc.train_digit_classifier
    calls = []

    def counting_train(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(dc, "train_digit_classifier", counting_train)
    first = dc.load_or_train_classifier(tmp_path, x_train, y_train, seed=0, steps=20)
    assert len(calls) == 1
    assert (tmp_path / dc.CLASSIFIER_FILENAME).exists()
    meta = json.loads((tmp_path / dc.METADATA_FILENAME).read_text())
    assert meta["seed"] == 0 and meta["steps"] == 20 and 0.0 <= meta["train_accuracy"] <= 1.0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no stray temp files

    # Second call must load, not train.
    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train_classifier retrained despite a valid cache")

    monkeypatch.setattr(dc, "train_digit_classifier", no_training)
    second = dc.load_or_train_classifier(tmp_path, x_train, y_train, seed=0, steps=20)
    flat_first = jax.tree_util.tree_leaves_with_path(first)
    flat_second = jax.tree_util.tree_leaves_with_path(second)
    assert [p for p, _ in flat_first] == [p for p, _ in flat_second]
    assert all(np.array_equal(u, v) for (_, u), (_, v) in zip(flat_first, flat_second))

    # A different seed (or step count) makes the cache stale: retrain and overwrite.
    monkeypatch.setattr(dc, "train_digit_classifier", counting_train)
    third = dc.load_or_train_classifier(tmp_path, x_train, y_train, seed=1, steps=20)
    assert len(calls) == 2 and calls[-1]["seed"] == 1
    assert json.loads((tmp_path / dc.METADATA_FILENAME).read_text())["seed"] == 1
    assert not all(
        np.array_equal(u, v)
        for u, v in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(third))
    )
    dc.load_or_train_classifier(tmp_path, x_train, y_train, seed=1, steps=25)
    assert len(calls) == 3 and calls[-1]["steps"] == 25

    # A corrupt weights file is not trusted either.
    (tmp_path / dc.CLASSIFIER_FILENAME).write_bytes(b"not msgpack")
    dc.load_or_train_classifier(tmp_path, x_train, y_train, seed=1, steps=25)
    assert len(calls) == 4
