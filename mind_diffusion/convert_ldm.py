"""Stable Diffusion 1.x/2.x and Wukong-Huahua checkpoints → this project's latent networks.

Reads, without torch: CompVis/Stability ``.ckpt`` files (torch zip, a ``state_dict`` with
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` and the schedule
buffers), ``.safetensors`` files with the same keys, and Wukong-Huahua's MindSpore ``.ckpt``.
Everything is brought to SD's key names first (:func:`wukong_to_sd_names`: Wukong renames its
UNet's norms and wraps convolutions), then:

- the whole configuration is read off the names and shapes (:func:`infer_ldm_config`): the UNet's
  channels, multipliers, residual blocks per level, attention levels, transformer depth, context
  width and projection kind; the autoencoder's; the text encoder's (:mod:`.clip_names`); the
  schedule from the ``betas`` buffer. What shapes cannot tell comes from flags or SD's
  conventions: the heads (SD 1.x and Wukong: 8 heads; SD 2.x: 64 channels per head), the
  prediction (ε unless told v: SD 2.x's 768-px models predict v), the scale factor (0.18215);
- every tensor gets its name in our networks (:func:`convert_ldm_state_dict`), under the
  prefixes ``unet.``, ``vae.``, ``text_encoder.``: the same name after the component prefix,
  except that a 1-D ``weight``/``bias`` (a GroupNorm or LayerNorm) becomes ``gamma``/``beta``.
  Schedule buffers and EMA copies are dropped by name; anything else is reported as unexpected.

Names and numbers only: building the networks from the config is the programs' business
(``python -m mind_diffusion.convert`` builds them to check every name and shape).
"""
import json
import re
import zipfile

import numpy as np

from .clip_names import TextEncoderNamesError, extract_text_encoder, find_text_encoders, infer_text_config
from .safetensors import SafetensorsFormatError, load_safetensors
from .sampling.schedulers.ldm import ldm_betas
from .torch_pickle import CheckpointFormatError, load_state_dict

__all__ = [
    "SD_UNET", "SD_VAE", "PREFIXES", "SD_SCALE_FACTOR", "LDMConfigError",
    "read_checkpoint", "is_ldm_checkpoint", "wukong_to_sd_names", "infer_unet_config", "infer_vae_config",
    "infer_schedule", "infer_ldm_config", "load_ldm_checkpoint", "ldm_from_state", "read_converted", "convert_ldm_state_dict", "sd_names_of", "config_json",
]

SD_UNET = "model.diffusion_model."
SD_VAE = "first_stage_model."
PREFIXES = {"unet": "unet.", "vae": "vae.", "text_encoder": "text_encoder."}  # ours, in a converted file
SD_SCALE_FACTOR = 0.18215          # latent scale of SD 1.x/2.x and Wukong (unit-variance training latents)
SD_SCHEDULE = dict(timesteps=1000, linear_start=0.00085, linear_end=0.012)  # SD's "linear" β: √β evenly spaced
SD1_HEADS = 8                      # SD 1.x / Wukong: num_heads 8
SD2_HEAD_CHANNELS = 64             # SD 2.x: num_head_channels 64
SD2_CONTEXT = 1024                 # OpenCLIP ViT-H/14 text width
# LatentDiffusion's registered schedule buffers (recomputed from the config here).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay",
                    "model_ema.num_updates", "scale_factor")
EMA_PREFIX = "model_ema."          # CompVis's EMA copy of the UNet (names without dots): not converted

# Wukong-Huahua's MindSpore names → SD's, for UNet and VAE keys (the text encoder goes to .clip_names as is).
_WUKONG_RULES = [
    (re.compile(r"\.in_layers_norm\."), ".in_layers.0."),
    (re.compile(r"\.in_layers_conv\.conv\."), ".in_layers.2."),
    (re.compile(r"\.out_layers_norm\."), ".out_layers.0."),
    (re.compile(r"\.out_layers_conv\.conv\."), ".out_layers.3."),
    (re.compile(r"\.skip_connection\.conv\."), ".skip_connection."),
    (re.compile(r"\.op\.conv\."), ".op."),                                  # UNet Downsample
    (re.compile(r"^(model\.diffusion_model\..*)\.conv\.conv\."), r"\1.conv."),  # UNet Upsample
    (re.compile(r"^(model\.diffusion_model\.input_blocks\.0\.0)\.conv\."), r"\1."),
    (re.compile(r"^(model\.diffusion_model\.out\.2)\.conv\."), r"\1."),
    (re.compile(r"\.gamma$"), ".weight"),
    (re.compile(r"\.beta$"), ".bias"),
]


