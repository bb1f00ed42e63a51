"""Sample images from a checkpoint: ``python -m mind_diffusion.cli.infer "a red circle" --n 16``.

Usually started through ``run_infer.sh``. Text-to-image checkpoints take a
prompt (Chinese or English); class-conditional ones take ``--label``;
unconditional ones take neither. Writes one PNG grid and prints its path last.

Paths follow :mod:`mind_diffusion.paths`: relative ones are the user's
current directory (``--out``, ``--ckpt``, ``--low-res``, and the ``runs/``
folder searched for checkpoints); ``checkpoints/…`` also finds the shipped files.

Which checkpoint without ``--ckpt`` (:func:`choose_checkpoint`): the shipped
demo model, unless a training run under ``./runs/`` has a checkpoint trained for
at least as many steps as it; then the most recently written such checkpoint.
A short run (``bash run_train.sh`` with no arguments trains 200 steps) therefore
never displaces the finished model, and the console says which checkpoint was
used and why.

Grids are named ``<prompt>_s<scale>_<sampler><steps>_seed<seed>_<hash>.png``,
the hash covering everything that shapes the picture (the full prompt, the
checkpoint, every sampling setting), and an existing file is never replaced.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections import namedtuple

from mind_diffusion.generate import MIN_SAMPLING_STEPS, SAMPLER_NAMES
from mind_diffusion.paths import PROJECT_ROOT, input_path, output_path

SHIPPED_CHECKPOINT = os.path.join(PROJECT_ROOT, "checkpoints", "demo.ckpt")
RUNS_DIR = "runs"  # train.out_dir's default, under the user's current directory
# Recipes whose checkpoints are parts of another model, never sampled: what each one is.
NOT_SAMPLED = {"autoencoder": ("a latent recipe's first-stage autoencoder",
                               "sample the latent model trained on it, e.g. runs/ldm_demo/ldm_<step>.ckpt")}
ECHO_LIMIT = 80  # characters of a user's text repeated in a message

CheckpointChoice = namedtuple("CheckpointChoice", "path reason")


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

def _bounded(kind, low, high=None):
    """An argparse ``type`` that parses ``kind`` and refuses values outside [low, high] with a clear message."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (high is not None and value > high):
            bound = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _device_target(text):
    from mind_diffusion.device import canonical_target
    try:
        return canonical_target(text, "--device")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(defaults=None):
    """The command line; ``defaults`` (from :func:`checkpoint_defaults`) puts a checkpoint's real defaults in --help."""
    def default(key, fallback):
        return fallback if defaults is None else str(defaults[key])

    description = "Sample a PNG grid from a trained diffusion model."
    if defaults is not None:
        description += (f"\n\nThe checkpoint used now: {defaults['source']} ({defaults['reason']}).\n"
                        "The defaults below are its recipe's sample settings.")
    parser = argparse.ArgumentParser(
        prog="run_infer.sh",
        description=description,
        epilog="Without --ckpt: the shipped demo model (checkpoints/demo.ckpt), unless a run under ./runs/ "
               "has a checkpoint trained for at least as many steps; then the newest such checkpoint. "
               "The console says which and why.\n"
               "Relative paths are relative to the current directory; checkpoints/… and configs/… "
               "also find the project's shipped files.\n"
               "Grids are never overwritten: each name carries a hash of the prompt, checkpoint and "
               "settings, and a taken name gets -2, -3, ….\n\n"
               "Examples:\n"
               "  bash run_infer.sh \"蓝色背景上的红色圆形\"\n"
               "  bash run_infer.sh \"a yellow star\" --scale 5 --n 16 --seed 3\n"
               "  bash run_infer.sh --ckpt runs/adm/ckpt_00100000.ckpt --label 7\n"
               "  bash run_infer.sh --ckpt adm64.ckpt --config configs/adm_imagenet64.yaml --label 207 \\\n"
               "      --classifier clf64.ckpt --classifier-config configs/adm_classifier64.yaml --classifier-scale 1\n"
               "  bash run_infer.sh --classifier checkpoints/demo_classifier.ckpt --label 3 --scale 0   "
               "# demo model, unconditional, guided to label 3 (a green circle)\n"
               "  bash run_infer.sh \"a red circle\" --ckpt runs/demo_quick    # a run folder: its newest checkpoint\n"
               "  bash run_infer.sh \"一只猫\" --ckpt wukong-huahua-ms.ckpt --vocab vocab_zh.txt --size 512\n"
               "  bash run_infer.sh \"a photo of a cat\" --ckpt v1-5-pruned-emaonly.safetensors "
               "--vocab bpe_simple_vocab_16e6.txt.gz --negative \"blurry\"\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default=None, help="caption for text-to-image models")
    parser.add_argument("--label", type=_bounded(int, 0), action="append", default=None,
                        help="class label for class-conditional models (repeatable)")
    parser.add_argument("--classifier", default=None, metavar="CKPT",
                        help="noisy classifier checkpoint for classifier guidance (ADM): steers sampling "
                             "toward --label; trained with an arch: classifier recipe, e.g. "
                             "configs/demo_classifier.yaml, on the same diffusion process as the model")
    parser.add_argument("--classifier-scale", type=_bounded(float, 0.0), default=1.0,
                        help="classifier guidance scale s in mean + s·Σ·∇log p(y|x_t) (default: %(default)s)")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="recipe describing a --ckpt that carries none (a network converted with "
                             "mind_diffusion.convert), e.g. configs/adm_imagenet64.yaml")
    parser.add_argument("--classifier-config", default=None, metavar="YAML",
                        help="recipe describing a --classifier that carries none (a converted "
                             "guided-diffusion classifier), e.g. configs/adm_classifier64.yaml")
    latent = parser.add_argument_group(
        "latent diffusion checkpoints (Stable Diffusion 1.x/2.x .ckpt/.safetensors, Wukong-Huahua, converted)",
        "defaults there: plms, 50 steps, scale 7.5, 512 px; the configuration is read off the checkpoint")
    latent.add_argument("--vocab", default=None, metavar="PATH",
                        help="the tokenizer's vocabulary: vocab_zh.txt (Wukong-Huahua), bpe_simple_vocab_16e6.txt.gz "
                             "or vocab.json (SD), or a folder holding one; never downloaded")
    latent.add_argument("--merges", default=None, metavar="PATH", help="merges.txt for a vocab.json elsewhere")
    latent.add_argument("--negative", default=None, metavar="TEXT",
                        help="negative prompt (replaces the empty prompt of classifier-free guidance)")
    latent.add_argument("--size", type=_bounded(int, 8), default=None, help="image side in pixels (default: 512)")
    latent.add_argument("--num-heads", type=_bounded(int, 1), default=None,
                        help="UNet attention heads (shapes cannot tell; default: SD 1.x/Wukong's 8)")
    latent.add_argument("--num-head-channels", type=_bounded(int, 1), default=None,
                        help="UNet channels per head instead (SD 2.x: 64, its default for 1024-wide contexts)")
    latent.add_argument("--text-heads", type=_bounded(int, 1), default=None,
                        help="text encoder heads (default: width / 64, as CLIP)")
    latent.add_argument("--prediction", choices=("eps", "v"), default="eps",
                        help="what the UNet predicts: eps, or v for SD 2.x's 768-px models (default: %(default)s)")
    parser.add_argument("--low-res", default=None, metavar="IMAGE",
                        help="image to enlarge, for super-resolution (glide_upsample) checkpoints; "
                             "centre-cropped and resized to the model's low-res size")
    parser.add_argument("--scale", type=_bounded(float, 0.0), default=None,
                        help="guidance scale s >= 0 (0 = unconditional, 1 = plain conditional; default: "
                             + default("scale", "the checkpoint's sample.guidance_scale") + ")")
    parser.add_argument("--steps", type=_bounded(int, MIN_SAMPLING_STEPS), default=None,
                        help=f"sampling steps, {MIN_SAMPLING_STEPS}..T (default: " + default("steps", "the checkpoint's sample.steps")
                             + (f"; T = {defaults['T']}" if defaults else "") + ")")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                        help="ddpm (ancestral), ddim (eta), plms (K+1 network calls), dpm++2m / dpm++3m "
                             "(DPM-Solver++ multistep), euler_a (Euler ancestral); default: "
                             + default("sampler", "the checkpoint's sample.sampler"))
    parser.add_argument("--eta", type=_bounded(float, 0.0, 1.0), default=None,
                        help="DDIM η in [0, 1] (default: " + default("eta", "the checkpoint's sample.eta") + ")")
    parser.add_argument("--n", type=_bounded(int, 1), default=16,
                        help="number of images (default: %(default)s)")
    parser.add_argument("--batch", type=_bounded(int, 1), default=16,
                        help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--seed", type=_bounded(int, 0), default=0,
                        help="sampling seed (default: %(default)s)")
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint file, or a run folder for its newest checkpoint (default: see below)")
    parser.add_argument("--ema-rate", type=float, default=None,
                        help="which EMA copy to use (default: the slowest, i.e. largest rate)")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of an EMA copy")
    parser.add_argument("--verbatim", action="store_true",
                        help="give the prompt to the model as written; by default a model trained on the demo set "
                             "reads it in its own caption form (\"draw a red circle please\" → \"a red circle\")")
    parser.add_argument("--out", default="outputs", help="folder for the PNG grid (default: ./%(default)s)")
    parser.add_argument("--device", type=_device_target, default=None,
                        help="CPU, Ascend or GPU (default: Ascend when available, else CPU)")
    parser.add_argument("--device-id", type=_bounded(int, 0), default=None,
                        help="which device of this machine (default: 0); with ASCEND_RT_VISIBLE_DEVICES set, "
                             "a position in that list")
    return parser


