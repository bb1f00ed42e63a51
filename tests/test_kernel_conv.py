"""The fast CPU convolution (mind_diffusion.kernels.conv) against float64 numpy and nn.Conv2d.

y = conv(x, w) + b (cross-correlation, PyTorch/MindSpore convention), forward and
the gradients of L = Σ y·r with respect to x, w and b, taken in GRAPH_MODE with
``ms.value_and_grad`` under ``ms.jit`` (and once with ``ops.GradOperation``
inside a Cell). Errors are max |ours − ref| / max |ref| per output (float32
accuracy: ≤ 1e-5).
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.kernels import conv as kernels

RTOL = 1e-5


needs_kernel = pytest.mark.kernel(kernels)  # see tests/conftest.py


def reference(x, w, b, r, stride, pads):
    """Float64 y and the gradients (dx, dw, db) of Σ y·r, by hand (one term per kernel offset);
    with r None, y alone."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    (sh, sw), (pt, pb, pl, pr) = stride, pads
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    y = np.zeros((n, o, oh, ow)) + (0.0 if b is None else b.astype(np.float64)[None, :, None, None])
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    r = None if r is None else r.astype(np.float64)
    for p in range(kh):
        for q in range(kw):
            rows, cols = slice(p, p + sh * (oh - 1) + 1, sh), slice(q, q + sw * (ow - 1) + 1, sw)
            window = (slice(None), slice(None), rows, cols)
            patch = xp[window]  # [n, c, oh, ow]
            y += np.einsum("ncij,oc->noij", patch, w[:, :, p, q])
            if r is None:
                continue
            dw[:, :, p, q] = np.einsum("noij,ncij->oc", r, patch)
            dxp[window] += np.einsum("noij,oc->ncij", r, w[:, :, p, q])
    if r is None:
        return y
    dx = dxp[:, :, pt:pt + h, pl:pl + wd]
    return y, dx, dw, r.sum((0, 2, 3))


def assert_close(ours, ref, what, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    assert np.isfinite(ours).all(), what
    error = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert error <= rtol, f"{what}: max relative error {error:.3g} > {rtol:g}"


def make(monkeypatch, fast, cin, cout, kernel, stride=1, pad_mode="pad", padding=0, has_bias=True, cls=None, **kw):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fast else "0")
    cell = (cls or kernels.Conv2d)(cin, cout, kernel, stride=stride, pad_mode=pad_mode, padding=padding,
                                   has_bias=has_bias, **kw)
    if cls is None:
        assert cell.fast == fast
    return cell


def run(cell, x, r):
    """(y, dx, dw, db or None) from ms.value_and_grad under ms.jit (GRAPH_MODE)."""
    weight = ms.Tensor(r)

    def loss(x_):
        y = cell(x_)
        return (y * weight).sum(), y

    step = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=cell.trainable_params(), has_aux=True))
    (_, y), (dx, grads) = step(ms.Tensor(x))
    db = grads[1].asnumpy() if len(grads) > 1 else None
    return y.asnumpy(), dx.asnumpy(), grads[0].asnumpy(), db


def data(cell, x_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, x_shape).astype(np.float32)
    w = rng.normal(0.0, 0.3, cell.weight.shape).astype(np.float32)
    cell.weight.set_data(ms.Tensor(w))
    b = None
    if cell.has_bias:
        b = rng.normal(0.0, 0.5, cell.bias.shape).astype(np.float32)
        cell.bias.set_data(ms.Tensor(b))
    return x, w, b, rng


