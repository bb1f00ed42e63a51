"""scripts/memory_estimate.py against a count by hand of configs/tiny.yaml's network (see the derivation below)."""
import importlib.util
import os

import numpy as np

from mind_diffusion.cli.factory import build_model
from mind_diffusion.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(path):
    """The module a script file defines (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory_estimate = _load_script(os.path.join(ROOT, "scripts", "memory_estimate.py"))


def test_tiny_recipe_by_hand():
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    m = config.model
    assert (m.image_size, m.num_channels, m.channel_mult, m.num_res_blocks, m.attention_resolutions,
            m.num_head_channels, m.text_ctx, m.xf_width, m.xf_layers, m.xf_heads, m.dtype) == \
        (16, 32, [1, 2], 1, [8], 32, 64, 32, 1, 2, "fp32"), "the derivation below is for these settings"
    k = 4 if m.use_scale_shift_norm else 3  # C_out maps a ResBlock keeps
    p0, p1 = 16 * 16, 8 * 8  # pixels at level 0 and (after the one downsampling) level 1

    def res(c_in, c_out, pixels):
        return (3 * c_in + k * c_out) * pixels

    attention = 6 * 64 * p1  # every attention block is at level 1, 64 channels
    unet = (3 * p0 + res(32, 32, p0) + 32 * p0                      # input conv, level-0 block, downsample
            + res(32, 64, p1) + attention                            # level-1 block
            + 2 * res(64, 64, p1) + attention                        # middle
            + res(64 + 64, 64, p1) + attention + res(64 + 32, 64, p1) + attention + 64 * p0  # decoder level 1, upsample
            + res(64 + 32, 32, p0) + res(32 + 32, 32, p0)           # decoder level 0 (skips of 32 channels)
            + 3 * 32 * p0)                                           # output head
    text = 15 * 32 * 64                                              # one transformer layer, W = 32, L = 64
    weights = 4 * (64 // 32) * p1 * (p1 + 64) + 2 * 64 * 64         # 4 blocks × 2 heads × T × (T + text), text self-attention

    model, _ = build_model(m)
    params = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    row = memory_estimate.estimate(config)
    batch = config.train.batch_size
    assert row["params"] == params and row["batch"] == batch
    assert row["state"] == 16 * params + 4 * params * len(config.train.ema_rate)
    assert row["activations"] == batch * (unet + text) * 4
    assert row["attention"] == batch * weights * 4
    assert row["total_flash"] == row["state"] + row["activations"] + batch * 2 * 64 * 64 * 4


def test_half_precision_counts_two_bytes_and_the_weight_casts():
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["model.dtype=bf16"])
    full = memory_estimate.estimate(load_config(os.path.join(ROOT, "configs", "tiny.yaml")))
    half = memory_estimate.estimate(config)
    assert half["activations"] * 2 == full["activations"]
    assert half["attention"] * 4 == full["attention"] * 6  # float32 softmax output plus its half cast
    assert half["state"] == full["state"] + 2 * half["torso"] and 0 < half["torso"] < half["params"]


def test_a_latent_recipes_frozen_parts_hold_weights_only():
    """The trained UNet carries 16 bytes per parameter (weights, gradients, AdamW's moments) and 4 per EMA copy;
    the frozen autoencoder and text encoder 4 (their weights) — counted here from requires_grad, which the
    latent model sets on its frozen parts, not from their names as the script does."""
    config = load_config(os.path.join(ROOT, "configs", "ldm_demo.yaml"), ["model.autoencoder_from=''"])
    row = memory_estimate.estimate(config)
    model = memory_estimate.build_network(config.model)
    trained = sum(int(np.prod(p.shape)) for p in model.get_parameters() if p.requires_grad)
    frozen = sum(int(np.prod(p.shape)) for p in model.get_parameters() if not p.requires_grad)
    assert frozen > 0 and row["params"] == trained + frozen
    assert row["state"] == 16 * trained + 4 * trained * len(config.train.ema_rate) + 4 * frozen
    assert row["activations"] > 0 and row["attention"] > 0  # the spatial transformers are walked


def test_classifier_and_autoencoder_recipes_are_estimated(capsys):
    classifier = memory_estimate.estimate(load_config(os.path.join(ROOT, "configs", "demo_classifier.yaml")))
    assert classifier["total"] > classifier["state"] > 0
    memory_estimate.main([os.path.join(ROOT, "configs", "ldm_demo_autoencoder.yaml"),
                          os.path.join(ROOT, "configs", "demo_classifier.yaml")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ldm_demo_autoencoder")]
    assert len(rows) == 1 and "not estimated (autoencoder)" in rows[0]
