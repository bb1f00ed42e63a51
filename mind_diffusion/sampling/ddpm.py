"""Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2) on any respacing."""
from . import fused as _fused
from .base import ModelStep, Sampler


class DDPMStep(ModelStep, _fused.FusedStep):
    """x_{t-1} = μ_θ(x_t, t) + σ_t z, with Σ_θ fixed or learned; returns (x_{t-1}, x̂_0), or x_{t-1}.

    On CPU everything after the network is one fused C++ kernel (see
    :mod:`mind_diffusion.sampling.fused`; ``self.fused`` says whether it is used),
    else the pure-ops :meth:`GaussianDiffusion.p_sample_from_output`.
    """

    def __init__(self, diffusion, model, cond_names=(), clip_denoised=True, pred_xstart=True):
        super().__init__(diffusion, model, cond_names, pred_xstart)
        self.clip_denoised = clip_denoised
        self._init_fused(_fused.ddpm_kernel(diffusion, clip_denoised, pred_xstart), diffusion._learned_sigma)

    def construct(self, x, t, noise, *cond):
        output = self.model_output(x, t, cond)
        if self.fused and _fused.fits(output, x, t, noise, self.fused_out_channels):
            return self.fused_op(x, output, noise, t, self.fused_table)
        return self.outputs(*self.diffusion.p_sample_from_output(output, x, t, noise, self.clip_denoised))


class DDPMSampler(Sampler):
    """Ancestral sampler: p_θ(x_{t-1} | x_t) at every step of the (respaced) process."""

    name = "ddpm"

    def make_step(self, cond_names, pred_xstart):
        return DDPMStep(self.diffusion, self.model, cond_names, self.clip_denoised, pred_xstart)
