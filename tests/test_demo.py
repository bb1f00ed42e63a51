"""The procedural bilingual demo set, its caption grammar, the held-out wordings, and the judge that reads it."""
import itertools
import os
import re

import numpy as np
import pytest

from mind_diffusion.config import load_config
from mind_diffusion.data.demo import (ALLOWED_BACKGROUNDS, COLORS, CORE_TEMPLATE_SHARE, FREE_SHARE, GRAMMAR,
                                      MAX_CAPTION_BYTES, SHAPES, TEMPLATES, DemoSet, caption_form, free_caption,
                                      grammar_caption, grammar_templates, make_caption,
                                      prompt_to_attributes, render, sample_attributes)
from mind_diffusion.evaluation.heldout import HELD_OUT, held_out_prompts
from mind_diffusion.evaluation.judge import adherence, judge
from models.text import normalise_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_RESOLUTION = 32   # configs/demo.yaml


def test_items_are_deterministic_per_seed():
    first, again, other = DemoSet(50, 32, seed=3), DemoSet(50, 32, seed=3), DemoSet(50, 32, seed=4)
    for i in (0, 17, 49):
        image, caption, attributes = first[i]
        image2, caption2, attributes2 = again[i]
        assert np.array_equal(image, image2) and caption == caption2 and attributes == attributes2
    assert any(not np.array_equal(first[i][0], other[i][0]) for i in range(5))


def test_vocabulary_and_sampling_cover_every_combination():
    assert len(SHAPES) >= 5 and len(COLORS) >= 8
    seen = {(a["shape"], a["color"]) for a in (sample_attributes(0, i, 32) for i in range(2000))}
    assert seen == {(s.name, c.name) for s in SHAPES for c in COLORS}
    for colour in COLORS:
        assert colour.name not in ALLOWED_BACKGROUNDS[colour.name]
        assert len(ALLOWED_BACKGROUNDS[colour.name]) >= 5


def test_items_stay_inside_the_image_with_a_background_border():
    demo = DemoSet(200, 32, seed=0)
    for i in range(len(demo)):
        image = demo[i][0]
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert (border == border[0]).all(), f"item {i}: the shape touches the border"


@pytest.mark.parametrize("image_size", [16, DEMO_RESOLUTION])
def test_every_shape_and_colour_renders_recognisably(image_size):
    for shape, colour in itertools.product(SHAPES, COLORS):
        background = ALLOWED_BACKGROUNDS[colour.name][0]
        image = render(shape.name, colour.name, background, 0.5 * image_size,
                       (image_size / 2, image_size / 2), image_size)
        assert (image != image[0, 0]).any(axis=-1).sum() > 0.1 * image_size ** 2
        assert judge(image) == {"shape": shape.name, "color": colour.name, "background": background}


def test_captions_in_both_languages_parse_back():
    assert make_caption("circle", "red", "blue", "en", 1) == "a red circle on a blue background"
    assert make_caption("circle", "red", "blue", "zh", 1) == "蓝色背景上的红色圆形"
    assert make_caption("circle", "red", None, "zh", 0) == "红色的圆"
    assert make_caption("star", "orange", None, "en", 0) == "an orange star"
    for shape, colour in itertools.product(SHAPES, COLORS):
        for background in ALLOWED_BACKGROUNDS[colour.name]:
            for lang, templates in TEMPLATES.items():
                for template in range(len(templates)):
                    caption = make_caption(shape.name, colour.name, background, lang, template)
                    wanted_background = background if "{background}" in templates[template] else None
                    assert prompt_to_attributes(caption) == {
                        "shape": shape.name, "color": colour.name, "background": wanted_background}, caption


def test_longest_caption_fits_the_demo_recipes_text_context():
    """Byte-level tokens: UTF-8 bytes plus an end token must fit model.text_ctx."""
    longest = max(len(make_caption(s.name, c.name, b, lang, k).encode("utf-8"))
                  for s, c in itertools.product(SHAPES, COLORS) for b in ALLOWED_BACKGROUNDS[c.name]
                  for lang, templates in TEMPLATES.items() for k in range(len(templates)))
    longest = max(longest, MAX_CAPTION_BYTES,
                  max(len(prompt.encode("utf-8")) for prompt, _ in held_out_prompts(2000, seed=1)))
    for recipe in ("tiny.yaml", "demo.yaml"):
        assert longest + 1 <= load_config(os.path.join(ROOT, "configs", recipe)).model.text_ctx


