"""Encode a latent recipe's training images once with its frozen autoencoder (:mod:`mind_diffusion.data.latents`).

    python -m mind_diffusion.cli.encode_latents configs/ldm_demo.yaml runs/ldm_demo_latents
    bash run_train.sh 1 configs/ldm_demo.yaml data.kind=latents data.path=runs/ldm_demo_latents
"""
import argparse
import os
import sys

from mind_diffusion.data import latents


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mind_diffusion.cli.encode_latents",
        description="Encode a latent recipe's training images once with its frozen autoencoder (model.autoencoder_from), "
                    "so that its runs read the posterior instead of running the encoder in every step: train with "
                    "--set data.kind=latents --set data.path=OUT_DIR.")
    parser.add_argument("config", help="the arch: latent recipe (YAML) whose data and autoencoder to use")
    parser.add_argument("out_dir", help="the folder to create (refused if it exists, unless --overwrite)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as for training (e.g. data.demo_size=2000)")
    parser.add_argument("--batch", type=int, default=64, help="images per encoder call (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR once the new set is complete")
    parser.add_argument("--device", default=None, help="Ascend, GPU or CPU (default: the best available)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch < 1:
        build_parser().error(f"--batch must be at least 1, not {args.batch}")
    from mind_diffusion.config import ConfigError, load_config
    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.model.arch != "latent":
        print(f"error: {args.config} is an arch {config.model.arch!r} recipe; latents are encoded for "
              "arch 'latent' recipes (model.autoencoder_from names their autoencoder)", file=sys.stderr)
        return 2
    if not config.model.autoencoder_from:
        print("warning: model.autoencoder_from is empty: the latents are those of a random autoencoder",
              file=sys.stderr)
    import mindspore as ms
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.device import pick_device
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(pick_device(args.device))
    model, _ = build_model(config.model)
    try:
        meta = latents.encode(config, args.out_dir, model.vae, args.batch, args.overwrite)
    except (FileExistsError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{meta['count']} latents {tuple(meta['latent_shape'])}"
          f"{' (and mirrored)' if meta['flipped'] else ''} written to {os.path.abspath(args.out_dir)}; "
          f"{meta['skipped']} unreadable image(s) skipped. Train with --set data.kind=latents "
          f"--set data.path={args.out_dir}")
    print(f"RMS of the latents z = μ + σ·n: {meta['z_rms']:.4f}; for unit-variance latents set "
          f"model.scale_factor: {1.0 / meta['z_rms']:.5g} (this recipe has {config.model.scale_factor:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
