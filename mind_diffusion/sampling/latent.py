"""Text-to-image with a latent diffusion model (Rombach et al. 2022): prompts → text states → guided
sampling of a latent → the autoencoder's decoder.

Takes the networks as Cells (this is the process layer: it never builds one):

- ``text_encoder(tokens [B, L]) -> states [B, L, D]`` (e.g. ``models.clip_text.CLIPTextEncoder``),
  run once per batch for the prompts and once for the negative prompts;
- ``unet(z_t, t, context) -> ε̂ or v̂`` (``models.latent_unet.LatentUNet``), run through
  :class:`ContextGuidance` by the scheduler's compiled graph;
- ``decoder(latent) -> image`` (``models.autoencoder.LatentDecoder``: decode(latent / scale_factor)).

Classifier-free guidance (Ho & Salimans 2021) with a negative prompt n in place of the empty one:
ε̂ = ε(z_t | n) + s (ε(z_t | c) − ε(z_t | n)), the two halves run as one batch [n; c] as CompVis
does. For a v-predicting model the same mix applies to v̂ (affine in ε̂ at fixed z_t).
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

from .schedulers import sample

__all__ = ["ContextGuidance", "text_to_image", "text_to_image_batches"]


class ContextGuidance(nn.Cell):
    """``guided(z_t, t, context=c, uncond=n)``: classifier-free guidance on precomputed text states.

    :param model: ``model(z_t, t, context) -> output`` (C channels).
    :param guidance_scale: s, a graph constant (s = 1: the conditional model alone, one model call).
    """

    def __init__(self, model, guidance_scale):
        super().__init__(auto_prefix=False)  # wrapping must not rename the model's parameters
        self.model = model
        self.guidance_scale = float(guidance_scale)

    def construct(self, x, t, context, uncond):
        if self.guidance_scale == 1.0:
            return self.model(x, t, context)
        batch = x.shape[0]
        out = self.model(ops.cat([x, x]), ops.cat([t, t]), ops.cat([uncond, context]))
        out_uncond, out_cond = out[:batch], out[batch:]
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)


def _tokens(tokenize, prompts):
    """int32 [B, L] tokens of a list of prompts (a tokenizer may also return (tokens, mask))."""
    encoded = tokenize(list(prompts))
    if isinstance(encoded, tuple):
        encoded = encoded[0]
    return ms.Tensor(np.asarray(encoded, np.int32))


def text_to_image(unet, text_encoder, tokenize, decoder, scheduler, prompts, negative_prompts=None,
                  guidance_scale=7.5, latent_shape=(4, 64, 64), seed=0, x_T=None, guided=None):
    """Images [B, 3, H, W] (about [−1, 1], not clamped) and latents [B, C, h, w] for ``prompts``.

    :param tokenize: ``tokenize(list of str) -> int tokens [B, L]`` (or ``(tokens, mask)``), e.g. a
        ``models.tokenizers`` tokenizer; the empty prompt is the default negative prompt (SD's
        unconditional context).
    :param scheduler: a :mod:`mind_diffusion.sampling.schedulers` scheduler on the model's base process,
        after ``set_timesteps`` (latent models: ``clip_denoised=False``, spacing ``"ldm"`` for CompVis's steps).
    :param latent_shape: (C, h, w) of one latent (SD 1.x at 512 px: (4, 64, 64)).
    :param seed: seeds x_T (and any sampler noise), as :func:`~mind_diffusion.sampling.schedulers.sample`.
    :param x_T: optional starting latents [B, C, h, w] instead of the seeded draw.
    :param guided: a :class:`ContextGuidance` to reuse (its compiled graphs are cached per Cell);
        by default one is made around ``unet`` at ``guidance_scale``.
    :return: (images, latents), float32 Tensors.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("text_to_image needs at least one prompt")
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts: give one per "
                         "prompt, a single string for all, or None for the empty prompt")
    context = text_encoder(_tokens(tokenize, prompts))
    uncond = text_encoder(_tokens(tokenize, negative_prompts))
    if guided is None:
        guided = ContextGuidance(unet, guidance_scale)
    latents = sample(guided, (len(prompts),) + tuple(latent_shape), scheduler, seed=seed, x_T=x_T,
                     model_kwargs={"context": context, "uncond": uncond})
    return decoder(latents), latents


def text_to_image_batches(unet, text_encoder, tokenize, decoder, scheduler, prompts, batch_size, latent_shape,
                          seed=0, guided=None, negative_prompts=None, guidance_scale=7.5):
    """Images for any number of ``prompts`` as a NumPy array [N, 3, H, W] clamped to [−1, 1], drawn by
    :func:`text_to_image` in batches of ``min(batch_size, N)``.

    Every batch has the same size (the last one is padded with copies of its last prompt and the extra
    images dropped), so one compiled graph serves them all; batch k starting at prompt ``start`` is
    seeded ``seed + start``, so a prompt's image does not depend on how many prompts follow it.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("text_to_image_batches needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(negative_prompts, str) or negative_prompts is None:
        negative_prompts = [negative_prompts or ""] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    if guided is None:
        guided = ContextGuidance(unet, guidance_scale)
    size, images = min(batch_size, len(prompts)), []
    for start in range(0, len(prompts), size):
        batch, negative = prompts[start:start + size], negative_prompts[start:start + size]
        pad = size - len(batch)
        out, _ = text_to_image(unet, text_encoder, tokenize, decoder, scheduler, batch + [batch[-1]] * pad,
                               negative_prompts=negative + [negative[-1]] * pad, latent_shape=latent_shape,
                               seed=seed + start, guided=guided)
        images.append(np.clip(out.asnumpy()[:len(batch)], -1.0, 1.0))
    return np.concatenate(images)
