"""The fast CPU GroupNorm (mind_diffusion.kernels.group_norm) against float64 numpy and the pure-ops path.

y = γ (x − μ_g)/√(σ_g² + ε) + β, optionally then AdaGN's y (1 + s) + t and SiLU,
forward and the gradients of L = Σ y·w with respect to x, γ, β (and [s | t]),
taken in GRAPH_MODE with ``ms.value_and_grad`` under ``ms.jit`` and with
``ops.GradOperation`` inside a Cell. Errors are measured as
max |ours − ref| / max |ref| per output (float32 accuracy: ≤ 1e-5), except
that ∂L/∂x is measured against the size of the terms it is the difference of,
r·|∂L/∂x̂|: in groups of 2 or 3 elements those nearly cancel (a 2-element group
normalises to ±1 whatever x is, so ∂L/∂x is O(ε) and float32 rounding of the
terms dominates — MindSpore's own GroupNorm is no closer there).
"""
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.kernels import group_norm as kernels
from mind_diffusion.nn import GroupNorm32, normalization_silu

EPS = 1e-5
RTOL = 1e-5


needs_kernel = pytest.mark.kernel(kernels)  # see tests/conftest.py


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference(x, gamma, beta, groups, w, ss=None, silu=False):
    """Float64 forward y and the gradients (dx, dgamma, dbeta, dss) of Σ y·w, by hand."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    gamma, beta = gamma.astype(np.float64)[None, :, None], beta.astype(np.float64)[None, :, None]
    xg = x.reshape(n, groups, -1)
    r = 1.0 / np.sqrt(xg.var(-1, keepdims=True) + EPS)
    xhat = ((xg - xg.mean(-1, keepdims=True)) * r).reshape(n, c, -1)
    u = xhat * gamma + beta
    scale1, shift = (1.0, 0.0) if ss is None else (1.0 + ss[:, :c, None].astype(np.float64), ss[:, c:, None])
    z = u * scale1 + shift
    y = z * sigmoid(z) if silu else z
    dz = w.reshape(n, c, -1).astype(np.float64)
    if silu:
        dz = dz * sigmoid(z) * (1.0 + z * (1.0 - sigmoid(z)))
    du = dz * scale1
    dgamma, dbeta = (du * xhat).sum((0, 2)), du.sum((0, 2))
    dss = None if ss is None else np.concatenate([(dz * u).sum(2), dz.sum(2)], axis=1)
    dxhat = (du * gamma).reshape(n, groups, -1)
    xhat_g = xhat.reshape(n, groups, -1)
    dx = r * (dxhat - dxhat.mean(-1, keepdims=True) - xhat_g * (dxhat * xhat_g).mean(-1, keepdims=True))
    return y.reshape(x.shape), dx.reshape(x.shape), dgamma, dbeta, dss


def dx_scale(x, gamma, groups, w, ss=None):
    """max r·|∂L/∂x̂|: the size of the terms whose difference is ∂L/∂x."""
    n, c = x.shape[:2]
    r = 1.0 / np.sqrt(x.astype(np.float64).reshape(n, groups, -1).var(-1, keepdims=True) + EPS)
    dz = w.reshape(n, c, -1).astype(np.float64)  # |SiLU'| ≤ 1.1, so 1.1·|w| bounds |∂L/∂z|
    gain = np.abs(gamma).reshape(1, c, 1) * (1.0 if ss is None else np.abs(1.0 + ss[:, :c, None]))
    return 1.1 * (r * (np.abs(dz) * gain).reshape(n, groups, -1)).max()


def assert_close(ours, ref, rtol=RTOL, what="", scale=0.0):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    assert np.isfinite(ours).all(), what
    error = np.abs(ours - ref).max() / max(np.abs(ref).max(), scale, 1e-30)
    assert error <= rtol, f"{what}: max relative error {error:.3g} > {rtol:g}"


def make_norm(monkeypatch, fast, channels, groups=32, silu=False):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fast else "0")
    norm = GroupNorm32(groups, channels, activation="silu" if silu else None)
    assert (norm.fast is not None) == fast
    return norm


def data(shape, seed=0, offset=0.5, with_ss=False):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.normal(offset, 2.0, shape).astype(np.float32)
    gamma = rng.normal(1.0, 0.3, c).astype(np.float32)
    beta = rng.normal(0.0, 0.3, c).astype(np.float32)
    w = rng.normal(0.0, 1.0, shape).astype(np.float32)
    ss = rng.normal(0.0, 0.5, (shape[0], 2 * c)).astype(np.float32) if with_ss else None
    return x, gamma, beta, w, ss


def run(norm, x, gamma, beta, w, ss=None):
    """(y, dx, dgamma, dbeta, dss) from ms.value_and_grad under ms.jit (GRAPH_MODE)."""
    norm.gamma.set_data(ms.Tensor(gamma))
    norm.beta.set_data(ms.Tensor(beta))
    weight = ms.Tensor(w)
    spatial = (1,) * (x.ndim - 2)

    if ss is None:
        def loss(x_):
            y = norm(x_)
            return (y * weight).sum(), y
        step = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=norm.trainable_params(), has_aux=True))
        (_, y), (dx, (dgamma, dbeta)) = step(ms.Tensor(x))
        dss = None
    else:
        def loss(x_, ss_):
            y = norm(x_, ss_.reshape(ss_.shape + spatial))
            return (y * weight).sum(), y
        step = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1), weights=norm.trainable_params(), has_aux=True))
        (_, y), ((dx, dss), (dgamma, dbeta)) = step(ms.Tensor(x), ms.Tensor(ss))
    return y.asnumpy(), dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy(), None if ss is None else dss.asnumpy()


def check(got, want, label, scale_dx=0.0):
    for name, ours, ref in zip(("y", "dx", "dgamma", "dbeta", "dss"), got, want):
        if ref is not None:
            assert_close(ours, ref, what=f"{label} {name}", scale=scale_dx if name == "dx" else 0.0)


def test_reference_gradients_match_finite_differences():
    """The hand-written float64 backward above, checked once by central differences."""
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    gamma, beta, ss = rng.normal(1, 0.3, 4), rng.normal(0, 0.3, 4), rng.normal(0, 0.5, (2, 8))
    _, dx, dgamma, dbeta, dss = reference(x, gamma, beta, 2, w, ss=ss, silu=True)
    h = 1e-6

    def numeric(arr, f):
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = f()
            arr[i] = old - h
            down = f()
            arr[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    def f():
        return (reference(x, gamma, beta, 2, w, ss=ss, silu=True)[0] * w).sum()

    for ours, arr in ((dx, x), (dgamma, gamma), (dbeta, beta), (dss, ss)):
        np.testing.assert_allclose(ours, numeric(arr, f), rtol=1e-6, atol=1e-7)


# Shapes: channels 32/64/96, spatial 4x4, 7x5, 1x1, rank 3 (attention tokens), rank 2 [N, C], batch 1.
CASES = [
    ((2, 32, 4, 4), False, False),
    ((3, 64, 7, 5), True, False),
    ((1, 96, 7, 5), True, True),
    ((2, 64, 1, 1), True, False),
    ((2, 96, 1, 1), False, True),
    ((2, 64, 9), False, False),
    ((4, 64), True, False),
    ((1, 96), False, False),
    ((1, 32, 4, 4), True, True),
]


@needs_kernel
@pytest.mark.parametrize("shape,silu,with_ss", CASES)
def test_matches_float64_reference(monkeypatch, shape, silu, with_ss):
    x, gamma, beta, w, ss = data(shape, with_ss=with_ss)
    got = run(make_norm(monkeypatch, True, shape[1], silu=silu), x, gamma, beta, w, ss)
    check(got, reference(x, gamma, beta, 32, w, ss=ss, silu=silu), f"{shape} silu={silu} ss={with_ss}",
          scale_dx=dx_scale(x, gamma, 32, w, ss=ss))


@needs_kernel
@pytest.mark.parametrize("shape,silu,with_ss", [CASES[1], CASES[2], CASES[6]])
def test_matches_pure_ops_path(monkeypatch, shape, silu, with_ss):
    x, gamma, beta, w, ss = data(shape, seed=1, with_ss=with_ss)
    pure = run(make_norm(monkeypatch, False, shape[1], silu=silu), x, gamma, beta, w, ss)
    fast = run(make_norm(monkeypatch, True, shape[1], silu=silu), x, gamma, beta, w, ss)
    check(fast, pure, f"{shape} fast vs pure")


@needs_kernel
def test_other_group_counts(monkeypatch):
    """nn.GroupNorm's general G (here 8 groups of 12 channels): the kernel reads G from its stats output."""
    shape = (2, 96, 3, 4)
    x, gamma, beta, w, _ = data(shape, seed=2)
    got = run(make_norm(monkeypatch, True, 96, groups=8), x, gamma, beta, w)
    check(got, reference(x, gamma, beta, 8, w), "8 groups")


