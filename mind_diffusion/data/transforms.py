"""Image transforms: decode, centre-crop and resize, flip, scale to [-1, 1], box-downsample.

The resize follows guided-diffusion's ``center_crop_arr``: halve with a box
filter while the image is at least twice the target (cheap, alias-free), then
one bicubic resize so the short side equals the target, then a centre crop.
"""
import numpy as np
from PIL import Image


class UnreadableImage(Exception):
    """An image file that cannot be decoded (missing, truncated, not an image)."""


def load_image(path, channels=3):
    """Decode a whole image file into a PIL image with ``channels`` (1: grayscale "L", 3: "RGB").

    Transparent images (RGBA, LA, palette with transparency) are composited over
    white first, so transparent pixels do not turn into whatever colour they
    happen to store. ``Image.load()`` forces the full decode, so truncated files
    fail here and not later inside the pipeline; every failure becomes UnreadableImage.
    """
    if channels not in (1, 3):
        raise ValueError(f"images can be loaded with 1 or 3 channels, not {channels}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{path}: {err}") from err


def load_rgb(path):
    """Decode a whole image file into an RGB PIL image (see :func:`load_image`)."""
    return load_image(path, 3)


def center_crop_arr(image, image_size):
    """Resize a PIL image so its short side is ``image_size``, centre-crop a square;
    returns uint8 [image_size, image_size, C] (C = 1 for grayscale, 3 for RGB)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:  # grayscale: HW → HW1
        array = array[:, :, None]
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def horizontal_flip(array):
    """Mirror an HWC image left-right."""
    return array[:, ::-1]


def to_model_input(array):
    """uint8 HWC → float32 CHW in [-1, 1] (x / 127.5 − 1)."""
    return (array.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def box_downsample(images, size):
    """Average ``factor × factor`` pixel blocks: [..., C, H, W] → [..., C, size, size], H = W = factor · size.

    The low-resolution input of a super-resolution model (GLIDE's upsampler)
    made from a training image: the area average is what a camera of the lower
    resolution would record, and it never aliases.
    """
    images = np.asarray(images)
    height, width = images.shape[-2:]
    if height != width or height % size:
        raise ValueError(f"cannot box-downsample {height}x{width} images to {size}x{size}: "
                         "the side must be a multiple of the target")
    factor = height // size
    blocks = images.reshape(images.shape[:-2] + (size, factor, size, factor))
    return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(images.dtype)
