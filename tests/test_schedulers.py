"""The schedulers (mind_diffusion.sampling.schedulers) on data sets with known answers.

- One-point data x*: with the exact denoiser every ODE solver keeps x_t on the line
  √ᾱ_t x* + √(1 − ᾱ_t) e at every call and lands on x*.
- Gaussian data N(μ, s² I): each solver's every state equals a float64 recursion of its
  paper's equations written here independently; against the exact probability-flow ODE
  solution (the standardised state (x_t − √ᾱ_t μ)/√v_t is constant) the error shrinks
  with the solver's order as K doubles.
- DDPM and DDIM draw bit for bit what DDPMSampler and DDIMSampler draw.
- Classifier guidance against NumPy gradients of a linear classifier.

The network here is the exact denoiser of the data set in closed form (ε, x_0 or v), so
what is tested is the scheduler alone. The process is DDPM's linear schedule with T = 1000,
whose ᾱ are recomputed here from the definition.
"""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from mind_diffusion.sampling import DDIMSampler, DDPMSampler, fused
from mind_diffusion.sampling.guidance import ClassifierGuidance
from mind_diffusion.sampling.schedulers import (DDIMScheduler, DPMSolverScheduler, EulerAncestralScheduler,
                                                PLMSScheduler, create_scheduler, sample)
from tests.helpers.compile_count import record_compiles

T = 1000
SHAPE = (2, 3, 4, 4)
X_STAR = (np.random.default_rng(3).integers(0, 256, (1, 3, 4, 4)) / 127.5 - 1).astype(np.float32)
MU = X_STAR.astype(np.float64)
# States are O(3); a float32 ulp there is 2.4e-7. Measured max |error| over every state of the one-point
# chains below (ε, x_0, v): DPM-Solver++ 1.7e-6, Euler 8.7e-7. DDIM 2.2e-6: its update is the process's
# (improved-diffusion's) float32 √(1 − ᾱ_{t−1} − σ²), which loses digits at ᾱ_{t−1} = 0.9999 (the step into
# t = 0); Euler takes the same step from float64 tables at 1.5e-7. PLMS 1.8e-5: its ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t)
# magnifies each state's rounding by 1/√(1 − ᾱ_t) (up to 100 near t = 0), and Adams–Bashforth weights up to
# 59/24 carry it into the later steps (the chain's own error growth, not a wrong coefficient: the Gaussian
# test below checks every coefficient).
ATOL_POINT = {"ddim": 3e-6, "plms": 3e-5, "dpm++2m": 2e-6, "dpm++3m": 2e-6, "euler": 2e-6}


def linear_alpha_bars(steps=T):
    """ᾱ_t = Π_{s ≤ t} (1 − β_s), β linear from 1e-4 to 0.02 (DDPM, T = 1000)."""
    betas = [1e-4 + (0.02 - 1e-4) * t / (steps - 1) for t in range(steps)]
    return np.cumprod(1.0 - np.array(betas))


ALPHA_BARS = linear_alpha_bars()


def kept_steps(count, steps=T):
    """improved DDPM's even respacing of T steps to ``count`` (no half-way ties at the counts used here)."""
    return [int(round(i * (steps - 1) / (count - 1))) for i in range(count)]


class GaussianDataModel(nn.Cell):
    """The exact network for data x_0 ~ N(μ, s² I), μ = x*: E[ε | x_t], E[x_0 | x_t] or the v they imply.

    With d = x_t − √ᾱ_t μ and v_t = ᾱ_t s² + 1 − ᾱ_t: ε̂ = √(1 − ᾱ_t) d / v_t, x̂_0 = μ + s² √ᾱ_t d / v_t,
    v̂ = √ᾱ_t ε̂ − √(1 − ᾱ_t) x̂_0. s = 0 is the one-point data set. ``learned_sigma`` appends C channels
    of a variance output (which the ODE solvers must ignore). ᾱ is looked up by the original step the
    network is given, so a wrong timestep map gives wrong samples.
    """

    def __init__(self, kind, std=0.0, learned_sigma=False, alpha_bars=ALPHA_BARS):
        super().__init__()
        abar = np.asarray(alpha_bars, np.float64)
        self.kind = kind
        self.learned_sigma = learned_sigma
        self.sqrt_abar = ms.Tensor(np.sqrt(abar), ms.float32)
        self.sqrt_one_minus = ms.Tensor(np.sqrt(1 - abar), ms.float32)
        self.eps_gain = ms.Tensor(np.sqrt(1 - abar) / (abar * std ** 2 + 1 - abar), ms.float32)
        self.x0_gain = ms.Tensor(std ** 2 * np.sqrt(abar) / (abar * std ** 2 + 1 - abar), ms.float32)
        self.mean = ms.Tensor(X_STAR)

    def construct(self, x, t):
        index = ops.round(t).astype(ms.int32)
        a = ops.gather(self.sqrt_abar, index, 0).reshape(-1, 1, 1, 1)
        b = ops.gather(self.sqrt_one_minus, index, 0).reshape(-1, 1, 1, 1)
        d = x - a * self.mean
        eps = ops.gather(self.eps_gain, index, 0).reshape(-1, 1, 1, 1) * d
        x0 = self.mean + ops.gather(self.x0_gain, index, 0).reshape(-1, 1, 1, 1) * d
        if self.kind == "epsilon":
            out = eps
        elif self.kind == "start_x":
            out = x0
        else:
            out = a * eps - b * x0
        if self.learned_sigma:
            return ops.concat((out, ops.tanh(x)), axis=1)
        return out