@needs_kernel
def test_large_mean_keeps_float32_accuracy(monkeypatch):
    """|μ|/σ = 10⁴: one-pass float32 statistics would be wrong in every digit; two-pass float64 are not."""
    shape = (2, 64, 4, 4)
    x, gamma, beta, w, _ = data(shape, seed=4)
    x = (x * 0.1 + 1000.0).astype(np.float32)
    got = run(make_norm(monkeypatch, True, 64, silu=True), x, gamma, beta, w)
    check(got, reference(x, gamma, beta, 32, w, silu=True), "mean 1000")


@needs_kernel
def test_single_element_groups_are_beta(monkeypatch):
    """32 channels in 32 groups at 1x1: x̂ = 0, so y = β exactly and ∂L/∂x vanishes up to rounding."""
    x, gamma, beta, w, _ = data((2, 32, 1, 1), seed=5)
    y, dx, dgamma, dbeta, _ = run(make_norm(monkeypatch, True, 32), x, gamma, beta, w)
    np.testing.assert_array_equal(y, np.broadcast_to(beta[None, :, None, None], y.shape))
    assert np.abs(dx).max() <= 1e-5 * np.abs(w * gamma[None, :, None, None]).max() / np.sqrt(EPS)
    np.testing.assert_allclose(dbeta, w.sum((0, 2, 3)), rtol=1e-6)
    assert np.abs(dgamma).max() == 0


