"""Train a diffusion model from a recipe: ``python -m mind_diffusion.cli.train --config configs/demo.yaml``.

Usually started through ``run_train.sh``, which sets up the environment and,
for several workers, ``msrun``. Under msrun every worker runs this same
program; it joins the data-parallel group, trains on its own shard, and only
rank 0 writes checkpoints, logs and sample grids.
"""
import argparse
import logging
import os
import sys

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="run_train.sh",
        description="Train a diffusion model (DDPM / improved DDPM / ADM / GLIDE-style), or ADM's noisy "
                    "classifier for classifier guidance, from a YAML recipe.",
        epilog="Examples:\n"
               "  bash run_train.sh                                  # demo recipe, short default run\n"
               "  bash run_train.sh 1 configs/tiny.yaml --set train.total_steps=10\n"
               "  bash run_train.sh 8 configs/glide_base64.yaml --set data.path=/data/wukong.jsonl\n"
               "  bash run_train.sh 1 configs/demo_classifier.yaml     # a noisy classifier for --classifier\n"
               "Every key of the recipe can be overridden with --set section.key=value.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML recipe (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run: from PATH, or (no PATH) from the newest checkpoint in its folder")
    parser.add_argument("--run-dir", default=None,
                        help="folder for this run (default: <train.out_dir>/<name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder that holds an earlier run, deleting its checkpoints, "
                             "metrics and samples (without it such a folder is refused; use --resume to continue)")
    parser.add_argument("--device", default=None, choices=["CPU", "Ascend", "GPU"],
                        help="backend (default: Ascend when available, else CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def setup_distributed():
    """Join the msrun worker group when there is one; returns (rank, world_size)."""
    # msrun sets MS_WORKER_NUM; a rank-table start (docs/ASCEND.md) sets RANK_SIZE instead
    world = int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)
    if world <= 1:
        return 0, 1
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


def main(argv=None):
    args = parse_args(argv)
    from mind_diffusion.config import ConfigError, load_config
    from mind_diffusion.paths import input_path, output_path
    try:
        config = load_config(input_path(args.config), args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import mindspore as ms
    from mind_diffusion.device import jit_level_for, pick_device
    target = pick_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE, jit_config={"jit_level": jit_level_for(config, target)})
    # msrun assigns device ids itself; a process started from a rank table is told its DEVICE_ID
    if os.environ.get("RANK_TABLE_FILE"):
        ms.set_device(target, int(os.environ["DEVICE_ID"]))
    else:
        ms.set_device(target)
    rank, world_size = setup_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    ms.set_seed(config.seed)  # parameter initialisation: identical on every rank

    from mind_diffusion.cli.factory import build_diffusion, build_discriminator, build_model
    from mind_diffusion.train.trainer import RunFolderInUse, Trainer, TrainingDiverged, log_model_summary

    try:
        model, tokenizer = build_model(config.model)
    except (ValueError, FileNotFoundError) as err:  # a latent recipe's vocabulary or frozen weights
        print(f"error: {err}", file=sys.stderr)
        return 2
    diffusion = build_diffusion(config.diffusion, config.model)
    log_model_summary(model)
    run_dir = output_path(args.run_dir or os.path.join(config.train.out_dir, config.name))
    resume = args.resume if args.resume in (None, "auto") else input_path(args.resume)

    # periodic grids for every generative model but the autoencoder (its reconstructions are not samples)
    sample_fn = None
    if config.model.arch == "latent":
        sample_fn = latent_sample_grid_fn(config, tokenizer, run_dir)
    elif config.model.arch not in ("classifier", "autoencoder"):
        sample_fn = sample_grid_fn(config, tokenizer, run_dir)
    trainer = Trainer(config, model, diffusion, run_dir, tokenizer=tokenizer, sample_fn=sample_fn,
                      rank=rank, world_size=world_size, discriminator=build_discriminator(config))
    try:
        final = trainer.fit(resume=resume, progress=not args.no_progress, overwrite=args.overwrite)
    except (TrainingDiverged, RunFolderInUse, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"checkpoint: {final}")
        if config.model.arch == "latent" and final:  # ckpt_<step>.ckpt has its sampling export ldm_<step>.ckpt
            export = os.path.join(os.path.dirname(final), "ldm_" + os.path.basename(final)[len("ckpt_"):])
            print(f"for sampling: bash run_infer.sh PROMPT --ckpt {export} --vocab {config.model.vocab}")
        samples = os.path.join(run_dir, "samples")  # grids, and their caption sidecars (.txt)
        grids = sorted(name for name in os.listdir(samples) if name.endswith(".png")) if os.path.isdir(samples) else []
        if grids:
            print(f"samples: {os.path.join(run_dir, 'samples', grids[-1])}")
    return 0


