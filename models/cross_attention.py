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
    """GELU-gated linear unit (Shazeer 2020): one projection to 2·dim_out, half gates the other."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out * 2)
        self.gelu = nn.GELU(approximate=False)

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, -1)
        return value * self.gelu(gate)


class FeedForward(nn.Cell):
    """Transformer MLP with a GEGLU input layer, width ``mult``·dim (LDM's ``FeedForward(glu=True)``)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim), Dropout(p=dropout), nn.Dense(inner_dim, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm block: self-attention, cross-attention to the context, GEGLU MLP, each residual."""

    def __init__(self, dim, heads, dim_head, context_dim=None, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1 = nn.LayerNorm((dim,), epsilon=1e-5)
        self.norm2 = nn.LayerNorm((dim,), epsilon=1e-5)
        self.norm3 = nn.LayerNorm((dim,), epsilon=1e-5)

    def construct(self, x, context, context_mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Cell):
    """Cross-attention for feature maps, the latent-diffusion UNet's text hook.

    GroupNorm, 1×1 conv to ``heads``·``dim_head`` channels, the H·W pixels as a
    token sequence through ``depth`` :class:`BasicTransformerBlock`, 1×1 conv back,
    residual. ``proj_out`` starts at zero, so a freshly built block is the identity
    and training starts from the unconditional network.

    construct(x [B, C, H, W], context [B, L, context_dim], context_mask [B, L] or None)
    -> [B, C, H, W].
    """

    def __init__(self, in_channels, heads, dim_head, depth=1, context_dim=None, dropout=0.0, num_groups=32):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, 1, has_bias=True, pad_mode="valid")
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner_dim, in_channels, 1, has_bias=True, pad_mode="valid",
                                  weight_init="zeros", bias_init="zeros")

    def construct(self, x, context, context_mask=None):
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner_dim = h.shape[1]
        h = h.reshape(batch, inner_dim, height * width).transpose(0, 2, 1)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        h = h.transpose(0, 2, 1).reshape(batch, inner_dim, height, width)
        return x + self.proj_out(h)
