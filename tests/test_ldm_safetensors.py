"""mind_diffusion/safetensors.py: the torch-free .safetensors reader and writer."""
import json
import os
import struct

import numpy as np
import pytest

from mind_diffusion.safetensors import SafetensorsFormatError, load_safetensors, save_safetensors
from mind_diffusion.torch_pickle import load_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_fixture_matches_the_torch_checkpoint():
    """The SD fixture's .safetensors holds exactly the .ckpt's tensors (values, dtypes, shapes)."""
    tensors, metadata = load_safetensors(os.path.join(FIXTURES, "ldm_sd1_tiny.safetensors"))
    ckpt = load_state_dict(os.path.join(FIXTURES, "ldm_sd1_tiny.ckpt"))["state_dict"]
    assert set(tensors) == set(ckpt) and len(tensors) == 405
    for name, value in ckpt.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name
    assert metadata == {"format": "pt"}


def test_round_trip_of_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.normal(size=(2, 3)), "f32": rng.normal(size=(4,)).astype(np.float32),
        "f16": rng.normal(size=(1, 2, 2)).astype(np.float16), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "i32": np.array([-1, 7], np.int32), "u8": np.array([0, 255], np.uint8), "bool": np.array([True, False]),
        "scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 3), np.float32),
        "big_endian": np.arange(3, dtype=">f4"),
    }
    path = tmp_path / "t.safetensors"
    save_safetensors(tensors, path, metadata={"format": "np"})
    back, metadata = load_safetensors(path)
    assert metadata == {"format": "np"} and set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].shape == value.shape and np.array_equal(back[name], value), name
        assert back[name].dtype == value.dtype.newbyteorder("="), name


def test_bfloat16_is_widened_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2")  # bfloat16 = the top half of a float32
    header = json.dumps({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw.tobytes())
    back, _ = load_safetensors(path)
    expected = (raw.astype(np.uint32) << 16).view(np.float32)
    assert back["x"].dtype == np.float32 and np.array_equal(back["x"], expected)
    np.testing.assert_allclose(back["x"], values, rtol=2 ** -8)


def _file(header, data=b""):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("blob, message", [
    (b"abc", "too short"),
    (struct.pack("<Q", 10 ** 6) + b"{}", "does not fit"),
    (struct.pack("<Q", 3) + b"{x}", "unreadable JSON"),
    (_file({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "do not fit"),
    (_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "do not fit"),
    (_file({"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unsupported dtype"),
    (_file({"x": {"dtype": "F32"}}), "malformed"),
])
def test_bad_files_are_named(tmp_path, blob, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(SafetensorsFormatError, match=message):
        load_safetensors(path)
