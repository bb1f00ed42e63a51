"""Our diffusion core against openai/improved-diffusion's own outputs (tests/fixtures).

Every array of the fixture is reproduced in GRAPH_MODE: schedules to 1e-12
(float64), tensors to the relative errors below, each a small multiple of the
error measured here (MindSpore 2.10, CPU).
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from graph_util import run
from mind_diffusion import losses, schedules
from mind_diffusion.gaussian_diffusion import create_diffusion
from mind_diffusion.sampling import DDIMSampler, DDPMSampler

CASES = {"cosine_1000": "", "cosine_r50": "50", "cosine_ddim50": "ddim50"}

# Max relative error per example (see assert_close):
RTOL = 1e-6  # float32 arithmetic like the reference's: measured ≤ 4.6e-7 (vb_terms_bpd), most outputs exact
RTOL_EXP = 1e-5  # a learned Σ = exp(log Σ) with MindSpore's float32 CPU exp: measured 5.2e-6
RTOL_DDIM_NOISE = 1e-5  # DDIM η = 1 at T = 1000, where √(1 − ᾱ_{t−1} − σ²) cancels: measured 3.9e-6
RTOL_LOOP = 5e-6  # 50 chained sampling steps: measured 2.2e-6 (DDIM η = 0 on "ddim50")


def assert_close(ours, ref, rtol=RTOL):
    """Max relative error ≤ rtol, measured per example: max |ours − ref| / max |ref| over each example's values.

    Per example because one batch mixes t = 0 (values ~1e-5) with t = T−1
    (values ~1); not per element because several outputs (DDIM's
    √(1 − ᾱ_{t−1} − σ²) at large t, sums of terms that cancel) are exact only
    to the float32 rounding of their inputs, which makes an elementwise ratio
    meaningless next to zero.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    if ref.ndim == 1:  # one value per example
        ours, ref = ours[:, None], ref[:, None]
    ours, ref = ours.reshape(len(ref), -1), ref.reshape(len(ref), -1)
    scale = np.maximum(np.abs(ref).max(axis=1), 1e-30)
    error = (np.abs(ours - ref).max(axis=1) / scale).max()
    assert error <= rtol, f"max relative error {error:.3g} > {rtol:g}"


def make(spec, **overrides):
    """The fixture's default process: cosine T=1000, learned range Σ, ε, hybrid loss, rescaled t."""
    kwargs = dict(steps=1000, noise_schedule="cosine", learn_sigma=True, loss="rescaled_mse",
                  rescale_timesteps=True, timestep_respacing=spec)
    kwargs.update(overrides)
    return create_diffusion(**kwargs)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, ref):
    name = request.param
    diffusion = make(CASES[name])
    t = ref[f"{name}/t"].astype(np.int32)
    x_t = run(diffusion, "q_sample", ref["inputs/x_start"], t, ref["inputs/noise"])
    return name, diffusion, t, x_t


# ----------------------------------------------------------------- schedules

