"""DDIM (Song et al. 2021, Eq. 12) with stochasticity η, as a scheduler.

The update is the process's own :meth:`GaussianDiffusion.ddim_sample_from_output`
(or, on CPU, the fused C++ kernel that computes the same), so this scheduler
draws exactly what :class:`~mind_diffusion.sampling.DDIMSampler` draws. With
classifier guidance the network output is replaced by the one that predicts the
guided ε̂ − √(1 − ᾱ_t) g (ADM's condition_score, Alg. 2) before the same update.
"""
from .. import fused as _fused
from .base import Scheduler, SchedulerStep, descending


class DDIMStep(SchedulerStep, _fused.FusedStep):
    """x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z, σ_t scaled by η."""

    def __init__(self, scheduler, guided=False):
        super().__init__(scheduler, guided)
        self.eta = scheduler.eta
        # Guided: x̂_0 was clipped before the gradient was folded in, and ADM does not clip it again.
        self.update_clip = self.clip_denoised and not self.guided
        self._init_fused(_fused.ddim_kernel(self.diffusion, self.eta, self.update_clip, pred_xstart=False),
                         self.diffusion._learned_sigma)

    def construct(self, model_output, x, k, noise, grad):
        t = self.timestep(k)
        if grad is not None:
            model_output = self.guided_output(model_output, x, t, grad)
        if self.fused and _fused.fits(model_output, x, t, noise, self.fused_out_channels):
            return (self.fused_op(x, model_output, noise, t, self.fused_table),)
        sample, _ = self.diffusion.ddim_sample_from_output(model_output, x, t, noise, self.eta, self.update_clip)
        return (sample,)


class DDIMScheduler(Scheduler):
    """DDIM: η = 0 is the deterministic implicit model (the probability-flow ODE's first-order
    solver), η = 1 has DDPM's posterior variance.

    :param eta: η in [0, 1].
    """

    name = "ddim"
    step_class = DDIMStep

    def __init__(self, diffusion, eta=0.0, clip_denoised=True):
        super().__init__(diffusion, clip_denoised)
        if not 0.0 <= eta <= 1.0:
            # Beyond 1, σ_t² can exceed 1 − ᾱ_{t−1} and √(1 − ᾱ_{t−1} − σ_t²) is undefined.
            raise ValueError(f"DDIM eta must lie in [0, 1] (0 = deterministic, 1 = DDPM-like), got {eta}")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0

    def plan(self, process):
        t, _, _ = descending(process, self.lowest_step)
        return t, {}