class LDMConfigError(ValueError):
    """A checkpoint's names or shapes do not make a latent diffusion model: says what and what to pass."""


def read_checkpoint(path):
    """``({key: np.ndarray}, format)`` of a .safetensors, torch zip or MindSpore checkpoint, format being
    ``"safetensors"``, ``"torch"`` or ``"mindspore"``. A torch checkpoint's ``state_dict`` is unwrapped.

    :raises CheckpointFormatError: if the file is none of these.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    if str(path).endswith(".safetensors"):
        try:
            return load_safetensors(path)[0], "safetensors"
        except SafetensorsFormatError as error:
            raise CheckpointFormatError(str(error)) from None
    if zipfile.is_zipfile(path):
        obj = load_state_dict(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)} if isinstance(obj, dict) else {}
        if not arrays:
            raise CheckpointFormatError(f"{path}: a torch checkpoint without a state dict of tensors")
        return arrays, "torch"
    if len(head) < 8:
        raise CheckpointFormatError(f"{path}: too short to be a checkpoint")
    import mindspore as ms  # only for MindSpore's own format

    try:
        loaded = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, TypeError) as error:
        raise CheckpointFormatError(f"{path}: neither a .safetensors, a torch zip nor a MindSpore checkpoint "
                                    f"({error})") from None
    return {k: v.asnumpy() for k, v in loaded.items() if hasattr(v, "asnumpy")}, "mindspore"


def is_ldm_checkpoint(names):
    """True when the keys are a latent diffusion model's (a UNet or autoencoder under SD's or Wukong's names)."""
    return any(n.startswith((SD_UNET, SD_VAE)) for n in names)


def wukong_to_sd_names(state):
    """``state`` with Wukong-Huahua's UNet and VAE names turned into SD v1's (other keys unchanged)."""
    renamed = {}
    for key, value in state.items():
        if key.startswith((SD_UNET, SD_VAE)):
            for pattern, replacement in _WUKONG_RULES:
                key = pattern.sub(replacement, key)
        if key in renamed:
            raise LDMConfigError(f"two checkpoint tensors map to {key!r}: is this a mix of SD and Wukong names?")
        renamed[key] = value
    return renamed


def _indices(shapes, prefix, folder):
    pattern = re.compile(re.escape(prefix + folder) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pattern.match, shapes) if m})


def _need(shapes, key, what):
    if key not in shapes:
        raise LDMConfigError(f"{what}: the checkpoint has no {key!r}")
    return tuple(int(n) for n in shapes[key])


