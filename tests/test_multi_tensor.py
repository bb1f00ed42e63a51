"""The one-call AdamW and EMA over all parameter tensors (kernels/multi_tensor) against NumPy and the ops path."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, nn, ops

from mind_diffusion.kernels import multi_tensor
from mind_diffusion.train.step import EMA, AdamW, WarmupLR

needs_kernel = pytest.mark.kernel(multi_tensor)  # see tests/conftest.py

# Sizes with more than one 2^16-element chunk and more than one thread's share.
SHAPES = [(3,), (7, 5), (300_001,), (64, 32, 3, 3)]


def parameters(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(f"p{i}", Parameter(ms.Tensor(rng.standard_normal(s).astype(dtype)), name=f"p{i}"))
            for i, s in enumerate(SHAPES)]


def gradients(step):
    rng = np.random.default_rng(100 + step)
    return [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2)).astype(np.float32) for s in SHAPES]


class Update(nn.Cell):
    """AdamW then the EMA, ordered by the optimizer's token as TrainStep orders them."""

    def __init__(self, optimizer, ema):
        super().__init__()
        self.optimizer, self.ema = optimizer, ema

    def construct(self, grads, apply):
        done = self.optimizer(grads, apply)
        return self.ema(ops.depend(apply, done))


def build(monkeypatch, fast, rates=(0.9, 0.999)):
    monkeypatch.setenv(multi_tensor.ENV_SWITCH, "1" if fast else "0")
    named = parameters()
    optimizer = AdamW(named, WarmupLR(1e-2, 3), eps=1e-8, weight_decay=0.05)
    ema = EMA(named, rates)
    assert (optimizer.multi_tensor is not None) == fast and (ema.multi_tensor is not None) == fast
    return Update(optimizer, ema)


def state(update):
    opt = update.optimizer
    return {"theta": [p.asnumpy().copy() for p in opt.parameters],
            "m": [p.asnumpy().copy() for p in opt.moments1], "v": [p.asnumpy().copy() for p in opt.moments2],
            "ema": [[p.asnumpy().copy() for p in shadow] for shadow in update.ema.shadows],
            "step": int(opt.global_step.asnumpy())}


def run(update, applies):
    for step, apply in enumerate(applies):
        update(ms.mutable(tuple(ms.Tensor(g) for g in gradients(step))), ms.Tensor(apply))
    return state(update)


@needs_kernel
def test_adamw_and_ema_match_numpy(monkeypatch):
    """Three applied steps in float64 NumPy: m, v, θ (decoupled decay) and both EMA copies, with the
    hyperparameters as the float32 numbers the kernel gets."""
    update = build(monkeypatch, fast=True)
    lrs = [float(update.optimizer.learning_rate(ms.Tensor(s, ms.int32)).asnumpy()) for s in range(3)]
    got = run(update, [True, True, True])
    theta = [p.asnumpy().astype(np.float64) for _, p in parameters()]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    f32 = lambda value: float(np.float32(value))  # noqa: E731
    beta1, beta2, eps, decay = f32(0.9), f32(0.999), f32(1e-8), f32(0.05)
    ema = {r: [t.copy() for t in theta] for r in (0.9, 0.999)}
    for step in range(3):
        for i, g in enumerate(gradients(step)):
            g = g.astype(np.float64)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            theta[i] = theta[i] - lrs[step] * (m[i] / (np.sqrt(v[i]) + eps) + decay * theta[i])
            for r in ema:
                ema[r][i] = f32(r) * ema[r][i] + (1 - f32(r)) * theta[i]
    assert got["step"] == 3
    for i in range(len(SHAPES)):
        np.testing.assert_allclose(got["m"][i], m[i], rtol=2e-6, atol=1e-9)
        np.testing.assert_allclose(got["v"][i], v[i], rtol=2e-6, atol=1e-12)
        np.testing.assert_allclose(got["theta"][i], theta[i], rtol=2e-6, atol=1e-7)
        for k, r in enumerate((0.9, 0.999)):
            np.testing.assert_allclose(got["ema"][k][i], ema[r][i], rtol=2e-6, atol=1e-7)


