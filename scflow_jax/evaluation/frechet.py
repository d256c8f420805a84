"""Fréchet distance between Gaussians fitted to feature sets (the FID formula).

These helpers are independent of the feature extractor: the digits demo uses
them with a small digit classifier, and the Inception-based FID reuses them.

The Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) is

    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)),

computed here the same way as pytorch-fid's ``calculate_frechet_distance``
(``scipy.linalg.sqrtm`` of the product, with an ``eps * I`` retry when the square
root is not finite), so numbers are comparable with published FID values.
Statistics follow the pytorch-fid conventions too: float64, the covariance is
``np.cov(features, rowvar=False)`` (normalised by N - 1), and files are ``.npz``
archives holding ``mu`` and ``sigma``.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Mapping

import numpy as np
import scipy.linalg
from etils import epath

from scflow_jax import monitoring

__all__ = [
    "feature_statistics",
    "RunningStatistics",
    "frechet_distance",
    "save_statistics",
    "load_statistics",
    "write_npz_atomic",
    "read_npz",
]

logger = logging.getLogger(__name__)


def _as_feature_matrix(features: Any, name: str = "features") -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D [N, D] array of feature vectors, got shape {array.shape}"
        )
    return array


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, ddof=1) of an [N, D] feature array.

    Matches pytorch-fid: ``mu = mean(axis=0)``, ``sigma = np.cov(features, rowvar=False)``.
    Accepts NumPy or JAX arrays. Raises ``ValueError`` if the input is not 2-D or has
    fewer than two rows (the unbiased covariance needs N >= 2).
    """
    array = _as_feature_matrix(features)
    n = array.shape[0]
    if n < 2:
        raise ValueError(
            f"feature_statistics needs at least 2 feature vectors to estimate a covariance, "
            f"got N={n} (features shape {array.shape})"
        )
    mu = array.mean(axis=0)
    sigma = np.atleast_2d(np.cov(array, rowvar=False))
    return mu, sigma