def parse_args(argv=None):
    """(parser, args). For --help, the defaults shown are those of the checkpoint that would be used."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = None
    if "-h" in argv or "--help" in argv:
        peek = argparse.ArgumentParser(add_help=False)
        peek.add_argument("--ckpt", default=None)
        known, _ = peek.parse_known_args(argv)
        defaults = checkpoint_defaults(known.ckpt)
    parser = build_parser(defaults)
    return parser, parser.parse_args(argv)


def checkpoint_defaults(explicit=None):
    """The sampling defaults of the checkpoint that would be used, for --help; None when it cannot be read."""
    try:
        choice = choose_checkpoint(explicit)
        _, raw_config = checkpoint_header(choice.path)
        sample, diffusion = raw_config.get("sample", {}), raw_config.get("diffusion", {})
        return {"source": display_path(choice.path), "reason": choice.reason,
                "scale": sample["guidance_scale"], "steps": sample["steps"],
                "sampler": sample["sampler"], "eta": sample["eta"], "T": diffusion["steps"]}
    except Exception:  # noqa: BLE001 - help must always print; it then names the config keys instead
        return None


# ---------------------------------------------------------------------------
# Which checkpoint, and where the grid goes
# ---------------------------------------------------------------------------

def display_path(path):
    """``path`` relative to the current directory when it lies below it, else absolute (for messages)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def checkpoint_header(path):
    """(step, recipe dict) of a training checkpoint, reading only those two entries (fast for any size)."""
    import mindspore as ms
    from mind_diffusion.checkpoints import checkpoint_config, checkpoint_step
    try:
        header = ms.load_checkpoint(path, choice_func=lambda name: name in ("step", "config"))
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for foreign or truncated files
        raise ValueError(f"{display_path(path)!r} is not a readable MindSpore checkpoint "
                         f"({err.__class__.__name__})") from None
    return checkpoint_step(header), checkpoint_config(header)


def run_checkpoints(runs_dir):
    """(step, path) of every training checkpoint under ``runs_dir`` (the step read from its name)."""
    from mind_diffusion.checkpoints import CHECKPOINT_PATTERN
    found = []
    for path in glob.glob(os.path.join(runs_dir, "**", "ckpt_*.ckpt"), recursive=True):
        match = CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), os.path.abspath(path)))
    return found


def choose_checkpoint(explicit=None, runs_dir=RUNS_DIR, shipped=SHIPPED_CHECKPOINT):
    """The checkpoint to sample from and why (:class:`CheckpointChoice`).

    ``--ckpt`` when given (a run folder means its newest checkpoint). Otherwise the
    shipped demo model, unless a run under ``runs_dir`` has a checkpoint with at
    least as many training steps as the shipped model; then the most recently
    written such checkpoint. Without a shipped model, the newest run checkpoint.
    Classifier runs (for ``--classifier``) and autoencoder runs (stage 1 of a latent recipe) are never
    chosen.

    :raises FileNotFoundError: naming what is missing and what to do.
    """
    if explicit:
        path = input_path(explicit)
        if os.path.isdir(path):
            steps = sorted(run_checkpoints(path))
            if not steps:
                raise FileNotFoundError(f"--ckpt {explicit}: the folder holds no ckpt_<step>.ckpt checkpoint")
            return CheckpointChoice(steps[-1][1], f"the newest checkpoint of the run folder {explicit}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--ckpt {explicit}: no such file ({path})")
        return CheckpointChoice(path, "given with --ckpt")

    runs = [item for item in run_checkpoints(runs_dir) if not is_auxiliary_checkpoint(item[1])]
    newest = max(runs, key=lambda item: os.path.getmtime(item[1]), default=None)
    if not os.path.exists(shipped):
        if newest is None:
            raise FileNotFoundError(f"no checkpoint: none under ./{runs_dir}/ and no shipped {display_path(shipped)}; "
                                    "train one with `bash run_train.sh`, or pass --ckpt PATH")
        return CheckpointChoice(newest[1], f"the newest checkpoint under ./{runs_dir}/, {newest[0]} steps; "
                                           "no shipped demo model")
    if newest is None:
        return CheckpointChoice(shipped, f"the shipped demo model; no training checkpoint under ./{runs_dir}/")
    shipped_steps, _ = checkpoint_header(shipped)
    trained = [item for item in runs if item[0] >= shipped_steps]
    if trained:
        steps, path = max(trained, key=lambda item: os.path.getmtime(item[1]))
        return CheckpointChoice(path, f"the newest run checkpoint trained at least as long as the shipped demo "
                                      f"model, {steps} >= {shipped_steps} steps; "
                                      f"--ckpt {display_path(shipped)} samples the shipped one")
    steps, path = newest
    return CheckpointChoice(shipped, f"the shipped demo model, trained {shipped_steps} steps; the newest run "
                                     f"checkpoint {display_path(path)} has only {steps}: "
                                     f"pass --ckpt {display_path(path)} to sample from it")


