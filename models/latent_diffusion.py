"""A latent diffusion model as one network (Rombach et al. 2022, Sec. 3): the trained UNet ε_θ(z_t, t, τ(y))
with the frozen first stage (the KL autoencoder) and the conditioning encoder τ (the text encoder), frozen
as in Stable Diffusion (pretrained CLIP) or trained jointly as in the paper's own text-to-image model
(Sec. 4.3.1: a transformer τ_θ learned with the UNet; CompVis ``cond_stage_trainable``).

:class:`LatentDiffusion` holds the three under the names ``unet``, ``vae`` and ``text_encoder`` — the
prefixes of a converted latent checkpoint (``mind_diffusion.convert_ldm.PREFIXES``) — and marks every
parameter of the frozen parts ``requires_grad=False``: the trainer's optimizer and EMA take the
trainable parameters only, so the frozen parts get no gradient, no moments and no average, while a
training checkpoint still holds them (a run is self-contained).
"""
from mindspore import nn, ops

__all__ = ["LatentDiffusion"]


class LatentDiffusion(nn.Cell):
    """``model(z_t, t, context) -> ε̂ or v̂`` (the UNet), with the frozen parts beside it.

    :param unet: a :class:`models.latent_unet.LatentUNet` (``unet(z_t, t, context)``).
    :param vae: an :class:`models.autoencoder.AutoencoderKL` (its ``scale_factor`` scales the latents).
    :param text_encoder: ``text_encoder(tokens [B, L]) -> states [B, L, D]``, e.g. a
        :class:`models.clip_text.CLIPTextEncoder`.
    :param parts: the three networks' arguments as a converted checkpoint's ``ldm_config`` describes them
        (keys ``unet``, ``vae``, ``text_encoder``, ``scale_factor``, ``numerics``), kept for the export.
    :param train_text_encoder: τ is trained with the UNet (its gradient flows from the loss through the
        context); else frozen.

    Load each part's weights before wrapping it: the wrapper prefixes its parameters' names.
    """

    def __init__(self, unet, vae, text_encoder, parts=None, train_text_encoder=False):
        super().__init__()
        self.parts = dict(parts or {})
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.train_text_encoder = bool(train_text_encoder)
        for frozen in (vae,) if self.train_text_encoder else (vae, text_encoder):
            for param in frozen.get_parameters():
                param.requires_grad = False

    def latents(self, images, noise=None):
        """z_0 = scale_factor · z of images in [−1, 1]: z = μ, or the posterior draw μ + σ·noise.

        No gradient flows back into the frozen encoder (nor is its backward pass built).
        """
        return ops.stop_gradient(self.vae.encode_latent(images, noise))

    def latents_of_moments(self, moments, noise=None):
        """z_0 of a precomputed posterior: ``moments`` [B, 2C, h, w] holds μ then log σ² (the encoder's
        output, as :mod:`mind_diffusion.data.latents` stores it); z = μ, or μ + σ·noise."""
        mean, logvar = ops.chunk(moments, 2, axis=1)
        return ops.stop_gradient(self.vae.latent_of_posterior(mean, logvar, noise))

    def context(self, tokens):
        """τ(y): the text encoder's states of token ids [B, L], float32 [B, L, D] (constant to the gradient
        unless τ is trained)."""
        states = self.text_encoder(tokens)
        return states if self.train_text_encoder else ops.stop_gradient(states)

    def construct(self, z_t, t, context):
        return self.unet(z_t, t, context)
