"""The latent-diffusion UNet (Rombach et al. 2022): the ADM UNet with spatial transformers.

Stable Diffusion's ``openaimodel.UNetModel`` is guided-diffusion's UNet (same
residual blocks, same sub-cell names) whose attention blocks are
:class:`~models.cross_attention.SpatialTransformer`\\ s attending to a text context.
:class:`LatentUNet` is :class:`models.unet.UNetModel` built with
``use_spatial_transformer=True`` and called as ``model(z_t, t, context=states)``;
its parameter names are CompVis's ``model.diffusion_model.*`` keys without the
prefix (norms: gamma/beta ↔ weight/bias), so SD 1.x/2.x and (renamed)
Wukong-Huahua weights load by name.

The options CompVis's config files use, and what they mean here:

- SD 1.x: ``num_heads=8``, 1×1-conv projections, context 768, ε prediction;
- SD 2.x: ``num_head_channels=64``, ``use_linear_in_transformer=True``, context 1024,
  v prediction for the 768-px models (a property of the process, not of the network);
- Wukong-Huahua: SD 1.x's shapes with its MindSpore numerics: ``gelu_approximate=True``
  (tanh-GELU in GEGLU) and ``float32_frequencies=True`` (float32 exp in the timestep sinusoids).

One option is not SD's: ``pooled_context=True`` adds ``context_proj`` (the mean of the context over its
tokens) to the timestep embedding, as GLIDE adds ``transformer_proj`` of its pooled text (the last token's
state there; the mean here, a function of any encoder's states);
with ``use_scale_shift_norm=True`` every residual block then scales and shifts its activations by the
caption (AdaGN), not only the cross-attention blocks at the low resolutions.
"""
from mindspore import nn

from models.unet import UNetModel

__all__ = ["LatentUNet", "create_latent_unet", "SD_UNET_KEYS"]

# The constructor arguments a latent UNet config may carry (CompVis's unet_config.params names).
SD_UNET_KEYS = ("image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions",
                "num_res_blocks", "channel_mult", "num_heads", "num_head_channels", "transformer_depth",
                "context_dim", "use_linear_in_transformer", "gelu_approximate", "float32_frequencies", "dropout", "conv_resample",
                "use_checkpoint", "use_fp16", "dtype", "num_heads_upsample", "legacy", "use_spatial_transformer",
                "use_scale_shift_norm", "pooled_context")


class LatentUNet(UNetModel):
    """ε (or v) from a noisy latent z_t [N, C, h, w], timesteps [N] and a context [N, L, context_dim].

    Takes :class:`~models.unet.UNetModel`'s arguments; ``use_spatial_transformer`` is always on.

    :param pooled_context: condition the timestep embedding on the caption too: add
        ``context_proj(mean_L context)`` [N, 4·model_channels] (GLIDE's pooled-text path). The mean over
        all L positions, padding included: a causal text encoder's padding states have seen the whole
        caption, and the mean is the same function of the context for every encoder.
    """

    def __init__(self, *args, pooled_context=False, **kwargs):
        kwargs["use_spatial_transformer"] = True
        super().__init__(*args, **kwargs)
        self.pooled_context = bool(pooled_context)
        if self.pooled_context:
            self.context_proj = nn.Dense(kwargs["context_dim"], 4 * self.model_channels)

    def construct(self, x, timesteps, context):
        emb = self.embed(timesteps)
        if self.pooled_context:
            emb = emb + self.context_proj(context.mean(1))
        return self.forward_with_emb(x, emb, context)


def create_latent_unet(**config):
    """A :class:`LatentUNet` from CompVis ``unet_config.params``-style arguments.

    ``attention_resolutions`` are downsample rates (CompVis's convention: SD uses 4, 2, 1);
    ``legacy`` and ``use_spatial_transformer`` are accepted and change nothing (with spatial
    transformers CompVis's two head conventions agree); ``use_checkpoint`` defaults to off here.
    """
    unknown = sorted(set(config) - set(SD_UNET_KEYS))
    if unknown:
        raise ValueError(f"unknown latent UNet arguments: {', '.join(unknown)}; known: {', '.join(SD_UNET_KEYS)}")
    config = dict(config)
    config.pop("legacy", None)
    if config.pop("use_spatial_transformer", True) is not True:
        raise ValueError("a latent UNet always uses spatial transformers (use_spatial_transformer=True)")
    config.setdefault("num_heads", -1 if config.get("num_head_channels", -1) != -1 else 8)
    config["channel_mult"] = tuple(config.get("channel_mult", (1, 2, 4, 4)))
    config["attention_resolutions"] = tuple(config["attention_resolutions"])
    return LatentUNet(**config)