def checkpoint_arch(path):
    """model.arch of a run's checkpoint (None if unreadable or without a recipe)."""
    try:
        _, recipe = checkpoint_header(path)
    except ValueError:
        return None
    return (recipe or {}).get("model", {}).get("arch")


def is_auxiliary_checkpoint(path):
    """Whether a run's checkpoint serves another model (a noisy classifier, a latent recipe's autoencoder)
    rather than being one to sample from."""
    return checkpoint_arch(path) in ("classifier", *NOT_SAMPLED)


def find_checkpoint(explicit=None):
    """Path of the checkpoint :func:`choose_checkpoint` picks (for the benchmarks)."""
    return choose_checkpoint(explicit).path


def check_output_folder(out):
    """Absolute path of the --out folder, after making sure a file can be created there; ValueError if not.

    Checked before any sampling, so an unwritable folder costs nothing. Nothing is
    created: the probe is a temporary file in the folder, or in its nearest existing
    parent when the folder does not exist yet (it is made when the grid is written).
    """
    folder = output_path(out)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out}: {display_path(existing)} is a file, not a folder")
    probe = os.path.join(existing, f".write_test_{os.getpid()}")
    try:
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write in {display_path(existing)} ({err.strerror}); "
                         "choose another folder with --out DIR") from None
    return folder


def slug(text, limit=40):
    """A file-name-safe beginning of ``text`` (letters, digits and _ of any script), or "samples"."""
    cleaned = re.sub(r"[^\w]+", "_", text or "", flags=re.UNICODE).strip("_")
    return cleaned[:limit] or "samples"