class _TrainStep(nn.Cell):
    """A train-like graph: two fused norms (the second with AdaGN) around a 1x1 mixing, the gradient of
    a loss with respect to every parameter and the input by ops.GradOperation, inside construct."""

    def __init__(self, channels):
        super().__init__()
        self.body = _Body(channels)
        self.weights = ms.ParameterTuple(self.body.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x, ss):
        return self.body(x, ss), self.grad(self.body, self.weights)(x, ss)


class _Body(nn.Cell):
    def __init__(self, channels):
        super().__init__()
        self.norm1 = nn.SequentialCell(normalization_silu(channels))
        self.norm2 = GroupNorm32(32, channels, activation="silu")
        self.mix = nn.Dense(channels, channels)
        self.head = GroupNorm32(32, channels)

    def construct(self, x, ss):
        h = self.norm1(x)
        h = self.mix(h.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        h = self.norm2(h, ss)
        return (self.head(h.mean(axis=(2, 3))) ** 2).mean()


@needs_kernel
def test_train_like_graph_matches_pure_ops(monkeypatch):
    rng = np.random.default_rng(6)
    x = ms.Tensor(rng.normal(0, 1.5, (2, 64, 5, 6)).astype(np.float32))
    ss = ms.Tensor(rng.normal(0, 0.5, (2, 128, 1, 1)).astype(np.float32))
    values = None
    results = []
    for fast in (False, True):
        monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fast else "0")
        step = _TrainStep(64)
        assert (step.body.norm2.fast is not None) == fast
        params = step.body.trainable_params()
        if values is None:  # random γ, β, weights (nn.GroupNorm starts at 1, 0), the same for both nets
            values = [rng.normal(0.5, 0.3, p.shape).astype(np.float32) for p in params]
        for p, v in zip(params, values):
            p.set_data(ms.Tensor(v))
        loss, (inputs, grads) = step(x, ss)
        results.append([loss.asnumpy()] + [g.asnumpy() for g in inputs] + [g.asnumpy() for g in grads])
    assert len(results[0]) == len(results[1]) == 1 + 2 + 8
    for i, (pure, fast) in enumerate(zip(*results)):
        assert_close(fast, pure, rtol=2e-5, what=f"train-like graph output {i}")


