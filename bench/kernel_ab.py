"""Paired A/B of the train step's CPU levers, interleaved in one process so that machine drift falls on all alike.

On the improved-diffusion CIFAR-10 UNet (as bench/train_throughput.py and
bench/model_speed.py), three variants are built side by side and called in
turn, the order reversed every round:

- ``fast``: AdamW and the EMA as one C++ call each over all tensors
  (mind_diffusion.kernels.multi_tensor) and the attention projections (``Conv1x1``)
  as oneDNN 1×1 convolutions (mind_diffusion.kernels.conv);
- ``conv1x1``: the 1×1 convolutions only (AdamW and the EMA tensor by tensor);
- ``ops``: neither (the matmul projections and the per-tensor updates).

Prints each variant's median step time, its speed-up over ``ops`` and the median of
the per-round paired ratios, and the first call's time (mostly compilation). Inference
graphs use neither lever (``Conv1x1`` takes the 1×1 kernel in training mode only).

    python bench/kernel_ab.py [--batch 16] [--rounds 8]
"""
import argparse
import os
import statistics
import time

import numpy as np

from model_speed import CIFAR10_UNET  # bench/ is on the path when run as a script


def build_model(fast_conv1x1):
    from mind_diffusion.nn import Conv1x1
    from models.unet import create_model

    model = create_model(**CIFAR10_UNET)
    if not fast_conv1x1:
        for _, cell in model.cells_and_names():
            if isinstance(cell, Conv1x1):
                cell.fast_op = None  # read when the graph is built: the matmul path
    return model


def build_step(fast_update, fast_conv1x1):
    from mind_diffusion.gaussian_diffusion import create_diffusion
    from mind_diffusion.kernels import multi_tensor
    from mind_diffusion.resample import UniformSampler
    from mind_diffusion.train.step import EMA, AdamW, DiffusionLoss, TrainStep, WarmupLR

    os.environ[multi_tensor.ENV_SWITCH] = "1" if fast_update else "0"  # read when AdamW / EMA are built
    model = build_model(fast_conv1x1)
    diffusion = create_diffusion(4000, "cosine", learn_sigma=True, loss="rescaled_mse")
    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    step = TrainStep(DiffusionLoss(model, diffusion, UniformSampler(diffusion.num_timesteps)),
                     AdamW(named, WarmupLR(1e-4, 0), eps=1e-8), EMA(named, [0.9999]))
    if fast_update and step.optimizer.multi_tensor is None:
        raise SystemExit(f"the multi-tensor update is unavailable here: {multi_tensor.status()[1]}")
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8, help="timed calls per variant (default 8)")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.data.pipeline import sample_randomness
    from mind_diffusion.kernels import conv

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    if not conv.status()[0]:
        raise SystemExit(f"the oneDNN convolution is unavailable here: {conv.status()[1]}")
    batch = args.batch
    variants = {"fast": build_step(True, True), "conv1x1": build_step(False, True), "ops": build_step(False, False)}
    images = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32))

    def call(step, i):
        # the trainer's per-sample draws, as bench/train_throughput.py
        draws = [sample_randomness(0, 0, i * batch + b, (3, 32, 32)) for b in range(batch)]
        u, noise = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
        step(images, ms.Tensor(u), ms.Tensor(noise))[0].asnumpy()

    print(f"train step, batch {batch}, improved-diffusion CIFAR-10 UNet, fp32, hybrid loss, AdamW, EMA; "
          f"variants {', '.join(variants)}")
    for name, variant in variants.items():
        start = time.perf_counter()
        call(variant, 0)
        print(f"{name}: first call (compile + run) {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            call(variants[name], r + 1)
            times[name].append(time.perf_counter() - start)
    base = times["ops"]
    for name, values in times.items():
        median = statistics.median(values)
        rate = f" ({batch / median:.2f} images/s)"
        paired = statistics.median([b / v for b, v in zip(base, values)])
        print(f"{name}: median {1000 * median:.1f} ms{rate}, min {1000 * min(values):.1f} ms; "
              f"speed-up over ops {statistics.median(base) / median:.3f} (paired per round {paired:.3f})")


if __name__ == "__main__":
    main()