def test_reference_gradients_match_finite_differences():
    """The hand-written float64 backward above, checked once by central differences."""
    rng = np.random.default_rng(3)
    x, w, b = rng.normal(size=(1, 2, 4, 5)), rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3)
    stride, pads = (2, 1), (1, 0, 1, 1)
    r = rng.normal(size=reference(x, w, b, None, stride, pads).shape)
    _, dx, dw, db = reference(x, w, b, r, stride, pads)
    h = 1e-6

    def numeric(arr):
        grad = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = (reference(x, w, b, r, stride, pads)[0] * r).sum()
            arr[i] = old - h
            down = (reference(x, w, b, r, stride, pads)[0] * r).sum()
            arr[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    for ours, arr in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(ours, numeric(arr), rtol=1e-6, atol=1e-7)


# (x shape, out channels, kernel, stride, pad_mode, padding, has_bias): the UNet's 3x3 conv, odd sizes,
# 3 → 6 channels, batch 1, stride 2 on odd and even sizes, asymmetric padding, 1x1, 5x5 "same", no bias.
CASES = [
    ((2, 16, 8, 8), 16, 3, 1, "pad", 1, True),
    ((1, 3, 5, 7), 6, 3, 1, "pad", 1, True),
    ((2, 3, 5, 7), 6, 3, 2, "pad", 1, True),
    ((1, 8, 6, 8), 12, 3, 2, "pad", 1, False),
    ((2, 5, 7, 6), 4, 3, 2, "pad", (0, 1, 1, 0), True),
    ((2, 6, 5, 7), 9, 1, 1, "valid", 0, True),
    ((1, 4, 9, 6), 5, 5, 1, "same", 0, True),
]


def geometry(cell):
    return kernels.geometry_of(cell.kernel_size, cell.stride, cell.pad_mode, cell.padding)


@needs_kernel
@pytest.mark.parametrize("x_shape,cout,kernel,stride,pad_mode,padding,has_bias", CASES)
def test_matches_float64_reference(monkeypatch, x_shape, cout, kernel, stride, pad_mode, padding, has_bias):
    cell = make(monkeypatch, True, x_shape[1], cout, kernel, stride, pad_mode, padding, has_bias)
    x, w, b, rng = data(cell, x_shape)
    g = geometry(cell)
    r = rng.normal(0.0, 1.0, reference(x, w, b, None, g[:2], g[2:]).shape).astype(np.float32)
    want = reference(x, w, b, r, g[:2], g[2:])
    before = kernels.call_counts()
    got = run(cell, x, r)
    assert all(a > b for a, b in zip(kernels.call_counts(), before)), "the fast kernels did not run"
    for name, ours, ref in zip(("y", "dx", "dw", "db"), got, want):
        if name == "db" and not has_bias:
            assert ours is None
            continue
        assert_close(ours, ref, f"{x_shape} k{kernel} s{stride} {pad_mode} {padding} {name}")


@needs_kernel
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_matches_nn_conv2d(monkeypatch, case):
    x_shape, cout, kernel, stride, pad_mode, padding, has_bias = case
    ref = make(monkeypatch, False, x_shape[1], cout, kernel, stride, pad_mode, padding, has_bias, cls=nn.Conv2d)
    x, _, _, rng = data(ref, x_shape, seed=1)
    fast = make(monkeypatch, True, x_shape[1], cout, kernel, stride, pad_mode, padding, has_bias)
    ms.load_param_into_net(fast, ref.parameters_dict(), strict_load=True)
    r = rng.normal(0.0, 1.0, ref(ms.Tensor(x)).shape).astype(np.float32)
    for name, ours, want in zip(("y", "dx", "dw", "db"), run(fast, x, r), run(ref, x, r)):
        assert_close(ours, want, f"{case} vs nn.Conv2d {name}")


@needs_kernel
def test_parameters_like_nn_conv2d(monkeypatch):
    """Same parameter names, shapes, dtypes and initial distribution as nn.Conv2d (a drop-in)."""
    fast = make(monkeypatch, True, 64, 32, 3, 1, "pad", 1, True)
    ref = make(monkeypatch, False, 64, 32, 3, 1, "pad", 1, True, cls=nn.Conv2d)
    assert [(p.name, p.shape, p.dtype) for p in fast.get_parameters()] == \
           [(p.name, p.shape, p.dtype) for p in ref.get_parameters()]
    bound = 1.0 / np.sqrt(64 * 9)  # HeUniform(√5) and the bias's Uniform both give U(−1/√fan_in, 1/√fan_in)
    for p in fast.get_parameters():
        v = p.asnumpy()
        assert np.abs(v).max() <= bound and v.std() > 0.5 * bound / np.sqrt(3)


@needs_kernel
def test_chain_in_cell_with_grad_operation(monkeypatch):
    """Two fast convolutions with a residual, differentiated by ops.GradOperation inside a Cell
    (the training-step pattern), against the same network of nn.Conv2d."""

    class Net(nn.Cell):
        def __init__(self, fast):
            super().__init__()
            cls = None if fast else nn.Conv2d
            self.a = make(monkeypatch, fast, 8, 8, 3, 1, "pad", 1, True, cls=cls)
            self.b = make(monkeypatch, fast, 8, 4, 3, 2, "pad", 1, True, cls=cls)

        def construct(self, x):
            h = x + ops.silu(self.a(x))
            return self.b(h)

    class Grad(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.params = ms.ParameterTuple(net.trainable_params())
            self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

        def construct(self, x, sens):
            return self.grad(self.net, self.params)(x, sens)

    ref_net, fast_net = Net(False), Net(True)
    ms.load_param_into_net(fast_net, ref_net.parameters_dict(), strict_load=True)
    rng = np.random.default_rng(5)
    x = ms.Tensor(rng.normal(size=(2, 8, 7, 9)).astype(np.float32))
    sens = ms.Tensor(rng.normal(size=(2, 4, 4, 5)).astype(np.float32))
    (dx_ref,), grads_ref = Grad(ref_net)(x, sens)
    (dx_fast,), grads_fast = Grad(fast_net)(x, sens)
    assert_close(dx_fast.asnumpy(), dx_ref.asnumpy(), "dx")
    assert len(grads_fast) == len(grads_ref) == 4
    for i, (ours, want) in enumerate(zip(grads_fast, grads_ref)):
        assert_close(ours.asnumpy(), want.asnumpy(), f"param {i}")


def test_env_switch_and_unsupported_settings_fall_back(monkeypatch):
    off = make(monkeypatch, False, 4, 4, 3, 1, "pad", 1, True)
    assert off.fast_op is None
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    for kwargs in (dict(group=2), dict(dilation=2), dict(pad_mode="same", stride=2)):
        kwargs = {"pad_mode": "pad", "padding": 1, **kwargs}
        if kwargs["pad_mode"] == "same":
            kwargs.pop("padding")
        cell = kernels.Conv2d(4, 4, 3, has_bias=True, **kwargs)
        assert not cell.fast, kwargs
        ref = nn.Conv2d(4, 4, 3, has_bias=True, **kwargs)
        ms.load_param_into_net(cell, ref.parameters_dict(), strict_load=True)
        x = ms.Tensor(np.random.default_rng(6).normal(size=(1, 4, 6, 6)).astype(np.float32))
        np.testing.assert_array_equal(cell(x).asnumpy(), ref(x).asnumpy())


@needs_kernel
@pytest.mark.parametrize("layout,batch", [("plain", 1), ("auto", 2)])
def test_layout_choices(monkeypatch, layout, batch):
    """MIND_DIFFUSION_CONV_LAYOUT=plain (NCHW throughout) and =auto (both layouts alternate over the
    first calls of a shape, then the faster stays): every call matches the reference. The variable is
    read when a shape first runs, so each case has a shape of its own."""
    monkeypatch.setenv("MIND_DIFFUSION_CONV_LAYOUT", layout)
    x_shape = (batch, 5, 6, 7)
    cell = make(monkeypatch, True, 5, 7, 3, 1, "pad", 1, True)
    x, w, b, rng = data(cell, x_shape, seed=7)
    r = rng.normal(0.0, 1.0, (batch, 7, 6, 7)).astype(np.float32)
    want = reference(x, w, b, r, (1, 1), (1, 1, 1, 1))
    for call in range(8 if layout == "auto" else 1):
        for name, ours, ref in zip(("y", "dx", "dw", "db"), run(cell, x, r), want):
            assert_close(ours, ref, f"{layout} call {call} {name}")
