"""Data: folders, caption files, transforms, corrupt images, sharding, resume, caption dropout."""
import itertools
import json
import os
import logging

import numpy as np
import pytest
from PIL import Image

from mind_diffusion.config import config_from_dict
from mind_diffusion.data import create_dataset
from mind_diffusion.data.captions import read_captions
from mind_diffusion.data.folder import ImageFolder
from mind_diffusion.data.transforms import center_crop_arr, to_model_input


def solid(path, rgb, size=(20, 20), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format=fmt)


def data_cfg(**data):
    raw = {"model": {"image_size": 16, "channel_mult": [1, 2]}, "data": data}
    if data.get("kind") in ("captions", "demo"):
        raw["model"]["arch"] = "glide"
    if data.pop("class_cond", False):
        raw["model"].update(class_cond=True, num_classes=2)
    return config_from_dict(raw).data


def first_batches(stream, count):
    return list(itertools.islice(iter(stream), count))


def byte_tokenizer(text):
    """A stand-in tokenizer: UTF-8 bytes, 48 positions."""
    ids = np.zeros(48, np.int32)
    raw = list(text.encode("utf-8"))[:48]
    ids[:len(raw)] = raw
    return ids, ids > 0


def decode(tokens):
    return bytes(int(t) for t in tokens if t).decode("utf-8")


@pytest.fixture()
def labelled_folder(tmp_path):
    """cat/ holds red images, dog/ holds blue ones (png, jpg, webp, nested)."""
    root = tmp_path / "images"
    solid(root / "dog" / "a.png", (0, 0, 255))
    solid(root / "dog" / "deeper" / "b.JPG", (0, 0, 255), fmt="JPEG")
    solid(root / "cat" / "c.webp", (255, 0, 0), fmt="WEBP")
    solid(root / "cat" / "d.jpeg", (255, 0, 0), fmt="JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_folder_labels_come_from_sorted_subfolders(labelled_folder):
    folder = ImageFolder(str(labelled_folder), class_cond=True)
    assert folder.class_names == ["cat", "dog"] and len(folder) == 4
    stream = create_dataset(data_cfg(kind="folder", path=str(labelled_folder), class_cond=True,
                                     random_flip=False), batch_size=4)
    batch = first_batches(stream, 1)[0]
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == np.float32
    assert batch["labels"].dtype == np.int32
    for image, label in zip(batch["images"], batch["labels"]):
        red_dominant = image[0].mean() > image[2].mean()
        assert label == (0 if red_dominant else 1)


def test_empty_or_missing_sources_fail_early_and_say_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .png"):
        create_dataset(data_cfg(kind="folder", path=str(tmp_path / "empty")), batch_size=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_dataset(data_cfg(kind="folder", path=str(tmp_path / "nowhere")), batch_size=1)
    empty = tmp_path / "captions.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no image-caption pairs"):
        create_dataset(data_cfg(kind="captions", path=str(empty)), batch_size=1)
    with pytest.raises(FileNotFoundError, match="caption file"):
        create_dataset(data_cfg(kind="captions", path=str(tmp_path / "none.jsonl")), batch_size=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.png"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no 'text' or 'caption'"):
        read_captions(str(bad))


def test_jsonl_and_csv_captions_with_chinese(tmp_path):
    solid(tmp_path / "img" / "0.png", (255, 0, 0))
    solid(tmp_path / "img" / "1.png", (0, 255, 0))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"path": "img/0.png", "text": "一只红色的猫"}, ensure_ascii=False) + "\n"
                     + json.dumps({"image": str(tmp_path / "img" / "1.png"), "caption": "green"}) + "\n",
                     encoding="utf-8")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("image,caption\nimg/0.png,\"蓝色背景上的红色圆形, 高清\"\n", encoding="utf-8-sig")
    assert read_captions(str(jsonl)) == [(str(tmp_path / "img" / "0.png"), "一只红色的猫"),
                                         (str(tmp_path / "img" / "1.png"), "green")]
    assert read_captions(str(csv_file)) == [(str(tmp_path / "img" / "0.png"), "蓝色背景上的红色圆形, 高清")]

    stream = create_dataset(data_cfg(kind="captions", path=str(jsonl), random_flip=False),
                            batch_size=2, tokenizer=byte_tokenizer)
    batch = first_batches(stream, 1)[0]
    texts = {int(i): decode(t) for i, t in zip(batch["index"], batch["tokens"])}
    assert texts == {0: "一只红色的猫", 1: "green"}
    assert batch["mask"].dtype == np.bool_ and batch["tokens"].shape == (2, 48)


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, caplog):
    for i in range(6):
        solid(tmp_path / "imgs" / f"{i}.png", (40 * i, 0, 0))
    good = (tmp_path / "imgs" / "0.png").read_bytes()
    (tmp_path / "imgs" / "2.png").write_bytes(good[: len(good) // 2])      # truncated
    (tmp_path / "imgs" / "4.png").write_bytes(b"this is not an image")     # not an image
    stream = create_dataset(data_cfg(kind="folder", path=str(tmp_path / "imgs")), batch_size=3)
    with caplog.at_level(logging.WARNING, logger="mind_diffusion.data"):
        batches = first_batches(stream, 6)                                  # three epochs
    assert all(b["images"].shape == (3, 3, 16, 16) for b in batches)
    assert sorted(stream.skipped_paths) == [str(tmp_path / "imgs" / "2.png"),
                                            str(tmp_path / "imgs" / "4.png")]
    assert not {2, 4} & {int(i) for b in batches for i in b["index"]}
    assert any("unreadable" in r.message and "2.png" in r.message for r in caplog.records)


def test_two_shards_are_disjoint_cover_the_set_and_resume_exactly():
    cfg = data_cfg(kind="demo", demo_size=16, random_flip=False)
    ranks = [create_dataset(cfg, batch_size=4, rank=r, world_size=2, seed=9) for r in (0, 1)]
    epoch = [np.concatenate([b["index"] for b in first_batches(s, 2)]) for s in ranks]
    assert not set(epoch[0]) & set(epoch[1])
    assert set(epoch[0]) | set(epoch[1]) == set(range(16))
    uninterrupted = first_batches(ranks[0], 5)
    resumed = first_batches(create_dataset(cfg, batch_size=4, rank=0, world_size=2, seed=9,
                                           start_step=3), 2)
    for a, b in zip(uninterrupted[3:], resumed):
        assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["images"], b["images"])
    # a new epoch reshuffles
    assert not np.array_equal(uninterrupted[0]["index"], uninterrupted[2]["index"])


def test_transforms_against_numpy():
    # 16x16 blocks of constant colour at 4x: the box halvings give back the blocks exactly
    blocks = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    assert np.array_equal(center_crop_arr(Image.fromarray(big), 16), blocks)
    # already at the target height: only the centre crop (columns 8..39 of 48)
    wide = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(wide), 32), wide[:, 8:40])
    scaled = to_model_input(blocks)
    assert scaled.dtype == np.float32 and scaled.shape == (3, 16, 16)
    assert np.allclose(scaled, blocks.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0


def test_random_flip_mirrors_about_half_the_images():
    plain = first_batches(create_dataset(data_cfg(kind="demo", demo_size=64, random_flip=False),
                                         batch_size=32, seed=1), 2)
    flipped = first_batches(create_dataset(data_cfg(kind="demo", demo_size=64, random_flip=True),
                                           batch_size=32, seed=1), 2)
    mirrored = 0
    for a, b in zip(plain, flipped):
        assert np.array_equal(a["index"], b["index"])
        for x, y in zip(a["images"], b["images"]):
            same, mirror = np.array_equal(x, y), np.array_equal(x[:, :, ::-1], y)
            assert same or mirror
            mirrored += mirror and not same
    assert 16 <= mirrored <= 48


def test_caption_dropout_rate_and_determinism():
    cfg = data_cfg(kind="demo", demo_size=400, caption_dropout=0.3)
    batches = first_batches(create_dataset(cfg, batch_size=40, tokenizer=byte_tokenizer, seed=4), 10)
    dropped = np.mean([not mask.any() for b in batches for mask in b["mask"]])
    assert abs(dropped - 0.3) < 0.07          # 3 standard deviations of 400 draws
    again = first_batches(create_dataset(cfg, batch_size=40, tokenizer=byte_tokenizer, seed=4), 10)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))


