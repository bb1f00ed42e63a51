"""The precision-critical transcendentals on both graph targets, against float64 NumPy.

Graphs built for CPU evaluate exp/log/tanh of the VB terms and the timestep
frequencies in float64; graphs built for Ascend (``building_for("Ascend")``)
stay in float32, because Ascend has no float64 kernel for most ops. Both are
run here on the CPU backend, so the float32 figures are those of MindSpore's
float32 *CPU* kernels: Ascend's own float32 kernels cannot be measured here.

Measured on this machine (tolerances sit at about twice these):

==================================== ============ ===================
quantity                             CPU graphs   Ascend-built graphs
==================================== ============ ===================
Φ(x) (tanh approximation), max abs   6.5e-8       5.0e-5
KL of two Gaussians, max abs (nats)  7.6e-7       2.4e-5
decoder L_0, per-image bits/dim      3.5e-6 (a)   7.0e-3 (b)
timestep embedding, max abs (t<1000) 5.3e-5       7.8e-4
==================================== ============ ===================

(a) all of it float32 arithmetic: the CPU graph equals the reference's float32
formula with correctly rounded exp/log/tanh (checked below), and that formula
is 3.5e-6 bits/dim from float64. (b) heavy-tailed: one element in 3072 is off
by 15 nats, where the float32 tanh's error (5e-5) swamps the probability of a
bin in the Gaussian's tail (Φ(a) − Φ(b) with both near 1); another draw of
the same kind gave 5.5e-4.
"""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mind_diffusion import losses
from mind_diffusion.device import building_for
from mind_diffusion.nn import timestep_embedding

TARGETS = ("CPU", "Ascend")
F32 = np.float32


class _Fn(nn.Cell):
    def __init__(self, fn, **static):
        super().__init__()
        self.fn = fn
        self.static = static

    def construct(self, *args):
        return self.fn(*args, **self.static)


def run_as(target, fn, *arrays, **static):
    """Build and compile ``fn`` as a graph for ``target`` and run it here (CPU); float64 result."""
    with building_for(target):
        out = _Fn(fn, **static)(*[ms.Tensor(a) for a in arrays])
    return out.asnumpy().astype(np.float64)


# ---- float64 references, written from the formulas (Page 1977; Ho et al. 2020, Eq. 13)

def cdf64(v):
    v = np.asarray(v, np.float64)
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def normal_kl64(mean1, logvar1, mean2, logvar2):
    mean1, logvar1, mean2, logvar2 = (np.asarray(a, np.float64) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def decoder_nll_terms(x, means, log_scales, dtype, transcendental):
    """log p(x | means, σ) per element with arithmetic in ``dtype`` and exp/log/tanh given by ``transcendental``."""
    x, means, log_scales = (np.asarray(a, dtype) for a in (x, means, log_scales))
    exp, log, tanh = transcendental

    def cdf(v):
        return dtype(0.5) * (dtype(1) + tanh(dtype(math.sqrt(2 / math.pi)) * (v + dtype(0.044715) * v * v * v)))

    centered = x - means
    inv_std = exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + dtype(1 / 255)))
    cdf_min = cdf(inv_std * (centered - dtype(1 / 255)))
    floor = dtype(1e-12)
    log_cdf_plus = log(np.maximum(cdf_plus, floor))
    log_one_minus_cdf_min = log(np.maximum(dtype(1) - cdf_min, floor))
    log_cdf_delta = log(np.maximum(cdf_plus - cdf_min, floor))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


FLOAT64 = (np.exp, np.log, np.tanh)
# float64 transcendentals rounded once to float32: what the CPU graphs compute
ROUNDED_ONCE = tuple((lambda f: lambda v: f(v.astype(np.float64)).astype(F32))(f) for f in FLOAT64)


def bits_per_dim(log_likelihood):
    return -log_likelihood.reshape(log_likelihood.shape[0], -1).mean(axis=1) / math.log(2.0)


@pytest.mark.parametrize("target, tol", [("CPU", 2e-7), ("Ascend", 1e-4)])
def test_standard_normal_cdf(target, tol):
    v = np.random.default_rng(0).uniform(-6, 6, 20000).astype(F32)
    assert np.abs(run_as(target, losses.approx_standard_normal_cdf, v) - cdf64(v)).max() <= tol


@pytest.mark.parametrize("target, tol", [("CPU", 2e-6), ("Ascend", 6e-5)])
def test_normal_kl(target, tol):
    """KL(q(x_{t-1}|x_t,x_0) || p_θ) with realistic inputs: log-variances in [-9, -1], the model's within ±0.5,
    its mean off by about one posterior standard deviation."""
    rng = np.random.default_rng(1)
    logvar1 = rng.uniform(-9, -1, 20000).astype(F32)
    logvar2 = (logvar1 + rng.uniform(-0.5, 0.5, logvar1.shape)).astype(F32)
    mean1 = rng.normal(0, 1, logvar1.shape).astype(F32)
    mean2 = (mean1 + np.exp(0.5 * logvar1) * rng.normal(0, 1, logvar1.shape)).astype(F32)
    got = run_as(target, losses.normal_kl, mean1, logvar1, mean2, logvar2)
    assert np.abs(got - normal_kl64(mean1, logvar1, mean2, logvar2)).max() <= tol


@pytest.mark.parametrize("target, tol", [("CPU", 1e-5), ("Ascend", 1.5e-2)])
def test_decoder_nll_in_bits_per_dim(target, tol):
    """L_0 of 8-bit CIFAR-sized images with σ near √β_1 and the mean off by about σ: per-image bits/dim."""
    rng = np.random.default_rng(2)
    shape = (8, 3, 32, 32)
    x = (rng.integers(0, 256, shape) / 127.5 - 1).astype(F32)
    log_scales = rng.uniform(-5.0, -4.0, shape).astype(F32)
    means = (x + np.exp(log_scales) * rng.normal(0, 1, shape)).astype(F32)
    got = run_as(target, losses.discretized_gaussian_log_likelihood, x, means, log_scales)
    want = decoder_nll_terms(x, means, log_scales, np.float64, FLOAT64)
    assert np.abs(bits_per_dim(got) - bits_per_dim(want)).max() <= tol
    if target == "CPU":
        # float32 arithmetic around float64 transcendentals rounded once: the reference's own
        # float32 formula with correctly rounded exp/log/tanh, to a few float32 ulps
        emulated = decoder_nll_terms(x, means, log_scales, F32, ROUNDED_ONCE).astype(np.float64)
        assert np.all(np.abs(got - emulated) <= 4 * np.spacing(np.abs(emulated).astype(F32)))


@pytest.mark.parametrize("target, tol", [("CPU", 1e-4), ("Ascend", 1.5e-3)])
@pytest.mark.parametrize("dim", [64, 192])
def test_timestep_embedding(target, tol, dim):
    """The sinusoids for every t < 1000 against float64 frequencies of the float32 exponent (the reference's)."""
    t = np.arange(1000, dtype=F32)
    half = dim // 2
    exponent = F32(-math.log(10000)) * np.arange(half, dtype=F32) / F32(half)
    args = t.astype(np.float64)[:, None] * np.exp(exponent.astype(np.float64))[None, :]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    assert np.abs(run_as(target, timestep_embedding, t, dim=dim) - want).max() <= tol
