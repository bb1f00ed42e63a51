"""The Gaussian diffusion process of DDPM and improved DDPM, as graph-ready MindSpore code.

References: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM);
Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
(learned Σ_θ, hybrid loss, respacing); Song et al. 2021, "Denoising Diffusion
Implicit Models" (DDIM); Salimans & Ho 2022, "Progressive Distillation for
Fast Sampling of Diffusion Models" (v-prediction).

One :class:`GaussianDiffusion` owns a process: its schedule constants are
computed once in float64 and held as float32 Tensors, and every method is plain
tensor code, so it can be called from inside a compiled ``construct``. Methods
named ``*_from_output`` take the network's output as an argument; the others
call the network themselves. A respaced process (fewer steps, same ᾱ at the
kept steps) is the same class with a ``timestep_map`` from its steps to the
steps the network was trained on.
"""
import enum

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from . import schedules
from .losses import NATS_PER_BIT, discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(str, enum.Enum):
    """What the network predicts for the mean of p_θ(x_{t-1} | x_t)."""

    PREVIOUS_X = "previous_x"  # μ_θ itself
    START_X = "start_x"        # x_0
    EPSILON = "epsilon"        # ε, the noise in x_t (DDPM's choice)
    VELOCITY = "velocity"      # v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022)


class ModelVarType(str, enum.Enum):
    """How Σ_θ(x_t, t) is chosen (improved DDPM, Sec. 3.1)."""

    FIXED_SMALL = "fixed_small"      # σ_t² = β̃_t, the posterior variance
    FIXED_LARGE = "fixed_large"      # σ_t² = β_t, except posterior_variance[1] at index 0 (improved DDPM)
    LEARNED = "learned"              # the network outputs log σ_t² directly
    LEARNED_RANGE = "learned_range"  # the network outputs v: log σ² = v log β + (1 − v) log β̃


class LossType(str, enum.Enum):
    """Training objective."""

    MSE = "mse"                    # L_simple (+ L_vlb when Σ is learned)
    RESCALED_MSE = "rescaled_mse"  # L_hybrid = L_simple + λ L_vlb, λ = 0.001 (VB scaled by T/1000)
    KL = "kl"                      # L_vlb in bits/dim
    RESCALED_KL = "rescaled_kl"    # L_vlb · T, the bound summed over t rather than averaged


def _as_enum(enum_cls, value):
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{enum_cls.__name__}: {value!r} is not one of {allowed}") from None


