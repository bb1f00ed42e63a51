"""Text-to-image from a latent diffusion checkpoint: Stable Diffusion 1.x/2.x or Wukong-Huahua.

``run_infer.sh`` comes here when ``--ckpt`` is such a checkpoint (an SD ``.ckpt`` or
``.safetensors``, Wukong-Huahua's MindSpore ``.ckpt``, or one converted by
``python -m mind_diffusion.convert``)::

    bash run_infer.sh "一只猫" --ckpt wukong-huahua-ms.ckpt --vocab vocab_zh.txt --size 512
    bash run_infer.sh "a cat" --ckpt sd-v1-4.ckpt --vocab bpe_simple_vocab_16e6.txt.gz --negative "blurry"

The networks' configuration is read off the checkpoint (``mind_diffusion.convert_ldm``); what
the shapes cannot tell comes from SD's conventions or the flags (``--num-heads``,
``--num-head-channels``, ``--text-heads``, ``--prediction``). The tokenizer's vocabulary is the
user's own file (``--vocab``): nothing is downloaded.
"""
import os
import sys
import time
import zipfile


from mind_diffusion.paths import input_path

# Samplers that run on a latent model's base process (CompVis's timestep convention, no clipping).
LATENT_SAMPLERS = ("plms", "ddim", "dpm++2m", "dpm++3m", "ddpm", "euler_a")
DEFAULTS = {"sampler": "plms", "steps": 50, "scale": 7.5, "size": 512}  # CompVis's txt2img defaults


