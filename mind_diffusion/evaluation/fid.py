"""FID and KID from two sets of Inception features, and cached reference statistics.

- FID (Heusel et al. 2017): d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the Fréchet distance of
  two Gaussians fitted to the features (μ the mean, Σ the unbiased covariance), in float64 with
  ``scipy.linalg.sqrtm``.
- KID (Bińkowski et al. 2018): the unbiased estimate of MMD² under the polynomial kernel
  k(x, y) = (xᵀy / d + 1)³, averaged over random subsets of ``subset_size`` features of each set:
  MMD²ᵤ = 1/(m(m−1)) Σ_{i≠j} k(xᵢ, xⱼ) + 1/(m(m−1)) Σ_{i≠j} k(yᵢ, yⱼ) − 2/m² Σ_{i,j} k(xᵢ, yⱼ).
- Reference statistics of a data set (features, μ, Σ) are cached in a ``.npz`` whose name holds
  the data set's key, the image count and the Inception file's SHA-1, so another network or
  another subset never reuses them.
"""
import os
import re
import tempfile

import numpy as np
import scipy.linalg

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features", "kernel_inception_distance",
           "polynomial_kernel", "reference_features"]


# Only the trace of (Σ₁Σ₂)^½ enters d²: its diagonal must be real up to rounding (the TTUR code's test).
IMAGINARY_TOLERANCE = 1e-3


def _diagonal_imaginary(matrix):
    return float(np.abs(np.diagonal(matrix).imag).max()) if np.iscomplexobj(matrix) else 0.0


def feature_statistics(features):
    """(μ, Σ) of features [N, d] in float64: the mean and the unbiased covariance (N − 1)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors [N, d] for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) in float64.

    When Σ₁Σ₂ is singular enough that its square root is not finite, or its diagonal (the only
    part the trace reads) is not real up to rounding, both covariances get ε·I added (as the
    TTUR reference code does) and the root is taken again. If that fails too it is an error,
    not a silently dropped component; off-diagonal imaginary parts (rounding in the null space
    of a singular Σ) do not enter the distance.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics disagree in shape: μ {mu1.shape} vs {mu2.shape}, "
                         f"Σ {sigma1.shape} vs {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _diagonal_imaginary(covmean) > IMAGINARY_TOLERANCE:
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    imaginary = _diagonal_imaginary(covmean)
    if not np.isfinite(covmean).all() or imaginary > IMAGINARY_TOLERANCE:
        raise ValueError(f"(Σ₁Σ₂)^½ is not finite or its diagonal has an imaginary part of {imaginary:.3g}: the "
                         "covariances are not positive semi-definite (too few samples for the feature dimension?)")
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2):
    """FID of two feature sets [N₁, d] and [N₂, d]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def polynomial_kernel(x, y):
    """k(x, y) = (xᵀy / d + 1)³ for every pair of rows: [N, d] × [M, d] → [N, M] (float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x, y):
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return off_diagonal - 2.0 * k_xy.mean()


def kernel_inception_distance(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """KID: (mean, std) of the unbiased MMD² over ``num_subsets`` random subsets of m features of each set.

    m = min(``subset_size``, N₁, N₂); each subset is drawn without replacement, from a NumPy
    generator seeded with ``seed``.
    """
    features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if features1.shape[1:] != features2.shape[1:] or features1.ndim != 2:
        raise ValueError(f"feature sets disagree: {features1.shape} vs {features2.shape}")
    m = min(subset_size, len(features1), len(features2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(features1)} and {len(features2)}")
    rng = np.random.default_rng(seed)
    values = np.array([_mmd2_unbiased(features1[rng.choice(len(features1), m, replace=False)],
                                      features2[rng.choice(len(features2), m, replace=False)])
                       for _ in range(num_subsets)])
    return float(values.mean()), float(values.std())


def _cache_name(dataset_key, count, inception_sha1):
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_key).strip("_") or "data"
    return f"{safe}-n{count}-inception_{inception_sha1[:16]}.npz"


def reference_features(dataset_key, count, inception_sha1, compute, cache_dir):
    """Features, μ and Σ of a data set's first ``count`` images, computed once and then read from the cache.

    :param dataset_key: names the data set and split (e.g. ``mnist-test``); part of the cache file's name.
    :param inception_sha1: SHA-1 of the Inception file the features come from; part of the name too.
    :param compute: ``compute()`` → features [count, d], called only when the cache lacks them.
    :param cache_dir: folder of the cache files (made when missing).
    :return: dict with ``features`` (float32), ``mu``, ``sigma`` (float64) and ``path`` (the cache file).
    """
    path = os.path.join(cache_dir, _cache_name(dataset_key, count, inception_sha1))
    if os.path.isfile(path):
        with np.load(path) as cached:
            if str(cached["inception_sha1"]) == inception_sha1 and len(cached["features"]) == count:
                return {"features": cached["features"], "mu": cached["mu"], "sigma": cached["sigma"], "path": path}
    features = np.asarray(compute(), np.float64)
    if len(features) != count:
        raise ValueError(f"{dataset_key}: expected features of {count} images, got {len(features)}")
    mu, sigma = feature_statistics(features)
    os.makedirs(cache_dir, exist_ok=True)
    # Written to a temporary file and renamed: a reader never sees half a cache file.
    handle, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, features=features.astype(np.float32), mu=mu, sigma=sigma, inception_sha1=inception_sha1,
                     dataset=dataset_key)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"features": features.astype(np.float32), "mu": mu, "sigma": sigma, "path": path}
