"""Latent diffusion speed on CPU (or a device): the latent UNet's forward at 4×64×64 latents (SD at 512 px),
the autoencoder's decode of such a latent, one whole guided text-to-image sample, and the autoencoder's
patch discriminator (forward + backward, batch 16 at 32×32) on the project's convolution kernels beside
MindSpore's.

The networks have Stable Diffusion 1.x's layout — UNet multipliers 1,2,4,4 with 2 residual blocks, spatial
transformers (depth 1, 8 heads, 1×1-conv projections) at downsample rates 1, 2, 4; the 8× KL autoencoder
(multipliers 1,2,4,4, 2 blocks); a 77-token CLIP-layout text encoder — with the widths scaled down so the
whole bench runs in a minute or two on 2 CPU cores: by default UNet width 64 (SD: 320), context and text
width 256 in 2 layers (SD: 768 in 12), autoencoder width 32 (SD: 128). Pass ``--sd1`` for SD 1.x's own
sizes (minutes per UNet call on a small CPU). Weights are random: speed does not depend on them.

Prints the median time of each part in ms (after a first, compiling call) and the process's peak resident
memory after each part.

    python bench/ldm_speed.py [--latent 64] [--steps 10] [--repeats 3] [--sd1] [--device CPU]
"""
import argparse
import os
import resource
import statistics
import time

