"""Euler ancestral in σ space (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"; k-diffusion's ``sample_euler_ancestral``).

With σ_t = √((1 − ᾱ_t)/ᾱ_t) and x̃ = x/√ᾱ_t = x_0 + σ_t ε, the ODE is dx̃/dσ = ε̂ = (x̃ − x̂_0)/σ.
One call steps from σ_t down to σ_down and adds noise back up to σ_{t−1}:

    σ_up = min(σ_{t−1}, η √(σ_{t−1}² (σ_t² − σ_{t−1}²)/σ_t²)),  σ_down = √(σ_{t−1}² − σ_up²),
    x̃_{t−1} = x̃_t + (σ_down − σ_t) ε̂ + σ_up z = x̂_0 + σ_down ε̂ + σ_up z,

and x_{t−1} = √ᾱ_{t−1} x̃_{t−1}. η = 0 is Euler's method on the ODE; η = 1 the ancestral
sampler. (On the same steps these equal DDIM with η = 0 and η = 1: √ᾱ_{t−1} σ_up is DDIM's σ_t.)
The update is written on x̂_0 rather than x̃_t, which avoids subtracting two large numbers
where ᾱ_t → 0.
"""
import numpy as np

from .base import Scheduler, SchedulerStep, descending


class EulerAncestralStep(SchedulerStep):
    """x_{t−1} = √ᾱ_{t−1} (x̂_0 + σ_down ε̂ + σ_up z)."""

    def construct(self, model_output, x, k, noise, grad):
        ndim = x.ndim
        pred_xstart, eps = self.prediction(model_output, x, self.timestep(k), grad)
        return (self.coef(self.xstart_coef, k, ndim) * pred_xstart + self.coef(self.eps_coef, k, ndim) * eps
                + self.coef(self.noise_coef, k, ndim) * noise,)


def ancestral_sigmas(sigma_from, sigma_to, eta):
    """(σ_down, σ_up) of an ancestral step from σ_from to σ_to with noise share η (float64)."""
    sigma_up = np.minimum(sigma_to, eta * np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return np.sqrt(sigma_to ** 2 - sigma_up ** 2), sigma_up


class EulerAncestralScheduler(Scheduler):
    """Euler ancestral (``euler_a``); ``eta`` = 0 gives the deterministic Euler ODE solver.

    :param eta: η ≥ 0, the share of the step's variance given back as fresh noise.
    """

    name = "euler_a"
    step_class = EulerAncestralStep

    def __init__(self, diffusion, eta=1.0, clip_denoised=True):
        super().__init__(diffusion, clip_denoised)
        if not eta >= 0.0:
            raise ValueError(f"Euler ancestral eta must be >= 0 (0 = the ODE, 1 = ancestral), got {eta}")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0

    def plan(self, process):
        t, alpha_bar_from, alpha_bar_to = descending(process, self.lowest_step)
        sigma_from = np.sqrt((1.0 - alpha_bar_from) / alpha_bar_from)
        sigma_to = np.sqrt((1.0 - alpha_bar_to) / alpha_bar_to)  # 0 at the last call
        sigma_down, sigma_up = ancestral_sigmas(sigma_from, sigma_to, self.eta)
        scale = np.sqrt(alpha_bar_to)
        return t, {"xstart_coef": scale, "eps_coef": scale * sigma_down, "noise_coef": scale * sigma_up}
