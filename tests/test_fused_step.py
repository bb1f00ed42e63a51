"""The fused CPU sampling step (mind_diffusion.sampling.fused) against the pure-ops step.

Every mean/variance parametrisation, clip on and off, a batch mixing t = 0 (no
noise) with t > 0, and DDIM with η ∈ {0, 0.5, 1}; plus the fallback to pure
ops when the fused path is disabled or unavailable.

The pure-ops path takes e^x with MindSpore's float32 CPU exp, an approximation
off by up to ~1e-4 relative; the fused kernel's exp is accurate to 1 ulp. So
the learned variances are compared at 2e-4, everything else at 1e-5 (the
fixtures' tolerance), and the kernel's exp is checked against float64 alone.
"""
import ctypes

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion import schedules
from mind_diffusion.gaussian_diffusion import GaussianDiffusion
from mind_diffusion.sampling import DDIMSampler, DDPMSampler, fused
from mind_diffusion.sampling.ddim import DDIMStep
from mind_diffusion.sampling.ddpm import DDPMStep

T = 100
SHAPE = (6, 3, 8, 8)
# t = 0 (the last step: no noise), t = 1, the middle, T-1 — twice, so one batch has several of each.
STEPS = np.array([0, 1, T // 2, T - 1, 0, 7], np.int32)


def assert_close(ours, ref, rtol):
    """Per example: max |ours − ref| / max |ref| ≤ rtol (as tests/test_diffusion_reference.py)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    ours, ref = ours.reshape(len(ref), -1), ref.reshape(len(ref), -1)
    assert np.isfinite(ours).all()
    scale = np.maximum(np.abs(ref).max(axis=1), 1e-30)
    error = (np.abs(ours - ref).max(axis=1) / scale).max()
    assert error <= rtol, f"max relative error {error:.3g} > {rtol:g}"


needs_kernel = pytest.mark.kernel(fused)  # see tests/conftest.py


class ToyModel(nn.Cell):
    """A network output that depends on x: mean part 0.8 x + 0.05 (large enough for clipping to
    matter), variance part clamp(0.5 x, −1, 1) + var_offset (v for learned_range, log σ² for learned)."""

    def __init__(self, learned_sigma, var_offset=0.0):
        super().__init__()
        self.learned_sigma = learned_sigma
        self.var_offset = var_offset

    def construct(self, x, t):
        mean = 0.8 * x + 0.05
        if self.learned_sigma:
            return ops.concat((mean, ops.clamp(0.5 * x, -1.0, 1.0) + self.var_offset), axis=1)
        return mean


def make(mean, var):
    betas = schedules.get_named_beta_schedule("cosine", T)
    diffusion = GaussianDiffusion(betas, model_mean_type=mean, model_var_type=var)
    learned = var in ("learned", "learned_range")
    return diffusion, ToyModel(learned, var_offset=-4.0 if var == "learned" else 0.0)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = ms.Tensor(rng.standard_normal(SHAPE, dtype=np.float32) * 1.5)
    noise = ms.Tensor(rng.standard_normal(SHAPE, dtype=np.float32))
    return x, ms.Tensor(STEPS), noise


def pure_and_fused(monkeypatch, build):
    """The step built with the fused path off, then on."""
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    pure = build()
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    fast = build()
    assert not pure.fused and fast.fused
    return pure, fast


def compare(pure, fast, rtol):
    x, t, noise = inputs()
    sample_p, pred_p = (o.asnumpy() for o in pure(x, t, noise))
    sample_f, pred_f = (o.asnumpy() for o in fast(x, t, noise))
    assert_close(pred_f, pred_p, 1e-5)
    assert_close(sample_f, sample_p, rtol)
    # t = 0 adds no noise: the same step with zero noise gives the same x_{t-1} there.
    sample_0, _ = (o.asnumpy() for o in fast(x, t, ms.Tensor(np.zeros(SHAPE, np.float32))))
    last = STEPS == 0
    np.testing.assert_array_equal(sample_0[last], sample_f[last])
    return sample_f, sample_0


@needs_kernel
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("var", ["fixed_small", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("mean", ["epsilon", "start_x", "previous_x", "velocity"])
def test_ddpm_step_matches_pure_ops(monkeypatch, mean, var, clip):
    diffusion, model = make(mean, var)
    pure, fast = pure_and_fused(monkeypatch, lambda: DDPMStep(diffusion, model, clip_denoised=clip))
    rtol = 2e-4 if var.startswith("learned") else 1e-5  # MindSpore's exp vs an accurate one
    sample, sample_0 = compare(pure, fast, rtol)
    assert not np.array_equal(sample[~(STEPS == 0)], sample_0[~(STEPS == 0)])  # t > 0 adds the noise


@needs_kernel
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("var", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("mean", ["epsilon", "start_x", "previous_x", "velocity"])
def test_ddim_step_matches_pure_ops(monkeypatch, mean, var, clip):
    diffusion, model = make(mean, var)
    pure, fast = pure_and_fused(monkeypatch, lambda: DDIMStep(diffusion, model, clip_denoised=clip, eta=0.5))
    compare(pure, fast, 1e-5)


@needs_kernel
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_eta(monkeypatch, eta, clip):
    diffusion, model = make("epsilon", "learned_range")
    pure, fast = pure_and_fused(monkeypatch, lambda: DDIMStep(diffusion, model, clip_denoised=clip, eta=eta))
    sample, sample_0 = compare(pure, fast, 1e-5)
    if eta == 0.0:  # deterministic: the noise is never used
        np.testing.assert_array_equal(sample, sample_0)


@pytest.mark.parametrize("switch", ["0", pytest.param("1", marks=needs_kernel)])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_without_pred_xstart_is_the_pair_steps_x_prev(monkeypatch, kind, switch):
    """The sampling loop's step returns x_{t-1} alone (one kernel output, one graph output), bit for bit
    the first output of the step that also returns x̂_0, on the fused path and the pure-ops one."""
    diffusion, model = make("velocity", "learned_range")
    monkeypatch.setenv(fused.ENV_SWITCH, switch)
    if kind == "ddpm":
        pair, single = (DDPMStep(diffusion, model, pred_xstart=keep) for keep in (True, False))
    else:
        pair, single = (DDIMStep(diffusion, model, eta=0.5, pred_xstart=keep) for keep in (True, False))
    assert pair.fused == single.fused == (switch == "1")
    x, t, noise = inputs()
    alone = single(x, t, noise)
    assert isinstance(alone, ms.Tensor) and alone.shape == SHAPE
    np.testing.assert_array_equal(alone.asnumpy(), pair(x, t, noise)[0].asnumpy())


@needs_kernel
def test_respaced_loops_match_pure_ops(monkeypatch):
    diffusion = GaussianDiffusion(schedules.get_named_beta_schedule("cosine", 1000),
                                  model_var_type="learned_range").respace("ddim10")
    model = ToyModel(True)
    shape = (2, 3, 8, 8)
    for make_sampler in (lambda: DDPMSampler(diffusion, model), lambda: DDIMSampler(diffusion, model, eta=0.5)):
        monkeypatch.setenv(fused.ENV_SWITCH, "0")
        pure = make_sampler().sample(shape, seed=3).asnumpy()
        monkeypatch.setenv(fused.ENV_SWITCH, "1")
        sampler = make_sampler()
        fast = sampler.sample(shape, seed=3).asnumpy()
        assert sampler.step_graph(()).fused
        assert_close(fast, pure, 1e-3)


def test_disabled_by_env_uses_pure_ops(monkeypatch):
    diffusion, model = make("epsilon", "learned_range")
    for value in ("0", "false", "off"):
        monkeypatch.setenv(fused.ENV_SWITCH, value)
        assert fused.status() == (False, f"disabled by {fused.ENV_SWITCH}={value}")
        assert not DDPMStep(diffusion, model).fused
        assert not DDIMStep(diffusion, model).fused


@needs_kernel
def test_on_by_default(monkeypatch):
    diffusion, model = make("epsilon", "learned_range")
    monkeypatch.delenv(fused.ENV_SWITCH)
    assert fused.status()[0] and DDPMStep(diffusion, model).fused and DDIMStep(diffusion, model).fused


def test_failed_build_falls_back(monkeypatch):
    diffusion, model = make("epsilon", "fixed_small")
    monkeypatch.setattr(fused, "_library", {"path": None, "reason": "g++ failed (test)"})
    assert fused.status() == (False, "g++ failed (test)")
    step = DDPMStep(diffusion, model)
    assert not step.fused
    x, t, noise = inputs()
    sample, _ = step(x, t, noise)
    assert np.isfinite(sample.asnumpy()).all()


@needs_kernel
def test_non_float32_output_takes_pure_ops(monkeypatch):
    """A float16 network output does not fit the kernel: the same step graph uses pure ops."""
    diffusion, _ = make("epsilon", "fixed_small")

    class Half(nn.Cell):
        def construct(self, x, t):
            return (0.8 * x).astype(ms.float16)

    step = DDPMStep(diffusion, Half())
    assert step.fused
    x, t, noise = inputs()
    sample, pred = step(x, t, noise)
    assert np.isfinite(sample.asnumpy()).all()


@needs_kernel
def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MIND_DIFFUSION_CACHE", str(tmp_path))
    path, how = fused._build()
    assert how == "built" and path.startswith(str(tmp_path)) and path.endswith(".so")
    assert fused._build() == (path, "cached")
    assert [p.name for p in tmp_path.iterdir()] == [path.split("/")[-1]]  # no temporary left behind


@pytest.mark.parametrize("var", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_log_std_line_is_the_variance_rule(var):
    """log σ_t = P + Q·v equals ½ log Σ_θ of improved DDPM's rule for each variance type, in float64."""
    diffusion, _ = make("epsilon", var)
    s = diffusion.schedule
    offset, slope = fused.log_std_line(diffusion)
    v = np.linspace(-1.5, 1.5, 7)[:, None]
    if var == "learned":
        log_variance = v + 0 * s["betas"]
    elif var == "learned_range":
        frac = (v + 1) / 2
        log_variance = frac * s["log_betas"] + (1 - frac) * s["posterior_log_variance_clipped"]
    elif var == "fixed_large":
        log_variance = np.broadcast_to(s["fixed_large_log_variance"], (7, T))
    else:
        log_variance = np.broadcast_to(s["posterior_log_variance_clipped"], (7, T))
    np.testing.assert_allclose(offset + slope * v, log_variance / 2, rtol=1e-12, atol=1e-12)


@needs_kernel
def test_kernel_exp_is_accurate():
    lib = ctypes.CDLL(fused.library())
    x = np.linspace(-80.0, 80.0, 2_000_001, dtype=np.float32)
    y = np.empty_like(x)
    lib.md_exp_f32(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    ref = np.exp(x.astype(np.float64))
    ulps = np.abs(y - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0
