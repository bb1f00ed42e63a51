"""The ADM UNet: the denoising network of improved DDPM and "Diffusion Models Beat GANs".

References: Ho et al. 2020 (DDPM UNet), Nichol & Dhariwal 2021 (improved DDPM),
Dhariwal & Nichol 2021 (ADM: more heads, attention at 32/16/8, BigGAN
up/down-sampling residual blocks, adaptive group normalisation "AdaGN").

The layout follows openai/guided-diffusion's ``unet.py`` module for module,
and every sub-cell has the PyTorch module's name (``time_embed.0``,
``input_blocks.1.0.in_layers.2``, ``middle_block``, ``output_blocks``,
``out``, ``label_emb``, ...), so released improved-diffusion, guided-diffusion
and glide-text2im weights load with :mod:`mind_diffusion.convert`. Only 2-D
images are supported.
"""
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.device import FLASH_HEAD_MAX, FLASH_HEAD_MULTIPLE, GRAPH
from mind_diffusion.kernels import attention as attention_kernels
from mind_diffusion.kernels.dropout import Dropout
from models.cross_attention import SpatialTransformer
from mind_diffusion.nn import (
    AvgPool2x2,
    Conv1x1,
    conv_nd,
    linear,
    normalization,
    normalization_silu,
    timestep_embedding,
    upsample_nearest_2x,
    zero_module,
)

__all__ = [
    "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "Downsample",
    "ResBlock",
    "QKVAttentionLegacy",
    "QKVAttention",
    "AttentionBlock",
    "UNetModel",
    "SuperResModel",
    "compute_dtype",
    "convert_convolutions",
    "create_model",
    "default_channel_mult",
    "attention_downsample_rates",
]


def compute_dtype(use_fp16=False, dtype=None):
    """The torso's compute dtype from guided-diffusion's ``use_fp16`` flag or an explicit ``dtype``."""
    if use_fp16 and dtype not in (None, ms.float16):
        raise ValueError(f"use_fp16=True contradicts dtype={dtype}")
    if use_fp16:
        return ms.float16
    chosen = ms.float32 if dtype is None else dtype
    if chosen not in (ms.float32, ms.float16, ms.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {chosen}")
    return chosen


def convert_convolutions(cell, dtype):
    """Run every convolution below ``cell`` in ``dtype`` (ADM's ``convert_to_fp16``), and the dense
    layers of its spatial transformers (latent diffusion's torso runs its attention in that dtype too).

    Only those layers change: their float32 parameters are cast on the fly, so
    norms stay float32 (:class:`~mind_diffusion.nn.GroupNorm32`, ``LayerNorm32``) and the
    master weights keep full precision for training. The residual blocks' embedding
    projections stay float32, as in ADM.
    """
    if dtype == ms.float32:
        return
    for _, sub in cell.cells_and_names():
        if isinstance(sub, (nn.Conv2d, Conv1x1)):
            sub.to_float(dtype)
        elif isinstance(sub, SpatialTransformer):
            for _, inner in sub.cells_and_names():
                if isinstance(inner, nn.Dense):
                    inner.to_float(dtype)


class TimestepBlock(nn.Cell):
    """A layer whose ``construct(x, emb)`` takes the timestep embedding as its second input."""


class TimestepEmbedSequential(nn.SequentialCell):
    """A sequence of layers fed the timestep embedding and the text states where they take them.

    Children are named ``0``, ``1``, ... like PyTorch's ``nn.Sequential``.
    :class:`TimestepBlock` children get ``emb``, :class:`AttentionBlock` and
    :class:`~models.cross_attention.SpatialTransformer` children get ``encoder_out``
    (GLIDE's [N, C, S] states or latent diffusion's [N, L, D] context), the others only ``x``.
    """

    def construct(self, x, emb, encoder_out=None):
        for layer in self.cell_list:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, (AttentionBlock, SpatialTransformer)):
                x = layer(x, encoder_out)
            else:
                x = layer(x)
        return x