class GaussianDiffusion(nn.Cell):
    """A diffusion process q(x_{1:T} | x_0) and the model-side computations on it.

    :param betas: β_1..β_T (float64 array, values in (0, 1), at least 2 of them).
    :param model_mean_type: a :class:`ModelMeanType` (or its string value).
    :param model_var_type: a :class:`ModelVarType` (or its string value).
    :param loss_type: a :class:`LossType` (or its string value).
    :param rescale_timesteps: feed the network t·1000/T_original as a float, so
        that the network's time input lies in [0, 1000) whatever T is.
    :param timestep_map: for a respaced process, the original step index of each
        of its steps (what the network sees); ``None`` for the identity.
    :param original_num_steps: T of the process the network was trained on
        (defaults to ``len(betas)``).
    """

    def __init__(self, betas, model_mean_type=ModelMeanType.EPSILON,
                 model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
                 rescale_timesteps=False, timestep_map=None, original_num_steps=None):
        super().__init__()
        betas = schedules.check_betas(betas)
        if betas.shape[0] < 2:
            raise ValueError("a diffusion process needs at least 2 steps (β̃ at t = 0 is borrowed from t = 1)")
        self.model_mean_type = _as_enum(ModelMeanType, model_mean_type)
        self.model_var_type = _as_enum(ModelVarType, model_var_type)
        self.loss_type = _as_enum(LossType, loss_type)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.num_timesteps = int(betas.shape[0])
        self.original_num_steps = int(original_num_steps or self.num_timesteps)
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map needs one entry per step ({self.num_timesteps}), "
                             f"got shape {timestep_map.shape}")

        # Plain strings for graph-mode branches (resolved at compile time).
        self._mean = self.model_mean_type.value
        self._var = self.model_var_type.value
        self._loss = self.loss_type.value
        self._learned_sigma = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        self._vb_scale = self.num_timesteps / 1000.0

        self.schedule = self._schedule_arrays(betas, timestep_map)
        # Constants are computed in float64 and rounded once to float32 (as the
        # reference implementation does when it gathers them). They are stored
        # as [T, 1, 1, 1], so one gather yields a coefficient that broadcasts
        # over an image batch: sampling steps are short, and on CPU every extra
        # kernel (a reshape per coefficient) is a visible share of one.
        for name, values in self.schedule.items():
            if name != "timestep_map":
                setattr(self, name, ms.Tensor(values.reshape(-1, 1, 1, 1), ms.float32))
        self.nonzero_mask = ms.Tensor((np.arange(self.num_timesteps) > 0).reshape(-1, 1, 1, 1), ms.float32)
        time_scale = 1000.0 / self.original_num_steps if self.rescale_timesteps else 1.0
        self.model_time = ms.Tensor(timestep_map * time_scale, ms.float32)

    @staticmethod
    def _schedule_arrays(betas, timestep_map):
        """Every per-step constant of the process, in float64 (Ho et al. 2020, Eqs. 4, 6-7)."""
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
        # β̃_t, the variance of q(x_{t-1} | x_t, x_0).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃_0 = 0 would give log 0: use β̃_1 there, as improved DDPM does.
        posterior_variance_floor = np.append(posterior_variance[1], posterior_variance[1:]) \
            if len(posterior_variance) > 1 else posterior_variance
        fixed_large_variance = np.append(posterior_variance[1], betas[1:]) \
            if len(betas) > 1 else betas
        return {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "alphas_cumprod_next": alphas_cumprod_next,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(posterior_variance_floor),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            "fixed_large_variance": fixed_large_variance,
            "fixed_large_log_variance": np.log(fixed_large_variance),
            "timestep_map": timestep_map,
        }

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _extract(values, t, ndim):
        """values[t] for each example, shaped [B, 1, ..., 1] to broadcast over an ndim-D batch."""
        picked = ops.gather(values, t, 0)
        if ndim == 4:
            return picked
        return picked.reshape((-1,) + (1,) * (ndim - 1))

    def model_timesteps(self, t):
        """The time input the network sees for step indices t: the original step, optionally ×1000/T.

        Always float32 (improved-diffusion passes integer steps when not
        rescaling; our networks embed t as a float either way).
        """
        return ops.gather(self.model_time, t, 0)

    def split_output(self, model_output, channels):
        """Split a network output into (mean part, variance part); the latter is None for a fixed Σ."""
        if self._learned_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    # --------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
        variance = self._extract(self.one_minus_alphas_cumprod, t, x_start.ndim)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.ndim)
        return mean, ops.broadcast_to(variance, x_start.shape), ops.broadcast_to(log_variance, x_start.shape)

    def q_sample(self, x_start, t, noise):
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0) (DDPM, Eq. 4)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped at t = 0) of q(x_{t-1} | x_t, x_0) (DDPM, Eqs. 6-7)."""
        ndim = x_t.ndim
        mean = (self._extract(self.posterior_mean_coef1, t, ndim) * x_start
                + self._extract(self.posterior_mean_coef2, t, ndim) * x_t)
        variance = ops.broadcast_to(self._extract(self.posterior_variance, t, ndim), x_t.shape)
        log_variance = ops.broadcast_to(self._extract(self.posterior_log_variance_clipped, t, ndim), x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------ reparametrisations

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """ε̂ = (x_t / √ᾱ_t − x̂_0) / √(1/ᾱ_t − 1), the noise implied by a predicted x_0."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def predict_xstart_from_v(self, x_t, t, v):
        """x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v̂, from a predicted velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)

    def velocity(self, x_start, t, noise):
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, Sec. 4).

        Its squared error is the ε error plus the x_0 error: ‖v − v̂‖² = ‖ε − ε̂‖² + ‖x_0 − x̂_0‖²,
        so unlike L_simple it keeps weight on x_0 at high noise, where ε hardly depends on it.
        """
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start)

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        """x̂_0 from a predicted posterior mean μ̃_t, by inverting μ̃ = c1 x_0 + c2 x_t."""
        coef1 = self._extract(self.posterior_mean_coef1, t, x_t.ndim)
        coef2 = self._extract(self.posterior_mean_coef2, t, x_t.ndim)
        return xprev / coef1 - coef2 / coef1 * x_t

    # -------------------------------------------------------- reverse process

    def model_variance(self, var_values, x, t):
        """Σ_θ(x_t, t) as (variance, log-variance) for this process's variance type."""
        ndim = x.ndim
        if self._var == "learned":
            log_variance = var_values
        elif self._var == "learned_range":
            # v ∈ [−1, 1] interpolates in log space between β̃_t and β_t (improved DDPM, Eq. 15).
            min_log = self._extract(self.posterior_log_variance_clipped, t, ndim)
            max_log = self._extract(self.log_betas, t, ndim)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif self._var == "fixed_large":
            log_variance = ops.broadcast_to(self._extract(self.fixed_large_log_variance, t, ndim), x.shape)
            return ops.broadcast_to(self._extract(self.fixed_large_variance, t, ndim), x.shape), log_variance
        else:
            log_variance = ops.broadcast_to(self._extract(self.posterior_log_variance_clipped, t, ndim), x.shape)
            return ops.broadcast_to(self._extract(self.posterior_variance, t, ndim), x.shape), log_variance
        return ops.exp(log_variance), log_variance

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True):
        """p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ) from a network output.

        :param model_output: the network's output for (x_t, t): the mean part
            (ε, x_0, v or μ, by the mean type) followed, when Σ is learned, by the
            variance part on as many channels again.
        :param clip_denoised: clip x̂_0 to [−1, 1] before using it for μ_θ.
        :return: (mean, variance, log_variance, pred_xstart).
        """
        mean_output, var_values = self.split_output(model_output, x.shape[1])
        variance, log_variance = self.model_variance(var_values, x, t)

        if self._mean == "previous_x":
            pred_xstart = self._clip(self.predict_xstart_from_xprev(x, t, mean_output), clip_denoised)
            mean = mean_output
        else:
            if self._mean == "start_x":
                pred_xstart = self._clip(mean_output, clip_denoised)
            elif self._mean == "velocity":
                pred_xstart = self._clip(self.predict_xstart_from_v(x, t, mean_output), clip_denoised)
            else:
                pred_xstart = self._clip(self.predict_xstart_from_eps(x, t, mean_output), clip_denoised)
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return mean, variance, log_variance, pred_xstart

    @staticmethod
    def _clip(x, clip_denoised):
        if clip_denoised:
            return ops.clamp(x, -1.0, 1.0)
        return x

    def p_mean_variance(self, model, x, t, clip_denoised=True, **model_kwargs):
        """p_mean_variance_from_output for ``model(x, t_model, **model_kwargs)``."""
        return self.p_mean_variance_from_output(model(x, self.model_timesteps(t), **model_kwargs),
                                                x, t, clip_denoised)

    # ------------------------------------------------------------ sampling

    def _nonzero_mask(self, t, ndim):
        """1 where t > 0, 0 at the last step (which adds no noise)."""
        return self._extract(self.nonzero_mask, t, ndim)

    def p_sample_from_output(self, model_output, x, t, noise, clip_denoised=True):
        """One ancestral step x_{t-1} = μ_θ + σ_t z (DDPM, Algorithm 2); returns (x_{t-1}, x̂_0)."""
        mean, _, log_variance, pred_xstart = self.p_mean_variance_from_output(model_output, x, t, clip_denoised)
        sample = mean + self._nonzero_mask(t, x.ndim) * ops.exp(0.5 * log_variance) * noise
        return sample, pred_xstart

    def ddim_sample_from_output(self, model_output, x, t, noise, eta=0.0, clip_denoised=True):
        """One DDIM step (Song et al. 2021, Eq. 12); eta = 0 is deterministic, 1 matches DDPM's σ.

        x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z, with
        σ_t = η √((1 − ᾱ_{t-1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t-1}). Returns (x_{t-1}, x̂_0).
        """
        _, _, _, pred_xstart = self.p_mean_variance_from_output(model_output, x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self._extract(self.alphas_cumprod, t, x.ndim)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.ndim)
        sigma = (eta * ops.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
                 * ops.sqrt(1.0 - alpha_bar / alpha_bar_prev))
        mean = (pred_xstart * ops.sqrt(alpha_bar_prev)
                + ops.sqrt(1.0 - alpha_bar_prev - sigma * sigma) * eps)
        return mean + self._nonzero_mask(t, x.ndim) * sigma * noise, pred_xstart

    def ddim_reverse_sample_from_output(self, model_output, x, t, clip_denoised=True):
        """One deterministic DDIM step up the chain, x_t → x_{t+1} (the ODE run backwards, for inversion)."""
        _, _, _, pred_xstart = self.p_mean_variance_from_output(model_output, x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar_next = self._extract(self.alphas_cumprod_next, t, x.ndim)
        return pred_xstart * ops.sqrt(alpha_bar_next) + ops.sqrt(1.0 - alpha_bar_next) * eps, pred_xstart

    # -------------------------------------------------------------- losses

    def vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, clip_denoised=False):
        """The bound's term at t, in bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for
        t > 0 and the decoder NLL L_0 = −log p_θ(x_0 | x_1) at t = 0. Returns (term [B], x̂_0)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, _, log_variance, pred_xstart = self.p_mean_variance_from_output(
            model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / NATS_PER_BIT
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=mean, log_scales=0.5 * log_variance)) / NATS_PER_BIT
        return ops.where(t == 0, decoder_nll, kl), pred_xstart

    def training_losses_from_output(self, model_output, x_start, x_t, t, noise):
        """Per-example training loss for a network output at (x_t, t), x_t = q_sample(x_0, t, ε).

        mse / rescaled_mse: L_simple = ‖target − output‖² averaged over pixels,
        target ε, x_0, v or μ̃ by the mean type; with a learned Σ the bound's term is
        added, computed with the mean part stop-gradiented so that L_vlb trains
        only Σ (improved DDPM, Sec. 3.1), and for rescaled_mse scaled by T/1000
        (λ = 0.001 at T = 1000). kl / rescaled_kl: the bound's term (× T for rescaled).

        :return: (loss, mse, vb), each [B]; a part that does not apply is 0.
        """
        zeros = ops.zeros((x_start.shape[0],), ms.float32)
        if self._loss in ("kl", "rescaled_kl"):
            vb, _ = self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, False)
            if self._loss == "rescaled_kl":
                vb = vb * self.num_timesteps
            return vb, zeros, vb

        mean_output, var_values = self.split_output(model_output, x_start.shape[1])
        if self._mean == "previous_x":
            target, _, _ = self.q_posterior_mean_variance(x_start, x_t, t)
        elif self._mean == "start_x":
            target = x_start
        elif self._mean == "velocity":
            target = self.velocity(x_start, t, noise)
        else:
            target = noise
        mse = mean_flat(ops.square(target - mean_output))
        if not self._learned_sigma:
            return mse, mse, zeros
        frozen = ops.concat((ops.stop_gradient(mean_output), var_values), axis=1)
        vb, _ = self.vb_terms_bpd_from_output(frozen, x_start, x_t, t, False)
        if self._loss == "rescaled_mse":
            vb = vb * self._vb_scale
        return mse + vb, mse, vb

    def training_losses(self, model, x_start, t, noise, **model_kwargs):
        """Draw x_t ~ q(x_t | x_0) with the given ε, run ``model`` and return (loss, mse, vb), each [B]."""
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **model_kwargs)
        return self.training_losses_from_output(model_output, x_start, x_t, t, noise)

    def prior_bpd(self, x_start):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example; no parameters, ~0 for a good schedule."""
        t = ops.fill(ms.int32, (x_start.shape[0],), self.num_timesteps - 1)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        standard = ops.zeros_like(mean)
        return mean_flat(normal_kl(mean, log_variance, standard, standard)) / NATS_PER_BIT

    # ------------------------------------------------------------ respacing

    def respace(self, spec):
        """The process restricted to the steps kept by ``spec`` (see :func:`schedules.space_timesteps`).

        The kept steps keep their ᾱ_t, the network keeps seeing the original
        step indices, and the loss / variance types carry over. Respacing a
        respaced process is not supported: respace the original one.
        """
        if self.num_timesteps != self.original_num_steps:
            raise ValueError("this process is already respaced; respace the original process instead")
        kept = schedules.space_timesteps(self.num_timesteps, spec)
        alphas_cumprod = self.schedule["alphas_cumprod"]
        return GaussianDiffusion(
            schedules.respace_betas(alphas_cumprod, kept),
            model_mean_type=self.model_mean_type, model_var_type=self.model_var_type,
            loss_type=self.loss_type, rescale_timesteps=self.rescale_timesteps,
            timestep_map=kept, original_num_steps=self.num_timesteps)


