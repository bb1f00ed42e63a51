"""mind_diffusion.nn building blocks against improved-diffusion's outputs and numpy recomputations."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from mind_diffusion.kernels import conv as conv_kernels

from mind_diffusion.nn import (
    AvgPool2x2,
    Conv1x1,
    GroupNorm32,
    conv_nd,
    timestep_embedding,
    upsample_nearest_2x,
    zero_module,
)


class _Embed(nn.Cell):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def construct(self, t):
        return timestep_embedding(t, self.dim)


class _Upsample(nn.Cell):
    def construct(self, x):
        return upsample_nearest_2x(x)


@pytest.mark.parametrize("dim", [64, 7])
def test_timestep_embedding_matches_improved_diffusion(ref, dim):
    got = _Embed(dim)(ms.Tensor(ref["nn/timesteps"])).asnumpy()
    want = ref[f"nn/timestep_embedding_d{dim}"]
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    # Elementwise, t = 999 stays ~3e-5 off: PyTorch's float32 exp is off by one
    # ulp in a few frequencies, and one ulp times t ≈ 1000 shifts the argument.
    assert np.abs(got - want).max() <= 5e-5


def _group_norm(x, groups, gamma, beta, eps=1e-5):
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1).astype(np.float64)
    normed = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return normed.reshape(x.shape) * gamma.reshape(shape) + beta.reshape(shape)


@pytest.mark.parametrize("shape", [(2, 64, 4, 4), (2, 64, 5), (3, 64)])
def test_group_norm32_any_rank(shape):
    rng = np.random.default_rng(0)
    norm = GroupNorm32(32, 64)
    gamma, beta = rng.normal(1, 0.1, 64).astype(np.float32), rng.normal(0, 0.1, 64).astype(np.float32)
    norm.gamma.set_data(ms.Tensor(gamma))
    norm.beta.set_data(ms.Tensor(beta))
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    got = norm(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(got, _group_norm(x, 32, gamma, beta), atol=2e-5)


def test_group_norm32_keeps_float16_input_dtype_with_float32_statistics():
    rng = np.random.default_rng(1)
    x = (rng.normal(0, 1, (2, 32, 4, 4)) + 300).astype(np.float16)  # a large mean: float16 statistics would fail
    got = GroupNorm32(32, 32)(ms.Tensor(x))
    assert got.dtype == ms.float16
    want = _group_norm(x.astype(np.float32), 32, np.ones(32), np.zeros(32))
    np.testing.assert_allclose(got.asnumpy().astype(np.float32), want, atol=2e-2)


def test_conv1x1_is_pytorch_conv1d_kernel_1():
    rng = np.random.default_rng(2)
    conv = Conv1x1(6, 4)
    assert conv.weight.shape == (4, 6, 1) and conv.bias.shape == (4,)
    x = rng.normal(size=(2, 6, 5)).astype(np.float32)
    want = np.einsum("oi,bil->bol", conv.weight.asnumpy()[:, :, 0], x) + conv.bias.asnumpy()[:, None]
    np.testing.assert_allclose(conv(ms.Tensor(x)).asnumpy(), want, atol=1e-5)


class _Conv1x1Grads(nn.Cell):
    """Gradients of Σ conv(x) ⊙ g with respect to x, the weight and the bias."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.weights = ms.ParameterTuple((conv.weight, conv.bias))
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def loss(self, x, g):
        return (self.conv(x) * g).sum()

    def construct(self, x, g):
        return self.grad(self.loss, self.weights)(x, g)


@pytest.mark.parametrize("fast", [pytest.param(True, marks=pytest.mark.kernel(conv_kernels)), False])
def test_conv1x1_forward_and_gradients_on_both_paths(monkeypatch, fast):
    """The oneDNN 1×1 operator (CPU, float32, training) and the matmul path both give y = W x + b and its gradients
    dx = Wᵀ g, dW = Σ g xᵀ, db = Σ g, against float64 NumPy."""
    monkeypatch.setenv(conv_kernels.ENV_SWITCH, "1" if fast else "0")
    conv = Conv1x1(24, 40)
    conv.set_train(True)  # the oneDNN path serves training graphs
    assert (conv.fast_op is not None) == fast
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 24, 17)).astype(np.float32)
    g = rng.normal(size=(3, 40, 17)).astype(np.float32)
    w, b = conv.weight.asnumpy()[:, :, 0].astype(np.float64), conv.bias.asnumpy().astype(np.float64)
    calls = conv_kernels.call_counts()
    np.testing.assert_allclose(conv(ms.Tensor(x)).asnumpy(), np.einsum("oi,bil->bol", w, x) + b[:, None],
                               rtol=1e-5, atol=1e-5)
    (dx, _), (dw, db) = _Conv1x1Grads(conv)(ms.Tensor(x), ms.Tensor(g))
    ran = [after - before for after, before in zip(conv_kernels.call_counts(), calls)]
    assert ran == ([2, 1, 1] if fast else [0, 0, 0])  # forward twice, each backward once: the path taken
    np.testing.assert_allclose(dx.asnumpy(), np.einsum("oi,bol->bil", w, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy()[:, :, 0], np.einsum("bol,bil->oi", g, x), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db.asnumpy(), g.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)


def test_conv_nd_rejects_what_it_cannot_build():
    assert isinstance(conv_nd(2, 3, 8, 3, padding=1), nn.Conv2d)
    with pytest.raises(ValueError, match="unsupported convolution"):
        conv_nd(1, 3, 8, 3)


def test_upsample_nearest_2x_repeats_pixels():
    x = np.arange(2 * 3 * 2 * 3, dtype=np.float32).reshape(2, 3, 2, 3)
    got = _Upsample()(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got, x.repeat(2, axis=2).repeat(2, axis=3))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_avg_pool_2x2_is_the_block_mean_and_its_gradient_a_quarter(dtype):
    """Values that are exact in both dtypes (multiples of 1/4 up to 64): the block means are exact too."""
    x = (np.random.default_rng(3).integers(0, 256, (2, 3, 4, 6)) / 4).astype(dtype)
    want = x.astype(np.float64).reshape(2, 3, 2, 2, 3, 2).mean(axis=(3, 5))
    pool = AvgPool2x2()
    got = pool(ms.Tensor(x))
    assert got.dtype == ms.Tensor(x).dtype
    np.testing.assert_array_equal(got.asnumpy().astype(np.float64), want)

    def total(v):
        return pool(v).sum()

    grad = ms.grad(total)(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(grad, np.full(x.shape, 0.25, dtype))


def test_zero_module_zeroes_every_parameter():
    conv = zero_module(conv_nd(2, 4, 4, 3, padding=1))
    assert all(not p.asnumpy().any() for p in conv.get_parameters())