def file_identity(path):
    """What tells one file from another cheaply: its real path, size and modification time."""
    if path is None:
        return None
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def grid_name(args, checkpoint, settings):
    """``<prompt or labels>_s<scale>_<sampler><steps>_seed<seed>_<hash>.png``.

    The readable part is short; the 10-hex-digit hash covers the full prompt, the
    labels, the checkpoint file, the low-res image and every sampling setting, so
    two requests that could give different pictures never share a name.
    """
    if args.prompt is not None:
        subject = slug(args.prompt)
    elif args.label:
        subject = "label_" + "_".join(map(str, args.label[:8]))
    else:
        subject = "samples"
    identity = {"prompt": args.prompt, "labels": args.label, "checkpoint": file_identity(checkpoint),
                "low_res": file_identity(args.low_res), "ema_rate": args.ema_rate, "raw": args.raw,
                "n": args.n, "batch": settings["batch_size"], "seed": args.seed, "sampler": settings["sampler"],
                "steps": settings["steps"], "eta": settings["eta"], "scale": settings["guidance_scale"],
                "classifier": file_identity(getattr(args, "classifier_path", None)),
                "classifier_scale": args.classifier_scale if getattr(args, "classifier", None) else None}
    if getattr(args, "read_as", None) is not None:
        identity["read_as"] = args.read_as  # the demo's caption form: the words the model was given
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return (f"{subject}_s{settings['guidance_scale']:g}_{settings['sampler']}{settings['steps']}"
            f"_seed{args.seed}_{digest[:10]}.png")


