"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): multistep exponential integrators of the probability-flow ODE in the
data prediction x̂_0, second order (2M, the paper's Algorithm 2) or third order (3M).

With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ_t = log(α_t/σ_t) and h = λ_{t−1} − λ_t, the exact
solution is x_{t−1} = (σ_{t−1}/σ_t) x_t + σ_{t−1} ∫ e^λ x̂_0(λ) dλ over [λ_t, λ_{t−1}]. Expanding
x̂_0 in λ around λ_t, with its derivatives from the previous calls' x̂_0 (the history):

- first order (DDIM): x_{t−1} = (σ_{t−1}/σ_t) x_t + α_{t−1}(1 − e^{−h}) x̂_0;
- 2M: the same with D = (1 + 1/(2r)) x̂_0 − 1/(2r) x̂_0^{prev}, r = h_prev/h (Algorithm 2);
- 3M: α_{t−1}(1 − e^{−h}) x̂_0 + E_1 p'(λ_t) + E_2 p''(λ_t), p the quadratic through the
  last three (λ, x̂_0), E_1 = α_{t−1}(h − 1 + e^{−h}), E_2 = α_{t−1}(h²/2 − h + 1 − e^{−h})
  (the integrals of e^λ (λ − λ_t) and e^λ (λ − λ_t)²/2, times σ_{t−1}).

Each call is x_{t−1} = a x_t + g x̂_0 + d_1 (x̂_0^{(−1)} − x̂_0) + d_2 (x̂_0^{(−2)} − x̂_0), g = α_{t−1}(1 − e^{−h}),
with a, g, d per call from the float64 ᾱ (on differences, so that rounded coefficients still
reproduce a constant x̂_0 exactly). The first calls use the orders their history allows; the last
call (to ᾱ = 1, λ = ∞) is first order and lands on x̂_0, and 3M takes its second-to-last step with
2M (DPM-Solver's "lower order final": the last steps' h dwarfs the previous ones, and a quadratic
extrapolated that far amplifies rounding).
"""
import numpy as np

from .base import Scheduler, SchedulerStep, descending


class DPMSolverStep(SchedulerStep):
    """One multistep update; history = the previous calls' x̂_0, newest first."""

    def construct(self, model_output, x, k, noise, grad, *history):
        ndim = x.ndim
        pred_xstart, _ = self.prediction(model_output, x, self.timestep(k), grad)
        sample = (self.coef(self.x_coef, k, ndim) * x + self.coef(self.xstart_coef, k, ndim) * pred_xstart
                  + self.coef(self.d1, k, ndim) * (history[0] - pred_xstart))
        if self.history_size == 1:
            return sample, pred_xstart
        sample = sample + self.coef(self.d2, k, ndim) * (history[1] - pred_xstart)
        return sample, pred_xstart, history[0]


def multistep_coefficients(alpha_bar_from, alpha_bar_to, order):
    """(a, g, d_1, d_2) per call of the multistep DPM-Solver++ of ``order`` (2 or 3), float64.

    x_{t−1} = a x_t + d_0 x̂_0 + d_1 x̂_0^{(−1)} + d_2 x̂_0^{(−2)} with d_0 = g − d_1 − d_2.
    """
    alpha_from, sigma_from = np.sqrt(alpha_bar_from), np.sqrt(1.0 - alpha_bar_from)
    alpha_to, sigma_to = np.sqrt(alpha_bar_to), np.sqrt(1.0 - alpha_bar_to)
    a = sigma_to / sigma_from
    g = alpha_to - alpha_from * a          # α_{t−1}(1 − e^{−h}), e^{−h} = α_t σ_{t−1}/(α_{t−1} σ_t); 1 at the end
    calls = len(alpha_bar_from)
    d1, d2 = np.zeros(calls), np.zeros(calls)
    lam_from = np.log(alpha_from / sigma_from)
    h = np.full(calls, np.inf)
    h[:-1] = np.log(alpha_to[:-1] / sigma_to[:-1]) - lam_from[:-1]  # the last call ends at λ = ∞
    for k in range(1, calls - 1):           # first call: no history; last call: first order
        h0 = h[k - 1]                       # λ_t − λ of the previous call's state
        if order == 2 or k == 1 or k == calls - 2:
            d1[k] = -g[k] * h[k] / (2.0 * h0)  # D = (1 + 1/(2r)) x̂_0 − 1/(2r) x̂_0^{(−1)}, r = h_prev/h
            continue
        h1 = h[k - 2]
        e_minus_h = np.exp(-h[k])
        e1 = alpha_to[k] * (h[k] - 1.0 + e_minus_h)
        e2 = alpha_to[k] * (h[k] ** 2 / 2.0 - h[k] + 1.0 - e_minus_h)
        # p'(λ_t) = f01 + h0 f012, p''(λ_t) = 2 f012 with divided differences f01 = (m0 − m1)/h0,
        # f12 = (m1 − m2)/h1, f012 = (f01 − f12)/(h0 + h1), written on m0, m1, m2.
        f012_weight = e1 * h0 + 2.0 * e2
        d1[k] = -e1 / h0 - f012_weight * (1.0 / h0 + 1.0 / h1) / (h0 + h1)
        d2[k] = f012_weight / (h1 * (h0 + h1))
    return a, g, d1, d2


class DPMSolverScheduler(Scheduler):
    """DPM-Solver++ multistep of order 2 (``dpm++2m``) or 3 (``dpm++3m``); deterministic, K calls."""

    step_class = DPMSolverStep

    def __init__(self, diffusion, order=2, clip_denoised=True):
        super().__init__(diffusion, clip_denoised)
        if order not in (2, 3):
            raise ValueError(f"DPM-Solver++ multistep order must be 2 or 3, got {order!r}")
        self.order = order
        self.name = f"dpm++{order}m"
        self.history_size = order - 1

    def plan(self, process):
        t, alpha_bar_from, alpha_bar_to = descending(process, self.lowest_step)
        a, g, d1, d2 = multistep_coefficients(alpha_bar_from, alpha_bar_to, self.order)
        tables = {"x_coef": a, "xstart_coef": g, "d1": d1}
        if self.order == 3:
            tables["d2"] = d2
        return t, tables
