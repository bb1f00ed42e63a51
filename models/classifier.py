"""The noisy-image classifier of "Diffusion Models Beat GANs" (ADM), for classifier guidance.

p_φ(y | x_t, t) is the encoder half of the ADM UNet (time embedding, residual
blocks with attention, the middle block) followed by a pooling head; its
gradient ∇_x log p_φ(y | x_t, t) steers sampling toward class y. The layout
and sub-cell names follow guided-diffusion's ``EncoderUNetModel``, so the
released classifier checkpoints load with :mod:`mind_diffusion.convert`.
"""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from mind_diffusion.nn import GlobalAvgPool, conv_nd, normalization_silu, timestep_embedding, zero_module
from models.unet import (
    AttentionBlock,
    QKVAttention,
    ResBlock,
    attention_downsample_rates,
    build_encoder,
    compute_dtype,
    convert_convolutions,
    default_channel_mult,
    time_embedding_mlp,
)

__all__ = ["AttentionPool2d", "EncoderUNetModel", "POOLS", "create_classifier"]

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(nn.Cell):
    """CLIP's attention pooling: the mean token, with learned positions, attends over all positions.

    [N, C, H, W] → [N, output_dim]. Heads are ``embed_dim // num_head_channels``.
    """

    def __init__(self, spatial_dim, embed_dim, num_head_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = ms.Parameter(
            initializer(Normal(sigma=1.0 / math.sqrt(embed_dim)), (embed_dim, spatial_dim**2 + 1), ms.float32),
            name="positional_embedding",
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.attention = QKVAttention(embed_dim // num_head_channels)

    def construct(self, x):
        batch, channels = x.shape[0], x.shape[1]
        tokens = x.reshape(batch, channels, -1)
        tokens = ops.cat([tokens.mean(axis=-1, keep_dims=True), tokens], axis=-1)
        tokens = tokens + self.positional_embedding[None, :, :].astype(tokens.dtype)
        pooled = self.c_proj(self.attention(self.qkv_proj(tokens)))
        return pooled[:, :, 0]


class EncoderUNetModel(nn.Cell):
    """The half UNet classifier: ``construct(x, timesteps)`` → [N, out_channels] logits.

    Arguments are those of :class:`models.unet.UNetModel` (no labels, no
    decoder) plus ``pool``, the head on the middle block's features:

    - ``adaptive``: GroupNorm, SiLU, global average pool, zero-initialised 1×1 conv;
    - ``attention``: GroupNorm, SiLU, :class:`AttentionPool2d` (needs ``num_head_channels``; ADM's choice);
    - ``spatial``: spatial means of every block's output, concatenated, through a 2048-wide ReLU MLP;
    - ``spatial_v2``: as ``spatial`` with GroupNorm + SiLU in the MLP.
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
        use_checkpoint=False,
        use_fp16=False,
        dtype=None,
        num_heads=1,
        num_head_channels=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("attention pooling needs num_head_channels")
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.pool = pool
        self.dtype = compute_dtype(use_fp16, dtype)
        attention_resolutions = tuple(attention_resolutions)

        time_embed_dim = model_channels * 4
        self.time_embed = time_embedding_mlp(model_channels)

        def res_block(channels, out, **updown):
            return ResBlock(
                channels, time_embed_dim, dropout, out_channels=out, use_scale_shift_norm=use_scale_shift_norm, **updown
            )

        def attention(channels):
            return AttentionBlock(
                channels,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        self.input_blocks, self.middle_block, block_channels, ch, ds = build_encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res_block, attention,
            resblock_updown, conv_resample)
        feature_size = sum(block_channels) + ch  # the spatial heads read every input block and the middle block

        if pool == "adaptive":
            head = [*normalization_silu(ch), GlobalAvgPool(), zero_module(conv_nd(2, ch, out_channels, 1)),
                    nn.Flatten()]
        elif pool == "attention":
            head = [*normalization_silu(ch), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)]
        elif pool == "spatial":
            head = [nn.Dense(feature_size, 2048), nn.ReLU(), nn.Dense(2048, out_channels)]
        else:
            head = [nn.Dense(feature_size, 2048), *normalization_silu(2048), nn.Dense(2048, out_channels)]
        self.out = nn.SequentialCell(head)

        for torso in (self.input_blocks, self.middle_block):
            convert_convolutions(torso, self.dtype)
            if use_checkpoint:
                for block in torso:  # per block: recompute() on the CellList itself breaks its indexing
                    block.recompute()

    def construct(self, x, timesteps):
        """:param x: [N, C, H, W] noisy images; :param timesteps: [N]; returns [N, out_channels] float32 logits."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial_means = []
        h = x.astype(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if self.pool.startswith("spatial"):
                spatial_means.append(h.astype(x.dtype).mean(axis=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            spatial_means.append(h.astype(x.dtype).mean(axis=(2, 3)))
            return self.out(ops.cat(spatial_means, axis=-1))
        return self.out(h.astype(x.dtype))


def create_classifier(
    image_size,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    classifier_channel_mult="",
    num_classes=1000,
    in_channels=3,
):
    """Build a classifier from guided-diffusion ``create_classifier`` arguments (defaults as its scripts).

    ``classifier_channel_mult`` ("" = :func:`models.unet.default_channel_mult`)
    is an addition for small test networks; heads are 64 channels wide as in ADM.
    """
    if classifier_channel_mult in ("", None):
        channel_mult = default_channel_mult(image_size)
    else:
        channel_mult = tuple(int(m) for m in str(classifier_channel_mult).split(","))
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_downsample_rates(image_size, classifier_attention_resolutions),
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )
