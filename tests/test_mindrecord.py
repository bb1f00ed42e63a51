"""MindRecord shards: conversion (round trip, bad images, refusal, atomicity), per-rank reading, exact resume."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mind_diffusion.checkpoints import read_checkpoint
from mind_diffusion.config import config_from_dict
from mind_diffusion.data import create_dataset, mindrecord, preview_items
from mind_diffusion.data.transforms import center_crop_arr, load_image, to_model_input

NUM_GOOD = 12


def _image(path, rng, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def caption_set(tmp_path_factory):
    """12 random PNGs with bilingual captions, one file that is no image and one missing file."""
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(NUM_GOOD):
        _image(root / "img" / f"{i}.png", rng, 8 + i % 3 * 4)
        lines.append({"path": f"img/{i}.png", "text": f"第 {i} 张 picture {i}"})
    (root / "img" / "bad.png").write_bytes(b"this is not a png")
    lines.insert(3, {"path": "img/bad.png", "text": "bad"})
    lines.insert(7, {"path": "img/missing.png", "text": "missing"})
    (root / "caps.jsonl").write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines),
                                     encoding="utf-8")
    out = root / "shards"
    assert mindrecord.main([str(root / "caps.jsonl"), str(out), "--shards", "3"]) == 0
    return root, out


@pytest.fixture(scope="module")
def label_set(tmp_path_factory):
    """cat/ (5 images) and dog/ (7 images), converted into 2 shards."""
    root = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(1)
    for i in range(NUM_GOOD):
        _image(root / "img" / ("cat" if i < 5 else "dog") / f"{i}.png", rng, 8)
    out = root / "shards"
    mindrecord.convert(str(root / "img"), str(out), 2, progress=False)
    return root, out


def _all_records(out):
    folder, meta = mindrecord.read_meta(str(out))
    rows = mindrecord.rank_dataset(mindrecord.shard_files(folder, meta), 0, 1)
    return {int(record_id): (bytes(image), str(caption), int(label), )
            for image, caption, label, record_id in rows.create_tuple_iterator(num_epochs=1, output_numpy=True)}


def test_round_trip_keeps_image_bytes_and_captions_exactly(caption_set):
    root, out = caption_set
    lines = [json.loads(line) for line in (root / "caps.jsonl").read_text(encoding="utf-8").splitlines()]
    records = _all_records(out)
    good = [i for i, line in enumerate(lines) if line["text"] not in ("bad", "missing")]
    assert sorted(records) == good  # ids are input positions; the two bad lines are absent
    for record_id, (data, caption, label) in records.items():
        assert data == (root / lines[record_id]["path"]).read_bytes()
        assert caption == lines[record_id]["text"] and label == 0
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["count"] == NUM_GOOD and meta["captions"] is True
    assert meta["shards"] == ["data.mindrecord0", "data.mindrecord1", "data.mindrecord2"]


def test_round_trip_keeps_folder_labels(label_set):
    root, out = label_set
    records = _all_records(out)
    paths = sorted((root / "img").rglob("*.png"))  # folder order = the ids
    assert len(records) == len(paths) == NUM_GOOD
    for record_id, (data, caption, label) in records.items():
        assert data == paths[record_id].read_bytes() and caption == ""
        assert label == (0 if paths[record_id].parent.name == "cat" else 1)
    assert mindrecord.read_meta(str(out))[1]["class_names"] == ["cat", "dog"]


def test_bad_images_are_skipped_and_counted_by_reason(caption_set, capsys):
    root, out = caption_set
    meta = mindrecord.read_meta(str(out))[1]
    assert meta["skipped"] == {"missing file": 1, "not an image": 1}
    assert meta["skipped_examples"]["not an image"] == [str(root / "img" / "bad.png")]
    # and the command says so
    mindrecord.main([str(root / "caps.jsonl"), str(root / "again"), "--shards", "1"])
    printed = capsys.readouterr().out
    assert f"wrote {NUM_GOOD} images with captions" in printed and "skipped 2" in printed
    assert "missing file: 1" in printed and "not an image: 1" in printed


def test_existing_shards_are_refused_unless_overwrite(caption_set, tmp_path, capsys):
    root, _ = caption_set
    out = tmp_path / "out"
    mindrecord.convert(str(root / "caps.jsonl"), str(out), 2, progress=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert mindrecord.main([str(root / "caps.jsonl"), str(out), "--shards", "3"]) == 2
    error = capsys.readouterr().err
    assert "already holds MindRecord files" in error and "--overwrite" in error
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        mindrecord.convert(str(root / "caps.jsonl"), str(out), 3, progress=False)
    mindrecord.convert(str(root / "caps.jsonl"), str(out), 3, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == sorted(["meta.json"] + [f"data.mindrecord{i}{s}" for i in range(3)
                                                              for s in ("", ".db")])
    assert len(_all_records(out)) == NUM_GOOD


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(caption_set, tmp_path, monkeypatch):
    root, _ = caption_set
    from mindspore.mindrecord import FileWriter

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(FileWriter, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mindrecord.convert(str(root / "caps.jsonl"), str(tmp_path / "out"), 2, progress=False)
    assert os.listdir(tmp_path) == []  # neither OUT_DIR nor the staging folder
    # shards without meta.json (e.g. copied by hand, or a kill during the final moves) are refused by the reader
    monkeypatch.undo()
    mindrecord.convert(str(root / "caps.jsonl"), str(tmp_path / "out"), 2, progress=False)
    os.remove(tmp_path / "out" / "meta.json")
    with pytest.raises(mindrecord.IncompleteShards, match="interrupted"):
        mindrecord.read_meta(str(tmp_path / "out" / "data.mindrecord0"))


def _data_cfg(path, arch="glide", **data):
    model = {"image_size": 8, "channel_mult": [1, 2], "attention_resolutions": [4], "arch": arch}
    if data.pop("class_cond", False):
        model.update(class_cond=True, num_classes=2)
    return config_from_dict({"model": model, "data": {"kind": "mindrecord", "path": str(path), **data}}).data


def _tokenizer(text):
    ids = np.zeros(48, np.int32)
    raw = list(text.encode("utf-8"))[:48]
    ids[:len(raw)] = raw
    return ids, ids > 0


def _batches(stream, count):
    return list(itertools.islice(iter(stream), count))


def test_ranks_read_disjoint_shards_that_cover_every_record(caption_set):
    _, out = caption_set
    cfg = _data_cfg(out, random_flip=False)
    seen = []
    for rank in range(3):  # 12 records, 3 ranks: one epoch = 4 samples a rank = 2 batches of 2
        batches = _batches(create_dataset(cfg, 2, rank=rank, world_size=3, end_step=2), 2)
        seen.append({int(i) for batch in batches for i in batch["index"]})
        assert len(seen[-1]) == 4
    assert set.union(*seen) == set(_all_records(out)) and sum(map(len, seen)) == NUM_GOOD


def test_batches_carry_decoded_images_captions_and_labels(caption_set, label_set):
    root, out = caption_set
    batch = _batches(create_dataset(_data_cfg(out, random_flip=False), 4, tokenizer=_tokenizer, end_step=1), 1)[0]
    lines = [json.loads(line) for line in (root / "caps.jsonl").read_text(encoding="utf-8").splitlines()]
    for image, index, tokens in zip(batch["images"], batch["index"], batch["tokens"]):
        line = lines[int(index)]
        expected = center_crop_arr(load_image(str(root / line["path"])), 8)  # as data.kind captions decodes
        np.testing.assert_array_equal(image, to_model_input(expected))
        assert bytes(int(t) for t in tokens if t).decode("utf-8") == line["text"]
    _, labelled = label_set
    batch = _batches(create_dataset(_data_cfg(labelled, arch="unet", class_cond=True), 6, end_step=1), 1)[0]
    records = _all_records(labelled)
    assert [records[int(i)][2] for i in batch["index"]] == batch["labels"].tolist()
    with pytest.raises(ValueError, match="no captions"):
        create_dataset(_data_cfg(labelled, arch="unet"), 2, tokenizer=_tokenizer)
    images, texts, labels = preview_items(_data_cfg(out), 3)
    assert images.shape == (3, 3, 8, 8) and all(text.startswith("第") for text in texts)


def test_a_resumed_stream_continues_exactly_mid_epoch(caption_set, monkeypatch):
    # A shuffle window of 4 records and 6 records a rank (2 ranks): resuming at steps 1, 2, 5 starts inside a
    # window, at a window's end and in the third epoch; every column must equal the uninterrupted stream's.
    monkeypatch.setattr(mindrecord, "SHUFFLE_WINDOW", 4)
    _, out = caption_set
    cfg = _data_cfg(out, caption_dropout=0.3)
    for rank in range(2):
        def stream(start):
            return create_dataset(cfg, 3, rank=rank, world_size=2, tokenizer=_tokenizer, seed=5, start_step=start,
                                  end_step=8, noise_shape=(3, 8, 8))
        straight = _batches(stream(0), 8)
        epochs = [sorted(int(i) for batch in straight[e:e + 2] for i in batch["index"]) for e in range(0, 8, 2)]
        assert all(epoch == epochs[0] for epoch in epochs)   # every epoch reads this rank's 6 records …
        assert len({tuple(int(i) for b in straight[e:e + 2] for i in b["index"]) for e in range(0, 8, 2)}) > 1
        for start in (1, 2, 5):                               # … in an order that changes with the epoch
            resumed = _batches(stream(start), 8 - start)
            assert len(resumed) == 8 - start
            for ours, reference in zip(resumed, straight[start:]):
                assert ours.keys() == reference.keys()
                for name in reference:
                    np.testing.assert_array_equal(ours[name], reference[name], err_msg=f"rank {rank} {name}")


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m mind_diffusion.data.mindrecord"):
        mindrecord.read_meta(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mindrecord.convert(str(tmp_path / "nowhere.jsonl"), str(tmp_path / "out"), 1, progress=False)
    with pytest.raises(Exception, match="data.path"):
        config_from_dict({"data": {"kind": "mindrecord"}})


def test_training_resumed_mid_epoch_ends_bit_identical(caption_set, tmp_path):
    # The tiny recipe on the 12 MindRecord images: batch 4 = a third of an epoch a step, so the checkpoint at
    # step 4 lies in the middle of the second epoch. Resuming from it must give the uninterrupted run's step 6.
    _, out = caption_set
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOG_v="3", PY=sys.executable)
    common = ["configs/tiny.yaml", "data.kind=mindrecord", f"data.path={out}", "data.caption_dropout=0.2",
              "data.random_flip=true", "train.total_steps=6", "train.save_every=2", "--no-progress"]

    def launch(*args):
        result = subprocess.run(["bash", "run_train.sh", "1", *common, *args], cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    launch("--run-dir", str(tmp_path / "straight"))
    launch("--run-dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "straight" / "ckpt_00000004.ckpt"))
    ours = read_checkpoint(str(tmp_path / "resumed" / "ckpt_00000006.ckpt"))
    reference = read_checkpoint(str(tmp_path / "straight" / "ckpt_00000006.ckpt"))
    names = [name for name in reference if name != "config"]
    assert names and set(names) == {name for name in ours if name != "config"}
    for name in names:
        np.testing.assert_array_equal(ours[name].asnumpy(), reference[name].asnumpy(), err_msg=name)


def test_help_and_a_bad_input_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mindrecord.main(["--help"])
    assert exit_info.value.code == 0 and "--shards" in capsys.readouterr().out
    assert mindrecord.main([str(tmp_path / "none.jsonl"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()
