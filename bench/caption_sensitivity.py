"""Which caption words does a latent text-to-image model use? Forward passes on demo items, no sampling.

For each demo item (seed ``--demo-seed``, default 1: the recipes train on seed 0) the item's latent z_0 is
noised to z_t at several t, with one fixed noise per item, and the UNet is called once per t under captions
built from one core template (``mind_diffusion.data.demo.make_caption``, template chosen per item): the
true caption, the same with the shape word swapped, with the colour word swapped, and the empty caption.
It prints

1. the training loss (the model's own target, ε or v) under each caption, and its change from the true
   caption ± the standard error over items: a word the model uses costs loss when it is swapped;
2. what the judge (``mind_diffusion.evaluation.judge``) reads in Dec(x̂_0), x̂_0 the one-call estimate, under
   the true, the empty and the shape-swapped caption: the shares right, and the share of shape-swapped
   items that draw the new shape. Shapes read right at low t come from z_t itself; at high t only the
   caption can supply them.

    python bench/caption_sensitivity.py --ckpt runs/ldm_demo/ckpt_00001000.ckpt          # raw weights
    python bench/caption_sensitivity.py --ckpt runs/ldm_demo/ckpt_00001000.ckpt --weights ema
    python bench/caption_sensitivity.py --ckpt ldm_demo.ckpt                               # an export

A run's ``ckpt_<step>.ckpt`` is read with the recipe in its folder (``config.yaml``), as raw weights by
default: early in a run the EMA still holds much of the random initial weights. A converted or exported
latent checkpoint (``ldm_<step>.ckpt``, ``cli.export``) is read as ``run_infer.sh`` reads it.
"""
import argparse
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_STEPS = (50, 200, 400, 600, 800)
X0_STEPS = (50, 150, 300, 500, 700)
VARIANTS = ("true", "shape swapped", "colour swapped", "empty")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a latent run's ckpt_<step>.ckpt, or a latent export")
    parser.add_argument("--weights", choices=("raw", "ema"), default=None,
                        help="a run checkpoint's raw weights (the default) or its slowest EMA copy; an export "
                             "holds one set of weights")
    parser.add_argument("--vocab", default=os.path.join(ROOT, "configs", "demo_vocab.txt"),
                        help="the tokenizer's vocabulary, for an export (default %(default)s)")
    parser.add_argument("--n", type=int, default=64, help="demo items, one batch (default %(default)s)")
    parser.add_argument("--demo-seed", type=int, default=1, help="demo set seed (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the noise and the swaps (default %(default)s)")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be >= 2 (standard errors)")
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt}: no such file")
    return args


def caption_variants(attributes, rng):
    """[{variant: caption}] and the swapped-in shape names, one per item: the true caption and its shape- and
    colour-swapped forms from the same core template (item i takes template i mod their count), in the
    item's language; the swapped colour differs from the shape's and the background's."""
    from mind_diffusion.data import demo
    out, new_shapes = [], []
    for index, item in enumerate(attributes):
        lang = item["lang"]
        template = index % len(demo.TEMPLATES[lang])
        shape = rng.choice([s.name for s in demo.SHAPES if s.name != item["shape"]])
        colour = rng.choice([c.name for c in demo.COLORS if c.name not in (item["color"], item["background"])])

        def caption(shape_name, colour_name):
            return demo.make_caption(shape_name, colour_name, item["background"], lang, template)

        out.append({"true": caption(item["shape"], item["color"]), "shape swapped": caption(shape, item["color"]),
                    "colour swapped": caption(item["shape"], colour), "empty": ""})
        new_shapes.append(str(shape))
    return out, new_shapes


def load(args):
    """(unet, vae, text encoder, tokenizer, diffusion, image side, label) of ``--ckpt``."""
    from mind_diffusion.cli.latent import is_latent_checkpoint, load_latent_model
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    if is_latent_checkpoint(args.ckpt):
        if args.weights is not None:
            raise SystemExit(f"--weights: {args.ckpt} is an export, which holds one set of weights; "
                             "pass a run's ckpt_<step>.ckpt to choose raw or EMA weights")
        options = argparse.Namespace(num_heads=None, num_head_channels=None, text_heads=None, merges=None,
                                     prediction=None, vocab=args.vocab)
        config, unet, vae, text, tokenizer = load_latent_model(args.ckpt, options)
        diffusion = create_ldm_diffusion(**config["schedule"], prediction=config["prediction"])
        side = config["vae"]["ddconfig"]["resolution"]
        return unet, vae, text, tokenizer, diffusion, side, f"export {args.ckpt}"
    from mind_diffusion.checkpoints import model_weights, read_checkpoint
    from mind_diffusion.cli.factory import build_diffusion, build_latent
    from mind_diffusion.config import load_config
    from mind_diffusion.convert import load_into
    recipe = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "config.yaml")
    if not os.path.isfile(recipe):
        raise SystemExit(f"--ckpt {args.ckpt}: not a latent export, and its folder has no config.yaml of the run")
    config = load_config(recipe)
    if config.model.arch != "latent":
        raise SystemExit(f"--ckpt {args.ckpt}: its run is arch {config.model.arch!r}, not a latent model")
    model, tokenizer = build_latent(config.model)
    weights = model_weights(read_checkpoint(args.ckpt), raw=args.weights != "ema")
    load_into(model, {name: value.asnumpy() for name, value in weights.items()})
    model.set_train(False)
    diffusion = build_diffusion(config.diffusion, config.model)
    return (model.unet, model.vae, model.text_encoder, tokenizer, diffusion, config.model.image_size,
            f"{args.weights or 'raw'} weights of {args.ckpt}")


