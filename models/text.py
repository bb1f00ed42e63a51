"""Text side of GLIDE (Nichol et al. 2022, "GLIDE: Towards Photorealistic Image
Generation and Editing with Text-Guided Diffusion Models", Sec. 2.3): a tokenizer
for Chinese, English and mixed prompts, and the transformer that encodes them.

Tokenizer. :class:`ByteTokenizer` works on UTF-8 bytes, so it needs no downloaded
vocabulary and covers every script and emoji: ids 0-255 are bytes, then ``PAD``
and ``EOT``. A caption becomes its bytes plus ``EOT``, padded with ``PAD`` to a
fixed context length, with a boolean mask (True = real token). The empty caption
is all ``PAD`` with an all-False mask: the "unconditional" tokens that
classifier-free guidance pairs with every prompt. A Chinese character is 3
bytes, so ``text_ctx`` = 128 holds about 42 Chinese characters (Wukong captions
are at most 32).

Encoder. :class:`TextTransformer` is GLIDE's text transformer (CLIP-style pre-norm
residual attention blocks): token + positional embeddings, optionally a learned
``padding_embedding`` in place of padded positions (GLIDE's ``xf_padding``),
``layers`` blocks, optional final LayerNorm. It returns the token states
[B, L, W], which GLIDE feeds to every attention layer of the UNet as extra keys
and values, and a pooled vector [B, W], which GLIDE projects and adds to the
timestep embedding.

Pooling choice. ``pool="last"`` takes the state at the final context position, as
GLIDE does; the position is padding unless the prompt fills the context, and it
works as a learned read-out token: it attends to every real token (also under a
causal mask, since padding comes last) while, with the key-padding mask, no real
token attends to it. It is also defined for the empty caption, and it is what
glide-text2im checkpoints were trained with, hence the default.
``pool="eot"`` takes the state of the last real token, which is ``EOT``
(CLIP's choice; the one position that has seen the whole prompt under a causal
mask); for the empty caption it falls back to the final position.

Cell and parameter names follow glide-text2im (``token_embedding``,
``positional_embedding``, ``padding_embedding``, ``transformer.resblocks.N.attn.c_qkv``,
``...attn.c_proj``, ``...mlp.c_fc``, ``...mlp.c_proj``, ``...ln_1``, ``...ln_2``,
``final_ln``) and the fused ``c_qkv`` output is split per head exactly as there,
so its checkpoints load through ``mind_diffusion.convert``.
"""
import warnings

import numpy as np

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from mind_diffusion.prompts import normalise_prompt
from models.cross_attention import causal_bias, dot_product_attention, key_padding_bias, merge_heads

POOL_MODES = ("last", "eot")