def create_diffusion(steps=1000, noise_schedule="linear", betas=None, learn_sigma=False,
                     sigma_small=False, predict_xstart=False, predict_v=False, loss="mse",
                     rescale_timesteps=False, timestep_respacing=""):
    """A :class:`GaussianDiffusion` from the recipe-level choices of improved DDPM.

    :param steps: T.
    :param noise_schedule: ``"linear"`` or ``"cosine"``; ignored when ``betas`` is given.
    :param betas: user-given β_1..β_T (overrides ``steps`` and ``noise_schedule``).
    :param learn_sigma: the network predicts Σ too (learned_range); else fixed
        β̃_t (``sigma_small``) or β_t.
    :param predict_xstart: the network predicts x_0 instead of ε.
    :param predict_v: the network predicts v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 instead of ε.
    :param loss: a :class:`LossType` value.
    :param timestep_respacing: a respacing spec (``"50"``, ``"ddim25"``, ...) or "" for all T steps.
    """
    if predict_xstart and predict_v:
        raise ValueError("predict_xstart and predict_v both set: the network predicts one of x_0 and v")
    if betas is None:
        betas = schedules.get_named_beta_schedule(noise_schedule, steps)
    mean_type = ModelMeanType.EPSILON
    if predict_xstart:
        mean_type = ModelMeanType.START_X
    elif predict_v:
        mean_type = ModelMeanType.VELOCITY
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    diffusion = GaussianDiffusion(
        betas,
        model_mean_type=mean_type,
        model_var_type=var_type, loss_type=loss, rescale_timesteps=rescale_timesteps)
    if timestep_respacing:
        diffusion = diffusion.respace(timestep_respacing)
    return diffusion
