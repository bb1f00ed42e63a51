"""Multi-head attention with key-padding masks, and the cross-attention blocks of
latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.3).

The attention core (:func:`dot_product_attention`, :func:`key_padding_bias`,
:func:`causal_bias`) is shared by the GLIDE text transformer (``models/text.py``)
and by the blocks below. The blocks condition image tokens on a context of any
length (text token states, class embeddings, ...): queries come from the image,
keys and values from the context, and a boolean ``context_mask`` [B, L_ctx]
(True = real token) keeps padded context positions out of every softmax.

Cells are named like CompVis/latent-diffusion's ``ldm/modules/attention.py``
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``attn1``, ``attn2``, ``ff.net.0.proj``,
``ff.net.2``, ``norm1..3``, ``proj_in``, ``transformer_blocks``, ``proj_out``) so
that checkpoints in that layout map onto these cells by name.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.kernels.dropout import Dropout
from mind_diffusion.nn import GroupNorm32, LayerNorm32, conv_nd, zero_module

# Large enough that exp() underflows to exactly 0 in float32, small enough to stay finite.
MASKED_LOGIT = -1e9


def key_padding_bias(mask):
    """Additive attention bias [B, 1, 1, L] from a key-padding mask [B, L] (True = real key).

    Padded keys get ``MASKED_LOGIT`` so their softmax weight is exactly 0. A row
    with no real key at all (the all-padding "empty caption" of classifier-free
    guidance) is left unmasked instead: it then attends over its padding positions,
    which keeps the unconditional context well defined rather than 0/0.
    """
    keep = mask.astype(ms.float32)
    has_real = keep.max(axis=1, keepdims=True)
    keep = keep + (1.0 - has_real)
    return ((1.0 - keep) * MASKED_LOGIT)[:, None, None, :]


def causal_bias(length):
    """Additive bias [1, 1, L, L] that stops position t attending to any s > t (GPT-style)."""
    future = np.triu(np.ones((length, length), np.float32), k=1)
    return ms.Tensor(future * MASKED_LOGIT)[None, None]


def dot_product_attention(q, k, v, bias=None):
    """softmax(q kᵀ / √d + bias) v over the last two axes.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; bias: float32, broadcastable to
    [B, H, Lq, Lk], or None. q and k are each scaled by d^(-1/4) before the
    product (as in CLIP / GLIDE), which keeps float16 logits in range; the softmax
    runs in float32 whatever the compute dtype.
    """
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
    logits = ops.matmul(q * scale, (k * scale).swapaxes(-1, -2)).astype(ms.float32)
    if bias is not None:
        logits = logits + bias
    weights = ops.softmax(logits, -1).astype(v.dtype)
    return ops.matmul(weights, v)


def split_heads(x, heads):
    """[B, L, H*D] -> [B, H, L, D]."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, H, L, D] -> [B, L, H*D]."""
    batch, heads, length, depth = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * depth)


class CrossAttention(nn.Cell):
    """Multi-head attention: queries from ``x`` [B, N, query_dim], keys and values
    from ``context`` [B, L, context_dim] (``x`` itself when no context is given,
    i.e. self-attention).

    ``context_mask`` [B, L] (bool, True = real) hides padded context positions.
    Projections have no bias, the output projection has one, as in LDM.
    """

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Dense(query_dim, inner_dim, has_bias=False)
        self.to_k = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_v = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_out = nn.SequentialCell([nn.Dense(inner_dim, query_dim), Dropout(p=dropout)])

    def construct(self, x, context=None, context_mask=None):
        context = x if context is None else context
        bias = None if context_mask is None else key_padding_bias(context_mask)
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(dot_product_attention(q, k, v, bias)))


class GEGLU(nn.Cell):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2·dim_out, half gates the other.

    ``gelu_approximate``: the gate uses the tanh approximation
    0.5 g (1 + tanh(√(2/π)(g + 0.044715 g³))) instead of the exact 0.5 g (1 + erf(g/√2)).
    Stable Diffusion (PyTorch ``F.gelu``) uses the exact form; Wukong-Huahua's MindSpore
    code uses ``ops.GeLU``, the tanh form (up to 4.4e-4 apart), so its checkpoints are
    reproduced only with this switch on.
    """

    def __init__(self, dim_in, dim_out, gelu_approximate=False):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out * 2)
        self.gelu = nn.GELU(approximate=bool(gelu_approximate))

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, -1)
        return value * self.gelu(gate)


class FeedForward(nn.Cell):
    """Transformer MLP with a GEGLU input layer, width ``mult``·dim (LDM's ``FeedForward(glu=True)``)."""

    def __init__(self, dim, mult=4, dropout=0.0, gelu_approximate=False):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim, gelu_approximate), Dropout(p=dropout),
                                      nn.Dense(inner_dim, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm block: self-attention, cross-attention to the context, GEGLU MLP, each residual."""

    def __init__(self, dim, heads, dim_head, context_dim=None, dropout=0.0, gelu_approximate=False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, gelu_approximate=gelu_approximate)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def construct(self, x, context, context_mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Cell):
    """Cross-attention for feature maps, the latent-diffusion UNet's text hook.

    GroupNorm (ε = 1e-6), ``proj_in`` to ``heads``·``dim_head`` channels, the H·W pixels
    as a token sequence through ``depth`` :class:`BasicTransformerBlock`, ``proj_out``
    back, residual. ``proj_out`` starts at zero, so a freshly built block is the
    identity and training starts from the unconditional network.

    The projections are 1×1 convolutions on the feature map (SD 1.x, weights
    [C', C, 1, 1]) or, with ``use_linear``, dense layers on the tokens (SD 2.x,
    ``use_linear_in_transformer``, weights [C', C]); the two compute the same map.
    ``gelu_approximate``: tanh-GELU in the feed-forward gates (Wukong-Huahua, see :class:`GEGLU`).

    construct(x [B, C, H, W], context [B, L, context_dim], context_mask [B, L] or None)
    -> [B, C, H, W].
    """

    def __init__(self, in_channels, heads, dim_head, depth=1, context_dim=None, dropout=0.0, num_groups=32,
                 use_linear=False, gelu_approximate=False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"a spatial transformer needs depth >= 1, got {depth}")
        inner_dim = heads * dim_head
        self.use_linear = bool(use_linear)
        self.norm = GroupNorm32(num_groups, in_channels, eps=1e-6)
        if self.use_linear:
            self.proj_in = nn.Dense(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Dense(inner_dim, in_channels))
        else:
            self.proj_in = conv_nd(2, in_channels, inner_dim, 1)
            self.proj_out = zero_module(conv_nd(2, inner_dim, in_channels, 1))
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, gelu_approximate)
             for _ in range(depth)]
        )

    def construct(self, x, context, context_mask=None):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if self.use_linear:
            h = self.proj_in(h.reshape(batch, channels, height * width).transpose(0, 2, 1))
        else:
            h = self.proj_in(h)
            h = h.reshape(batch, h.shape[1], height * width).transpose(0, 2, 1)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(0, 2, 1).reshape(batch, h.shape[2], height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h
