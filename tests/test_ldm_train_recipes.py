"""The latent recipes' configuration: what arch latent refuses, the copies config keeps, the demo vocabulary."""
import os

import pytest

from mind_diffusion.clip_names import LAYOUTS
from mind_diffusion.config import LATENT_TEXT_CTX, TEXT_LAYOUTS, ConfigError, config_from_dict, load_config
from mind_diffusion.data import demo
from models.tokenizers import CONTEXT_LENGTH, WordPieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "configs", "demo_vocab.txt")


def test_config_copies_match_their_sources():
    assert set(TEXT_LAYOUTS) == set(LAYOUTS)
    assert LATENT_TEXT_CTX == CONTEXT_LENGTH


LATENT = {"model": {"arch": "latent", "vocab": "v.txt", "text_ctx": 77, "channel_mult": [1, 2],
                    "attention_resolutions": [4]}, "diffusion": {"noise_schedule": "scaled_linear"}}


@pytest.mark.parametrize("section, key, value, message", [
    ("diffusion", "noise_schedule", "linear", "diffusion.noise_schedule: must be 'scaled_linear'"),
    ("diffusion", "predict_xstart", True, "diffusion.predict_xstart: must be false for arch 'latent'"),
    ("diffusion", "loss", "rescaled_mse", "diffusion.loss: arch 'latent' trains L_simple"),
    ("model", "text_ctx", 64, "model.text_ctx: must be 77"),
    ("model", "vocab", "", "model.vocab: is required"),
    ("model", "attention_resolutions", [16], "(arch latent: latent pixels)"),
    ("model", "ae_channels", 48, "model.ae_channels: times each ae_channel_mult must be divisible by 32"),
    ("data", "kind", "folder", "data.kind: must be 'captions', 'demo', 'emoji', 'mindrecord' or 'latents' for arch 'latent'"),
])
def test_latent_recipes_refuse_what_cannot_train(section, key, value, message):
    raw = {name: dict(values) for name, values in LATENT.items()}
    raw.setdefault(section, {})[key] = value
    if key == "kind":
        raw["data"]["path"] = "images/"
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_the_unets_side_is_the_latents():
    config = config_from_dict(LATENT)  # 32 px, SD's factor-8 autoencoder by default: a 4×4 latent
    assert config.model.channel_mult == [1, 2] and config.model.attention_resolutions == [4]
    with pytest.raises(ConfigError, match="scaled_linear"):
        config_from_dict({"diffusion": {"noise_schedule": "scaled_linear"}})
    with pytest.raises(ConfigError, match="model.train_text_encoder: trains a latent model's text encoder"):
        config_from_dict({"model": {"train_text_encoder": True}})
    with pytest.raises(ConfigError, match="model.pooled_text: conditions a latent UNet's residual blocks"):
        config_from_dict({"model": {"arch": "glide", "pooled_text": True}})
    with pytest.raises(ConfigError, match="model.pooled_text: adds layers that Stable Diffusion"):
        config_from_dict({**LATENT, "model": {**LATENT["model"], "pooled_text": True, "unet_from": "sd.ckpt"}})


def test_zero_terminal_snr_needs_a_latent_v_model():
    message = "diffusion.zero_terminal_snr: rescales latent diffusion's schedule and needs v prediction"
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**LATENT, "diffusion": {**LATENT["diffusion"], "zero_terminal_snr": True}})
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"diffusion": {"zero_terminal_snr": True, "predict_v": True}})
    assert config_from_dict({**LATENT, "diffusion": {**LATENT["diffusion"], "zero_terminal_snr": True,
                                                     "predict_v": True}}).diffusion.zero_terminal_snr


@pytest.mark.parametrize("band, message", [
    ({"high_noise_end": 700}, "diffusion.high_noise_end: places high_noise_share's band, which is 0"),
    ({"high_noise_share": 0.5, "high_noise_end": 1001}, "diffusion.high_noise_end: must be at most diffusion.steps"),
    ({"high_noise_share": 0.5, "high_noise_steps": 800, "high_noise_end": 700},
     "diffusion.high_noise_steps: must be at most diffusion.high_noise_end"),
])
def test_a_band_that_cannot_be_drawn_is_refused(band, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"diffusion": {"steps": 1000, **band}})
    config = config_from_dict({"diffusion": {"steps": 1000, "high_noise_share": 0.5, "high_noise_steps": 500,
                                             "high_noise_end": 700}})
    assert config.diffusion.high_noise_end == 700


def test_the_recipes_load():
    for name in ("ldm_demo", "ldm_demo_autoencoder", "ldm_wukong512"):
        config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert config.model.arch in ("latent", "autoencoder")


def test_the_shipped_latent_demo_fits_its_recipe_and_holds_the_shipped_autoencoder():
    """checkpoints/ldm_demo.ckpt (a float16 export) starts configs/ldm_demo.yaml's network through
    train.init_from, every parameter from the file, and its frozen autoencoder is the shipped stage 1's."""
    import json

    import numpy as np
    from mind_diffusion.checkpoints import model_weights, read_checkpoint
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.train.checkpoint import load_initial_weights

    shipped = os.path.join(ROOT, "checkpoints", "ldm_demo.ckpt")
    config = load_config(os.path.join(ROOT, "configs", "ldm_demo.yaml"), [f"train.init_from={shipped}"])
    model, _ = build_model(config.model)
    assert load_initial_weights(model, config.train.init_from) == []
    export = model_weights(read_checkpoint(shipped))
    stage1 = model_weights(read_checkpoint(os.path.join(ROOT, "checkpoints", "ldm_demo_autoencoder.ckpt")))
    params = dict(model.parameters_and_names())
    assert {n for n in params if n.startswith("vae.")} == {f"vae.{n}" for n in stage1}
    # it was fine-tuned under the zero-terminal-SNR schedule, which its export hands to run_infer.sh
    ldm_config = json.loads(str(read_checkpoint(shipped)["ldm_config"]))
    assert ldm_config["schedule"].get("zero_terminal_snr") is True and ldm_config["prediction"] == "v"
    for name, value in stage1.items():
        want = value.asnumpy().astype(np.float16)
        np.testing.assert_array_equal(export[f"vae.{name}"].asnumpy(), want, err_msg=name)
        np.testing.assert_array_equal(params[f"vae.{name}"].asnumpy(), want.astype(np.float32), err_msg=name)


