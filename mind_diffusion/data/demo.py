"""The built-in bilingual demo set: coloured shapes with Chinese and English captions.

Nothing is downloaded: item ``i`` of the set with seed ``s`` is drawn from a
random generator keyed by ``(s, i)``, so any worker renders any item on demand
and the same seed always gives the same set. Each image shows one of
5 shapes in one of 8 colours, at a random size and position, on a background
colour that contrasts with the shape. Shapes are drawn at 4x and downsampled
with a box filter (anti-aliasing), so they stay readable at 32x32 and 16x16.

Captions use several English and Chinese templates, e.g. "a red circle on a
blue background", "蓝色背景上的红色圆形", "红色的圆"; :func:`prompt_to_attributes`
parses such text back into (shape, colour, background), which the
prompt-adherence benchmark compares with what the judge sees.
"""
import functools
import re
from typing import NamedTuple, Tuple

import numpy as np
from PIL import Image, ImageDraw

from mind_diffusion.prompts import normalise_prompt


class Shape(NamedTuple):
    """A shape with its caption words; the first Chinese word is the full form."""
    name: str
    en: Tuple[str, ...]
    zh: Tuple[str, ...]


class Colour(NamedTuple):
    """A named colour with its RGB value and caption words."""
    name: str
    rgb: Tuple[int, int, int]
    en: Tuple[str, ...]
    zh: Tuple[str, ...]


SHAPES = (
    Shape("circle", ("circle", "disc", "disk", "dot"), ("圆形", "圆", "圆圈", "圆盘")),
    Shape("square", ("square", "box"), ("正方形", "方形", "方块")),
    Shape("triangle", ("triangle",), ("三角形", "三角")),
    Shape("star", ("star", "five-pointed star"), ("星形", "星星", "五角星", "星")),
    Shape("cross", ("cross", "plus", "plus sign"), ("十字形", "十字", "加号")),
)

# Shape colours: hues far apart, plus white, so that each stays nameable.
COLORS = (
    Colour("red", (220, 30, 30), ("red",), ("红色", "红")),
    Colour("orange", (250, 140, 0), ("orange",), ("橙色", "橘色", "橙", "橘黄色")),
    Colour("yellow", (250, 225, 30), ("yellow",), ("黄色", "黄")),
    Colour("green", (30, 160, 50), ("green",), ("绿色", "绿")),
    Colour("cyan", (0, 200, 210), ("cyan", "turquoise", "aqua"), ("青色", "青", "蓝绿色")),
    Colour("blue", (30, 70, 225), ("blue",), ("蓝色", "蓝")),
    Colour("purple", (145, 50, 200), ("purple", "violet"), ("紫色", "紫")),
    Colour("white", (245, 245, 245), ("white",), ("白色", "白")),
)

# Backgrounds: the shape colours plus two neutrals.
BACKGROUNDS = COLORS + (
    Colour("black", (20, 20, 20), ("black",), ("黑色", "黑")),
    Colour("gray", (128, 128, 128), ("gray", "grey"), ("灰色", "灰")),
)

SHAPE_BY_NAME = {shape.name: shape for shape in SHAPES}
COLOR_BY_NAME = {colour.name: colour for colour in BACKGROUNDS}

MIN_CONTRAST = 120.0     # least RGB distance between a shape and its background
SIZE_RANGE = (0.4, 0.75)  # shape extent as a fraction of the image side
SUPERSAMPLE = 4           # draw at 4x, then box-filter down: anti-aliased edges
STAR_INNER_RATIO = 0.5    # inner/outer radius; chunkier than a regular star so it reads small
CROSS_HALF_WIDTH = 0.34   # arm half-width of the plus, in units of its half-extent


def _contrasting_backgrounds(colour):
    return tuple(bg.name for bg in BACKGROUNDS
                 if np.linalg.norm(np.subtract(bg.rgb, colour.rgb)) >= MIN_CONTRAST)


# shape colour name → background names far enough from it
ALLOWED_BACKGROUNDS = {colour.name: _contrasting_backgrounds(colour) for colour in COLORS}


# ---------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------

def _normalised(points):
    """Centre a polygon's bounding box on 0 and scale its larger side to 2."""
    points = np.asarray(points, dtype=np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) * (2.0 / (high - low).max())