@needs_kernel
@pytest.mark.parametrize("options", [dict(use_scale_shift_norm=True, down=True), dict(out_channels=96)])
def test_unet_resblock_matches_pure_ops(monkeypatch, options):
    """The UNet's ResBlock wiring (norm+SiLU fused, the SiLU slot an identity, AdaGN fused), forward and grads."""
    from models.unet import ResBlock

    rng = np.random.default_rng(8)
    x = ms.Tensor(rng.normal(0.2, 1.0, (2, 64, 6, 6)).astype(np.float32))
    emb = ms.Tensor(rng.normal(0, 1, (2, 16)).astype(np.float32))
    values, results = None, []
    for fast in (False, True):
        monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fast else "0")
        block = ResBlock(64, 16, 0.0, **options)
        assert isinstance(block.in_layers[1], nn.Identity) and isinstance(block.out_layers[1], nn.Identity)
        params = block.trainable_params()
        if values is None:  # every parameter random: the zero-initialised last conv would hide the first norm
            values = [rng.normal(0.5 if "gamma" in p.name else 0.0, 0.3, p.shape).astype(np.float32) for p in params]
        for p, v in zip(params, values):
            p.set_data(ms.Tensor(v))

        def loss(x_, emb_):
            return (block(x_, emb_) ** 2).mean()

        value, ((dx, demb), grads) = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1), weights=params))(x, emb)
        # Biases added right before a norm (the first conv's; the embedding's without AdaGN) are left
        # out: the norm removes them, so their gradient is 0 up to rounding.
        before_norm = ("in_layers.2.bias",) + (() if block.use_scale_shift_norm else ("emb_layers.1.bias",))
        results.append([value, dx, demb] + [g for g, p in zip(grads, params) if not p.name.endswith(before_norm)])
    for i, (pure, fast) in enumerate(zip(*results)):
        assert_close(fast.asnumpy(), pure.asnumpy(), rtol=2e-5, what=f"ResBlock {options} output {i}")


def test_disabled_by_env_uses_pure_ops(monkeypatch):
    for value in ("0", "false", "off"):
        monkeypatch.setenv(kernels.ENV_SWITCH, value)
        assert kernels.status() == (False, f"disabled by {kernels.ENV_SWITCH}={value}")
        assert GroupNorm32(32, 64).fast is None


@needs_kernel
def test_float16_uses_pure_ops_with_the_kernel_on(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    norm = GroupNorm32(32, 64, activation="silu")
    assert norm.fast is not None
    x = np.random.default_rng(7).normal(0, 1, (2, 64, 3, 3)).astype(np.float16)
    got = norm(ms.Tensor(x))  # not float32: the pure path, in x's dtype
    assert got.dtype == ms.float16
    want = reference(x.astype(np.float32), np.ones(64), np.zeros(64), 32, np.ones_like(x), silu=True)[0]
    np.testing.assert_allclose(got.asnumpy().astype(np.float32), want, atol=1e-2)


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    monkeypatch.setattr(kernels, "_library", {})
    monkeypatch.setattr(kernels.aot, "build", lambda *args: (None, "g++ failed (test)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert GroupNorm32(32, 64).fast is None
        assert GroupNorm32(32, 64, activation="silu").fast is None
        available, reason = kernels.status()
    assert not available and "g++ failed" in reason
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "mind_diffusion: fast GroupNorm unavailable, using pure ops (g++ failed (test))"]


def test_bad_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        GroupNorm32(32, 64, activation="relu")