def one_call(unet, diffusion):
    """A graph of one step's work: ``(z_0, t, ε, context) -> (per-item training loss, x̂_0)``, with
    z_t = q_sample(z_0, t, ε) and x̂_0 from the UNet's output at (z_t, t), unclipped (the process's own
    formulas, ε or v)."""
    from mindspore import nn

    class OneCall(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.unet = unet
            self.diffusion = diffusion

        def construct(self, z_start, t, noise, context):
            z_t = self.diffusion.q_sample(z_start, t, noise)
            output = self.unet(z_t, self.diffusion.model_timesteps(t), context)
            loss, _, _ = self.diffusion.training_losses_from_output(output, z_start, z_t, t, noise)
            return loss, self.diffusion.p_mean_variance_from_output(output, z_t, t, clip_denoised=False)[3]

    return OneCall()


def judged(images, attributes, new_shapes=None):
    """(shape, colour, background) shares the judge reads right in images [N, 3, H, W] in [-1, 1], and the
    share drawing ``new_shapes`` (None without)."""
    from mind_diffusion.evaluation.judge import judge
    seen = [judge(image) for image in np.clip(images, -1.0, 1.0)]
    shares = [np.mean([s[key] == a[key] for s, a in zip(seen, attributes)]) for key in ("shape", "color", "background")]
    follows = None if new_shapes is None else float(np.mean([s["shape"] == n for s, n in zip(seen, new_shapes)]))
    return shares, follows


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    from mind_diffusion.data.demo import DemoSet
    from models.autoencoder import LatentDecoder, LatentEncoder

    ms.set_context(mode=ms.GRAPH_MODE)
    started = time.perf_counter()
    unet, vae, text, tokenizer, diffusion, side, label = load(args)
    if diffusion.num_timesteps <= max(LOSS_STEPS + X0_STEPS):
        raise SystemExit(f"{args.ckpt}: a process of {diffusion.num_timesteps} steps; the tables probe t up to "
                         f"{max(LOSS_STEPS + X0_STEPS)} of latent diffusion's 1000")
    demo = DemoSet(args.n, side, seed=args.demo_seed)
    items = [demo[index] for index in range(args.n)]
    images = np.stack([image for image, _, _ in items]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    attributes = [attrs for _, _, attrs in items]
    rng = np.random.default_rng(args.seed)
    captions, new_shapes = caption_variants(attributes, rng)
    contexts = {}
    for variant in VARIANTS:
        tokens, _ = tokenizer([c[variant] for c in captions])
        contexts[variant] = text(ms.Tensor(np.asarray(tokens, np.int32)))
    z_start = LatentEncoder(vae)(ms.Tensor(images))  # s·μ: the posterior's mode
    noise = ms.Tensor(rng.standard_normal(z_start.shape).astype(np.float32))
    decoder = LatentDecoder(vae)

    probe = one_call(unet, diffusion)

    def call(t, variant):
        """(per-item loss, x̂_0) of one UNet call at step t under a caption variant."""
        loss, x0 = probe(z_start, ms.Tensor(np.full(args.n, t, np.int32)), noise, contexts[variant])
        return loss.asnumpy().astype(np.float64), x0

    print(f"{label}: {args.n} demo items (seed {args.demo_seed}), "
          f"{diffusion.model_mean_type.value} prediction; loading took {time.perf_counter() - started:.1f} s")
    print("\n1. loss per item under each caption; change from the true caption ± standard error")
    print("| t | SNR | true | shape swapped | colour swapped | empty |")
    print("|---|---|---|---|---|---|")
    abar = diffusion.schedule["alphas_cumprod"]
    for t in LOSS_STEPS:
        losses = {variant: call(t, variant)[0] for variant in VARIANTS}
        cells = [f"{losses['true'].mean():.4f}"]
        for variant in VARIANTS[1:]:
            change = losses[variant] - losses["true"]
            cells.append(f"{change.mean():+.4f} ± {change.std(ddof=1) / np.sqrt(args.n):.4f}")
        print(f"| {t} | {abar[t] / (1 - abar[t]):.2f} | " + " | ".join(cells) + " |")

    print("\n2. the judge on Dec(x̂_0) of one call: shape / colour / background right "
          "(shape swapped: and the share drawing the new shape)")
    ceiling, _ = judged(decoder(z_start).asnumpy(), attributes)
    print("clean Dec(z_0): " + " / ".join(f"{100 * s:.1f}%" for s in ceiling))
    print("| t | SNR | true | empty | shape swapped | draws the new shape |")
    print("|---|---|---|---|---|---|")
    for t in X0_STEPS:
        cells, follows = [], None
        for variant in ("true", "empty", "shape swapped"):
            _, x0 = call(t, variant)
            shares, follows = judged(decoder(x0).asnumpy(), attributes,
                                     new_shapes if variant == "shape swapped" else None)
            cells.append(" / ".join(f"{100 * s:.1f}%" for s in shares))
        print(f"| {t} | {abar[t] / (1 - abar[t]):.2f} | " + " | ".join(cells) + f" | {100 * follows:.1f}% |")
    print(f"\ntook {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
