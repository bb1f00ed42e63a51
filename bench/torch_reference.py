"""PyTorch reference timings for the improved-diffusion CIFAR-10-sized UNet, on the machine that runs our benches.

The README compares our MindSpore speeds with PyTorch's; this script measures
PyTorch on the same machine, the same network and the same work, so the two
can be read side by side:

- training: the step of ``bench/train_throughput.py`` (batch 16, fp32, uniform
  t over a cosine T=4000 process, hybrid loss L_simple + λ L_vlb with learned
  range Σ and the mean stop-gradiented in L_vlb, AdamW lr 1e-4, EMA 0.9999),
  median s/step and images/s;
- sampling: the steps of ``bench/sample_speed.py`` (batch 16, eval-mode UNet
  under no_grad plus the DDPM or DDIM update, T=4000 respaced to 50 steps),
  ms per step and images/s;
- forward only at batch 1 and 16, as ``bench/model_speed.py``.

The network is written here in PyTorch, module for module as our
``models/unet.py`` with the options the benches use (scale-shift norm, legacy
QKV attention, conv up/down-sampling, no class labels), and with the PyTorch
key names of improved/guided-diffusion, i.e. those our exporter writes. So
``--check`` can load a state dict exported from our model
(``mind_diffusion.convert.export_torch_state_dict``) with ``strict=True`` and
compare the outputs to ours on the same inputs, which shows the timed network
is ours.

PyTorch is optional and not in requirements.txt: install it in a separate
environment (``python -m venv torchenv && torchenv/bin/pip install torch numpy``)
and run this script with that environment's Python::

    torchenv/bin/python bench/torch_reference.py [--threads 2] [--steps 10] [--sample-steps 50] [--only train]
    torchenv/bin/python bench/torch_reference.py --check unet.pt --check-io io.npz

``--check-io`` is an npz with our model's inputs ``x`` [N, 3, 32, 32] and ``t``
[N] and its eval-mode output ``out``; the check fails (exit status 1) when the
largest difference exceeds 1e-4 of the largest output value.
"""
import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# bench/model_speed.py's CIFAR10_UNET (that module imports MindSpore, so the settings are repeated here).
CIFAR10_UNET = dict(
    image_size=32,
    num_channels=64,
    num_res_blocks=2,
    channel_mult=(1, 2, 2, 2),
    attention_resolutions=(16, 8),
    num_heads=4,
    learn_sigma=True,
    dropout=0.1,
)
DIFFUSION_STEPS = 4000  # cosine schedule, as train_throughput.py and sample_speed.py
EMA_RATE = 0.9999
MAX_RELATIVE_ERROR = 1e-4


# ----------------------------------------------------------------- network


def timestep_embedding(timesteps, dim, max_period=10000):
    """[cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})], f_j = max_period^(-j/h), h = dim // 2 (dim is even here).

    The exponent is rounded to float32 and exponentiated in float64 as our
    ``mind_diffusion.nn.timestep_embedding`` does, so both see the same frequencies.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
    frequencies = exponent.double().exp().float()
    args = timesteps.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (ADM's norm; our GroupNorm32)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero the module's parameters: ADM initialises each residual branch's last layer and the output at 0."""
    for param in module.parameters():
        param.detach().zero_()
    return module


class TimestepBlock(nn.Module):
    """A layer that takes the timestep embedding as a second input."""


