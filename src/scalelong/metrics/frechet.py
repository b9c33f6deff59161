"""The Frechet distance between two Gaussians (from symmetric eigen-decompositions only, so it
never comes out complex) and the kernel inception distance, in float64. Numerics:
``docs/design.md``, "Frechet distance and KID"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mean {mu.shape} and covariance {sigma.shape} do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: the statistics contain NaN or infinite values")
    return mu, sigma


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise set to 0: those below d * eps * max|w|
    cannot be told from 0 (eigh's backward error), and their square roots would add noise."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def _psd_root_factor(sigma: np.ndarray) -> np.ndarray:
    """F (d, r) with F F^T = sigma for a (numerically) positive semi-definite sigma of rank r:
    the eigenvectors scaled by the square roots of the eigenvalues that are not 0."""
    sym = (sigma + sigma.T) / 2
    w, v = np.linalg.eigh(sym)
    w = _clip_eigenvalues(w)
    keep = w > 0
    return v[:, keep] * np.sqrt(w[keep])


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices, via the symmetric r x r matrix
    F^T sigma2 F with F F^T = sigma1 (r: the rank of sigma1; below d for fewer samples than
    features, which makes the second eigen-decomposition small)."""
    f = _psd_root_factor(np.asarray(sigma1, dtype=np.float64))
    m = f.T @ (np.asarray(sigma2, dtype=np.float64) @ f)
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_eigenvalues(w)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Symmetric in its two arguments up to rounding; 0 for identical statistics (to about 1e-8
    relative to tr(sigma)). Never negative: rounding below 0 is returned as 0.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(value, 0.0)


def mean_and_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (divisor n - 1) of features (n, d), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (n >= 2, d), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


@dataclass(frozen=True)
class KID:
    """KID estimate: ``mean`` over ``num_subsets`` subsets of ``subset_size``; ``std`` across subsets."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD between two equal-size samples x, y (m, d), polynomial kernel."""
    m = x.shape[0]
    if m < 2 or y.shape[0] != m:
        raise ValueError(f"need two samples of the same size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> KID:
    """KID between feature sets (n1, d) and (n2, d): the unbiased MMD^2 averaged over subsets.

    The subset size is min(n1, n2, ``subset_size``) (clean-fid's rule, with its defaults of 100
    subsets of at most 1000). Subsets are drawn with a generator seeded by ``seed``, so the
    estimate is reproducible. When both sets are no larger than the subset size, every subset is
    the whole sets: one evaluation, ``std`` 0. Small or negative values mean "indistinguishable".
    """
    x = np.asarray(feats1, dtype=np.float64)
    y = np.asarray(feats2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets must be (n, d) with the same d, got {x.shape} and {y.shape}")
    m = min(x.shape[0], y.shape[0], int(subset_size))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {x.shape[0]} and {y.shape[0]}")
    if m == x.shape[0] == y.shape[0]:  # every subset would be the whole of both sets: one is enough
        return KID(mmd2_unbiased(x, y), 0.0, m, 1)
    rng = np.random.default_rng(seed)
    values = np.empty(int(num_subsets))
    for k in range(int(num_subsets)):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        values[k] = mmd2_unbiased(xs, ys)
    return KID(float(values.mean()), float(values.std()), m, int(num_subsets))