def base_process(kind="epsilon", learned_sigma=False):
    return create_diffusion(T, "linear", learn_sigma=learned_sigma, predict_xstart=kind == "start_x",
                            predict_v=kind == "velocity")


def run_chain(scheduler, model, x_T, noises=None):
    """Every state the loop passes through (x after each call), float64, and the returned x_0."""
    states = []
    result = sample(model, x_T.shape, scheduler, x_T=x_T, noises=noises,
                    callback=lambda k, x: states.append(x.asnumpy().astype(np.float64)))
    assert len(states) == scheduler.num_calls
    np.testing.assert_array_equal(result.asnumpy(), states[-1])
    return states


def max_error(got, want):
    assert len(got) == len(want)
    return max(np.abs(g - w).max() for g, w in zip(got, want))


def landing_alpha_bars(name, count):
    """ᾱ of the state after each call: the next kept step down, 1 after the last (x_0).

    PLMS's first step takes two calls (Heun's predictor and corrector), both landing on the same step.
    """
    kept = kept_steps(count)
    after = [ALPHA_BARS[kept[i]] for i in range(count - 2, -1, -1)] + [1.0]
    return [after[0]] + after if name == "plms" else after


def ode_schedulers(base, clip=True):
    """The deterministic solvers: DDIM η = 0, PLMS, DPM-Solver++ 2M and 3M, Euler without noise."""
    return {"ddim": DDIMScheduler(base, eta=0.0, clip_denoised=clip), "plms": PLMSScheduler(base, clip),
            "dpm++2m": DPMSolverScheduler(base, 2, clip), "dpm++3m": DPMSolverScheduler(base, 3, clip),
            "euler": EulerAncestralScheduler(base, eta=0.0, clip_denoised=clip)}


ODE_NAMES = ["ddim", "plms", "dpm++2m", "dpm++3m", "euler"]


# ----------------------------------------------------------------- one point: exact at every call

# Every solver with an ε-network; x_0- and v-networks (the latter with a learned Σ's channels) through
# DDIM's update (the process's) and through the shared x̂_0/ε̂ of the new solvers (DPM-Solver++).
POINT_CASES = [(name, "epsilon") for name in ODE_NAMES] + [
    (name, kind) for name in ("ddim", "dpm++2m") for kind in ("start_x", "velocity")]


@pytest.mark.parametrize("name,kind", POINT_CASES)
def test_one_point_every_state_on_the_line(name, kind):
    """x_t = √ᾱ_t x* + √(1 − ᾱ_t) e after every call, e = (x_T − √ᾱ_T x*)/√(1 − ᾱ_T); x_0 = x*."""
    learned = kind == "velocity"  # one parametrisation with a learned Σ's extra channels
    base = base_process(kind, learned_sigma=learned)
    scheduler = ode_schedulers(base)[name].set_timesteps(8)
    assert list(scheduler.timesteps) == (
        [999, 856] + kept_steps(8)[::-1][1:] if name == "plms" else kept_steps(8)[::-1])
    x_T = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    states = run_chain(scheduler, GaussianDataModel(kind, 0.0, learned), x_T)
    e = (x_T - math.sqrt(ALPHA_BARS[-1]) * MU) / math.sqrt(1 - ALPHA_BARS[-1])
    want = [math.sqrt(a) * MU + math.sqrt(1 - a) * e for a in landing_alpha_bars(name, 8)]
    assert max_error(states, want) <= ATOL_POINT[name]
    np.testing.assert_allclose(states[-1], np.broadcast_to(MU, SHAPE), atol=ATOL_POINT[name])


# -------------------------------------------- Gaussian data: each paper's equations in float64

