"""The MNIST classifier (ccexam's, read without torch) against torch's logits, and the Inception-score formula."""
import os

import numpy as np
import pytest

from mind_diffusion.evaluation import classifier_score as cs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "evaluation_reference.npz")


def test_logits_match_ccexam_in_torch():
    ref = np.load(FIXTURE)
    classifier = cs.MnistClassifier(batch_size=3)  # 4 images: two batches, the second padded
    logits = classifier.logits(ref["mnist_images"])
    err = np.abs(logits - ref["mnist_logits"]).max()
    assert err <= 1e-4, f"max |Δlogit| = {err:.3g}"
    # A 32×32 recipe sample (2 px black border) is cropped back to the same digit.
    padded = np.pad(ref["mnist_images"], ((0, 0), (0, 0), (2, 2), (2, 2)))
    np.testing.assert_array_equal(classifier.logits(padded), logits)
    with pytest.raises(ValueError, match="uint8 grey digits"):
        classifier.logits(ref["mnist_images"].astype(np.float32))
    with pytest.raises(ValueError, match="even border"):
        classifier.logits(np.zeros((1, 1, 31, 31), np.uint8))


def test_inception_score_by_explicit_sums():
    rng = np.random.default_rng(0)
    probs = cs.softmax(rng.standard_normal((12, 4)) * 2)
    n, k = probs.shape
    marginal = [sum(probs[i, y] for i in range(n)) / n for y in range(k)]
    kl = [sum(probs[i, y] * np.log(probs[i, y] / marginal[y]) for y in range(k)) for i in range(n)]
    assert cs.inception_score(probs)[0] == pytest.approx(np.exp(sum(kl) / n), rel=1e-12)
    parts = [cs.inception_score(probs[i:i + 4])[0] for i in (0, 4, 8)]
    mean, std = cs.inception_score(probs, splits=3)
    assert (mean, std) == pytest.approx((np.mean(parts), np.std(parts)), rel=1e-12)


def test_inception_score_extremes():
    # Confident and balanced over K classes: K. All the same class: 1. Zero probabilities are fine.
    assert cs.inception_score(np.eye(10))[0] == pytest.approx(10.0, rel=1e-12)
    assert cs.inception_score(np.tile(np.eye(10)[3], (5, 1)))[0] == pytest.approx(1.0, rel=1e-12)
    assert cs.class_histogram(np.eye(10)[[1, 1, 7]]) == [0, 2, 0, 0, 0, 0, 0, 1, 0, 0]
    np.testing.assert_allclose(cs.softmax([[0.0, np.log(3.0)]]), [[0.25, 0.75]], rtol=1e-15)
