"""Model tensors ↔ pictures: [-1, 1] float images to uint8, and PNG sample grids (optionally with their prompts)."""
import functools
import math
import os
import shutil
import subprocess
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

LABEL_FONT_SIZE = 10      # pixels
LABEL_LINES = 3           # caption lines drawn under a tile; longer captions end in "…"
CAPTIONS_KEY = "Captions"  # PNG text chunk holding the grid's captions, one line per tile


def to_uint8(images):
    """[-1, 1] float images [N, C, H, W] → uint8 [N, H, W, C], rounding like the papers' sample scripts."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images, columns=None, padding=2):
    """uint8 images [N, H, W, C] tiled into one picture with ``columns`` per row (default: ≈ square)."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                   255, dtype=np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def caption_lines(captions):
    """The text of a grid's captions: one line per tile, row by row, ``<tile number>: <caption>``
    (numbered from 1; line breaks inside a caption become spaces)."""
    return "".join(f"{i}: {' '.join(str(c).split())}\n" for i, c in enumerate(captions, start=1))


def find_font(texts):
    """A font file that has a glyph for every character of ``texts``, or None.

    Asks fontconfig (``fc-list :charset=...``), so CJK captions find e.g. Debian's
    fonts-noto-cjk when it is installed; None when fontconfig is missing or no
    installed font covers them all.
    """
    characters = sorted({ch for text in texts for ch in text if not ch.isspace()})
    return _font_covering(" ".join(f"{ord(ch):x}" for ch in characters))


@functools.lru_cache(maxsize=64)
def _font_covering(charset):
    try:
        listing = subprocess.run(["fc-list", f":charset={charset}", "file"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = [line.split(":")[0].strip() for line in listing.splitlines() if line.strip()]
    fonts = [f for f in files if f.lower().endswith((".ttf", ".otf", ".ttc"))]
    # plain sans-serif faces read best at 10 pixels
    fonts.sort(key=lambda f: ("sans" not in f.lower(), "mono" in f.lower(),
                              any(s in f.lower() for s in ("bold", "italic", "oblique", "light", "math")), f))
    return fonts[0] if fonts else None


def _wrapped(text, font, width):
    """At most LABEL_LINES lines of ``text`` that fit ``width`` pixels, character by character
    (so CJK, which has no spaces, wraps too); the last one ends in "…" when text is left over."""
    lines, line = [], ""
    for ch in " ".join(str(text).split()):
        if font.getlength(line + ch) <= width or not line:
            line += ch
        elif ch == " " or line.endswith(" "):   # a break between words
            lines.append(line.rstrip())
            line = ch.lstrip()
        elif " " in line:   # break before the word that does not fit
            head, tail = line.rsplit(" ", 1)
            lines.append(head)
            line = tail + ch
        else:
            lines.append(line)
            line = ch.lstrip()
    lines.append(line)
    if len(lines) > LABEL_LINES:
        last = lines[LABEL_LINES - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:LABEL_LINES - 1] + [last + "…"]
    return lines


def _labelled(picture, captions, columns, font_path):
    """``picture`` (a grid of equal tiles) with each tile's caption drawn in a band under its row."""
    font = ImageFont.truetype(font_path, LABEL_FONT_SIZE)
    rows = math.ceil(len(captions) / columns)
    tile_w, tile_h = picture.width / columns, picture.height / rows
    band = LABEL_LINES * (LABEL_FONT_SIZE + 2) + 2
    out = Image.new(picture.mode, (picture.width, rows * (round(tile_h) + band)), "white")
    draw = ImageDraw.Draw(out)
    fill = 0 if picture.mode == "L" else (0, 0, 0)
    for row in range(rows):
        top = row * (round(tile_h) + band)
        out.paste(picture.crop((0, round(row * tile_h), picture.width, round((row + 1) * tile_h))), (0, top))
        for column in range(columns):
            index = row * columns + column
            if index >= len(captions):
                break
            for k, line in enumerate(_wrapped(captions[index], font, tile_w - 4)):
                draw.text((round(column * tile_w) + 2, top + round(tile_h) + 1 + k * (LABEL_FONT_SIZE + 2)),
                          line, font=font, fill=fill)
    return out


def save_grid(images, path, columns=None, scale=1, overwrite=True, captions=None):
    """Write a PNG grid of uint8 images [N, H, W, C]; ``scale`` enlarges small images (nearest).

    ``captions`` (one per image, e.g. the prompts) are kept with the grid three
    ways: in the PNG's text chunk (key ``Captions``), in a sidecar ``<stem>.txt``
    next to it (both :func:`caption_lines`), and drawn under each tile when an
    installed font covers all their characters (:func:`find_font`; CJK needs one
    such as Debian's fonts-noto-cjk, and without it nothing is drawn).

    The picture is written to a temporary file in the same folder and then moved
    into place, so no reader ever sees half a PNG. With ``overwrite=False`` an
    existing file is never replaced: the grid takes the first free name of
    ``path``, ``<stem>-2.png``, ``<stem>-3.png``, … (a name whose sidecar is taken
    counts as taken). Returns the path written.
    """
    if captions is not None:
        captions = [str(c) for c in captions]
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images: give one per image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, columns)
    picture = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    info = None
    if captions is not None:
        font = find_font(captions)
        if font is not None:
            picture = _labelled(picture, captions, columns, font)
        info = PngInfo()
        info.add_itxt(CAPTIONS_KEY, caption_lines(captions))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A name of its own (not mkstemp's, which would make the PNG private to its owner).
    tmp = os.path.join(folder, f".partial_{os.getpid()}_{uuid.uuid4().hex[:12]}.png")
    try:
        with open(tmp, "xb") as f:
            picture.save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
            written = path
        else:
            written = _move_to_free_name(tmp, path, with_sidecar=captions is not None)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if captions is not None:
        _write_sidecar(sidecar_path(written), caption_lines(captions))
    return written


def sidecar_path(grid_path):
    """The captions file that goes with a grid: ``<stem>.txt``."""
    return os.path.splitext(grid_path)[0] + ".txt"


def _write_sidecar(path, text):
    tmp = f"{path}.partial_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _numbered_names(path):
    """``path``, then ``<stem>-2<ext>``, ``<stem>-3<ext>``, …: the names tried for a file that must not overwrite."""
    stem, ext = os.path.splitext(path)
    yield path
    number = 2
    while True:
        yield f"{stem}-{number}{ext}"
        number += 1


def _move_to_free_name(tmp, path, with_sidecar=False):
    """Give the finished file ``tmp`` the first free name of :func:`_numbered_names` and return it.

    A hard link claims a name atomically and fails if it is taken, so two
    processes writing the same name at once both keep their files. File systems
    without hard links fall back to exclusive creation and a copy. With
    ``with_sidecar``, a name whose :func:`sidecar_path` exists is skipped too.
    """
    for candidate in _numbered_names(path):
        if with_sidecar and os.path.exists(sidecar_path(candidate)):
            continue
        try:
            os.link(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some network and FAT file systems)
            try:
                with open(candidate, "xb") as target, open(tmp, "rb") as source:
                    shutil.copyfileobj(source, target)
                return candidate
            except FileExistsError:
                continue