STD = 0.5


def exact_x0(x, alpha_bar):
    """E[x_0 | x_t] for x_0 ~ N(μ, s² I)."""
    variance = alpha_bar * STD ** 2 + 1 - alpha_bar
    return MU + STD ** 2 * math.sqrt(alpha_bar) * (x - math.sqrt(alpha_bar) * MU) / variance


def exact_eps(x, alpha_bar):
    return (x - math.sqrt(alpha_bar) * exact_x0(x, alpha_bar)) / math.sqrt(1 - alpha_bar)


def ddim_transfer(x, eps, a_from, a_to):
    """DDIM's deterministic step (Song et al. 2021, Eq. 12 with σ = 0) given ε."""
    return math.sqrt(a_to) * (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from) + math.sqrt(1 - a_to) * eps


def ref_ddim(path, x):
    states = []
    for a_from, a_to in zip(path[:-1], path[1:]):
        x = ddim_transfer(x, exact_eps(x, a_from), a_from, a_to)
        states.append(x)
    return states


def ref_plms(path, x):
    """Latent Diffusion's PLMS loop: pseudo improved Euler first, then Adams–Bashforth 2, 3, 4 on ε."""
    states, old = [], []
    for a_from, a_to in zip(path[:-1], path[1:]):
        e = exact_eps(x, a_from)
        if not old:
            predicted = ddim_transfer(x, e, a_from, a_to)
            states.append(predicted)
            e_prime = (e + exact_eps(predicted, a_to)) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = ddim_transfer(x, e_prime, a_from, a_to)
        old.append(e)
        states.append(x)
    return states


def log_snr(alpha_bar):
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def ref_dpm_solver(path, x, order):
    """DPM-Solver++ multistep in λ: order 2 is the paper's Algorithm 2; order 3 fits a quadratic to the
    last three (λ, x̂_0) by least squares (np.polyfit, exact through three points) and integrates e^λ
    times its Taylor terms, except on the step before the last (order 2). The last step (to ᾱ = 1)
    returns x̂_0."""
    states, lams, x0s = [], [], []
    for i, (a_from, a_to) in enumerate(zip(path[:-1], path[1:])):
        x0 = exact_x0(x, a_from)
        lams.append(log_snr(a_from))
        x0s.append(x0)
        if a_to == 1.0:
            x = x0
        else:
            alpha_to, sigma_to, sigma_from = math.sqrt(a_to), math.sqrt(1 - a_to), math.sqrt(1 - a_from)
            h = log_snr(a_to) - lams[-1]
            if i == 0:
                x = sigma_to / sigma_from * x - alpha_to * math.expm1(-h) * x0
            elif order == 2 or i == 1 or i == len(path) - 3:
                r = (lams[-1] - lams[-2]) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0s[-2]
                x = sigma_to / sigma_from * x - alpha_to * math.expm1(-h) * d
            else:
                u = np.array(lams[-3:]) - lams[-1]
                values = np.stack([v.ravel() for v in x0s[-3:]])
                c2, c1, _ = np.polyfit(u, values, 2)  # p(u) = c2 u² + c1 u + c0
                first, second = c1.reshape(x.shape), (2 * c2).reshape(x.shape)
                x = (sigma_to / sigma_from * x - alpha_to * math.expm1(-h) * x0
                     + alpha_to * (h - 1 + math.exp(-h)) * first
                     + alpha_to * (h * h / 2 - h + 1 - math.exp(-h)) * second)
        states.append(x)
    return states


def ref_euler_ancestral(path, x, eta, noises):
    """k-diffusion's Euler ancestral on x̃ = x/√ᾱ with σ = √((1 − ᾱ)/ᾱ): d = (x̃ − x̂_0)/σ,
    x̃ ← x̃ + (σ_down − σ) d + σ_up z."""
    states = []
    for k, (a_from, a_to) in enumerate(zip(path[:-1], path[1:])):
        s_from, s_to = math.sqrt((1 - a_from) / a_from), math.sqrt((1 - a_to) / a_to)
        s_up = min(s_to, eta * math.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2))
        s_down = math.sqrt(s_to ** 2 - s_up ** 2)
        x_tilde = x / math.sqrt(a_from)
        d = (x_tilde - exact_x0(x, a_from)) / s_from
        x_tilde = x_tilde + (s_down - s_from) * d + s_up * noises[k]
        x = math.sqrt(a_to) * x_tilde
        states.append(x)
    return states


REFERENCES = {"ddim": ref_ddim, "plms": ref_plms, "euler": ref_ddim,
              "dpm++2m": lambda path, x: ref_dpm_solver(path, x, 2),
              "dpm++3m": lambda path, x: ref_dpm_solver(path, x, 3)}