def shorten(text, limit=ECHO_LIMIT):
    """``text`` as repeated in a message: whole when short, else its beginning and its length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def main(argv=None):
    parser, args = parse_args(argv)
    try:
        out_dir = check_output_folder(args.out)
        choice = choose_checkpoint(args.ckpt)
        low_res_path = input_path(args.low_res) if args.low_res else None
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.low_res = low_res_path
    print(f"checkpoint: {display_path(choice.path)} ({choice.reason})", flush=True)

    from mind_diffusion.cli import latent
    if latent.is_latent_checkpoint(choice.path):
        try:
            set_device(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return latent.run(args, choice, out_dir, grid_name)

    from mind_diffusion.cli.factory import build_diffusion
    from mind_diffusion.config import ConfigError
    from mind_diffusion.generate import ImageGenerator
    from mind_diffusion.imaging import save_grid, to_uint8

    try:
        set_device(args)
        config, model, tokenizer = load_network(choice.path, args.config, args.ema_rate, args.raw)
        classifier = None
        if args.classifier:
            classifier_path = args.classifier_path = input_path(args.classifier)
            classifier_config, classifier, _ = load_network(classifier_path, args.classifier_config, None, False,
                                                            option="--classifier")
            check_classifier(config, classifier_config)
    except (ValueError, KeyError, ConfigError, FileNotFoundError) as err:
        print(f"error: {str(err).strip(chr(34))}", file=sys.stderr)
        return 2

    settings = sampling_settings(parser, args, config)
    problem = check_request(args, config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    prompt = args.prompt
    if classifier is not None and tokenizer is not None and not (prompt or "").strip():
        prompt, settings["guidance_scale"] = "", 0.0  # classifier guidance of the unconditional model
        print("note: no prompt: the text model samples unconditionally (--scale 0), steered by the classifier")
    elif tokenizer is not None:
        prompt = read_prompt(config, prompt, args.verbatim)
        args.read_as = prompt if prompt != args.prompt else None

    image_shape = (config.model.in_channels, config.model.image_size, config.model.image_size)
    generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model, respaced=False),
                               image_shape, tokenizer,
                               config.model.num_classes if config.model.class_cond else 0,
                               low_res_size=config.model.low_res_size, classifier=classifier)
    low_res = None
    if config.model.low_res_size:
        from mind_diffusion.data import transforms
        try:
            image = transforms.center_crop_arr(transforms.load_rgb(args.low_res), config.model.low_res_size)
        except transforms.UnreadableImage as err:
            print(f"error: --low-res: {err}", file=sys.stderr)
            return 2
        low_res = transforms.to_model_input(image)[None]

    shown = set()
    note = prompt_note(tokenizer, prompt, shown) if tokenizer is not None else None
    if note:
        print(note, file=sys.stderr)
    started = time.perf_counter()
    with short_warnings(shown):
        images = generator.sample(args.n, prompts=[prompt] if tokenizer else None, labels=args.label,
                                  seed=args.seed, clip_denoised=config.sample.clip_denoised, progress=True,
                                  low_res=low_res, classifier_scale=args.classifier_scale if classifier else 0.0,
                                  **settings)
    elapsed = time.perf_counter() - started
    out = save_grid(to_uint8(images), os.path.join(out_dir, grid_name(args, choice.path, settings)),
                    scale=max(1, 128 // config.model.image_size), overwrite=False)
    guided = f", classifier scale {args.classifier_scale:g}" if classifier else ""
    print(f"{args.n} images in {elapsed:.1f} s ({settings['sampler']}, {settings['steps']} steps, "
          f"scale {settings['guidance_scale']:g}{guided})")
    print(out)
    return 0


def read_prompt(config, prompt, verbatim):
    """The text the model is given for ``prompt``: the recipe's caption form
    (:func:`mind_diffusion.cli.factory.prompt_reader`) unless ``verbatim``; says on the console when that
    changes the words, or when the prompt names nothing the model knows."""
    from mind_diffusion.cli.factory import prompt_reader
    from mind_diffusion.prompts import normalise_prompt
    reader = None if verbatim else prompt_reader(config)
    if reader is None:
        return prompt
    form = reader(prompt)
    if form is None:
        print(f"note: {shorten(prompt)!r} names no shape with a colour that the demo model knows "
              "(see README: the demo set); sampling it as written")
        return prompt
    if form != normalise_prompt(prompt):
        print(f"prompt read as {form!r}: the demo model's own caption form (--verbatim gives it the words as written)")
    return form


def set_device(args):
    """GRAPH_MODE on --device (default: Ascend when available, else CPU) and --device-id."""
    import mindspore as ms
    from mind_diffusion.device import device_id, pick_device
    target = pick_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE)
    chosen_id = device_id(args.device_id, target)
    if chosen_id is None:
        ms.set_device(target)  # MindSpore's default device (0)
    else:
        ms.set_device(target, chosen_id)


def load_network(path, recipe=None, ema_rate=None, raw=False, option="--ckpt"):
    """(config, network, tokenizer) of a checkpoint: its own recipe, else the ``recipe`` file given for it.

    A training checkpoint gives its EMA weights (or raw ones); a converted one
    (``python -m mind_diffusion.convert``) holds the network's parameters under their own names.
    :raises ValueError: naming the checkpoint and the option that fixes the problem.
    """
    from mindspore import Tensor
    from mind_diffusion.checkpoints import checkpoint_config, model_weights, read_checkpoint, restore_state
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.config import config_from_dict, load_config

    checkpoint = read_checkpoint(path)
    raw_config = checkpoint_config(checkpoint)
    flag = "--config" if option == "--ckpt" else "--classifier-config"
    if raw_config is not None:
        config = config_from_dict(raw_config)
        weights = model_weights(checkpoint, ema_rate, raw)
    elif recipe:
        config = load_config(input_path(recipe))
        weights = checkpoint
    else:
        raise ValueError(f"{option} {display_path(path)} carries no recipe (a network converted with "
                         f"mind_diffusion.convert?): describe it with {flag} RECIPE.yaml, e.g. "
                         f"{'configs/adm_imagenet64.yaml' if option == '--ckpt' else 'configs/adm_classifier64.yaml'}")
    if config.model.arch in NOT_SAMPLED:
        what, instead = NOT_SAMPLED[config.model.arch]
        raise ValueError(f"{option} {display_path(path)} is not a diffusion model to sample (model.arch "
                         f"{config.model.arch!r}: {what}); {instead}")
    is_classifier = config.model.arch == "classifier"
    if is_classifier != (option == "--classifier"):
        raise ValueError(f"{option} {display_path(path)} is {'a classifier' if is_classifier else 'a diffusion model'}"
                         f" (model.arch {config.model.arch!r}); "
                         f"{'give it with --classifier' if is_classifier else '--classifier takes a noisy classifier'}")
    model, tokenizer = build_model(config.model)
    restore_state(dict(model.parameters_and_names()), {k: Tensor(v.asnumpy()) for k, v in weights.items()}, path)
    return config, model, tokenizer


def check_classifier(config, classifier_config):
    """A ValueError unless the classifier was trained on the model's diffusion process (it must see its x_t)."""
    ours, theirs = config.diffusion, classifier_config.diffusion
    for key in ("steps", "noise_schedule"):
        if getattr(ours, key) != getattr(theirs, key):
            raise ValueError(f"the classifier was trained with diffusion.{key} {getattr(theirs, key)!r}, the model "
                             f"with {getattr(ours, key)!r}: guidance needs a classifier of the model's own process")
    model, clf = config.model, classifier_config.model
    if (model.in_channels, model.image_size) != (clf.in_channels, clf.image_size):
        raise ValueError(f"the classifier reads {clf.in_channels}x{clf.image_size}x{clf.image_size} images, the model "
                         f"draws {model.in_channels}x{model.image_size}x{model.image_size}")


