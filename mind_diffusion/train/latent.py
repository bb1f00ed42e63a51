"""Training latent diffusion (Rombach et al. 2022): the latent model's objective, the KL autoencoder's, and
the converted checkpoint a latent run writes for sampling.

Both losses have :class:`~mind_diffusion.train.step.DiffusionLoss`'s call,
``construct(images, u, noise, *cond) -> (loss, t, per-example loss, metrics …)``, so the one
compiled :class:`~mind_diffusion.train.step.TrainStep` (AdamW, EMA, overflow check, metrics) trains them.

The latent objective (Sec. 4.3, Eq. 2, "L_LDM"): for an image x with caption y,

    z_0 = s · z,  z = μ(x) + σ(x)·n  (a draw of the frozen encoder's posterior; z = μ without ``sample_posterior``)
    z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε,    L = ‖target − ε_θ(z_t, t, τ(y))‖² averaged over the latent,

with target ε, or v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 for a v-predicting model (Salimans & Ho 2022): the process's
own ``training_losses`` computes both (one home per formula). τ is the text encoder, frozen or (with
``model.train_text_encoder``) trained by the same loss; a caption
dropped by ``data.caption_dropout`` is the empty prompt's tokens, which trains the unconditional model
that classifier-free guidance needs.

The autoencoder's objective (App. G; CompVis ``LPIPSWithDiscriminator`` without its perceptual term, for
which no weights are available offline, and without its learned output log-variance, which starts at 0):

    L_rec = Σ_pixels |x − x̂| + w · KL(q(z | x) ‖ N(0, I)),  x̂ = Dec(z),  z = μ + σ·n,
    KL = ½ Σ_latent (μ² + σ² − 1 − log σ²),

both summed over one example (CompVis's scale, at which w = 1e-6), averaged over the batch. With a patch
discriminator D (``train.disc_weight`` > 0; Esser et al. 2021, Eq. 7 and 8) the autoencoder adds

    λ f L_G,  L_G = −mean D(x̂),  λ = s · clip(‖∇_{W_L} L_nll‖ / (‖∇_{W_L} L_G‖ + 1e-4), 0, 1e4), not differentiated,

where W_L is the decoder's last weight, L_nll = Σ_pixels |x − x̂| averaged over the batch, s = ``disc_weight``
and f = 1 from step ``disc_start`` on (0 before), and D minimises the hinge loss

    L_D = f · ½ (mean relu(1 − D(x)) + mean relu(1 + D(sg(x̂)))).

The step minimises L_rec + λ f L_G + L_D in one backward pass: the generator's term sees D's weights
through ``stop_gradient`` and D's term sees sg(x̂), so each network gets exactly its own loss's gradient.
"""
import json
import os

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ..convert_ldm import config_json
from ..losses import mean_flat, normal_kl
from ..resample import UniformSampler
from ..sampling.schedulers.ldm import create_ldm_diffusion

__all__ = ["LatentDiffusionLoss", "AutoencoderLoss", "LDM_SCHEDULE", "latent_diffusion", "export_config",
           "write_export", "write_export_weights", "export_path"]

# Latent diffusion's β range (SD 1.x/2.x, Wukong-Huahua): diffusion.noise_schedule "scaled_linear".
LDM_SCHEDULE = dict(linear_start=0.00085, linear_end=0.012)


def latent_diffusion(diffusion_cfg):
    """The process of ``diffusion.noise_schedule: scaled_linear``: latent diffusion's β over
    ``diffusion.steps`` (rescaled to zero terminal SNR with ``diffusion.zero_terminal_snr``), ε or (``predict_v``)
    v prediction, as latent sampling builds it."""
    return create_ldm_diffusion(**schedule_config(diffusion_cfg), prediction="v" if diffusion_cfg.predict_v else "eps")


def schedule_config(diffusion_cfg):
    """The ``schedule`` section of a run's ``ldm_config``: T, latent diffusion's β range and, only when set
    (every SD / Wukong-Huahua file lacks it), ``zero_terminal_snr``."""
    schedule = dict(timesteps=diffusion_cfg.steps, **LDM_SCHEDULE)
    if diffusion_cfg.zero_terminal_snr:
        schedule["zero_terminal_snr"] = True
    return schedule