def chain_path(count, alpha_bars=ALPHA_BARS):
    """ᾱ from x_T down the kept steps to 1."""
    return [alpha_bars[t] for t in kept_steps(count, len(alpha_bars))[::-1]] + [1.0]


# Gaussian chains against the float64 recursions, max |error| over every state (K = 8, v-prediction,
# states O(3)): measured 5.0e-6 (PLMS, as above), 7.1e-7 (DPM-Solver++ 2M and 3M), 6.6e-7 (Euler),
# 1.4e-6 (DDIM, as above); Euler ancestral with noise (ε-network) 1.1e-6.
ATOL_GAUSSIAN = {"ddim": 3e-6, "plms": 1e-5, "dpm++2m": 2e-6, "dpm++3m": 2e-6, "euler": 2e-6, "euler_a": 2e-6}


@pytest.mark.parametrize("name", ODE_NAMES)
def test_gaussian_every_state_follows_the_paper(name):
    base = base_process("velocity")
    scheduler = ode_schedulers(base, clip=False)[name].set_timesteps(8)  # x_0 ~ N(x*, 0.25) leaves [−1, 1]
    x_T = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    states = run_chain(scheduler, GaussianDataModel("velocity", STD), x_T)
    want = REFERENCES[name](chain_path(8), x_T.astype(np.float64))
    assert max_error(states, want) <= ATOL_GAUSSIAN[name]


def test_gaussian_euler_ancestral_with_noise():
    base = base_process("epsilon")
    scheduler = EulerAncestralScheduler(base, eta=1.0, clip_denoised=False).set_timesteps(8)
    rng = np.random.default_rng(6)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((8,) + SHAPE).astype(np.float32)
    states = run_chain(scheduler, GaussianDataModel("epsilon", STD), x_T, noises)
    want = ref_euler_ancestral(chain_path(8), x_T.astype(np.float64), 1.0, noises.astype(np.float64))
    assert max_error(states, want) <= ATOL_GAUSSIAN["euler_a"]


def exact_flow(x_T, path):
    """The probability-flow ODE's solution from x_T at ᾱ = path[0] to each later ᾱ: the standardised state
    (x_t − √ᾱ_t μ)/√v_t, v_t = ᾱ_t s² + 1 − ᾱ_t, is constant along it (the flow of a Gaussian is affine)."""
    variance = lambda a: a * STD ** 2 + 1 - a
    z = (x_T - math.sqrt(path[0]) * MU) / math.sqrt(variance(path[0]))
    return [math.sqrt(a) * MU + math.sqrt(variance(a)) * z for a in path[1:]]


# The order is measured where it is defined: on steps uniform in λ = log(√ᾱ/√(1 − ᾱ)) (DPM-Solver's
# variable), T = 961 steps with λ linear from 4 (ᾱ_0 = 0.9997) to −5 (ᾱ_960 = 4.5e-5), so that the even
# respacings to K = 21, 41, 81 steps are nested and uniform. (On DDPM's linear schedule the last step
# into t = 0 spans λ from ~1 to 4.6 whatever K is, and no solver shows its order there.)
# Error at t = 0 (before the final jump to x̂_0) against the exact flow, and the ratio as K doubles.
# Measured (MindSpore chains; the float64 recursions agree):
#   ddim / euler  1.34e-1, 6.88e-2, 3.49e-2   ratios 1.95, 1.97   (first order)
#   plms          1.19e-2, 2.78e-3, 6.72e-4   ratios 4.29, 4.13   (second order here)
#   dpm++2m       1.44e-2, 3.88e-3, 9.84e-4   ratios 3.72, 3.94   (second order)
#   dpm++3m       3.29e-3, 2.26e-4, 1.54e-5   ratios 14.5, 14.7   (at least third order: 8)
# (3M with half the p'' term, as some implementations write it, measures 5.4 and 4.5: second order.)
ORDER_BANDS = {"ddim": (1.8, 2.2), "plms": (3.6, 4.8), "dpm++2m": (3.5, 4.4),
               "dpm++3m": (6.5, 20.0)}
UNIFORM_LAMBDA_STEPS = 961


def uniform_log_snr_alpha_bars(steps=UNIFORM_LAMBDA_STEPS, top=4.0, bottom=-5.0):
    """ᾱ_t = sigmoid(2 λ_t) with λ_t linear in t from ``top`` to ``bottom``."""
    lam = top - (top - bottom) * np.arange(steps) / (steps - 1)
    return 1.0 / (1.0 + np.exp(-2.0 * lam))