def infer_unet_config(shapes, num_heads=None, num_head_channels=None):
    """CompVis ``UNetModel`` arguments from SD-named ``shapes`` {key: shape} (see the module docstring).

    Heads: ``num_head_channels`` or ``num_heads`` if given, else SD 2.x's 64 channels per head for a
    model with linear projections or a 1024-wide context, SD 1.x's 8 heads otherwise.
    """
    p = SD_UNET
    model_channels, in_channels = _need(shapes, p + "input_blocks.0.0.weight", "UNet input conv")[:2]
    out_channels = _need(shapes, p + "out.2.weight", "UNet output conv")[0]
    levels, current = [], []
    for i in _indices(shapes, p, "input_blocks")[1:]:
        block = f"{p}input_blocks.{i}."
        if block + "0.op.weight" in shapes:
            levels.append(current)
            current = []
        elif block + "0.in_layers.2.weight" in shapes:
            current.append((shapes[block + "0.in_layers.2.weight"][0], block + "1.norm.weight" in shapes))
        else:
            raise LDMConfigError(f"UNet input block {i} is neither a residual block nor a downsampling conv")
    levels.append(current)
    num_res_blocks = len(levels[0])
    if num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels):
        raise LDMConfigError(f"UNet levels hold {[len(l) for l in levels]} residual blocks: not the same number")
    channel_mult = []
    for level in levels:
        widths = {w for w, _ in level}
        if len(widths) != 1 or next(iter(widths)) % model_channels:
            raise LDMConfigError(f"UNet level widths {sorted(widths)} are not one multiple of {model_channels}")
        channel_mult.append(next(iter(widths)) // model_channels)
    attention_levels = [level for level, blocks in enumerate(levels) if any(a for _, a in blocks)]

    transformer = p + "middle_block.1."
    _need(shapes, transformer + "norm.weight", "UNet middle spatial transformer")
    depth = len(_indices(shapes, transformer, "transformer_blocks"))
    context_dim = _need(shapes, transformer + "transformer_blocks.0.attn2.to_k.weight", "cross-attention")[1]
    use_linear = len(shapes[transformer + "proj_in.weight"]) == 2
    if num_heads is not None and num_head_channels is not None:
        raise LDMConfigError("give num_heads or num_head_channels, not both")
    if num_head_channels is not None:
        heads, heads_from = dict(num_heads=-1, num_head_channels=int(num_head_channels)), "given"
    elif num_heads is not None:
        heads, heads_from = dict(num_heads=int(num_heads), num_head_channels=-1), "given"
    elif use_linear or context_dim == SD2_CONTEXT:
        heads = dict(num_heads=-1, num_head_channels=SD2_HEAD_CHANNELS)
        heads_from = f"SD 2.x convention ({SD2_HEAD_CHANNELS} channels per head)"
    else:
        heads, heads_from = dict(num_heads=SD1_HEADS, num_head_channels=-1), f"SD 1.x convention ({SD1_HEADS} heads)"
    for level in attention_levels:
        width = model_channels * channel_mult[level]
        split = heads["num_heads"] if heads["num_heads"] != -1 else heads["num_head_channels"]
        if width % split:
            raise LDMConfigError(f"UNet attention width {width} does not split into {split} "
                                 f"({'heads' if heads['num_heads'] != -1 else 'channels per head'}, {heads_from}): "
                                 "pass the model's num_heads or num_head_channels")
    config = dict(image_size=64, in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                  attention_resolutions=[2 ** level for level in attention_levels], num_res_blocks=num_res_blocks,
                  channel_mult=channel_mult, transformer_depth=depth, context_dim=context_dim,
                  use_linear_in_transformer=use_linear, gelu_approximate=False, float32_frequencies=False, **heads)
    # this project's pooled-text option (models/latent_unet.py), not SD's: its projection, and AdaGN's
    # embedding layers giving a scale and a shift (twice the block's width)
    if p + "context_proj.weight" in shapes:
        config["pooled_context"] = True
    emb_out = shapes.get(p + "input_blocks.1.0.emb_layers.1.weight")
    if emb_out is not None and emb_out[0] == 2 * levels[0][0][0]:
        config["use_scale_shift_norm"] = True
    return config, heads_from


def infer_vae_config(shapes, resolution=256):
    """CompVis ``AutoencoderKL`` (``ddconfig``, ``embed_dim``) from SD-named ``shapes``.

    ``resolution`` is nominal (the autoencoder is fully convolutional): it only gives the
    sides in ``attn_resolutions`` their meaning.
    """
    p = SD_VAE
    ch, in_channels = _need(shapes, p + "encoder.conv_in.weight", "autoencoder input conv")[:2]
    levels = _indices(shapes, p, "encoder.down")
    ch_mult, attn_resolutions = [], []
    for level in levels:
        width = _need(shapes, f"{p}encoder.down.{level}.block.0.conv1.weight", "autoencoder level")[0]
        if width % ch:
            raise LDMConfigError(f"autoencoder level {level} width {width} is not a multiple of {ch}")
        ch_mult.append(width // ch)
        if f"{p}encoder.down.{level}.attn.0.q.weight" in shapes:
            attn_resolutions.append(resolution // 2 ** level)
    z_channels = _need(shapes, p + "decoder.conv_in.weight", "decoder input conv")[1]
    double_z = _need(shapes, p + "encoder.conv_out.weight", "encoder output conv")[0] == 2 * z_channels
    ddconfig = dict(double_z=double_z, z_channels=z_channels, resolution=resolution, in_channels=in_channels,
                    out_ch=_need(shapes, p + "decoder.conv_out.weight", "decoder output conv")[0], ch=ch,
                    ch_mult=ch_mult, num_res_blocks=len(_indices(shapes, p + "encoder.down.0.", "block")),
                    attn_resolutions=attn_resolutions, dropout=0.0)
    embed_dim = _need(shapes, p + "quant_conv.weight", "quant_conv")[0] // 2
    return dict(ddconfig=ddconfig, embed_dim=embed_dim)


def infer_schedule(state):
    """SD's schedule {timesteps, linear_start, linear_end}: from the ``betas`` buffer when there is one
    (√β evenly spaced from √start to √end), else SD's (Wukong's files hold no buffers)."""
    if "betas" not in state:
        return dict(SD_SCHEDULE), "SD's (no betas in the checkpoint)"
    betas = np.asarray(state["betas"], np.float64)
    start, end = float(f"{betas[0]:.6g}"), float(f"{betas[-1]:.6g}")
    if not np.allclose(ldm_betas(len(betas), start, end), betas, rtol=1e-5, atol=0):
        raise LDMConfigError("the checkpoint's betas are not SD's linear schedule (√β evenly spaced); "
                             "other schedules are not supported")
    return dict(timesteps=len(betas), linear_start=start, linear_end=end), "the checkpoint's betas"


def infer_ldm_config(state, num_heads=None, num_head_channels=None, text_heads=None, prediction="eps",
                     scale_factor=SD_SCALE_FACTOR, numerics="sd"):
    """The whole model's configuration from SD-named ``state`` {key: array}.

    Keys: ``unet`` (:func:`infer_unet_config`), ``vae`` (``{ddconfig, embed_dim}`` or None),
    ``text_encoder`` (:func:`.clip_names.infer_text_config`'s dict, or None without one),
    ``schedule``, ``prediction`` ("eps" or "v"), ``scale_factor``, ``numerics`` ("sd", or
    "wukong": tanh-GELU in the UNet's GEGLU and float32 timestep frequencies) and ``inferred`` (where the heads and the schedule
    came from, for ``--list``).
    """
    if prediction not in ("eps", "v"):
        raise LDMConfigError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if numerics not in ("sd", "wukong"):
        raise LDMConfigError(f"numerics must be 'sd' or 'wukong', got {numerics!r}")
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    unet, heads_from = infer_unet_config(shapes, num_heads, num_head_channels)
    unet["gelu_approximate"] = unet["float32_frequencies"] = numerics == "wukong"
    schedule, schedule_from = infer_schedule(state)
    config = dict(unet=unet, vae=infer_vae_config(shapes) if any(k.startswith(SD_VAE) for k in shapes) else None,
                  text_encoder=None, schedule=schedule, prediction=prediction, scale_factor=float(scale_factor),
                  numerics=numerics, inferred=dict(heads=heads_from, schedule=schedule_from))
    if find_text_encoders(shapes):
        try:
            config["text_encoder"] = infer_text_config(shapes, heads=text_heads)
        except TextEncoderNamesError as error:
            raise LDMConfigError(f"{error} (option --text-heads)") from None
        config["text_encoder"]["numerics"] = "wukong" if numerics == "wukong" else "clip"  # LayerNorm ε
    return config


def load_ldm_checkpoint(path, **options):
    """``(state, config, format)`` of a latent diffusion checkpoint: ``state`` with SD's key names
    (Wukong's renamed by :func:`wukong_to_sd_names`), ``config`` from :func:`infer_ldm_config`
    (``options`` are its keyword arguments; Wukong-named files get ``numerics="wukong"`` unless
    ``numerics`` is given).

    :raises CheckpointFormatError: if the file cannot be read; :raises LDMConfigError: if it
        holds no latent diffusion model or its shapes do not make one.
    """
    raw, fmt = read_checkpoint(path)
    if not is_ldm_checkpoint(raw):
        raise LDMConfigError(f"{path}: no latent diffusion model in it (no {SD_UNET}* or {SD_VAE}* keys)")
    return ldm_from_state(raw, **options) + (fmt,)


def ldm_from_state(raw, **options):
    """``(state, config)`` of :func:`load_ldm_checkpoint` from a checkpoint's tensors already read."""
    state = wukong_to_sd_names(raw)
    wukong = any(k.startswith((SD_UNET, SD_VAE)) and k.endswith((".gamma", ".beta")) for k in raw)
    if options.get("numerics") is None:
        options["numerics"] = "wukong" if wukong else "sd"
    return state, infer_ldm_config(state, **options)


def read_converted(path):
    """``({component: {our name: np.ndarray}}, config)`` of a checkpoint written by
    ``python -m mind_diffusion.convert`` from a latent diffusion model (components ``unet``, ``vae``,
    ``text_encoder``; config as :func:`infer_ldm_config` made it)."""
    import mindspore as ms

    loaded = ms.load_checkpoint(str(path))
    if "ldm_config" not in loaded:
        raise CheckpointFormatError(f"{path}: not a converted latent diffusion checkpoint (no ldm_config entry); "
                                    "convert the original with python -m mind_diffusion.convert")
    config = json.loads(loaded.pop("ldm_config"))
    components = {name: {} for name in PREFIXES}
    for key, value in loaded.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                components[name][key[len(prefix):]] = value.asnumpy()
    return components, config


def _our_name(key, weight_ndim):
    """Our parameter name for an SD key: 1-D ``weight``/``bias`` of a norm → ``gamma``/``beta``."""
    head, _, last = key.rpartition(".")
    if weight_ndim == 1 and last in ("weight", "bias"):
        return f"{head}.{'gamma' if last == 'weight' else 'beta'}"
    return key


def _component(state, sd_prefix, ours):
    converted = {}
    for key, value in state.items():
        if key.startswith(sd_prefix):
            name = key[len(sd_prefix):]
            weight = state.get(key.rpartition(".")[0] + ".weight")
            ndim = np.ndim(weight) if weight is not None else np.ndim(value)
            converted[ours + _our_name(name, ndim)] = np.asarray(value)
    return converted


def convert_ldm_state_dict(state, config):
    """``(params, report)``: ``params`` {prefixed our name: array} of every component, ``report`` with the
    ``ignored`` keys (schedule buffers, EMA copies, the text encoder's extras) and the ``unexpected`` ones.

    :raises TextEncoderNamesError: for a text encoder with missing, mis-shaped or unexpected tensors.
    """
    params = _component(state, SD_UNET, PREFIXES["unet"])
    params.update(_component(state, SD_VAE, PREFIXES["vae"]))
    used = {k for k in state if k.startswith((SD_UNET, SD_VAE))}
    text = config.get("text_encoder")
    if text is not None:
        text_params, _ = extract_text_encoder(state, text["layout"], text["prefix"], text["heads"])
        params.update({PREFIXES["text_encoder"] + k: v for k, v in text_params.items()})
        used.update(k for k in state if k.startswith(text["prefix"]))  # extract_text_encoder checked them all
    ignored = sorted(k for k in state if k not in used and (k in SCHEDULE_BUFFERS or k.startswith(EMA_PREFIX)))
    unexpected = sorted(set(state) - used - set(ignored))
    return params, dict(ignored=ignored, unexpected=unexpected)


_SD_LAST = {"gamma": "weight", "beta": "bias"}


def sd_names_of(params):
    """The inverse of :func:`convert_ldm_state_dict` for UNet and VAE: ``{SD key: array}`` of our prefixed
    ``unet.``/``vae.`` names (gamma/beta → weight/bias); other names are left out."""
    out = {}
    for name, value in params.items():
        for component, sd_prefix in (("unet", SD_UNET), ("vae", SD_VAE)):
            if name.startswith(PREFIXES[component]):
                key = sd_prefix + name[len(PREFIXES[component]):]
                head, _, last = key.rpartition(".")
                out[f"{head}.{_SD_LAST.get(last, last)}"] = value
    return out


def config_json(config):
    """The config as the JSON string a converted checkpoint carries (key ``ldm_config``)."""
    return json.dumps(config, sort_keys=True)
