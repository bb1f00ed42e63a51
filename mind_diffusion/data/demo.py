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
import re
from typing import NamedTuple, Tuple

import numpy as np
from PIL import Image, ImageDraw


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
    Shape("circle", ("circle",), ("圆形", "圆", "圆圈")),
    Shape("square", ("square",), ("正方形", "方形", "方块")),
    Shape("triangle", ("triangle",), ("三角形", "三角")),
    Shape("star", ("star",), ("星形", "星星", "五角星", "星")),
    Shape("cross", ("cross", "plus"), ("十字形", "十字", "加号")),
)

# Shape colours: hues far apart, plus white, so that each stays nameable.
COLORS = (
    Colour("red", (220, 30, 30), ("red",), ("红色", "红")),
    Colour("orange", (250, 140, 0), ("orange",), ("橙色", "橘色", "橙")),
    Colour("yellow", (250, 225, 30), ("yellow",), ("黄色", "黄")),
    Colour("green", (30, 160, 50), ("green",), ("绿色", "绿")),
    Colour("cyan", (0, 200, 210), ("cyan",), ("青色", "青")),
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


def make_caption(shape, color, background=None, lang="en", template=0):
    """A caption in ``lang`` ("en" or "zh") from template number ``template``.

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
        colour_word = colour.en[0]
        return text.format(a="an" if colour_word[0] in "aeiou" else "a", color=colour_word,
                           shape=shape_words.en[0],
                           background=background and COLOR_BY_NAME[background].en[0])
    return text.format(color=colour.zh[0], shape=shape_words.zh[0], shape_short=shape_words.zh[1],
                       background=background and COLOR_BY_NAME[background].zh[0])


def _find_words(text, words_by_name, english):
    """(position, -length, name, start, end) for every vocabulary word in ``text``."""
    found = []
    for name, words in words_by_name.items():
        for word in words:
            pattern = rf"\b{re.escape(word)}\b" if english else re.escape(word)
            for match in re.finditer(pattern, text):
                found.append((match.start(), -len(word), name, match.start(), match.end()))
    return sorted(found)


def _background_in(text):
    """Find a background phrase; returns (name, text without it) or (None, text)."""
    for colour in BACKGROUNDS:
        for word in colour.en:
            match = re.search(rf"\b(?:on an? )?{word} background\b", text)
            if match:
                return colour.name, text[:match.start()] + text[match.end():]
    for colour in BACKGROUNDS:
        # longest word first, so 红色 wins over 红 and nothing of it is left behind
        for word in sorted(colour.zh, key=len, reverse=True):
            match = re.search(rf"(?:在)?{word}(?:的)?背景(?:上|中|里)?(?:的)?|背景(?:是|为){word}", text)
            if match:
                return colour.name, text[:match.start()] + text[match.end():]
    return None, text


def prompt_to_attributes(text):
    """Parse a demo caption or prompt into ``{"shape", "color", "background"}``.

    Works for both languages and the templates' variations ("a red circle on a
    blue background", "蓝色背景上的红色圆形", "红色的圆"). Anything not named
    is None; when several colours or shapes appear, the first one wins.
    """
    text = text.strip().lower()
    background, rest = _background_in(text)
    attributes = {"shape": None, "color": None, "background": background}
    for key, vocabulary in (("shape", SHAPES), ("color", BACKGROUNDS)):
        for english in (True, False):
            words = {item.name: item.en if english else item.zh for item in vocabulary}
            found = _find_words(rest, words, english)
            if found and attributes[key] is None:
                attributes[key] = found[0][2]
    return attributes


# ---------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------

def sample_attributes(seed, index, image_size):
    """The attributes of item ``index`` of the demo set ``seed``: a dict with shape,
    color, background, size, center (pixels), lang and template."""
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
    template = int(rng.integers(len(TEMPLATES[lang])))
    return {"shape": shape, "color": colour, "background": background, "size": float(size),
            "center": center, "lang": lang, "template": template}


def class_label(shape, color):
    """Class id of a (shape, colour) pair, for class-conditional training: 0..39."""
    shape_index = [s.name for s in SHAPES].index(shape)
    colour_index = [c.name for c in COLORS].index(color)
    return shape_index * len(COLORS) + colour_index


NUM_CLASSES = len(SHAPES) * len(COLORS)


class DemoSet:
    """Random-access view of the demo set: ``demo[i]`` → (uint8 HWC image, caption, attributes)."""

    def __init__(self, size, image_size, seed=0):
        if size < 1:
            raise ValueError(f"demo set size must be >= 1, got {size}")
        self.size, self.image_size, self.seed = size, image_size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"demo item {index} outside [0, {self.size})")
        attributes = sample_attributes(self.seed, index, self.image_size)
        image = render(attributes["shape"], attributes["color"], attributes["background"],
                       attributes["size"], attributes["center"], self.image_size)
        caption = make_caption(attributes["shape"], attributes["color"], attributes["background"],
                               attributes["lang"], attributes["template"])
        return image, caption, attributes