import mindspore as ms
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "configs", "demo_vocab.txt")  # the tokenizer's file; its size does not matter here


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="CPU", help="MindSpore device target (default: %(default)s)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 512-px images; default %(default)s)")
    parser.add_argument("--width", type=int, default=64, help="UNet base width (SD 1.x: 320; default %(default)s)")
    parser.add_argument("--text-width", type=int, default=256,
                        help="text encoder width = the UNet's context width (SD 1.x: 768; default %(default)s)")
    parser.add_argument("--text-layers", type=int, default=2, help="text encoder layers (SD 1.x: 12)")
    parser.add_argument("--ae-width", type=int, default=32, help="autoencoder base width (SD 1.x: 128)")
    parser.add_argument("--sd1", action="store_true", help="SD 1.x's own sizes (overrides the four above)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps of the text-to-image run (PLMS)")
    parser.add_argument("--scale", type=float, default=7.5, help="guidance scale (≠ 1: two UNet halves per step)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per part after the first (median)")
    args = parser.parse_args(argv)
    if args.sd1:
        args.width, args.text_width, args.text_layers, args.ae_width = 320, 768, 12, 128
    for name in ("latent", "width", "text_width", "text_layers", "ae_width", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.latent % 8:
        parser.error("--latent must be a multiple of 8 (the UNet halves it three times)")
    if args.width % 32 or args.ae_width % 32:
        parser.error("--width and --ae-width must be multiples of 32 (GroupNorm's 32 groups)")
    if args.text_width % 8:
        parser.error("--text-width must be a multiple of 8 (8 heads)")
    return args


def build(args):
    """(unet, autoencoder, text encoder, tokenizer): SD 1.x's layout at the chosen widths."""
    from models.autoencoder import create_autoencoder
    from models.clip_text import CLIPTextEncoder
    from models.latent_unet import create_latent_unet
    from models.tokenizers import WordPieceTokenizer

    tokenizer = WordPieceTokenizer(VOCAB)
    unet = create_latent_unet(image_size=args.latent, in_channels=4, out_channels=4, model_channels=args.width,
                              attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                              num_heads=8, transformer_depth=1, context_dim=args.text_width)
    ddconfig = dict(double_z=True, z_channels=4, resolution=8 * args.latent, in_channels=3, out_ch=3,
                    ch=args.ae_width, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = create_autoencoder(ddconfig, 4)
    text = CLIPTextEncoder(vocab_size=tokenizer.n_vocab, context_length=77, width=args.text_width,
                           layers=args.text_layers, heads=8)
    for network in (unet, vae, text):
        network.set_train(False)
    return unet, vae, text, tokenizer


def timed(label, call, repeats):
    """Run ``call`` once (compiling) and ``repeats`` times; print and return the median in ms."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    median = statistics.median(times) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{label:<52s} {median:10.1f} ms  (first call {first:6.1f} s; peak RSS so far {peak:,.0f} MiB)", flush=True)
    return median


def main(argv=None):
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device)
    from mind_diffusion.sampling.latent import ContextGuidance, text_to_image
    from mind_diffusion.sampling.schedulers import create_scheduler
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    from models.autoencoder import LatentDecoder

    unet, vae, text, tokenizer = build(args)
    count = {name: sum(int(np.prod(p.shape)) for p in net.get_parameters())
             for name, net in (("UNet", unet), ("autoencoder", vae), ("text encoder", text))}
    print(f"SD 1.x layout, UNet width {args.width}, context/text width {args.text_width} × {args.text_layers} layers, "
          f"autoencoder width {args.ae_width}; parameters: "
          + ", ".join(f"{name} {n / 1e6:.1f} M" for name, n in count.items()))
    side = args.latent
    rng = np.random.default_rng(0)
    z = ms.Tensor(rng.standard_normal((1, 4, side, side)).astype(np.float32))
    t = ms.Tensor(np.array([500.0], np.float32))
    context = text(ms.Tensor(tokenizer(["一只猫"])[0]))
    timed(f"UNet forward, 1×4×{side}×{side}", lambda: unet(z, t, context).asnumpy(), args.repeats)
    decoder = LatentDecoder(vae)
    timed(f"autoencoder decode → 1×3×{8 * side}×{8 * side}", lambda: decoder(z).asnumpy(), args.repeats)
    scheduler = create_scheduler("plms", create_ldm_diffusion(), clip_denoised=False).set_timesteps(args.steps, "ldm")
    guided = ContextGuidance(unet, args.scale)

    def sample():
        images, _ = text_to_image(unet, text, tokenizer, decoder, scheduler, ["一只猫"], guidance_scale=args.scale,
                                  latent_shape=(4, side, side), seed=0, guided=guided)
        images.asnumpy()
    timed(f"text-to-image, PLMS {args.steps} steps, scale {args.scale:g}", sample, max(1, args.repeats // 3))
    discriminator_speed(args.repeats)


def discriminator_speed(repeats, batch=16, side=32):
    """The autoencoder's patch discriminator (CompVis's c = 64, L = 3), forward + backward of its weights,
    on the project's oneDNN convolution kernels and on MindSpore's ``ops.conv2d``, side by side."""
    from mindspore import nn
    from mind_diffusion.kernels import conv as conv_kernels
    from models.discriminator import PatchDiscriminator

    class Mean(nn.Cell):
        def __init__(self, disc):
            super().__init__()
            self.disc = disc

        def construct(self, x):
            return self.disc(x).mean()

    x = ms.Tensor(np.random.default_rng(1).uniform(-1, 1, (batch, 3, side, side)).astype(np.float32))
    previous = os.environ.get(conv_kernels.ENV_SWITCH)
    for switch, label in (("1", "oneDNN kernels"), ("0", "ops.conv2d")):
        os.environ[conv_kernels.ENV_SWITCH] = switch  # read when the discriminator is built
        disc = PatchDiscriminator(3, 64, 3)
        if switch == "1" and disc.fast_ops[0] is None:
            print(f"{'patch discriminator':<52s} oneDNN kernels unavailable: {conv_kernels.status()[1]}")
            continue
        step = ms.value_and_grad(Mean(disc), None, disc.trainable_params())
        timed(f"discriminator fwd+bwd {batch}×3×{side}×{side}, {label}", lambda: step(x)[0].asnumpy(), repeats)
    if previous is None:
        os.environ.pop(conv_kernels.ENV_SWITCH)
    else:
        os.environ[conv_kernels.ENV_SWITCH] = previous


if __name__ == "__main__":
    main()
