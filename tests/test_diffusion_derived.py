"""The diffusion core on cases the fixtures don't cover, against values derived here.

Closed forms (linear schedule, a one-point data set whose optimal denoiser is
known), Python re-computations written from the papers' equations, and small
brute-force cases.
"""
import math
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from graph_util import run
from tests.helpers.compile_count import record_compiles
from mind_diffusion import schedules
from mind_diffusion.evaluation.bpd import calc_bpd_loop
from mind_diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from mind_diffusion.sampling import DDIMSampler, DDPMSampler, create_sampler, fused


# ----------------------------------------------------------------- schedules

@pytest.mark.parametrize("steps", [1000, 4000, 50])
def test_linear_schedule_closed_form(steps):
    betas = schedules.linear_beta_schedule(steps)
    scale = 1000 / steps
    assert betas.shape == (steps,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4 * scale, rel=1e-15)
    assert betas[-1] == pytest.approx(0.02 * scale, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) * scale / (steps - 1), rtol=1e-9)


def test_cosine_schedule_follows_alpha_bar():
    """ᾱ_t = f(t + 1)/f(0) with f(t) = cos²((t/T + s)/(1 + s) · π/2) wherever β is not clipped."""
    steps = 100
    diffusion = create_diffusion(steps, "cosine")
    unclipped = diffusion.schedule["betas"] < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last β hits the clip
    np.testing.assert_allclose(diffusion.schedule["alphas_cumprod"][:-1], cosine_alpha_bars(steps, range(steps - 1)),
                               rtol=1e-12)


@pytest.mark.parametrize("betas", [np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2,  # latent diffusion's
                                   schedules.linear_beta_schedule(200)])
def test_zero_terminal_snr_rescale_by_its_definition(betas):
    """Lin et al. 2024, Alg. 1: √ᾱ' is the affine map of √ᾱ that keeps √ᾱ_1 and sends √ᾱ_T to 0 (here
    2⁻²⁴ for ᾱ'_T, which keeps β'_T below 1)."""
    rescaled = schedules.rescale_zero_terminal_snr(betas)
    got = np.cumprod(1.0 - rescaled)
    root = np.sqrt(np.cumprod(1.0 - betas))
    want = ((root - root[-1]) / (root[0] - root[-1]) * root[0]) ** 2
    np.testing.assert_allclose(got[:-1], want[:-1], rtol=1e-12, atol=0)
    assert got[-1] == pytest.approx(2.0 ** -24, rel=1e-12)
    assert got[0] == pytest.approx(1.0 - betas[0], rel=1e-15)
    assert np.all((rescaled > 0) & (rescaled < 1)) and np.all(np.diff(got) < 0)
    assert got[-1] / (1 - got[-1]) < 1e-7 < (1 - betas).prod() / (1 - (1 - betas).prod())  # SNR_T: ~0, was not


def test_zero_terminal_snr_needs_room_at_the_end():
    with pytest.raises(ValueError, match=r"ᾱ'_\(T-1\) = .* is not above ᾱ'_T"):
        schedules.rescale_zero_terminal_snr(np.array([0.1, 0.5, 1e-12]))


def test_schedule_arrays_from_definitions():
    """Every constant of a linear T=25 process, recomputed from DDPM Eqs. 4, 6, 7 in Python floats."""
    betas = schedules.linear_beta_schedule(25)
    arrays = GaussianDiffusion(betas).schedule
    abar, prev = 1.0, []
    for t, beta in enumerate(betas):
        prev.append(abar)
        abar *= 1 - beta
        assert arrays["alphas_cumprod"][t] == pytest.approx(abar, rel=1e-14)
        assert arrays["alphas_cumprod_prev"][t] == pytest.approx(prev[t], rel=1e-14)
        posterior_var = beta * (1 - prev[t]) / (1 - abar)
        assert arrays["posterior_variance"][t] == pytest.approx(posterior_var, rel=1e-13)
        assert arrays["posterior_mean_coef1"][t] == pytest.approx(beta * math.sqrt(prev[t]) / (1 - abar), rel=1e-13)
        assert arrays["posterior_mean_coef2"][t] == pytest.approx(
            (1 - prev[t]) * math.sqrt(1 - beta) / (1 - abar), rel=1e-13)
    assert arrays["posterior_variance"][0] == 0.0
    assert arrays["posterior_log_variance_clipped"][0] == pytest.approx(math.log(arrays["posterior_variance"][1]))


@pytest.mark.parametrize("bad", [[], [0.0, 0.1], [0.1, 1.0], [[0.1, 0.2]]])
def test_user_betas_are_validated(bad):
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion(np.array(bad, dtype=np.float64))