class LatentDiffusionLoss(nn.Cell):
    """L_LDM of a batch: ``construct(images, u, noise, tokens, *unused) -> (mean_b w_b L_b, t, L, mse, z_rms)``.

    :param model: a :class:`models.latent_diffusion.LatentDiffusion` (``latents``, ``context``, and the
        UNet as ``model(z_t, t, context)``).
    :param diffusion: the latent process (ε or v by its mean type; fixed variance, loss mse).
    :param schedule_sampler: a :class:`~mind_diffusion.resample.ScheduleSampler` over its steps.
    :param latent_channels: C of a latent. With ``sample_posterior`` the ``noise`` input carries 2C
        channels: ε (the first C) and the posterior draw n (the last C), independent Gaussians of one
        seeded draw; else C (ε only, z = μ).
    :param precomputed: the ``images`` input is the frozen encoder's posterior, precomputed
        (``data.kind: latents``, :mod:`mind_diffusion.data.latents`): [B, 2C, h, w], μ then log σ². The
        step then draws z from it and runs no encoder; the loss is the same function of the same draws.

    The second metric, z_rms = √(mean z_0²) per example, shows whether ``scale_factor`` gives the
    latents about unit variance, as the process assumes.
    """

    metric_names = ("mse", "z_rms")

    def __init__(self, model, diffusion, schedule_sampler, latent_channels, sample_posterior=True,
                 precomputed=False):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler
        self.num_timesteps = diffusion.num_timesteps
        self.channels = int(latent_channels)
        self.sample_posterior = bool(sample_posterior)
        self.precomputed = bool(precomputed)

    def noise_channels(self):
        """Channels of the ``noise`` input: 2C with a posterior draw, else C."""
        return 2 * self.channels if self.sample_posterior else self.channels

    def construct(self, images, u, noise, tokens, *unused):
        t, weights = self.schedule_sampler(u)
        eps = noise[:, :self.channels] if self.sample_posterior else noise
        draw = noise[:, self.channels:] if self.sample_posterior else None
        if self.precomputed:
            z_start = self.model.latents_of_moments(images, draw)
        else:
            z_start = self.model.latents(images, draw)
        context = self.model.context(tokens)
        loss, mse, _ = self.diffusion.training_losses(self.model, z_start, t, eps, context=context)
        z_rms = ops.sqrt(mean_flat(ops.square(z_start)))
        return (loss * weights).mean(), t, loss, mse, z_rms


class AutoencoderLoss(nn.Cell):
    """The KL autoencoder's loss: ``construct(images, u, noise) -> (mean_b L_b, t = 0, L, l1, kl[, g_loss,
    d_loss, d_weight])``.

    ``noise`` [B, C, h, w] is the posterior draw n. ``l1`` is the mean absolute error per pixel (the
    sum in L divided by the pixel count, for reading), ``kl`` the per-example KL in nats. With a
    discriminator, L_b also holds example b's share of λ f L_G + L_D, and the metrics add L_G (``g_loss``),
    the hinge loss before f (``d_loss``) and λ (``d_weight``). ``u`` is unused: the step's timestep input and
    output exist so that the train step stays one graph for every objective (t is always 0, a
    single-step "schedule").

    :param autoencoder: an :class:`models.autoencoder.AutoencoderKL` (``posterior``, ``decoder``).
    :param kl_weight: w.
    :param discriminator: a :class:`models.discriminator.PatchDiscriminator`, or None for L_rec alone.
    :param disc_weight: s.
    :param disc_start: the step from which f = 1 (steps are counted by this cell, in its ``steps``).
    """

    def __init__(self, autoencoder, kl_weight, discriminator=None, disc_weight=0.5, disc_start=0):
        super().__init__()
        self.model = autoencoder
        self.kl_weight = float(kl_weight)
        self.schedule_sampler = UniformSampler(1)
        self.num_timesteps = 1
        self.discriminator = discriminator
        self.metric_names = ("l1", "kl")
        if discriminator is not None:
            self.metric_names += ("g_loss", "d_loss", "d_weight")
            self.disc_weight = float(disc_weight)
            self.disc_start = int(disc_start)
            self.steps = ms.Parameter(ms.Tensor(0, ms.int32), name="steps", requires_grad=False)

    def own_state(self):
        """name → Parameter of what this loss trains or counts besides the model (a checkpoint saves them)."""
        if self.discriminator is None:
            return {}
        state = {f"discriminator.{name}": param for name, param in self.discriminator.parameters_and_names()}
        state["steps"] = self.steps
        return state

    def construct(self, images, u, noise, *unused):
        t, _ = self.schedule_sampler(u)
        mean, logvar = self.model.posterior(images)
        z = mean + ops.exp(0.5 * logvar) * noise
        features = self.model.decoder.features(self.model.post_quant_conv(z))
        reconstruction = self.model.decoder.conv_out(features).astype(ms.float32)
        l1 = mean_flat(ops.abs(images - reconstruction))
        l1_sum = l1 * float(np.prod(images.shape[1:]))
        standard = ops.zeros_like(mean)  # the prior N(0, I): mean 0, log-variance 0
        kl = normal_kl(mean, logvar, standard, standard).sum(axis=(1, 2, 3))
        losses = l1_sum + self.kl_weight * kl
        if self.discriminator is None:
            return losses.mean(), t, losses, l1, kl
        started = (self.steps >= self.disc_start).astype(ms.float32)  # f: CompVis's adopt_weight
        started = ops.depend(started, ops.assign_add(self.steps, ops.ones((), ms.int32)))
        # the generator's term: D frozen, so its gradient reaches the autoencoder only
        g_losses = -self.discriminator(reconstruction, True).mean(axis=(1, 2, 3))
        d_weight = self.adaptive_weight(images, features)
        # D's term: the reconstruction is a constant input, so its gradient reaches D only
        real = self.discriminator(images)
        fake = self.discriminator(ops.stop_gradient(reconstruction))
        d_losses = 0.5 * (ops.relu(1.0 - real).mean(axis=(1, 2, 3)) + ops.relu(1.0 + fake).mean(axis=(1, 2, 3)))
        losses = losses + started * (d_weight * g_losses + d_losses)
        return losses.mean(), t, losses, l1, kl, g_losses, d_losses, ops.broadcast_to(d_weight, l1.shape)

    def adaptive_weight(self, images, features):
        """λ = s · clip(‖∇_{W_L} L_nll‖ / (‖∇_{W_L} L_G‖ + 1e-4), 0, 1e4), constant to the outer gradient.

        Both gradients are taken at the decoder's last weight W_L through its last convolution alone
        (the losses depend on W_L only there), from the step's own features.
        """
        conv = self.model.decoder.conv_out
        features, images = ops.stop_gradient(features.astype(ms.float32)), ops.stop_gradient(images)
        bias = ops.stop_gradient(conv.bias).reshape(1, -1, 1, 1)
        batch = images.shape[0]

        def decoded(weight):
            return ops.conv2d(features, weight, pad_mode="pad", padding=1) + bias

        def nll(weight):
            return ops.abs(images - decoded(weight)).sum() / batch

        def generator(weight):
            return -self.discriminator(decoded(weight), True).mean()

        weight = ops.stop_gradient(conv.weight)
        ratio = ops.norm(ops.grad(nll)(weight)) / (ops.norm(ops.grad(generator)(weight)) + 1e-4)
        return ops.stop_gradient(ops.clamp(ratio, 0.0, 1e4)) * self.disc_weight