def test_grammar_captions_fit_parse_back_and_vary():
    captions, wordings = set(), []
    for index in range(3000):
        attributes = sample_attributes(11, index, 16)
        caption = attributes["caption"]
        captions.add(caption)
        wordings.append(attributes["wording"])
        assert len(caption.encode("utf-8")) <= MAX_CAPTION_BYTES
        assert "{" not in caption and "  " not in caption and "\0" not in caption
        if attributes["wording"] == "free":
            continue  # filler words: see test_free_captions_follow_the_position_rule
        named = attributes["background"] if attributes["names_background"] else None
        assert prompt_to_attributes(caption) == {
            "shape": attributes["shape"], "color": attributes["color"], "background": named}, caption
    shares = {w: wordings.count(w) / len(wordings) for w in ("core", "free", "grammar")}
    assert abs(shares["core"] - CORE_TEMPLATE_SHARE) < 0.03 and abs(shares["free"] - FREE_SHARE) < 0.03
    assert len(captions) > 2500          # hardly a caption repeats
    names = [sample_attributes(11, i, 16)["names_background"] for i in range(3000)]
    assert 0.4 < np.mean(names) < 0.6
    # "an orange", never "a orange" (but core template 1 keeps the first model's "on a orange background")
    text = " ".join(captions).replace("on a orange background", "")
    assert not re.search(r"\ba (?=[aeiou])", text) and "an orange" in text


def test_grammar_caption_is_drawn_again_when_too_long():
    rng = np.random.default_rng(0)
    for _ in range(300):
        text, named = grammar_caption(rng, "star", "purple", "yellow", "en")
        assert len(text.encode("utf-8")) <= MAX_CAPTION_BYTES
        assert prompt_to_attributes(text)["background"] == ("yellow" if named else None)


def _positions(text, words, lang):
    """Where any of ``words`` occurs in ``text``: word indices (English) or character offsets (Chinese)."""
    if lang == "en":
        return [i for i, word in enumerate(text.split()) if word in words]
    return [m.start() for w in words for m in re.finditer(re.escape(w), text)]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_free_captions_follow_the_position_rule(lang):
    """Free wordings: the shape's colour is the colour nearest before the shape word, or else the
    first after it; the background colour is there exactly when named; everything else is filler
    that is neither a vocabulary word nor a word (character) of the held-out wordings."""
    shape_words = {"en": ["triangle"], "zh": ["三角"]}[lang]        # "三角" is in both 三角形 and 三角
    red, blue = {"en": (["red"], ["blue"]), "zh": (["红"], ["蓝"])}[lang]
    held_out = set().union(*(_template_words(w, lang) for w in HELD_OUT[lang]))
    rng = np.random.default_rng(4)
    named_count = 0
    for _ in range(400):
        text, named = free_caption(rng, "triangle", "red", "blue", lang)
        named_count += named
        assert len(text.encode("utf-8")) <= MAX_CAPTION_BYTES
        (shape_at,) = _positions(text, shape_words, lang)
        (red_at,) = _positions(text, red, lang)
        blue_at = _positions(text, blue, lang)
        assert len(blue_at) == named, text
        before = [p for p in [red_at, *blue_at] if p < shape_at]
        after = [p for p in [red_at, *blue_at] if p > shape_at]
        assert red_at == (max(before) if before else min(after)), text
        if lang == "en":
            fillers = [w for w in text.split() if w not in ("triangle", "red", "blue")]
        else:
            fillers = list(re.sub("三角形?|红色?|蓝色?", "", text))
        assert not set(fillers) & held_out, text
        assert not set(fillers) & set("".join(str(w) for c in COLORS + SHAPES for w in getattr(c, lang)).split()
                                      if lang == "en" else "红橙橘黄绿青蓝紫白黑灰色圆方形三角星十字加号"), text
    assert 0.4 < named_count / 400 < 0.6


