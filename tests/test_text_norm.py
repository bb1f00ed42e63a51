"""Prompt normalisation: layout (spaces, punctuation, case, full-width forms) never changes the tokens."""
import numpy as np
import pytest

from mind_diffusion.data import demo
from models.text import ByteTokenizer, normalise_prompt


@pytest.mark.parametrize("variant", [
    "a red circle", "  A RED circle!!", "a red circle.", "A Red Circle", "a\tred\n circle ",
    "ａ ｒｅｄ ｃｉｒｃｌｅ！", "a red circle?!...", "  a   red   circle\u3000", "...a red circle",
])
def test_english_layout_variants_are_one_prompt(variant):
    assert normalise_prompt(variant) == "a red circle"


@pytest.mark.parametrize("variant", [
    "请画一个红色的圆", "请画一个红色的圆。", " 请画一个红色的圆！", "请画 一个 红色的圆", "请画一个红色的圆……",
    "请画一个红色的圆？", "\u3000请画一个红色的圆\u3000",
])
def test_chinese_layout_variants_are_one_prompt(variant):
    assert normalise_prompt(variant) == "请画一个红色的圆"


def test_inner_punctuation_is_unified_not_removed():
    # full-width and half-width commas are the same character afterwards; a space after it next to CJK goes
    assert normalise_prompt("一个红色的圆形，背景是蓝色") == "一个红色的圆形,背景是蓝色"
    assert normalise_prompt("一个红色的圆形, 背景是蓝色") == "一个红色的圆形,背景是蓝色"
    assert normalise_prompt("一个红色的圆形、背景是蓝色。") == "一个红色的圆形,背景是蓝色"
    assert normalise_prompt("A red circle , Blue background") == "a red circle, blue background"
    assert normalise_prompt("a circle ( red ) !") == "a circle (red)"  # brackets and quotes pair: they stay
    assert normalise_prompt("【红色】的圆。") == "[红色]的圆"
    assert normalise_prompt("“红色”的圆") == '"红色"的圆'


def test_what_normalisation_keeps():
    assert normalise_prompt("") == ""
    assert normalise_prompt("!!!") == "!!!"          # never turned into the unconditional caption
    assert normalise_prompt("🐱 cat") == "🐱 cat"      # emoji are symbols, not punctuation
    assert normalise_prompt("a 红色 circle") == "a 红色 circle"  # a space between Latin and CJK words stays
    assert normalise_prompt("ÄPFEL") == "Äpfel"     # only ASCII letters are case-folded
    assert normalise_prompt("2 只狗") == "2 只狗"


def test_normalisation_is_idempotent():
    for text in ["  A RED circle!!", "一个红色的圆形， 背景是蓝色。", "a circle ( red ) , grey background ."]:
        once = normalise_prompt(text)
        assert normalise_prompt(once) == once


def test_tokenizer_normalises_training_captions_and_prompts_alike():
    tokenizer = ByteTokenizer(64)
    tokens, mask = tokenizer(["a red circle", "  A RED circle!!", "Ａ　ＲＥＤ　ＣＩＲＣＬＥ。"])
    assert (tokens == tokens[0]).all() and (mask == mask[0]).all()
    assert tokenizer.decode(tokens[0]) == "a red circle"
    # the training set's captions reach the model through the same call, so they are normalised too
    caption = demo.DemoSet(8, 16, seed=0)[3][1]
    np.testing.assert_array_equal(tokenizer(caption)[0], tokenizer(caption.upper() + "。")[0])
    raw = ByteTokenizer(64, normalise=False)
    assert raw.decode(raw("  A RED circle!!")[0][0]) == "  A RED circle!!"
