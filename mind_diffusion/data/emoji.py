"""Bilingual emoji: Noto Color Emoji pictures captioned with their English and Chinese names. Nothing is downloaded.

Pictures. The font is Debian's ``fonts-noto-color-emoji``
(``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf``; ``data.path`` may name another copy). Its
glyphs are CBDT bitmaps, which Pillow renders only at the bitmap size 109; each emoji is drawn
there, cropped to its ink, centred on a white square with a margin, and resized to the image
size with Lanczos filtering (antialiased), the transparency composited over white first so no
dark fringe appears.

Captions. PyPI ``emoji``'s data (``emoji/unicode_codes/emoji.json`` for the English names,
``emoji_zh.json`` for the Chinese ones), read as JSON without importing the package; it is
installed with ``--no-deps`` on first use (:mod:`mind_diffusion.packages`). ``:grinning_face:``
becomes "grinning face", ``:嘿嘿:`` "嘿嘿".

The set: every fully-qualified emoji that has both names and that the font draws as one glyph
(sequences the shaper does not join into one picture are left out), in code-point order; item
``2k`` is emoji k with its English caption, ``2k + 1`` the same picture with its Chinese one.
"""
import functools
import json
import os

import numpy as np

from ..packages import package_file

__all__ = ["FONT_PACKAGE", "DEFAULT_FONT", "RENDER_SIZE", "LANGUAGES", "EmojiFontMissing", "font_path",
           "load_names", "caption", "render", "EmojiItems"]

FONT_PACKAGE = "fonts-noto-color-emoji"
DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
RENDER_SIZE = 109          # the CBDT strike: the only size at which Pillow opens this font
GLYPH_WIDTH = 136          # advance of one glyph at RENDER_SIZE; wider text is several pictures
MARGIN = 1 / 16            # white margin around the ink, per side, as a share of the square
PACKAGE, MODULE = "emoji", "emoji"
NAME_FILES = {"en": os.path.join("unicode_codes", "emoji.json"), "zh": os.path.join("unicode_codes", "emoji_zh.json")}
LANGUAGES = ("en", "zh")
FULLY_QUALIFIED = 2        # emoji's status code for fully-qualified sequences


class EmojiFontMissing(FileNotFoundError):
    """Noto Color Emoji is not installed where it was looked for; the message says how to get it."""


def font_path(path=""):
    """The emoji font: ``path``, or the Debian package's when ``path`` is "".

    :raises EmojiFontMissing: naming the apt command.
    """
    font = path or DEFAULT_FONT
    if not os.path.isfile(font):
        where = f"data.path {path!r} is not a file" if path else f"{DEFAULT_FONT} does not exist"
        raise EmojiFontMissing(f"Noto Color Emoji not found ({where}): install it with `apt-get install -y "
                               f"{FONT_PACKAGE}` (Debian/Ubuntu), or set data.path to a NotoColorEmoji.ttf; "
                               "nothing is downloaded at run time")
    return font


def _names_files(names_dir=None):
    """{language: path} of emoji's name files: in ``names_dir``, or in the installed package (installed on first use)."""
    if names_dir:
        return {language: os.path.join(names_dir, os.path.basename(relative))
                for language, relative in NAME_FILES.items()}
    return {language: package_file(PACKAGE, MODULE, relative, "the emoji captions",
                                   "copy its emoji/unicode_codes folder and pass names_dir")
            for language, relative in NAME_FILES.items()}


def caption(name):
    """``:grinning_face:`` → "grinning face" (an emoji package name → caption text)."""
    return name.strip(":").replace("_", " ").strip()


@functools.lru_cache(maxsize=2)
def load_names(names_dir=None):
    """[(emoji, English caption, Chinese caption)] of the fully-qualified emoji named in both languages,
    in code-point order."""
    files = _names_files(names_dir)
    with open(files["en"], encoding="utf-8") as f:
        english = json.load(f)
    with open(files["zh"], encoding="utf-8") as f:
        chinese = json.load(f)
    chosen = [(char, caption(entry["en"]), caption(chinese[char])) for char, entry in english.items()
              if entry.get("status") == FULLY_QUALIFIED and char in chinese and entry.get("en")]
    if not chosen:
        raise ValueError(f"the emoji name files {files['en']} and {files['zh']} name no fully-qualified emoji "
                         "in both languages")
    return sorted(chosen, key=lambda entry: [ord(c) for c in entry[0]])


@functools.lru_cache(maxsize=2)
def _font(path):
    from PIL import ImageFont
    return ImageFont.truetype(path, RENDER_SIZE)


def render(char, image_size, font_file):
    """uint8 [image_size, image_size, 3]: ``char`` drawn at the font's bitmap size, cropped to its ink,
    centred on white with a margin, resized with Lanczos; None when the font draws nothing or
    several pictures for it."""
    from PIL import Image, ImageDraw
    font = _font(font_file)
    left, _, right, _ = font.getbbox(char)
    if right - left > GLYPH_WIDTH:
        return None
    canvas = Image.new("RGBA", (2 * GLYPH_WIDTH, 2 * GLYPH_WIDTH), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = round(max(glyph.size) / (1 - 2 * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    picture = square.convert("RGB").resize((image_size, image_size), Image.LANCZOS)
    return np.asarray(picture, np.uint8)


@functools.lru_cache(maxsize=2)
def _rendered(image_size, font_file, names_dir):
    """(pictures uint8 [K, S, S, 3], [(emoji, en, zh)]) of every emoji the font draws as one picture."""
    pictures, kept = [], []
    for entry in load_names(names_dir):
        picture = render(entry[0], image_size, font_file)
        if picture is not None:
            pictures.append(picture)
            kept.append(entry)
    return np.stack(pictures), kept


class EmojiItems:
    """The pipeline's items: ``load(2k + l)`` → (picture of emoji k, its caption in LANGUAGES[l], k)."""

    def __init__(self, image_size, font="", names_dir=None, channels=3):
        if channels != 3:
            raise ValueError(f"data.kind 'emoji' draws RGB pictures; it cannot feed model.in_channels={channels}")
        self.pictures, self.entries = _rendered(image_size, font_path(font), names_dir)
        self.paths = [f"<emoji {char} {language}>" for char, _, _ in self.entries for language in LANGUAGES]

    def __len__(self):
        return len(LANGUAGES) * len(self.entries)

    def load(self, index):
        emoji_index, language = divmod(index, len(LANGUAGES))
        return self.pictures[emoji_index], self.entries[emoji_index][1 + language], emoji_index
