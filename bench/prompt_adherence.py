"""Does the demo model draw what the prompt asks? Shape, colour and background judged on samples,
per prompt set and guidance scale.

Prompt sets, each drawn from a seed the model was not trained on:

- ``templates``: the ten caption templates of the first demo model
  (``demo.TEMPLATES``, Chinese and English), every one of them in training;
- ``heldout``: wordings never used in training (mind_diffusion/evaluation/heldout.py),
  16 per language, with the demo vocabulary's synonyms;
- ``backgrounds`` (on request, ``--sets backgrounds``): every prompt names a background, in the
  templates of ``demo.TEMPLATES`` that name one, colours and their allowed backgrounds in turn;
- ``wordings``, with ``--wordings FILE``: your own, one a line with the slots ``{a}``, ``{color}``,
  ``{shape}`` and ``{background}`` (e.g. ``paint {a} {shape} in {color}``, ``请给我一个{color}的{shape}``).

Each sample is read by ``mind_diffusion.evaluation.judge``: "both" counts shape
and colour right (chance 1/40 = 2.5%); "background" is the share of the
prompts that name a background whose image shows it, and "bg control" the
share that shows instead another background drawn at random from those the
prompt's colour allows (what ignoring the background words scores, about 1/7).
The same sampling seed is used for every set and scale.

A model trained on the demo set reads each prompt as run_infer.sh does, in its own caption form
(``mind_diffusion.cli.factory.prompt_reader``: "draw a red circle please" → "a red circle");
``--verbatim`` gives it the words as written instead, which measures what the network itself
makes of new wordings. Layout (spaces, case, punctuation, full-width forms) is normalised by the
tokenizer; the bench checks that a scrambled-layout copy of every prompt gives
the same tokens, so it cannot change a picture.

    python bench/prompt_adherence.py [--ckpt checkpoints/demo.ckpt] [--n 200] [--scales 0,1,3,5]
                                     [--sets templates,heldout]
    python bench/prompt_adherence.py --wordings my_wordings.txt --scales 3
    python bench/prompt_adherence.py --ckpt runs/ldm_demo/ldm_00008000.ckpt --vocab configs/demo_vocab.txt

A latent checkpoint (a latent run's ``ldm_<step>.ckpt``) is sampled as run_infer.sh samples it (default
PLMS-50), in batches of ``--batch``.
"""
import argparse
import os
import time
import warnings

import numpy as np

from demo_bench import load_text2im, template_prompts  # bench/ is on the path when run as a script

SETS = ("templates", "heldout")
EXTRA_SETS = ("backgrounds",)
TEMPLATE_STREAM = 10  # the templates set's random stream (demo_bench.template_prompts)
BACKGROUND_STREAM = 11


