"""Guidance for conditional sampling.

:class:`ClassifierFreeGuidance` — Ho & Salimans 2021, "Classifier-Free Diffusion
Guidance", as used by GLIDE (Nichol et al. 2022, Sec. 2.4): one network trained
with the caption sometimes replaced by the empty caption gives both
ε(x_t | c) and ε(x_t | ∅), and sampling uses

    ε̂ = ε(x_t | ∅) + s · (ε(x_t | c) − ε(x_t | ∅))

with guidance scale s (s = 1: the conditional model, s = 0: the unconditional
one, s > 1: sharper prompt adherence at the cost of diversity).

:class:`ClassifierGuidance` — Dhariwal & Nichol 2021, "Diffusion Models Beat
GANs", Sec. 4: the scaled gradient s · ∇_{x_t} log p_φ(y | x_t) of a noisy
classifier (guided-diffusion's ``cond_fn``), which a sampler adds to the mean
(DDPM, Alg. 1: :func:`condition_mean`) or folds into ε (DDIM, Alg. 2, and every
ODE solver: :func:`condition_score`). The schedulers of
:mod:`mind_diffusion.sampling.schedulers` take it in the same graph as the model.

Both are ``nn.Cell``s built with ``auto_prefix=False``, so wrapping a model does
not rename its parameters (its checkpoints keep loading).
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops


class ClassifierFreeGuidance(nn.Cell):
    """A text-conditioned model with classifier-free guidance, called like the model itself.

    ``guided(x, t, tokens=..., mask=..., **cond)`` returns an output shaped like
    ``model(x, t, tokens=..., mask=..., **cond)``: the first ``eps_channels``
    channels are the guided ε̂, any further channels (the learned-variance
    interpolation v of improved DDPM) come from the conditional half, as in GLIDE.

    The conditional and unconditional halves run as one batch [cond; uncond] of
    size 2B through one model call in the same graph; every other conditioning
    tensor in ``cond`` (e.g. an upsampler's ``low_res``) is given to both halves.

    Args:
        model: ``model(x, t, tokens, mask, **cond) -> [B, C_out, H, W]``, e.g.
            :class:`models.glide.Text2ImUNet`.
        guidance_scale: s. A Python float fixed at construction, so it is a graph
            constant; build another wrapper (same model) for another scale.
        uncond_tokens, uncond_mask: the empty-caption tokens [1, L] or [L] and
            their mask, e.g. ``ByteTokenizer(L).unconditional(1)``.
        eps_channels: how many leading output channels are the prediction (3 for
            RGB images, 4 for a latent-diffusion latent). For a v- or x_0-predicting
            network the same mix applies to v̂ or x̂_0: at a fixed x_t each of them is
            an affine function of ε̂, so mixing them equals mixing ε̂.
    """

    def __init__(self, model, guidance_scale, uncond_tokens, uncond_mask, eps_channels=3):
        super().__init__(auto_prefix=False)
        self.model = model
        self.guidance_scale = float(guidance_scale)
        # shaped in numpy: eager Tensor.reshape fails in MindSpore 2.10 under NumPy 2
        self.uncond_tokens = ms.Tensor(np.asarray(uncond_tokens, np.int32).reshape(1, -1))
        self.uncond_mask = ms.Tensor(np.asarray(uncond_mask, np.bool_).reshape(1, -1))
        self.eps_channels = eps_channels

    def construct(self, x, t, tokens, mask, **cond):
        batch = x.shape[0]
        both_tokens = ops.cat([tokens.astype(ms.int32), ops.tile(self.uncond_tokens, (batch, 1))])
        both_mask = ops.cat([mask.astype(ms.bool_), ops.tile(self.uncond_mask, (batch, 1))])
        both_cond = {}
        for name, value in cond.items():
            both_cond[name] = ops.cat([value, value])
        out = self.model(ops.cat([x, x]), ops.cat([t, t]), both_tokens, both_mask, **both_cond)
        cond_out, uncond_out = out[:batch], out[batch:]
        eps_cond = cond_out[:, : self.eps_channels]
        eps_uncond = uncond_out[:, : self.eps_channels]
        eps = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        if out.shape[1] == self.eps_channels:
            return eps
        return ops.cat([eps, cond_out[:, self.eps_channels:]], axis=1)


def condition_mean(mean, variance, gradient):
    """μ + Σ · g: the mean of p_θ(x_{t−1} | x_t) shifted by the scaled classifier gradient
    g = s ∇_{x_t} log p_φ(y | x_t), with Σ = Σ_θ(x_t, t) (Dhariwal & Nichol 2021, Alg. 1).

    The ancestral draw μ + σ z is affine in μ, so the same shift applies to a drawn x_{t−1}.
    """
    return mean + variance * gradient


def condition_score(eps, sqrt_one_minus_alpha_bar, gradient):
    """ε̂ − √(1 − ᾱ_t) · g, the noise prediction of the score of p(x_t) p_φ(y | x_t)^s
    (Dhariwal & Nichol 2021, Eq. 14 and Alg. 2), for DDIM and every other ODE solver."""
    return eps - sqrt_one_minus_alpha_bar * gradient


class ClassifierGuidance(nn.Cell):
    """Classifier guidance gradient: ``guide(x, t, y) = s · ∇_x log softmax(classifier(x, t))[y]``.

    Args:
        classifier: ``classifier(x, t) -> logits [B, num_classes]``, e.g. the ADM
            noisy classifier.
        classifier_scale: s (guided-diffusion's ``--classifier_scale``).

    construct(x [B, C, H, W], t [B], y int [B]) -> gradient shaped like x (float32).
    Load the classifier's weights before wrapping it: its parameters are renamed
    (:attr:`PARAMETER_PREFIX`).
    ``inputs`` names the conditioning tensors it reads after (x, t), in order (the
    sampling loop hands it those of its ``cond_kwargs``).
    """

    inputs = ("y",)
    # The classifier shares parameter names with the diffusion network it guides (both are ADM
    # encoders: time_embed.0.weight, input_blocks.0.0.weight, ...), and one graph holds both, where
    # names must be unique: the classifier's get this prefix (once, however often it is wrapped).
    PARAMETER_PREFIX = "classifier."

    def __init__(self, classifier, classifier_scale):
        super().__init__(auto_prefix=False)
        for param in classifier.get_parameters():
            if not param.name.startswith(self.PARAMETER_PREFIX):
                param.name = self.PARAMETER_PREFIX + param.name
        self.classifier = classifier
        self.classifier_scale = float(classifier_scale)
        self.grad_x = ops.GradOperation()

    def log_prob_of_labels(self, x, t, y):
        """Σ_b log p_φ(y_b | x_b, t_b); its gradient w.r.t. x is per sample since samples are independent."""
        logits = self.classifier(x, t).astype(ms.float32)
        log_probs = ops.log_softmax(logits, -1)
        picked = ops.gather_elements(log_probs, 1, y.astype(ms.int32).reshape(-1, 1))
        return picked.sum()

    def construct(self, x, t, y):
        x = x.astype(ms.float32)
        return self.grad_x(self.log_prob_of_labels)(x, t, y) * self.classifier_scale