def test_folder_without_captions_refuses_a_tokenizer(labelled_folder):
    with pytest.raises(ValueError, match="no captions"):
        create_dataset(data_cfg(kind="folder", path=str(labelled_folder)), batch_size=1,
                       tokenizer=byte_tokenizer)


def test_grayscale_and_transparent_images_load_with_the_models_channels(tmp_path):
    """model.in_channels = 1 loads folder images as grayscale (ITU-R 601 luma, PIL's "L"); RGBA is
    composited over white before RGB, so a fully transparent pixel is white, not its stored colour."""
    from PIL import Image
    os.makedirs(tmp_path / "g")
    Image.new("RGB", (16, 16), (200, 100, 50)).save(tmp_path / "g" / "0.png")
    Image.new("L", (16, 16), 77).save(tmp_path / "g" / "1.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255            # stored red, but transparent on the left half
    rgba[:, 8:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "g" / "2.png")
    gray = create_dataset(data_cfg(kind="folder", path=str(tmp_path / "g"), random_flip=False), batch_size=3,
                          channels=1)
    batch = first_batches(gray, 1)[0]
    assert batch["images"].shape == (3, 1, 16, 16)
    by_index = {int(i): img for i, img in zip(batch["index"], batch["images"])}
    luma = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # PIL's integer conversion rounds
    np.testing.assert_allclose(by_index[0], luma / 127.5 - 1, atol=1 / 127.5)
    np.testing.assert_allclose(by_index[1], 77 / 127.5 - 1, atol=1e-6)
    rgb = first_batches(create_dataset(data_cfg(kind="folder", path=str(tmp_path / "g"), random_flip=False),
                                       batch_size=3), 1)[0]
    transparent = {int(i): img for i, img in zip(rgb["index"], rgb["images"])}[2]
    np.testing.assert_allclose(transparent[:, :, :8], 1.0)                 # white where transparent
    red = np.broadcast_to(np.array([1.0, -1.0, -1.0], np.float32).reshape(3, 1, 1), (3, 16, 8))
    np.testing.assert_allclose(transparent[:, :, 8:], red)  # red where opaque
    with pytest.raises(ValueError, match="model.in_channels=1"):
        create_dataset(data_cfg(kind="demo", demo_size=8), batch_size=2, channels=1)


def test_malformed_caption_lines_are_skipped_and_counted(tmp_path, caplog):
    lines = [json.dumps({"path": "a.png", "text": "a cat"}), "{not json", json.dumps({"path": "b.png"}),
             json.dumps(["a list"]), json.dumps({"image": "c.png", "caption": "一只猫"})]
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mind_diffusion.data"):
        pairs = read_captions(str(path))
    assert [text for _, text in pairs] == ["a cat", "一只猫"]
    message = " ".join(r.message for r in caplog.records)
    assert "skipped 3 malformed line(s)" in message and "caps.jsonl:2" in message and "caps.jsonl:3" in message
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no image-caption pairs.*1 malformed"):
        read_captions(str(bad))
