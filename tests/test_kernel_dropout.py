"""Counter-based dropout (mind_diffusion.kernels.dropout): the mask against a NumPy re-derivation of
its hash, the keep rate, the scaling, the gradient, one mask per layer and per step, exact replay."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.kernels import dropout
from mind_diffusion.kernels.dropout import Dropout, seed_step

M64 = (1 << 64) - 1


needs_kernel = pytest.mark.kernel(dropout)  # see tests/conftest.py


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix32(h):
    """MurmurHash3's finaliser on a uint32 array (uint32 arithmetic wraps)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def reference_mask(counter, count, p):
    """The documented rule: keep element i when mix32(mix32(i ^ k0) ^ k1) ≥ round(p · 2^32)."""
    key = mix64(mix64((counter + 0x9E3779B97F4A7C15) & M64))
    k0, k1 = np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)
    bits = mix32(mix32(np.arange(count, dtype=np.uint32) ^ k0) ^ k1)
    threshold = min(int(float(np.float32(p)) * 2.0 ** 32 + 0.5), 2 ** 32 - 1)
    return bits >= np.uint32(threshold)


class Apply(nn.Cell):
    def __init__(self):
        super().__init__()
        self.op = dropout.dropout_op()

    def construct(self, x, counter, p):
        return self.op(x, counter, p)


def apply(x, counter, p):
    return Apply()(ms.Tensor(x), ms.Tensor(counter, ms.int64), ms.Tensor([p], ms.float32)).asnumpy()


@needs_kernel
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_the_documented_hash_and_keeps_one_minus_p(p):
    x = np.random.default_rng(0).uniform(0.5, 1.5, (4, 8, 32, 32)).astype(np.float32)  # never 0
    y = apply(x, 1234567, p)
    keep = reference_mask(1234567, x.size, p).reshape(x.shape)
    np.testing.assert_array_equal(y != 0, keep)
    np.testing.assert_array_equal(y[keep], x[keep] * np.float32(1 / np.float32(1 - np.float32(p))))
    # binomial: the keep rate within 5 standard deviations of 1 − p
    rate, sd = keep.mean(), np.sqrt(p * (1 - p) / x.size)
    assert abs(rate - (1 - p)) < 5 * sd, (rate, 1 - p)


@needs_kernel
def test_masks_differ_between_counters_and_repeat_for_the_same_one():
    x = np.ones((64, 64), np.float32)
    a = apply(x, 7, 0.5)
    np.testing.assert_array_equal(a, apply(x, 7, 0.5))
    for other in (6, 8, 7 + 2 ** 40):  # independent masks agree on about half the elements
        assert 0.45 < ((a != 0) == (apply(x, other, 0.5) != 0)).mean() < 0.55


class TwoLayers(nn.Cell):
    def __init__(self, p):
        super().__init__()
        self.first, self.second = Dropout(p), Dropout(p)

    def construct(self, x):
        return self.first(x), self.second(x)


@needs_kernel
def test_layers_and_steps_get_their_own_masks_and_a_step_replays_exactly():
    net = TwoLayers(0.3)
    net.set_train(True)
    assert net.first.fast
    x = ms.Tensor(np.ones((32, 32), np.float32))
    seed_step(0, 0, 5)
    first, second = (o.asnumpy() for o in net(x))
    assert not np.array_equal(first, second)
    seed_step(0, 0, 6)
    next_first = net(x)[0].asnumpy()
    assert not np.array_equal(first, next_first)
    seed_step(0, 0, 5)  # as after a resume at step 5
    replay = tuple(o.asnumpy() for o in net(x))
    np.testing.assert_array_equal(replay[0], first)
    np.testing.assert_array_equal(replay[1], second)
    seed_step(0, 1, 5)  # another data-parallel rank
    assert not np.array_equal(net(x)[0].asnumpy(), first)


class NoisyToy(nn.Cell):
    """ε̂ = w ⊙ dropout(x_t) + b, with two dropout layers in a row: a network small enough for a train step."""

    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.full((1, 3, 1, 1), 0.5, np.float32)), name="w")
        self.b = ms.Parameter(ms.Tensor(np.zeros((1, 3, 1, 1), np.float32)), name="b")
        self.first, self.second = Dropout(0.3), Dropout(0.3)

    def construct(self, x, t):
        return self.w * self.second(self.first(x)) + self.b


