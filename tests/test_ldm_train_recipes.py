"""The latent recipes' configuration: what arch latent refuses, the copies config keeps, the demo vocabulary."""
import os

import pytest

from mind_diffusion.clip_names import LAYOUTS
from mind_diffusion.config import LATENT_TEXT_CTX, TEXT_LAYOUTS, ConfigError, config_from_dict, load_config
from mind_diffusion.data import demo
from models.tokenizers import CONTEXT_LENGTH, WordPieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "configs", "ldm_demo_vocab.txt")


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
    ("data", "kind", "folder", "must be 'captions' or 'demo' for arch 'latent'"),
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


def test_the_recipes_load():
    for name in ("ldm_demo", "ldm_demo_autoencoder", "ldm_wukong512"):
        config = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert config.model.arch in ("latent", "autoencoder")


def test_demo_captions_tokenize_without_unknown_pieces():
    from scripts.make_ldm_demo_vocab import demo_vocabulary
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
