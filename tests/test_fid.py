"""FID and KID against independent float64 computations: closed forms, eigenvalues, explicit loops."""
import itertools

import numpy as np
import pytest

from mind_diffusion.evaluation import fid


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # N(μ₁, diag s₁), N(μ₂, diag s₂): d² = ‖μ₁ − μ₂‖² + Σ_k (√s₁k − √s₂k)².
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expect, rel=1e-12, abs=1e-12)
    assert fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_of_full_covariances_by_eigenvalues():
    # Tr((Σ₁Σ₂)^½) = Σ √λ over the eigenvalues λ ≥ 0 of Σ₁Σ₂ (similar to Σ₁^½ Σ₂ Σ₁^½), no sqrtm.
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = _random_spd(rng, d), _random_spd(rng, d)
    eig = np.linalg.eigvals(sigma1 @ sigma2).real
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum()
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expect, rel=1e-10)


def test_statistics_and_fid_from_features_by_explicit_sums():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((40, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    b = rng.standard_normal((30, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.5]])
    mu, sigma = fid.feature_statistics(a)
    n = len(a)
    mean = [sum(a[i, k] for i in range(n)) / n for k in range(3)]
    cov = [[sum((a[i, j] - mean[j]) * (a[i, k] - mean[k]) for i in range(n)) / (n - 1) for k in range(3)]
           for j in range(3)]
    np.testing.assert_allclose(mu, mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(sigma, cov, rtol=1e-12, atol=1e-15)
    mu_b, sigma_b = fid.feature_statistics(b)
    eig = np.linalg.eigvals(sigma @ sigma_b).real
    expect = ((mu - mu_b) ** 2).sum() + np.trace(sigma) + np.trace(sigma_b) - 2 * np.sqrt(eig).sum()
    assert fid.fid_from_features(a, b) == pytest.approx(expect, rel=1e-10)


def test_kid_is_the_unbiased_polynomial_mmd_by_a_double_loop():
    rng = np.random.default_rng(3)
    d = 4
    x = rng.standard_normal((7, d))
    y = rng.standard_normal((7, d)) + 0.5

    def k(u, v):
        return (sum(u[i] * v[i] for i in range(d)) / d + 1.0) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    expect = xx + yy - 2 * xy
    # Subsets of the whole set are permutations of it: every subset gives the same MMD².
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=5, subset_size=100)
    assert mean == pytest.approx(expect, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_averages_subsets_drawn_with_the_seed():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((25, 3))
    draws = np.random.default_rng(11)
    values = []
    for _ in range(4):
        xs, ys = x[draws.choice(20, 5, replace=False)], y[draws.choice(25, 5, replace=False)]
        values.append(fid.kernel_inception_distance(xs, ys, num_subsets=1, subset_size=5)[0])
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=4, subset_size=5, seed=11)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-12)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        fid.feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="disagree in shape"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="feature sets disagree"):
        fid.kernel_inception_distance(np.zeros((4, 2)), np.zeros((4, 3)))


def test_singular_covariances_by_a_symmetric_square_root():
    # Fewer samples than dimensions: Σ is singular. Tr((Σ₁Σ₂)^½) = Σ √λ of Σ₁^½ Σ₂ Σ₁^½ (symmetric, PSD).
    rng = np.random.default_rng(5)
    a, b = np.abs(rng.standard_normal((5, 64))), np.abs(rng.standard_normal((5, 64))) + 0.1
    (mu1, sigma1), (mu2, sigma2) = fid.feature_statistics(a), fid.feature_statistics(b)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    assert fid.fid_from_features(a, b) == pytest.approx(expect, rel=1e-6)


def test_reference_features_are_cached_per_data_set_and_network(tmp_path):
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((10, 3))
    calls = []

    def compute():
        calls.append(1)
        return feats

    first = fid.reference_features("mnist-test", 10, "a" * 40, compute, str(tmp_path))
    second = fid.reference_features("mnist-test", 10, "a" * 40, compute, str(tmp_path))
    assert len(calls) == 1 and first["path"] == second["path"]
    np.testing.assert_allclose(second["mu"], feats.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(second["sigma"], np.cov(feats, rowvar=False), rtol=1e-12)
    np.testing.assert_array_equal(second["features"], feats.astype(np.float32))
    # Another Inception file or another count is another cache entry.
    fid.reference_features("mnist-test", 10, "b" * 40, compute, str(tmp_path))
    assert len(calls) == 2
    with pytest.raises(ValueError, match="expected features of 9 images"):
        fid.reference_features("mnist-test", 9, "a" * 40, compute, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mnist-test-n10-inception_aaaaaaaaaaaaaaaa.npz", "mnist-test-n10-inception_bbbbbbbbbbbbbbbb.npz"]
