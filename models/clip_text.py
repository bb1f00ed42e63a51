"""CLIP's text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.4), the context encoder of Stable Diffusion and Wukong-Huahua
(Rombach et al. 2022, Sec. 3.3: τ_θ(y) is fed to every cross-attention layer).

For token ids y = (y_1 .. y_L):

    h⁰_t = E[y_t] + P_t                                   (token + learned position embedding)
    hˡ   = h + MLP(LN₂(h)),  h = hˡ⁻¹ + MHA(LN₁(hˡ⁻¹))       (pre-LN residual block l = 1 .. N)
    τ(y) = LN_final(h^(N − skip_last_layers))

MHA is causal (position t attends to s ≤ t) with q, k, v from one fused projection ``in_proj``
(rows q; k; v) and softmax(q kᵀ/√d) v per head; MLP(x) = c_proj(act(c_fc(x))) with QuickGELU
act(x) = x·σ(1.702x) (OpenAI CLIP, Wukong) or exact GELU (OpenCLIP ViT-H, SD v2). τ(y) is the
whole [B, L, W] sequence: SD reads every position, padding included, so the tokens' padding
convention matters (see :mod:`models.tokenizers`). SD v2 reads the penultimate block
(``skip_last_layers=1``), then the final LayerNorm.

Numerics: ``numerics="clip"`` uses LayerNorm ε = 1e-5, ``"wukong"`` ε = 1e-7 (Wukong's
``mindspore.nn.LayerNorm`` default); nothing else differs. The encoder runs in float32 under every
recipe: it runs once per prompt, not once per sampling step, so a half-precision copy would save
nothing that matters; callers cast τ(y) to the UNet's dtype.

Parameter names are OpenAI CLIP's (see :mod:`mind_diffusion.clip_names`, which maps SD v1, SD v2 and
Wukong checkpoints onto them). The attention core, LayerNorm and causal bias are the ones the GLIDE
text transformer uses (:mod:`models.cross_attention`, :mod:`models.text`).
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from mind_diffusion.clip_names import TEXT_NUMERICS, extract_text_encoder
from models.cross_attention import causal_bias, dot_product_attention, merge_heads, split_heads
from models.text import LayerNorm

ACTIVATIONS = ("quick_gelu", "gelu")


class QuickGELU(nn.Cell):
    """CLIP's GELU approximation x·σ(1.702x)."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


class CLIPAttention(nn.Cell):
    """Multi-head self-attention with the fused projection ``in_proj`` [3W, W] (rows q; k; v) and ``out_proj``."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj = nn.Dense(width, 3 * width)
        self.out_proj = nn.Dense(width, width)

    def construct(self, x, bias):
        q, k, v = ops.chunk(self.in_proj(x), 3, -1)
        heads = self.heads
        out = dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), bias)
        return self.out_proj(merge_heads(out))


class CLIPMLP(nn.Cell):
    """c_proj(act(c_fc(x))): width → mlp_width → width."""

    def __init__(self, width, mlp_width, activation):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.c_fc = nn.Dense(width, mlp_width)
        self.act = QuickGELU() if activation == "quick_gelu" else nn.GELU(approximate=False)
        self.c_proj = nn.Dense(mlp_width, width)

    def construct(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class CLIPResidualBlock(nn.Cell):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_width, activation, epsilon):
        super().__init__()
        self.ln_1 = LayerNorm(width, epsilon)
        self.attn = CLIPAttention(width, heads)
        self.ln_2 = LayerNorm(width, epsilon)
        self.mlp = CLIPMLP(width, mlp_width, activation)

    def construct(self, x, bias):
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Cell):
    """The residual blocks (``resblocks``) under one causal bias; the last ``skip_last_layers`` are not run."""

    def __init__(self, width, layers, heads, mlp_width, activation, epsilon, skip_last_layers=0):
        super().__init__()
        self.resblocks = nn.CellList(
            [CLIPResidualBlock(width, heads, mlp_width, activation, epsilon) for _ in range(layers)])
        self.n_run = layers - skip_last_layers  # the skipped blocks keep their parameters (checkpoint names)

    def construct(self, x, bias):
        for block in self.resblocks[:self.n_run]:
            x = block(x, bias)
        return x


class CLIPTextEncoder(nn.Cell):
    """τ_θ: token ids int [B, L] (L ≤ context_length) → states float32 [B, L, width].

    Args:
        vocab_size, context_length, width, layers, heads: sizes (``infer_text_config`` reads all but
            ``heads`` from a checkpoint).
        mlp_width: hidden width of the MLP (default 4·width).
        activation: ``"quick_gelu"`` (OpenAI CLIP, Wukong) or ``"gelu"`` (OpenCLIP ViT-H).
        numerics: ``"clip"`` (LayerNorm ε 1e-5) or ``"wukong"`` (ε 1e-7).
        skip_last_layers: blocks left out at the end before the final LayerNorm (SD v2: 1).
    """

    def __init__(self, vocab_size=49408, context_length=77, width=768, layers=12, heads=12, mlp_width=None,
                 activation="quick_gelu", numerics="clip", skip_last_layers=0):
        super().__init__()
        if numerics not in TEXT_NUMERICS:
            raise ValueError(f"numerics must be one of {tuple(TEXT_NUMERICS)}, got {numerics!r}")
        if not 0 <= skip_last_layers < layers:
            raise ValueError(f"skip_last_layers must be in [0, {layers}), got {skip_last_layers}")
        epsilon = TEXT_NUMERICS[numerics]
        self.context_length = context_length
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width, embedding_table=Normal(0.02))
        self.positional_embedding = ms.Parameter(
            initializer(Normal(0.01), (context_length, width), ms.float32), name="positional_embedding")
        self.transformer = CLIPTransformer(width, layers, heads, mlp_width or 4 * width, activation, epsilon,
                                           skip_last_layers)
        self.ln_final = LayerNorm(width, epsilon)
        self.causal = causal_bias(context_length)

    def construct(self, tokens):
        length = tokens.shape[1]  # static: slicing by it builds no branch
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, self.causal[:, :, :length, :length])
        return self.ln_final(x)


def encoder_arguments(config, **overrides):
    """CLIPTextEncoder's arguments from :func:`mind_diffusion.clip_names.infer_text_config`'s dict (less its
    ``layout`` and ``prefix``, which say where the weights came from), with ``overrides`` applied."""
    arguments = {k: v for k, v in config.items() if k not in ("layout", "prefix")}
    arguments.update(overrides)
    return arguments


def text_encoder_from_state_dict(state_dict, heads=None, **overrides):
    """(CLIPTextEncoder with the weights of the one text encoder in ``state_dict``, its arguments).

    ``state_dict`` {key: array} is any checkpoint :mod:`mind_diffusion.clip_names` reads (SD v1, SD v2,
    Wukong); the sizes, activation, numerics and skipped layers come from it, ``heads`` from the
    caller when the width is not a multiple of 64, and ``overrides`` replace any constructor argument
    (e.g. ``numerics="clip"``).
    """
    params, config = extract_text_encoder(state_dict, heads=heads)
    arguments = encoder_arguments(config, **overrides)
    net = CLIPTextEncoder(**arguments)
    weights = {k: ms.Parameter(ms.Tensor(v.astype(np.float32)), name=k) for k, v in params.items()}
    not_loaded, unused = ms.load_param_into_net(net, weights, strict_load=True)
    if not_loaded or unused:  # the plan and the network disagree: a bug here, not in the checkpoint
        raise RuntimeError(f"text encoder parameters not loaded: {not_loaded}; unused: {unused}")
    net.set_train(False)
    return net, arguments