def sample_grid_fn(config, tokenizer, run_dir):
    """The trainer's ``sample_fn``: a grid of the EMA model's samples under ``run_dir/samples/``.

    It samples with its own copy of the network, loaded with the EMA weights each time, from
    the base process (respaced to ``sample.steps``, whatever ``diffusion.timestep_respacing`` trains on).
    """
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.generate import ImageGenerator
    from mind_diffusion.imaging import save_grid, to_uint8

    sampling_model, _ = build_model(config.model)
    image_shape = (config.model.in_channels, config.model.image_size, config.model.image_size)
    generator = ImageGenerator(sampling_model, build_diffusion(config.diffusion, config.model, respaced=False),
                               image_shape, tokenizer,
                               config.model.num_classes if config.model.class_cond else 0,
                               low_res_size=config.model.low_res_size)
    prompts, labels, low_res = default_conditions(config)

    def sample_grid(ema_state, step, write):
        # Every rank samples (the same grid), so none waits in a collective while rank 0 does; one writes.
        own = dict(sampling_model.parameters_and_names())
        for name, param in ema_state.items():
            own[name].set_data(param.value())
        s = config.sample
        images = generator.sample(s.num_samples, prompts=prompts, labels=labels, sampler=s.sampler,
                                  steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale,
                                  batch_size=min(s.batch_size, s.num_samples), seed=config.seed,
                                  clip_denoised=s.clip_denoised, low_res=low_res)
        if not write:
            return None
        captions = prompts or ([f"class {label}" for label in labels] if labels else None)
        return save_grid(to_uint8(images), os.path.join(run_dir, "samples", f"step_{step:08d}.png"),
                         scale=max(1, 128 // config.model.image_size), captions=captions)

    return sample_grid


def latent_sample_grid_fn(config, tokenizer, run_dir):
    """The trainer's ``sample_fn`` for ``arch: latent``: the EMA UNet's text-to-image grid (the recipe's
    sampler on CompVis's steps, classifier-free guidance against the empty prompt, the frozen decoder),
    drawn as ``run_infer.sh`` draws from the run's ``ldm_<step>.ckpt``, under ``run_dir/samples/``."""
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.config import autoencoder_factor
    from mind_diffusion.imaging import save_grid, to_uint8
    from mind_diffusion.sampling.latent import ContextGuidance, text_to_image_batches
    from mind_diffusion.sampling.schedulers import create_scheduler
    from mind_diffusion.train.latent import latent_diffusion
    from models.autoencoder import LatentDecoder

    sampling_model, _ = build_model(config.model)  # its own copy: the train step's weights stay untouched
    s, m = config.sample, config.model
    side = m.image_size // autoencoder_factor(m)
    scheduler = create_scheduler(s.sampler, latent_diffusion(config.diffusion),
                                 eta=s.eta if s.sampler in ("ddim", "euler_a") else None,
                                 clip_denoised=False).set_timesteps(s.steps, "ldm")
    guided = ContextGuidance(sampling_model.unet, s.guidance_scale)
    decoder = LatentDecoder(sampling_model.vae)
    prompts, _, _ = default_conditions(config)

    def sample_grid(ema_state, step, write):
        own = dict(sampling_model.parameters_and_names())
        for name, param in ema_state.items():
            own[name].set_data(param.value())
        images = text_to_image_batches(sampling_model.unet, sampling_model.text_encoder, tokenizer, decoder,
                                       scheduler, prompts, s.batch_size, (m.latent_channels, side, side),
                                       seed=config.seed, guided=guided)
        if not write:
            return None
        return save_grid(to_uint8(images), os.path.join(run_dir, "samples", f"step_{step:08d}.png"),
                         scale=max(1, 128 // m.image_size), captions=prompts)

    return sample_grid


def default_conditions(config):
    """(prompts, labels, low_res) for the periodic sample grids: the demo vocabulary in both
    languages; an upsampler enlarges the first training images, with their captions."""
    if config.model.arch == "glide_upsample":
        from mind_diffusion.data import preview_items
        from mind_diffusion.data.transforms import box_downsample
        images, texts, _ = preview_items(config.data, config.sample.num_samples, config.model.in_channels)
        return [text or "" for text in texts], None, box_downsample(images, config.model.low_res_size)
    if config.model.arch in ("glide", "latent"):
        from mind_diffusion.data import demo
        rng = np.random.default_rng(config.seed)
        prompts = []
        for i in range(config.sample.num_samples):
            shape = demo.SHAPES[i % len(demo.SHAPES)].name
            color = demo.COLORS[rng.integers(len(demo.COLORS))].name
            prompts.append(demo.make_caption(shape, color, lang="zh" if i % 2 else "en"))
        return prompts, None, None
    if config.model.class_cond:
        return None, list(range(config.sample.num_samples)), None
    return None, None, None


if __name__ == "__main__":
    sys.exit(main())