def test_user_betas_and_unknown_names():
    betas = np.full(20, 0.05)
    np.testing.assert_array_equal(create_diffusion(betas=betas).schedule["betas"], betas)
    with pytest.raises(ValueError, match="noise schedule 'quadratic'"):
        create_diffusion(10, "quadratic")
    with pytest.raises(ValueError, match="'hinge' is not one of"):
        create_diffusion(40, "linear", loss="hinge")
    with pytest.raises(ValueError, match="more than 20 steps"):
        create_diffusion(10, "linear")


# ----------------------------------------------------------------- respacing

def test_space_timesteps_sections_by_hand():
    # T = 100 in three sections of 34, 33, 33 steps; counts 10, 15, 20 spread evenly within each,
    # the fractional index accumulated step by step (improved DDPM's tie-breaking).
    expected = []
    for start, length, count in [(0, 34, 10), (34, 33, 15), (67, 33, 20)]:
        stride, position = (length - 1) / (count - 1), 0.0
        for _ in range(count):
            expected.append(start + round(position))
            position += stride
    assert schedules.space_timesteps(100, "10,15,20") == expected
    # A half-way tie: 7·(99/14) accumulates to 49.49999…, which rounds down to 49 (7 · 99/14 = 49.5 → 50 would not).
    assert 49 in schedules.space_timesteps(100, "15") and 50 not in schedules.space_timesteps(100, "15")
    assert schedules.space_timesteps(100, [10, 15, 20]) == expected
    assert schedules.space_timesteps(10, "10") == list(range(10))
    assert schedules.space_timesteps(10, "1") == [0]
    assert schedules.space_timesteps(1000, "ddim4") == [0, 250, 500, 750]


@pytest.mark.parametrize("spec,message", [("ddim7", "no integer stride"), ("11", "cannot take 11"),
                                          ("fifty", "expected counts"), ("0", "positive")])
def test_space_timesteps_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        schedules.space_timesteps(10, spec)


@pytest.mark.parametrize("spec", ["25", "ddim10", "5,10"])
def test_respacing_keeps_marginals(spec):
    """q(x_t | x_0) is unchanged at every kept step: ᾱ'_k = ᾱ_{kept[k]}."""
    base = create_diffusion(100, "linear", learn_sigma=True)
    respaced = base.respace(spec)
    kept = schedules.space_timesteps(100, spec)
    np.testing.assert_array_equal(respaced.schedule["timestep_map"], kept)
    np.testing.assert_allclose(respaced.schedule["alphas_cumprod"], base.schedule["alphas_cumprod"][kept],
                               rtol=1e-12)
    assert respaced.num_timesteps == len(kept) and respaced.original_num_steps == 100
    assert respaced.model_var_type == base.model_var_type
    with pytest.raises(ValueError, match="already respaced"):
        respaced.respace("5")


def test_model_timesteps_mapping():
    diffusion = create_diffusion(200, "linear", rescale_timesteps=True, timestep_respacing="ddim4")
    t = np.arange(4, dtype=np.int32)
    np.testing.assert_allclose(run(diffusion, "model_timesteps", t), np.array([0, 50, 100, 150]) * 1000 / 200)
    plain = create_diffusion(200, "linear", timestep_respacing="ddim4")
    np.testing.assert_array_equal(run(plain, "model_timesteps", t), [0, 50, 100, 150])


# -------------------------------------------------------- losses by hand

