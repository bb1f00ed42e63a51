"""Fused CPU sampling steps: everything after the network in one custom kernel.

On MindSpore's CPU backend every elementwise kernel costs ~15 µs to launch, and
the pure-ops step of :class:`GaussianDiffusion` (gathers of the schedule
constants, the split of the output, x̂_0, μ_θ, σ_t, clip, noise) launches
about 30 of them — more than a small network's own forward. Here the whole
per-pixel update x_t → (x_{t-1}, x̂_0) is one ``ops.Custom(func_type="aot")``
operator, written in C++ (``mind_diffusion/kernels/csrc/step_kernel.cc``, beside
the other kernels and their shared header) and built with g++ on first
use. It reads the step's constants from a per-step table [T, K] indexed by t
inside the kernel, so a step is the network plus two kernels (the gather of
the network's time input, and this one).

The fused path is chosen when the step is built (in Python, never from tensor
values) and only on the CPU backend; the pure-ops path stays the fallback:

- ``MIND_DIFFUSION_FUSED=0`` (or ``false``/``off``/``no``) disables it;
- any other device target, no g++, a failed build, or an
  ``MS_CUSTOM_AOT_WHITE_LIST`` that excludes the cache directory falls back,
  with one warning saying why (except for the env var and the device);
- inside the graph, a network output that is not float32 or not shaped like
  x (C or 2C channels) also takes the pure-ops path (decided from shapes and
  dtypes, which are compile-time constants).

The library is built and cached by :mod:`mind_diffusion.kernels.aot` (keyed
by the source and the flags; parallel processes never load a half-written
library).

The arithmetic of x̂_0 and μ_θ is float32 in the order of the pure-ops path (and
of improved-diffusion); σ_t = exp(P + Q·v) with P, Q per step (see
:func:`log_std_line`) and an exp accurate to 1 ulp, which matches the pure-ops
σ to float32 rounding. The per-step constants are the float64 schedule rounded
once to float32, and DDIM's σ_t and √(1 − ᾱ_{t−1} − σ_t²) are computed per step
in float32 from those rounded constants, as the reference does. The library
carries AVX-512, AVX2 and baseline builds of every entry point; the loader picks
the best one the CPU runs.
"""
import os
import threading

import numpy as np
import mindspore as ms
from mindspore import ops

from mind_diffusion.kernels import aot

SOURCE = os.path.join(os.path.dirname(os.path.abspath(aot.__file__)), "csrc", "step_kernel.cc")
CXX_FLAGS = aot.DEFAULT_FLAGS
ENV_SWITCH = "MIND_DIFFUSION_FUSED"

# Columns of the per-step tables; must match the enums in kernels/csrc/step_kernel.cc. The first two are
# (a, b) of x̂_0 = a·x_t − b·output for ε (x_0- and μ-predicting steps read them only for DDIM's ε̂),
# VELOCITY_COLUMNS instead for v.
VELOCITY_COLUMNS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
DDPM_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                "posterior_mean_coef2", "log_std_offset", "log_std_slope", "nonzero_mask")
DDIM_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                "posterior_mean_coef2", "sqrt_alphas_cumprod_prev", "eps_coef", "sigma_times_mask")

_lock = threading.Lock()
_library = {}  # "path" -> built .so path or None, "reason" -> why not
_ops = {}  # (entry point, with x̂_0) -> Custom op, or None when MindSpore refused it


def _build():
    """Compile kernels/csrc/step_kernel.cc once per source/flags hash; returns (path or None, reason)."""
    return aot.build(SOURCE, CXX_FLAGS)


def library():
    """Path of the built kernel library, or None (the reason is in :func:`status`)."""
    return aot.load_once(_library, _lock, lambda: _build(), "fused sampling step unavailable, using pure ops")


def status():
    """(use_fused, reason) for steps built now: whether the fused path is taken, and why (not)."""
    return aot.library_status(ENV_SWITCH, "fused kernel", _library, library, label="fused C++ kernel")


def _x_prev_only(x, out, noise, t, table):
    return x


def _x_prev_and_pred(x, out, noise, t, table):
    return x, x


def _custom(function, pred_xstart):
    """The aot Custom operator for one entry point (made once, shared), or None when MindSpore refuses it.

    With ``pred_xstart`` it has two outputs (x_{t-1}, x̂_0), else only x_{t-1}: an output the
    sampling loop discards would still be allocated and returned by the graph, which costs about
    as much as the kernel's own work at 16×3×32×32.
    """
    outputs = _x_prev_and_pred if pred_xstart else _x_prev_only

    def make():
        return ops.Custom(f"{library()}:{function}", out_shape=outputs, out_dtype=outputs, func_type="aot")

    return aot.op_once(_ops, _library, _lock, (function, bool(pred_xstart)), make,
                       "fused sampling step unavailable, using pure ops")


def _f32(values):
    return np.asarray(values, np.float64).astype(np.float32)


def _mean_columns(diffusion):
    """The four columns every step needs for x̂_0 (ε, x_0, μ or v parametrisation), float64 → float32."""
    names = DDPM_COLUMNS[:4]
    if diffusion._mean == "velocity":
        names = VELOCITY_COLUMNS + names[2:]
    return [_f32(diffusion.schedule[name]) for name in names]