def _training_templates(lang):
    return {normalise_prompt(t) for t in grammar_templates(lang)} | {normalise_prompt(t) for t in TEMPLATES[lang]}


def _template_words(template, lang):
    """The words (English) or CJK characters (Chinese) of a template outside its slots."""
    text = re.sub(r"\{\w+\}", " ", normalise_prompt(template))
    if lang == "en":
        return set(re.findall(r"[a-z']+", text))
    return {ch for ch in text if "\u4e00" <= ch <= "\u9fff"}


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_held_out_wordings_are_never_in_training(lang):
    """No held-out wording is a training template, and each has a word (a character in
    Chinese) that no training template has: they test words learnt, not sentences."""
    training = _training_templates(lang)
    vocabulary = set().union(*(_template_words(t, lang) for t in training))
    assert len(HELD_OUT[lang]) >= 12 and len(set(HELD_OUT[lang])) == len(HELD_OUT[lang])
    for wording in HELD_OUT[lang]:
        assert normalise_prompt(wording) not in training, wording
        assert _template_words(wording, lang) - vocabulary, f"{wording!r} has no word unseen in training"
    # nor does any caption of the training set, whatever its words
    held_out = {normalise_prompt(p) for p, _ in held_out_prompts(400, seed=3)}
    assert not held_out & {normalise_prompt(sample_attributes(0, i, 16)["caption"]) for i in range(5000)}


def test_held_out_prompts_alternate_languages_and_name_what_they_ask():
    prompts = held_out_prompts(64, seed=12345)
    assert len(prompts) == 64 and prompts == held_out_prompts(64, seed=12345)
    for index, (text, wanted) in enumerate(prompts):
        chinese = any("\u4e00" <= ch <= "\u9fff" for ch in text)
        assert chinese == (index % 2 == 1), text
        assert wanted["background"] is None or wanted["background"] in ALLOWED_BACKGROUNDS[wanted["color"]]
    named = sum(w["background"] is not None for _, w in prompts)
    assert 24 <= named <= 40
    wordings = {t for lang in ("en", "zh") for t in HELD_OUT[lang]}
    assert len({w for w in wordings if any(_matches(w, text) for text, _ in prompts)}) == len(wordings)


def test_a_users_wordings_file_is_read_and_checked(tmp_path):
    """bench/prompt_adherence.py --wordings FILE: one wording a line, language by its characters, every
    prompt filled from one of them and naming what it asks for; a line without the colour or shape slot,
    or with an unknown one, is refused with its line number."""
    from mind_diffusion.data.demo import COLOR_BY_NAME, SHAPE_BY_NAME
    from mind_diffusion.evaluation.heldout import read_wordings
    path = tmp_path / "mine.txt"
    path.write_text("# my wordings\n\npaint {a} {shape} in {color}\n请给我一个{color}的{shape}，底色{background}\n",
                    encoding="utf-8")
    wordings = read_wordings(str(path))
    assert wordings == {"en": ["paint {a} {shape} in {color}"], "zh": ["请给我一个{color}的{shape}，底色{background}"]}
    prompts = held_out_prompts(8, seed=1, wordings=wordings)
    for index, (text, wanted) in enumerate(prompts):
        assert _matches(wordings[("en", "zh")[index % 2]][0], text), text
        lang = "zh" if index % 2 else "en"
        assert any(word in text for word in getattr(COLOR_BY_NAME[wanted["color"]], lang)), text
        assert any(word in text for word in getattr(SHAPE_BY_NAME[wanted["shape"]], lang)), text
        assert (wanted["background"] is None) == (index % 2 == 0)
    only_english = held_out_prompts(4, seed=1, wordings={"en": wordings["en"], "zh": []})
    assert all(_matches(wordings["en"][0], text) for text, _ in only_english)
    for bad, problem in (("draw a {shape}", "no {color} or no {shape}"), ("{color} {shape} {size}", "unknown")):
        path.write_text("# fine\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=f"mine.txt:2: .*{re.escape(problem)}"):
            read_wordings(str(path))


def _matches(wording, text):
    """Whether ``text`` is ``wording`` with its slots filled (any words)."""
    pattern = re.escape(wording).replace(r"\{a\}", "an?")
    for slot in ("color", "shape", "background"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), r"[\w\- ]+?")
    return re.fullmatch(pattern, text) is not None


