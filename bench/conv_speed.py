"""2-D convolution on the CPU: MindSpore's ``nn.Conv2d`` against the fast oneDNN kernels.

Times, at [batch, channels, size, size] float32 in GRAPH_MODE, a k×k convolution
(channels → channels, bias, stride 1 with padding (k−1)/2 by default):

- ``fwd``: the forward alone;
- ``fwd+dx``: forward + the gradient of the input;
- ``fwd+dw``: forward + the gradients of weight and bias;
- ``fwd+bwd``: forward + all three gradients (a training step's work);
- ``chain``: 4 × (x ← x + conv(x)), forward + the gradients of the input and of
  every weight and bias.

Gradients are those of L = Σ y·r (r fixed random) with ``ms.value_and_grad``,
so each graph also computes the forward, the product and the sum (the same
few ms for both variants). The two variants are

- ``old``: ``mindspore.nn.Conv2d`` (what ``MIND_DIFFUSION_FAST_CONV=0`` gives);
- ``new``: :class:`mind_diffusion.kernels.conv.Conv2d` (oneDNN's direct
  convolution on blocked layouts, C++ custom operators),

timed alternately, call by call, so that a machine shared with other work slows
them alike; the ratios are the meaningful figures there. Prints median ms per call.

    python bench/conv_speed.py [--batch 16] [--channels 128] [--size 32] [--kernel 3] [--stride 1] [--repeats 20]
"""
import argparse
import os
import time

import mindspore as ms
import numpy as np
from mindspore import nn

from mind_diffusion.kernels import conv as kernels

CHAIN = 4


def conv(variant, channels, kernel, stride):
    """One convolution Cell of a variant."""
    os.environ[kernels.ENV_SWITCH] = "0" if variant == "old" else "1"
    cls = nn.Conv2d if variant == "old" else kernels.Conv2d
    cell = cls(channels, channels, kernel, stride=stride, pad_mode="pad", padding=(kernel - 1) // 2, has_bias=True)
    if variant == "new" and not cell.fast:
        raise RuntimeError(f"the fast convolution is unavailable: {kernels.status()[1]}")
    return cell


class Chain(nn.Cell):
    """x ← x + conv_i(x) for each of the convolutions."""

    def __init__(self, convs):
        super().__init__()
        self.convs = nn.CellList(convs)

    def construct(self, x):
        for c in self.convs:
            x = x + c(x)
        return x


def callables(net, x, sens):
    """name → function of no arguments that runs one jitted graph and fetches its results."""
    params = net.trainable_params()

    def forward(inp):
        return net(inp)

    def loss(inp):
        return (net(inp) * sens).sum()

    jitted = {"fwd": ms.jit(forward),
              "fwd+dx": ms.jit(ms.value_and_grad(loss, grad_position=0)),
              "fwd+dw": ms.jit(ms.value_and_grad(loss, grad_position=None, weights=params)),
              "fwd+bwd": ms.jit(ms.value_and_grad(loss, grad_position=0, weights=params))}

    def fetch(out):
        if isinstance(out, (tuple, list)):
            for o in out:
                fetch(o)
        else:
            out.asnumpy()

    def runner(fn):
        return lambda: fetch(fn(x))

    return {name: runner(fn) for name, fn in jitted.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)
    b, c, s = args.batch, args.channels, args.size
    x = ms.Tensor(rng.standard_normal((b, c, s, s)).astype(np.float32))

    variants = ("old", "new")
    single = {v: conv(v, c, args.kernel, args.stride) for v in variants}
    single["new"].weight.set_data(ms.Tensor(single["old"].weight.asnumpy()))
    single["new"].bias.set_data(ms.Tensor(single["old"].bias.asnumpy()))
    y_shape = single["old"](x).shape
    sens = ms.Tensor(rng.standard_normal(y_shape).astype(np.float32))
    runs = {v: callables(single[v], x, sens) for v in variants}
    if args.stride == 1:
        chains = {v: Chain([conv(v, c, args.kernel, 1) for _ in range(CHAIN)]) for v in variants}
        for a, bb in zip(chains["old"].convs, chains["new"].convs):
            bb.weight.set_data(ms.Tensor(a.weight.asnumpy()))
            bb.bias.set_data(ms.Tensor(a.bias.asnumpy()))
        for v in variants:
            runs[v]["chain"] = callables(chains[v], x, x)["fwd+bwd"]

    y_old, y_new = (single[v](x).asnumpy() for v in variants)
    diff = np.abs(y_old - y_new).max() / np.abs(y_old).max()
    print(f"{kernels.status()[1]}\nx [{b}, {c}, {s}, {s}], kernel {args.kernel}, stride {args.stride}; "
          f"forward max |new - old| / max |old| = {diff:.1e}")
    names = list(runs["old"])
    times = {(v, n): [] for v in variants for n in names}
    for rep in range(args.warmup + args.repeats):
        for n in names:
            for v in variants:
                t0 = time.perf_counter()
                runs[v][n]()
                if rep >= args.warmup:
                    times[(v, n)].append((time.perf_counter() - t0) * 1e3)
    print(f"{'ms (median of %d)' % args.repeats:<20}{'old':>10}{'new':>10}{'new/old':>10}")
    for n in names:
        old, new = np.median(times[("old", n)]), np.median(times[("new", n)])
        print(f"{n:<20}{old:10.1f}{new:10.1f}{new / old:10.2f}")


if __name__ == "__main__":
    main()
