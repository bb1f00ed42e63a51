"""Held-out prompt wordings for the demo model: sentences it never saw in training.

The demo set's captions come from a grammar (mind_diffusion/data/demo.py) of
lead-ins, noun phrases, background phrases and tails. The wordings here are
kept out of it: none can be produced by the grammar, and each holds at least
one word (English) or character (Chinese) that no training template has
(tests/test_demo.py checks both). Colour and shape words are the demo
vocabulary; a model that follows these prompts has learnt the words, not the
sentences.

Slots: ``{a}`` (the article of the next word), ``{color}``, ``{shape}``,
``{background}``.
"""
import re

import numpy as np

from mind_diffusion.data import demo

HELD_OUT = {
    "en": (
        "draw {a} {color} {shape}",
        "{a} {shape} that is {color}",
        "could you draw {a} {color} {shape} for me",
        "sketch {a} {color} {shape} against {background}",
        "i'd like {a} {color} {shape} on {a} {background} backdrop",
        "{a} {shape} which is {color}, on {a} {background} canvas",
        "there is {a} {color} {shape} in the middle",
        "{color} coloured {shape} against {a} {background} wall",
        "my favourite thing: {a} {color} {shape}",
        "depict a single {color} {shape}",
        "{a} {background} scene containing {a} {color} {shape}",
        "the {shape} is {color} while the background is {background}",
        "imagine {a} {color} {shape}",
        "{color} {shape} icon",
        "{a} {shape}, painted {color}, over {background}",
        "quick doodle of {a} {color} {shape} on {background} paper",
    ),
    "zh": (
        "请画一个{color}的{shape}",
        "画一个{color}{shape}",
        "我想要一个{color}的{shape}",
        "{shape}得是{color}的",
        "一个{shape},它的颜色是{color}",
        "在{background}底色上有一个{color}{shape}",
        "{color}的{shape},{background}的底",
        "帮我弄一个{color}的{shape}",
        "一枚{color}{shape},衬着{background}",
        "图里有个{color}{shape}",
        "{background}画面里有{color}的{shape}",
        "这是一个{color}的{shape}",
        "来个{color}{shape},背景用{background}",
        "{color}{shape}图标",
        "把{shape}涂成{color},背景涂成{background}",
        "描绘一个{color}的{shape},{background}底",
    ),
}


SLOTS = ("a", "color", "shape", "background")


def held_out_prompts(count, seed, wordings=None):
    """``count`` held-out prompts with what each asks for.

    Languages alternate (English first; a language without wordings is left
    out); within a language the wordings are taken in turn, so every wording is
    used about equally. Shape, colour and a contrasting background are drawn
    like the demo set's, and the words for them from all their synonyms, by a
    generator keyed by ``seed``.
    :param wordings: ``{"en": [...], "zh": [...]}``; default :data:`HELD_OUT`
        (or a user's file, :func:`read_wordings`).
    :return: list of ``(prompt, {"shape", "color", "background"})``;
        background is None when the wording does not name it.
    """
    wordings = HELD_OUT if wordings is None else wordings
    languages = [lang for lang in ("en", "zh") if wordings.get(lang)]
    rng = np.random.default_rng([seed, 17])
    prompts = []
    for index in range(count):
        lang = languages[index % len(languages)]
        template = wordings[lang][(index // len(languages)) % len(wordings[lang])]
        shape = demo.SHAPES[rng.integers(len(demo.SHAPES))]
        colour = demo.COLORS[rng.integers(len(demo.COLORS))]
        backgrounds = demo.ALLOWED_BACKGROUNDS[colour.name]
        background = demo.COLOR_BY_NAME[backgrounds[rng.integers(len(backgrounds))]]
        words = {item: getattr(item, lang) for item in (shape, colour, background)}
        text = demo.fill_template(template, *(words[item][rng.integers(len(words[item]))]
                                              for item in (shape, colour, background)))
        named = "{background}" in template
        prompts.append((text, {"shape": shape.name, "color": colour.name,
                               "background": background.name if named else None}))
    return prompts


def read_wordings(path):
    """Wordings from a user's text file, for :func:`held_out_prompts`: one a line, blank lines and lines
    starting with ``#`` skipped. Each names ``{color}`` and ``{shape}`` and may use ``{a}`` (the next word's
    article) and ``{background}``; a line with a Chinese character is Chinese, any other English.

    :raises ValueError: naming the line that lacks a slot or has an unknown one.
    """
    wordings = {"en": [], "zh": []}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            slots = set(re.findall(r"\{(\w*)\}", line))
            problem = ("has no {color} or no {shape} slot" if not {"color", "shape"} <= slots else
                       f"has unknown slots {sorted(slots - set(SLOTS))}" if slots - set(SLOTS) else None)
            if problem:
                raise ValueError(f"{path}:{number}: {line!r} {problem}; a wording names {{color}} and {{shape}} "
                                 "and may use {a} and {background}")
            wordings["zh" if re.search("[\u4e00-\u9fff]", line) else "en"].append(line)
    if not any(wordings.values()):
        raise ValueError(f"{path}: no wordings (one a line, e.g. 'draw {{a}} {{color}} {{shape}}')")
    return wordings
