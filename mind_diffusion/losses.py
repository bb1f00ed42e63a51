"""Likelihood terms of the variational bound (Ho et al. 2020, Sec. 3.3; Nichol & Dhariwal 2021, Sec. 2).

All functions are elementwise MindSpore ops, usable inside a compiled graph.

Precision: MindSpore's float32 CPU kernels for exp, log and tanh are fast
approximations (tanh is off by up to 1e-4, log by 1e-3 relative near 1). The
decoder likelihood subtracts two CDF values that agree to five digits, which
turns such errors into wrong bits/dim, so on CPU the transcendentals here are
evaluated in float64 and rounded once to the input's dtype; the arithmetic
around them stays in the input's precision, like the reference implementation.
Graphs built for Ascend (or GPU) use float32 instead (``GRAPH.wide_float``,
see :mod:`mind_diffusion.device`): most float64 ops have no Ascend kernel.
tests/test_losses_precision.py measures what that costs against float64 NumPy.
"""
import math

import numpy as np
from mindspore import ops

from mind_diffusion.device import GRAPH

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CDF_FLOOR = 1e-12
# Divide a KL or NLL in nats by this to get bits (the bits/dim metric).
NATS_PER_BIT = float(np.log(2.0))


# GRAPH.wide_float is read when a graph is built: float64 on CPU, float32 for Ascend/GPU.
def _exp(x):
    return ops.exp(x.astype(GRAPH.wide_float)).astype(x.dtype)


def _log(x):
    return ops.log(x.astype(GRAPH.wide_float)).astype(x.dtype)


def _tanh(x):
    return ops.tanh(x.astype(GRAPH.wide_float)).astype(x.dtype)


def mean_flat(tensor):
    """Mean over every axis but the batch axis: per-example average of a [B, ...] tensor."""
    return tensor.mean(axis=tuple(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ), elementwise, in nats.

    The L_{t-1} terms of the bound are this KL between the true posterior
    q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t). Arguments broadcast;
    scalars (e.g. the standard-normal prior of L_T) are fine.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + _exp(logvar1 - logvar2)
                  + ops.square(mean1 - mean2) * _exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) of the standard normal, by the tanh approximation (Page 1977)."""
    return 0.5 * (1.0 + _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p_θ(x_0 | x_1) of the DDPM decoder L_0, in nats, elementwise.

    Data are 8-bit values rescaled to [-1, 1], so each value owns a bin of width
    2/255; its probability is the Gaussian mass over that bin, with the two edge
    bins extended to ±∞ (Ho et al. 2020, Eq. 13).

    :param x: the target images in [-1, 1].
    :param means: the Gaussian means μ_θ(x_1, 1).
    :param log_scales: log σ, i.e. half the log-variance.
    """
    centered = x - means
    inv_std = _exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = _log(ops.clamp(cdf_plus, min=_CDF_FLOOR))
    log_one_minus_cdf_min = _log(ops.clamp(1.0 - cdf_min, min=_CDF_FLOOR))
    log_cdf_delta = _log(ops.clamp(cdf_plus - cdf_min, min=_CDF_FLOOR))
    return ops.where(x < -0.999, log_cdf_plus,
                     ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))

