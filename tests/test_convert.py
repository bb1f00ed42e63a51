"""Torch-free checkpoint reading/writing and the OpenAI → MindSpore converter."""
import collections
import hashlib
import io
import json
import os
import pickle
import sys
import types
import zipfile

import mindspore as ms
import numpy as np
import pytest

from mind_diffusion import convert
from mind_diffusion.convert import (
    ConversionError,
    convert_state_dict,
    export_torch_state_dict,
    load_into,
    load_torch_state_dict,
    to_torch_name,
)
from mind_diffusion.torch_pickle import CheckpointFormatError, load_state_dict, save_state_dict
from models.classifier import EncoderUNetModel
from models.unet import UNetModel
from tests.conftest import FIXTURES
from tests.params_util import randomize_parameters

FIXTURE_PT = os.path.join(FIXTURES, "guided_diffusion_unet.pt")


def _fixture_config():
    with np.load(os.path.join(FIXTURES, "guided_diffusion_unet.npz")) as data:
        return json.loads(str(data["config"]))


# --- a stand-in for torch.save written with the standard pickler, independent of our writer ----------

class _Storage:
    def __init__(self, type_name, key, array):
        self.type_name, self.key, self.array = type_name, key, array


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())


def _fake_torch_modules():
    """Modules named like torch's, so the standard pickler writes torch's globals."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("HalfStorage", "BFloat16Storage", "LongStorage", "FloatStorage"):
        setattr(torch_mod, name, type(name, (), {"__module__": "torch"}))
    torch_mod._utils = utils_mod
    return torch_mod, utils_mod


def _write_torch_zip(path, obj, storages, monkeypatch, prefix="model"):
    torch_mod, utils_mod = _fake_torch_modules()
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", getattr(torch_mod, o.type_name), o.key, "cpu", o.array.size)
            return None

        def reducer_override(self, o):
            if isinstance(o, _Tensor):
                return utils_mod._rebuild_tensor_v2, o.args
            return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        archive.writestr(f"{prefix}/byteorder", "little")
        for s in storages:
            archive.writestr(f"{prefix}/data/{s.key}", s.array.tobytes())


def test_reads_strided_offset_shared_and_narrow_storages(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    half = rng.normal(size=24).astype(np.float16)
    bf16_values = np.array([1.5, -2.0, 0.15625, 2.0**120, -0.0], np.float32)  # exactly representable
    bf16 = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
    longs = np.arange(6, dtype=np.int64) - 3
    s_half, s_bf16, s_long = _Storage("HalfStorage", "0", half), _Storage("BFloat16Storage", "1", bf16), \
        _Storage("LongStorage", "2", longs)
    obj = collections.OrderedDict(
        transposed=_Tensor(s_half, 4, (3, 4), (1, 3)),  # a .t() view from element 4 of a shared storage
        head=_Tensor(s_half, 0, (2, 2), (2, 1)),
        bf16=_Tensor(s_bf16, 0, (5,), (1,)),
        longs=_Tensor(s_long, 1, (2, 2), (2, 1)),
        scalar=_Tensor(s_long, 5, (), ()),
    )
    path = tmp_path / "strided.pt"
    _write_torch_zip(path, obj, [s_half, s_bf16, s_long], monkeypatch)
    sd = load_state_dict(path)
    assert list(sd) == list(obj)
    np.testing.assert_array_equal(sd["transposed"], half[4:16].reshape(4, 3).T)
    np.testing.assert_array_equal(sd["head"], half[:4].reshape(2, 2))
    assert sd["transposed"].dtype == np.float16 and sd["longs"].dtype == np.int64
    np.testing.assert_array_equal(sd["bf16"], bf16_values)
    np.testing.assert_array_equal(sd["longs"], longs[1:5].reshape(2, 2))
    assert sd["scalar"].shape == () and sd["scalar"] == 2


def test_refuses_globals_other_than_tensor_rebuilding(tmp_path):
    path = tmp_path / "evil.pt"
    crafted = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."  # os.system("true")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", crafted)
    with pytest.raises(CheckpointFormatError, match="refusing to load global 'os.system'"):
        load_state_dict(path)


def test_rejects_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(text)
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="no <name>/data.pkl"):
        load_torch_state_dict(other_zip)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" + b"\x00" * 16)
    with pytest.raises(CheckpointFormatError, match="legacy"):
        load_torch_state_dict(legacy)


def test_writer_round_trips_and_lays_out_like_torch(tmp_path):
    rng = np.random.default_rng(1)
    sd = {
        "a.weight": rng.normal(size=(3, 4, 1)).astype(np.float32),
        "a.bias": rng.normal(size=(3,)).astype(np.float16),
        "steps": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False]),
        "scalar": np.array(2.5, dtype=np.float64),
    }
    path = tmp_path / "out.pt"
    save_state_dict(sd, path)
    back = load_state_dict(path)
    assert list(back) == list(sd) and isinstance(back, collections.OrderedDict)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value)
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        names = archive.namelist()
        assert {"archive/data.pkl", "archive/byteorder", "archive/version", "archive/data/0"} <= set(names)
        for info in archive.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), "<u2")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        globals_used = {arg for op, arg, _ in __import__("pickletools").genops(archive.read("archive/data.pkl"))
                        if op.name == "GLOBAL"}
    assert globals_used == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage",
                            "torch HalfStorage", "torch LongStorage", "torch BoolStorage", "torch DoubleStorage"}


def test_torch_reads_what_we_write_and_we_read_what_torch_writes(tmp_path):
    """Against PyTorch's own reading and writing, recorded by tests/fixtures/make_torch_pickle_fixture.py
    (torch is no dependency): torch.load(weights_only=True) got our names, dtypes, shapes (0-d included)
    and values from the very bytes our writer still produces; our reader gets torch.save's tensors,
    views into a shared storage and a transposed (strided) one included."""
    ref = np.load(os.path.join(FIXTURES, "torch_pickle_reference.npz"))
    meta = json.loads(str(ref["meta"]))
    sd = {key[len("ours/"):]: ref[key] for key in ref.files if key.startswith("ours/")}
    assert sd["fortran"].flags.f_contiguous  # the strided case survives the npz
    save_state_dict(sd, tmp_path / "ours.pt")
    assert hashlib.sha256((tmp_path / "ours.pt").read_bytes()).hexdigest() == meta["ours_sha256"], \
        "our writer's bytes changed since torch read them: rerun make_torch_pickle_fixture.py with torch"
    assert meta["torch_read_order"] == list(sd)
    for key, value in sd.items():
        read = ref[f"torch_read/{key}"]
        assert read.dtype == value.dtype and read.shape == value.shape, key
        np.testing.assert_array_equal(read, value)

    theirs = {key[len("theirs/"):]: ref[key] for key in ref.files if key.startswith("theirs/")}
    back = load_state_dict(os.path.join(FIXTURES, "torch_pickle_reference.pt"))
    assert list(back) == ["base", "rows", "transposed", "scalar", "half"] and set(back) == set(theirs)
    for key, expected in theirs.items():
        assert back[key].dtype == expected.dtype and back[key].shape == expected.shape, key
        np.testing.assert_array_equal(back[key], expected)


def test_reads_the_guided_diffusion_checkpoint_written_by_torch():
    sd = load_torch_state_dict(FIXTURE_PT)
    assert len(sd) == 217 and all(v.dtype == np.float32 for v in sd.values())
    assert sd["time_embed.0.weight"].shape == (128, 32) and sd["label_emb.weight"].shape == (1000, 128)
    assert sd["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)


def test_rename_rules():
    assert to_torch_name("out.0.gamma") == "out.0.weight"
    assert to_torch_name("input_blocks.1.0.in_layers.0.beta") == "input_blocks.1.0.in_layers.0.bias"
    assert to_torch_name("label_emb.embedding_table") == "label_emb.weight"
    assert to_torch_name("middle_block.1.qkv.weight") == "middle_block.1.qkv.weight"


@pytest.fixture(scope="module")
def fixture_model():
    config = _fixture_config()
    config.pop("kind")
    return convert.build_model({"kind": "unet", **config})


def test_our_names_are_guided_diffusion_names(fixture_model):
    ours = convert.to_torch_state_dict(fixture_model)
    theirs = load_torch_state_dict(FIXTURE_PT)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_reports_missing_mismatched_and_unexpected_keys_by_name(fixture_model):
    sd = load_torch_state_dict(FIXTURE_PT)
    del sd["middle_block.1.qkv.bias"]
    sd["out.2.weight"] = np.zeros((6, 32, 1, 1), np.float32)
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as caught:
        convert_state_dict(sd, fixture_model)
    error = caught.value
    assert error.missing == ["middle_block.1.qkv.bias"]
    assert error.mismatched == [("out.2.weight", (6, 32, 3, 3), (6, 32, 1, 1))]
    assert error.unexpected == ["extra.weight"]
    message = str(error)
    assert "middle_block.1.qkv.bias" in message and "(6, 32, 3, 3)" in message and "extra.weight" in message
    del sd["extra.weight"]
    with pytest.raises(ConversionError, match="missing"):
        convert_state_dict(sd, fixture_model, strict=False)


def _round_trip(model, inputs, tmp_path, seed):
    """ours → torch zip → ours (after scrambling the weights) gives identical outputs."""
    randomize_parameters(model, seed=seed)
    before = model(*inputs).asnumpy()
    path = tmp_path / "model.pt"
    export_torch_state_dict(model, path)
    randomize_parameters(model, seed=seed + 1)
    assert np.abs(model(*inputs).asnumpy() - before).max() > 0
    load_into(model, convert_state_dict(load_torch_state_dict(path), model))
    np.testing.assert_array_equal(model(*inputs).asnumpy(), before)


def test_unet_round_trip(tmp_path):
    model = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, num_classes=3,
                      use_scale_shift_norm=True, resblock_updown=True, encoder_channels=None)
    rng = np.random.default_rng(4)
    inputs = (ms.Tensor(rng.normal(size=(2, 3, 8, 8)).astype(np.float32)), ms.Tensor(np.array([1, 500])),
              ms.Tensor(np.array([0, 2], np.int32)))
    _round_trip(model, inputs, tmp_path, seed=10)


def test_classifier_round_trip(tmp_path):
    model = EncoderUNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
                             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
                             use_scale_shift_norm=True, resblock_updown=True, pool="attention")
    rng = np.random.default_rng(5)
    inputs = (ms.Tensor(rng.normal(size=(2, 3, 8, 8)).astype(np.float32)), ms.Tensor(np.array([1, 500])))
    _round_trip(model, inputs, tmp_path, seed=20)


def test_command_line_converts_the_fixture(tmp_path, capsys):
    out = tmp_path / "unet.ckpt"
    config = json.dumps(_fixture_config())
    assert convert.main([FIXTURE_PT, str(out), "--model-config", config]) == 0
    saved = ms.load_checkpoint(str(out))
    theirs = load_torch_state_dict(FIXTURE_PT)
    np.testing.assert_array_equal(saved["out.0.gamma"].asnumpy(), theirs["out.0.weight"])
    np.testing.assert_array_equal(saved["label_emb.embedding_table"].asnumpy(), theirs["label_emb.weight"])
    assert len(saved) == len(theirs)

    yaml_config = tmp_path / "model.yaml"
    yaml_config.write_text("kind: unet\nimage_size: 32\nnum_channels: 32\nnum_res_blocks: 2\n")
    assert convert.main([FIXTURE_PT, str(out), "--model-config", str(yaml_config)]) == 1
    assert "checkpoint does not match the network" in capsys.readouterr().err

    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    assert convert.main([str(not_a_checkpoint), str(out), "--model-config", config]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err

    assert convert.main([FIXTURE_PT, "--list"]) == 0
    assert "time_embed.0.weight\t(128, 32)\tfloat32" in capsys.readouterr().out


def test_help_explains_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        convert.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--model-config" in text and "without torch" in text and "gamma/beta" in text