def shape_polygon(name):
    """The outline of a polygonal shape in unit coordinates (bounding box centred,
    larger side 2, y pointing down); None for the circle."""
    if name == "circle":
        return None
    if name == "square":
        return _normalised([(-1, -1), (1, -1), (1, 1), (-1, 1)])
    if name == "triangle":
        return _normalised([(0, -np.sqrt(3)), (1, 0), (-1, 0)])
    if name == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
        return _normalised(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))
    if name == "cross":
        a = CROSS_HALF_WIDTH
        return _normalised([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                            (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)])
    raise ValueError(f"unknown shape {name!r}; choose from {[s.name for s in SHAPES]}")


def _rgb(colour):
    return COLOR_BY_NAME[colour].rgb if isinstance(colour, str) else tuple(colour)


def render(shape, color, background, size, center, image_size, supersample=SUPERSAMPLE):
    """Draw one shape; returns uint8 [image_size, image_size, 3].

    :param shape: a name from SHAPES.
    :param color, background: names from BACKGROUNDS or RGB triples.
    :param size: the shape's larger extent in pixels.
    :param center: (x, y) of its bounding-box centre in pixels (0 = left/top edge).
    """
    big = image_size * supersample
    canvas = Image.new("RGB", (big, big), _rgb(background))
    draw = ImageDraw.Draw(canvas)
    half = size * supersample / 2
    cx, cy = center[0] * supersample, center[1] * supersample
    polygon = shape_polygon(shape)
    if polygon is None:
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=_rgb(color))
    else:
        draw.polygon([(cx + x * half, cy + y * half) for x, y in polygon], fill=_rgb(color))
    return np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.uint8)


# ---------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------

# The ten templates of the first demo model, kept as they were: the "training
# wordings" of the prompt-adherence bench, and a quarter of the captions.
EN_TEMPLATES = (
    "{a} {color} {shape}",
    "{a} {color} {shape} on a {background} background",
    "{color} {shape}",
    "a picture of {a} {color} {shape}",
    "{a} {color} {shape}, {background} background",
)
ZH_TEMPLATES = (
    "{color}的{shape_short}",
    "{background}背景上的{color}{shape}",
    "一个{color}{shape}",
    "{color}{shape}",
    "一个{color}的{shape}，背景是{background}",
)
TEMPLATES = {"en": EN_TEMPLATES, "zh": ZH_TEMPLATES}
CORE_TEMPLATE_SHARE = 0.25

# The caption grammar: a template is lead + noun phrase + background phrase + tail,
# or background-first phrase + noun phrase + tail; every choice is drawn at
# random, and the colour and shape words from all their synonyms. So many
# wordings teach the model the words rather than the sentences. The evaluation's
# held-out wordings (mind_diffusion/evaluation/heldout.py) are kept out of it,
# and tests/test_demo.py checks that none of them can be produced here.
# "{a}" is the article of the word after it ("a" or "an").
GRAMMAR = {
    "en": {
        "leads": ("", "a picture of ", "an image of ", "a photo of ", "a drawing of ", "a painting of ",
                  "an illustration of ", "a render of ", "show ", "show me ", "make ", "generate ",
                  "create ", "render ", "give me ", "paint ", "i want ", "please make ", "please show ",
                  "here is ", "now ", "just "),
        "nouns": ("{a} {color} {shape}", "{color} {shape}", "the {color} {shape}", "one {color} {shape}",
                  "{a} {size} {color} {shape}", "{a} {shape} in {color}", "{a} {shape}, {color}",
                  "{a} {shape} coloured {color}", "{a} {shape} colored {color}", "{a} {color} coloured {shape}",
                  "{a} {shape} of {color} colour", "{a} {shape} of {color} color", "{a} {color} {shape} shape",
                  "{a} solid {color} {shape}", "{a} {shape} filled with {color}"),
        "sizes": ("small", "big", "large", "little", "medium"),
        "backgrounds_after": (" on {a} {background} background", ", {background} background",
                              " with {a} {background} background", " on {background}",
                              " in front of {a} {background} background", ", background {background}",
                              ", the background is {background}", " on a background of {background}",
                              " and {a} {background} background", " with {background} around it",
                              " on a plain {background} background"),
        "backgrounds_before": ("{background} background, ", "on {a} {background} background, ",
                               "{a} {background} background with "),
        "tails": ("", " please", ", please", " thanks", " now"),
    },
    "zh": {
        "leads": ("{noun}", "一张{noun}的图片", "一幅{noun}的图", "生成{noun}", "给我{noun}", "展示{noun}",
                  "显示{noun}", "我要{noun}", "请生成{noun}", "{noun}的图片", "图片:{noun}"),
        "nouns": ("{color}的{shape}", "{color}{shape}", "一个{color}{shape}", "一个{color}的{shape}",
                  "{shape},{color}", "{shape}({color})", "{color}颜色的{shape}", "一个{shape},{color}的",
                  "一个{size}{color}{shape}", "{size}的{color}{shape}", "纯{color}的{shape}"),
        "sizes": ("小", "大"),
        "backgrounds_after": (",背景是{background}", ",背景为{background}", ",{background}背景",
                              ",{background}的背景", ",背景:{background}", ",配{background}背景",
                              ",在{background}背景上"),
        "backgrounds_before": ("{background}背景上的", "在{background}背景上的", "{background}背景,",
                               "背景是{background},", "{background}的背景上,"),
        "tails": ("", ",谢谢", "吧", "。"),
    },
}
BACKGROUND_SHARE = 0.5     # grammar captions that name the background
MAX_CAPTION_BYTES = 63     # configs/demo.yaml's text_ctx (64) less the end token