class Upsample(nn.Cell):
    """Nearest-neighbour 2× upsampling, optionally followed by a 3×3 convolution (``conv``)."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(2, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def construct(self, x):
        x = upsample_nearest_2x(x)
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Cell):
    """2× downsampling by a strided 3×3 convolution, or by 2×2 average pooling (``op`` either way)."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(2, channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Downsample by pooling cannot change the channel count")
        else:
            self.op = AvgPool2x2()

    def construct(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding, optionally a BigGAN up/down block.

    ``in_layers`` (GroupNorm, SiLU, 3×3 conv) → add the projected embedding →
    ``out_layers`` (GroupNorm, SiLU, dropout, zero-initialised 3×3 conv), plus
    ``skip_connection`` (identity, 1×1 conv, or 3×3 conv with ``use_conv``).

    With ``use_scale_shift_norm`` the embedding is instead projected to a scale
    and shift applied after the second norm, ``GN(h)·(1 + s) + b``: ADM's
    adaptive group normalisation (AdaGN). With ``up`` / ``down`` the block
    resamples both paths between its norm and first conv, as BigGAN's residual
    up/down-sampling blocks do (ADM's ``resblock_updown``).
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = up or down

        self.in_layers = nn.SequentialCell(
            [*normalization_silu(channels), conv_nd(2, channels, self.out_channels, 3, padding=1)]
        )
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)

        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.SequentialCell([nn.SiLU(), linear(emb_channels, emb_out_channels)])
        self.out_layers = nn.SequentialCell(
            [
                *normalization_silu(self.out_channels),
                Dropout(p=dropout),
                zero_module(conv_nd(2, self.out_channels, self.out_channels, 3, padding=1)),
            ]
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(2, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(2, channels, self.out_channels, 1)

    def construct(self, x, emb):
        """:param x: [N, C, H, W] features; :param emb: [N, emb_channels] embedding."""
        if self.updown:
            # Resample after norm + SiLU and before the convolution, on both paths.
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).astype(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape[0], emb_out.shape[1], 1, 1)  # a reshape: indexing with None is a StridedSlice kernel
        if self.use_scale_shift_norm:
            # AdaGN: SiLU(GN(h) (1 + scale) + shift), one fused op ([scale | shift] = emb_out).
            h = self.out_layers[0](h, emb_out)
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


# Ascend's fused attention (910B-class chips, float16/bfloat16). A module attribute so that
# tests can stand in a reference with the same signature on the CPU, which has no such kernel.
flash_attention_score = ops.flash_attention_score


def _to_bnsd(x, batch, heads):
    """[B·N, d, S] (channels first, heads folded into the batch) → [B, N, S, d], FlashAttention's BNSD layout."""
    rows, channels, length = x.shape
    return x.reshape(batch, heads, channels, length).transpose(0, 1, 3, 2)


def _flash_attend(q, k, v, heads):
    """:func:`_attend` through ``flash_attention_score``: softmax(qᵀk / √d) v with the softmax fused on chip."""
    rows, channels, length = q.shape
    batch = rows // heads
    out = flash_attention_score(_to_bnsd(q, batch, heads), _to_bnsd(k, batch, heads), _to_bnsd(v, batch, heads),
                                heads, scalar_value=channels ** -0.5, input_layout="BNSD")
    return out.transpose(0, 1, 3, 2).reshape(rows, channels, length)


def _attend(q, k, v, head_channels, heads, training=False):
    """softmax(qᵀk / √d) applied to v, per (batch × head) row: q [B·N, d, T], k, v [B·N, d, S] → [B·N, d, T].

    On Ascend 910B-class chips with a float16 or bfloat16 torso this is one
    ``flash_attention_score`` (BNSD layout, N = ``heads``), which never writes the
    [T, S] weights to memory; it needs d a multiple of 16, at most 512.

    In training on the CPU backend in float32 this is one C++ operator with a
    C++ backward (:mod:`mind_diffusion.kernels.attention`): forward + backward
    run ~1.4x faster than MindSpore's CPU BatchMatMul path. The kernel's forward
    also writes the softmax weights for the backward, which makes a forward
    alone slower than the ops path, so inference graphs (``training`` False,
    the Cell's mode) keep the ops path. The choice is a Python constant of the
    graph being built (``CHOICE.op`` is evaluated by the graph parser;
    ``MIND_DIFFUSION_FAST_ATTENTION=0`` turns it off).

    Otherwise (float16, other devices, no compiler): q and k are each scaled by
    d^(-1/4) before the product (more stable in float16 than dividing
    afterwards), and the softmax runs in float32.
    """
    half = q.dtype == ms.float16 or q.dtype == ms.bfloat16
    if GRAPH.flash_attention and half and head_channels % FLASH_HEAD_MULTIPLE == 0 \
            and head_channels <= FLASH_HEAD_MAX:
        return _flash_attend(q, k, v, heads)
    if training and q.dtype == ms.float32 and q.shape[1] == head_channels:
        fast = attention_kernels.CHOICE.op
        if fast is not None:
            return fast(q, k, v)[0]
    scale = head_channels ** -0.25
    weight = ops.BatchMatMul(transpose_a=True)(q * scale, k * scale)
    weight = ops.softmax(weight.astype(ms.float32), axis=-1).astype(q.dtype)
    return ops.BatchMatMul(transpose_b=True)(v, weight)


class QKVAttentionLegacy(nn.Cell):
    """Multi-head attention on a packed [N, H·3·d, T] qkv tensor, heads split before q/k/v (improved DDPM order).

    ``encoder_kv`` ([N, H·2·d, S], heads split before k/v, glide-text2im's
    layout) adds S extra keys/values in front of the image tokens' own.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def construct(self, qkv, encoder_kv=None):
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.n_heads)
        q, k, v = ops.split(qkv.reshape(batch * self.n_heads, 3 * head_channels, length), head_channels, axis=1)
        if encoder_kv is not None:
            ek, ev = ops.split(
                encoder_kv.reshape(batch * self.n_heads, 2 * head_channels, -1), head_channels, axis=1
            )
            k = ops.cat([ek, k], axis=-1)
            v = ops.cat([ev, v], axis=-1)
        return _attend(q, k, v, head_channels, self.n_heads, self.training).reshape(batch, -1, length)


class QKVAttention(nn.Cell):
    """Multi-head attention on a packed [N, 3·H·d, T] qkv tensor, q/k/v split before heads (ADM's new order).

    ``encoder_kv`` ([N, 2·H·d, S]) is split the same way, k before v.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def construct(self, qkv, encoder_kv=None):
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.n_heads)
        rows = batch * self.n_heads
        q, k, v = ops.chunk(qkv, 3, axis=1)
        q = q.reshape(rows, head_channels, length)
        k = k.reshape(rows, head_channels, length)
        v = v.reshape(rows, head_channels, length)
        if encoder_kv is not None:
            ek, ev = ops.chunk(encoder_kv, 2, axis=1)
            k = ops.cat([ek.reshape(rows, head_channels, -1), k], axis=-1)
            v = ops.cat([ev.reshape(rows, head_channels, -1), v], axis=-1)
        return _attend(q, k, v, head_channels, self.n_heads, self.training).reshape(batch, -1, length)


def _heads(channels, num_heads, num_head_channels):
    """Number of heads: ``num_heads``, unless ``num_head_channels`` fixes the width of each head."""
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
    return channels // num_head_channels


class AttentionBlock(nn.Cell):
    """Self-attention over all spatial positions, with a zero-initialised residual projection.

    ``norm`` → ``qkv`` (1×1) → multi-head attention → ``proj_out`` (1×1, zero
    init) → residual add. With ``encoder_channels`` the block also has
    glide-text2im's ``encoder_kv``, a 1×1 projection of conditioning states
    ``encoder_out`` [N, encoder_channels, S] to keys and values that the image
    tokens attend to besides themselves (GLIDE's text conditioning).
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_new_attention_order=False,
        encoder_channels=None,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = _heads(channels, num_heads, num_head_channels)
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, 3 * channels, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        if encoder_channels is not None:
            self.encoder_kv = conv_nd(1, encoder_channels, 2 * channels, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def construct(self, x, encoder_out=None):
        """:param x: [N, C, *spatial]; :param encoder_out: optional [N, encoder_channels, S] states."""
        batch, channels = x.shape[0], x.shape[1]
        tokens = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(tokens))
        if encoder_out is None:
            h = self.attention(qkv)
        else:
            h = self.attention(qkv, self.encoder_kv(encoder_out))
        return (tokens + self.proj_out(h)).reshape(x.shape)


def default_channel_mult(image_size):
    """The per-level channel multipliers the OpenAI scripts pick for an image size (``channel_mult=""``).

    256/128/64/512 follow guided-diffusion, 32 follows improved-diffusion (CIFAR-10).
    """
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    if image_size not in table:
        raise ValueError(f"no default channel_mult for image size {image_size}; pass channel_mult")
    return table[image_size]


def attention_downsample_rates(image_size, attention_resolutions):
    """Convert attention resolutions in pixels ("16,8") to downsample rates (image 32 → (2, 4))."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in attention_resolutions)


def time_embedding_mlp(model_channels):
    """ADM's timestep MLP: linear(C, 4C), SiLU, linear(4C, 4C) on the sinusoidal embedding (``time_embed``)."""
    time_embed_dim = model_channels * 4
    return nn.SequentialCell(
        [linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)]
    )


def build_encoder(in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res_block,
                  attention, resblock_updown, conv_resample):
    """ADM's encoder half, shared by the UNet and the noisy classifier: the input blocks and the middle block.

    :param res_block: ``res_block(channels, out_channels, **updown)`` → a :class:`ResBlock`.
    :param attention: ``attention(channels)`` → the attention block of the encoder levels.
    :param attention_resolutions: downsample rates that get attention.
    :return: (input_blocks CellList, middle_block, channels after each input block, final width,
        final downsample rate).
    """
    ch = int(channel_mult[0] * model_channels)
    input_blocks = [TimestepEmbedSequential([conv_nd(2, in_channels, ch, 3, padding=1)])]
    block_channels = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attention(ch))
            input_blocks.append(TimestepEmbedSequential(layers))
            block_channels.append(ch)
        if level != len(channel_mult) - 1:
            down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
            input_blocks.append(TimestepEmbedSequential([down]))
            block_channels.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential([res_block(ch, ch), attention(ch), res_block(ch, ch)])
    return nn.CellList(input_blocks), middle_block, block_channels, ch, ds