@pytest.mark.parametrize("name", ["ddim", "plms", "dpm++2m", "dpm++3m"])  # Euler η = 0 is DDIM (tested below)
def test_gaussian_convergence_order(name):
    alpha_bars = uniform_log_snr_alpha_bars()
    betas = 1.0 - alpha_bars / np.append(1.0, alpha_bars[:-1])
    base = GaussianDiffusion(betas)
    np.testing.assert_allclose(base.schedule["alphas_cumprod"], alpha_bars, rtol=1e-12)
    model = GaussianDataModel("epsilon", STD, alpha_bars=alpha_bars)
    x_T = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    errors = []
    for count in (21, 41, 81):
        scheduler = ode_schedulers(base, clip=False)[name].set_timesteps(count)
        states = run_chain(scheduler, model, x_T)
        exact = exact_flow(x_T.astype(np.float64), chain_path(count, alpha_bars))
        errors.append(np.abs(states[-2] - exact[-2]).max())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    low, high = ORDER_BANDS[name]
    assert all(low <= r <= high for r in ratios), f"{name}: errors {errors}, ratios {ratios}"


# ------------------------------------------------------ DDPM and DDIM: what the samplers draw

class ToyModel(nn.Cell):
    """A v-network output that depends on x (0.8 x + 0.05) with a learned-range variance part."""

    def construct(self, x, t):
        return ops.concat((0.8 * x + 0.05 + 1e-4 * t.reshape(-1, 1, 1, 1), ops.clamp(0.5 * x, -1.0, 1.0)), axis=1)


@pytest.mark.parametrize("fused_step", ["0", pytest.param("1", marks=pytest.mark.kernel(fused))])
def test_ddpm_and_ddim_draw_what_the_samplers_draw(monkeypatch, fused_step):
    monkeypatch.setenv(fused.ENV_SWITCH, fused_step)
    base = create_diffusion(30, "cosine", learn_sigma=True, predict_v=True, rescale_timesteps=True)
    model = ToyModel()
    for sampler_class, scheduler in ((DDPMSampler, create_scheduler("ddpm", base)),
                                     (DDIMSampler, create_scheduler("ddim", base, eta=0.5))):
        scheduler.set_timesteps(10)
        kwargs = {"eta": 0.5} if sampler_class is DDIMSampler else {}
        sampler = sampler_class(base.respace("10"), model, **kwargs)
        want = sampler.sample(SHAPE, seed=11).asnumpy()
        np.testing.assert_array_equal(sample(model, SHAPE, scheduler, seed=11).asnumpy(), want)
        assert scheduler.make_step().fused == (fused_step == "1")
    full = create_scheduler("ddpm", base).set_timesteps(30)
    assert full.process is base  # all T steps: the base process itself
    np.testing.assert_array_equal(sample(model, SHAPE, full, seed=2).asnumpy(),
                                  DDPMSampler(base, model).sample(SHAPE, seed=2).asnumpy())


def test_euler_ancestral_is_ddim_eta_one():
    """√ᾱ_{t−1} σ_up equals DDIM's σ_t at η = 1, and √ᾱ_{t−1} σ_down its √(1 − ᾱ_{t−1} − σ_t²): the same draws
    (and at η = 0 Euler's method in σ is DDIM's deterministic step, as the Gaussian tests above show)."""
    base = base_process("epsilon")
    model = GaussianDataModel("epsilon", STD)
    euler = create_scheduler("euler_a", base).set_timesteps(6)
    ddim = create_scheduler("ddim", base, eta=1.0).set_timesteps(6)
    # measured max |difference| 2.4e-6, at the step into t = 0 where DDIM's float32 √(1 − ᾱ_{t−1} − σ_t²)
    # loses digits (see ATOL_POINT)
    np.testing.assert_allclose(sample(model, SHAPE, euler, seed=5).asnumpy(),
                               sample(model, SHAPE, ddim, seed=5).asnumpy(), atol=5e-6)


# ------------------------------------------------------------------------- classifier guidance

class LinearClassifier(nn.Cell):
    """logits = W flatten(x) + b + 0.001 t c: log p(y | x) is analytic in x."""

    def __init__(self, weight, bias, time_weight):
        super().__init__()
        self.weight = ms.Tensor(weight, ms.float32)
        self.bias = ms.Tensor(bias, ms.float32)
        self.time_weight = ms.Tensor(time_weight, ms.float32)

    def construct(self, x, t):
        return (ops.matmul(x.reshape(x.shape[0], -1), self.weight.T) + self.bias
                + 0.001 * t.astype(ms.float32)[:, None] * self.time_weight)