def test_parser_ignores_layout():
    for caption in ("a red circle on a blue background", "一个红色的圆形，背景是蓝色", "the box in violet, the background is grey"):
        wanted = prompt_to_attributes(caption)
        assert wanted["shape"] and wanted["color"] and wanted["background"]
        assert prompt_to_attributes("  " + caption.upper() + "!!") == wanted


def test_prompt_parser_handles_free_variations():
    assert prompt_to_attributes("A Violet Plus, grey background") == {
        "shape": "cross", "color": "purple", "background": "gray"}
    assert prompt_to_attributes("在黑色背景上的一个黄色五角星") == {
        "shape": "star", "color": "yellow", "background": "black"}
    assert prompt_to_attributes("a dog") == {"shape": None, "color": None, "background": None}


def test_judge_reads_the_generators_images(record_property):
    """The judge must be right on shape, colour AND background for >= 98% of 500 demo images."""
    demo = DemoSet(500, DEMO_RESOLUTION, seed=2024)
    correct = 0
    for i in range(len(demo)):
        image, _, attributes = demo[i]
        correct += judge(image) == {"shape": attributes["shape"], "color": attributes["color"],
                                    "background": attributes["background"]}
    record_property("judge_accuracy", correct / len(demo))
    assert correct / len(demo) >= 0.98


