"""How much a sampling step costs beyond the network: DDPM and DDIM on a 1000-step cosine process.

The network is a single 3×3 convolution (3 → 6 channels: ε and the learned
variance), so everything else in a step — gathering the schedule constants,
the posterior mean and variance, the noise, the host loop — is what is timed
on top of it. The convolution is the one our UNet uses
(``mind_diffusion.kernels.conv.Conv2d``, oneDNN on CPU): MindSpore's own CPU
convolution took 13–16 ms for this shape on an AVX-512 (Zen 4) machine against
0.6 ms for ours, which would hide any overhead. Prints the model's own forward;
for each sampler the step graph the sampling loop runs (x_{t-1} only), the
overhead over the network (the step minus the forward, the two timed
alternately) and the graph's compile time; the same for the step that also
returns x̂_0; the whole loop per step, which adds the host's noise (printed
alone: NumPy's normal draws, ~8 ns each, cost as much as this tiny network —
for a UNet they are noise); and which step path ran: on CPU the work after the
network is one fused C++ kernel (mind_diffusion.sampling.fused; set
MIND_DIFFUSION_FUSED=0 to time the pure-ops fallback instead).

    python bench/sampler_overhead.py [--batch 16] [--size 32] [--steps 1000]
"""
import argparse
import time

import mindspore as ms
import numpy as np
from mindspore import nn

from mind_diffusion.gaussian_diffusion import create_diffusion
from mind_diffusion.kernels.conv import Conv2d
from mind_diffusion.sampling import DDIMSampler, DDPMSampler, fused


class SingleConv(nn.Cell):
    """A UNet-free stand-in network: one 3×3 convolution, ignoring t."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, 2 * channels, 3, pad_mode="pad", padding=1, has_bias=True)

    def construct(self, x, t):
        return self.conv(x)


class Forward(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x, t):
        return self.model(x, t)


def paired_median_ms(fn_a, fn_b, repeats):
    """Median ms of two callables timed alternately, so both see the same process and cache state."""
    times_a, times_b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn_a()
        times_a.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn_b()
        times_b.append(time.perf_counter() - start)
    return 1000 * float(np.median(times_a)), 1000 * float(np.median(times_b))


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000, help="T of the cosine process")
    parser.add_argument("--repeats", type=int, default=1000, help="timed calls per figure")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")

    shape = (args.batch, 3, args.size, args.size)
    diffusion = create_diffusion(args.steps, "cosine", learn_sigma=True, rescale_timesteps=True)
    model = SingleConv(3)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
    t = ms.Tensor(np.full((args.batch,), args.steps // 2, np.int32))

    forward = Forward(model)
    start = time.perf_counter()
    forward(x, t)[0].asnumpy()
    forward_compile = time.perf_counter() - start
    forward_ms = median_ms(lambda: forward(x, t).asnumpy(), args.repeats)
    print(f"batch {args.batch} × 3×{args.size}×{args.size}, cosine T={args.steps}, network = one 3×3 conv")
    print(f"model forward:            {forward_ms:8.3f} ms  (compile {forward_compile:.2f} s)")

    host_noise_ms = median_ms(lambda: ms.Tensor(rng.standard_normal(shape, dtype=np.float32)), args.repeats)
    print(f"host noise per step:      {host_noise_ms:8.3f} ms  (NumPy standard_normal → Tensor; "
          "DDPM and DDIM with η > 0 draw it)")

    for sampler in (DDPMSampler(diffusion, model), DDIMSampler(diffusion, model, eta=0.0)):
        step = sampler.step_graph(())  # the loop's step: x_{t-1} only
        path = "fused C++ kernel" if step.fused else f"pure ops ({fused.status()[1]})"
        noise = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
        start = time.perf_counter()
        step(x, t, noise).asnumpy()
        compile_s = time.perf_counter() - start
        # Forward and step alternate: timed in separate blocks, the forward alone (first, in a
        # process with one graph) ran up to ~40% faster than the same forward timed later.
        pair_forward_ms, step_ms = paired_median_ms(lambda: forward(x, t).asnumpy(),
                                                    lambda: step(x, t, noise).asnumpy(), args.repeats)
        with_pred = sampler.step_graph((), pred_xstart=True)
        with_pred(x, t, noise)[0].asnumpy()
        pred_forward_ms, with_pred_ms = paired_median_ms(lambda: forward(x, t).asnumpy(),
                                                         lambda: with_pred(x, t, noise)[0].asnumpy(), args.repeats)
        start = time.perf_counter()
        sampler.sample(shape, seed=0).asnumpy()
        loop_ms = 1000 * (time.perf_counter() - start) / diffusion.num_timesteps
        print(f"{sampler.name} step path:          {path}")
        print(f"{sampler.name} step graph:         {step_ms:8.3f} ms  (compile {compile_s:.2f} s); "
              f"forward alongside {pair_forward_ms:6.3f} ms; overhead over the network "
              f"{step_ms - pair_forward_ms:6.3f} ms = {100 * (step_ms - pair_forward_ms) / step_ms:5.1f}% of a step")
        print(f"{sampler.name} step + x̂_0 output:  {with_pred_ms:8.3f} ms  (step_graph(pred_xstart=True)); "
              f"overhead {with_pred_ms - pred_forward_ms:6.3f} ms = "
              f"{100 * (with_pred_ms - pred_forward_ms) / with_pred_ms:5.1f}%")
        print(f"{sampler.name} full loop per step: {loop_ms:8.3f} ms  (host noise + t + step, "
              f"{diffusion.num_timesteps} steps)")

if __name__ == "__main__":
    main()
