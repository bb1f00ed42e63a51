"""Device memory per data-parallel worker for each recipe, from parameter counts and activation sizes.

    python scripts/memory_estimate.py                         # every recipe in configs/
    python scripts/memory_estimate.py configs/glide_base64.yaml --batch 4 --set model.dtype=bf16

Parameters are counted on the recipe's network as built (exact). Every worker holds
a full replica (data parallelism), so the resident training state per worker is
  weights (float32) 4P + gradients (float32) 4P + AdamW moments 8P + 4P per EMA copy,
  plus the torso's float16/bfloat16 weight casts, 2P_torso, when model.dtype is not fp32.
Activations kept for the backward pass are counted block by block from the feature-map
shapes of the network as built (the functions below say which tensors each block keeps),
times the per-worker batch (train.batch_size). The attention weights (heads × T × S per
attention block) are shown apart: FlashAttention (fp16/bf16 on Ascend) does not store them.
A classifier is walked through its encoder half and pooling head. A latent recipe's UNet is walked at the
latent size with its spatial transformers (text context of model.text_ctx tokens); its frozen autoencoder
and text encoder hold float32 weights only (no gradient, moments, EMA or kept activations), built from the
recipe's sizes without reading its checkpoints. An autoencoder recipe's activations are not estimated.

Not counted: MindSpore's workspace and memory pool fragmentation, the gradient all-reduce
fusion buffers (up to ~4P), the optimizer's temporaries, the periodic sampling graphs.
Read the total as a lower bound, leave ~20% headroom, and check on the device with
``mindspore.runtime.max_memory_allocated()``. HBM per chip: Ascend 910A 32 GB; 910B 64 GB
(910B4: 32 GB).
"""
import argparse
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GB = 1024 ** 3
HALF_DTYPES = ("fp16", "bf16")


def resblock_elements(block, pixels):
    """Elements a ResBlock keeps per sample: its input x (GroupNorm's and the skip's input), the SiLU
    input and the conv input at C_in, then at C_out the conv output (second norm's input), the norm's
    output (AdaGN's scale needs it), the SiLU input and the second conv's input."""
    kept_out = 4 if block.use_scale_shift_norm else 3
    return (3 * block.channels + kept_out * block.out_channels) * pixels


def dropout_bytes(block, pixels):
    """A ResBlock's dropout mask: one byte per element of its C_out feature map, when dropout is on."""
    dropout = [cell for cell in block.out_layers if cell.__class__.__name__ == "Dropout"]
    return block.out_channels * pixels if dropout and getattr(dropout[0], "p", 0.0) > 0 else 0


def attention_elements(block, tokens):
    """Elements an AttentionBlock keeps per sample, besides the weights: the norm's input, the qkv
    projection's input, q, k and v, and the output projection's input (C × T each; qkv is 3·C × T)."""
    return 6 * block.channels * tokens


def attention_weights(block, tokens, text_tokens):
    """Attention weights per sample: heads × T × S, S = T image tokens (+ the text tokens with encoder_kv)."""
    keys = tokens + (text_tokens if hasattr(block, "encoder_kv") else 0)
    return block.num_heads * tokens * keys


def spatial_transformer_elements(layer, tokens, context_tokens):
    """(elements, attention weights) a latent UNet's SpatialTransformer keeps per sample, T image tokens, L context
    tokens, inner width d: the GroupNorm, proj_in and proj_out inputs (2·C·T + d·T), and per transformer block the
    three LayerNorm inputs (3·d·T), self-attention's input, q, k, v and output-projection input (5·d·T),
    cross-attention's input, q and output-projection input (3·d·T) with k, v of the context (2·d·L), and GEGLU's
    input, its 8d-wide projection and the 4d-wide product (13·d·T): 24·d·T + 2·d·L; weights heads·T·(T + L)."""
    blocks = list(layer.transformer_blocks)
    inner = blocks[0].attn1.to_q.out_channels
    heads = blocks[0].attn1.heads
    elements = 2 * layer.norm.num_channels * tokens + inner * tokens
    elements += len(blocks) * (24 * inner * tokens + 2 * inner * context_tokens)
    return elements, len(blocks) * heads * tokens * (tokens + context_tokens)


