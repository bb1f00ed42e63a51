"""A judge that says which demo shape, colour and background an image shows.

It reads images the way the demo set draws them: one shape on a plain
background.

1. Background colour = the median of the border pixels (the generator keeps a
   1-pixel margin, so the border is pure background); its name is the nearest
   colour of the background palette (demo BACKGROUNDS).
2. Foreground = the largest connected region of pixels whose colour lies more
   than half-way from the background to the most distant colours in the image.
3. Colour = the palette colour (demo COLORS) nearest to the median of the
   region's core pixels, those nearly as far from the background as the
   shape's own colour; anti-aliased edge pixels are mixtures and are left out.
4. Shape = template matching: the soft coverage map (0 at the background
   colour, 1 at the shape's colour) is cropped to the region's bounding box,
   resized to a fixed grid and compared with the same map of each shape drawn by
   the generator at several sizes and sub-pixel offsets; the nearest wins.

Validated on the generator's own images (tests/test_demo.py, tests/test_judge.py).
"""
import functools

import numpy as np
from PIL import Image
from scipy import ndimage

from mind_diffusion.data.demo import BACKGROUNDS, COLORS, SHAPES, prompt_to_attributes, render

GRID = 24                           # side of the normalised coverage map
TEMPLATE_IMAGE_SIZE = 32            # templates are drawn like demo images of this side
TEMPLATE_SIZES = (7.0, 10.0, 13.0, 17.0, 22.0)   # shape extents in pixels
TEMPLATE_OFFSETS = (0.0, 0.25, 0.5)              # sub-pixel positions of the centre
FOREGROUND_FRACTION = 0.5           # "half-way from the background" threshold
CORE_FRACTION = 0.8                 # core pixels for the colour estimate
CONTRAST_PERCENTILE = 99.0          # the shape's distance from the background, robust to outliers
PALETTE = np.array([colour.rgb for colour in COLORS], dtype=np.float64)
BACKGROUND_PALETTE = np.array([colour.rgb for colour in BACKGROUNDS], dtype=np.float64)


def _nearest(palette, names, rgb):
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))].name


def as_rgb_pixels(image):
    """One image as float64 HWC RGB in [0, 255]: uint8 HWC is taken as is, float CHW (or
    HWC) in [-1, 1] is rescaled."""
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"expected one image (3 dims), got shape {array.shape}")
    if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    return np.clip((array.astype(np.float64) + 1.0) * 127.5, 0.0, 255.0)


def _coverage(pixels):
    """(coverage map in [0, 1], foreground mask, background RGB) of one image."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    contrast = np.percentile(distance, CONTRAST_PERCENTILE)
    if contrast <= 0:
        return np.zeros_like(distance), np.zeros(distance.shape, bool), background
    labels, count = ndimage.label(distance > FOREGROUND_FRACTION * contrast,
                                  structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros_like(distance), np.zeros(distance.shape, bool), background
    sizes = ndimage.sum(np.ones_like(distance), labels, index=np.arange(1, count + 1))
    mask = labels == 1 + int(np.argmax(sizes))
    return np.clip(distance / contrast, 0.0, 1.0), mask, background


def _normalised_map(coverage, mask):
    """Crop the coverage map to the mask's bounding box and resize it to GRID x GRID."""
    rows, cols = np.nonzero(mask)
    crop = coverage[rows.min():rows.max() + 1, cols.min():cols.max() + 1] * mask[
        rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize((GRID, GRID), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _templates():
    """{shape name: [GRID x GRID maps]} drawn by the generator itself."""
    templates = {}
    centre = TEMPLATE_IMAGE_SIZE / 2
    for shape in SHAPES:
        maps = []
        for size in TEMPLATE_SIZES:
            for offset in TEMPLATE_OFFSETS:
                image = render(shape.name, "white", "black", size,
                               (centre + offset, centre + offset), TEMPLATE_IMAGE_SIZE)
                coverage, mask, _ = _coverage(image.astype(np.float64))
                maps.append(_normalised_map(coverage, mask))
        templates[shape.name] = np.stack(maps)
    return templates


def judge(image):
    """Which shape, colour and background the image shows: ``{"shape", "color", "background"}``
    (shape and colour None when the image is blank)."""
    pixels = as_rgb_pixels(image)
    coverage, mask, background_rgb = _coverage(pixels)
    background = _nearest(BACKGROUND_PALETTE, BACKGROUNDS, background_rgb)
    if not mask.any():
        return {"shape": None, "color": None, "background": background}
    core = mask & (coverage >= CORE_FRACTION)
    colour = _nearest(PALETTE, COLORS, np.median(pixels[core if core.any() else mask], axis=0))

    observed = _normalised_map(coverage, mask)
    errors = {name: np.min(np.mean((maps - observed) ** 2, axis=(1, 2)))
              for name, maps in _templates().items()}
    return {"shape": min(errors, key=errors.get), "color": colour, "background": background}


def adherence(images, prompts, wanted=None):
    """How well images follow their prompts, by the judge.

    :param images: a sequence (or batch array) of images, uint8 HWC or float CHW in [-1, 1].
    :param prompts: one demo-style prompt per image, English or Chinese.
    :param wanted: what each prompt asks for, ``{"shape", "color", "background"}`` dicts
        (background None when not named); default: read from the prompts by
        :func:`mind_diffusion.data.demo.prompt_to_attributes`.
    :return: ``{"samples": [per-image dicts with prompt, wanted, judged, shape_ok, color_ok,
        both_ok, background_ok (None when no background is named)], "shape": share,
        "color": share, "both": share, "background": share of the images whose prompt
        names a background that show it (None when no prompt names one),
        "background_named": how many prompts name one}``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("adherence needs at least one image")
    if wanted is not None and len(wanted) != len(prompts):
        raise ValueError(f"{len(wanted)} wanted attributes but {len(prompts)} prompts")
    samples = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        asked = prompt_to_attributes(prompt) if wanted is None else wanted[index]
        if asked["shape"] is None or asked["color"] is None:
            raise ValueError(f"prompt {prompt!r} names no demo shape and colour")
        judged = judge(image)
        shape_ok = judged["shape"] == asked["shape"]
        color_ok = judged["color"] == asked["color"]
        background_ok = None if asked.get("background") is None else judged["background"] == asked["background"]
        samples.append({"prompt": prompt, "wanted": asked, "judged": judged,
                        "shape_ok": shape_ok, "color_ok": color_ok,
                        "both_ok": shape_ok and color_ok, "background_ok": background_ok})
    count = len(samples)
    named = [s["background_ok"] for s in samples if s["background_ok"] is not None]
    return {
        "samples": samples,
        "shape": sum(s["shape_ok"] for s in samples) / count,
        "color": sum(s["color_ok"] for s in samples) / count,
        "both": sum(s["both_ok"] for s in samples) / count,
        "background": sum(named) / len(named) if named else None,
        "background_named": len(named),
    }
