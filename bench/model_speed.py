"""Forward speed of the improved-diffusion CIFAR-10-sized ADM UNet in GRAPH_MODE.

Prints the parameter count, the first call's time (graph compilation + one
run), the median forward time at each batch size, and the peak resident
memory of the process. PyTorch on the same machine: bench/torch_reference.py (same network, same work).

    python bench/model_speed.py [--device CPU] [--batch-sizes 1 16] [--repeats 5]
"""
import argparse
import resource
import statistics
import time

import mindspore as ms
import numpy as np

from models.unet import create_model

# improved-diffusion's CIFAR-10-sized model, scaled to 64 base channels.
CIFAR10_UNET = dict(
    image_size=32,
    num_channels=64,
    num_res_blocks=2,
    channel_mult="1,2,2,2",
    attention_resolutions="16,8",
    num_heads=4,
    use_scale_shift_norm=True,
    learn_sigma=True,
    dropout=0.1,
)


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="CPU", help="MindSpore device target (CPU, GPU, Ascend)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per batch size (median reported)")
    parser.add_argument("--fp16", action="store_true", help="run the torso in float16 (ADM's use_fp16)")
    return parser.parse_args()


def main():
    args = _parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device)
    model = create_model(**CIFAR10_UNET, use_fp16=args.fp16)
    model.set_train(False)  # inference: dropout off
    n_params = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    print(f"model: {CIFAR10_UNET}{' fp16' if args.fp16 else ''}")
    print(f"parameters: {n_params:,} ({n_params / 1e6:.2f} M)")

    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        x = ms.Tensor(rng.normal(size=(batch, 3, 32, 32)).astype(np.float32))
        t = ms.Tensor(rng.integers(0, 1000, size=batch))
        start = time.perf_counter()
        model(x, t).asnumpy()  # each new input shape compiles a graph
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(x, t).asnumpy()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(
            f"batch {batch:3d}: first call (compile + run) {first:6.2f} s, compile ≈ {first - median:6.2f} s, "
            f"forward median {median * 1e3:8.1f} ms (min {min(times) * 1e3:.1f}, {args.repeats} runs)"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"peak resident memory: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