def text_encoder_elements(model, config):
    """(elements, attention weights) the text transformer keeps per sample: per layer the two LayerNorm
    inputs, the qkv input and output (W, 3W), the attention output, the MLP input, hidden (4W) and GELU
    output (4W): 15·W·L; weights heads × L × L."""
    if not hasattr(model, "transformer"):
        return 0, 0
    width, length, heads, layers = (config.model.xf_width, config.model.text_ctx, config.model.xf_heads,
                                    config.model.xf_layers)
    return layers * 15 * width * length, layers * heads * length * length


def unet_activations(model, image_size, context_tokens=0):
    """(elements, dropout bytes, attention weights) kept per sample by the UNet torso and head (a classifier's
    encoder half and pooling head; a latent UNet at its latent ``image_size`` with ``context_tokens`` of text),
    walking its blocks in forward order and following the resolution through up/down-sampling."""
    from models.cross_attention import SpatialTransformer
    from models.unet import AttentionBlock, Downsample, ResBlock, Upsample
    text_tokens = getattr(model, "text_ctx", 0)
    side = image_size
    elements = dropout = weights = 0
    blocks = list(model.input_blocks) + [model.middle_block] + list(getattr(model, "output_blocks", []))
    for sequence in blocks:
        for layer in sequence.cell_list:
            pixels = side * side
            if isinstance(layer, ResBlock):
                elements += resblock_elements(layer, pixels)
                dropout += dropout_bytes(layer, pixels)
                if layer.updown:
                    side = side * 2 if isinstance(layer.h_upd, Upsample) else side // 2
            elif isinstance(layer, AttentionBlock):
                elements += attention_elements(layer, pixels)
                weights += attention_weights(layer, pixels, text_tokens)
            elif isinstance(layer, SpatialTransformer):
                kept, attention = spatial_transformer_elements(layer, pixels, context_tokens)
                elements += kept
                weights += attention
            elif isinstance(layer, Downsample):
                elements += layer.channels * pixels
                side //= 2
            elif isinstance(layer, Upsample):
                side *= 2
                elements += layer.channels * side * side  # the conv's input, after the 2× upsampling
            else:  # the input convolution
                elements += layer.in_channels * pixels
    # the output head's norm, SiLU and conv (or pooling) inputs, at the resolution the walk ended on
    head_channels = model.out[0].num_channels if hasattr(model.out[0], "num_channels") else model.out[0].in_channels
    elements += 3 * head_channels * side * side
    return elements, dropout, weights


# Vocabulary sizes of the latent text layouts' tokenizers (BERT-Chinese WordPiece; CLIP BPE), for a
# recipe whose vocabulary file is not on this machine: they size the text encoder's embedding.
LAYOUT_VOCAB = {"wukong": 21128, "hf_clip": 49408, "open_clip": 49408}


def build_network(model_cfg):
    """The recipe's network with random weights. A latent recipe's parts are built from its sizes, without
    reading its checkpoints, and its vocabulary file only when present (else the layout's usual size)."""
    from mind_diffusion.cli.factory import build_model, latent_parts
    if model_cfg.arch != "latent":
        return build_model(model_cfg)[0]
    from models.autoencoder import create_autoencoder
    from models.clip_text import CLIPTextEncoder, encoder_arguments
    from models.latent_diffusion import LatentDiffusion
    from models.latent_unet import create_latent_unet
    from models.tokenizers import tokenizer_for_layout
    if os.path.isfile(model_cfg.vocab):
        vocab = max(tokenizer_for_layout(model_cfg.text_layout, model_cfg.vocab).encoder.values()) + 1
    else:
        vocab = LAYOUT_VOCAB[model_cfg.text_layout]
    parts = latent_parts(model_cfg, vocab)
    return LatentDiffusion(create_latent_unet(**parts["unet"]),
                           create_autoencoder(parts["vae"]["ddconfig"], parts["vae"]["embed_dim"]),
                           CLIPTextEncoder(**encoder_arguments(parts["text_encoder"])), parts)


