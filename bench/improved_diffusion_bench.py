"""The benches of bench/torch_reference.py run by openai/improved-diffusion's own code.

Same network (the CIFAR-10 UNet: 64 channels, 2 residual blocks, multipliers
1,2,2,2, attention at 16 and 8, 4 heads, scale-shift norm, dropout 0.1, learned
Σ), same process (cosine T = 4000, hybrid loss) and the same work as our
``bench/train_throughput.py``, ``bench/sample_speed.py`` and
``bench/model_speed.py``, built by improved-diffusion's ``create_model_and_diffusion``
and stepped the way its ``TrainLoop`` steps (uniform t, AdamW lr 1e-4 without weight
decay, EMA 0.9999) and its sampling script samples (``p_sample_loop``,
``ddim_sample_loop`` on a respaced process, clipped x̂0). The lines printed have
bench/torch_reference.py's format, so ``bench/compare_pytorch.py`` reads both.

improved-diffusion is not part of this project: pass a checkout of it, fetched by
you, and run with a Python that has torch (never this project's environment)::

    torchenv/bin/python bench/improved_diffusion_bench.py --checkout ~/src/improved-diffusion [--only train]
"""
import argparse
import os
import statistics
import sys
import time

from torch_reference import add_timing_arguments, time_forwards  # bench/ is on the path as a script

WORKS = ("train", "sample", "forward")
FLAGS = dict(image_size=32, num_channels=64, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
             attention_resolutions="16,8", dropout=0.1, learn_sigma=True, sigma_small=False, class_cond=False,
             diffusion_steps=4000, noise_schedule="cosine", use_kl=False, predict_xstart=False,
             rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False, use_scale_shift_norm=True)
EMA_RATE = 0.9999


def import_checkout(checkout):
    """Import the checkout's ``improved_diffusion`` package by its path (the interpreter's search
    path is left alone), so that ``from improved_diffusion.x import y`` finds its modules."""
    import importlib.util
    package = os.path.join(checkout, "improved_diffusion")
    spec = importlib.util.spec_from_file_location("improved_diffusion", os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    if spec is None:
        raise ImportError(f"no improved_diffusion package in {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["improved_diffusion"] = module
    spec.loader.exec_module(module)


def build(respacing=""):
    from improved_diffusion.script_util import create_model_and_diffusion
    return create_model_and_diffusion(**FLAGS, timestep_respacing=respacing)


def train_throughput(torch, batch, steps, warmup):
    from improved_diffusion.nn import update_ema
    from improved_diffusion.resample import UniformSampler
    model, diffusion = build()
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    sampler = UniformSampler(diffusion)
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        t, weights = sampler.sample(batch, "cpu")
        losses = diffusion.training_losses(model, images, t)
        loss = (losses["loss"] * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, params, rate=EMA_RATE)
        loss.item()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[warmup:])
    print(f"train step: batch {batch}, fp32, hybrid loss, AdamW, EMA: median {median:.3f} s "
          f"(min {min(times[warmup:]):.3f}, {steps} steps after {warmup} warm-up) → {batch / median:.2f} images/s")


def sample_speed(torch, batch, steps):
    for name, respacing in (("DDPM", str(steps)), ("DDIM", f"ddim{steps}")):
        model, diffusion = build(respacing)
        model.eval()
        loop = diffusion.p_sample_loop if name == "DDPM" else diffusion.ddim_sample_loop
        with torch.no_grad():
            model(torch.randn(batch, 3, 32, 32), torch.zeros(batch))  # warm-up forward, not timed
            start = time.perf_counter()
            loop(model, (batch, 3, 32, 32), clip_denoised=True)
            elapsed = time.perf_counter() - start
        print(f"{name}-{steps}: batch {batch}: {1000 * elapsed / steps:.0f} ms per step, "
              f"{elapsed / batch:.3f} s/image ({batch / elapsed:.2f} images/s)")


def forward_speed(torch, batch_sizes, repeats):
    model, _ = build()
    model.eval()
    count = sum(p.numel() for p in model.parameters())
    print(f"parameters: {count:,} ({count / 1e6:.2f} M)")
    time_forwards(model, batch_sizes, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, help="a checkout of openai/improved-diffusion (its root folder)")
    add_timing_arguments(parser, WORKS)
    args = parser.parse_args()
    try:
        import_checkout(args.checkout)
    except (ImportError, OSError) as err:
        parser.error(f"--checkout {args.checkout}: cannot import improved_diffusion from there ({err})")
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"improved-diffusion at {args.checkout}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "train"):
        train_throughput(torch, args.batch, args.steps, warmup=2)
    if args.only in (None, "sample"):
        sample_speed(torch, args.batch, args.sample_steps)
    if args.only in (None, "forward"):
        forward_speed(torch, args.batch_sizes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