def test_cosine_raw_betas(ref):
    np.testing.assert_allclose(schedules.cosine_beta_schedule(1000), ref["sched/cosine_raw_betas"],
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", ["50", "ddim50", "10,20,30", "250", "ddim25"])
def test_space_timesteps(ref, spec):
    assert schedules.space_timesteps(1000, spec) == ref[f"respace/{spec}"].tolist()


@pytest.mark.parametrize("name", ["cosine_1000", "cosine_r50", "cosine_ddim50"])
def test_schedule_arrays(ref, name):
    diffusion = make(CASES[name])
    prefix = "sched/" + name + "/"
    keys = [k[len(prefix):] for k in ref if k.startswith(prefix)]
    assert len(keys) == 15
    for key in keys:
        ours = diffusion.schedule[key]
        if key == "timestep_map":
            np.testing.assert_array_equal(ours, ref[prefix + key])
        else:
            np.testing.assert_allclose(ours, ref[prefix + key], rtol=1e-12, atol=0, err_msg=key)  # measured 2.7e-13


# ----------------------------------------------------------- process tensors

def test_q_sample_and_model_timesteps(case, ref):
    name, diffusion, t, x_t = case
    assert_close(x_t, ref[f"{name}/q_sample"])
    assert_close(run(diffusion, "model_timesteps", t), ref[f"{name}/model_t_seen"])


def test_q_mean_variance(case, ref):
    name, diffusion, t, _ = case
    out = run(diffusion, "q_mean_variance", ref["inputs/x_start"], t)
    for value, key in zip(out, ["mean", "variance", "log_variance"]):
        assert_close(value, ref[f"{name}/q_mean_variance/{key}"])


def test_q_posterior(case, ref):
    name, diffusion, t, x_t = case
    out = run(diffusion, "q_posterior_mean_variance", ref["inputs/x_start"], x_t, t)
    for value, key in zip(out, ["mean", "variance", "log_variance_clipped"]):
        assert_close(value, ref[f"{name}/q_posterior/{key}"])


@pytest.mark.parametrize("x_name", ["xt", "xfree"])
@pytest.mark.parametrize("clip", [0, 1])
def test_p_mean_variance(case, ref, x_name, clip):
    name, diffusion, t, x_t = case
    x = x_t if x_name == "xt" else ref["inputs/x_t_free"]
    out = run(diffusion, "p_mean_variance_from_output", ref["inputs/model_out"], x, t,
              clip_denoised=bool(clip))
    for value, key in zip(out, ["mean", "variance", "log_variance", "pred_xstart"]):
        assert_close(value, ref[f"{name}/p_mean_variance/{x_name}/clip{clip}/{key}"],
                     RTOL_EXP if key == "variance" else RTOL)


@pytest.mark.parametrize("variant,overrides,channels", [
    ("fixed_large", dict(learn_sigma=False), 3),
    ("fixed_small", dict(learn_sigma=False, sigma_small=True), 3),
    ("predict_xstart", dict(predict_xstart=True), 6),
])
def test_variants(case, ref, variant, overrides, channels):
    name, _, t, x_t = case
    diffusion = make(CASES[name], **overrides)
    model_out = ref["inputs/model_out"][:, :channels]
    out = run(diffusion, "p_mean_variance_from_output", model_out, x_t, t, clip_denoised=True)
    for value, key in zip(out, ["mean", "variance", "log_variance", "pred_xstart"]):
        learned = channels == 6
        assert_close(value, ref[f"{name}/{variant}/p_mean_variance/{key}"],
                     RTOL_EXP if key == "variance" and learned else RTOL)
    losses_out = run(diffusion, "training_losses_from_output", model_out, ref["inputs/x_start"], x_t, t,
                     ref["inputs/noise"])
    keys = ["loss", "mse", "vb"] if variant == "predict_xstart" else ["loss"]
    for value, key in zip(losses_out, keys):
        assert_close(value, ref[f"{name}/{variant}/training_losses/{key}"])
    if channels == 3:  # fixed Σ: the loss is L_simple alone
        np.testing.assert_array_equal(losses_out[2], 0.0)


@pytest.mark.parametrize("clip", [0, 1])
def test_vb_terms_bpd(case, ref, clip):
    name, diffusion, t, x_t = case
    out = run(diffusion, "vb_terms_bpd_from_output", ref["inputs/model_out"], ref["inputs/x_start"], x_t, t,
              clip_denoised=bool(clip))
    assert_close(out[0], ref[f"{name}/vb_terms_bpd/clip{clip}/output"])
    assert_close(out[1], ref[f"{name}/vb_terms_bpd/clip{clip}/pred_xstart"])


@pytest.mark.parametrize("variant,loss", [("hybrid", "rescaled_mse"), ("mse_learned", "mse"),
                                          ("kl", "rescaled_kl")])
def test_training_losses(case, ref, variant, loss):
    name, _, t, x_t = case
    diffusion = make(CASES[name], loss=loss)
    out = run(diffusion, "training_losses_from_output", ref["inputs/model_out"], ref["inputs/x_start"], x_t, t,
              ref["inputs/noise"])
    keys = ["loss"] if variant == "kl" else ["loss", "mse", "vb"]
    for value, key in zip(out, keys):
        assert_close(value, ref[f"{name}/training_losses/{variant}/{key}"])
    if variant == "kl":
        np.testing.assert_array_equal(out[1], 0.0)


class ConstantModel(nn.Cell):
    """The fixture's stand-in network: the same output whatever x and t are."""

    def __init__(self, output):
        super().__init__()
        self.output = ms.Tensor(output)

    def construct(self, x, t):
        return self.output


def test_training_losses_with_model(case, ref):
    name, diffusion, t, _ = case

    class Losses(nn.Cell):
        def __init__(self):
            super().__init__()
            self.diffusion = diffusion
            self.model = ConstantModel(ref["inputs/model_out"])

        def construct(self, x_start, t, noise):
            return self.diffusion.training_losses(self.model, x_start, t, noise)

    out = Losses()(*[ms.Tensor(a) for a in (ref["inputs/x_start"], t, ref["inputs/noise"])])
    for value, key in zip(out, ["loss", "mse", "vb"]):
        assert_close(value.asnumpy(), ref[f"{name}/training_losses/hybrid/{key}"])


def test_single_sampling_steps(case, ref):
    name, diffusion, t, _ = case
    x, model_out, noise = ref["inputs/x_t_free"], ref["inputs/model_out"], ref["inputs/p_sample_noise"]
    sample, pred = run(diffusion, "p_sample_from_output", model_out, x, t, noise, clip_denoised=True)
    assert_close(sample, ref[f"{name}/p_sample/sample"])
    assert_close(pred, ref[f"{name}/p_sample/pred_xstart"])
    for eta in (0, 1):
        sample, pred = run(diffusion, "ddim_sample_from_output", model_out, x, t, noise,
                           eta=float(eta), clip_denoised=True)
        assert_close(sample, ref[f"{name}/ddim_sample/eta{eta}/sample"], RTOL_DDIM_NOISE if eta else RTOL)
        assert_close(pred, ref[f"{name}/ddim_sample/eta{eta}/pred_xstart"])


def test_prior_bpd(case, ref):
    name, diffusion, _, _ = case
    assert_close(run(diffusion, "prior_bpd", ref["inputs/x_start"]), ref[f"{name}/prior_bpd"])


# ------------------------------------------------------------------- loss helpers

class _Fn(nn.Cell):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *args):
        return self.fn(*args)