def is_latent_checkpoint(path):
    """Whether ``path`` holds a latent diffusion model (SD, Wukong-Huahua or a converted one).

    Reads names only: a ``.safetensors`` or torch zip file (SD's formats) always is; a MindSpore
    checkpoint is when it carries a converted model's ``ldm_config`` or SD/Wukong UNet names.
    """
    if path.endswith(".safetensors") or (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return True
    from mind_diffusion.convert_ldm import SD_UNET, SD_VAE
    names = checkpoint_names(path)
    return "ldm_config" in names or any(n.startswith((SD_UNET, SD_VAE)) for n in names)


def checkpoint_names(path):
    """The entry names of a MindSpore checkpoint, reading no tensor (empty when it is not one)."""
    import mindspore as ms
    names = []

    def record(name):
        names.append(name)
        return False  # load nothing

    try:
        ms.load_checkpoint(path, choice_func=record)
    except Exception:  # noqa: BLE001 - MindSpore refuses an empty selection, and unreadable files
        pass
    return names


def checkpoint_components(path, **options):
    """``({"unet"|"vae"|"text_encoder": {our name: array}}, config)`` of a latent checkpoint: a converted one
    as written, an SD / Wukong-Huahua one converted on the fly (``options``: :func:`~mind_diffusion.
    convert_ldm.infer_ldm_config`'s ``num_heads``, ``num_head_channels``, ``text_heads``, ``prediction``).

    :raises ValueError: for tensors the inferred model does not have.
    """
    from mind_diffusion.convert_ldm import PREFIXES, convert_ldm_state_dict, load_ldm_checkpoint, read_converted

    if not zipfile.is_zipfile(path) and "ldm_config" in checkpoint_names(path):
        return read_converted(path)
    state, config, _ = load_ldm_checkpoint(path, **options)
    params, report = convert_ldm_state_dict(state, config)
    if report["unexpected"]:
        raise ValueError(f"{path}: {len(report['unexpected'])} tensor(s) this model does not have, e.g. "
                         f"{', '.join(report['unexpected'][:5])}")
    components = {name: {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
                  for name, prefix in PREFIXES.items()}
    return components, config


def load_latent_model(path, args):
    """(config, unet, vae, text encoder, tokenizer) of a latent checkpoint, every parameter checked.

    :raises ValueError: naming the file, the missing piece and the flag that supplies it.
    """
    from mind_diffusion.convert import load_into
    from models.autoencoder import create_autoencoder
    from models.clip_text import CLIPTextEncoder, encoder_arguments
    from models.latent_unet import create_latent_unet
    from models.tokenizers import tokenizer_for_layout

    components, config = checkpoint_components(path, num_heads=args.num_heads,
                                               num_head_channels=args.num_head_channels,
                                               text_heads=args.text_heads, prediction=args.prediction)
    if config.get("vae") is None or config.get("text_encoder") is None:
        missing = "autoencoder (first_stage_model.*)" if config.get("vae") is None else \
            "text encoder (cond_stage_model.*)"
        raise ValueError(f"{path} holds no {missing}: text-to-image needs the whole model")
    text_cfg = config["text_encoder"]
    if not args.vocab:
        kind = "vocab_zh.txt (Wukong-Huahua's BERT-Chinese vocabulary)" if text_cfg["layout"] == "wukong" else \
            "bpe_simple_vocab_16e6.txt.gz or vocab.json (+ merges.txt) of CLIP"
        raise ValueError(f"this latent model's tokenizer needs its vocabulary: pass --vocab with {kind}")
    tokenizer = tokenizer_for_layout(text_cfg["layout"], input_path(args.vocab),
                                     input_path(args.merges) if args.merges else None)
    largest, vocab_size = max(tokenizer.encoder.values()), int(text_cfg["vocab_size"])
    if largest >= vocab_size:
        raise ValueError(f"--vocab {args.vocab} has token ids up to {largest}, beyond the checkpoint's text encoder "
                         f"({vocab_size} tokens): it is not this model's vocabulary")
    unet = create_latent_unet(**config["unet"])
    vae = create_autoencoder(config["vae"]["ddconfig"], config["vae"]["embed_dim"], config["scale_factor"])
    text = CLIPTextEncoder(**encoder_arguments(text_cfg))
    for network, name in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        load_into(network, components[name])
        network.set_train(False)
    return config, unet, vae, text, tokenizer


def run(args, choice, out_dir, grid_name):
    """Sample ``args.n`` images for ``args.prompt`` and write the grid; returns the exit status."""
    from mind_diffusion.convert_ldm import LDMConfigError
    from mind_diffusion.imaging import save_grid, to_uint8
    from mind_diffusion.sampling.latent import ContextGuidance, text_to_image_batches
    from mind_diffusion.sampling.schedulers import create_scheduler
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    from mind_diffusion.torch_pickle import CheckpointFormatError
    from models.autoencoder import LatentDecoder

    if not (args.prompt or "").strip():
        print("error: a latent text-to-image checkpoint needs a prompt, e.g. run_infer.sh \"一只猫\" --ckpt ...",
              file=sys.stderr)
        return 2
    sampler = args.sampler or DEFAULTS["sampler"]
    if sampler not in LATENT_SAMPLERS:
        print(f"error: --sampler {sampler} is not available for latent models; use one of "
              f"{', '.join(LATENT_SAMPLERS)}", file=sys.stderr)
        return 2
    try:
        config, unet, vae, text, tokenizer = load_latent_model(choice.path, args)
    except (ValueError, LDMConfigError, CheckpointFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    factor = 2 ** (len(config["vae"]["ddconfig"]["ch_mult"]) - 1)
    size = args.size or DEFAULTS["size"]
    if size % (factor * 2 ** (len(config["unet"]["channel_mult"]) - 1)):
        print(f"error: --size {size} must be a multiple of {factor * 2 ** (len(config['unet']['channel_mult']) - 1)} "
              f"(the autoencoder's factor {factor} times the UNet's downsampling)", file=sys.stderr)
        return 2
    latent_shape = (config["unet"]["in_channels"], size // factor, size // factor)
    steps = args.steps or DEFAULTS["steps"]
    scale = DEFAULTS["scale"] if args.scale is None else args.scale
    eta = args.eta if sampler in ("ddim", "euler_a") else None
    diffusion = create_ldm_diffusion(**config["schedule"], prediction=config["prediction"])
    try:  # CompVis's timesteps τ = range(0, T, T // K) + 1: not every K fits
        scheduler = create_scheduler(sampler, diffusion, eta=eta, clip_denoised=False).set_timesteps(steps, "ldm")
    except ValueError as err:
        print(f"error: --steps {steps}: {err}", file=sys.stderr)
        return 2
    guided, decoder = ContextGuidance(unet, scale), LatentDecoder(vae)
    batch = min(args.batch, args.n)
    started = time.perf_counter()
    images = text_to_image_batches(unet, text, tokenizer, decoder, scheduler, [args.prompt] * args.n, batch,
                                   latent_shape, seed=args.seed * 1_000_003, guided=guided,
                                   negative_prompts=args.negative)
    elapsed = time.perf_counter() - started
    settings = {"sampler": sampler, "steps": steps, "eta": eta or 0.0, "guidance_scale": scale, "batch_size": batch}
    path = save_grid(to_uint8(images), os.path.join(out_dir, grid_name(args, choice.path, settings)),
                     overwrite=False)
    print(f"{args.n} images of {size}x{size} in {elapsed:.1f} s ({sampler}, {steps} steps, scale {scale:g})")
    print(path)
    return 0