def test_hybrid_loss_by_hand_and_stop_gradient():
    """L_hybrid = L_simple + (T/1000) L_vlb, the VB term's gradient reaching only the variance channels."""
    rng = np.random.default_rng(0)
    diffusion = create_diffusion(40, "linear", learn_sigma=True, loss="rescaled_mse")
    x_start = rng.uniform(-1, 1, (3, 2, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x_start.shape).astype(np.float32)
    output = rng.uniform(-1, 1, (3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 7, 39], np.int32)
    x_t = run(diffusion, "q_sample", x_start, t, noise)
    loss, mse, vb = run(diffusion, "training_losses_from_output", output, x_start, x_t, t, noise)
    np.testing.assert_allclose(mse, ((noise - output[:, :2]) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    vb_unscaled, _ = run(diffusion, "vb_terms_bpd_from_output", output, x_start, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(vb, vb_unscaled * 40 / 1000, rtol=1e-6)
    np.testing.assert_allclose(loss, mse + vb, rtol=1e-6)

    class VbOnly(nn.Cell):
        def __init__(self):
            super().__init__()
            self.diffusion = diffusion

        def construct(self, out, x_start, x_t, t, noise):
            return self.diffusion.training_losses_from_output(out, x_start, x_t, t, noise)[2].sum()

    grad = ms.grad(VbOnly(), grad_position=0)(*[ms.Tensor(a) for a in (output, x_start, x_t, t, noise)]).asnumpy()
    assert np.all(grad[:, :2] == 0), "the VB term must not train the mean (stop-gradient)"
    assert np.abs(grad[:, 2:]).sum() > 0


def test_kl_term_closed_form_for_fixed_variance():
    """With Σ = β̃_t and an x_0-predicting model, L_{t−1} = ‖μ̃(x_0) − μ̃(x̂_0)‖² / (2 β̃_t), in bits."""
    rng = np.random.default_rng(1)
    diffusion = create_diffusion(30, "linear", sigma_small=True, predict_xstart=True, loss="kl")
    x_start = rng.uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
    pred = np.clip(x_start + 0.1 * rng.standard_normal(x_start.shape), -1, 1).astype(np.float32)
    x_t = rng.standard_normal(x_start.shape).astype(np.float32)
    t = np.array([5, 29], np.int32)
    vb, _ = run(diffusion, "vb_terms_bpd_from_output", pred, x_start, x_t, t, clip_denoised=False)
    s = diffusion.schedule
    coef1 = s["posterior_mean_coef1"][t].reshape(-1, 1, 1, 1)
    expected = (coef1 * (x_start - pred)) ** 2 / (2 * s["posterior_variance"][t].reshape(-1, 1, 1, 1))
    np.testing.assert_allclose(vb, expected.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-4)


def test_learned_variance_and_unscaled_losses_by_hand():
    """LEARNED: the network's v is log σ² itself; kl is the bound in bits/dim (no ×T); mse with a learned Σ
    adds the VB term unscaled; previous_x trains μ against the true posterior mean."""
    rng = np.random.default_rng(6)
    x_start = rng.uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x_start.shape).astype(np.float32)
    output = rng.uniform(-1, 1, (2, 6, 4, 4)).astype(np.float32)
    t = np.array([0, 17], np.int32)
    betas = schedules.linear_beta_schedule(30)

    learned = GaussianDiffusion(betas, model_var_type="learned", loss_type="kl")
    x_t = run(learned, "q_sample", x_start, t, noise)
    _, variance, log_variance, _ = run(learned, "p_mean_variance_from_output", output, x_t, t, clip_denoised=False)
    np.testing.assert_array_equal(log_variance, output[:, 3:])
    np.testing.assert_allclose(variance, np.exp(output[:, 3:]), rtol=1e-5)
    loss, mse, vb = run(learned, "training_losses_from_output", output, x_start, x_t, t, noise)
    term, _ = run(learned, "vb_terms_bpd_from_output", output, x_start, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(loss, term, rtol=1e-6)
    np.testing.assert_array_equal(mse, 0.0)

    mse_learned = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="mse")
    loss, mse, vb = run(mse_learned, "training_losses_from_output", output, x_start, x_t, t, noise)
    term, _ = run(mse_learned, "vb_terms_bpd_from_output", output, x_start, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(vb, term, rtol=1e-6)  # not scaled by T/1000

    previous = GaussianDiffusion(betas, model_mean_type="previous_x", loss_type="mse")
    loss, mse, _ = run(previous, "training_losses_from_output", output[:, :3], x_start, x_t, t, noise)
    s = previous.schedule
    posterior_mean = (s["posterior_mean_coef1"][t].reshape(-1, 1, 1, 1) * x_start
                      + s["posterior_mean_coef2"][t].reshape(-1, 1, 1, 1) * x_t)
    np.testing.assert_allclose(mse, ((posterior_mean - output[:, :3]) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_velocity_prediction_by_hand():
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022): the target, x̂_0 from v̂, and the loss, which
    splits into the ε error plus the x_0 error (x̂_0, ε̂ both read off v̂ at the same x_t)."""
    rng = np.random.default_rng(8)
    diffusion = create_diffusion(60, "cosine", learn_sigma=True, predict_v=True, loss="rescaled_mse")
    x_start = rng.uniform(-1, 1, (3, 2, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x_start.shape).astype(np.float32)
    t = np.array([0, 31, 59], np.int32)
    abar = diffusion.schedule["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
    a, b = np.sqrt(abar), np.sqrt(1 - abar)
    v_true = a * noise - b * x_start
    np.testing.assert_allclose(run(diffusion, "velocity", x_start, t, noise), v_true, rtol=1e-5, atol=1e-6)

    x_t = run(diffusion, "q_sample", x_start, t, noise)
    error = 0.1 * rng.standard_normal(x_start.shape)
    var_part = rng.uniform(-1, 1, x_start.shape)
    output = np.concatenate([v_true + error, var_part], axis=1).astype(np.float32)
    _, _, _, pred = run(diffusion, "p_mean_variance_from_output", output, x_t, t, clip_denoised=False)
    v_hat = output[:, :2].astype(np.float64)
    np.testing.assert_allclose(pred, a * x_t - b * v_hat, rtol=1e-5, atol=1e-6)
    exact = np.concatenate([v_true, var_part], axis=1).astype(np.float32)
    _, _, _, pred_exact = run(diffusion, "p_mean_variance_from_output", exact, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(pred_exact, x_start, atol=2e-6)

    loss, mse, vb = run(diffusion, "training_losses_from_output", output, x_start, x_t, t, noise)
    np.testing.assert_allclose(mse, (error ** 2).mean(axis=(1, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(loss, mse + vb, rtol=1e-6)
    # The same network read as an ε-predictor (ε̂ = √(1 − ᾱ) x_t + √ᾱ v̂ at this x_t) defines the same
    # p_θ: the same x̂_0 and the same bound term; and the v error is the ε error plus the x_0 error.
    # Only t = 0 and 31: at t = 59 (ᾱ ≈ 7e-7) the ε path's x̂_0 = (x_t − √(1 − ᾱ) ε̂)/√ᾱ cancels
    # catastrophically in float32 (errors ~3e-4) — the reason to predict v there.
    keep = slice(0, 2)
    eps_hat = b * x_t + a * v_hat
    as_eps = create_diffusion(60, "cosine", learn_sigma=True, loss="rescaled_mse")
    eps_output = np.concatenate([eps_hat, var_part], axis=1).astype(np.float32)[keep]
    x_t, t, x_start, noise = x_t[keep], t[keep], x_start[keep], noise[keep]
    _, _, _, pred_eps = run(as_eps, "p_mean_variance_from_output", eps_output, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(pred[keep], pred_eps, rtol=1e-5, atol=1e-5)
    _, eps_mse, eps_vb = run(as_eps, "training_losses_from_output", eps_output, x_start, x_t, t, noise)
    np.testing.assert_allclose(vb[keep], eps_vb, rtol=1e-4)
    x0_error = ((x_start - pred_eps) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(mse[keep], eps_mse + x0_error, rtol=1e-4)
    with pytest.raises(ValueError, match="predict_xstart and predict_v"):
        create_diffusion(10, "linear", predict_xstart=True, predict_v=True)


def test_one_step_process_is_refused():
    with pytest.raises(ValueError, match="at least 2 steps"):
        create_diffusion(100, "cosine", timestep_respacing="1")


def test_previous_x_mean_type_inverts_posterior():
    """For μ-prediction, x̂_0 recovered from the true posterior mean is x_0 itself."""
    rng = np.random.default_rng(2)
    diffusion = GaussianDiffusion(schedules.linear_beta_schedule(30), model_mean_type="previous_x")
    x_start = rng.uniform(-0.9, 0.9, (2, 3, 4, 4)).astype(np.float32)
    x_t = rng.standard_normal(x_start.shape).astype(np.float32)
    t = np.array([3, 29], np.int32)
    true_mean = run(diffusion, "q_posterior_mean_variance", x_start, x_t, t)[0]
    mean, _, _, pred = run(diffusion, "p_mean_variance_from_output", true_mean, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(pred, x_start, atol=1e-4)
    np.testing.assert_array_equal(mean, true_mean)


# ------------------------------- closed-form data sets: one point (Dirac) and a Gaussian

X_STAR = (np.random.default_rng(3).integers(0, 256, (1, 3, 4, 4)) / 127.5 - 1).astype(np.float32)
# Sampled states against the float64 references below, max |error| over every state of every chain here
# (states of size ≤ 4, where a float32 ulp is ≤ 4.8e-7): measured 7.5e-7 where the step is float32
# arithmetic, 3.3e-6 for the pure-ops DDPM step, whose σ_t = exp(½ log σ_t²) takes MindSpore's float32
# CPU exp (up to ~1e-4 relative; see tests/test_fused_step.py).
ATOL = 2e-6
ATOL_MINDSPORE_EXP = 1e-5
# The sampling step in pure ops and in C++ (the fused step); the C++ case needs its kernel.
FUSED = ["0", pytest.param("1", marks=pytest.mark.kernel(fused))]


def cosine_alpha_bars(steps, kept):
    """ᾱ at the original steps ``kept`` of a T = ``steps`` cosine schedule: f(t + 1)/f(0) with
    f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008 (improved DDPM, Eq. 17), where β is not clipped."""
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([f(t + 1) / f(0) for t in kept])


def linear_alpha_bars(steps):
    """ᾱ_t = Π (1 − β_s) with DDPM's linear β from 1e-4 to 0.02, scaled by 1000/T."""
    scale = 1000 / steps
    betas = [scale * (1e-4 + (0.02 - 1e-4) * t / (steps - 1)) for t in range(steps)]
    return np.cumprod(1 - np.array(betas))


class GaussianDataDenoiser(nn.Cell):
    """The exact ε-predictor for data x_0 ~ N(μ, s² I): ε̂(x_t, t) = E[ε | x_t] = √(1 − ᾱ_t) (x_t − √ᾱ_t μ) / v_t
    with v_t = ᾱ_t s² + 1 − ᾱ_t the variance of x_t. s = 0 is the one-point data set x_0 = μ = x*, where
    ε̂ = (x_t − √ᾱ_t x*) / √(1 − ᾱ_t).

    It looks ᾱ up by the *original* step it receives (after the respacing map
    and the ×1000/T rescale), so a wrong timestep map gives wrong samples.
    """

    def __init__(self, alphas_cumprod, time_scale, std=0.0):
        super().__init__()
        abar = np.asarray(alphas_cumprod, np.float64)
        self.sqrt_abar = ms.Tensor(np.sqrt(abar), ms.float32)
        self.gain = ms.Tensor(np.sqrt(1 - abar) / (abar * std ** 2 + 1 - abar), ms.float32)
        self.mean = ms.Tensor(X_STAR)
        self.time_scale = time_scale

    def construct(self, x, t):
        index = ops.round(t / self.time_scale).astype(ms.int32)
        a = ops.gather(self.sqrt_abar, index, 0).reshape(-1, 1, 1, 1)
        gain = ops.gather(self.gain, index, 0).reshape(-1, 1, 1, 1)
        return gain * (x - a * self.mean)


def dirac_denoiser(alphas_cumprod, time_scale):
    """The exact ε-predictor for the one-point data set x*."""
    return GaussianDataDenoiser(alphas_cumprod, time_scale, std=0.0)


class DiracVelocity(nn.Cell):
    """The exact v-predictor for data = the single image x*: v = √ᾱ_t ε − √(1 − ᾱ_t) x*, with ε read off x_t."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.sqrt_abar = ms.Tensor(np.sqrt(alphas_cumprod), ms.float32)
        self.sqrt_one_minus_abar = ms.Tensor(np.sqrt(1 - alphas_cumprod), ms.float32)
        self.x_star = ms.Tensor(X_STAR)

    def construct(self, x, t):
        index = ops.round(t).astype(ms.int32)
        a = ops.gather(self.sqrt_abar, index, 0).reshape(-1, 1, 1, 1)
        b = ops.gather(self.sqrt_one_minus_abar, index, 0).reshape(-1, 1, 1, 1)
        return a * (x - a * self.x_star) / b - b * self.x_star


class ZeroModel(nn.Cell):
    def construct(self, x, t):
        return ops.zeros_like(x)


# What the samplers must do on these data sets, in float64 from the papers' equations. ᾱ is the
# chain's own (respaced) ᾱ_0 … ᾱ_{n−1}; a step at t goes to x_{t−1}, with ᾱ_{−1} = 1 (x_{−1} is x_0).
X_STAR_64 = X_STAR.astype(np.float64)  # (a float32 array times a Python float stays float32)

def previous(alpha_bars):
    """ᾱ_{t−1} for t = 0 … n−1."""
    return np.append(1.0, alpha_bars[:-1])


def x0_given_xt(x, alpha_bar, std):
    """E[x_0 | x_t] for x_0 ~ N(x*, s² I): x* + s² √ᾱ_t (x_t − √ᾱ_t x*) / v_t (x* itself when s = 0)."""
    return X_STAR_64 + std ** 2 * math.sqrt(alpha_bar) * (x - math.sqrt(alpha_bar) * X_STAR_64) / (
        alpha_bar * std ** 2 + 1 - alpha_bar)


def ddim_chain(alpha_bars, x_T, std, eta, noises):
    """DDIM (Song et al. 2021, Eq. 12) with the exact x̂_0: the state after each step, t = n−1 … 0.

    x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z_t, ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t),
    σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}) (Eq. 16).
    """
    prev, x, states = previous(alpha_bars), np.asarray(x_T, np.float64), []
    for k, t in enumerate(reversed(range(len(alpha_bars)))):
        a, a_prev = alpha_bars[t], prev[t]
        x0 = x0_given_xt(x, a, std)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noises[k]
        states.append(x)
    return states


def ddim_eta0_closed_form(alpha_bars, x_T, std):
    """DDIM η = 0 with the exact denoiser, in closed form: the state after each step, t = n−1 … 0.

    With d_t = x_t − √ᾱ_t x* and v_t = ᾱ_t s² + 1 − ᾱ_t: x̂_0 − x* = s² √ᾱ_t d_t / v_t and
    ε̂ = √(1 − ᾱ_t) d_t / v_t, so d_{t−1} = d_t (s² √(ᾱ_{t−1} ᾱ_t) + √((1 − ᾱ_{t−1})(1 − ᾱ_t))) / v_t.
    Writing (s √ᾱ, √(1 − ᾱ)) = √v (cos φ, sin φ), the standardised state z_t = d_t / √v_t is scaled by
    cos(φ_t − φ_{t−1}) per step. For s = 0 (φ = π/2 until ᾱ = 1) nothing changes: x_t stays on the
    line √ᾱ_t x* + √(1 − ᾱ_t) z_T, and the last step lands on x*.
    """
    prev = previous(alpha_bars)
    variance = lambda a: a * std ** 2 + 1 - a
    angle = lambda a: math.atan2(math.sqrt(1 - a), std * math.sqrt(a))
    z = (np.asarray(x_T, np.float64) - math.sqrt(alpha_bars[-1]) * X_STAR_64) / math.sqrt(variance(alpha_bars[-1]))
    states = []
    for t in reversed(range(len(alpha_bars))):
        z = z * math.cos(angle(alpha_bars[t]) - angle(prev[t]))
        states.append(math.sqrt(prev[t]) * X_STAR_64 + math.sqrt(variance(prev[t])) * z)
    return states


def ddpm_chain(alpha_bars, x_T, std, sigma_small, noises):
    """Ancestral sampling (DDPM Eqs. 6, 7) with the exact x̂_0: the state after each step, t = n−1 … 0.

    x_{t−1} = μ̃_t(x̂_0, x_t) + σ_t z_t with μ̃_t = β_t √ᾱ_{t−1}/(1 − ᾱ_t) x̂_0 + (1 − ᾱ_{t−1}) √α_t/(1 − ᾱ_t) x_t,
    σ_t² = β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) (sigma_small) or β_t, and no noise at t = 0.
    """
    prev, x, states = previous(alpha_bars), np.asarray(x_T, np.float64), []
    for k, t in enumerate(reversed(range(len(alpha_bars)))):
        a, a_prev = alpha_bars[t], prev[t]
        beta = 1 - a / a_prev
        mean = (beta * math.sqrt(a_prev) * x0_given_xt(x, a, std) + (1 - a_prev) * math.sqrt(1 - beta) * x) / (1 - a)
        variance = beta * (1 - a_prev) / (1 - a) if sigma_small else beta
        x = mean + (math.sqrt(variance) * noises[k] if t > 0 else 0.0)
        states.append(x)
    return states


def sampled_chain(monkeypatch, sampler, shape, **sample_kwargs):
    """Every state the sampling loop passes through: x_{t−1} after its step at t = n−1 … 0 (the last is x_0).

    The loop's compiled step is wrapped to record its outputs, so what is checked is the loop itself
    (step order, the noise each step gets), not a re-run of its steps.
    """
    step, steps, states = sampler.step_graph(()), [], []
    assert step.fused == (os.environ.get(fused.ENV_SWITCH) == "1"), "the step was not built on the path asked for"

    def recording(x, t, noise, *cond):
        out = step(x, t, noise, *cond)
        steps.append(int(t.asnumpy()[0]))
        states.append(out.asnumpy())
        return out

    monkeypatch.setattr(sampler, "step_graph", lambda names, pred_xstart=False: recording)
    result = sampler.sample(shape, **sample_kwargs).asnumpy()
    assert steps == list(reversed(range(sampler.diffusion.num_timesteps)))
    np.testing.assert_array_equal(result, states[-1])
    return states


def assert_states(got, want, atol):
    """Every state within atol of its expected value; the message names the worst step."""
    assert len(got) == len(want)
    errors = [np.abs(g - w).max() for g, w in zip(got, want)]
    worst = int(np.argmax(errors))
    assert errors[worst] <= atol, f"state after step {worst} of {len(got)}: max error {errors[worst]:.3g} > {atol:g}"


def chain_inputs(shape, steps, seed):
    """x_T and the per-step noises, standard normal float32."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal((steps,) + shape, dtype=np.float32)


def test_reference_chains_agree():
    """The float64 references check each other: the DDIM η = 0 recursion is the closed form, and DDIM η = 1
    is the ancestral step with σ_t² = β̃_t (Song et al. 2021, Sec. 4.1)."""
    alpha_bars = cosine_alpha_bars(100, range(0, 100, 10))
    x_T, noises = chain_inputs((2, 3, 4, 4), 10, 0)
    for std in (0.0, 0.5):
        # measured: 9e-16 and 2.7e-15
        want = ddim_eta0_closed_form(alpha_bars, x_T, std)
        assert_states(ddim_chain(alpha_bars, x_T, std, 0.0, noises), want, 1e-13)
        want = ddpm_chain(alpha_bars, x_T, std, True, noises)
        assert_states(ddim_chain(alpha_bars, x_T, std, 1.0, noises), want, 1e-13)


@pytest.mark.parametrize("fused_step", FUSED)
def test_ddim_eta0_is_exact_deterministic_and_inverts(monkeypatch, fused_step):
    """For a one-point data set, DDIM with η = 0 follows x_t = √ᾱ_t x* + √(1 − ᾱ_t) e at every step."""
    monkeypatch.setenv(fused.ENV_SWITCH, fused_step)
    base = create_diffusion(100, "cosine", rescale_timesteps=True)
    diffusion = base.respace("ddim10")
    model = dirac_denoiser(base.schedule["alphas_cumprod"], 1000 / 100)
    sampler = DDIMSampler(diffusion, model, eta=0.0)
    shape = (2,) + X_STAR.shape[1:]
    x_T = np.random.default_rng(4).standard_normal(shape).astype(np.float32)

    alpha_bars = cosine_alpha_bars(100, range(0, 100, 10))  # "ddim10" keeps every 10th of T = 100
    states = sampled_chain(monkeypatch, sampler, shape, x_T=x_T, seed=1)
    assert_states(states, ddim_eta0_closed_form(alpha_bars, x_T, 0.0), atol=ATOL)
    np.testing.assert_array_equal(sampler.sample(shape, x_T=x_T, seed=2).asnumpy(), states[-1])

    # Invert a point on the trajectory at the first kept step: it lands on the closed form at the
    # last kept step, and sampling from there returns to x*.
    e = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    x_0_level = math.sqrt(alpha_bars[0]) * X_STAR + math.sqrt(1 - alpha_bars[0]) * e
    x_T_closed = math.sqrt(alpha_bars[-1]) * X_STAR + math.sqrt(1 - alpha_bars[-1]) * e
    inverted = sampler.invert(x_0_level.astype(np.float32)).asnumpy()
    np.testing.assert_allclose(inverted, x_T_closed, atol=1e-4)
    back = sampler.sample(shape, x_T=inverted).asnumpy()
    np.testing.assert_allclose(back, np.broadcast_to(X_STAR, shape), atol=2e-5)
    with pytest.raises(ValueError, match="eta must lie in"):
        DDIMSampler(diffusion, model, eta=1.5)


@pytest.mark.parametrize("fused_step", FUSED)
def test_velocity_samplers_follow_the_closed_forms(monkeypatch, fused_step):
    """With the exact v-predictor, DDIM (η = 0) follows √ᾱ_t x* + √(1 − ᾱ_t) e and DDPM takes the posterior
    step at every t, as with the ε-predictor."""
    monkeypatch.setenv(fused.ENV_SWITCH, fused_step)
    base = create_diffusion(100, "cosine", predict_v=True)
    model = DiracVelocity(base.schedule["alphas_cumprod"])
    diffusion = base.respace("ddim10")
    alpha_bars = cosine_alpha_bars(100, range(0, 100, 10))
    shape = (2,) + X_STAR.shape[1:]
    x_T, noises = chain_inputs(shape, 10, 9)
    ddim = DDIMSampler(diffusion, model, eta=0.0)
    assert_states(sampled_chain(monkeypatch, ddim, shape, x_T=x_T), ddim_eta0_closed_form(alpha_bars, x_T, 0.0),
                  atol=ATOL)
    e = (x_T - math.sqrt(alpha_bars[-1]) * X_STAR) / math.sqrt(1 - alpha_bars[-1])
    x_1 = math.sqrt(alpha_bars[0]) * X_STAR + math.sqrt(1 - alpha_bars[0]) * e
    np.testing.assert_allclose(ddim.invert(x_1.astype(np.float32)).asnumpy(), x_T, atol=1e-4)
    ddpm = create_sampler("ddpm", diffusion, model)  # Σ = β_t (not sigma_small)
    assert_states(sampled_chain(monkeypatch, ddpm, shape, x_T=x_T, noises=noises),
                  ddpm_chain(alpha_bars, x_T, 0.0, False, noises),
                  atol=ATOL if fused_step == "1" else ATOL_MINDSPORE_EXP)


@pytest.mark.parametrize("fused_step", FUSED)
@pytest.mark.parametrize("sigma_small", [True, False])
@pytest.mark.parametrize("std", [0.0, 0.5])
def test_ddpm_takes_the_posterior_step_at_every_t(monkeypatch, std, sigma_small, fused_step):
    """One point (s = 0) or a Gaussian (s = 0.5) around x*, the exact denoiser, given x_T and noises: each
    state is μ̃_t(E[x_0 | x_t], x_t) + σ_t z_t of the previous one."""
    monkeypatch.setenv(fused.ENV_SWITCH, fused_step)
    steps = 50
    diffusion = create_diffusion(steps, "linear", sigma_small=sigma_small)
    model = GaussianDataDenoiser(diffusion.schedule["alphas_cumprod"], 1.0, std)
    shape = (2,) + X_STAR.shape[1:]
    x_T, noises = chain_inputs(shape, steps, 11)
    states = sampled_chain(monkeypatch, DDPMSampler(diffusion, model, clip_denoised=False), shape,
                           x_T=x_T, noises=noises)
    want = ddpm_chain(linear_alpha_bars(steps), x_T, std, sigma_small, noises)
    assert_states(states, want, atol=ATOL if fused_step == "1" else ATOL_MINDSPORE_EXP)


@pytest.mark.parametrize("fused_step", FUSED)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_on_gaussian_data_at_every_step(monkeypatch, eta, fused_step):
    """Data N(x*, 0.5² I), the exact denoiser, a respaced and rescaled chain: η = 0 follows the closed form
    (the standardised state shrinks by cos(φ_t − φ_{t−1}) per step), η > 0 DDIM's Eq. 12 with the given noises."""
    monkeypatch.setenv(fused.ENV_SWITCH, fused_step)
    std = 0.5
    base = create_diffusion(100, "cosine", rescale_timesteps=True)
    model = GaussianDataDenoiser(base.schedule["alphas_cumprod"], 1000 / 100, std)
    sampler = DDIMSampler(base.respace("ddim10"), model, eta=eta, clip_denoised=False)
    alpha_bars = cosine_alpha_bars(100, range(0, 100, 10))
    shape = (2,) + X_STAR.shape[1:]
    x_T, noises = chain_inputs(shape, 10, 12)
    states = sampled_chain(monkeypatch, sampler, shape, x_T=x_T, noises=noises)
    want = ddim_eta0_closed_form(alpha_bars, x_T, std) if eta == 0 else ddim_chain(alpha_bars, x_T, std, eta, noises)
    assert_states(states, want, atol=ATOL)


def test_samplers_are_seeded_and_ddpm_reaches_the_point(monkeypatch):
    compiles = record_compiles(monkeypatch)
    diffusion = create_diffusion(50, "linear", sigma_small=True)
    model = dirac_denoiser(diffusion.schedule["alphas_cumprod"], 1.0)
    shape = (3,) + X_STAR.shape[1:]
    sampler = create_sampler("ddpm", diffusion, model)
    a, b, c = (sampler.sample(shape, seed=s).asnumpy() for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The final step adds no noise and x̂_0 = x*, so every chain ends exactly at x*.
    np.testing.assert_allclose(a, np.broadcast_to(X_STAR, shape), atol=2e-5)
    assert compiles.count("DDPMStep") == 1, compiles  # one compiled step graph, reused for 3 × 50 steps
    with pytest.raises(ValueError, match="unknown sampler"):
        create_sampler("euler", diffusion, model)


def test_calc_bpd_loop_closed_form_and_beats_a_bad_model():
    """With the exact denoiser and Σ = β̃_t every KL term is 0; what is left is L_T + L_0, known in closed form."""
    steps = 25
    diffusion = create_diffusion(steps, "linear", sigma_small=True)
    s = diffusion.schedule
    result = calc_bpd_loop(diffusion, dirac_denoiser(s["alphas_cumprod"], 1.0), X_STAR)
    assert result["vb"].shape == (1, steps)
    np.testing.assert_allclose(result["vb"][:, 1:], 0.0, atol=1e-4)

    # L_0: the decoder's Gaussian has mean x* and σ² = β̃_1; its mass on x*'s 8-bit bin.
    from scipy.stats import norm
    sigma = math.sqrt(s["posterior_variance"][1])
    upper = np.where(X_STAR > 0.999, 1.0, norm.cdf((1 / 255) / sigma))
    lower = np.where(X_STAR < -0.999, 0.0, norm.cdf(-(1 / 255) / sigma))
    decoder_bits = -np.log(upper - lower).mean() / math.log(2)
    # L_T: KL(N(√ᾱ_T x*, 1 − ᾱ_T) ‖ N(0, 1)) per dimension.
    abar_T = s["alphas_cumprod"][-1]
    prior_bits = (0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * X_STAR ** 2)).mean() / math.log(2)
    np.testing.assert_allclose(result["prior_bpd"], prior_bits, rtol=1e-4)
    # The decoder term uses the tanh approximation of Φ: agree to its accuracy.
    np.testing.assert_allclose(result["vb"][:, 0], decoder_bits, rtol=2e-3)
    np.testing.assert_allclose(result["total_bpd"], result["vb"].sum(axis=1) + result["prior_bpd"], rtol=1e-6)

    for bad_model in (ZeroModel(), RandomModel()):
        bad = calc_bpd_loop(diffusion, bad_model, X_STAR)
        assert bad["total_bpd"][0] > result["total_bpd"][0] + 1.0


class RandomModel(nn.Cell):
    """An untrained stand-in: a fixed random linear map of x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, pad_mode="pad", padding=1, has_bias=True)

    def construct(self, x, t):
        return self.conv(x)