class RunningStatistics:
    """Streaming mean / covariance of feature vectors, accumulated in float64.

    Keeps the number of rows, the sum of the rows and the sum of their outer
    products. Both sums are taken about a fixed ``shift`` (the mean of the first
    non-empty batch) so the final ``S / n - mean mean^T`` style subtraction does not
    lose precision when the features have a large common offset; with
    ``shift = 0`` this is exactly the plain sum / sum-of-outer-products scheme.

    ``covariance()`` equals ``np.cov(all_rows, rowvar=False)`` (ddof=1) over every row
    passed to ``update``. ``merge`` combines two accumulators (e.g. from different
    hosts or shards), and ``state_dict`` / ``from_state_dict`` give a dict of plain
    NumPy arrays so an interrupted evaluation can be checkpointed and resumed.
    """

    def __init__(self, dim: int | None = None):
        if dim is not None and (int(dim) != dim or dim < 1):
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self._dim: int | None = None if dim is None else int(dim)
        self._count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._sum_outer: np.ndarray | None = None

    # ------------------------------------------------------------------ properties
    @property
    def count(self) -> int:
        """Number of feature vectors accumulated so far."""
        return self._count

    @property
    def dim(self) -> int | None:
        """Feature dimension D (``None`` until known)."""
        return self._dim

    def __repr__(self) -> str:
        return f"RunningStatistics(dim={self._dim}, count={self._count})"

    # ------------------------------------------------------------------ updates
    def _check_dim(self, dim: int, what: str) -> None:
        if self._dim is not None and dim != self._dim:
            raise ValueError(
                f"{what} has feature dimension {dim}, expected {self._dim} "
                f"(the dimension this RunningStatistics was created with / first saw)"
            )

    def update(self, features: Any) -> "RunningStatistics":
        """Add a batch of feature vectors (an [N, D] array; N may be 0). Returns ``self``."""
        array = _as_feature_matrix(features)
        n, dim = array.shape
        self._check_dim(dim, f"batch of shape {array.shape}")
        self._dim = dim
        if n == 0:
            return self
        if self._count == 0:
            self._shift = array.mean(axis=0)
            self._sum = np.zeros(dim, dtype=np.float64)
            self._sum_outer = np.zeros((dim, dim), dtype=np.float64)
        centered = array - self._shift
        self._sum += centered.sum(axis=0)
        self._sum_outer += centered.T @ centered
        self._count += n
        return self

    def merge(self, other: "RunningStatistics") -> "RunningStatistics":
        """Fold another accumulator's rows into this one (in place). Returns ``self``."""
        if not isinstance(other, RunningStatistics):
            raise TypeError(f"merge expects a RunningStatistics, got {type(other).__name__}")
        if other._dim is not None:
            self._check_dim(other._dim, "the RunningStatistics being merged")
            self._dim = other._dim
        if other._count == 0:
            return self
        if self._count == 0:
            self._shift = other._shift.copy()
            self._sum = other._sum.copy()
            self._sum_outer = other._sum_outer.copy()
            self._count = other._count
            return self
        # Re-express the other's sums about this accumulator's shift:
        # sum (x - a)(x - a)^T with a = self.shift, x - a = (x - b) + d, d = b - a.
        d = other._shift - self._shift
        s_other = other._sum
        n_other = other._count
        self._sum_outer += (
            other._sum_outer
            + np.outer(s_other, d)
            + np.outer(d, s_other)
            + n_other * np.outer(d, d)
        )
        self._sum += s_other + n_other * d
        self._count += n_other
        return self

    # ------------------------------------------------------------------ results
    def mean(self) -> np.ndarray:
        """Mean [D] of all rows seen (float64)."""
        if self._count < 1:
            raise ValueError("RunningStatistics.mean() needs at least 1 feature vector, got 0")
        return self._shift + self._sum / self._count

    def covariance(self) -> np.ndarray:
        """Unbiased covariance [D, D] of all rows seen (float64, ddof=1, like ``np.cov``)."""
        if self._count < 2:
            raise ValueError(
                f"RunningStatistics.covariance() needs at least 2 feature vectors, got "
                f"{self._count}"
            )
        n = self._count
        centered_mean = self._sum / n
        cov = (self._sum_outer - n * np.outer(centered_mean, centered_mean)) / (n - 1)
        # Symmetrise away the rounding asymmetry of the rank-one correction.
        return 0.5 * (cov + cov.T)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean(), covariance())``, the same pair ``feature_statistics`` returns."""
        return self.mean(), self.covariance()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, np.ndarray]:
        """The accumulator as a dict of plain NumPy arrays (safe for ``np.savez``)."""
        dim = -1 if self._dim is None else self._dim
        if self._count == 0:
            d = max(dim, 0)
            shift = np.zeros(d, np.float64)
            total = np.zeros(d, np.float64)
            outer = np.zeros((d, d), np.float64)
        else:
            shift, total, outer = self._shift.copy(), self._sum.copy(), self._sum_outer.copy()
        return {
            "count": np.asarray(self._count, dtype=np.int64),
            "dim": np.asarray(dim, dtype=np.int64),
            "shift": shift,
            "sum": total,
            "sum_outer": outer,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "RunningStatistics":
        """Rebuild an accumulator from ``state_dict()`` output (or a loaded ``.npz``)."""
        missing = [k for k in ("count", "dim", "shift", "sum", "sum_outer") if k not in state]
        if missing:
            raise ValueError(f"RunningStatistics state is missing key(s) {missing}")
        count = int(np.asarray(state["count"]))
        dim = int(np.asarray(state["dim"]))
        stats = cls(None if dim < 0 else dim)
        if count < 0:
            raise ValueError(f"RunningStatistics state has negative count {count}")
        if count == 0:
            return stats
        shift = np.array(state["shift"], dtype=np.float64)
        total = np.array(state["sum"], dtype=np.float64)
        outer = np.array(state["sum_outer"], dtype=np.float64)
        if shift.shape != (dim,) or total.shape != (dim,) or outer.shape != (dim, dim):
            raise ValueError(
                f"RunningStatistics state has inconsistent shapes for dim={dim}: "
                f"shift {shift.shape}, sum {total.shape}, sum_outer {outer.shape}"
            )
        stats._count = count
        stats._shift, stats._sum, stats._sum_outer = shift, total, outer
        return stats


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Same algorithm as pytorch-fid's ``calculate_frechet_distance``: the matrix
    square root of ``sigma1 @ sigma2`` via ``scipy.linalg.sqrtm``; if it is not
    finite, ``eps * I`` is added to both covariances and it is recomputed; a
    complex result whose diagonal has an imaginary part above 1e-3 raises
    ``ValueError``, otherwise its real part is used.

    Raises ``ValueError`` naming the offending argument on shape mismatches or
    non-finite inputs. Returns a Python float.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))

    if mu1.ndim != 1:
        raise ValueError(f"mu1 has shape {mu1.shape}, expected a 1-D mean vector")
    dim = mu1.shape[0]
    if mu2.shape != (dim,):
        raise ValueError(f"mu2 has shape {mu2.shape}, expected {(dim,)} to match mu1")
    if sigma1.shape != (dim, dim):
        raise ValueError(f"sigma1 has shape {sigma1.shape}, expected {(dim, dim)} to match mu1")
    if sigma2.shape != (dim, dim):
        raise ValueError(f"sigma2 has shape {sigma2.shape}, expected {(dim, dim)} to match mu1")
    for name, array in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        _check_finite(name, array)

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.all(np.isfinite(covmean)):
        logger.warning(
            "frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (singular product); "
            "adding %g to the covariance diagonals and retrying",
            eps,
        )
        offset = np.eye(dim) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
            raise ValueError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) has a significant imaginary "
                f"component on its diagonal (max |imag| = {max_imag:.3g} > 1e-3)"
            )
        covmean = covmean.real

    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------- file I/O
def write_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez`` of ``arrays`` at exactly ``path`` (local or ``gs://``), written atomically
    (``monitoring.write_bytes_atomic``), so a reader (or a resumed run after a crash) sees either
    the old file or the complete new one."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    monitoring.write_bytes_atomic(path, buffer.getvalue())


def read_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """An ``.npz`` file written by ``write_npz_atomic``, local or ``gs://`` (read whole, through
    etils.epath)."""
    return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)


def save_statistics(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
    """Write ``mu`` [D] and ``sigma`` [D, D] (float64) to an ``.npz`` at exactly ``path``.

    Uses the pytorch-fid key names (``mu``, ``sigma``). The write is atomic
    (``write_npz_atomic``), and ``path`` is used verbatim: no ``.npz`` suffix is
    appended.
    """
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu has shape {mu.shape}, expected a 1-D mean vector")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma has shape {sigma.shape}, expected {(mu.shape[0], mu.shape[0])} to match mu"
        )
    write_npz_atomic(path, mu=mu, sigma=sigma)


def load_statistics(
    path: str | os.PathLike, expected_dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` (float64) from an ``.npz`` with keys ``mu`` and ``sigma``.

    Raises ``ValueError`` naming the file and the missing key if either is absent,
    if their shapes are inconsistent, or if ``expected_dim`` is given and the
    statistics have another feature dimension (e.g. 64-d digit features against
    2048-d Inception features).
    """
    path = os.fspath(path)
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"statistics file {path} is not an .npz archive with keys 'mu' and 'sigma'"
        )
    with data:
        for key in ("mu", "sigma"):
            if key not in data.files:
                raise ValueError(
                    f"statistics file {path} is missing key {key!r} "
                    f"(found keys {sorted(data.files)}; expected 'mu' and 'sigma')"
                )
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
    mu = np.atleast_1d(mu)
    sigma = np.atleast_2d(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"statistics file {path} has inconsistent shapes: mu {mu.shape}, sigma {sigma.shape}"
        )
    if expected_dim is not None and mu.shape[0] != expected_dim:
        raise ValueError(
            f"statistics file {path} holds {mu.shape[0]}-d features (mu {mu.shape}, sigma "
            f"{sigma.shape}) but the features being compared are {expected_dim}-d; it was computed "
            f"with another feature extractor"
        )
    return mu, sigma
