"""FID and KID from feature vectors (float64 numpy): the two sample-quality numbers of the LDM paper.

    mu, sigma = feature_statistics(features)                       # (D,), (D, D) of (N, D) Inception features
    fid = frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    kid_mean, kid_std = kernel_inception_distance(fake, real, subset_size=1000, num_subsets=100)

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", Sec. 4 / eq. of d^2):
    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))
KID (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 5 and eq. 3): the unbiased estimate of the squared
MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class FeatureStats:
    """What FID needs of one image set (and KID, when the features themselves are kept)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    count: int
    features: Optional[np.ndarray] = None  # (M, D), M <= count; None for statistics read from a mu/sigma file


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, N >= 2 (as pytorch-fid / torch-fidelity)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors of shape (N, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


KID_ROWS_SEED = 0  # which rows a capped feature set keeps for KID: a fixed draw, so caches are reproducible


def kid_rows(count: int, keep: Optional[int]) -> np.ndarray:
    """Indices (ascending) of the rows kept for KID out of `count`: all when `keep` is None or not smaller, else
    `keep` of them drawn at random with a fixed seed. Not the first `keep`: rows come in dataset order, and a
    class-folder dataset (ImageNet) is sorted by class, so its first 10 000 rows are its first few classes."""
    if keep is None or keep >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(KID_ROWS_SEED).choice(count, keep, replace=False))


def stats_from_features(features: np.ndarray, keep: Optional[int] = None) -> FeatureStats:
    """FeatureStats of (N, D) features (mu and sigma of all N), keeping `keep` random rows (all when None) for KID."""
    mu, sigma = feature_statistics(features)
    kept = np.asarray(features, dtype=np.float32)[kid_rows(len(features), keep)]
    return FeatureStats(mu=mu, sigma=sigma, count=len(features), features=kept)


def _psd_eigenvalues(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with the round-off ones set to 0. A covariance of N < D features has D - N + 1
    zero eigenvalues that come out of eigh as +-1e-16 x the largest; their square roots (~1e-8 x) would add up to
    a relative error of ~1e-8 in the FID (measured: 2.7e-8 at N = 20, D = 2048)."""
    tolerance = np.abs(values).max(initial=0.0) * len(values) * np.finfo(values.dtype).eps
    return np.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_psd_eigenvalues(values))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    1. mean term      ||mu1 - mu2||^2
    2. trace term     Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))
       S1 S2 is similar to the PSD matrix M = S1^(1/2) S2 S1^(1/2) (same eigenvalues), so
       Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)), computed with symmetric eigen-solvers only: no complex
       parts to discard and no failure on the singular covariances of small sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape} (same feature extractor for both sets?)")
    mean_term = float(np.sum((mu1 - mu2) ** 2))  # step 1
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1  # (D, D), symmetric PSD
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    trace_sqrt = float(np.sum(np.sqrt(_psd_eigenvalues(eigenvalues))))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt  # step 2
    return max(mean_term + trace_term, 0.0)


def frechet_distance_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """The same d^2 from the features themselves (N1, D), (N2, D), in O(N1 N2 (N1 + N2 + D)): fast when the sets
    are small next to D. With A_i = (X_i - mu_i) / sqrt(N_i - 1), S_i = A_i^T A_i and

        Tr(S_i) = ||A_i||_F^2,   Tr((S1 S2)^(1/2)) = sum of the singular values of A1 A2^T (N1, N2)

    since S1 S2 = A1^T (A1 A2^T) A2 has the nonzero eigenvalues of (A1 A2^T)(A1 A2^T)^T.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"FID needs (N, D) features with N >= 2 and equal D, got {x.shape} and {y.shape}")
    mu1, mu2 = x.mean(0), y.mean(0)
    a1, a2 = (x - mu1) / np.sqrt(len(x) - 1), (y - mu2) / np.sqrt(len(y) - 1)
    trace_sqrt = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())
    value = float(np.sum((mu1 - mu2) ** 2)) + float(np.sum(a1**2) + np.sum(a2**2)) - 2.0 * trace_sqrt
    return max(value, 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID of two sets: from their features when both are complete and fewer than D (exact and much faster),
    otherwise from mu and sigma."""
    complete = all(s.features is not None and len(s.features) == s.count for s in (a, b))
    if complete and max(a.count, b.count) < a.mu.shape[0]:
        return frechet_distance_from_features(a.features, b.features)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for every pair: (m, d), (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD (Binkowski et al. 2018, eq. 3; Gretton et al. 2012, eq. 3):

        1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples in each set")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kid_subset_rows(subset_size: int, *counts: int) -> int:
    """The rows per KID subset: `subset_size`, or fewer when a set is smaller (torch-fidelity refuses that case;
    here every subset is then the whole smaller set, permuted)."""
    if subset_size < 2:
        raise ValueError(f"KID subsets need at least 2 rows (the unbiased MMD), got a subset size of {subset_size}")
    return min(subset_size, *counts)


def kernel_inception_distance(
    x: np.ndarray, y: np.ndarray, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of kid_subset_rows(subset_size, ...)
    rows of each set, drawn without replacement within a subset (the KID protocol of torch-fidelity /
    torchmetrics)."""
    if num_subsets < 1:
        raise ValueError(f"KID needs at least 1 subset, got {num_subsets}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    size = kid_subset_rows(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