class TimestepEmbedSequential(nn.Sequential):
    """Children named 0, 1, ...; the TimestepBlocks among them also get the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2× upsampling followed by a 3×3 convolution (``conv``)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """2× downsampling by a strided 3×3 convolution (``op``)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """GN → SiLU → conv, then AdaGN: GN(h)·(1 + scale) + shift from the embedding, SiLU, dropout, conv; plus skip.

    The Sequential indices keep the reference's layout (``in_layers.2``,
    ``out_layers.3``, ``emb_layers.1``), which our checkpoints' keys use.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        # A 1×1 convolution where the channel count changes (our conv_nd(2, in, out, 1)).
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).type(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention on a packed [N, H·3·d, T] qkv: heads split first, then q/k/v (improved DDPM's order).

    q and k are each scaled by d^(-1/4) and the softmax runs in float32, as in ours.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, width, length = qkv.shape
        head_channels = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, 3 * head_channels, length).split(head_channels, dim=1)
        scale = head_channels ** -0.25
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)  # [B·H, T (queries), S (keys)]
        weight = torch.softmax(weight.float(), dim=-1).type(q.dtype)
        return torch.bmm(v, weight.transpose(1, 2)).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all positions: norm → qkv (1×1) → attention → proj_out (1×1, zero init), residual."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttentionLegacy(num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        tokens = x.reshape(x.shape[0], x.shape[1], -1)
        h = self.attention(self.qkv(self.norm(tokens)))
        return (tokens + self.proj_out(h)).reshape(x.shape)


class UNetModel(nn.Module):
    """The ADM UNet of our ``models.unet.create_model`` with scale-shift norm and conv resampling.

    Takes create_model's argument names; ``attention_resolutions`` are pixel sizes.
    """

    def __init__(self, image_size, num_channels, num_res_blocks, channel_mult, attention_resolutions,
                 num_heads, learn_sigma, dropout, in_channels=3):
        super().__init__()
        attention_rates = {image_size // r for r in attention_resolutions}  # pixel sizes → downsample rates
        emb_channels = 4 * num_channels
        self.num_channels = num_channels
        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))

        ch = channel_mult[0] * num_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        rate = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_channels, dropout, mult * num_channels)]
                ch = mult * num_channels
                if rate in attention_rates:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                rate *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_channels, dropout, ch),
                                                    AttentionBlock(ch, num_heads),
                                                    ResBlock(ch, emb_channels, dropout, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, dropout, mult * num_channels)]
                ch = mult * num_channels
                if rate in attention_rates:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.num_channels))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ------------------------------------------------------- diffusion process


def cosine_betas(num_steps, offset=0.008, max_beta=0.999):
    """Improved DDPM's cosine schedule: β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), 0.999), float64."""
    def alpha_bar(s):
        return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)])


def spaced_steps(num_steps, count):
    """The ``count`` steps our ``respace(str(count))`` keeps of ``num_steps``: evenly spread, first and last kept.

    The fractional position is accumulated, not multiplied, so ties round as in ours.
    """
    stride = (num_steps - 1) / (count - 1) if count > 1 else 1
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


class Diffusion:
    """A Gaussian diffusion with ε prediction and learned-range Σ; constants in float64, used as float32.

    With ``kept_steps`` it is the respaced process that visits only those steps
    (same ᾱ there), and the network is fed the original step indices.
    """

    def __init__(self, betas, kept_steps=None):
        if kept_steps is not None:
            alphas_cumprod = np.cumprod(1.0 - betas)[kept_steps]
            betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        self.num_steps = len(betas)
        self.model_time = torch.tensor(np.arange(self.num_steps) if kept_steps is None else kept_steps,
                                       dtype=torch.float32)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        table = {
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            # β̃_0 = 0: log β̃_1 stands in at t = 0, as in improved DDPM.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
        }
        # Stored as [T, 1, 1, 1] so that values[t] broadcasts over an image batch.
        self.c = {name: torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1, 1) for name, v in table.items()}

    def q_sample(self, x_start, t, noise):
        c = self.c
        return c["sqrt_alphas_cumprod"][t] * x_start + c["sqrt_one_minus_alphas_cumprod"][t] * noise

    def q_posterior(self, x_start, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        c = self.c
        mean = c["posterior_mean_coef1"][t] * x_start + c["posterior_mean_coef2"][t] * x_t
        return mean, c["posterior_log_variance_clipped"][t].expand_as(x_t)

    def p_mean_variance(self, output, x, t, clip_denoised):
        """μ_θ, log Σ_θ and x̂_0 of p(x_{t-1} | x_t) from the network's [ε | v] output."""
        c = self.c
        eps, var_values = output.chunk(2, dim=1)
        frac = (var_values + 1) / 2  # v ∈ [−1, 1] interpolates log β̃_t .. log β_t
        log_variance = frac * c["log_betas"][t] + (1 - frac) * c["posterior_log_variance_clipped"][t]
        pred_xstart = c["sqrt_recip_alphas_cumprod"][t] * x - c["sqrt_recipm1_alphas_cumprod"][t] * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_xstart, x, t)
        return mean, log_variance, pred_xstart

    def training_loss(self, model, x_start, t, noise):
        """L_hybrid = ‖ε − ε_θ‖² + (T/1000) L_vlb per example, L_vlb training only Σ; batch mean."""
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_time[t])
        eps, var_values = output.chunk(2, dim=1)
        mse = (noise - eps).square().mean(dim=(1, 2, 3))
        frozen = torch.cat([eps.detach(), var_values], dim=1)  # the bound's gradient reaches Σ only
        mean, log_variance, _ = self.p_mean_variance(frozen, x_t, t, clip_denoised=False)
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        # Both terms for every example, then the one for its t: L_0 at t = 0, L_{t-1} otherwise.
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, mean, 0.5 * log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, decoder_nll, kl) * (self.num_steps / 1000.0)
        return (mse + vb).mean()

    def ddpm_step(self, output, x, t):
        """x_{t-1} = μ_θ + σ_θ z (no noise at the last step)."""
        mean, log_variance, _ = self.p_mean_variance(output, x, t, clip_denoised=True)
        nonzero = (t > 0).float().reshape(-1, 1, 1, 1)
        return mean + nonzero * torch.exp(0.5 * log_variance) * torch.randn_like(x)

    def ddim_step(self, output, x, t):
        """Deterministic DDIM, η = 0 as in sample_speed.py: x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1}) ε̂."""
        c = self.c
        _, _, pred_xstart = self.p_mean_variance(output, x, t, clip_denoised=True)
        eps = (c["sqrt_recip_alphas_cumprod"][t] * x - pred_xstart) / c["sqrt_recipm1_alphas_cumprod"][t]
        alpha_bar_prev = c["alphas_cumprod_prev"][t]
        return pred_xstart * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev).sqrt() * eps


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) by the tanh approximation."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log of the Gaussian mass on x's 8-bit bin (width 2/255, edge bins open), in nats: the decoder L_0."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ---------------------------------------------------------------- benches


