"""Cross-attention blocks (models/cross_attention.py) against numpy re-computations."""
import numpy as np
import pytest
from scipy.special import erf

import mindspore as ms

from models.cross_attention import CrossAttention, SpatialTransformer

B, N, L, QUERY_DIM, CONTEXT_DIM, HEADS, DIM_HEAD = 3, 6, 5, 16, 12, 2, 8
# sample 0: 3 real context tokens, sample 1: all real, sample 2: all padding (empty caption)
CONTEXT_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)


def randomize(net, seed):
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        param.set_data(ms.Tensor(rng.normal(0.0, 0.3, param.shape).astype(np.float32)))
    return {p.name: p.asnumpy().astype(np.float64) for p in net.get_parameters()}


def np_softmax_masked(logits, allowed):
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def np_cross_attention(p, prefix, x, context, mask):
    """Multi-head attention written per head with explicit loops over the batch."""
    q, k, v = (a @ p[prefix + name].T for a, name in ((x, "to_q.weight"), (context, "to_k.weight"),
                                                       (context, "to_v.weight")))
    out = np.zeros_like(q)
    for b in range(x.shape[0]):
        keys = mask[b] if mask[b].any() else np.ones_like(mask[b])
        for h in range(HEADS):
            cols = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
            w = np_softmax_masked(q[b, :, cols] @ k[b, :, cols].T / np.sqrt(DIM_HEAD), keys[None])
            out[b, :, cols] = w @ v[b, :, cols]
    return out @ p[prefix + "to_out.0.weight"].T + p[prefix + "to_out.0.bias"]


def np_layer_norm(x, gain, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * gain + bias


def np_group_norm(x, groups, gain, bias):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    return g.reshape(b, c, h, w) * gain[None, :, None, None] + bias[None, :, None, None]


def np_spatial_transformer(p, x, context, mask, groups):
    b, c, height, width = x.shape
    h = np_group_norm(x, groups, p["norm.gamma"], p["norm.beta"])
    h = np.einsum("oc,bchw->bhwo", p["proj_in.weight"][:, :, 0, 0], h) + p["proj_in.bias"]
    h = h.reshape(b, height * width, -1)
    blk = "transformer_blocks.0."
    everything = np.ones((b, h.shape[1]), bool)
    h = h + np_cross_attention(p, blk + "attn1.", np_layer_norm(h, p[blk + "norm1.gamma"], p[blk + "norm1.beta"]),
                               np_layer_norm(h, p[blk + "norm1.gamma"], p[blk + "norm1.beta"]), everything)
    h = h + np_cross_attention(p, blk + "attn2.", np_layer_norm(h, p[blk + "norm2.gamma"], p[blk + "norm2.beta"]),
                               context, mask)
    f = np_layer_norm(h, p[blk + "norm3.gamma"], p[blk + "norm3.beta"]) @ p[blk + "ff.net.0.proj.weight"].T
    f = f + p[blk + "ff.net.0.proj.bias"]
    value, gate = np.split(f, 2, axis=-1)
    f = value * 0.5 * gate * (1.0 + erf(gate / np.sqrt(2.0)))
    h = h + f @ p[blk + "ff.net.2.weight"].T + p[blk + "ff.net.2.bias"]
    h = h.reshape(b, height, width, -1)
    return x + np.einsum("oc,bhwc->bohw", p["proj_out.weight"][:, :, 0, 0], h) + p["proj_out.bias"][None, :, None, None]


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    return rng.normal(size=(B, N, QUERY_DIM)).astype(np.float32), rng.normal(size=(B, L, CONTEXT_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def cross_attention():
    net = CrossAttention(QUERY_DIM, CONTEXT_DIM, heads=HEADS, dim_head=DIM_HEAD)
    net.set_train(False)
    return net, randomize(net, 2)


def test_cross_attention_matches_numpy(cross_attention, inputs):
    net, params = cross_attention
    x, context = inputs
    out = net(ms.Tensor(x), ms.Tensor(context), ms.Tensor(CONTEXT_MASK)).asnumpy()
    assert out.shape == (B, N, QUERY_DIM)
    np.testing.assert_allclose(out, np_cross_attention(params, "", x, context, CONTEXT_MASK), rtol=1e-4, atol=1e-5)


def test_padded_context_is_ignored(cross_attention, inputs):
    net, _ = cross_attention
    x, context = inputs
    changed = np.where(CONTEXT_MASK[..., None], context, 100.0).astype(np.float32)
    out = net(ms.Tensor(x), ms.Tensor(context), ms.Tensor(CONTEXT_MASK)).asnumpy()
    out_changed = net(ms.Tensor(x), ms.Tensor(changed), ms.Tensor(CONTEXT_MASK)).asnumpy()
    np.testing.assert_allclose(out_changed[:2], out[:2], rtol=0, atol=1e-6)


def spatial_transformer():
    net = SpatialTransformer(8, heads=HEADS, dim_head=DIM_HEAD, depth=1, context_dim=CONTEXT_DIM, num_groups=4)
    net.set_train(False)
    return net


def test_spatial_transformer_starts_as_identity(inputs):
    x = np.random.default_rng(3).normal(size=(B, 8, 2, 3)).astype(np.float32)
    out = spatial_transformer()(ms.Tensor(x), ms.Tensor(inputs[1]), ms.Tensor(CONTEXT_MASK)).asnumpy()
    np.testing.assert_array_equal(out, x)


def test_spatial_transformer_matches_numpy(inputs):
    net = spatial_transformer()
    params = randomize(net, 4)
    x = np.random.default_rng(3).normal(size=(B, 8, 2, 3)).astype(np.float32)
    context = inputs[1]
    out = net(ms.Tensor(x), ms.Tensor(context), ms.Tensor(CONTEXT_MASK)).asnumpy()
    want = np_spatial_transformer(params, x.astype(np.float64), context.astype(np.float64), CONTEXT_MASK, 4)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
