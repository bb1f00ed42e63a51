"""Fashion-MNIST (Xiao et al. 2017) from the Debian package ``dataset-fashion-mnist``, never downloaded.

``apt-get install -y dataset-fashion-mnist`` installs the four gzip-compressed IDX files into
``/usr/share/datasets/fashion-mnist/``: ``train-images-idx3-ubyte.gz`` (60 000 × 28 × 28),
``train-labels-idx1-ubyte.gz`` and the ``t10k-`` pair of the 10 000 test images. ``data.path`` may
name another folder holding the same files (gzip-compressed or not), e.g. on a machine without
Debian packages. Images are padded to 32×32 like MNIST's (:mod:`.grayscale28`); labels are the ten
garment classes of :data:`CLASS_NAMES`.
"""
import functools
import os

from .grayscale28 import ArrayItems, check_split, read_idx

__all__ = ["DEBIAN_PACKAGE", "DEFAULT_DIR", "SPLITS", "CLASS_NAMES", "FashionMnistMissing", "data_dir",
           "load_fashion_mnist", "items"]

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}   # split → file prefix
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
INSTALL_HINT = (f"install it with `apt-get install -y {DEBIAN_PACKAGE}` (Debian/Ubuntu: the files land in "
                f"{DEFAULT_DIR}), or set data.path to a folder holding train-images-idx3-ubyte.gz, "
                "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                "(.gz optional); nothing is downloaded at run time")


class FashionMnistMissing(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for; the message says how to get them."""


def _file(folder, name):
    """``folder/name`` or ``folder/name.gz``, whichever exists, else None."""
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def data_dir(path=""):
    """The folder of the IDX files: ``path``, or the Debian package's when ``path`` is "".

    :raises FashionMnistMissing: the folder or its files are missing, naming the apt command.
    """
    folder = path or DEFAULT_DIR
    if not os.path.isdir(folder):
        where = f"data.path {path!r} is not a folder" if path else f"{DEFAULT_DIR} does not exist"
        raise FashionMnistMissing(f"Fashion-MNIST not found ({where}): {INSTALL_HINT}")
    return folder


@functools.lru_cache(maxsize=4)
def _read(folder, split):
    prefix = SPLITS[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_file(folder, name) for name in names]
    missing = [name for name, found in zip(names, paths) if found is None]
    if missing:
        raise FashionMnistMissing(f"Fashion-MNIST: {folder} lacks {', '.join(n + '(.gz)' for n in missing)}: "
                                  f"{INSTALL_HINT}")
    images, labels = (read_idx(path) for path in paths)
    return check_split(images, labels, f"Fashion-MNIST {split} in {folder}")


def load_fashion_mnist(split, path=""):
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` ("train": 60 000, "test": 10 000).

    :param path: the folder of the IDX files; "" = the Debian package's.
    """
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split {split!r}: use one of {', '.join(SPLITS)}")
    return _read(os.path.abspath(data_dir(path)), split)


def items(split="train", path=""):
    """The pipeline's items of a split (32×32 padded images with labels)."""
    images, labels = load_fashion_mnist(split, path)
    return ArrayItems(images, labels, f"fashion-mnist {split}")
