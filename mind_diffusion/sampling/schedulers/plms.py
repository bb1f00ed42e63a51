"""PLMS, the pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds", Eqs. 9, 12), with the pseudo improved Euler warm-up.

Each update is DDIM's transfer φ(x_t, ε', t → t−1) = √ᾱ_{t−1} x̂_0' + √(1 − ᾱ_{t−1}) ε',
x̂_0' = (x_t − √(1 − ᾱ_t) ε')/√ᾱ_t, applied with an ε' that combines the current
and previous noise predictions as Adams–Bashforth does:

- step 1 (no history yet): pseudo improved Euler (Heun), two network calls:
  e_0 = ε(x_T), a predictor x' = φ(x_T, e_0), e_1 = ε(x') at t − 1, then
  x_{T−1} = φ(x_T, (e_0 + e_1)/2). Only e_0 joins the history;
- step 2: ε' = (3 e − e_{−1})/2; step 3: (23 e − 16 e_{−1} + 5 e_{−2})/12;
- then ε' = (55 e − 59 e_{−1} + 37 e_{−2} − 9 e_{−3})/24 (fourth order).

This is the S-PNDM warm-up that Latent Diffusion's PLMS sampler uses, not the
paper's F-PNDM (pseudo Runge–Kutta, 4 calls per warm-up step): K steps cost
K + 1 network calls. The corrector call reads the predictor's base state from the
history, so the plan is a sequence of calls with tables, one graph for all of them.

With ``clip_denoised`` the combined x̂_0' is clipped to [−1, 1] too (the network's own x̂_0 always
is): under the cosine schedule √(1 − ᾱ_t)/√ᾱ_t reaches 2.0e4 at t = 999, and the extrapolation's
error, multiplied by it, otherwise ruins few-step sampling.

Written on differences from this call's ε̂ = e, so that rounded weights still reproduce a
constant ε exactly: ε' = e + Σ_j w_j (e_{−j} − e), and x̂_0' = x̂_0 + (√(1 − ᾱ_t)/√ᾱ_t)(ε_base − ε')
from the base state's own (clipped) x̂_0 and ε̂ — the same quantity as (x_t − √(1 − ᾱ_t) ε')/√ᾱ_t
without subtracting two large numbers where ᾱ_t → 0.
"""
import numpy as np
from mindspore import ops

from .base import Scheduler, SchedulerStep

# Adams–Bashforth weights of (e_{−1}, e_{−2}, e_{−3}) by the number of terms; e's is 1 minus their sum.
ADAMS_BASHFORTH = {
    1: (0.0, 0.0, 0.0),
    2: (-1 / 2, 0.0, 0.0),                # (3 e − e_{−1})/2
    3: (-16 / 12, 5 / 12, 0.0),           # (23 e − 16 e_{−1} + 5 e_{−2})/12
    4: (-59 / 24, 37 / 24, -9 / 24),      # (55 e − 59 e_{−1} + 37 e_{−2} − 9 e_{−3})/24
}
HEUN_CORRECTOR = (1 / 2, 0.0, 0.0)  # (e_1 + e_0)/2, with e_0 in the history slot e_{−1}


class PLMSStep(SchedulerStep):
    """One PLMS call; history = (e_{−1}, e_{−2}, e_{−3}, x̂_0 of the predictor's base state)."""

    def construct(self, model_output, x, k, noise, grad, eps_1, eps_2, eps_3, anchor_xstart):
        ndim = x.ndim
        pred_xstart, eps = self.prediction(model_output, x, self.timestep(k), grad)
        diff_1 = eps_1 - eps
        correction = (self.coef(self.w1, k, ndim) * diff_1 + self.coef(self.w2, k, ndim) * (eps_2 - eps)
                      + self.coef(self.w3, k, ndim) * (eps_3 - eps))
        eps_prime = eps + correction
        # The base state: this call's own x_t (own = 1) or, for the Heun corrector, the predictor's (own = 0),
        # whose (x̂_0, ε̂) are (anchor_xstart, eps_1): ε_base − ε' = (1 − own)(e_{−1} − e) − correction.
        own = self.coef(self.from_current, k, ndim)
        base_xstart = own * pred_xstart + (1.0 - own) * anchor_xstart
        xstart = base_xstart + self.coef(self.from_ratio, k, ndim) * ((1.0 - own) * diff_1 - correction)
        if self.clip_denoised:
            # The extrapolated x̂_0' is clipped like every other x̂_0: its error is the ε' error times
            # √(1 − ᾱ_t)/√ᾱ_t, 2.0e4 at t = 999 of the cosine schedule (157 for SD's linear one), which
            # unclipped wrecks few-step sampling there (demo model, 10 NFE: 3% of prompts followed).
            xstart = ops.clamp(xstart, -1.0, 1.0)
        sample = self.coef(self.xstart_coef, k, ndim) * xstart + self.coef(self.eps_coef, k, ndim) * eps_prime
        # History: shift in this call's ε (the corrector leaves it as it is).
        shift = self.coef(self.shift, k, ndim)
        keep = 1.0 - shift
        return (sample, shift * eps + keep * eps_1, shift * eps_1 + keep * eps_2, shift * eps_2 + keep * eps_3,
                pred_xstart)


class PLMSScheduler(Scheduler):
    """PLMS (S-PNDM warm-up); deterministic, K + 1 network calls for K steps."""

    name = "plms"
    step_class = PLMSStep
    history_size = 4

    def plan(self, process):
        s = process.schedule
        top = process.num_timesteps - 1
        steps = top + 1 - self.lowest_step  # updates, the last from t = lowest_step
        rows = []  # (t where the network runs, base step t_from, weights, from_current, shift)
        rows.append((top, top, ADAMS_BASHFORTH[1], 1.0, 1.0))          # Heun predictor
        rows.append((top - 1, top, HEUN_CORRECTOR, 0.0, 0.0))          # Heun corrector
        for step in range(1, steps):  # the step from t = top − step, with `step` previous ε in the history
            t = top - step
            rows.append((t, t, ADAMS_BASHFORTH[min(step + 1, 4)], 1.0, 1.0))
        call_t = np.array([r[0] for r in rows])
        t_from = np.array([r[1] for r in rows])
        weights = np.array([r[2] for r in rows])
        alpha_bar_to = s["alphas_cumprod_prev"][t_from]
        return call_t, {
            "w1": weights[:, 0], "w2": weights[:, 1], "w3": weights[:, 2],
            "from_current": np.array([r[3] for r in rows]), "shift": np.array([r[4] for r in rows]),
            "from_ratio": s["sqrt_recipm1_alphas_cumprod"][t_from],   # √(1 − ᾱ_t)/√ᾱ_t of the base state
            "xstart_coef": np.sqrt(alpha_bar_to), "eps_coef": np.sqrt(1.0 - alpha_bar_to),
        }