# Free wordings: the colour and shape words among filler words the model has no use
# for, in the orders people write them. A model trained on templates alone attends to
# the template around the words and fails on a sentence it has not seen; with filler
# it learns to find its vocabulary anywhere and to ignore the rest. Fillers are random
# letter strings (English) and random CJK characters (Chinese), never a vocabulary
# word and never a word or character of the held-out wordings, so the held-out
# evaluation still sees only unseen words. Which colour is the shape's follows from
# position alone: the colour nearest before the shape word, or else the first after it;
# any other colour is the background.
FREE_SHARE = 0.35          # captions in free wording (after the core templates' share)
FILLER_RUNS = (0, 3)       # filler words (English) per gap, fewest and most
FILLER_RUNS_ZH = (0, 4)    # filler characters (Chinese) per gap


def grammar_templates(lang):
    """Every template the grammar can produce for ``lang`` (the core templates not included),
    with ``{color}``, ``{shape}``, ``{size}``, ``{background}`` and ``{a}`` slots."""
    grammar = GRAMMAR[lang]
    if lang == "en":
        plain = [lead + noun for lead in grammar["leads"] for noun in grammar["nouns"]]
    else:
        plain = [lead.replace("{noun}", noun) for lead in grammar["leads"] for noun in grammar["nouns"]]
    # a background-first phrase goes before a bare noun phrase only: "蓝色背景上的生成…" is not Chinese
    bare = grammar["nouns"]
    bodies = (plain + [body + after for body in plain for after in grammar["backgrounds_after"]]
              + [before + noun for before in grammar["backgrounds_before"] for noun in bare])
    return [body + tail for body in bodies for tail in grammar["tails"]]


def _with_articles(text):
    """Replace each "{a}" marker (already formatted as "\0") by "a" or "an" for the word after it."""
    return re.sub("\0 (?=[aeiou])", "an ", text).replace("\0", "a")


def fill_template(template, shape_word, colour_word, background_word=None, size_word=""):
    """A template with its slots filled by the given words (and its articles chosen)."""
    if "{background}" in template and background_word is None:
        raise ValueError(f"template {template!r} names the background; pass background")
    return _with_articles(template.format(a="\0", color=colour_word, shape=shape_word,
                                          background=background_word, size=size_word))