def sampling_settings(parser, args, config):
    """The sampler, steps, η, guidance scale and batch size: the options given, else the checkpoint's recipe.

    Exits through ``parser.error`` (status 2) when --steps exceeds the trained T.
    """
    sample, total = config.sample, config.diffusion.steps
    steps = sample.steps if args.steps is None else args.steps
    if steps > total:
        parser.error(f"argument --steps: {steps} is more than this checkpoint's diffusion.steps; "
                     f"give {MIN_SAMPLING_STEPS}..{total}")
    return {"sampler": args.sampler or sample.sampler, "steps": steps,
            "eta": sample.eta if args.eta is None else args.eta,
            "guidance_scale": sample.guidance_scale if args.scale is None else args.scale,
            "batch_size": min(args.batch, args.n)}


def check_request(args, config):
    """A message when the prompt/label/low-res image do not fit the checkpoint's kind of model, else None."""
    model = config.model
    text_model = model.arch in ("glide", "glide_upsample")
    if model.low_res_size and not args.low_res:
        return (f"this is a super-resolution checkpoint ({model.low_res_size} → {model.image_size} px): "
                "give the image to enlarge with --low-res IMAGE")
    if args.low_res and not model.low_res_size:
        return "--low-res is for super-resolution (glide_upsample) checkpoints; this one generates from scratch"
    if args.classifier:
        if not args.label:
            return "classifier guidance steers toward class labels: give --label N (repeatable)"
        if args.prompt and not text_model:
            kind = "class-conditional (use --label)" if model.class_cond else "unconditional (no prompt)"
            return f"this checkpoint is {kind}; it cannot follow the prompt {shorten(args.prompt)!r}"
        if model.class_cond:
            wrong = [label for label in args.label if label >= model.num_classes]
            if wrong:
                return f"--label {wrong[0]}: this checkpoint has {model.num_classes} classes, 0..{model.num_classes - 1}"
        return None
    if text_model:
        if args.prompt is None or not args.prompt.strip():
            return ("this is a text-to-image checkpoint: give a non-empty prompt, e.g. "
                    "run_infer.sh \"a red circle on a blue background\" or \"蓝色背景上的红色圆形\" "
                    "(for unconditional samples use any prompt with --scale 0)")
        if args.label:
            return "--label is for class-conditional checkpoints (or with --classifier); this one takes a text prompt"
        return None
    if args.prompt:
        kind = "class-conditional (use --label)" if model.class_cond else "unconditional (no prompt)"
        return f"this checkpoint is {kind}; it cannot follow the prompt {shorten(args.prompt)!r}"
    if model.class_cond:
        if not args.label:
            return f"this is a class-conditional checkpoint ({model.num_classes} classes): give --label N"
        wrong = [label for label in args.label if label >= model.num_classes]
        if wrong:
            return f"--label {wrong[0]}: this checkpoint has {model.num_classes} classes, 0..{model.num_classes - 1}"
    elif args.label:
        return "--label is for class-conditional checkpoints (or with --classifier); this one is unconditional"
    return None


@contextlib.contextmanager
def short_warnings(seen):
    """Show each warning raised inside the block once per run (``seen`` holds those shown), cut to a readable length.

    Without this, a 20,000-character prompt is echoed whole by the tokenizer's
    "prompt too long" warning, once per batch.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = str(warning.message)
        if text not in seen:
            seen.add(text)
            print(f"warning: {shorten(text, 300)}", file=sys.stderr)


def prompt_note(tokenizer, prompt, seen):
    """A short note when the model reads only part of ``prompt`` (its text context is full), else None.

    The tokenizer's own warnings about it are added to ``seen``, so that sampling does not repeat them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, _ = tokenizer([prompt])
    if not caught:
        return None
    seen.update(str(warning.message) for warning in caught)
    kept = tokenizer.decode(tokens[0])
    return (f"note: the prompt is {len(prompt)} characters, more than this model's text context "
            f"(text_ctx={tokenizer.text_ctx} tokens) holds; it reads only {shorten(kept)!r}")


if __name__ == "__main__":
    sys.exit(main())
