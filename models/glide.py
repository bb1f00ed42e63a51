"""GLIDE's text-conditional UNet and its text-conditional upsampler (Nichol et al. 2022,
"GLIDE", Sec. 2.3 and 4; the Taichu-GLIDE Chinese model uses the same design).

The caption is encoded by a transformer (``models/text.py``). Its pooled output,
through ``transformer_proj``, is added to the timestep embedding, so every
residual block sees the caption through AdaGN; its token states [B, L, W] are
projected by each attention block's ``encoder_kv`` into extra keys and values
that the image tokens attend to. The empty caption (all padding, all-False mask)
turns the same network into the unconditional model that classifier-free
guidance (``mind_diffusion/sampling/guidance.py``) contrasts with the prompt.

Parameter names are those of glide-text2im's ``Text2ImUNet`` (the UNet's, plus
``token_embedding``, ``positional_embedding``, ``padding_embedding``,
``transformer.*``, ``final_ln``, ``transformer_proj``), so its released
checkpoints convert with ``mind_diffusion.convert``. To reproduce them, build the
model with their settings (``vocab_size=50257``, ``xf_padding=True``,
``xf_final_ln=True`` and the defaults ``xf_causal=False``,
``xf_key_padding_mask=False``, ``xf_pool="last"``) and feed token ids from
their BPE tokenizer; with :class:`models.text.ByteTokenizer` the network is
trained from scratch (or fine-tuned, e.g. for Chinese captions).
"""
from mindspore import nn, ops

from models.text import ByteTokenizer, TextEncoderMixin
from models.unet import UNetModel, attention_downsample_rates, default_channel_mult


class Text2ImUNet(TextEncoderMixin, UNetModel):
    """A :class:`models.unet.UNetModel` conditioned on a caption through a text transformer.

    Args:
        text_ctx: caption length L in tokens.
        xf_width, xf_layers, xf_heads: text transformer size.
        xf_final_ln: LayerNorm after the transformer.
        *args, **kwargs: :class:`models.unet.UNetModel` arguments (``image_size``,
            ``in_channels``, ``model_channels``, ``out_channels``, ...);
            ``encoder_channels`` is set to ``xf_width`` here. Class labels are not supported.
        vocab_size: token ids the embedding accepts (default: :class:`ByteTokenizer`'s).
        xf_padding: learned ``padding_embedding`` for padded positions (GLIDE's
            ``xf_padding``); with it, the unconditional model's text states are learned.
        xf_causal, xf_key_padding_mask, xf_pool: see
            :class:`models.text.TextTransformer` (``causal``, ``key_padding_mask``, ``pool``).

    construct(x [B, C, H, W], timesteps [B], tokens int32 [B, L], mask bool [B, L])
    -> [B, out_channels, H, W] float32.
    """

    def __init__(self, text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, *args,
                 vocab_size=ByteTokenizer.n_vocab, xf_padding=False, xf_causal=False,
                 xf_key_padding_mask=False, xf_pool="last", **kwargs):
        if kwargs.get("num_classes") is not None:
            raise ValueError("Text2ImUNet conditions on text; num_classes is not supported")
        super().__init__(*args, encoder_channels=xf_width, **kwargs)
        self.build_text_encoder(vocab_size, text_ctx, xf_width, xf_layers, xf_heads, final_ln=xf_final_ln,
                                padding_embedding=xf_padding, causal=xf_causal,
                                key_padding_mask=xf_key_padding_mask, pool=xf_pool)
        self.transformer_proj = nn.Dense(xf_width, self.model_channels * 4)

    def construct(self, x, timesteps, tokens, mask):
        states, pooled = self.encode_text(tokens, mask)
        emb = self.embed(timesteps) + self.transformer_proj(pooled)
        # the attention blocks' encoder_kv is a 1-D convolution: channels first, [B, W, L]
        return self.forward_with_emb(x, emb, states.transpose(0, 2, 1))


class SuperResText2ImUNet(Text2ImUNet):
    """GLIDE's text-conditional upsampler: x is concatenated with the low-resolution
    image, bilinearly upsampled to x's size (half-pixel centres, as PyTorch's
    ``align_corners=False``).

    Takes :class:`Text2ImUNet`'s arguments, with ``in_channels`` the channels of
    one image (the network sees twice as many).

    construct(x [B, C, H, W], timesteps [B], tokens [B, L], mask [B, L], low_res [B, C, h, w])
    -> [B, out_channels, H, W].
    """

    def __init__(self, *args, in_channels, **kwargs):
        super().__init__(*args, in_channels=2 * in_channels, **kwargs)

    def construct(self, x, timesteps, tokens, mask, low_res):
        upsampled = ops.interpolate(low_res, size=x.shape[2:], mode="bilinear", align_corners=False)
        return super().construct(ops.cat([x, upsampled], axis=1), timesteps, tokens, mask)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    attention_resolutions="32,16,8",
    num_heads=1,
    num_head_channels=64,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    dropout=0.1,
    text_ctx=128,
    xf_width=512,
    xf_layers=16,
    xf_heads=8,
    xf_final_ln=True,
    xf_padding=True,
    resblock_updown=True,
    use_fp16=False,
    super_res=False,
    vocab_size=ByteTokenizer.n_vocab,
    xf_causal=False,
    xf_key_padding_mask=False,
    xf_pool="last",
):
    """Build a GLIDE model from glide-text2im ``create_model`` arguments (same names,
    meanings and defaults, learned variance included: 3 channels in, 6 out).

    ``channel_mult`` is a comma string ("" picks the per-size default),
    ``attention_resolutions`` are pixel sizes, ``super_res`` builds the
    :class:`SuperResText2ImUNet`. The extra arguments: ``vocab_size`` (50257 for
    OpenAI's checkpoints, whose BPE tokenizer is not part of this project) and the
    text-encoder options of :class:`Text2ImUNet`. glide-text2im's inpainting
    variants and its ``cache_text_emb`` are not supported.
    """
    if channel_mult in ("", None):
        channel_mult = default_channel_mult(image_size)
    elif isinstance(channel_mult, str):
        channel_mult = tuple(int(m) for m in channel_mult.split(","))
    model_class = SuperResText2ImUNet if super_res else Text2ImUNet
    return model_class(
        text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln,
        vocab_size=vocab_size, xf_padding=xf_padding, xf_causal=xf_causal,
        xf_key_padding_mask=xf_key_padding_mask, xf_pool=xf_pool,
        image_size=image_size, in_channels=3, model_channels=num_channels, out_channels=6,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(image_size, attention_resolutions),
        dropout=dropout, channel_mult=tuple(channel_mult), use_fp16=use_fp16, num_heads=num_heads,
        num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
    )