class UNetModel(nn.Cell):
    """The ADM UNet: ε (and Σ) prediction from a noisy image, a timestep and an optional class label.

    :param image_size: the image side (recorded; the network is fully convolutional).
    :param in_channels: channels of the input image.
    :param model_channels: base channel count.
    :param out_channels: output channels; pass ``2 * in_channels`` for a
        learned-variance model (``learn_sigma``: ε and the Σ interpolation v).
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsample rates (not pixel sizes) at which
        attention runs; 4 means at 4× downsampling. Use
        :func:`attention_downsample_rates` to convert "16,8"-style strings.
    :param dropout: dropout probability inside residual blocks.
    :param channel_mult: channel multiplier per level.
    :param conv_resample: learned 3×3 convolutions in up/down-sampling
        (else nearest upsampling / average pooling).
    :param num_classes: if set, class-conditional with a learned label embedding
        added to the time embedding.
    :param use_checkpoint: recompute block activations in the backward pass.
    :param use_fp16: ADM's float16 torso; same as ``dtype=mindspore.float16``.
    :param dtype: torso compute dtype: float32, float16, or bfloat16 (bfloat16
        convolutions have no CPU kernel in MindSpore 2.10: Ascend only). Norms,
        softmax, the embeddings and the output head stay float32.
    :param num_heads: attention heads per block.
    :param num_head_channels: if not -1, a fixed width per head (overrides num_heads).
    :param num_heads_upsample: heads in the decoder's attention blocks (-1: num_heads).
    :param use_scale_shift_norm: AdaGN conditioning in residual blocks.
    :param resblock_updown: BigGAN residual blocks for up/down-sampling.
    :param use_new_attention_order: split q/k/v before heads (``QKVAttention``).
    :param encoder_channels: if set, every attention block gets an ``encoder_kv``
        projection of conditioning states with this many channels (GLIDE).
    :param use_spatial_transformer: latent diffusion's attention: a
        :class:`~models.cross_attention.SpatialTransformer` (self-attention,
        cross-attention to a [N, L, ``context_dim``] context, GEGLU MLP) in place of
        every :class:`AttentionBlock`, with ``num_heads`` heads of C/num_heads channels,
        or C/num_head_channels heads of ``num_head_channels`` (CompVis ``legacy=False``).
    :param transformer_depth: transformer blocks per spatial transformer.
    :param context_dim: width of the cross-attention context (text states).
    :param use_linear_in_transformer: dense instead of 1×1 conv projections in and
        out of each spatial transformer (SD 2.x).
    :param gelu_approximate: tanh-GELU in the transformers' GEGLU (Wukong-Huahua's numerics).
    :param float32_frequencies: the timestep sinusoids' frequencies from a float32 exp
        (Wukong-Huahua's numerics; see :func:`~mind_diffusion.nn.timestep_embedding`).

    Hook for conditioned subclasses (GLIDE): ``construct(x, timesteps, y=None)``
    is ``forward_with_emb(x, embed(timesteps, y))``. A subclass builds its own
    ``construct`` from the two halves: ``emb = self.embed(timesteps)`` (time +
    optional label embedding, [N, 4·model_channels] float32), adds its own
    terms to ``emb``, and calls ``self.forward_with_emb(x, emb, encoder_out)``
    with ``encoder_out`` [N, encoder_channels, S], which every attention block
    attends to through its ``encoder_kv``.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        dtype=None,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        encoder_channels=None,
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        use_linear_in_transformer=False,
        gelu_approximate=False,
        float32_frequencies=False,
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the width of the text states)")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.float32_frequencies = bool(float32_frequencies)
        self.dtype = compute_dtype(use_fp16, dtype)
        attention_resolutions = tuple(attention_resolutions)

        time_embed_dim = model_channels * 4
        self.time_embed = time_embedding_mlp(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(channels, out, **updown):
            return ResBlock(
                channels,
                time_embed_dim,
                dropout,
                out_channels=out,
                use_scale_shift_norm=use_scale_shift_norm,
                **updown,
            )

        def attention(channels, heads):
            if use_spatial_transformer:
                heads = _heads(channels, heads, num_head_channels)
                return SpatialTransformer(channels, heads, channels // heads, depth=transformer_depth,
                                          context_dim=context_dim, use_linear=use_linear_in_transformer,
                                          gelu_approximate=gelu_approximate)
            return AttentionBlock(
                channels,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
                encoder_channels=encoder_channels,
            )

        input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks, self.middle_block, input_block_chans, ch, ds = build_encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res_block,
            lambda channels: attention(channels, num_heads), resblock_updown, conv_resample)

        output_blocks = []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                output_blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell(
            [*normalization_silu(ch), zero_module(conv_nd(2, input_ch, out_channels, 3, padding=1))]
        )

        for torso in (self.input_blocks, self.middle_block, self.output_blocks):
            convert_convolutions(torso, self.dtype)
            if use_checkpoint:
                for block in torso:  # per block: recompute() on the CellList itself breaks its indexing
                    block.recompute()

    def embed(self, timesteps, y=None):
        """The conditioning vector: MLP(sinusoidal(t)) plus the label embedding of ``y`` if class-conditional."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y if and only if the model is class-conditional (num_classes set)")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels,
                                                 float32_frequencies=self.float32_frequencies))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward_with_emb(self, x, emb, encoder_out=None):
        """Run the UNet on ``x`` [N, in_channels, H, W] given the conditioning vector ``emb``; float32 out."""
        skips = []
        h = x.astype(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb, encoder_out)
            skips.append(h)
        h = self.middle_block(h, emb, encoder_out)
        for i, block in enumerate(self.output_blocks):
            h = ops.cat([h, skips[-1 - i]], axis=1)
            h = block(h, emb, encoder_out)
        return self.out(h.astype(x.dtype))

    def construct(self, x, timesteps, y=None):
        """:param x: [N, C, H, W] noisy images; :param timesteps: [N]; :param y: [N] labels if class-conditional."""
        return self.forward_with_emb(x, self.embed(timesteps, y))


