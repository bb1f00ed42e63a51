"""GroupNorm → SiLU on the CPU: MindSpore's own GroupNorm against the fast C++ kernels.

Times 4 × (GroupNorm(32) → SiLU), chained, at [batch, channels, size, size]
float32 in GRAPH_MODE, forward alone and forward + backward (the gradient of
Σ y·w with respect to the input and every γ, β), for

- ``old``: MindSpore's ``ops.group_norm`` and ``nn.SiLU`` (the layers before the
  fast path; what ``MIND_DIFFUSION_FAST_NORM=0`` gives);
- ``new``: :func:`mind_diffusion.nn.normalization_silu`, GroupNorm and SiLU fused
  in one C++ operator with a C++ backward;
- ``new, unfused``: the C++ GroupNorm followed by MindSpore's ``nn.SiLU``;
- ``no layers``: the same graphs with the layers left out (the input copied, Σ y·w
  and its gradient): the cost every row includes besides the norms.

The variants are timed alternately, call by call, so that a machine shared
with other work slows them alike; the ratios are the meaningful figures there.
Prints median ms per call.

    python bench/norm_speed.py [--batch 16] [--channels 128] [--size 32] [--repeats 30]
"""
import argparse
import os
import time

import mindspore as ms
import numpy as np
from mindspore import nn

from mind_diffusion.kernels import group_norm as kernels
from mind_diffusion.nn import GroupNorm32, normalization_silu

LAYERS = 4


def stack(channels, variant):
    """4 × (norm → SiLU) as one SequentialCell, for one variant."""
    os.environ[kernels.ENV_SWITCH] = "0" if variant == "old" else "1"
    if variant == "no layers":
        return None
    cells = []
    for _ in range(LAYERS):
        if variant == "new":
            cells += normalization_silu(channels)
        else:
            cells += [GroupNorm32(32, channels), nn.SiLU()]
    net = nn.SequentialCell(cells)
    fast = [cell.fast is not None for cell in net.cell_list if isinstance(cell, GroupNorm32)]
    if any(fast) != (variant != "old"):
        raise RuntimeError(f"variant {variant!r} did not get the path it wants: {kernels.status()[1]}")
    return net


def callables(net, x, w):
    """(forward, forward + backward) as jitted functions of no arguments, each returning host data."""
    def apply(inp):
        return inp + 0.0 if net is None else net(inp)

    def loss(inp):
        return (apply(inp) * w).sum()

    forward = ms.jit(apply)
    if net is None:
        train = ms.jit(ms.value_and_grad(loss, grad_position=0))
    else:
        train = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=net.trainable_params()))

    def run_forward():
        forward(x).asnumpy()

    def run_train():
        value, grads = train(x)
        for g in (grads if net is None else (grads[0], *grads[1])):
            g.asnumpy()

    return run_forward, run_train


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per figure")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")

    rng = np.random.default_rng(0)
    shape = (args.batch, args.channels, args.size, args.size)
    x = ms.Tensor(rng.normal(0.3, 1.5, shape).astype(np.float32))
    w = ms.Tensor(rng.normal(0.0, 1.0, shape).astype(np.float32))
    variants = ("old", "new", "new, unfused", "no layers")
    runs = {}
    for variant in variants:
        fwd, train = callables(stack(args.channels, variant), x, w)
        fwd()  # compile and warm up
        train()
        runs[variant] = (fwd, train)
    print(f"{LAYERS} x (GroupNorm(32) -> SiLU), {list(shape)} float32, GRAPH_MODE CPU; "
          f"fast path: {kernels.status()[1]}")

    times = {(v, k): [] for v in variants for k in (0, 1)}
    for _ in range(args.repeats):
        for kind in (0, 1):
            for variant in variants:  # alternate: every variant sees the same load
                start = time.perf_counter()
                runs[variant][kind]()
                times[(variant, kind)].append(time.perf_counter() - start)
    med = {key: 1000 * float(np.median(t)) for key, t in times.items()}
    print(f"{'':14s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    for variant in variants:
        print(f"{variant:14s} {med[(variant, 0)]:11.2f} {med[(variant, 1)]:11.2f}")
    for variant in variants[1:3]:
        print(f"speed-up {variant}: forward {med[('old', 0)] / med[(variant, 0)]:.1f}x, "
              f"fwd+bwd {med[('old', 1)] / med[(variant, 1)]:.1f}x")


if __name__ == "__main__":
    main()
