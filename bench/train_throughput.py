"""Images/s of the compiled train step on the improved-diffusion CIFAR-10-sized UNet.

The step is the real one (mind_diffusion.train.step.TrainStep): uniform t,
hybrid loss (L_simple + λ L_vlb, learned Σ), AdamW, EMA 0.9999, fp32, batch 16,
on random 3×32×32 inputs. Prints compile time, the median step time and
images/s, and the peak resident memory. PyTorch on the same machine: bench/torch_reference.py (same network, same work).

    python bench/train_throughput.py [--batch 16] [--steps 10]
"""
import argparse
import resource
import statistics
import time

import numpy as np

from model_speed import CIFAR10_UNET  # bench/ is on the path when run as a script


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first (median reported)")
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.data.pipeline import sample_randomness
    from mind_diffusion.gaussian_diffusion import create_diffusion
    from mind_diffusion.resample import UniformSampler
    from mind_diffusion.train.step import EMA, AdamW, DiffusionLoss, TrainStep, WarmupLR
    from models.unet import create_model

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device)
    model = create_model(**CIFAR10_UNET)
    diffusion = create_diffusion(4000, "cosine", learn_sigma=True, loss="rescaled_mse")
    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    optimizer = AdamW(named, WarmupLR(1e-4, 0), eps=1e-8)  # the trainer's optimizer, weight decay 0
    step = TrainStep(DiffusionLoss(model, diffusion, UniformSampler(diffusion.num_timesteps)), optimizer,
                     EMA(named, [0.9999]))
    count = sum(int(np.prod(p.shape)) for _, p in named)
    print(f"model: improved-diffusion CIFAR-10 UNet {CIFAR10_UNET}: {count / 1e6:.2f} M parameters")
    print(f"step: batch {args.batch}, fp32, hybrid loss, AdamW, EMA; device {args.device}")

    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32))
    times = []
    for i in range(args.steps + 1):
        # the trainer's per-sample draws (there they arrive with the batch from the data pipeline)
        draws = [sample_randomness(0, 0, i * args.batch + b, (3, 32, 32)) for b in range(args.batch)]
        u, noise = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
        start = time.perf_counter()
        step(images, ms.Tensor(u), ms.Tensor(noise))[0].asnumpy()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[1:])
    print(f"first step (compile + run): {times[0]:.1f} s")
    print(f"step median {median:.3f} s (min {min(times[1:]):.3f}) → {args.batch / median:.2f} images/s")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
