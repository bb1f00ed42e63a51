"""Latent diffusion's schedule and samplers against CompVis's LatentDiffusion, DDIMSampler and PLMSSampler
(tests/fixtures/ldm_sd1_tiny.*) and Wukong-Huahua's PLMS (wukong_tiny.*), in GRAPH_MODE.

The text states are the fixtures' own (their text encoders' outputs), so these tests depend on the UNet,
the autoencoder and the schedulers only.
"""
import numpy as np
import pytest

import mindspore as ms

from mind_diffusion.sampling.schedulers import SamplingGraph, create_scheduler, sample
from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion, ldm_timesteps
from mind_diffusion.torch_pickle import load_state_dict
from models.autoencoder import LatentDecoder
from mind_diffusion.sampling.latent import ContextGuidance
from tests.ldm_util import SD_CKPT, WUKONG_CKPT, fixture_arrays, load_networks

SCALE = 7.5  # the fixtures' guidance scale


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def sd():
    unet, vae, config = load_networks(SD_CKPT)
    return ContextGuidance(unet, SCALE), vae, config, fixture_arrays("ldm_sd1_tiny")


def scheduler(name, steps, config=None):
    schedule = {} if config is None else config["schedule"]
    return create_scheduler(name, create_ldm_diffusion(**schedule), clip_denoised=False).set_timesteps(steps, "ldm")


def test_schedule_is_compvis_float64():
    ref = fixture_arrays("ldm_sd1_tiny")
    s = create_ldm_diffusion().schedule
    assert max_abs(s["betas"], ref["betas"]) <= 1e-12                    # measured 0
    assert max_abs(s["alphas_cumprod"], ref["alphas_cumprod"]) <= 1e-12  # measured 0
    # the checkpoint's float32 buffers are exactly our float64 values rounded
    buffers = load_state_dict(SD_CKPT)["state_dict"]
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recipm1_alphas_cumprod"):
        assert np.array_equal(buffers[name], s[name].astype(np.float32)), name
    # Wukong computes the same schedule in float32 (its json: 2.9e-7 apart)
    assert max_abs(s["alphas_cumprod"], fixture_arrays("wukong_tiny")["alphas_cumprod"]) <= 5e-7


def test_ldm_steps_are_compvis_uniform_plus_one():
    ref = fixture_arrays("ldm_sd1_tiny")
    assert ldm_timesteps(1000, 50) == list(ref["ddim50_timesteps"])
    ddim = scheduler("ddim", 50)
    assert list(ddim.timesteps) == list(ref["ddim50_timesteps"][::-1])
    s = ddim.process.schedule
    # CompVis reads ᾱ from its float32 buffer: ours rounded to float32 is exactly that
    assert np.array_equal(s["alphas_cumprod"][ddim.call_t].astype(np.float32), ref["ddim50_alphas"][::-1])
    assert np.array_equal(s["alphas_cumprod_prev"][ddim.call_t].astype(np.float32),
                          ref["ddim50_alphas_prev"][::-1].astype(np.float32))
    # PLMS: the Heun warm-up runs the network at 801 and at the next step 601, then once per step
    assert list(scheduler("plms", 5).timesteps) == [801, 601, 601, 401, 201, 1]
    with pytest.raises(ValueError, match="lies past T"):
        ldm_timesteps(1000, 1000)  # 1..1000: CompVis's +1 would index past the schedule


def test_one_guided_ddim_step(sd):
    guided, _, _, ref = sd
    ddim = scheduler("ddim", 50)
    assert ddim.timesteps[0] == ref["ddim_step_t"] == 981
    graph = SamplingGraph(guided, ddim.make_step(), ("context", "uncond"))
    x = ms.Tensor(ref["ddim_step_x"])
    (x_prev,) = graph(x, ms.Tensor(np.zeros(2, np.int32)), ms.Tensor(np.zeros_like(ref["ddim_step_x"])),
                      ms.Tensor(ref["clip_last_hidden_state"]), ms.Tensor(ref["clip_empty_last_hidden_state"]))
    assert max_abs(x_prev.asnumpy(), ref["ddim_step_x_prev"]) <= 1e-5  # measured 3.3e-6 (|x| up to 3.7)


@pytest.mark.parametrize("name, latent_key, decoded_key", [("ddim", "txt2img_latent", "txt2img_decoded"),
                                                           ("plms", "txt2img_plms_latent", "txt2img_plms_decoded")])
def test_five_step_text_to_image(sd, name, latent_key, decoded_key):
    guided, vae, config, ref = sd
    chosen = scheduler(name, 5, config)
    assert list(chosen.process.schedule["timestep_map"][1:]) == list(ref["txt2img_ddim_timesteps"])
    latent = sample(guided, ref["txt2img_x_T"].shape, chosen, x_T=ref["txt2img_x_T"],
                    model_kwargs={"context": ref["clip_last_hidden_state"],
                                  "uncond": ref["clip_empty_last_hidden_state"]})
    # measured: DDIM 9.2e-5, PLMS 9.1e-5 on latents up to 26.5 (3.5e-6 relative: float32 through five
    # 7.5-guided steps); decoded: DDIM 9.4e-6, PLMS 9.3e-6
    assert max_abs(latent.asnumpy(), ref[latent_key]) <= 1e-4
    assert max_abs(LatentDecoder(vae)(latent).asnumpy(), ref[decoded_key]) <= 1e-4


def test_wukong_five_step_plms():
    unet, vae, config = load_networks(WUKONG_CKPT)
    ref = fixture_arrays("wukong_tiny")
    latent = sample(ContextGuidance(unet, SCALE), ref["txt2img_x_T"].shape, scheduler("plms", 5, config),
                    x_T=ref["txt2img_x_T"], model_kwargs={"context": ref["text_last_hidden_state"],
                                                          "uncond": ref["text_empty_last_hidden_state"]})
    # measured 7.0e-5 (latents up to 25.9) and 1.1e-5 decoded; Wukong's own float32 schedule is 2.9e-7 from ours
    assert max_abs(latent.asnumpy(), ref["txt2img_plms_latent"]) <= 1e-4
    assert max_abs(LatentDecoder(vae)(latent).asnumpy(), ref["txt2img_plms_decoded"]) <= 1e-4


class _EpsModel(ms.nn.Cell):
    """A closed-form ε-model: ε̂(x_t, t) = 0.5 x_t + 0.1 (mean of the context)."""

    def construct(self, x, t, context):
        return 0.5 * x + 0.1 * context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)


class _VModel(ms.nn.Cell):
    """The same model predicting v = √ᾱ_t ε̂ − √(1 − ᾱ_t) x̂_0, x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t (SD 2.x's target)."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.eps_model = _EpsModel()
        self.alphas_cumprod = ms.Tensor(alphas_cumprod, ms.float32)

    def construct(self, x, t, context):
        alpha_bar = ms.ops.gather(self.alphas_cumprod, t.astype(ms.int32), 0).reshape(-1, 1, 1, 1)  # t: float steps
        eps = self.eps_model(x, t, context)
        xstart = (x - ms.ops.sqrt(1 - alpha_bar) * eps) / ms.ops.sqrt(alpha_bar)
        return ms.ops.sqrt(alpha_bar) * eps - ms.ops.sqrt(1 - alpha_bar) * xstart


@pytest.mark.parametrize("name", ["ddim", "plms", "dpm++2m"])
def test_v_prediction_samples_what_the_eps_model_samples(name):
    """SD 2.x's v-prediction through the same schedulers (DDIM, PLMS, DPM-Solver++(2M) on CompVis's steps): a v-model
    equivalent to an ε-model draws the same latents."""
    rng = np.random.default_rng(3)
    x_T = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    kwargs = {"context": rng.normal(size=(2, 3, 5)).astype(np.float32)}
    out = {}
    for prediction, model in (("eps", _EpsModel()), ("v", _VModel(create_ldm_diffusion().schedule["alphas_cumprod"]))):
        chosen = create_scheduler(name, create_ldm_diffusion(prediction=prediction), clip_denoised=False)
        out[prediction] = sample(model, x_T.shape, chosen.set_timesteps(5, "ldm"), x_T=x_T, model_kwargs=kwargs).asnumpy()
    assert np.abs(out["eps"] - x_T).max() > 0.1
    np.testing.assert_allclose(out["v"], out["eps"], rtol=1e-5, atol=1e-5)
