"""Does the demo model draw what the prompt asks? Shape and colour judged on samples, per guidance scale.

Prompts are drawn like the demo set's captions (Chinese and English, every
template) but from a seed the model was not trained on; each sample is read by
``mind_diffusion.evaluation.judge`` and counted right when both its shape and
its colour match the prompt. Chance is 1/40 = 2.5%.

    python bench/prompt_adherence.py [--ckpt checkpoints/demo.ckpt] [--n 200] [--scales 0,1,3,5]
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def demo_prompts(count, seed, image_size):
    """``count`` prompts in the demo set's own distribution of shapes, colours, backgrounds and templates."""
    from mind_diffusion.data import demo
    prompts = []
    for index in range(count):
        a = demo.sample_attributes(seed, index, image_size)
        prompts.append(demo.make_caption(a["shape"], a["color"], a["background"], a["lang"], a["template"]))
    return prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: as run_infer.sh picks it)")
    parser.add_argument("--n", type=int, default=200, help="samples per guidance scale (default: %(default)s)")
    parser.add_argument("--scales", default="0,1,3,5", help="guidance scales (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="default: the recipe's")
    parser.add_argument("--batch", type=int, default=50, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--prompt-seed", type=int, default=12345, help="seed of the prompt list (not a training seed)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA copy")
    parser.add_argument("--grids", default=None, help="folder to write one PNG grid per scale")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.cli.infer import find_checkpoint
    from mind_diffusion.config import config_from_dict
    from mind_diffusion.evaluation.judge import adherence
    from mind_diffusion.generate import ImageGenerator
    from mind_diffusion.imaging import save_grid, to_uint8
    from mind_diffusion.train.checkpoint import checkpoint_config, model_weights, read_checkpoint, restore_state

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    path = find_checkpoint(args.ckpt)
    checkpoint = read_checkpoint(path)
    config = config_from_dict(checkpoint_config(checkpoint))
    model, tokenizer = build_model(config.model)
    if tokenizer is None:
        sys.exit(f"{path} is not a text-to-image checkpoint")
    weights = model_weights(checkpoint, raw=args.raw)
    restore_state(dict(model.parameters_and_names()), {k: ms.Tensor(v.asnumpy()) for k, v in weights.items()}, path)
    size = config.model.image_size
    generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model), (3, size, size), tokenizer)
    prompts = demo_prompts(args.n, args.prompt_seed, size)
    chinese = np.array([any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in prompts])
    sampler, steps = args.sampler or config.sample.sampler, args.steps or config.sample.steps

    print(f"checkpoint {path}: {args.n} prompts per scale ({chinese.sum()} Chinese, {(~chinese).sum()} English), "
          f"{sampler}-{steps}, judged by mind_diffusion.evaluation.judge; chance = 2.5%")
    print("| scale | shape | colour | both | both (en) | both (zh) | s/image |")
    print("|---|---|---|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        started = time.perf_counter()
        images = generator.sample(args.n, prompts=prompts, sampler=sampler, steps=steps,
                                  eta=config.sample.eta, guidance_scale=scale, batch_size=args.batch,
                                  seed=args.seed, clip_denoised=config.sample.clip_denoised)
        seconds = (time.perf_counter() - started) / args.n
        result = adherence(to_uint8(images), prompts)
        both = np.array([s["both_ok"] for s in result["samples"]])
        print(f"| {scale:g} | {100 * result['shape']:.1f}% | {100 * result['color']:.1f}% | "
              f"{100 * result['both']:.1f}% | {100 * both[~chinese].mean():.1f}% | "
              f"{100 * both[chinese].mean():.1f}% | {seconds:.3f} |", flush=True)
        if args.grids:
            save_grid(to_uint8(images[:64]), os.path.join(args.grids, f"adherence_s{scale:g}.png"), columns=8,
                      scale=max(1, 64 // size))


if __name__ == "__main__":
    main()
