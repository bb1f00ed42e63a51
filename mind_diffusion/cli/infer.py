"""Sample images from a checkpoint: ``python -m mind_diffusion.cli.infer "a red circle" --n 16``.

Usually started through ``run_infer.sh``. Without ``--ckpt`` it takes the
newest checkpoint under ``runs/``, else the demo checkpoint shipped in
``checkpoints/``. Text-to-image checkpoints take a prompt (Chinese or
English); class-conditional ones take ``--label``; unconditional ones take
neither. Writes one PNG grid and prints its path.
"""
import argparse
import glob
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_CHECKPOINT = os.path.join(ROOT, "checkpoints", "demo.ckpt")

if __package__ in (None, ""):  # run as a file (msrun launches files): make the project importable
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="run_infer.sh",
        description="Sample a PNG grid from a trained diffusion model.",
        epilog="Examples:\n"
               "  bash run_infer.sh \"蓝色背景上的红色圆形\"\n"
               "  bash run_infer.sh \"a yellow star\" --scale 5 --n 16 --seed 3\n"
               "  bash run_infer.sh --ckpt runs/adm/ckpt_00100000.ckpt --label 7\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default=None, help="caption for text-to-image models")
    parser.add_argument("--label", type=int, action="append", default=None,
                        help="class label for class-conditional models (repeatable)")
    parser.add_argument("--low-res", default=None, metavar="IMAGE",
                        help="image to enlarge, for super-resolution (glide_upsample) checkpoints; "
                             "centre-cropped and resized to the model's low-res size")
    parser.add_argument("--scale", type=float, default=None,
                        help="classifier-free guidance scale s (0 = unconditional, 1 = plain conditional; "
                             "default: the recipe's sample.guidance_scale)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="default: the recipe's")
    parser.add_argument("--eta", type=float, default=None, help="DDIM η (default: the recipe's)")
    parser.add_argument("--n", type=int, default=16, help="number of images (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: newest under runs/, else the demo one)")
    parser.add_argument("--ema-rate", type=float, default=None, help="which EMA copy to use (default: the slowest, i.e. largest rate)")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of an EMA copy")
    parser.add_argument("--out", default="outputs", help="folder for the PNG grid (default: %(default)s)")
    parser.add_argument("--device", default=None, choices=["CPU", "Ascend", "GPU"])
    return parser.parse_args(argv)


def find_checkpoint(explicit=None):
    """--ckpt, else the newest training checkpoint under runs/, else the shipped demo checkpoint."""
    if explicit:
        return explicit
    found = glob.glob(os.path.join("runs", "**", "ckpt_*.ckpt"), recursive=True)
    found = [p for p in found if re.match(r"^ckpt_\d{8}\.ckpt$", os.path.basename(p))]
    if found:
        return max(found, key=os.path.getmtime)
    if os.path.exists(SHIPPED_CHECKPOINT):
        return SHIPPED_CHECKPOINT
    raise FileNotFoundError("no checkpoint found: train one with `bash run_train.sh`, or pass --ckpt PATH")


def slug(text, limit=40):
    cleaned = re.sub(r"[^\w]+", "_", text or "", flags=re.UNICODE).strip("_")
    return cleaned[:limit] or "samples"


def main(argv=None):
    args = parse_args(argv)
    try:
        path = find_checkpoint(args.ckpt)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import mindspore as ms
    from mindspore import Tensor
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.device import pick_device
    from mind_diffusion.config import ConfigError, config_from_dict
    from mind_diffusion.generate import ImageGenerator
    from mind_diffusion.imaging import save_grid, to_uint8
    from mind_diffusion.train.checkpoint import checkpoint_config, model_weights, read_checkpoint, restore_state

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(pick_device(args.device))
    try:
        checkpoint = read_checkpoint(path)
        raw_config = checkpoint_config(checkpoint)
        if raw_config is None:
            raise ValueError(f"{path!r} carries no recipe; it is not a mind_diffusion training checkpoint "
                             "(convert OpenAI checkpoints with `python -m mind_diffusion.convert`)")
        config = config_from_dict(raw_config)
    except (ValueError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    model, tokenizer = build_model(config.model)
    try:
        weights = model_weights(checkpoint, args.ema_rate, args.raw)
        restore_state(dict(model.parameters_and_names()), {k: Tensor(v.asnumpy()) for k, v in weights.items()}, path)
    except (KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    problem = check_request(args, config, tokenizer)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    sample = config.sample
    scale = sample.guidance_scale if args.scale is None else args.scale
    image_shape = (config.model.in_channels, config.model.image_size, config.model.image_size)
    generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model), image_shape, tokenizer,
                               config.model.num_classes if config.model.class_cond else 0,
                               low_res_size=config.model.low_res_size)
    low_res = None
    if config.model.low_res_size:
        from mind_diffusion.data import transforms
        try:
            image = transforms.center_crop_arr(transforms.load_rgb(args.low_res), config.model.low_res_size)
        except transforms.UnreadableImage as err:
            print(f"error: --low-res: {err}", file=sys.stderr)
            return 2
        low_res = transforms.to_model_input(image)[None]
    started = time.perf_counter()
    images = generator.sample(args.n, prompts=[args.prompt] if tokenizer else None, labels=args.label,
                              sampler=args.sampler or sample.sampler, steps=args.steps or sample.steps,
                              eta=sample.eta if args.eta is None else args.eta, guidance_scale=scale,
                              batch_size=min(args.batch, args.n), seed=args.seed,
                              clip_denoised=sample.clip_denoised, progress=True, low_res=low_res)
    elapsed = time.perf_counter() - started
    name = f"{slug(args.prompt) if args.prompt else 'label_' + '_'.join(map(str, args.label or [])) or 'samples'}"
    out = save_grid(to_uint8(images), os.path.join(args.out, f"{name}_s{scale:g}_seed{args.seed}.png"),
                    scale=max(1, 128 // config.model.image_size))
    print(f"checkpoint: {path}")
    print(f"{args.n} images in {elapsed:.1f} s")
    print(out)
    return 0


def check_request(args, config, tokenizer):
    """A message when the prompt/label/low-res image do not fit the checkpoint's kind of model, else None."""
    if config.model.low_res_size and not args.low_res:
        return (f"this is a super-resolution checkpoint ({config.model.low_res_size} → {config.model.image_size} px): "
                "give the image to enlarge with --low-res IMAGE")
    if args.low_res and not config.model.low_res_size:
        return "--low-res is for super-resolution (glide_upsample) checkpoints; this one generates from scratch"
    if tokenizer is not None:
        if args.prompt is None or not args.prompt.strip():
            return ("this is a text-to-image checkpoint: give a non-empty prompt, e.g. "
                    "run_infer.sh \"a red circle on a blue background\" or \"蓝色背景上的红色圆形\" "
                    "(for unconditional samples use any prompt with --scale 0)")
        if args.label:
            return "--label is for class-conditional checkpoints; this one takes a text prompt"
        return None
    if args.prompt:
        kind = "class-conditional (use --label)" if config.model.class_cond else "unconditional (no prompt)"
        return f"this checkpoint is {kind}; it cannot follow the prompt {args.prompt!r}"
    if config.model.class_cond and not args.label:
        return f"this is a class-conditional checkpoint ({config.model.num_classes} classes): give --label N"
    return None


if __name__ == "__main__":
    sys.exit(main())
