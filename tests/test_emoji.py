"""Emoji pictures and bilingual captions: names, rendering, items, the pipeline, missing font and package."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mind_diffusion.config import config_from_dict, load_config
from mind_diffusion.data import create_dataset, emoji

FONT_INSTALLED = os.path.isfile(emoji.DEFAULT_FONT)
needs_font = pytest.mark.skipif(not FONT_INSTALLED, reason="Debian fonts-noto-color-emoji is not installed "
                                                           "(apt-get install -y fonts-noto-color-emoji)")

# emoji's JSON layout: English entries with status (2 = fully qualified), Chinese names by emoji
ENGLISH = {"😀": {"en": ":grinning_face:", "status": 2, "E": 1},
           "🍎": {"en": ":red_apple:", "status": 2, "E": 0.6},
           "☺": {"en": ":smiling_face:", "status": 3, "E": 0.6},            # unqualified: left out
           "🦖": {"en": ":T-Rex:", "status": 2, "E": 5},                     # no Chinese name: left out
           "👨\u200d👩\u200d👧": {"en": ":family_man_woman_girl:", "status": 2, "E": 2}}
CHINESE = {"😀": ":笑嘻嘻:", "🍎": ":红苹果:", "☺": ":微笑:", "👨\u200d👩\u200d👧": ":家庭_男人女人女孩:"}


@pytest.fixture(scope="module")
def names_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emoji_names")
    (folder / "emoji.json").write_text(json.dumps(ENGLISH, ensure_ascii=False), encoding="utf-8")
    (folder / "emoji_zh.json").write_text(json.dumps(CHINESE, ensure_ascii=False), encoding="utf-8")
    return str(folder)


@pytest.fixture()
def clear_caches():
    """Forget names and pictures read under a stand-in for the emoji package, before and after."""
    for cached in (emoji.load_names, emoji._rendered):
        cached.cache_clear()
    yield
    for cached in (emoji.load_names, emoji._rendered):
        cached.cache_clear()


def test_names_become_captions_in_both_languages(names_dir):
    names = emoji.load_names(names_dir)
    assert names == sorted([("😀", "grinning face", "笑嘻嘻"), ("🍎", "red apple", "红苹果"),
                            ("👨\u200d👩\u200d👧", "family man woman girl", "家庭 男人女人女孩")],
                           key=lambda entry: [ord(c) for c in entry[0]])


@needs_font
def test_a_picture_is_the_glyph_centred_on_white_and_resized_with_lanczos():
    # Built here independently: the glyph's ink at size 109 on white, padded to a square of side
    # ink / (1 − 2·margin), resized with Lanczos.
    font = ImageFont.truetype(emoji.DEFAULT_FONT, 109)
    layer = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((0, 0), "🍎", font=font, embedded_color=True)
    ink = layer.crop(layer.getbbox())
    side = round(max(ink.size) * 8 / 7)
    white = Image.new("RGBA", (side, side), "white")
    white.alpha_composite(ink, ((side - ink.width) // 2, (side - ink.height) // 2))
    expected = np.asarray(white.convert("RGB").resize((32, 32), Image.LANCZOS))
    picture = emoji.render("🍎", 32, emoji.DEFAULT_FONT)
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture, expected)
    # the 2-pixel margin is white but for the Lanczos kernel's reach (3 output pixels at this 4× reduction)
    assert min(picture[0].min(), picture[-1].min(), picture[:, 0].min(), picture[:, -1].min()) >= 250
    red = picture[..., 0].astype(int) - picture[..., 1]
    assert red[8:24, 8:24].max() > 100                                      # an apple is red in the middle


@needs_font
def test_items_give_each_picture_with_its_english_then_chinese_caption(names_dir):
    items = emoji.EmojiItems(16, names_dir=names_dir)
    kept = [entry[0] for entry in items.entries]
    assert {"😀", "🍎"} <= set(kept) and len(items) == 2 * len(kept)
    apple = kept.index("🍎")
    (image_en, text_en, k_en), (image_zh, text_zh, k_zh) = items.load(2 * apple), items.load(2 * apple + 1)
    assert (text_en, text_zh) == ("red apple", "红苹果") and k_en == k_zh == apple
    np.testing.assert_array_equal(image_en, emoji.render("🍎", 16, emoji.DEFAULT_FONT))
    np.testing.assert_array_equal(image_en, image_zh)
    with pytest.raises(ValueError, match="RGB"):
        emoji.EmojiItems(16, names_dir=names_dir, channels=1)


@needs_font
def test_pipeline_streams_pictures_with_tokenized_captions(names_dir, monkeypatch, clear_caches):
    own_files = emoji._names_files
    monkeypatch.setattr(emoji, "_names_files", lambda _=None: own_files(names_dir))  # the package's stand-in
    cfg = config_from_dict({"model": {"arch": "glide", "image_size": 16, "channel_mult": [1, 2],
                                      "attention_resolutions": [8]},
                            "data": {"kind": "emoji", "random_flip": False}}).data

    def tokenizer(text):
        ids = np.zeros(48, np.int32)
        raw = list(text.encode("utf-8"))[:48]
        ids[:len(raw)] = raw
        return ids, ids > 0
    items = emoji.EmojiItems(16, names_dir=names_dir)
    batch = next(iter(create_dataset(cfg, len(items), tokenizer=tokenizer, end_step=1)))
    for image, index, tokens in zip(batch["images"], batch["index"], batch["tokens"]):
        picture, text, _ = items.load(int(index))
        np.testing.assert_array_equal(image, picture.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
        assert bytes(int(t) for t in tokens if t).decode("utf-8") == text
    assert sorted(batch["index"].tolist()) == list(range(len(items)))


def test_missing_font_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "DEFAULT_FONT", str(tmp_path / "none.ttf"))
    with pytest.raises(emoji.EmojiFontMissing, match="apt-get install -y fonts-noto-color-emoji"):
        emoji.font_path()
    with pytest.raises(FileNotFoundError, match="data.path .* is not a file"):
        emoji.font_path(str(tmp_path / "elsewhere.ttf"))


def test_names_come_from_the_pypi_package_installed_on_first_use(monkeypatch):
    calls = []

    def fake_package_file(package, module, relative, purpose, instead, install=True):
        calls.append((package, module, relative))
        raise RuntimeError(f"could not install {package} for {purpose}")
    monkeypatch.setattr(emoji, "package_file", fake_package_file)
    with pytest.raises(RuntimeError, match="could not install emoji for the emoji captions"):
        emoji._names_files()
    assert calls == [("emoji", "emoji", os.path.join("unicode_codes", "emoji.json"))]


def test_recipe_is_a_text_to_image_recipe_on_emoji():
    config = load_config("configs/emoji.yaml")
    assert config.model.arch == "glide" and config.data.kind == "emoji" and config.model.image_size == 32
    assert config.data.caption_dropout == 0.2 and config.model.text_ctx >= 77  # the longest name + end
    with pytest.raises(Exception, match="in_channels"):
        load_config("configs/emoji.yaml", ["model.in_channels=1"])
