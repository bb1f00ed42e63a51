"""FID and a labelled grid of a bilingual emoji model (configs/emoji.yaml) trained with run_train.sh.

    bash run_train.sh 1 configs/emoji.yaml train.total_steps=2400
    python bench/emoji_fidelity.py --ckpt runs/emoji/ckpt_00002400.ckpt [--out bench_out/emoji_fidelity]

1. The reference: the recipe's distinct pictures (the data set holds each emoji twice, once per
   caption language; a picture counted twice moves the Inception covariance by a factor
   1 − 1/(2N − 1), nothing that shows in FID), their features cached (``$MIND_DIFFUSION_CACHE/fid``).
2. ``--samples`` (500) samples, their captions drawn from all of the recipe's captions, English and
   Chinese, in a seeded random order (:func:`mind_diffusion.evaluate.sample_captions`), with the
   recipe's sampler and guidance scale on ``--steps`` (50) respaced steps; their FID against the
   reference.
3. The floor of that figure: the FID of the real pictures of the very same captions, a perfect
   model's samples, against the same reference. FID is biased upward for small sets, so the
   samples' FID is read against this one, not against zero.
4. A grid of ``--grid-emoji`` (default: eight everyday emoji), one row each: the real picture, a
   sample from its English name, a sample from its Chinese name; the prompts are in the PNG and in
   the sidecar text file (tiles are labelled in English: Chinese labels need a CJK font).

Writes samples.npz, grid.png (+ .txt) and emoji_fidelity.json into ``--out`` and prints the JSON.
On two CPU cores: the reference features take about 6 minutes (once), 500 samples at DDPM-50 with
guidance about 12 minutes.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

GRID_EMOJI = ("grinning face", "red apple", "dog face", "sun", "rocket", "pizza", "red heart", "cat face")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint of the emoji recipe (runs/emoji/ckpt_<step>.ckpt)")
    parser.add_argument("--out", default="bench_out/emoji_fidelity", help="output folder (must not hold a result)")
    parser.add_argument("--samples", type=int, default=500, help="samples compared with the reference by FID")
    parser.add_argument("--steps", type=int, default=50, help="respaced sampling steps")
    parser.add_argument("--sampler", help="sampler (default: the recipe's)")
    parser.add_argument("--scale", type=float, help="classifier-free guidance scale (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples and the order of their captions")
    parser.add_argument("--grid-emoji", nargs="+", default=list(GRID_EMOJI),
                        help="English names of the emoji in the grid's rows")
    args = parser.parse_args(argv)
    if min(args.samples, args.steps, args.batch_size) < 1:
        parser.error("--samples, --steps and --batch-size must be at least 1")
    return args


def distinct_pictures(reference):
    """The reference with each emoji once: the data set's item 2k is emoji k with its English caption,
    item 2k + 1 the same picture with its Chinese one (mind_diffusion/data/emoji.py)."""
    from mind_diffusion.evaluate import Reference
    images = reference.images
    if len(images) % 2 or not np.array_equal(images[0::2], images[1::2]):
        raise ValueError("the recipe's items are not (English, Chinese) pairs of one picture: is it the emoji recipe?")
    return Reference(np.ascontiguousarray(images[0::2]), reference.captions[0::2], None,
                     reference.name + "-pictures")


def grid_rows(reference, names):
    """(item index of the English caption, English, Chinese) of each emoji named in ``names``."""
    english = {caption: index for index, caption in enumerate(reference.captions[0::2])}
    missing = [name for name in names if name not in english]
    if missing:
        raise ValueError(f"--grid-emoji: not English emoji names of the data set: {', '.join(missing)}")
    return [(2 * english[name], name, reference.captions[2 * english[name] + 1]) for name in names]


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "emoji_fidelity.json")):
        sys.exit(f"error: {out} already holds a result; choose another --out")
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: --ckpt {args.ckpt}: no such file")
    started = time.perf_counter()

    import mindspore as ms
    from mind_diffusion import evaluate as ev
    from mind_diffusion.checkpoints import checkpoint_step, read_checkpoint
    from mind_diffusion.imaging import save_grid, to_uint8

    ms.set_context(mode=ms.GRAPH_MODE)
    config, generator = ev.load_model(args.ckpt)
    if config.data.kind != "emoji":
        sys.exit(f"error: --ckpt {args.ckpt} was trained on data.kind {config.data.kind!r}, not emoji")
    items = ev.load_reference("recipe", config, ev.DEFAULT_MAX_REF)
    rows = grid_rows(items, args.grid_emoji)  # a bad name fails before any sampling
    reference = distinct_pictures(items)
    os.makedirs(out, exist_ok=True)
    settings = {"sampler": args.sampler or config.sample.sampler, "steps": args.steps, "eta": config.sample.eta,
                "guidance_scale": config.sample.guidance_scale if args.scale is None else args.scale}
    result = {"recipe": "configs/emoji.yaml", "checkpoint": os.path.abspath(args.ckpt),
              "steps": checkpoint_step(read_checkpoint(args.ckpt)), "sampling": dict(settings, seed=args.seed),
              "reference": {"items": len(items.images), "pictures": len(reference.images)}}

    samples = ev.draw_samples(generator, args.samples, settings, args.batch_size, args.seed, items,
                              seed_of_set=args.seed)
    np.savez(os.path.join(out, "samples.npz"), images=samples)
    fid = ev.inception_metrics("fid", samples, reference)
    result["fid"] = {k: fid[k] for k in ("fid", "num_samples", "num_ref", "reference_cache", "inception_sha1")}
    # The same captions' real pictures: what a perfect model would score with this many samples.
    captions = ev.sample_captions(items.captions, 0, args.samples, args.seed)
    index = {caption: i for i, caption in enumerate(items.captions)}
    real = items.images[[index[c] for c in captions]]
    result["fid_real_same_captions"] = ev.inception_metrics("fid", real, reference)["fid"]
    result["languages_of_samples"] = {"en": sum(index[c] % 2 == 0 for c in captions),
                                      "zh": sum(index[c] % 2 == 1 for c in captions)}

    prompts = [caption for _, en, zh in rows for caption in (en, zh)]
    drawn = to_uint8(generator.sample(len(prompts), prompts=prompts, batch_size=args.batch_size, seed=args.seed,
                                      progress=True, **settings))  # [N, H, W, C], one per prompt, in order
    real = items.images[[item for item, _, _ in rows]].transpose(0, 2, 3, 1)
    tiles, labels = [], []
    for k, (_, en, _) in enumerate(rows):
        tiles += [real[k], drawn[2 * k], drawn[2 * k + 1]]
        labels += [f"real: {en}", f"{en} (English)", f"{en} (Chinese)"]
    grid = np.stack(tiles)
    result["grid"] = save_grid(grid, os.path.join(out, "grid.png"), columns=3, scale=3, overwrite=False,
                               captions=labels)
    result["grid_prompts"] = [[en, zh] for _, en, zh in rows]
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "emoji_fidelity.json"), "x", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
