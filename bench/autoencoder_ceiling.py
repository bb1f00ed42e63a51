"""How much of the demo's shapes and colours survives the latent demo's autoencoder: the ceiling of its
prompt adherence.

A latent model draws latents, and its pictures are their decodings. Whatever the judge
(``mind_diffusion.evaluation.judge``) cannot read in the autoencoder's own reconstructions of demo
images, no latent model of that autoencoder can draw: the reconstructions' shape / colour scores bound
the latent demo's adherence from above (bench/prompt_adherence.py). This bench judges
Dec(μ(x)) of demo images against the attributes that drew them, with L1 per pixel and PSNR, for each
autoencoder checkpoint given, beside the originals (which the judge reads at 100%). It also judges
Dec(μ + σ·n), one posterior draw per image: a latent recipe with ``model.sample_posterior`` (the
default) trains on such draws, so a σ large beside μ lowers the ceiling of what it learns. The RMS of
μ and of σ over all latent elements is printed per checkpoint.

    python bench/autoencoder_ceiling.py                       # the recipe's model.autoencoder_from
    python bench/autoencoder_ceiling.py --ckpt runs/ldm_demo_autoencoder/ckpt_00001000.ckpt \\
        runs/ldm_demo_autoencoder/ckpt_00003000.ckpt --n 512

The images come from demo seed ``--demo-seed`` (default 1): the autoencoder recipe trains on seed 0.
A checkpoint is an ``arch: autoencoder`` run's (its EMA copy) or a latent checkpoint (converted, SD,
Wukong-Huahua), read with the sizes of ``--config``.
"""
import argparse
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "ldm_demo.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=RECIPE,
                        help="a latent or autoencoder recipe: the autoencoder's sizes (default %(default)s)")
    parser.add_argument("--ckpt", nargs="+", default=None,
                        help="autoencoder checkpoints (default: the recipe's model.autoencoder_from)")
    parser.add_argument("--n", type=int, default=256, help="demo images judged (default %(default)s)")
    parser.add_argument("--demo-seed", type=int, default=1, help="demo set seed (default %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="images per encoder batch (default %(default)s)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be >= 1")
    return args


def judged_shares(images, attributes):
    """(shape, colour, both, background) shares of ``images`` (float CHW in [-1, 1]) the judge reads as
    their attributes say."""
    from mind_diffusion.evaluation.judge import judge
    hits = np.zeros(4)
    for image, wanted in zip(images, attributes):
        seen = judge(image)
        shape, colour = seen["shape"] == wanted["shape"], seen["color"] == wanted["color"]
        hits += (shape, colour, shape and colour, seen["background"] == wanted["background"])
    return hits / len(images)


def reconstructions(vae, images, batch, seed=0):
    """(Dec(μ(x)), Dec(μ + σ·n), RMS of μ, RMS of σ) of images [N, 3, H, W] in [-1, 1], float32, in
    batches (the last one padded: one graph); n ~ N(0, I) from NumPy's ``seed``."""
    import mindspore as ms
    rng = np.random.default_rng(seed)
    means, draws, mean_sq, sigma_sq, count = [], [], 0.0, 0.0, 0
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        mean, logvar = vae.posterior(ms.Tensor(padded))
        mu, sigma = mean.asnumpy(), np.exp(0.5 * logvar.asnumpy())
        kept = slice(0, len(chunk))
        mean_sq += np.square(mu[kept]).sum()
        sigma_sq += np.square(sigma[kept]).sum()
        count += mu[kept].size
        z = (mu + sigma * rng.standard_normal(mu.shape)).astype(np.float32)
        means.append(vae.decode(mean).asnumpy()[kept])
        draws.append(vae.decode(ms.Tensor(z)).asnumpy()[kept])
    return np.concatenate(means), np.concatenate(draws), np.sqrt(mean_sq / count), np.sqrt(sigma_sq / count)


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    from mind_diffusion.cli.factory import build_autoencoder, load_part
    from mind_diffusion.config import load_config
    from mind_diffusion.data.demo import DemoSet

    ms.set_context(mode=ms.GRAPH_MODE)
    config = load_config(args.config)
    if config.model.arch not in ("latent", "autoencoder"):
        raise SystemExit(f"--config {args.config}: arch {config.model.arch!r} has no autoencoder; "
                         "give a latent or autoencoder recipe")
    paths = args.ckpt or ([config.model.autoencoder_from] if config.model.autoencoder_from else [])
    if not paths:
        raise SystemExit(f"{args.config} names no model.autoencoder_from: pass --ckpt")
    demo = DemoSet(args.n, config.model.image_size, seed=args.demo_seed)
    items = [demo[index] for index in range(args.n)]
    images = np.stack([image for image, _, _ in items]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    attributes = [attrs for _, _, attrs in items]

    print(f"{args.n} demo images (seed {args.demo_seed}, {config.model.image_size} px), judged by "
          "mind_diffusion.evaluation.judge")
    print("| images | L1 / pixel | PSNR (dB) | shape | colour | both | background | s |")
    print("|---|---|---|---|---|---|---|---|")
    shares = judged_shares(images, attributes)
    print("| originals | 0 | inf | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " | |")
    vae = build_autoencoder(config.model)
    for path in paths:
        load_part(vae, "vae", path, config.model)
        started = time.perf_counter()
        from_mean, from_draw, mean_rms, sigma_rms = reconstructions(vae, images, args.batch)
        for label, decoded in ((f"{path}: Dec(μ)", from_mean), (f"{path}: Dec(μ + σ·n)", from_draw)):
            decoded = np.clip(decoded, -1.0, 1.0)
            l1 = float(np.abs(decoded - images).mean())
            mse = float(np.square((decoded - images) / 2.0).mean())  # on the [0, 1] scale
            shares = judged_shares(decoded, attributes)
            print(f"| {label} | {l1:.4f} | {10 * np.log10(1.0 / mse):.2f} | "
                  + " | ".join(f"{100 * s:.1f}%" for s in shares) + f" | {time.perf_counter() - started:.1f} |")
        print(f"  posterior of {path}: RMS of μ {mean_rms:.3f}, RMS of σ {sigma_rms:.3f}")


if __name__ == "__main__":
    main()
