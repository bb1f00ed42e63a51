"""Config → objects: the one place that maps a recipe onto concrete networks.

``mind_diffusion`` itself never imports a model architecture; the command-line
tools build them here from the config's ``model.arch``.
"""
import mindspore as ms

from ..config import unet_side
from ..gaussian_diffusion import create_diffusion
from ..train.latent import latent_diffusion

# model.dtype → the torso's compute dtype (models/unet.py: compute_dtype)
COMPUTE_DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def build_discriminator(config):
    """The patch discriminator of an ``arch: autoencoder`` run with ``train.disc_weight`` > 0, else None."""
    train = config.train
    if config.model.arch != "autoencoder" or train.disc_weight <= 0:
        return None
    from models.discriminator import PatchDiscriminator

    return PatchDiscriminator(config.model.in_channels, train.disc_channels, train.disc_layers, seed=config.seed)


def build_model(model_cfg):
    """The network of a ``model`` config section and its tokenizer (None for non-text models).

    ``arch: classifier`` gives the noisy classifier (its logits are ``model(x_t, t)``); ``arch: latent``
    a :class:`models.latent_diffusion.LatentDiffusion` and its text tokenizer; ``arch: autoencoder`` the
    KL autoencoder (:func:`build_latent`, :func:`build_autoencoder`).
    """
    if model_cfg.arch == "latent":
        return build_latent(model_cfg)
    if model_cfg.arch == "autoencoder":
        return build_autoencoder(model_cfg), None
    from models.glide import SuperResText2ImUNet, Text2ImUNet
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
        tokenizer = glide_tokenizer(model_cfg)
        return model_class(vocab_size=tokenizer.n_vocab, **text, **common), tokenizer
    raise ValueError(f"model.arch {model_cfg.arch!r} is not a network this tool builds "
                     "(use unet, glide, glide_upsample, classifier, latent or autoencoder)")


def glide_tokenizer(model_cfg):
    """A GLIDE recipe's tokenizer: UTF-8 bytes, or words and CJK characters of ``model.vocab`` (WordPiece),
    both reading normalised prompts in a context of ``model.text_ctx`` tokens."""
    if not model_cfg.vocab:
        from models.text import ByteTokenizer
        return ByteTokenizer(model_cfg.text_ctx)
    from mind_diffusion.paths import recorded_path
    from models.tokenizers import WordPieceTokenizer
    return WordPieceTokenizer(recorded_path(model_cfg.vocab), context_length=model_cfg.text_ctx, normalise=True)


def prompt_reader(config):
    """How a text model of this recipe reads a prompt before tokenising it: ``read(prompt) -> caption or None``.

    A model trained on the demo set (``data.kind: demo``) follows its own caption forms best, so its
    reader is :func:`mind_diffusion.data.demo.caption_form` (a prompt worded freely becomes the demo
    caption naming the same shape, colour and background; None when it names no shape and colour).
    Any other recipe's reader is None: its prompts go to the tokenizer as written.
    """
    if config.data.kind != "demo" or config.model.arch != "glide":
        return None
    from mind_diffusion.data.demo import caption_form
    return caption_form


def build_classifier(model_cfg, common):
    """ADM's noisy classifier p_φ(y | x_t, t): the UNet's encoder half and a pooling head, num_classes logits."""
    from models.classifier import EncoderUNetModel
    encoder = {key: value for key, value in common.items() if key not in ("out_channels", "num_heads_upsample")}
    return EncoderUNetModel(out_channels=model_cfg.num_classes, pool=model_cfg.pool, **encoder)