@needs_kernel
def test_same_as_the_ops_path_and_a_skipped_step_changes_nothing(monkeypatch):
    """Against AdamWeightDecay + the ops EMA: equal to float32 rounding (AdamW rounds differently, and the
    EMA averages its θ); apply = False in the middle leaves every tensor and the step count exactly as they
    were."""
    applies = [True, False, True]
    fast = run(build(monkeypatch, fast=True), applies)
    slow = run(build(monkeypatch, fast=False), applies)
    assert fast["step"] == slow["step"] == 2
    for i in range(len(SHAPES)):
        for key in ("theta", "m", "v"):
            np.testing.assert_allclose(fast[key][i], slow[key][i], rtol=1e-6, atol=1e-8)
    for shadow_fast, shadow_slow in zip(fast["ema"], slow["ema"]):
        for a, b in zip(shadow_fast, shadow_slow):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)

    update = build(monkeypatch, fast=True)
    run(update, [True])
    before = state(update)
    after = run(update, [False])
    assert after["step"] == before["step"] == 1
    for key in ("theta", "m", "v"):
        for a, b in zip(after[key], before[key]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(after["ema"], before["ema"]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@needs_kernel
@pytest.mark.parametrize("with_apply", [True, False])
def test_ema_rounds_as_the_ops_path(monkeypatch, with_apply):
    """θ̄ · r + θ · (1 − r) in float32, unfused, with 1 − r rounded as the ops path rounds it (in float32
    with an apply tensor, in Python without): the same bits as its Mul, Mul, Add."""
    outs = []
    for fast in (True, False):
        monkeypatch.setenv(multi_tensor.ENV_SWITCH, "1" if fast else "0")
        named = parameters()
        ema = EMA(named, (0.9999, 0.5))
        assert (ema.multi_tensor is not None) == fast
        for _, p in named:  # move θ away from θ̄
            p.set_data(ms.Tensor(p.asnumpy() * 1.37 + 0.25))
        for _ in range(2):
            if with_apply:
                ema(ms.Tensor(True))
            else:
                ema()
        outs.append([[p.asnumpy() for p in shadow] for shadow in ema.shadows])
    for a, b in zip(*outs):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_the_switch_takes_the_ops_path(monkeypatch):
    monkeypatch.setenv(multi_tensor.ENV_SWITCH, "off")
    assert multi_tensor.status() == (False, f"disabled by {multi_tensor.ENV_SWITCH}=off")
    assert AdamW(parameters(), WarmupLR(1e-3, 0)).multi_tensor is None
    assert EMA(parameters(), (0.9,)).multi_tensor is None


@needs_kernel
def test_a_float16_parameter_takes_the_ops_path():
    assert AdamW(parameters(), WarmupLR(1e-3, 0)).multi_tensor is not None
    assert EMA(parameters(dtype=np.float16), (0.9,)).multi_tensor is None


@needs_kernel
def test_train_step_on_both_paths(monkeypatch):
    """TrainStep with clipping and a loss scale, three steps: the one-call update (ordered by its tokens)
    gives the ops path's parameters, moments and EMA to float32 rounding."""
    from mind_diffusion.gaussian_diffusion import create_diffusion
    from mind_diffusion.resample import UniformSampler
    from mind_diffusion.train.step import DiffusionLoss, TrainStep

    class Toy(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = Parameter(ms.Tensor(np.linspace(0.2, 0.9, 3, dtype=np.float32).reshape(1, 3, 1, 1)), name="w")
            self.b = Parameter(ms.Tensor(np.zeros((1, 3, 1, 1), np.float32)), name="b")

        def construct(self, x, t):
            return self.w * x + self.b

    results = []
    for fast in (True, False):
        monkeypatch.setenv(multi_tensor.ENV_SWITCH, "1" if fast else "0")
        model = Toy()
        named = list(model.parameters_and_names())
        step = TrainStep(DiffusionLoss(model, create_diffusion(30, "cosine"), UniformSampler(30)),
                         AdamW(named, WarmupLR(0.05, 2), weight_decay=0.01), EMA(named, (0.9,)),
                         grad_clip=0.5, loss_scale=256.0)
        assert (step.optimizer.multi_tensor is not None) == fast
        rng = np.random.default_rng(3)
        for _ in range(3):
            x = ms.Tensor(rng.uniform(-1, 1, (4, 3, 4, 4)).astype(np.float32))
            u = ms.Tensor(rng.uniform(0, 1, (4,)).astype(np.float32))
            noise = ms.Tensor(rng.standard_normal((4, 3, 4, 4)).astype(np.float32))
            assert bool(step(x, u, noise)[-1].asnumpy())
        opt = step.optimizer
        results.append([p.asnumpy() for group in (opt.parameters, opt.moments1, opt.moments2, step.ema.shadows[0])
                        for p in group] + [opt.global_step.asnumpy()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