def classifier_and_gradient(scale, x, t, y):
    """The classifier and s ∇_x log softmax(W x + b + 0.001 t c)_y = s (W_y − Σ_k p_k W_k), float64."""
    rng = np.random.default_rng(8)
    classes = 5
    weight = rng.normal(0, 0.3, (classes, x[0].size)).astype(np.float32)
    bias = rng.normal(0, 1, classes).astype(np.float32)
    time_weight = np.linspace(-1, 1, classes).astype(np.float32)
    logits = x.reshape(len(x), -1).astype(np.float64) @ weight.T.astype(np.float64) + bias + \
        0.001 * t[:, None] * time_weight
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    grad = scale * (weight[y] - probs @ weight).reshape(x.shape)
    return ClassifierGuidance(LinearClassifier(weight, bias, time_weight), scale), grad


# A short process for the guidance checks: β = 0.02 for T = 50 steps, ᾱ_t = 0.98^(t+1), so the first call
# (t = 49, ᾱ = 0.36) is at a moderate noise level, where the formulas are well-conditioned in float32.
GUIDE_T = 50
GUIDE_ALPHA_BARS = 0.98 ** np.arange(1, GUIDE_T + 1)
GUIDE_KEPT = [0, 16, 33, 49]  # even respacing of 50 steps to 4: round(i · 49/3)


def guide_process(kind):
    return GaussianDiffusion(np.full(GUIDE_T, 0.02), model_mean_type=kind, model_var_type="fixed_large")