# ---- the converted checkpoint a latent run writes ------------------------------------------------

def export_path(run_dir, step):
    """``<run_dir>/ldm_<step:08d>.ckpt``: the sampling checkpoint written beside ``ckpt_<step>.ckpt``."""
    return os.path.join(run_dir, f"ldm_{step:08d}.ckpt")


def export_config(parts, config):
    """The ``ldm_config`` of a run: the networks' description ``parts`` (keys ``unet``, ``vae``,
    ``text_encoder``, ``scale_factor``, ``numerics``, as :func:`mind_diffusion.convert_ldm.infer_ldm_config`
    gives them) with the process of ``config.diffusion``: its T, latent diffusion's β range (and whether
    it is rescaled to zero terminal SNR), ε or v."""
    diffusion = config.diffusion
    out = json.loads(json.dumps(parts))
    out.update(schedule=schedule_config(diffusion),
               prediction="v" if diffusion.predict_v else "eps",
               inferred=dict(heads="the training recipe", schedule="the training recipe"))
    return out


def write_export(path, state, ema, ldm_config, ema_rate=None):
    """Write a converted latent checkpoint (``python -m mind_diffusion.convert``'s format: ``unet.*``,
    ``vae.*``, ``text_encoder.*`` and ``ldm_config``), which ``run_infer.sh`` samples from.

    :param state: the model's name → Parameter (``LatentDiffusion.parameters_and_names()``).
    :param ema: the train step's :class:`~mind_diffusion.train.step.EMA` or None: the UNet's weights are
        its copy at ``ema_rate`` (default the slowest, the one sampling uses), and so are a trained text
        encoder's; the frozen parts' are their own.
    """
    weights = {name: param.asnumpy() for name, param in state.items()}
    if ema is not None:
        rate = max(ema.rates) if ema_rate is None else float(ema_rate)
        shadow = ema.shadows[ema.rates.index(rate)]
        weights.update((name, param.asnumpy()) for name, param in zip(ema.names, shadow))
    return write_export_weights(path, weights, ldm_config)


def write_export_weights(path, weights, ldm_config):
    """Write ``weights`` (name → array under the latent model's names: ``unet.*``, ``vae.*``,
    ``text_encoder.*``) with ``ldm_config`` as a converted latent checkpoint, atomically."""
    entries = [{"name": name, "data": ms.Tensor(value)} for name, value in weights.items()]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"partial_{os.path.basename(path)}")
    try:
        ms.save_checkpoint(entries, tmp, append_dict={"ldm_config": config_json(ldm_config)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