class ByteTokenizer:
    """UTF-8 byte-level tokenizer with a fixed context length.

    ``tokenizer(prompts)`` -> (tokens int32 [B, text_ctx], mask bool [B, text_ctx]).
    With ``normalise`` (the default) every text first goes through
    :func:`normalise_prompt`, in training and in sampling alike. Prompts longer than
    ``text_ctx - 1`` bytes are cut at a character boundary (so the kept text
    still decodes) with a :class:`UserWarning`; ``EOT`` is always kept.
    """

    n_bytes = 256
    pad_token = 256
    end_token = 257
    n_vocab = 258

    def __init__(self, text_ctx, normalise=True):
        if text_ctx < 2:
            raise ValueError(f"text_ctx must be at least 2 (one byte and EOT), got {text_ctx}")
        self.text_ctx = text_ctx
        self.normalise = normalise

    def encode(self, text):
        """Token ids of ``text`` (normalised): its UTF-8 bytes then ``EOT``, cut to fit the context; [] for ""."""
        if self.normalise:
            text = normalise_prompt(text)
        if not text:
            return []
        data = text.encode("utf-8")
        room = self.text_ctx - 1
        if len(data) > room:
            kept = data[:room].decode("utf-8", errors="ignore").encode("utf-8")
            warnings.warn(
                f"prompt {text!r} is {len(data)} UTF-8 bytes, more than text_ctx={self.text_ctx} allows; "
                f"kept the first {len(kept)} bytes: {kept.decode('utf-8')!r}",
                UserWarning,
                stacklevel=2,
            )
            data = kept
        return list(data) + [self.end_token]

    def padded_tokens_and_mask(self, tokens):
        """Pad a token list to ``text_ctx`` with ``PAD``: (tokens int32 [L], mask bool [L])."""
        if len(tokens) > self.text_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit text_ctx={self.text_ctx}")
        padding = self.text_ctx - len(tokens)
        ids = np.array(list(tokens) + [self.pad_token] * padding, np.int32)
        mask = np.array([True] * len(tokens) + [False] * padding, np.bool_)
        return ids, mask

    def __call__(self, prompts):
        """Encode one prompt or a list: (tokens int32 [B, text_ctx], mask bool [B, text_ctx])."""
        if isinstance(prompts, str):
            prompts = [prompts]
        pairs = [self.padded_tokens_and_mask(self.encode(p)) for p in prompts]
        return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])

    def unconditional(self, batch_size=1):
        """The empty-caption tokens and mask, repeated ``batch_size`` times."""
        return self([""] * batch_size)

    def decode(self, tokens):
        """Text of a token sequence, up to the first ``EOT``; ``PAD`` is skipped."""
        data = []
        for token in np.asarray(tokens).reshape(-1).tolist():
            if token == self.end_token:
                break
            if token < self.n_bytes:
                data.append(token)
        return bytes(data).decode("utf-8", errors="replace")


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis that normalises in float32 whatever the input dtype."""

    def __init__(self, width, epsilon=1e-5):
        super().__init__((width,), begin_norm_axis=-1, begin_params_axis=-1, epsilon=epsilon)

    def construct(self, x):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)


class MultiheadAttention(nn.Cell):
    """Self-attention with one fused projection ``c_qkv``.

    Its output [B, L, 3W] is viewed as [B, L, heads, 3·d] and split into q, k, v along
    the last axis (per-head interleaving, as glide-text2im's ``QKVMultiheadAttention``).
    """

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.c_qkv = nn.Dense(width, width * 3)
        self.c_proj = nn.Dense(width, width)

    def construct(self, x, bias):
        batch, length, width = x.shape
        qkv = self.c_qkv(x).reshape(batch, length, self.heads, 3 * (width // self.heads))
        q, k, v = ops.chunk(qkv.transpose(0, 2, 1, 3), 3, -1)
        return self.c_proj(merge_heads(dot_product_attention(q, k, v, bias)))


class MLP(nn.Cell):
    """Width → 4·width → width with exact (erf) GELU."""

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Dense(width, width * 4)
        self.c_proj = nn.Dense(width * 4, width)
        self.gelu = nn.GELU(approximate=False)

    def construct(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def construct(self, x, bias):
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    """``layers`` :class:`ResidualAttentionBlock` in sequence (``resblocks``), sharing one attention bias."""

    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def construct(self, x, bias):
        for block in self.resblocks:
            x = block(x, bias)
        return x


class TextEncoderMixin:
    """Builds GLIDE's text encoder as attributes of the host cell and runs it.

    A mixin rather than a child cell so that :class:`models.glide.Text2ImUNet`
    holds ``token_embedding``, ``transformer``, ... at its top level, exactly where
    glide-text2im's checkpoints put them, while :class:`TextTransformer` reuses the
    same code stand-alone.
    """

    def build_text_encoder(self, vocab_size, text_ctx, width, layers, heads, final_ln=True,
                           padding_embedding=False, causal=False, key_padding_mask=True, pool="last"):
        """Create the encoder's cells and parameters on ``self``; arguments as :class:`TextTransformer`'s."""
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        self.text_ctx = text_ctx
        self.xf_width = width
        self.xf_padding = padding_embedding
        self.xf_final_ln = final_ln
        self.xf_key_padding_mask = key_padding_mask
        self.xf_pool = pool
        self.xf_causal_bias = causal_bias(text_ctx) if causal else None
        self.token_embedding = nn.Embedding(vocab_size, width, embedding_table=Normal(0.02))
        self.positional_embedding = ms.Parameter(
            initializer(Normal(0.01), (text_ctx, width), ms.float32), name="positional_embedding")
        if padding_embedding:
            self.padding_embedding = ms.Parameter(
                initializer(Normal(0.01), (text_ctx, width), ms.float32), name="padding_embedding")
        self.transformer = Transformer(width, layers, heads)
        if final_ln:
            self.final_ln = LayerNorm(width)

    def text_attention_bias(self, mask):
        """Additive self-attention bias: key padding and/or causal, None when neither applies."""
        bias = self.xf_causal_bias
        if self.xf_key_padding_mask:
            padding = key_padding_bias(mask)
            bias = padding if bias is None else bias + padding
        return bias

    def pool_text_states(self, states, mask):
        """Pooled vector [B, W]: the final position ("last") or the last real token ("eot")."""
        if self.xf_pool == "last":
            return states[:, -1]
        n_real = mask.astype(ms.int32).sum(axis=1)
        # (n_real - 1) mod L: the last real token, or the final position for an empty caption.
        index = (n_real + self.text_ctx - 1) % self.text_ctx
        one_hot = ops.one_hot(index, self.text_ctx, ops.ones((), states.dtype), ops.zeros((), states.dtype))
        return (states * one_hot[:, :, None]).sum(axis=1)

    def encode_text(self, tokens, mask):
        """tokens int [B, L], mask bool [B, L] -> (token states [B, L, W], pooled [B, W])."""
        x = self.token_embedding(tokens) + self.positional_embedding
        if self.xf_padding:
            x = ops.where(mask[:, :, None], x, self.padding_embedding)
        x = self.transformer(x, self.text_attention_bias(mask))
        if self.xf_final_ln:
            x = self.final_ln(x)
        return x, self.pool_text_states(x, mask)


class TextTransformer(TextEncoderMixin, nn.Cell):
    """GLIDE's text transformer as a stand-alone cell (e.g. the latent-diffusion context encoder).

    Args:
        vocab_size: token ids the embedding accepts (``ByteTokenizer.n_vocab``).
        text_ctx: context length L.
        width, layers, heads: transformer size.
        final_ln: LayerNorm after the last block (GLIDE's ``xf_final_ln``).
        padding_embedding: replace padded positions by a learned per-position
            embedding (GLIDE's ``xf_padding``).
        causal: causal (GPT-style) instead of bidirectional self-attention.
        key_padding_mask: hide padded positions from every query, so padding
            cannot change the real tokens' states. glide-text2im has no such mask.
        pool: "last" or "eot", see the module docstring.

    construct(tokens int32 [B, L], mask bool [B, L]) -> (states [B, L, W], pooled [B, W]).
    """

    def __init__(self, vocab_size, text_ctx, width, layers, heads, final_ln=True,
                 padding_embedding=False, causal=False, key_padding_mask=True, pool="last"):
        super().__init__()
        self.build_text_encoder(vocab_size, text_ctx, width, layers, heads, final_ln,
                                padding_embedding, causal, key_padding_mask, pool)

    def construct(self, tokens, mask):
        return self.encode_text(tokens, mask)
