"""Sample grids that carry their prompts: PNG text chunk, sidecar file, and labels when a font allows."""
import numpy as np
import pytest
from PIL import Image

from mind_diffusion import imaging
from mind_diffusion.imaging import CAPTIONS_KEY, caption_lines, find_font, save_grid, sidecar_path

CAPTIONS = ["a red circle", "蓝色背景上的红色圆形", "a violet plus sign, grey background", "红色的圆"]


def _tiles(count=4, size=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_captions_go_into_the_png_and_a_sidecar(tmp_path):
    path = save_grid(_tiles(), str(tmp_path / "grid.png"), columns=2, scale=4, captions=CAPTIONS)
    expected = "1: a red circle\n2: 蓝色背景上的红色圆形\n3: a violet plus sign, grey background\n4: 红色的圆\n"
    assert caption_lines(CAPTIONS) == expected
    with Image.open(path) as picture:
        assert picture.text[CAPTIONS_KEY] == expected
    assert sidecar_path(path) == str(tmp_path / "grid.txt")
    with open(sidecar_path(path), encoding="utf-8") as f:
        assert f.read() == expected


def test_labels_are_drawn_exactly_when_a_font_covers_the_captions(tmp_path):
    tiles = _tiles()
    plain = np.asarray(Image.open(save_grid(tiles, str(tmp_path / "plain.png"), columns=2, scale=4)))
    for name, captions in (("latin", ["a red circle", "a blue star", "two", "three"]), ("cjk", CAPTIONS)):
        labelled = np.asarray(Image.open(save_grid(tiles, str(tmp_path / f"{name}.png"), columns=2, scale=4,
                                                   captions=captions)))
        if find_font(captions) is None:
            np.testing.assert_array_equal(labelled, plain)
        else:
            band = imaging.LABEL_LINES * (imaging.LABEL_FONT_SIZE + 2) + 2
            tile = plain.shape[0] // 2
            assert labelled.shape == (plain.shape[0] + 2 * band, plain.shape[1], 3)
            # the tiles are unchanged; text (dark pixels) is drawn in each row's band
            np.testing.assert_array_equal(labelled[:tile], plain[:tile])
            np.testing.assert_array_equal(labelled[tile + band:2 * tile + band], plain[tile:])
            assert (labelled[tile:tile + band] < 128).any() and (labelled[2 * tile + band:] < 128).any()


def test_without_a_font_nothing_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "find_font", lambda texts: None)
    tiles = _tiles()
    plain = np.asarray(Image.open(save_grid(tiles, str(tmp_path / "plain.png"), columns=2)))
    path = save_grid(tiles, str(tmp_path / "captioned.png"), columns=2, captions=["a", "b", "c", "d"])
    np.testing.assert_array_equal(np.asarray(Image.open(path)), plain)
    assert Image.open(path).text[CAPTIONS_KEY] == "1: a\n2: b\n3: c\n4: d\n"


def test_font_lookup_needs_every_character():
    font = find_font(["abc"])
    assert find_font(["abc\U0010fffd"]) is None       # a private-use character no font has
    assert font is None or font.lower().endswith((".ttf", ".otf", ".ttc"))


def test_no_overwrite_keeps_png_and_sidecar_together(tmp_path):
    target = str(tmp_path / "grid.png")
    (tmp_path / "grid-2.txt").write_text("someone else's captions\n", encoding="utf-8")
    first = save_grid(_tiles(), target, overwrite=False, captions=CAPTIONS)
    second = save_grid(_tiles(), target, overwrite=False, captions=CAPTIONS[::-1])
    assert (first, second) == (target, str(tmp_path / "grid-3.png"))   # grid-2's sidecar name is taken
    assert (tmp_path / "grid-2.txt").read_text(encoding="utf-8") == "someone else's captions\n"
    assert (tmp_path / "grid-3.txt").read_text(encoding="utf-8") == caption_lines(CAPTIONS[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-2.txt", "grid-3.png", "grid-3.txt",
                                                         "grid.png", "grid.txt"]


def test_caption_count_must_match(tmp_path):
    with pytest.raises(ValueError, match="3 captions for 4 images"):
        save_grid(_tiles(), str(tmp_path / "grid.png"), captions=CAPTIONS[:3])
    assert not list(tmp_path.iterdir())
