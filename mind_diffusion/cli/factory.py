"""Config → objects: the one place that maps a recipe onto concrete networks.

``mind_diffusion`` itself never imports a model architecture; the command-line
tools build them here from the config's ``model.arch``.
"""
import mindspore as ms

from ..gaussian_diffusion import create_diffusion

# model.dtype → the torso's compute dtype (models/unet.py: compute_dtype)
COMPUTE_DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def build_model(model_cfg):
    """The network of a ``model`` config section and its tokenizer (None for non-text models).

    ``arch: classifier`` gives the noisy classifier (its logits are ``model(x_t, t)``).
    """
    from models.glide import SuperResText2ImUNet, Text2ImUNet
    from models.text import ByteTokenizer
    from models.unet import UNetModel, attention_downsample_rates

    common = dict(
        image_size=model_cfg.image_size,
        in_channels=model_cfg.in_channels,
        model_channels=model_cfg.num_channels,
        out_channels=model_cfg.in_channels * (2 if model_cfg.learn_sigma else 1),
        num_res_blocks=model_cfg.num_res_blocks,
        attention_resolutions=attention_downsample_rates(model_cfg.image_size, model_cfg.attention_resolutions),
        dropout=model_cfg.dropout,
        channel_mult=tuple(model_cfg.channel_mult),
        dtype=COMPUTE_DTYPES[model_cfg.dtype],
        num_heads=model_cfg.num_heads,
        num_head_channels=model_cfg.num_head_channels,
        num_heads_upsample=model_cfg.num_heads_upsample,
        use_scale_shift_norm=model_cfg.use_scale_shift_norm,
        resblock_updown=model_cfg.resblock_updown,
        use_new_attention_order=model_cfg.use_new_attention_order,
    )
    if model_cfg.arch == "classifier":
        return build_classifier(model_cfg, common), None
    if model_cfg.arch == "unet":
        return UNetModel(num_classes=model_cfg.num_classes if model_cfg.class_cond else None, **common), None
    if model_cfg.arch in ("glide", "glide_upsample"):
        text = dict(text_ctx=model_cfg.text_ctx, xf_width=model_cfg.xf_width, xf_layers=model_cfg.xf_layers,
                    xf_heads=model_cfg.xf_heads, xf_final_ln=model_cfg.xf_final_ln,
                    xf_padding=model_cfg.xf_padding, xf_causal=model_cfg.xf_causal)
        model_class = Text2ImUNet if model_cfg.arch == "glide" else SuperResText2ImUNet
        return model_class(**text, **common), ByteTokenizer(model_cfg.text_ctx)
    raise ValueError(f"model.arch {model_cfg.arch!r} is not a network this tool builds "
                     "(use unet, glide, glide_upsample or classifier)")


def build_classifier(model_cfg, common):
    """ADM's noisy classifier p_φ(y | x_t, t): the UNet's encoder half and a pooling head, num_classes logits."""
    from models.classifier import EncoderUNetModel
    encoder = {key: value for key, value in common.items() if key not in ("out_channels", "num_heads_upsample")}
    return EncoderUNetModel(out_channels=model_cfg.num_classes, pool=model_cfg.pool, **encoder)


def build_diffusion(diffusion_cfg, model_cfg, respaced=True):
    """The process of a ``diffusion`` config section (learn_sigma comes from the model).

    :param respaced: apply ``diffusion.timestep_respacing`` (the process trained on). Sampling
        takes the base process (``respaced=False``) and respaces it to the sampling steps
        itself: the network sees original timesteps either way (``model_timesteps``).
    """
    return create_diffusion(
        steps=diffusion_cfg.steps, noise_schedule=diffusion_cfg.noise_schedule,
        learn_sigma=model_cfg.learn_sigma, sigma_small=diffusion_cfg.sigma_small,
        predict_xstart=diffusion_cfg.predict_xstart, predict_v=diffusion_cfg.predict_v, loss=diffusion_cfg.loss,
        rescale_timesteps=diffusion_cfg.rescale_timesteps,
        timestep_respacing=diffusion_cfg.timestep_respacing if respaced else "")