def estimate(config, batch=None):
    """A dict of parameter counts and byte counts per worker for a recipe's training."""
    import numpy as np
    from mind_diffusion.config import autoencoder_factor

    model = build_network(config.model)
    sizes = {name: int(np.prod(p.shape)) for name, p in model.parameters_and_names()}
    trained = {name: n for name, n in sizes.items() if not name.startswith(("vae.", "text_encoder."))}
    params, frozen = sum(sizes.values()), sum(sizes.values()) - sum(trained.values())
    torso = sum(n for name, n in trained.items()  # a latent model's UNet is its "unet." part
                if name.removeprefix("unet.").startswith(("input_blocks", "middle_block", "output_blocks")))
    half = config.model.dtype in HALF_DTYPES
    act_bytes = 2 if half else 4
    # The softmax runs in float32; half-precision graphs keep its output and the half-precision cast of it.
    weight_bytes = 6 if half else 4
    batch = batch or config.train.batch_size
    # The trained parameters carry gradients, AdamW moments and EMA copies; a latent model's frozen
    # autoencoder and text encoder only their float32 weights (their forward passes keep nothing: no gradient).
    state = (16 * (params - frozen) + 4 * (params - frozen) * len(config.train.ema_rate) + 4 * frozen
             + (2 * torso if half else 0))
    row = {"params": params, "torso": torso, "batch": batch, "dtype": config.model.dtype, "state": state}
    if config.model.arch == "autoencoder":  # the encoder-decoder's activations are not walked here
        return dict(row, activations=None, attention=None, total=None, total_flash=None)
    if config.model.arch == "latent":
        side = config.model.image_size // autoencoder_factor(config.model)
        unet, dropout, unet_weights = unet_activations(model.unet, side, config.model.text_ctx)
        text, text_weights = 0, 0
    else:
        unet, dropout, unet_weights = unet_activations(model, config.model.image_size)
        text, text_weights = text_encoder_elements(model, config)
    activations = batch * ((unet + text) * act_bytes + dropout)
    attention = batch * (unet_weights + text_weights) * weight_bytes
    return dict(row, activations=activations, attention=attention, total=state + activations + attention,
                total_flash=state + activations + batch * text_weights * weight_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="recipes (default: every configs/*.yaml)")
    parser.add_argument("--batch", type=int, default=None, help="per-worker batch (default: train.batch_size)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import mindspore as ms
    from mind_diffusion.config import load_config
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")  # the networks are only built, never run
    paths = args.configs or sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    print("| recipe | parameters | dtype | batch/worker | weights, grads, AdamW, EMA | activations "
          "| attention weights | total | total with FlashAttention |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        row = estimate(load_config(path, args.overrides), args.batch)
        name = os.path.splitext(os.path.basename(path))[0]
        if row["total"] is None:
            print(f"| {name} | {row['params'] / 1e6:.1f} M | {row['dtype']} | {row['batch']} | "
                  f"{row['state'] / GB:.2f} GB | not estimated (autoencoder) | — | — | — |", flush=True)
            continue
        print(f"| {name} | {row['params'] / 1e6:.1f} M | {row['dtype']} | {row['batch']} | "
              f"{row['state'] / GB:.2f} GB | {row['activations'] / GB:.2f} GB | {row['attention'] / GB:.2f} GB | "
              f"{row['total'] / GB:.1f} GB | {row['total_flash'] / GB:.1f} GB |", flush=True)


if __name__ == "__main__":
    main()