def check(state_dict_path, io_path):
    """Load our exported weights strictly, run our inputs, compare with our output; returns the exit status."""
    model = UNetModel(**CIFAR10_UNET)
    model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True), strict=True)
    model.eval()  # dropout off, as our reference output was computed
    data = np.load(io_path)
    with torch.no_grad():
        out = model(torch.from_numpy(data["x"]), torch.from_numpy(data["t"])).numpy()
    ref = data["out"]
    max_abs = float(np.abs(out - ref).max())
    relative = max_abs / float(np.abs(ref).max())
    print(f"check: {len(model.state_dict())} tensors loaded strictly from {state_dict_path}; "
          f"output {tuple(out.shape)}")
    print(f"max |torch − ours| = {max_abs:.3g}, max |ours| = {float(np.abs(ref).max()):.4g}, "
          f"relative = {relative:.3g} (limit {MAX_RELATIVE_ERROR:g})")
    if relative > MAX_RELATIVE_ERROR:
        print("FAIL: the PyTorch network does not reproduce ours")
        return 1
    print("OK")
    return 0


def train_throughput(batch, steps, warmup):
    """bench/train_throughput.py's step in PyTorch: hybrid loss, AdamW, EMA; median s/step after warm-up."""
    model = UNetModel(**CIFAR10_UNET).train()
    diffusion = Diffusion(cosine_betas(DIFFUSION_STEPS))
    params = list(model.parameters())
    # improved-diffusion's optimizer; MindSpore's AdamWeightDecay in ours also has no weight decay by default.
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, eps=1e-8)
    ema = [p.detach().clone() for p in params]
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    times = []
    for _ in range(warmup + steps):
        # Drawn before the clock starts, as ours draws them on the host before each step.
        t = torch.randint(0, diffusion.num_steps, (batch,))
        noise = torch.randn_like(images)
        start = time.perf_counter()
        loss = diffusion.training_loss(model, images, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for average, param in zip(ema, params):
                average.lerp_(param, 1 - EMA_RATE)  # θ̄ ← r θ̄ + (1 − r) θ
        loss.item()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[warmup:])
    print(f"train step: batch {batch}, fp32, hybrid loss, AdamW, EMA: median {median:.3f} s "
          f"(min {min(times[warmup:]):.3f}, {steps} steps after {warmup} warm-up) → {batch / median:.2f} images/s")


