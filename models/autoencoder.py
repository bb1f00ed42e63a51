"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

An image x [N, 3, H, W] in [−1, 1] is encoded to the moments of a diagonal
Gaussian posterior q(z | x) = N(μ, diag(σ²)) over latents [N, z, H/f, W/f]
(f = 2^(levels − 1)); the diffusion model works on z scaled by the
``scale_factor`` (0.18215 for Stable Diffusion: unit variance of the training
latents), and the decoder maps a latent back to an image.

The layout and every cell name follow CompVis's ``AutoencoderKL`` with
``ldm.modules.diffusionmodules.model.Encoder``/``Decoder`` (``encoder.conv_in``,
``encoder.down.<i>.block.<j>.norm1``, ``encoder.mid.attn_1.q``, ``quant_conv``,
``decoder.up.<i>.upsample.conv``, ...), so Stable Diffusion and Wukong-Huahua
``first_stage_model.*`` weights load by name (norms: gamma/beta ↔ weight/bias).
Every norm is a 32-group GroupNorm with ε = 1e-6 followed (where the reference
has one) by the swish x·sigmoid(x), fused into one cell.
"""
from mindspore import nn, ops

from mind_diffusion.kernels.dropout import Dropout
from mind_diffusion.nn import GroupNorm32, conv_nd, upsample_nearest_2x
from models.unet import _attend

__all__ = ["ResnetBlock", "AttnBlock", "Encoder", "Decoder", "AutoencoderKL", "LatentEncoder", "LatentDecoder",
           "LOGVAR_RANGE",
           "create_autoencoder"]

LOGVAR_RANGE = (-30.0, 20.0)  # CompVis clamps log σ² of the posterior to this range


def _norm(channels, silu=False):
    """GroupNorm(32, ε = 1e-6), optionally fused with the swish that follows it."""
    return GroupNorm32(32, channels, eps=1e-6, activation="silu" if silu else None)


class ResnetBlock(nn.Cell):
    """x + conv2(drop(swish(norm2(conv1(swish(norm1(x))))))), the skip a 1×1 ``nin_shortcut`` when C changes.

    (No timestep embedding: the autoencoder is not a diffusion network.) The swishes are
    fused into ``norm1``/``norm2``.
    """

    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = _norm(in_channels, silu=True)
        self.conv1 = conv_nd(2, in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, silu=True)
        self.dropout = Dropout(p=dropout)
        self.conv2 = conv_nd(2, out_channels, out_channels, 3, padding=1)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = conv_nd(2, in_channels, out_channels, 1)

    def construct(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the H·W positions with 1×1 convs ``q``, ``k``, ``v``, ``proj_out``.

    out = x + proj_out(v softmax(qᵀk / √C)ᵀ), the product run by the UNet's attention core.
    """

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q = conv_nd(2, channels, channels, 1)
        self.k = conv_nd(2, channels, channels, 1)
        self.v = conv_nd(2, channels, channels, 1)
        self.proj_out = conv_nd(2, channels, channels, 1)

    def construct(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(batch, channels, height * width)
        k = self.k(h).reshape(batch, channels, height * width)
        v = self.v(h).reshape(batch, channels, height * width)
        h = _attend(q, k, v, channels, 1).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Cell):
    """2× downsampling: zero-pad right and bottom by one, then a 3×3 convolution with stride 2 (``conv``).

    The padding is the convolution's own (top 0, bottom 1, left 0, right 1), not an ``ops.pad`` before
    it: with the separate pad, the backward graph of the autoencoder's encoder stops progressing on its
    18th call on MindSpore 2.10's CPU backend (tests/test_ldm_train.py reproduces it).
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = conv_nd(2, channels, channels, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x):
        return self.conv(x)


class Upsample(nn.Cell):
    """Nearest-neighbour 2× upsampling, then a 3×3 convolution (``conv``)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = conv_nd(2, channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(upsample_nearest_2x(x))


class _Level(nn.Cell):
    """One resolution level: ``block`` (res blocks), ``attn`` (attention after each, maybe none), and a resampler."""

    def __init__(self, blocks, attentions, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attentions)
        self.has_attention = bool(attentions)
        self.resample_name = resample_name
        if resample_name is not None:
            setattr(self, resample_name, resample)

    def construct(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if self.has_attention:
                x = self.attn[i](x)
        if self.resample_name == "downsample":
            x = self.downsample(x)
        elif self.resample_name == "upsample":
            x = self.upsample(x)
        return x


class _Middle(nn.Cell):
    """``block_1``, ``attn_1``, ``block_2`` at the lowest resolution."""

    def __init__(self, channels, dropout):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Cell):
    """Image [N, in_channels, H, W] → [N, 2·z_channels (or z_channels), H/f, W/f] (``double_z``: mean and log σ²).

    :param ch: base width; level i has ``ch · ch_mult[i]`` channels.
    :param attn_resolutions: feature-map sides (pixels) at which an :class:`AttnBlock` follows each res block.
    :param resolution: the image side the sides above refer to.
    """

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True, dropout=0.0):
        super().__init__()
        self.conv_in = conv_nd(2, in_channels, ch, 3, padding=1)
        levels, side = [], resolution
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if side in attn_resolutions:
                    attentions.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                levels.append(_Level(blocks, attentions, "downsample", Downsample(block_in)))
                side //= 2
            else:
                levels.append(_Level(blocks, attentions))
        self.down = nn.CellList(levels)
        self.mid = _Middle(block_in, dropout)
        self.norm_out = _norm(block_in, silu=True)
        self.conv_out = conv_nd(2, block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(nn.Cell):
    """Latent [N, z_channels, h, w] → image [N, out_ch, h·f, w·f]; ``up[i]`` is level i (built from the bottom)."""

    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout=0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        side = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = conv_nd(2, z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, dropout)
        levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if side in attn_resolutions:
                    attentions.append(AttnBlock(block_in))
            if level != 0:
                levels.insert(0, _Level(blocks, attentions, "upsample", Upsample(block_in)))
                side *= 2
            else:
                levels.insert(0, _Level(blocks, attentions))
        self.up = nn.CellList(levels)
        self.norm_out = _norm(block_in, silu=True)
        self.conv_out = conv_nd(2, block_in, out_ch, 3, padding=1)

    def construct(self, z):
        return self.conv_out(self.features(z))

    def features(self, z):
        """The input of ``conv_out``, the last layer (the adversarial loss's balance is measured at its weight)."""
        h = self.mid(self.conv_in(z))
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](h)
        return self.norm_out(h)


