"""Model tensors ↔ pictures: [-1, 1] float images to uint8, and PNG sample grids."""
import math
import os

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


def save_grid(images, path, columns=None, scale=1):
    """Write a PNG grid of uint8 images [N, H, W, C]; ``scale`` enlarges small images (nearest)."""
    grid = make_grid(images, columns)
    picture = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    picture.save(tmp)
    os.replace(tmp, path)
    return path
