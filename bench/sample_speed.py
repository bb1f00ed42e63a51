"""Seconds per image of DDPM-50 and DDIM-50 sampling with the improved-diffusion CIFAR-10-sized UNet.

Batch 16 of 3×32×32 from a cosine T=4000 process respaced to 50 steps, the
UNet in eval mode with random weights (speed does not depend on them).
PyTorch on the same machine: bench/torch_reference.py (same network, same work).

    python bench/sample_speed.py [--batch 16] [--steps 50]
"""
import argparse
import time

from model_speed import CIFAR10_UNET  # bench/ is on the path when run as a script


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args()

    import mindspore as ms
    from mind_diffusion.gaussian_diffusion import create_diffusion
    from mind_diffusion.sampling import create_sampler
    from models.unet import create_model

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device)
    model = create_model(**CIFAR10_UNET)
    model.set_train(False)
    diffusion = create_diffusion(4000, "cosine", learn_sigma=True).respace(str(args.steps))
    shape = (args.batch, 3, 32, 32)
    print(f"model: improved-diffusion CIFAR-10 UNet, batch {args.batch}, {args.steps} steps, device {args.device}")
    for name in ("ddpm", "ddim"):
        sampler = create_sampler(name, diffusion, model)
        start = time.perf_counter()
        sampler.sample(shape, seed=0).asnumpy()
        first = time.perf_counter() - start
        start = time.perf_counter()
        sampler.sample(shape, seed=1).asnumpy()
        elapsed = time.perf_counter() - start
        print(f"{name.upper()}-{args.steps}: {elapsed / args.batch:.3f} s/image ({args.batch / elapsed:.2f} images/s), "
              f"{1000 * elapsed / args.steps:.0f} ms per step; first run incl. compile {first:.1f} s")


if __name__ == "__main__":
    main()
