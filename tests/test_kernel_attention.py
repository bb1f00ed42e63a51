"""The fast CPU attention core (mind_diffusion.kernels.attention) against float64 numpy and the ops path.

O = v·softmax(qᵀk/√d)ᵀ per row of R = batch × heads, q [R, d, T], k, v [R, d, S],
through ``models.unet._attend``, forward and the gradients of L = Σ O·w with
respect to q, k, v taken in GRAPH_MODE with ``ms.value_and_grad`` under
``ms.jit``. Errors are max |ours − ref| / max |ref| per output (float32
accuracy: ≤ 1e-5).
"""
import warnings

import numpy as np
import pytest
import mindspore as ms

from mind_diffusion.kernels import attention as kernels
from models.unet import _attend

RTOL = 1e-5


needs_kernel = pytest.mark.kernel(kernels)  # see tests/conftest.py


def reference(q, k, v, w):
    """Float64 O and the gradients (dq, dk, dv) of Σ O·w, by hand."""
    q, k, v, w = (x.astype(np.float64) for x in (q, k, v, w))
    c = 1.0 / np.sqrt(q.shape[1])
    logits = np.einsum("rit,ris->rts", q, k) * c
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("ris,rts->rit", v, p)
    dv = np.einsum("rit,rts->ris", w, p)
    dp = np.einsum("rit,ris->rts", w, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("rts,ris->rit", ds, k) * c
    dk = np.einsum("rts,rit->ris", ds, q) * c
    return out, dq, dk, dv


def data(r, d, t, s, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(0.0, 1.5, (r, d, t)).astype(np.float32)
    k = rng.normal(0.0, 1.5, (r, d, s)).astype(np.float32)
    v = rng.normal(0.0, 1.0, (r, d, s)).astype(np.float32)
    w = rng.normal(0.0, 1.0, (r, d, t)).astype(np.float32)
    return q, k, v, w


def run(monkeypatch, fast, q, k, v, w, dtype=ms.float32):
    """(O, dq, dk, dv) of ``_attend`` from ms.value_and_grad under ms.jit, on the chosen path."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fast else "0")
    chosen = []
    real = kernels.forward_op

    def spy():
        op = real()
        chosen.append(op is not None)
        return op

    monkeypatch.setattr(kernels, "forward_op", spy)
    weight = ms.Tensor(w, dtype)
    d = q.shape[1]

    def loss(q_, k_, v_):
        out = _attend(q_, k_, v_, d, heads=1, training=True)
        return (out * weight).sum().astype(ms.float32), out

    step = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True))
    (_, out), (dq, dk, dv) = step(*(ms.Tensor(x, dtype) for x in (q, k, v)))
    assert chosen and all(c == fast for c in chosen), chosen  # the graph was built on the path asked for
    return tuple(x.asnumpy().astype(np.float64) for x in (out, dq, dk, dv))


def assert_close(got, want, label, rtol=RTOL):
    for name, ours, ref in zip(("O", "dq", "dk", "dv"), got, want):
        assert ours.shape == ref.shape, f"{label} {name}"
        assert np.isfinite(ours).all(), f"{label} {name}"
        error = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)
        assert error <= rtol, f"{label} {name}: max relative error {error:.3g} > {rtol:g}"


# (R, d, T, S): T = S (self-attention), S > T (GLIDE's encoder keys in front), d = 8/32/64,
# R = 1, T = 1, odd sizes that leave every block edge partial.
CASES = [
    (4, 32, 16, 16),
    (3, 32, 16, 40),
    (2, 8, 9, 9),
    (2, 64, 12, 20),
    (1, 32, 7, 13),
    (5, 32, 1, 13),
    (2, 16, 13, 1),
    (1, 4, 7, 13),
    (3, 40, 33, 65),
]


@needs_kernel
@pytest.mark.parametrize("r,d,t,s", CASES)
def test_matches_float64_reference(monkeypatch, r, d, t, s):
    q, k, v, w = data(r, d, t, s)
    assert_close(run(monkeypatch, True, q, k, v, w), reference(q, k, v, w), f"{(r, d, t, s)}")


@needs_kernel
@pytest.mark.parametrize("r,d,t,s", [CASES[1], CASES[4], (8, 32, 64, 64)])
def test_matches_ops_path(monkeypatch, r, d, t, s):
    q, k, v, w = data(r, d, t, s, seed=1)
    ops_path = run(monkeypatch, False, q, k, v, w)
    fast = run(monkeypatch, True, q, k, v, w)
    assert_close(fast, ops_path, f"{(r, d, t, s)} fast vs ops", rtol=2e-5)


@needs_kernel
def test_peaked_softmax_is_stable(monkeypatch):
    """Logits of ±hundreds: the row max is subtracted before exp, nothing overflows.

    A float32 logit of size |L| carries an absolute rounding error ~|L|·1e-7 whatever
    computes it, which exp turns into a relative error of P; the tolerance scales with it.
    """
    q, k, v, w = data(2, 32, 9, 11, seed=2)
    q, k = q * 8.0, k * 8.0
    logits = np.abs(np.einsum("rit,ris->rts", q.astype(np.float64), k) / np.sqrt(32)).max()
    assert logits > 100
    assert_close(run(monkeypatch, True, q, k, v, w), reference(q, k, v, w), "peaked", rtol=RTOL * logits / 10)


def test_float16_takes_ops_path(monkeypatch):
    """float16 keeps the ops path (q·k scaled before the product) even with the kernels on."""
    q, k, v, w = data(2, 32, 8, 8, seed=3)
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    weight = ms.Tensor(w, ms.float16)

    def loss(q_, k_, v_):
        return (_attend(q_, k_, v_, 32, heads=1, training=True) * weight).sum().astype(ms.float32)

    value = ms.jit(loss)(*(ms.Tensor(x, ms.float16) for x in (q, k, v)))
    want = (reference(q, k, v, w)[0] * w).sum()
    assert abs(float(value.asnumpy()) - want) <= 2e-2 * max(1.0, abs(want))


def test_env_switch_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "off")
    assert kernels.status() == (False, f"disabled by {kernels.ENV_SWITCH}=off") and kernels.CHOICE.op is None


@needs_kernel
def test_status_on(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    assert kernels.status()[0] is True and kernels.CHOICE.op is not None


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    """No library: the ops path, and one RuntimeWarning saying why."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    monkeypatch.setattr(kernels, "_library", {})
    monkeypatch.setattr(kernels.aot, "build", lambda *a, **kw: (None, "no C++ compiler (g++) on PATH"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.forward_op() is None
        assert kernels.forward_op() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    q, k, v, w = data(2, 8, 5, 6, seed=4)
    monkeypatch.setattr(kernels, "forward_op", lambda: None)

    def apply(a, b, c):
        return _attend(a, b, c, 8, heads=1)

    out = ms.jit(apply)(*(ms.Tensor(x) for x in (q, k, v)))
    np.testing.assert_allclose(out.asnumpy(), reference(q, k, v, w)[0], rtol=1e-4, atol=1e-5)


def test_inference_graphs_keep_the_ops_path(monkeypatch):
    """The kernel's forward also stores P for the backward; an eval-mode block uses the ops path."""
    from models.unet import AttentionBlock

    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    calls = []
    real = kernels.forward_op

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(kernels, "forward_op", spy)
    block = AttentionBlock(32, num_heads=2)
    x = ms.Tensor(np.random.default_rng(5).standard_normal((2, 32, 4, 4)).astype(np.float32))
    block.set_train(False)
    eval_out = block(x).asnumpy()
    assert not calls  # the inference graph never asked for the kernel
    block.set_train(True)
    train_out = block(x).asnumpy()
    assert calls  # the training graph asked for it (and took it where it is available)
    np.testing.assert_allclose(train_out, eval_out, rtol=1e-5, atol=1e-6)