@needs_kernel
def test_a_train_step_leaves_the_default_generator_alone():
    """The masks come from the dropout layers' own counter: MindSpore's global generator, which every other
    random op draws from, keeps its state through seed_step and a compiled train step."""
    from mind_diffusion.gaussian_diffusion import create_diffusion
    from mind_diffusion.resample import UniformSampler
    from mind_diffusion.train.step import EMA, AdamW, DiffusionLoss, TrainStep, WarmupLR

    model = NoisyToy()
    named = list(model.parameters_and_names())
    step = TrainStep(DiffusionLoss(model, create_diffusion(10, "cosine"), UniformSampler(10)),
                     AdamW(named, WarmupLR(0.1, 0)), EMA(named, (0.9,)))
    rng = np.random.default_rng(0)
    x, noise = (ms.Tensor(rng.standard_normal((2, 3, 4, 4)).astype(np.float32)) for _ in range(2))
    u = ms.Tensor(np.array([0.3, 0.7], np.float32))
    ms.manual_seed(1234)
    before = ms.get_rng_state().asnumpy().copy()
    for k in range(3):
        seed_step(0, 0, k)
        start = int(dropout.COUNTER.value.asnumpy())
        step(x, u, noise)
        assert int(dropout.COUNTER.value.asnumpy()) == start + 2, "each dropout layer takes one counter value"
    np.testing.assert_array_equal(ms.get_rng_state().asnumpy(), before)
    assert ms.initial_seed() == 1234


@needs_kernel
def test_gradient_is_the_same_mask_scaled():
    layer = Dropout(0.4)
    layer.set_train(True)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def construct(self, x, w):
            return (self.layer(x) * w).sum()

    x = np.random.default_rng(1).uniform(0.5, 1.5, (16, 40)).astype(np.float32)
    w = np.random.default_rng(2).normal(size=(16, 40)).astype(np.float32)
    grad = ms.jit(ops.grad(Loss(), grad_position=0))
    seed_step(0, 0, 99)
    dx = grad(ms.Tensor(x), ms.Tensor(w)).asnumpy()
    seed_step(0, 0, 99)
    y = layer(ms.Tensor(x)).asnumpy()
    scale = np.float32(1 / np.float32(1 - np.float32(0.4)))
    np.testing.assert_array_equal(dx, np.where(y != 0, w * scale, 0).astype(np.float32))


def test_eval_mode_and_zero_p_are_identity_and_bad_p_is_refused():
    x = ms.Tensor(np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32))
    layer = Dropout(0.5)
    layer.set_train(False)
    np.testing.assert_array_equal(layer(x).asnumpy(), x.asnumpy())
    zero = Dropout(0.0)
    zero.set_train(True)
    np.testing.assert_array_equal(zero(x).asnumpy(), x.asnumpy())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_disabled_by_env_uses_nn_dropout(monkeypatch):
    monkeypatch.setenv(dropout.ENV_SWITCH, "0")
    assert dropout.status() == (False, f"disabled by {dropout.ENV_SWITCH}=0")
    layer = Dropout(0.5)
    assert not layer.fast
    layer.set_train(True)
    y = layer(ms.Tensor(np.ones((64, 64), np.float32))).asnumpy()
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.4 < (y != 0).mean() < 0.6


def test_op_once_makes_each_operator_once_and_warns_once_when_refused():
    """kernels.aot.op_once, which every C++ path uses to make its Custom operators."""
    import threading
    import warnings
    from mind_diffusion.kernels import aot

    ops_cache, library_cache, lock, made = {}, {}, threading.Lock(), []

    def make():
        made.append(1)
        return "op"

    assert aot.op_once(ops_cache, library_cache, lock, "a", make, "x unavailable") == "op"
    assert aot.op_once(ops_cache, library_cache, lock, "a", make, "x unavailable") == "op"
    assert len(made) == 1

    def refuse():
        raise RuntimeError("excluded by MS_CUSTOM_AOT_WHITE_LIST")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in ("b", "c", "b"):
            assert aot.op_once(ops_cache, library_cache, lock, key, refuse, "x unavailable, using y") is None
    assert [str(w.message) for w in caught] == [
        "mind_diffusion: x unavailable, using y (excluded by MS_CUSTOM_AOT_WHITE_LIST)"]
    assert ops_cache == {"a": "op", "b": None, "c": None}


def test_graphs_built_for_ascend_use_mint_dropout():
    """nn.Dropout's backward (DropoutGrad) has no Ascend kernel: an Ascend-built Dropout takes mint's
    DropoutExt, and a CPU-built one never does."""
    from mind_diffusion.device import building_for
    from mind_diffusion.kernels.dropout import Dropout
    with building_for("Ascend"):
        assert Dropout(0.1).on_npu
    assert not Dropout(0.1).on_npu
