"""The UNet's attention core on the CPU: MindSpore's ops against the fused C++ kernels.

Times ``models.unet._attend`` (softmax(qᵀk/√d) applied to v, q [R, d, T], k, v
[R, d, S]) at float32 in GRAPH_MODE, forward alone and forward + backward (the
gradients of Σ O·w with respect to q, k and v), for

- ``old``: BatchMatMul → softmax → BatchMatMul (``MIND_DIFFUSION_FAST_ATTENTION=0``);
- ``new``: :mod:`mind_diffusion.kernels.attention`, one C++ operator each way.

Default shapes are the CIFAR UNet's: R = 64 (batch 16 × 4 heads) at 16×16
(T = S = 256) and R = 128 (batch 16 × 8 heads) at 8×8 (T = S = 64), d = 32.
The variants are timed alternately, call by call, so that a machine shared with
other work slows them alike; the ratios are the meaningful figures there.
Prints median ms per call and GFLOP/s (forward 4·R·d·T·S flops, backward twice that).

    python bench/attention_speed.py [--repeats 30] [--shape R d T S ...]
"""
import argparse
import os
import time

import mindspore as ms
import numpy as np

from mind_diffusion.kernels import attention as kernels
from models.unet import _attend


def callables(variant, q, k, v, w):
    """(forward, forward + backward) of one variant as functions of no arguments returning host data."""
    os.environ[kernels.ENV_SWITCH] = "0" if variant == "old" else "1"
    if (kernels.CHOICE.op is not None) != (variant == "new"):
        raise RuntimeError(f"variant {variant!r} did not get the path it wants: {kernels.status()[1]}")
    d = q.shape[1]

    def apply(q_, k_, v_):
        return _attend(q_, k_, v_, d, training=True)

    def loss(q_, k_, v_):
        return (apply(q_, k_, v_) * w).sum()

    forward = ms.jit(apply)
    train = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2)))
    # Compile now, while the env var still selects this variant.
    forward(q, k, v).asnumpy()
    train(q, k, v)[0].asnumpy()

    def run_forward():
        forward(q, k, v).asnumpy()

    def run_train():
        _, grads = train(q, k, v)
        for g in grads:
            g.asnumpy()

    return run_forward, run_train


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs=4, action="append", metavar=("R", "d", "T", "S"))
    args = parser.parse_args()
    shapes = args.shape or [(64, 32, 256, 256), (128, 32, 64, 64)]
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    print(f"fast attention: {kernels.status()[1]}")
    rng = np.random.default_rng(0)
    for r, d, t, s in shapes:
        q = ms.Tensor(rng.normal(size=(r, d, t)).astype(np.float32))
        k = ms.Tensor(rng.normal(size=(r, d, s)).astype(np.float32))
        v = ms.Tensor(rng.normal(size=(r, d, s)).astype(np.float32))
        w = ms.Tensor(rng.normal(size=(r, d, t)).astype(np.float32))
        variants = ("old", "new")
        fns = {name: callables(name, q, k, v, w) for name in variants}
        times = {(name, part): [] for name in variants for part in (0, 1)}
        for _ in range(3):  # warm-up
            for name in variants:
                for fn in fns[name]:
                    fn()
        for _ in range(args.repeats):
            for part in (0, 1):
                for name in variants:  # alternate, so load hits both alike
                    start = time.perf_counter()
                    fns[name][part]()
                    times[(name, part)].append(time.perf_counter() - start)
        flops = 4.0 * r * d * t * s
        print(f"R={r} d={d} T={t} S={s}  (median of {args.repeats})")
        for part, label, work in ((0, "forward", flops), (1, "forward+backward", 3 * flops)):
            row = {name: 1e3 * float(np.median(times[(name, part)])) for name in variants}
            gf = {name: work / (row[name] * 1e-3) / 1e9 for name in variants}
            print(f"  {label:17s} old {row['old']:8.2f} ms ({gf['old']:5.1f} GFLOP/s)   "
                  f"new {row['new']:8.2f} ms ({gf['new']:5.1f} GFLOP/s)   speed-up {row['old'] / row['new']:.2f}x")


if __name__ == "__main__":
    main()