def test_demo_captions_tokenize_without_unknown_pieces():
    from scripts.make_demo_vocab import demo_vocabulary
    with open(VOCAB, encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == demo_vocabulary()  # the file is the script's output
    tokenizer = WordPieceTokenizer(VOCAB)
    for index in range(500):
        attributes = demo.sample_attributes(0, index, 32)
        caption = attributes["caption"]
        if attributes["wording"] == "free" and attributes["lang"] == "zh":
            # free wording's filler: random CJK characters, unknown by design ([UNK], like an unseen
            # character in a prompt); its English filler spells out in letter pieces
            continue
        assert tokenizer.unk_id not in tokenizer.encode(caption), caption
    # every colour and shape word, in both languages, is known
    words = [w for item in demo.SHAPES + demo.BACKGROUNDS for w in item.en + item.zh]
    assert all(tokenizer.unk_id not in tokenizer.encode(w) for w in words)


def tiny_sd1_recipe(**model):
    """A latent recipe with the UNet of tests/fixtures/ldm_sd1_tiny (ldm_sd1_tiny.json's unet section)."""
    return {"model": {"arch": "latent", "vocab": VOCAB, "text_ctx": 77, "image_size": 32, "ae_channels": 32,
                      "ae_channel_mult": [1, 1, 1], "ae_num_res_blocks": 1, "num_channels": 32, "num_res_blocks": 1,
                      "channel_mult": [1, 2], "attention_resolutions": [8], "num_heads": 2, "num_head_channels": -1,
                      "xf_width": 32, "xf_layers": 1, "xf_heads": 2, **model},
            "diffusion": {"noise_schedule": "scaled_linear"}}


def unet_weights(model):
    return {name[len("unet."):]: p.asnumpy() for name, p in model.parameters_and_names() if name.startswith("unet.")}


def test_unet_from_starts_the_unet_from_a_stable_diffusion_checkpoint():
    """model.unet_from with SD 1.x's conv projections (the CompVis fixture) and, with
    model.use_linear_in_transformer, SD 2.x's linear ones (a checkpoint written under SD's names)."""
    import numpy as np
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.convert_ldm import convert_ldm_state_dict, load_ldm_checkpoint, sd_names_of
    from mind_diffusion.safetensors import save_safetensors
    from tests.ldm_util import SD_CKPT, TINY_HEADS, component

    model, _ = build_model(config_from_dict(tiny_sd1_recipe(unet_from=SD_CKPT)).model)
    state, config, _ = load_ldm_checkpoint(SD_CKPT, num_heads=TINY_HEADS, text_heads=TINY_HEADS)
    want = component(convert_ldm_state_dict(state, config)[0], "unet")
    got = unet_weights(model)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    linear = tiny_sd1_recipe(use_linear_in_transformer=True)
    source, _ = build_model(config_from_dict(linear).model)
    weights = unet_weights(source)
    assert weights["middle_block.1.proj_in.weight"].ndim == 2  # a linear layer, not a 1×1 convolution
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(0, 0.1, value.shape).astype(np.float32) for name, value in weights.items()}
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sd2.safetensors")
        save_safetensors(sd_names_of({"unet." + name: value for name, value in weights.items()}), path)
        started, _ = build_model(config_from_dict({**linear, "model": {**linear["model"], "unet_from": path}}).model)
        for name, value in unet_weights(started).items():
            np.testing.assert_array_equal(value, weights[name], err_msg=name)
        with pytest.raises(ValueError, match="proj_in"):  # SD 2 weights into SD 1's conv projections
            build_model(config_from_dict(tiny_sd1_recipe(unet_from=path)).model)


def test_init_from_reads_the_process_its_file_was_trained_under():
    """train.init_from's files record their process: a latent export in its ldm_config, a training
    checkpoint or pixel export in its recipe (older ones lack the newer switches: False)."""
    from mind_diffusion.checkpoints import read_checkpoint
    from mind_diffusion.train.checkpoint import process_differences
    shipped = read_checkpoint(os.path.join(ROOT, "checkpoints", "ldm_demo.ckpt"))
    recipe = os.path.join(ROOT, "configs", "ldm_demo.yaml")
    assert process_differences(shipped, load_config(recipe).diffusion) == [
        "diffusion.zero_terminal_snr: True there, False here"]
    assert process_differences(shipped, load_config(recipe, ["diffusion.zero_terminal_snr=true"]).diffusion) == []
    demo = load_config(os.path.join(ROOT, "configs", "demo.yaml")).diffusion
    assert process_differences(read_checkpoint(os.path.join(ROOT, "checkpoints", "demo_eps.ckpt")), demo) == [
        "diffusion.predict_v: False there, True here"]  # the pixel demo's ε → v fine-tune, on purpose
    assert process_differences(read_checkpoint(os.path.join(ROOT, "checkpoints", "demo.ckpt")), demo) == []