def sample_speed(batch, steps):
    """bench/sample_speed.py in PyTorch: DDPM-K and DDIM-K chains of the eval-mode UNet, after one warm-up step."""
    model = UNetModel(**CIFAR10_UNET).eval()
    diffusion = Diffusion(cosine_betas(DIFFUSION_STEPS), spaced_steps(DIFFUSION_STEPS, steps))
    for name, update in (("DDPM", diffusion.ddpm_step), ("DDIM", diffusion.ddim_step)):
        with torch.no_grad():
            x = torch.randn(batch, 3, 32, 32)
            last = torch.full((batch,), steps - 1, dtype=torch.long)
            update(model(x, diffusion.model_time[last]), x, last)  # warm-up step, not timed
            start = time.perf_counter()
            for k in reversed(range(steps)):
                t = torch.full((batch,), k, dtype=torch.long)
                x = update(model(x, diffusion.model_time[t]), x, t)
            elapsed = time.perf_counter() - start
        print(f"{name}-{steps}: batch {batch}: {1000 * elapsed / steps:.0f} ms per step, "
              f"{elapsed / batch:.3f} s/image ({batch / elapsed:.2f} images/s)")


def machine_limit(threads):
    """How much work a trained image is, and how fast this machine can do dense fp32 work.

    FLOPs of one image's forward (torch's FlopCounterMode: convolutions, matrix
    products, attention), a train step's being about 3× that (the backward computes
    two products per forward one); and the fp32 matmul peak: the best of 5 products
    of 2048×2048 matrices (2n³ FLOPs each) with ``threads`` threads.
    """
    from torch.utils.flop_counter import FlopCounterMode
    model = UNetModel(**CIFAR10_UNET).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    print(f"forward FLOPs per image: {counter.get_total_flops() / 1e9:.3f} GFLOP "
          f"(a train step about 3× that per image)")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    print(f"fp32 matmul peak: {2 * n ** 3 / best / 1e9:.1f} GFLOP/s ({n}×{n}, {threads} threads)")


def forward_speed(batch_sizes, repeats):
    """bench/model_speed.py in PyTorch: median eval forward time per batch size, after one warm-up call."""
    model = UNetModel(**CIFAR10_UNET).eval()
    count = sum(p.numel() for p in model.parameters())
    print(f"parameters: {count:,} ({count / 1e6:.2f} M)")
    time_forwards(model, batch_sizes, repeats)


def time_forwards(model, batch_sizes, repeats):
    """Print the median eval forward time of ``model(x, t)`` per batch size, after one warm-up call
    (shared with bench/improved_diffusion_bench.py)."""
    for batch in batch_sizes:
        x = torch.randn(batch, 3, 32, 32)
        t = torch.randint(0, 1000, (batch,))
        times = []
        with torch.no_grad():
            model(x, t)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x, t)
                times.append(time.perf_counter() - start)
        print(f"forward batch {batch:3d}: median {statistics.median(times) * 1e3:8.1f} ms "
              f"(min {min(times) * 1e3:.1f}, {repeats} runs)")


def add_timing_arguments(parser, works):
    """The options of the PyTorch benches (this one and bench/improved_diffusion_bench.py)."""
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--only", choices=works, help="run one bench (default: train, sample and forward)")
    parser.add_argument("--batch", type=int, default=16, help="batch of the training and sampling benches")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps after 2 warm-up steps")
    parser.add_argument("--sample-steps", type=int, default=50, help="respaced steps of the DDPM/DDIM chains")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="forward-only batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per batch size")


def _parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --check: timings of training, sampling and the forward pass (see the module docstring).")
    # limit: FLOPs per image and the matmul peak
    add_timing_arguments(parser, ("train", "sample", "forward", "limit"))
    parser.add_argument("--check", metavar="PATH.pt", help="state dict exported from our model: check, don't time")
    parser.add_argument("--check-io", metavar="PATH.npz", help="our model's x, t and eval-mode output out")
    args = parser.parse_args()
    if (args.check is None) != (args.check_io is None):
        parser.error("--check and --check-io go together")
    return args


def main():
    args = _parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.check:
        return check(args.check, args.check_io)
    print(f"model: improved-diffusion CIFAR-10 UNet {CIFAR10_UNET}; cosine T={DIFFUSION_STEPS}")
    if args.only in (None, "train"):
        train_throughput(args.batch, args.steps, warmup=2)
    if args.only in (None, "sample"):
        sample_speed(args.batch, args.sample_steps)
    if args.only in (None, "forward"):
        forward_speed(args.batch_sizes, args.repeats)
    if args.only == "limit":
        machine_limit(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