def make_caption(shape, color, background=None, lang="en", template=0):
    """A caption in ``lang`` ("en" or "zh") from core template number ``template``
    (:data:`TEMPLATES`), with each attribute's first word.

    Templates that name the background need ``background``; asking for one
    without it raises ValueError.
    """
    if lang not in TEMPLATES:
        raise ValueError(f"unknown caption language {lang!r}: use 'en' or 'zh'")
    text = TEMPLATES[lang][template]
    if "{background}" in text and background is None:
        raise ValueError(f"template {template} ({text!r}) names the background; pass background")
    shape_words, colour = SHAPE_BY_NAME[shape], COLOR_BY_NAME[color]
    if lang == "en":
        return fill_template(text, shape_words.en[0], colour.en[0],
                             background and COLOR_BY_NAME[background].en[0])
    return text.format(color=colour.zh[0], shape=shape_words.zh[0], shape_short=shape_words.zh[1],
                       background=background and COLOR_BY_NAME[background].zh[0])


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def grammar_caption(rng, shape, color, background, lang, background_share=BACKGROUND_SHARE):
    """A random caption from the grammar: (text, whether it names the background).

    Draws lead, noun phrase, background phrase (with probability ``background_share``), tail and
    synonyms from ``rng``; a caption longer than :data:`MAX_CAPTION_BYTES` is drawn again, so every
    one fits the demo text context.
    """
    grammar = GRAMMAR[lang]
    words = "en" if lang == "en" else "zh"
    while True:
        noun = _pick(rng, grammar["nouns"])
        names_background = rng.random() < background_share
        if names_background and rng.random() < 0.25:
            body = _pick(rng, grammar["backgrounds_before"]) + noun
        else:
            lead = _pick(rng, grammar["leads"])
            body = lead + noun if lang == "en" else lead.replace("{noun}", noun)
            if names_background:
                body += _pick(rng, grammar["backgrounds_after"])
        template = body + _pick(rng, grammar["tails"])
        text = fill_template(template, _pick(rng, getattr(SHAPE_BY_NAME[shape], words)),
                             _pick(rng, getattr(COLOR_BY_NAME[color], words)),
                             _pick(rng, getattr(COLOR_BY_NAME[background], words)), _pick(rng, grammar["sizes"]))
        if len(text.encode("utf-8")) <= MAX_CAPTION_BYTES:
            return text, names_background


@functools.lru_cache(maxsize=None)
def _reserved(lang):
    """What a filler may never be: a vocabulary word, or a word (English) or CJK character
    (Chinese) of the held-out wordings, which must stay unseen in training."""
    from mind_diffusion.evaluation.heldout import HELD_OUT  # the evaluation's held-out split
    held_out = " ".join(re.sub(r"\{\w+\}", " ", normalise_prompt(text)) for text in HELD_OUT[lang])
    vocabulary = [word for item in SHAPES + BACKGROUNDS for word in getattr(item, lang)]
    vocabulary += list(GRAMMAR[lang]["sizes"])
    if lang == "en":
        return frozenset(re.findall(r"[a-z']+", held_out)) | {part for word in vocabulary for part in word.split()}
    return frozenset(ch for ch in held_out + "".join(vocabulary) if "\u4e00" <= ch <= "\u9fff")


def filler_word(rng, lang):
    """One filler: 2-8 random lowercase letters (English) or one CJK character (Chinese),
    drawn again while it is :func:`_reserved`."""
    reserved = _reserved(lang)
    while True:
        if lang == "en":
            word = "".join(chr(ord("a") + int(c)) for c in rng.integers(26, size=int(rng.integers(2, 9))))
        else:
            word = chr(int(rng.integers(0x4E00, 0x9FA6)))
        if word not in reserved:
            return word


def _fillers(rng, lang):
    low, high = FILLER_RUNS if lang == "en" else FILLER_RUNS_ZH
    return [filler_word(rng, lang) for _ in range(int(rng.integers(low, high + 1)))]


def free_caption(rng, shape, color, background, lang, background_share=BACKGROUND_SHARE):
    """A caption in free wording: (text, whether it names the background).

    The parts, each with a run of filler around it: the shape's colour and shape word
    (colour first, or shape first and colour after it), and with probability
    ``background_share`` the background colour, after the shape's colour, or
    before a colour-first phrase. Drawn again while longer than :data:`MAX_CAPTION_BYTES`.
    """
    words = lambda name, table: _pick(rng, getattr(table[name], lang))  # noqa: E731
    while True:
        shape_word, colour_word = words(shape, SHAPE_BY_NAME), words(color, COLOR_BY_NAME)
        colour_first = rng.random() < 0.6
        if colour_first:
            gap = _fillers(rng, lang)[:1]  # "red coloured circle": at most one word between
            parts = [colour_word, *gap, shape_word]
        else:
            parts = [shape_word, *_fillers(rng, lang), colour_word]
        names_background = rng.random() < background_share
        if names_background:
            background_word = words(background, COLOR_BY_NAME)
            if colour_first and rng.random() < 0.5:
                parts = [background_word, *_fillers(rng, lang), *parts]
            else:
                parts = [*parts, *_fillers(rng, lang), background_word]
        parts = [*_fillers(rng, lang), *parts, *_fillers(rng, lang)[:2]]
        text = (" " if lang == "en" else "").join(parts)
        if len(text.encode("utf-8")) <= MAX_CAPTION_BYTES:
            return text, names_background