def background_prompts(count, seed):
    """``count`` (prompt, wanted) pairs that all name a background: (colour, allowed background) pairs
    in turn, a random shape, languages alternating, the background-naming templates in turn."""
    from mind_diffusion.data import demo
    rng = np.random.default_rng([seed, BACKGROUND_STREAM])
    pairs = [(colour.name, background) for colour in demo.COLORS for background in demo.ALLOWED_BACKGROUNDS[colour.name]]
    named = {lang: [i for i, text in enumerate(demo.TEMPLATES[lang]) if "{background}" in text] for lang in ("en", "zh")}
    prompts = []
    for index in range(count):
        lang = ("en", "zh")[index % 2]
        colour, background = pairs[index % len(pairs)]
        template = named[lang][(index // 2) % len(named[lang])]
        shape = demo.SHAPES[rng.integers(len(demo.SHAPES))].name
        prompts.append((demo.make_caption(shape, colour, background, lang, template),
                        {"shape": shape, "color": colour, "background": background}))
    return prompts


def prompt_set(name, count, seed, wordings=None):
    """(prompts, wanted attributes) of one named set; ``wordings``: the set read by ``--wordings``."""
    from mind_diffusion.evaluation.heldout import held_out_prompts
    if name == "templates":
        pairs = template_prompts(count, seed, TEMPLATE_STREAM)
    elif name == "backgrounds":
        pairs = background_prompts(count, seed)
    else:
        pairs = held_out_prompts(count, seed, wordings if name == "wordings" else None)
    return [p for p, _ in pairs], [w for _, w in pairs]


def scrambled_layout(prompt, rng):
    """The prompt with its layout changed at random: case, spaces, full-width forms, end punctuation."""
    text = "".join(ch.upper() if ch.isascii() and rng.random() < 0.5 else ch for ch in prompt)
    text = text.replace(" ", "  ").replace(",", " ，")
    text = "".join(chr(ord(ch) + 0xFEE0) if "a" <= ch.lower() <= "z" and rng.random() < 0.2 else ch
                   for ch in text)
    return "  " + text + ("!!", "。", " ?", "...")[rng.integers(4)]


def layout_mismatches(tokenizer, prompts, seed):
    """How many prompts tokenise differently from a scrambled-layout copy of themselves."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # unnormalised, a scrambled prompt may be cut to fit: that is a mismatch too
        warnings.simplefilter("ignore", UserWarning)
        plain = tokenizer(prompts)[0]
        scrambled = tokenizer([scrambled_layout(p, rng) for p in prompts])[0]
    return int((plain != scrambled).any(axis=1).sum())


def background_control(wanted, judged, seed):
    """Share of the background-naming prompts whose image shows a different, random allowed background."""
    from mind_diffusion.data import demo
    rng = np.random.default_rng(seed)
    hits = []
    for asked, seen in zip(wanted, judged):
        if asked["background"] is None:
            continue
        others = [b for b in demo.ALLOWED_BACKGROUNDS[asked["color"]] if b != asked["background"]]
        hits.append(seen["background"] == others[rng.integers(len(others))])
    return sum(hits) / len(hits) if hits else None


def latent_drawer(args):
    """(path, image size, draw(prompts, scale) -> images [N, 3, S, S], sampler, steps) of a latent text-to-image
    checkpoint (a latent run's ldm_<step>.ckpt, or a converted one), sampled as run_infer.sh samples it."""
    import mindspore as ms
    from mind_diffusion.cli.latent import DEFAULTS, load_latent_model
    from mind_diffusion.sampling.latent import ContextGuidance, text_to_image_batches
    from mind_diffusion.sampling.schedulers import create_scheduler
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    from models.autoencoder import LatentDecoder

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")

    class Options:  # what load_latent_model reads: the rest comes from the checkpoint
        num_heads = num_head_channels = text_heads = merges = prediction = None
        vocab = args.vocab
    config, unet, vae, text, tokenizer = load_latent_model(args.ckpt, Options)
    factor = 2 ** (len(config["vae"]["ddconfig"]["ch_mult"]) - 1)
    side = config["unet"]["image_size"]
    sampler, steps = args.sampler or DEFAULTS["sampler"], args.steps or DEFAULTS["steps"]
    scheduler = create_scheduler(sampler, create_ldm_diffusion(**config["schedule"], prediction=config["prediction"]),
                                 eta=0.0 if sampler == "ddim" else None, clip_denoised=False).set_timesteps(steps, "ldm")
    decoder, guided = LatentDecoder(vae), {}

    def draw(prompts, scale):
        guide = guided.setdefault(scale, ContextGuidance(unet, scale))  # one compiled graph per scale
        return text_to_image_batches(unet, text, tokenizer, decoder, scheduler, prompts, args.batch,
                                     (config["unet"]["in_channels"], side, side), seed=args.seed * 1_000_003,
                                     guided=guide)

    return args.ckpt, side * factor, draw, sampler, steps


def _percent(value):
    return "–" if value is None else f"{100 * value:.1f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: as run_infer.sh picks it)")
    parser.add_argument("--n", type=int, default=200, help="prompts per set and scale (default: %(default)s)")
    parser.add_argument("--scales", default="0,1,3,5", help="guidance scales (default: %(default)s)")
    parser.add_argument("--sets", default=None, help="prompt sets, of " + ", ".join(SETS + EXTRA_SETS + ("wordings",))
                        + " (default: " + ",".join(SETS) + ", and wordings with --wordings)")
    parser.add_argument("--wordings", default=None, metavar="FILE",
                        help="your own wordings, one a line with {a} {color} {shape} {background} slots: the set "
                             "'wordings'")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "plms", "dpm++2m", "dpm++3m", "euler_a"], default=None,
                        help="default: the recipe's (pixel models take ddpm or ddim; latent ones any, default plms)")
    parser.add_argument("--batch", type=int, default=50, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--prompt-seed", type=int, default=12345, help="seed of the prompt lists (not a training seed)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA copy")
    parser.add_argument("--vocab", default=None,
                        help="a latent checkpoint's tokenizer vocabulary (e.g. configs/demo_vocab.txt)")
    parser.add_argument("--grids", default=None, help="folder to write one PNG grid per set and scale")
    parser.add_argument("--verbatim", action="store_true",
                        help="give the model the prompts as written, not in the demo's caption form (run_infer.sh's "
                             "--verbatim)")
    parser.add_argument("--no-normalise", action="store_true",
                        help="tokenise prompts exactly as written, as models from before text normalisation were")
    args = parser.parse_args()
    known = SETS + EXTRA_SETS + (("wordings",) if args.wordings else ())
    sets = [s.strip() for s in (args.sets or ",".join(known)).split(",") if s.strip()]
    unknown = [s for s in sets if s not in known]
    if unknown or not sets:
        parser.error(f"--sets: unknown {unknown or sets}; choose from {', '.join(known)}"
                     + ("" if args.wordings else " (wordings needs --wordings FILE)"))
    wordings = None
    if args.wordings:
        from mind_diffusion.evaluation.heldout import read_wordings
        try:
            wordings = read_wordings(args.wordings)
        except (OSError, ValueError) as err:
            parser.error(f"--wordings: {err}")
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be at least 1")

    from mind_diffusion.cli.factory import build_diffusion, prompt_reader
    from mind_diffusion.evaluation.judge import adherence
    from mind_diffusion.generate import ImageGenerator
    from mind_diffusion.imaging import save_grid, to_uint8

    from mind_diffusion.cli.latent import is_latent_checkpoint
    if args.ckpt and is_latent_checkpoint(args.ckpt):
        path, size, draw, sampler, steps = latent_drawer(args)
        tokenizer = reader = None
    else:
        path, config, model, tokenizer = load_text2im(args.ckpt, raw=args.raw)
        tokenizer.normalise = not args.no_normalise
        size = config.model.image_size
        generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model), (3, size, size), tokenizer)
        sampler, steps = args.sampler or config.sample.sampler, args.steps or config.sample.steps
        reader = None if args.verbatim else prompt_reader(config)

        def draw(prompts, scale):
            if reader is not None:
                prompts = [reader(prompt) or prompt for prompt in prompts]
            return generator.sample(len(prompts), prompts=prompts, sampler=sampler, steps=steps,
                                    eta=config.sample.eta, guidance_scale=scale, batch_size=args.batch,
                                    seed=args.seed, clip_denoised=config.sample.clip_denoised)

    print(f"checkpoint {path}: {args.n} prompts per set and scale (alternately English and Chinese), "
          f"{sampler}-{steps}, judged by mind_diffusion.evaluation.judge; chance = 2.5% for both; "
          f"prompts {'as written' if args.no_normalise else 'normalised'}, "
          f"{'in the demo caption form' if reader else 'given verbatim'}")
    for name in sets:
        prompts, _ = prompt_set(name, args.n, args.prompt_seed, wordings)
        if reader is not None:
            unread = sum(reader(prompt) is None for prompt in prompts)
            print(f"{name}: {unread} of {len(prompts)} prompts name no shape and colour the reader knows "
                  "(given as written)")
        if tokenizer is not None:
            print(f"{name}: {layout_mismatches(tokenizer, prompts, args.prompt_seed)} of {len(prompts)} prompts "
                  f"tokenise differently once their layout is scrambled")
    print("| set | scale | shape | colour | both | both (en) | both (zh) | background (named) | bg control | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        for name in sets:
            prompts, wanted = prompt_set(name, args.n, args.prompt_seed, wordings)
            chinese = np.array([any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in prompts])
            started = time.perf_counter()
            images = draw(prompts, scale)
            seconds = (time.perf_counter() - started) / args.n
            pictures = to_uint8(images)
            result = adherence(pictures, prompts, wanted)
            both = np.array([s["both_ok"] for s in result["samples"]])
            control = background_control(wanted, [s["judged"] for s in result["samples"]], args.prompt_seed)
            print(f"| {name} | {scale:g} | {_percent(result['shape'])} | {_percent(result['color'])} | "
                  f"{_percent(result['both'])} | {_percent(both[~chinese].mean() if (~chinese).any() else None)} | "
                  f"{_percent(both[chinese].mean() if chinese.any() else None)} | "
                  f"{_percent(result['background'])} ({result['background_named']}) | {_percent(control)} | "
                  f"{seconds:.3f} |", flush=True)
            if args.grids:
                grid = os.path.join(args.grids, f"adherence_{name}_s{scale:g}.png")
                save_grid(pictures[:64], grid, columns=8, scale=max(1, 64 // size), captions=prompts[:64])


if __name__ == "__main__":
    main()