class AutoencoderKL(nn.Cell):
    """Encoder + ``quant_conv`` (posterior moments) and ``post_quant_conv`` + Decoder.

    :param ddconfig: CompVis's ``ddconfig`` (ch, out_ch, ch_mult, num_res_blocks, attn_resolutions,
        in_channels, resolution, z_channels, double_z, dropout).
    :param embed_dim: latent channels.
    :param scale_factor: the diffusion model sees ``scale_factor · z`` (:meth:`encode_latent`,
        :meth:`decode_latent`).
    """

    def __init__(self, ddconfig, embed_dim, scale_factor=1.0):
        super().__init__()
        config = dict(ddconfig)
        if not config.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z=True: the encoder emits a mean and a log-variance")
        self.embed_dim = int(embed_dim)
        self.scale_factor = float(scale_factor)
        z_channels = config["z_channels"]
        common = dict(ch=config["ch"], ch_mult=tuple(config["ch_mult"]), num_res_blocks=config["num_res_blocks"],
                      attn_resolutions=tuple(config.get("attn_resolutions", ())),
                      resolution=config["resolution"], z_channels=z_channels, dropout=config.get("dropout", 0.0))
        self.encoder = Encoder(in_channels=config["in_channels"], double_z=True, **common)
        self.decoder = Decoder(out_ch=config["out_ch"], **common)
        self.quant_conv = conv_nd(2, 2 * z_channels, 2 * self.embed_dim, 1)
        self.post_quant_conv = conv_nd(2, self.embed_dim, z_channels, 1)

    def posterior(self, x):
        """(μ, log σ²) of q(z | x), log σ² clamped to :data:`LOGVAR_RANGE`; each [N, embed_dim, h, w]."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = ops.chunk(moments, 2, axis=1)
        return mean, ops.clamp(logvar, LOGVAR_RANGE[0], LOGVAR_RANGE[1])

    def decode(self, z):
        """Image from an (unscaled) latent z."""
        return self.decoder(self.post_quant_conv(z))

    def encode_latent(self, x, noise=None):
        """The diffusion model's latent ``scale_factor · z``: z = μ, or μ + σ·noise when ``noise`` is given."""
        mean, logvar = self.posterior(x)
        return self.latent_of_posterior(mean, logvar, noise)

    def latent_of_posterior(self, mean, logvar, noise=None):
        """``scale_factor · z`` of the posterior (μ, log σ²): z = μ, or the draw μ + σ·noise."""
        z = mean if noise is None else mean + ops.exp(0.5 * logvar) * noise
        return z * self.scale_factor

    def decode_latent(self, latent):
        """Image from the diffusion model's latent: decode(latent / scale_factor) (CompVis ``decode_first_stage``)."""
        return self.decode(latent / self.scale_factor)

    def construct(self, x):
        """(μ, log σ²) of the posterior of image x."""
        return self.posterior(x)


def create_autoencoder(ddconfig, embed_dim, scale_factor=0.18215):
    """An :class:`AutoencoderKL` from CompVis's config (``ddconfig``, ``embed_dim``) and the LDM scale factor."""
    return AutoencoderKL(ddconfig, embed_dim, scale_factor)



class LatentEncoder(nn.Cell):
    """The diffusion model's latent of an image as a graph of its own: ``scale_factor · z`` with
    z = μ + σ·noise, a draw from the posterior (noise [N, embed_dim, h, w] from N(0, I)), or
    z = μ with ``noise`` None (its mode). For precomputing a latent data set.
    """

    def __init__(self, autoencoder):
        super().__init__(auto_prefix=False)
        self.autoencoder = autoencoder

    def construct(self, image, noise=None):
        return self.autoencoder.encode_latent(image, noise)


class LatentDecoder(nn.Cell):
    """The image of a latent as a graph of its own: ``decode(latent / scale_factor)`` (CompVis
    ``decode_first_stage``), or ``decode(z)`` of an unscaled latent with ``scaled=False``.

    Built with ``auto_prefix=False``: wrapping does not rename the autoencoder's parameters.
    """

    def __init__(self, autoencoder, scaled=True):
        super().__init__(auto_prefix=False)
        self.autoencoder = autoencoder
        self.scaled = bool(scaled)

    def construct(self, latent):
        if self.scaled:
            return self.autoencoder.decode_latent(latent)
        return self.autoencoder.decode(latent)