# ---------------------------------------------------------------------------
# Reading a prompt back.
# ---------------------------------------------------------------------------

# Words the prompt reader also understands, each read as the demo word it stands for. They are
# never in training captions (the model has not seen them); only the reader maps them.
READ_AS = {
    "en": {"red": ("scarlet", "crimson"), "yellow": ("golden", "gold"), "blue": ("navy", "azure"),
           "cyan": ("teal",), "purple": ("lilac", "lavender", "magenta"), "gray": ("silver",),
           "star": ("pentagram",)},
    "zh": {},
}
# Traditional forms of the demo's Chinese words' characters, read as the simplified ones.
_TRADITIONAL = str.maketrans("紅藍綠黃圓號顏", "红蓝绿黄圆号颜")
_NEGATION = {"en": re.compile(r"\b(?:not|no|without|never) (?:an? |the )?$"),
             "zh": re.compile(r"(?:不要|不是|不用|没有|非|不)$")}


def _words(item, lang):
    """Every word of a shape or colour in ``lang``: its caption words, then the reader's extras."""
    return tuple(getattr(item, lang)) + READ_AS[lang].get(item.name, ())


def _find_words(text, items, english):
    """[(start, end, name)] of the vocabulary words of ``items`` in ``text``, left to right and not
    overlapping: at each place the longest word wins (蓝绿色 over 蓝 and 绿色; "plus sign" over
    "plus"). English words match whole, also in the plural ("circles", "boxes")."""
    lang = "en" if english else "zh"
    found = []
    for item in items:
        for word in _words(item, lang):
            pattern = rf"\b{re.escape(word)}(?:s|es)?\b" if english else re.escape(word)
            for match in re.finditer(pattern, text):
                found.append((match.start(), -len(word), match.end(), item.name))
    chosen, reached = [], 0
    for start, _, end, name in sorted(found):
        if start >= reached:
            chosen.append((start, end, name))
            reached = end
    return chosen


# Background phrases, "{w}" standing for a colour word: the grammar's and a few more.
EN_BACKGROUND_PATTERNS = (
    r"\b(?:(?:on|with|and|in front of|over) )?(?:an? )?(?:plain )?{w} background\b",
    r"\b(?:the )?background(?: is| of|:)? {w}\b",
    r"\bon {w}$",
    r"\bon {w}(?= please| thanks| now|,)",
    r"\bwith {w} around it\b",
)
ZH_BACKGROUND_PATTERNS = (
    r"(?:在|配)?{w}(?:的)?背景(?:上|中|里)?(?:的)?",
    r"背景(?:是|为|:|:){w}",
)


def _background_in(text):
    """Find a background phrase; returns (name, text without it) or (None, text)."""
    for patterns, english in ((EN_BACKGROUND_PATTERNS, True), (ZH_BACKGROUND_PATTERNS, False)):
        # longest word first, so 蓝绿色 wins over 绿色 and 红色 over 红, and nothing of it is left behind
        words = sorted(((word, colour.name) for colour in BACKGROUNDS
                        for word in _words(colour, "en" if english else "zh")), key=lambda pair: -len(pair[0]))
        for pattern in patterns:
            for word, name in words:
                match = re.search(pattern.replace("{w}", re.escape(word)), text)
                if match:
                    return name, text[:match.start()] + " " + text[match.end():]
    return None, text


def prompt_to_attributes(text):
    """Parse a demo caption or prompt into ``{"shape", "color", "background"}``.

    Works for both languages, the caption grammar's wordings ("a red circle on a
    blue background", "蓝色背景上的红色圆形", "红色的圆", "a box in violet, the
    background is grey") and free ones ("sketch a red circle against blue", "红底蓝圆");
    the text is normalised first, as the tokenizer does, and traditional characters
    are read as simplified. The rule is the free captions' (:func:`free_caption`):

    - the shape is the first shape word;
    - a background phrase ("on a blue background", "背景是蓝色") names the background;
    - the shape's colour is the colour word nearest before the shape word, else the
      first after it (with no shape word, the first colour word);
    - without a background phrase, the next other colour word is the background.

    Colour words after a negation ("not red", "不要红色") are not read. Anything not
    named is None.
    """
    text = normalise_prompt(text).translate(_TRADITIONAL)
    background, rest = _background_in(text)
    shapes = _find_words(rest, SHAPES, True) + _find_words(rest, SHAPES, False)
    colours = [(start, name) for english in (True, False)
               for start, _, name in _find_words(rest, BACKGROUNDS, english)
               if not _NEGATION["en" if english else "zh"].search(rest[:start])]
    colours.sort()
    shape_at, shape = min(shapes)[0::2] if shapes else (None, None)
    before = [c for c in colours if shape_at is not None and c[0] < shape_at]
    after = [c for c in colours if shape_at is None or c[0] > shape_at]
    colour = before[-1] if before else after[0] if after else None
    if background is None:
        others = [entry[1] for entry in colours if entry != colour and (colour is None or entry[1] != colour[1])]
        background = others[0] if others and colour is not None else None
    return {"shape": shape, "color": colour and colour[1], "background": background}


