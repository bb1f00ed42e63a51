"""Ancestral sampling (Ho et al. 2020, Algorithm 2) with fixed or learned Σ, as a scheduler.

The update is the process's own :meth:`GaussianDiffusion.p_sample_from_output`
(or, on CPU, the fused C++ kernel that computes the same from the same
tables), so this scheduler draws exactly what :class:`~mind_diffusion.sampling.DDPMSampler`
draws from the same noises. Classifier guidance shifts the mean by Σ_θ·g
(ADM's condition_mean).
"""
from .. import fused as _fused
from ..guidance import condition_mean
from .base import Scheduler, SchedulerStep, descending


class DDPMStep(SchedulerStep, _fused.FusedStep):
    """x_{t−1} = μ_θ(x_t, t) [+ Σ_θ g] + σ_t z, no noise at t = 0."""

    def __init__(self, scheduler, guided=False):
        super().__init__(scheduler, guided)
        self._init_fused(_fused.ddpm_kernel(self.diffusion, self.clip_denoised, pred_xstart=False),
                         self.diffusion._learned_sigma)

    def construct(self, model_output, x, k, noise, grad):
        t = self.timestep(k)
        if self.fused and _fused.fits(model_output, x, t, noise, self.fused_out_channels):
            sample = self.fused_op(x, model_output, noise, t, self.fused_table)
        else:
            sample, _ = self.diffusion.p_sample_from_output(model_output, x, t, noise, self.clip_denoised)
        if grad is None:
            return (sample,)
        _, var_values = self.diffusion.split_output(model_output, x.shape[1])
        variance, _ = self.diffusion.model_variance(var_values, x, t)
        return (condition_mean(sample, variance, grad),)


class DDPMScheduler(Scheduler):
    """p_θ(x_{t−1} | x_t) at each of the K steps; Σ_θ as the process says (fixed small/large, learned)."""

    name = "ddpm"
    step_class = DDPMStep
    needs_noise = True

    def plan(self, process):
        t, _, _ = descending(process, self.lowest_step)
        return t, {}
