"""Samplers: each compiles one step graph and reuses it for every t."""
from .ddim import DDIMSampler
from .ddpm import DDPMSampler


def create_sampler(name, diffusion, model, eta=0.0, clip_denoised=True, progress=False):
    """A sampler by name (``ddpm`` or ``ddim``)."""
    if name == "ddpm":
        return DDPMSampler(diffusion, model, clip_denoised=clip_denoised, progress=progress)
    if name == "ddim":
        return DDIMSampler(diffusion, model, eta=eta, clip_denoised=clip_denoised, progress=progress)
    raise ValueError(f"unknown sampler {name!r}: use 'ddpm' or 'ddim'")