def log_std_line(diffusion):
    """(P, Q) per step, float64, with log σ_t = P + Q·v for the network's variance output v.

    learned: log σ² = v, so P = 0, Q = ½. learned_range (improved DDPM, Eq. 15): log σ² =
    f log β_t + (1 − f) log β̃_t with f = (v + 1)/2, so P = (log β_t + log β̃_t)/4 and
    Q = (log β_t − log β̃_t)/4. Fixed Σ: P = ½ log σ_t², Q = 0. The kernel then spends one
    multiply-add and one exp per pixel on σ.
    """
    s = diffusion.schedule
    steps = diffusion.num_timesteps
    if diffusion._var == "learned":
        return np.zeros(steps), np.full(steps, 0.5)
    if diffusion._var == "learned_range":
        min_log, max_log = s["posterior_log_variance_clipped"], s["log_betas"]
        return (max_log + min_log) / 4.0, (max_log - min_log) / 4.0
    fixed = s["fixed_large_log_variance"] if diffusion._var == "fixed_large" else s["posterior_log_variance_clipped"]
    return fixed / 2.0, np.zeros(steps)


def ddpm_table(diffusion):
    """Per-step constants of the ancestral step, [T, 7] float32 (columns: :data:`DDPM_COLUMNS`)."""
    offset, slope = log_std_line(diffusion)
    columns = _mean_columns(diffusion) + [_f32(offset), _f32(slope),
                                          (np.arange(diffusion.num_timesteps) > 0).astype(np.float32)]
    return np.stack(columns, axis=1)


def ddim_table(diffusion, eta):
    """Per-step constants of the DDIM step with stochasticity η, [T, 7] float32 (columns: :data:`DDIM_COLUMNS`).

    σ_t = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1}) and √(1 − ᾱ_{t−1} − σ_t²) are computed in
    float32 from the float32-rounded ᾱ, in the reference's order (numpy's float32 sqrt and division are
    correctly rounded, like the reference's).
    """
    s = diffusion.schedule
    one = np.float32(1.0)
    alpha_bar, alpha_bar_prev = _f32(s["alphas_cumprod"]), _f32(s["alphas_cumprod_prev"])
    with np.errstate(invalid="ignore"):
        sigma = (np.float32(eta) * np.sqrt((one - alpha_bar_prev) / (one - alpha_bar))
                 * np.sqrt(one - alpha_bar / alpha_bar_prev))
        eps_coef = np.sqrt(one - alpha_bar_prev - sigma * sigma)
    mask = (np.arange(diffusion.num_timesteps) > 0).astype(np.float32)
    columns = _mean_columns(diffusion) + [np.sqrt(alpha_bar_prev), eps_coef, mask * sigma]
    return np.stack(columns, axis=1).astype(np.float32)


def _variant(diffusion, clip_denoised):
    return diffusion._mean, "clip" if clip_denoised else "noclip"


def ddpm_kernel(diffusion, clip_denoised, pred_xstart=True):
    """(op, table Tensor) computing one ancestral step, or None when the fused path is not taken.

    The op returns (x_{t-1}, x̂_0), or x_{t-1} alone when ``pred_xstart`` is false.
    """
    if not status()[0]:
        return None
    mean, clip = _variant(diffusion, clip_denoised)
    op = _custom(f"md_ddpm_{mean}_{diffusion._var}_{clip}", pred_xstart)
    return None if op is None else (op, ms.Tensor(ddpm_table(diffusion), ms.float32))


def ddim_kernel(diffusion, eta, clip_denoised, pred_xstart=True):
    """(op, table Tensor) computing one DDIM step with η, or None when the fused path is not taken.

    The op returns (x_{t-1}, x̂_0), or x_{t-1} alone when ``pred_xstart`` is false.
    """
    if not status()[0]:
        return None
    mean, clip = _variant(diffusion, clip_denoised)
    sigma = "learned" if diffusion._learned_sigma else "fixed"
    op = _custom(f"md_ddim_{mean}_{sigma}_{clip}", pred_xstart)
    return None if op is None else (op, ms.Tensor(ddim_table(diffusion, eta), ms.float32))


def fits(output, x, t, noise, out_channels):
    """Whether the kernel takes these tensors (float32 x/output/noise, int32 t, output with
    ``out_channels`` channels); shapes and dtypes only, so graph mode resolves it at compile time."""
    return (x.dtype == ms.float32 and output.dtype == ms.float32 and noise.dtype == ms.float32
            and t.dtype == ms.int32 and output.ndim == x.ndim and x.ndim >= 2
            and output.shape[1] == out_channels * x.shape[1])


class FusedStep:
    """Mixin of the step Cells: holds the fused operator and its table, chosen at construction."""

    def _init_fused(self, kernel, learned_sigma):
        self.fused = kernel is not None
        self.fused_op = kernel[0] if kernel is not None else None
        self.fused_table = kernel[1] if kernel is not None else None
        self.fused_out_channels = 2 if learned_sigma else 1