def autoencoder_parts(model_cfg):
    """CompVis's ``{ddconfig, embed_dim}`` of the recipe's KL autoencoder (no attention but the middle
    block's, as SD's)."""
    channels = model_cfg.latent_channels
    ddconfig = dict(double_z=True, z_channels=channels, resolution=model_cfg.image_size,
                    in_channels=model_cfg.in_channels, out_ch=model_cfg.in_channels, ch=model_cfg.ae_channels,
                    ch_mult=list(model_cfg.ae_channel_mult), num_res_blocks=model_cfg.ae_num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    return dict(ddconfig=ddconfig, embed_dim=channels)


def build_autoencoder(model_cfg):
    """The recipe's :class:`models.autoencoder.AutoencoderKL` (random weights)."""
    from models.autoencoder import create_autoencoder
    parts = autoencoder_parts(model_cfg)
    return create_autoencoder(parts["ddconfig"], parts["embed_dim"], model_cfg.scale_factor)


def latent_parts(model_cfg, vocab_size):
    """The three networks of an ``arch: latent`` recipe, as a converted checkpoint's ``ldm_config``
    describes them (what :func:`mind_diffusion.cli.latent.load_latent_model` rebuilds for sampling)."""
    from mind_diffusion.clip_names import layout_traits
    from models.unet import attention_downsample_rates

    side = unet_side(model_cfg)
    wukong = model_cfg.numerics == "wukong"
    heads = dict(num_heads=-1, num_head_channels=model_cfg.num_head_channels) \
        if model_cfg.num_head_channels > 0 else dict(num_heads=model_cfg.num_heads, num_head_channels=-1)
    unet = dict(image_size=side, in_channels=model_cfg.latent_channels, out_channels=model_cfg.latent_channels,
                model_channels=model_cfg.num_channels, num_res_blocks=model_cfg.num_res_blocks,
                attention_resolutions=list(attention_downsample_rates(side, model_cfg.attention_resolutions)),
                channel_mult=list(model_cfg.channel_mult), transformer_depth=model_cfg.transformer_depth,
                context_dim=model_cfg.xf_width, use_linear_in_transformer=model_cfg.use_linear_in_transformer,
                gelu_approximate=wukong,
                float32_frequencies=wukong, dropout=model_cfg.dropout, **heads)
    if model_cfg.pooled_text:  # GLIDE's path; absent from SD-layout configs, which stay CompVis's arguments
        unet.update(pooled_context=True, use_scale_shift_norm=True)
    traits = layout_traits(model_cfg.text_layout)
    text = dict(layout=model_cfg.text_layout, prefix="", vocab_size=int(vocab_size),
                context_length=model_cfg.text_ctx, width=model_cfg.xf_width, layers=model_cfg.xf_layers,
                heads=model_cfg.xf_heads, mlp_width=4 * model_cfg.xf_width, activation=traits["activation"],
                numerics="wukong" if wukong else "clip", skip_last_layers=traits["skip_last_layers"])
    return dict(unet=unet, vae=autoencoder_parts(model_cfg), text_encoder=text,
                scale_factor=model_cfg.scale_factor, numerics=model_cfg.numerics)


def build_latent(model_cfg):
    """(LatentDiffusion, tokenizer) of an ``arch: latent`` recipe: the UNet to train, the frozen autoencoder,
    and the text encoder, frozen unless ``model.train_text_encoder``, with the weights of
    ``model.autoencoder_from`` / ``model.text_encoder_from``."""
    from mind_diffusion.paths import recorded_path
    from models.autoencoder import create_autoencoder
    from models.clip_text import CLIPTextEncoder, encoder_arguments
    from models.latent_diffusion import LatentDiffusion
    from models.latent_unet import create_latent_unet
    from models.tokenizers import tokenizer_for_layout

    tokenizer = tokenizer_for_layout(model_cfg.text_layout, recorded_path(model_cfg.vocab))
    parts = latent_parts(model_cfg, tokenizer.n_vocab)
    unet = create_latent_unet(**parts["unet"], dtype=COMPUTE_DTYPES[model_cfg.dtype])
    vae = create_autoencoder(parts["vae"]["ddconfig"], parts["vae"]["embed_dim"], parts["scale_factor"])
    text = CLIPTextEncoder(**encoder_arguments(parts["text_encoder"]))
    # weights before wrapping: LatentDiffusion prefixes the parameters' names
    if model_cfg.unet_from:
        load_part(unet, "unet", model_cfg.unet_from, model_cfg)
    if model_cfg.autoencoder_from:
        load_part(vae, "vae", model_cfg.autoencoder_from, model_cfg)
    if model_cfg.text_encoder_from:
        load_part(text, "text_encoder", model_cfg.text_encoder_from, model_cfg)
    for part in (vae, text):  # inference behaviour (no dropout); trainability is LatentDiffusion's
        part.set_train(False)
    return LatentDiffusion(unet, vae, text, parts, train_text_encoder=model_cfg.train_text_encoder), tokenizer


def load_part(network, part, path, model_cfg):
    """Fill a part (``"unet"``, ``"vae"`` or ``"text_encoder"``) from ``path``: an SD / Wukong-Huahua checkpoint,
    original or converted, or (the autoencoder) an ``arch: autoencoder`` run's checkpoint, its EMA copy.

    :raises ValueError: naming the file, the part, and what does not fit.
    """
    from mind_diffusion.checkpoints import checkpoint_config, model_weights, read_checkpoint
    from mind_diffusion.cli.latent import checkpoint_components, is_latent_checkpoint
    from mind_diffusion.convert import ConversionError, load_into

    key = {"unet": "model.unet_from", "vae": "model.autoencoder_from", "text_encoder": "model.text_encoder_from"}[part]
    what = {"unet": "UNet", "vae": "autoencoder", "text_encoder": "text encoder"}[part]
    if is_latent_checkpoint(path):
        heads = dict(num_head_channels=model_cfg.num_head_channels) if model_cfg.num_head_channels > 0 \
            else dict(num_heads=model_cfg.num_heads)
        components, _ = checkpoint_components(path, text_heads=model_cfg.xf_heads, **heads)
        weights = components[part]
    else:
        checkpoint = read_checkpoint(path)
        saved = checkpoint_config(checkpoint) or {}
        if part != "vae" or saved.get("model", {}).get("arch") != "autoencoder":
            raise ValueError(f"{key}: {path} is neither a latent diffusion checkpoint (SD, Wukong-Huahua, converted)"
                             + (" nor an arch: autoencoder run's checkpoint" if part == "vae" else ""))
        weights = {name: value.asnumpy() for name, value in model_weights(checkpoint).items()}
    if not weights:
        raise ValueError(f"{key}: {path} holds no {what}")
    try:
        load_into(network, weights)
    except ConversionError as err:
        raise ValueError(f"{key}: {path} does not fit the recipe's {what} (check the recipe's sizes: model.ae_* "
                         f"and latent_channels, model.xf_*, or the UNet's): {err}") from None


def build_diffusion(diffusion_cfg, model_cfg, respaced=True):
    """The process of a ``diffusion`` config section (learn_sigma comes from the model).

    :param respaced: apply ``diffusion.timestep_respacing`` (the process trained on). Sampling
        takes the base process (``respaced=False``) and respaces it to the sampling steps
        itself: the network sees original timesteps either way (``model_timesteps``).
    """
    if model_cfg.arch == "latent":
        return latent_diffusion(diffusion_cfg)
    return create_diffusion(
        steps=diffusion_cfg.steps, noise_schedule=diffusion_cfg.noise_schedule,
        learn_sigma=model_cfg.learn_sigma, sigma_small=diffusion_cfg.sigma_small,
        predict_xstart=diffusion_cfg.predict_xstart, predict_v=diffusion_cfg.predict_v, loss=diffusion_cfg.loss,
        rescale_timesteps=diffusion_cfg.rescale_timesteps,
        timestep_respacing=diffusion_cfg.timestep_respacing if respaced else "")
