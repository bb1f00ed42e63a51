"""Quality per network call: prompt adherence of the demo model for each scheduler at NFE 10, 20, 50.

Every scheduler of ``mind_diffusion.sampling.schedulers`` draws the same prompts
(the demo set's caption templates, from a seed the model was not trained on) from the
same seeds with the recipe's guidance scale; ``mind_diffusion.evaluation.judge``
reads shape and colour, and a sample counts when both match its prompt (chance
1/40 = 2.5%). NFE is the number of network calls per sample (one classifier-free
guided call runs the conditional and unconditional halves as one batch): PLMS
spends one call on its warm-up, so it walks NFE − 1 steps.

    source scripts/env.sh && $PY bench/sampler_quality.py [--ckpt checkpoints/demo.ckpt] [--n 200] [--nfe 10,20,50]
        [--schedulers ddpm,ddim,plms,dpm++2m,dpm++3m,euler_a] [--spacing even|ddim]
"""
import argparse
import time

import numpy as np

from demo_bench import load_text2im, template_prompts  # bench/ is on the path when run as a script

TEMPLATE_STREAM = 13  # the prompt list's random stream (demo_bench.template_prompts)


def steps_for_nfe(scheduler, nfe, spacing="even"):
    """Set the scheduler to the most steps whose network calls fit in ``nfe``; returns the steps."""
    steps = nfe
    while steps >= 2:
        scheduler.set_timesteps(steps, spacing)
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
    parser.add_argument("--spacing", default="even", choices=("even", "ddim"),
                        help="where the K steps sit: even over [0, T-1] (improved DDPM, what run_infer uses) or "
                             "DDIM's integer stride, whose first step is T - T/K (default: %(default)s)")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.cli.factory import build_diffusion
    from mind_diffusion.evaluation.judge import adherence
    from mind_diffusion.imaging import to_uint8
    from mind_diffusion.sampling.guidance import ClassifierFreeGuidance
    from mind_diffusion.sampling.schedulers import create_scheduler, sample

    path, config, model, tokenizer = load_text2im(args.ckpt, raw=args.raw)
    size = config.model.image_size
    diffusion = build_diffusion(config.diffusion, config.model)
    scale = config.sample.guidance_scale if args.scale is None else args.scale
    guided = model
    if scale not in (0.0, 1.0):
        uncond_tokens, uncond_mask = tokenizer.unconditional(1)
        guided = ClassifierFreeGuidance(model, scale, uncond_tokens, uncond_mask, eps_channels=3)
    prompts = [prompt for prompt, _ in template_prompts(args.n, args.prompt_seed, TEMPLATE_STREAM)]
    nfes = [int(v) for v in args.nfe.split(",")]
    names = args.schedulers.split(",")

    print(f"checkpoint {path}: {args.n} prompts, guidance scale {scale:g}, {args.spacing} spacing, judged by "
          f"mind_diffusion.evaluation.judge (shape and colour both right; chance = 2.5%)")
    print("| scheduler | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " | s/image at NFE " + str(nfes[-1]) + " (one compile included) |")
    print("|---|" + "---|" * (len(nfes) + 1))
    for name in names:
        scheduler = create_scheduler(name, diffusion, clip_denoised=config.sample.clip_denoised)
        cells, seconds = [], 0.0
        for nfe in nfes:
            steps = steps_for_nfe(scheduler, nfe, args.spacing)
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
