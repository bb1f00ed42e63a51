"""Quality per network call: prompt adherence of the demo model for each scheduler at NFE 10, 20, 50.

Every scheduler of ``mind_diffusion.sampling.schedulers`` draws the same prompts
(the demo set's caption templates, from a seed the model was not trained on) from the
same seeds with the recipe's guidance scale; ``mind_diffusion.evaluation.judge``
reads shape and colour, and a sample counts when both match its prompt (chance
1/40 = 2.5%). NFE is the number of network calls per sample (one classifier-free
guided call runs the conditional and unconditional halves as one batch): PLMS
spends one call on its warm-up, so it walks NFE − 1 steps.

    source scripts/env.sh && $PY bench/sampler_quality.py [--ckpt checkpoints/demo.ckpt] [--n 200] [--nfe 10,20,50]
        [--schedulers ddpm,ddim,plms,dpm++2m,dpm++3m,euler_a]
"""
import argparse
import sys
import time

import numpy as np


def template_prompts(count, seed):
    """``count`` prompts from the demo set's caption templates: shape, colour and an allowed background
    drawn at random, languages alternating, templates in turn."""
    from mind_diffusion.data import demo
    rng = np.random.default_rng([seed, 13])
    prompts = []
    for index in range(count):
        lang = ("en", "zh")[index % 2]
        template = (index // 2) % len(demo.TEMPLATES[lang])
        shape = demo.SHAPES[rng.integers(len(demo.SHAPES))].name
        colour = demo.COLORS[rng.integers(len(demo.COLORS))].name
        allowed = demo.ALLOWED_BACKGROUNDS[colour]
        prompts.append(demo.make_caption(shape, colour, allowed[rng.integers(len(allowed))], lang, template))
    return prompts


def steps_for_nfe(scheduler, nfe):
    """Set the scheduler to the most steps whose network calls fit in ``nfe``; returns the steps."""
    steps = nfe
    while steps >= 2:
        scheduler.set_timesteps(steps)
        if scheduler.num_calls <= nfe:
            return steps
        steps -= scheduler.num_calls - nfe
    raise ValueError(f"{scheduler.name} cannot sample with {nfe} network calls")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: as run_infer.sh picks it)")
    parser.add_argument("--n", type=int, default=200, help="samples per scheduler and NFE (default: %(default)s)")
    parser.add_argument("--nfe", default="10,20,50", help="network calls per sample (default: %(default)s)")
    parser.add_argument("--schedulers", default="ddpm,ddim,plms,dpm++2m,dpm++3m,euler_a",
                        help="schedulers to compare (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=None, help="guidance scale (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=50, help="images per sampling batch (default: %(default)s)")
    parser.add_argument("--prompt-seed", type=int, default=12345, help="seed of the prompt list (not a training seed)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA copy")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.checkpoints import checkpoint_config, model_weights, read_checkpoint, restore_state
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.cli.infer import find_checkpoint
    from mind_diffusion.config import config_from_dict
    from mind_diffusion.evaluation.judge import adherence
    from mind_diffusion.imaging import to_uint8
    from mind_diffusion.sampling.guidance import ClassifierFreeGuidance
    from mind_diffusion.sampling.schedulers import create_scheduler, sample

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
    model.set_train(False)
    size = config.model.image_size
    diffusion = build_diffusion(config.diffusion, config.model)
    scale = config.sample.guidance_scale if args.scale is None else args.scale
    guided = model
    if scale not in (0.0, 1.0):
        uncond_tokens, uncond_mask = tokenizer.unconditional(1)
        guided = ClassifierFreeGuidance(model, scale, uncond_tokens, uncond_mask, eps_channels=3)
    prompts = template_prompts(args.n, args.prompt_seed)
    nfes = [int(v) for v in args.nfe.split(",")]
    names = args.schedulers.split(",")

    print(f"checkpoint {path}: {args.n} prompts, guidance scale {scale:g}, judged by "
          f"mind_diffusion.evaluation.judge (shape and colour both right; chance = 2.5%)")
    print("| scheduler | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " | s/image at NFE " + str(nfes[-1]) + " (one compile included) |")
    print("|---|" + "---|" * (len(nfes) + 1))
    for name in names:
        scheduler = create_scheduler(name, diffusion, clip_denoised=config.sample.clip_denoised)
        cells, seconds = [], 0.0
        for nfe in nfes:
            steps = steps_for_nfe(scheduler, nfe)
            started = time.perf_counter()
            images = []
            for start in range(0, args.n, args.batch):
                index = [min(i, args.n - 1) for i in range(start, start + args.batch)]  # pad the last batch
                text = [prompts[i] for i in index] if scale != 0.0 else [""] * len(index)
                tokens, mask = tokenizer(text)
                x = sample(guided, (args.batch, 3, size, size), scheduler, seed=args.seed * 1_000_003 + start,
                           model_kwargs={"tokens": ms.Tensor(tokens), "mask": ms.Tensor(mask)})
                images.append(x.asnumpy()[:min(args.batch, args.n - start)])
            seconds = (time.perf_counter() - started) / args.n
            result = adherence(to_uint8(np.concatenate(images)), prompts)
            cells.append(f"{100 * result['both']:.1f}%" + ("" if steps == nfe else f" ({steps} steps)"))
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
