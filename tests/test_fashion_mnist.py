"""Fashion-MNIST: IDX reading, 28 → 32 padding (shared with MNIST), the pipeline, the missing-package error."""
import dataclasses
import gzip
import itertools
import os

import numpy as np
import pytest

from mind_diffusion.config import config_from_dict, load_config
from mind_diffusion.data import create_dataset, fashion_mnist, grayscale28


def _idx_bytes(array):
    """IDX written by hand from the format's definition: 00 00 08 ndim, big-endian uint32 sizes, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """A Fashion-MNIST folder of 6 training and 3 test images: the training pair gzip-compressed, the test pair not."""
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(7)
    arrays = {"train": (rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.array([9, 0, 3, 3, 1, 8], np.uint8)),
              "test": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([2, 5, 7], np.uint8))}
    for (split, prefix), compress in zip(fashion_mnist.SPLITS.items(), (True, False)):
        images, labels = arrays[split]
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return str(folder), arrays


def test_idx_files_read_exactly(tiny_set):
    folder, arrays = tiny_set
    for split in ("train", "test"):
        images, labels = fashion_mnist.load_fashion_mnist(split, folder)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1].astype(np.int64))
        assert images.dtype == np.uint8 and labels.dtype == np.int64


def test_bad_idx_files_are_named(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + bytes(12))  # float32 type code
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        grayscale28.read_idx(str(bad))
    bad.write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"announces \(2, 3\) = 6 bytes, the file holds 5"):
        grayscale28.read_idx(str(bad))


def test_padding_puts_the_image_in_a_black_border_of_two():
    images = np.random.default_rng(0).integers(1, 256, (4, 28, 28), dtype=np.uint8)  # no zeros inside
    out = grayscale28.padded(images)
    assert out.shape == (4, 1, 32, 32) and out.dtype == np.uint8
    expected = np.zeros((4, 1, 32, 32), np.uint8)
    expected[:, 0, 2:30, 2:30] = images
    np.testing.assert_array_equal(out, expected)


def _cfg(path, **data):
    cfg = config_from_dict({"model": {"image_size": 32, "in_channels": 1, "channel_mult": [1, 2],
                                      "attention_resolutions": [16], "class_cond": True, "num_classes": 10},
                            "data": {"kind": "fashion_mnist", "path": path, "random_flip": False, **data}})
    return cfg.data


def test_pipeline_streams_padded_images_with_labels(tiny_set):
    folder, arrays = tiny_set
    stream = create_dataset(_cfg(folder), batch_size=3, seed=1, channels=1)
    images, labels = arrays["train"]
    seen = set()
    for batch in itertools.islice(iter(stream), 2):  # one epoch of 6
        index = batch["index"]
        seen |= set(index.tolist())
        expect = grayscale28.padded(images[index]).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(batch["images"], expect)
        np.testing.assert_array_equal(batch["labels"], labels[index])
    assert seen == set(range(6))
    with pytest.raises(ValueError, match="in_channels=1 and model.image_size=32"):
        create_dataset(_cfg(folder), batch_size=2, channels=3)


def test_missing_package_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(fashion_mnist.FashionMnistMissing, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist("train")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        create_dataset(_cfg(""), batch_size=2, channels=1)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((1, 28, 28), np.uint8)))
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\(.gz\).*apt-get install"):
        fashion_mnist.load_fashion_mnist("test", str(tmp_path / "half"))
    with pytest.raises(ValueError, match="split 'valid'"):
        fashion_mnist.load_fashion_mnist("valid", str(tmp_path))


def test_evaluate_compares_with_the_test_set(tiny_set):
    from mind_diffusion import evaluate
    folder, arrays = tiny_set
    config = load_config("configs/fashion_mnist.yaml", [f"data.path={folder}"])
    assert evaluate.default_data(config) == "fashion_mnist"
    reference = evaluate.load_reference("fashion_mnist", config, 2)
    np.testing.assert_array_equal(reference.images, grayscale28.padded(arrays["test"][0][:2]))
    np.testing.assert_array_equal(reference.labels, [2, 5])
    assert reference.name == "fashion_mnist-test"
    train = evaluate.load_reference("recipe", config, 4)  # the recipe's data = the training split
    np.testing.assert_array_equal(train.images, grayscale28.padded(arrays["train"][0][:4]))


def test_recipe_is_the_mnist_recipe_on_fashion_mnist():
    fashion, digits = load_config("configs/fashion_mnist.yaml"), load_config("configs/mnist.yaml")
    assert fashion.data.kind == "fashion_mnist" and fashion.name == "fashion_mnist"
    assert dataclasses.replace(fashion.data, kind="mnist") == digits.data
    assert (fashion.model, fashion.diffusion, fashion.train, fashion.seed) == \
        (digits.model, digits.diffusion, digits.train, digits.seed)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_DIR),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)")
def test_the_debian_package_holds_60000_and_10000_labelled_images():
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = fashion_mnist.load_fashion_mnist(split)
        assert images.shape == (count, 28, 28) and np.bincount(labels).tolist() == [count // 10] * 10
