"""Latent diffusion's conventions (CompVis ``LatentDiffusion``, ``DDIMSampler``, ``PLMSSampler``):
its noise schedule and how its samplers pick their K steps.

- Schedule ("linear" in CompVis's configs, "scaled_linear" elsewhere): √β_t evenly spaced from
  √β_start to √β_end over T steps, β_t = (√β_start + (√β_end − √β_start)·t/(T − 1))², float64
  (SD 1.x/2.x and Wukong-Huahua: 0.00085, 0.012, T = 1000). ``zero_terminal_snr`` rescales it to reach
  zero SNR at T (:func:`mind_diffusion.schedules.rescale_zero_terminal_snr`; models trained here that set
  ``diffusion.zero_terminal_snr``, recorded in their export's ``schedule``).
- Steps (``ddim_discretize="uniform"``): τ_i = i·c + 1 for i·c in range(0, T, c), c = T // K —
  note the +1 — so K = 5 of T = 1000 gives 1, 201, 401, 601, 801 (len(range(0, T, c)) steps,
  which is K when c divides T). Each update moves from ᾱ_{τ_i} to ᾱ_{τ_{i−1}}, and the last one
  from ᾱ_{τ_1} to ᾱ_0 of the base process (``alphas_cumprod_prev = [ᾱ_0, ᾱ_{τ_1}, ...]``), not to
  ᾱ = 1: the sample is the state at t = 0, which is what CompVis decodes.

:func:`respace_ldm` expresses the second as a respaced process that keeps {0} ∪ {τ_i}; the
scheduler then runs the network at every kept step but the lowest (``Scheduler.lowest_step`` = 1),
so every scheduler (``spacing="ldm"``) follows CompVis's steps.
"""
import numpy as np

from ... import schedules
from ...gaussian_diffusion import GaussianDiffusion

__all__ = ["ldm_betas", "ldm_timesteps", "respace_ldm", "create_ldm_diffusion"]


def ldm_betas(timesteps=1000, linear_start=0.00085, linear_end=0.012, zero_terminal_snr=False):
    """β_1..β_T of latent diffusion's schedule: (linspace(√start, √end, T))², float64; with
    ``zero_terminal_snr`` rescaled to zero SNR at T."""
    if not 0.0 < linear_start < linear_end < 1.0:
        raise ValueError(f"need 0 < linear_start < linear_end < 1, got {linear_start}, {linear_end}")
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, int(timesteps), dtype=np.float64) ** 2
    return schedules.rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def ldm_timesteps(total, num_steps):
    """CompVis's "uniform" steps τ = range(0, T, T // K) + 1 (ascending)."""
    stride = total // num_steps
    if stride < 1:
        raise ValueError(f"spacing 'ldm': {num_steps} steps do not fit in T = {total}")
    steps = [t + 1 for t in range(0, total, stride)]
    if steps[-1] > total - 1:
        raise ValueError(f"spacing 'ldm': with {num_steps} of T = {total} steps the last one, {steps[-1]}, "
                         f"lies past T − 1 (CompVis's +1 offset); use at most {total // 2} steps")
    return steps


def respace_ldm(base, num_steps):
    """The base process restricted to {0} ∪ :func:`ldm_timesteps`: the kept steps keep their ᾱ_t,
    the network sees the original indices (as :meth:`GaussianDiffusion.respace` does)."""
    kept = [0] + ldm_timesteps(base.num_timesteps, num_steps)
    return GaussianDiffusion(
        schedules.respace_betas(base.schedule["alphas_cumprod"], kept),
        model_mean_type=base.model_mean_type, model_var_type=base.model_var_type, loss_type=base.loss_type,
        rescale_timesteps=base.rescale_timesteps, timestep_map=kept, original_num_steps=base.num_timesteps)


def create_ldm_diffusion(timesteps=1000, linear_start=0.00085, linear_end=0.012, prediction="eps",
                         zero_terminal_snr=False):
    """The base process of a latent diffusion model: :func:`ldm_betas`, ε or v prediction."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    mean_type = "epsilon" if prediction == "eps" else "velocity"
    return GaussianDiffusion(ldm_betas(timesteps, linear_start, linear_end, zero_terminal_snr),
                             model_mean_type=mean_type)
