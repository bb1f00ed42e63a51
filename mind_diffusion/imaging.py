"""Model tensors ↔ pictures: [-1, 1] float images to uint8, and PNG sample grids."""
import math
import os
import shutil
import uuid

import numpy as np
from PIL import Image


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


def save_grid(images, path, columns=None, scale=1, overwrite=True):
    """Write a PNG grid of uint8 images [N, H, W, C]; ``scale`` enlarges small images (nearest).

    The picture is written to a temporary file in the same folder and then moved
    into place, so no reader ever sees half a PNG. With ``overwrite=False`` an
    existing file is never replaced: the grid takes the first free name of
    ``path``, ``<stem>-2.png``, ``<stem>-3.png``, … Returns the path written.
    """
    grid = make_grid(images, columns)
    picture = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A name of its own (not mkstemp's, which would make the PNG private to its owner).
    tmp = os.path.join(folder, f".partial_{os.getpid()}_{uuid.uuid4().hex[:12]}.png")
    try:
        with open(tmp, "xb") as f:
            picture.save(f, format="PNG")
        if overwrite:
            os.replace(tmp, path)
            return path
        return _move_to_free_name(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _numbered_names(path):
    """``path``, then ``<stem>-2<ext>``, ``<stem>-3<ext>``, …: the names tried for a file that must not overwrite."""
    stem, ext = os.path.splitext(path)
    yield path
    number = 2
    while True:
        yield f"{stem}-{number}{ext}"
        number += 1


def _move_to_free_name(tmp, path):
    """Give the finished file ``tmp`` the first free name of :func:`_numbered_names` and return it.

    A hard link claims a name atomically and fails if it is taken, so two
    processes writing the same name at once both keep their files. File systems
    without hard links fall back to exclusive creation and a copy.
    """
    for candidate in _numbered_names(path):
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