class SuperResModel(UNetModel):
    """A UNet for super-resolution: the low-resolution image, bilinearly upsampled, is concatenated to x.

    Takes the same arguments as :class:`UNetModel`, with ``in_channels`` the
    channels of one image (the network sees twice as many).
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, 2 * in_channels, *args, **kwargs)

    def construct(self, x, timesteps, low_res, y=None):
        """:param low_res: [N, C, h, w] conditioning image, upsampled to x's size (half-pixel bilinear)."""
        upsampled = ops.interpolate(low_res, size=x.shape[2:], mode="bilinear", align_corners=False)
        return super().construct(ops.cat([x, upsampled], axis=1), timesteps, y)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0.0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=1000,
    in_channels=3,
    large_size=None,
    small_size=None,
):
    """Build a UNet from guided-diffusion ``create_model`` arguments (same names, same meanings).

    ``channel_mult`` is a comma string ("" picks :func:`default_channel_mult`),
    ``attention_resolutions`` are pixel sizes, ``learn_sigma`` doubles the output
    channels, ``class_cond`` adds a ``num_classes``-way label embedding. With
    ``large_size`` set (guided-diffusion's ``sr_create_model``) this builds a
    :class:`SuperResModel` at that size; ``small_size`` is only recorded there too.
    """
    del small_size  # part of the SR scripts' argument set; the network does not depend on it
    model_class = UNetModel
    if large_size is not None:
        model_class, image_size = SuperResModel, large_size
    if channel_mult in ("", None):
        channel_mult = default_channel_mult(image_size)
    elif isinstance(channel_mult, str):
        channel_mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return model_class(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(image_size, attention_resolutions),
        dropout=dropout,
        channel_mult=tuple(channel_mult),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )
