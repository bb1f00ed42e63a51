"""28×28 grayscale image sets with ten labels (MNIST, Fashion-MNIST): IDX files, padding to 32×32, items.

Both sets are uint8 [N, 28, 28] images with int labels 0–9. For the diffusion models an image is
padded to 32×32 with black (u8 0, which the pipeline's u8 → [−1, 1] map sends to −1), as
improved-diffusion trains MNIST; the UNet's three halvings then stay whole (32 → 16 → 8 → 4).

IDX (LeCun's MNIST file format, also Fashion-MNIST's): a big-endian header — two zero bytes, a
type code (0x08 = uint8), the number of dimensions d — then d big-endian uint32 sizes and the
data, row-major. Files may be gzip-compressed (``.gz``).
"""
import gzip

import numpy as np

__all__ = ["ORIGINAL_SIZE", "PAD", "IMAGE_SIZE", "NUM_CLASSES", "read_idx", "check_split", "padded",
           "ArrayItems", "check_model_shape"]

ORIGINAL_SIZE = 28
PAD = 2
IMAGE_SIZE = ORIGINAL_SIZE + 2 * PAD      # 32
NUM_CLASSES = 10
IDX_UINT8 = 0x08


def read_idx(path):
    """The uint8 array stored in an IDX file (gzip-compressed when its first bytes say so).

    :raises ValueError: not an IDX file of uint8, or sizes that do not match the data.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != IDX_UINT8 or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {raw[:4].hex()!r}; "
                         "expected 0000 08 <dimensions>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(size) for size in np.frombuffer(raw[4:header], ">u4"))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: the header announces {shape} = {int(np.prod(shape))} bytes, "
                         f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def check_split(images, labels, where):
    """(images uint8 [N, 28, 28], labels int64 [N]) after checking shapes and label range."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (ORIGINAL_SIZE, ORIGINAL_SIZE) or images.dtype != np.uint8:
        raise ValueError(f"{where}: images are {images.dtype} {images.shape}, not uint8 [N, 28, 28]")
    if labels.shape != (len(images),) or (len(labels) and not 0 <= labels.min() <= labels.max() < NUM_CLASSES):
        raise ValueError(f"{where}: labels {labels.shape} do not give one label 0–9 per image ({len(images)} images)")
    return images, labels.astype(np.int64)


def padded(images):
    """uint8 [N, 28, 28] → uint8 [N, 1, 32, 32], a black (0 → −1) border of ``PAD`` pixels."""
    images = np.asarray(images, np.uint8)
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))[:, None]


class ArrayItems:
    """The pipeline's items of a split held in memory: ``load(i)`` → (uint8 [32, 32, 1] padded image, None, label)."""

    def __init__(self, images, labels, name):
        self.images, self.labels = images, labels
        self.paths = [f"<{name} {i}>" for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def load(self, index):
        return padded(self.images[index:index + 1])[0].transpose(1, 2, 0), None, int(self.labels[index])


def check_model_shape(kind, channels, image_size):
    """Refuse a model that cannot take these sets' 1-channel 32×32 images, saying what to set."""
    if channels != 1 or image_size != IMAGE_SIZE:
        raise ValueError(f"data.kind {kind!r} gives 1-channel {IMAGE_SIZE}×{IMAGE_SIZE} images (28×28 padded); "
                         f"set model.in_channels=1 and model.image_size={IMAGE_SIZE} "
                         f"(got {channels} channels, size {image_size})")