def _graph(fn, *arrays):
    return _Fn(fn)(*[ms.Tensor(a) for a in arrays]).asnumpy()


def test_normal_kl(ref):
    inputs = [ref[f"losses/kl_inputs/{k}"] for k in ("mean1", "logvar1", "mean2", "logvar2")]
    assert_close(_graph(losses.normal_kl, *inputs), ref["losses/normal_kl"])
    zeros = np.zeros_like(inputs[0])
    assert_close(_graph(losses.normal_kl, inputs[0], inputs[1], zeros, zeros), ref["losses/normal_kl_vs_std"])


def test_discretized_gaussian_log_likelihood(ref):
    inputs = [ref[f"losses/dgll_inputs/{k}"] for k in ("x", "means", "log_scales")]
    assert_close(_graph(losses.discretized_gaussian_log_likelihood, *inputs),
                 ref["losses/discretized_gaussian_log_likelihood"])


def test_approx_standard_normal_cdf_and_mean_flat(ref):
    assert_close(_graph(losses.approx_standard_normal_cdf, ref["losses/cdf_inputs"]),
                 ref["losses/approx_standard_normal_cdf"])
    # A mean of ±1 values nearly cancels, so float32 summation order alone moves it by ~1e-7 of the
    # values' size: compare at the scale of what was summed (measured 1.7e-8 of it).
    ours = _graph(losses.mean_flat, ref["inputs/model_out"])
    scale = np.abs(ref["inputs/model_out"]).mean()
    assert np.abs(ours - ref["losses/mean_flat_of_model_out"]).max() <= 1e-7 * scale


# --------------------------------------------------------------- whole loops

class AnalyticModel(nn.Cell):
    """The fixture's loop model: ε = 0.5 tanh(x) + 1e-3 t, v = tanh(0.3 x) cos(t / 1000).

    tanh and cos are taken in float64: MindSpore's float32 CPU tanh is off by
    up to 1e-4, which 50 steps would amplify past the fixture's tolerance.
    """

    def construct(self, x, t):
        x64 = x.astype(ms.float64)
        t64 = t.astype(ms.float64).reshape(-1, 1, 1, 1)
        eps = (0.5 * ops.tanh(x64)).astype(ms.float32) + (1e-3 * t64).astype(ms.float32)
        var = (ops.tanh(0.3 * x64) * ops.cos(t64 / 1000.0)).astype(ms.float32)
        return ops.concat((eps, var), axis=1)


@pytest.mark.parametrize("name", ["cosine_r50", "cosine_ddim50"])
def test_sampling_loops(ref, name):
    diffusion = make(CASES[name])
    model = AnalyticModel()
    x_T, noises = ref["loop/x_T"], ref["loop/step_noises"]
    shape = x_T.shape
    out = DDPMSampler(diffusion, model).sample(shape, x_T=x_T, noises=noises)
    assert_close(out.asnumpy(), ref[f"loop/{name}/p_sample_loop"], RTOL_LOOP)
    out = DDIMSampler(diffusion, model, eta=0.0).sample(shape, x_T=x_T)
    assert_close(out.asnumpy(), ref[f"loop/{name}/ddim_sample_loop_eta0"], RTOL_LOOP)
    out = DDIMSampler(diffusion, model, eta=1.0).sample(shape, x_T=x_T, noises=noises)
    assert_close(out.asnumpy(), ref[f"loop/{name}/ddim_sample_loop_eta1"], RTOL_LOOP)