def caption_form(text):
    """The demo model's own caption for a prompt worded freely, or None when it names no shape and colour.

    The demo model reads the captions of its training set best; this rewrites a prompt into
    a core template of its language (:data:`TEMPLATES`: "a red circle", "一个红色圆形",
    and with a background "a red circle on a blue background", "蓝色背景上的红色圆形"), from
    what :func:`prompt_to_attributes` reads in it. A prompt with a CJK character is Chinese.
    """
    attributes = prompt_to_attributes(text)
    if attributes["shape"] is None or attributes["color"] is None:
        return None
    lang = "zh" if re.search("[\u4e00-\u9fff]", text) else "en"  # as heldout.read_wordings tells them
    template = {("en", False): 0, ("en", True): 1, ("zh", False): 2, ("zh", True): 1}[
        lang, attributes["background"] is not None]
    return make_caption(attributes["shape"], attributes["color"], attributes["background"], lang, template)


# ---------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------

def sample_attributes(seed, index, image_size, background_share=BACKGROUND_SHARE):
    """The attributes of item ``index`` of the demo set ``seed``: a dict with shape,
    color, background, size, center (pixels), lang, caption, names_background
    (whether the caption names the background colour) and wording (where the caption
    comes from: "core" templates, the "grammar" or "free" wording)."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))].name
    colour = COLORS[rng.integers(len(COLORS))].name
    choices = ALLOWED_BACKGROUNDS[colour]
    background = choices[rng.integers(len(choices))]
    size = image_size * rng.uniform(*SIZE_RANGE)
    # keep a 1-pixel margin so the image border shows only background
    low, high = size / 2 + 1, image_size - size / 2 - 1
    center = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
    lang = ("en", "zh")[rng.integers(2)]
    source = rng.random()
    if source < CORE_TEMPLATE_SHARE:
        template = TEMPLATES[lang][int(rng.integers(len(TEMPLATES[lang])))]
        caption = make_caption(shape, colour, background, lang, TEMPLATES[lang].index(template))
        names_background, wording = "{background}" in template, "core"
    elif source < CORE_TEMPLATE_SHARE + FREE_SHARE:
        (caption, names_background), wording = free_caption(rng, shape, colour, background, lang,
                                                            background_share), "free"
    else:
        (caption, names_background), wording = grammar_caption(rng, shape, colour, background, lang,
                                                               background_share), "grammar"
    return {"shape": shape, "color": colour, "background": background, "size": float(size),
            "center": center, "lang": lang, "caption": caption, "names_background": names_background,
            "wording": wording}


def class_label(shape, color):
    """Class id of a (shape, colour) pair, for class-conditional training: 0..39."""
    shape_index = [s.name for s in SHAPES].index(shape)
    colour_index = [c.name for c in COLORS].index(color)
    return shape_index * len(COLORS) + colour_index


NUM_CLASSES = len(SHAPES) * len(COLORS)


class DemoSet:
    """Random-access view of the demo set: ``demo[i]`` → (uint8 HWC image, caption, attributes)."""

    def __init__(self, size, image_size, seed=0, background_share=BACKGROUND_SHARE):
        if size < 1:
            raise ValueError(f"demo set size must be >= 1, got {size}")
        self.size, self.image_size, self.seed = size, image_size, seed
        self.background_share = background_share

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"demo item {index} outside [0, {self.size})")
        attributes = sample_attributes(self.seed, index, self.image_size, self.background_share)
        image = render(attributes["shape"], attributes["color"], attributes["background"],
                       attributes["size"], attributes["center"], self.image_size)
        return image, attributes["caption"], attributes