class LinearEps(nn.Cell):
    """ε̂ = 0.3 x_t, given as ε, x_0 = (x − √(1 − ᾱ) ε̂)/√ᾱ or v = √ᾱ ε̂ − √(1 − ᾱ) x̂_0."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.sqrt_abar = ms.Tensor(np.sqrt(GUIDE_ALPHA_BARS), ms.float32)

    def construct(self, x, t):
        a = ops.gather(self.sqrt_abar, ops.round(t).astype(ms.int32), 0).reshape(-1, 1, 1, 1)
        b = ops.sqrt(1 - a * a)
        eps = 0.3 * x
        if self.kind == "epsilon":
            return eps
        x0 = (x - b * eps) / a
        return x0 if self.kind == "start_x" else a * eps - b * x0


def first_call(scheduler, model, x_T, cond_fn=None, y=None, noises=None):
    """The state after the first call (k = 0, at t = T − 1 of the respaced chain)."""
    states = []
    sample(model, x_T.shape, scheduler, x_T=x_T, noises=noises, cond_fn=cond_fn,
           cond_kwargs=None if cond_fn is None else {"y": y},
           callback=lambda k, x: states.append(x.asnumpy().astype(np.float64)))
    return states[0]


GUIDE_X = np.random.default_rng(9).uniform(-1, 1, SHAPE).astype(np.float32)
GUIDE_Y = np.array([4, 1], np.int32)
GUIDE_SCALE = 3.0
# Guided states (O(3)) against NumPy: measured max |error| 8.9e-7 (mean form), 5.8e-7 to 6.8e-7 (score
# forms, clipped or not), mostly the float32 classifier gradient (W_y − Σ p_k W_k) scaled by Σ or σ/√ᾱ.
ATOL_GUIDE = 1e-6


def guide_setup(x_T=GUIDE_X):
    """(cond_fn, s ∇ log p(y | x_T) in float64, ᾱ_t and ᾱ_{t−1} of the first call, x_T in float64)."""
    cond_fn, grad = classifier_and_gradient(GUIDE_SCALE, x_T, np.full(2, float(GUIDE_T - 1)), GUIDE_Y)
    return cond_fn, grad, GUIDE_ALPHA_BARS[GUIDE_KEPT[-1]], GUIDE_ALPHA_BARS[GUIDE_KEPT[-2]], \
        x_T.astype(np.float64)


def test_ddpm_condition_mean():
    """x_{t−1} = μ_θ + Σ_θ s ∇ log p(y | x_t) + σ z: with z = 0 the guided mean (ADM Alg. 1), Σ_θ = β_t."""
    scheduler = create_scheduler("ddpm", guide_process("epsilon"), clip_denoised=False).set_timesteps(4)
    cond_fn, grad, a, a_prev, x = guide_setup()
    guided = first_call(scheduler, LinearEps("epsilon"), GUIDE_X, cond_fn, GUIDE_Y,
                        np.zeros((4,) + SHAPE, np.float32))
    beta = 1 - a / a_prev
    x0 = (x - math.sqrt(1 - a) * 0.3 * x) / math.sqrt(a)
    mean = (beta * math.sqrt(a_prev) * x0 + (1 - a_prev) * math.sqrt(1 - beta) * x) / (1 - a)
    np.testing.assert_allclose(guided, mean + beta * grad, atol=ATOL_GUIDE)
    assert np.abs(beta * grad).max() > 1e4 * ATOL_GUIDE  # the shift is far above the tolerance


# The score form for DDIM in each parametrisation (its update is the process's, fed the network output
# that predicts the guided ε'), and for the new solvers, which share one (x̂_0, ε̂).
SCORE_CASES = [("ddim", kind) for kind in ("epsilon", "start_x", "velocity")] + [
    (name, "epsilon") for name in ("dpm++2m", "euler_a", "plms")]


@pytest.mark.parametrize("name,kind", SCORE_CASES)
def test_condition_score(name, kind):
    """ε' = ε̂ − √(1 − ᾱ_t) s ∇ log p(y | x_t), x̂_0' = (x_t − √(1 − ᾱ_t) ε')/√ᾱ_t (ADM Alg. 2); the first
    call of each ODE solver is then DDIM's step √ᾱ_{t−1} x̂_0' + √(1 − ᾱ_{t−1}) ε' (DPM-Solver++'s first
    order step and Euler's are the same step; PLMS's first call is the predictor)."""
    kwargs = {"eta": 0.0} if name in ("ddim", "euler_a") else {}
    scheduler = create_scheduler(name, guide_process(kind), clip_denoised=False, **kwargs).set_timesteps(4)
    cond_fn, grad, a, a_prev, x = guide_setup()
    guided = first_call(scheduler, LinearEps(kind), GUIDE_X, cond_fn, GUIDE_Y)

    def ddim_step(eps):
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    np.testing.assert_allclose(guided, ddim_step(0.3 * x - math.sqrt(1 - a) * grad), atol=ATOL_GUIDE)
    assert np.abs(ddim_step(0.3 * x) - guided).max() > 1e4 * ATOL_GUIDE  # unguided differs visibly


def test_guided_ddim_clips_before_the_gradient_only():
    """With clipping, x̂_0 is clipped before the gradient is folded into ε̂ and not after (as ADM)."""
    scheduler = create_scheduler("ddim", guide_process("start_x")).set_timesteps(4)
    x_T = 3 * GUIDE_X
    cond_fn, grad, a, a_prev, x = guide_setup(x_T)
    guided = first_call(scheduler, LinearEps("start_x"), x_T, cond_fn, GUIDE_Y)
    x0 = np.clip((x - math.sqrt(1 - a) * 0.3 * x) / math.sqrt(a), -1, 1)
    assert np.abs((x - math.sqrt(1 - a) * 0.3 * x) / math.sqrt(a)).max() > 1.5  # the clip matters
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a) - math.sqrt(1 - a) * grad
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    assert np.abs(x0).max() > 1.5  # the guided x̂_0 leaves [−1, 1]: a second clip would show
    np.testing.assert_allclose(guided, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, atol=ATOL_GUIDE)


# ---------------------------------------------------------------------------- the loop and its errors

def test_one_graph_per_model_and_scheduler(monkeypatch):
    compiles = record_compiles(monkeypatch)
    base = base_process("epsilon")
    model = GaussianDataModel("epsilon")
    scheduler = create_scheduler("dpm++2m", base).set_timesteps(6)
    a, b = (sample(model, SHAPE, scheduler, seed=s).asnumpy() for s in (1, 2))
    assert not np.array_equal(a, b)
    assert compiles == ["SamplingGraph"], compiles  # one graph for 2 × 6 calls


def test_bad_requests_are_refused():
    base = base_process("epsilon")
    model = GaussianDataModel("epsilon")
    with pytest.raises(ValueError, match="not one respaced"):
        create_scheduler("ddim", base.respace("50"))
    with pytest.raises(ValueError, match="integer in 2..1000"):
        create_scheduler("ddim", base).set_timesteps(1001)
    with pytest.raises(ValueError, match="integer in 2..1000"):
        create_scheduler("ddim", base).set_timesteps(1)
    with pytest.raises(ValueError, match="unknown spacing"):
        create_scheduler("ddim", base).set_timesteps(10, spacing="karras")
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        create_scheduler("heun", base)
    with pytest.raises(ValueError, match="has no eta"):
        create_scheduler("plms", base, eta=0.5)
    with pytest.raises(ValueError, match="eta must lie in"):
        create_scheduler("ddim", base, eta=1.5)
    with pytest.raises(ValueError, match="set_timesteps"):
        sample(model, SHAPE, create_scheduler("ddim", base))
    scheduler = create_scheduler("ddpm", base).set_timesteps(5)
    with pytest.raises(ValueError, match="one array per network call"):
        sample(model, SHAPE, scheduler, noises=np.zeros((4,) + SHAPE, np.float32))
    cond_fn, _ = classifier_and_gradient(1.0, GUIDE_X, np.full(2, 999.0), GUIDE_Y)
    with pytest.raises(ValueError, match=r"needs \['y'\] in cond_kwargs"):
        sample(model, SHAPE, scheduler, cond_fn=cond_fn)
    assert create_scheduler("ddim", base).set_timesteps(10, spacing="ddim").timesteps[0] == 900


class LabelledModel(nn.Cell):
    """A class-conditional stand-in: ε̂ = 0.5 x + 0.01 y."""

    def construct(self, x, t, y):
        return 0.5 * x + 0.01 * y.astype(ms.float32).reshape(-1, 1, 1, 1)


def test_image_generator_runs_the_schedulers():
    """generate.ImageGenerator draws with any scheduler name what sample() draws (same seed per batch), and
    says what to do with a process respaced by diffusion.timestep_respacing instead of crashing."""
    from mind_diffusion.generate import SAMPLER_NAMES, ImageGenerator
    assert SAMPLER_NAMES == ("ddpm", "ddim", "plms", "dpm++2m", "dpm++3m", "euler_a")
    base = create_diffusion(100, "cosine")
    model = LabelledModel()
    generator = ImageGenerator(model, base, (3, 4, 4), num_classes=3)
    images = generator.sample(3, labels=[2, 0], sampler="dpm++2m", steps=6, batch_size=2, seed=4)
    scheduler = create_scheduler("dpm++2m", base).set_timesteps(6)
    for start, labels in ((0, [2, 0]), (2, [2, 2])):  # the last batch is padded with the last label
        want = sample(model, (2, 3, 4, 4), scheduler, seed=4 * 1_000_003 + start,
                      model_kwargs={"y": ms.Tensor(np.array(labels, np.int32))}).asnumpy()
        np.testing.assert_array_equal(images[start:start + 2], want[:len(images[start:start + 2])])
    respaced = ImageGenerator(model, create_diffusion(100, "cosine", timestep_respacing="50"), (3, 4, 4),
                              num_classes=3)
    with pytest.raises(ValueError, match="already respaced to 50 of its 100 steps"):
        respaced.sample(2, labels=[0], sampler="ddim", steps=10)
    with pytest.raises(ValueError, match="'plms' respaces the trained process itself"):
        respaced.sample(2, labels=[0], sampler="plms", steps=50)


def test_run_infer_offers_every_scheduler():
    from mind_diffusion.cli.infer import build_parser
    for name in ("ddpm", "ddim", "plms", "dpm++2m", "dpm++3m", "euler_a"):
        assert build_parser().parse_args(["a red circle", "--sampler", name]).sampler == name


class TimeVaryingEps(nn.Cell):
    """ε̂ = x_t · (1 + t/T): wrong on purpose and different at every t, so PLMS's extrapolated ε' is off."""

    def construct(self, x, t):
        return x * (1.0 + t.astype(ms.float32).reshape(-1, 1, 1, 1) / T)


@pytest.mark.parametrize("clip", [True, False])
def test_plms_clips_its_extrapolated_x0_under_the_cosine_schedule(clip):
    """At t = 999 of the cosine schedule √(1 − ᾱ)/√ᾱ = 2.0e4 multiplies the error of ε'; the combined
    x̂_0' is clipped like every x̂_0 when clip_denoised is on, and unclipped it blows the state up."""
    base = create_diffusion(steps=T, noise_schedule="cosine")
    scheduler = PLMSScheduler(base, clip).set_timesteps(9)
    states = []
    sample(TimeVaryingEps(), SHAPE, scheduler, seed=0, callback=lambda k, x: states.append(np.abs(x.asnumpy()).max()))
    corrector = states[1]  # the Heun corrector's state, the first built from an extrapolated x̂_0'
    alpha_bar = scheduler.process.schedule["alphas_cumprod_prev"][scheduler.call_t[1] + 1]
    if clip:
        # |x| ≤ √ᾱ · 1 + √(1 − ᾱ) |ε'| with |ε'| ≤ (1 + 1) · |x_T| (5.5 for this seed)
        assert corrector <= np.sqrt(alpha_bar) + np.sqrt(1 - alpha_bar) * 2 * 5.5
    else:
        assert corrector > 100.0