def test_judge_accepts_model_outputs_and_adherence_scores_them():
    demo = DemoSet(40, DEMO_RESOLUTION, seed=5)
    images, captions, attributes = zip(*[demo[i] for i in range(len(demo))])
    model_outputs = [image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1 for image in images]
    assert [judge(x) for x in model_outputs] == [judge(x) for x in images]
    # what each caption asks for (free wordings are not read back from the text)
    wanted = [{"shape": a["shape"], "color": a["color"], "background": a["background"] if a["names_background"]
               else None} for a in attributes]
    right = adherence(model_outputs, captions, wanted)
    assert right["both"] == right["shape"] == right["color"] == right["background"] == 1.0
    assert right["background_named"] == sum(demo[i][2]["names_background"] for i in range(len(demo))) > 0
    assert len(right["samples"]) == 40 and all(s["both_ok"] for s in right["samples"])
    actual = demo[0][2]
    other_shape = next(s.name for s in SHAPES if s.name != actual["shape"])
    other_colour = next(c.name for c in COLORS if c.name != actual["color"])
    wrong = adherence(images[:1], [make_caption(other_shape, other_colour, None, "zh", 2)])
    assert (wrong["shape"], wrong["color"], wrong["both"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="names no demo shape"):
        adherence(images[:1], ["a dog"])


# ---------------------------------------------------------------------------
# The prompt reader: prompts worded freely, read as the demo's own captions.
# ---------------------------------------------------------------------------

READER_WORDINGS = os.path.join(ROOT, "tests", "fixtures", "reader_wordings.txt")


def _reader_sets():
    from mind_diffusion.evaluation.heldout import read_wordings
    return {"bench held-out": HELD_OUT, "reader fixture": read_wordings(READER_WORDINGS)}


@pytest.mark.parametrize("name", ["bench held-out", "reader fixture"])
def test_the_reader_reads_wordings_never_in_training(name):
    """Every prompt of the bench's held-out wordings and of a second set written for this test
    (tests/fixtures/reader_wordings.txt, none of them training captions) is read as what it asks for,
    in any layout, and its caption form is a core-template caption of the prompt's language that
    asks for the same."""
    wordings = _reader_sets()[name]
    training = {lang: _training_templates(lang) for lang in ("en", "zh")}
    core = {make_caption(s.name, c.name, b, lang, k) for s, c in itertools.product(SHAPES, COLORS)
            for b in ALLOWED_BACKGROUNDS[c.name] for lang, templates in TEMPLATES.items() for k in range(len(templates))}
    assert all(len(wordings[lang]) >= 12 for lang in ("en", "zh"))
    for lang in ("en", "zh"):
        assert not {normalise_prompt(w) for w in wordings[lang]} & training[lang]
    rng = np.random.default_rng(4)
    for text, wanted in held_out_prompts(1200, seed=8, wordings=wordings):
        assert prompt_to_attributes(text) == wanted, text
        form = caption_form(text)
        assert form in core and prompt_to_attributes(form) == wanted, (text, form)
        chinese = [re.search("[\u4e00-\u9fff]", t) is not None for t in (form, text)]
        assert chinese[0] == chinese[1], (text, form)
        layout = "".join(ch.upper() if rng.random() < 0.5 else ch for ch in text).replace(" ", "  ") + " !!"
        assert caption_form(layout) == form, layout


def test_the_reader_takes_position_negation_plurals_and_traditional_characters():
    assert prompt_to_attributes("a blue backdrop with a red circle") == {
        "shape": "circle", "color": "red", "background": "blue"}        # the colour nearest before the shape
    assert prompt_to_attributes("a circle, red, against blue") == {
        "shape": "circle", "color": "red", "background": "blue"}        # else the first after it
    assert prompt_to_attributes("红底蓝圆") == {"shape": "circle", "color": "blue", "background": "red"}
    assert prompt_to_attributes("蓝绿色的星星") == {"shape": "star", "color": "cyan", "background": None}  # not blue, green
    assert prompt_to_attributes("not blue: a red star") == {"shape": "star", "color": "red", "background": None}
    assert prompt_to_attributes("不要蓝色,要红色的星") == {"shape": "star", "color": "red", "background": None}
    assert prompt_to_attributes("three yellow boxes") == {"shape": "square", "color": "yellow", "background": None}
    assert prompt_to_attributes("畫一個紅色的圓,藍色背景") == {"shape": "circle", "color": "red", "background": "blue"}
    assert prompt_to_attributes("a crimson pentagram on navy") == {"shape": "star", "color": "red", "background": "blue"}
    assert caption_form("Draw a red circle, please!") == "a red circle"
    assert caption_form("请画一个红色的圆,背景是蓝色") == "蓝色背景上的红色圆形"
    assert caption_form("an orange cross") == "an orange cross"
    for unreadable in ("a dog", "一只猫", "a circle", "something red", ""):
        assert caption_form(unreadable) is None, unreadable


def test_background_share_sets_how_many_grammar_and_free_captions_name_the_background():
    """data.demo_background_share: 1 names the background in every grammar and free caption, 0 in none;
    the core templates keep theirs; the default draws the set as before (the same captions)."""
    for share in (0.0, 1.0):
        items = [sample_attributes(5, i, 16, share) for i in range(400)]
        for item in items:
            if item["wording"] != "core":
                assert item["names_background"] == bool(share), item["caption"]
                named = prompt_to_attributes(item["caption"])["background"] if item["wording"] == "grammar" else None
                assert named == (item["background"] if share and item["wording"] == "grammar" else None)
    default = DemoSet(50, 16, seed=5)
    assert [default[i][1] for i in range(50)] == [sample_attributes(5, i, 16)["caption"] for i in range(50)]
    assert [default[i][1] for i in range(50)] == [DemoSet(50, 16, 5, 0.5)[i][1] for i in range(50)]


def test_the_bench_backgrounds_set_names_every_allowed_background(bench_script):
    """bench/prompt_adherence.py --sets backgrounds: each prompt names the background it asks for, in a
    template of its language, read back as asked; the first len(pairs) prompts cover every
    (colour, allowed background) pair once."""
    from mind_diffusion.data.demo import ALLOWED_BACKGROUNDS, COLORS, prompt_to_attributes
    bench = bench_script("prompt_adherence")
    pairs = [(c.name, b) for c in COLORS for b in ALLOWED_BACKGROUNDS[c.name]]
    prompts = bench.background_prompts(len(pairs), seed=0)
    assert [(w["color"], w["background"]) for _, w in prompts] == pairs
    for index, (text, wanted) in enumerate(prompts):
        assert prompt_to_attributes(text) == wanted, text
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text) == (index % 2 == 1), text
    assert bench.prompt_set("backgrounds", 4, 0)[0] == [text for text, _ in prompts[:4]]
