"""bench/emoji_fidelity.py's bookkeeping: the reference without duplicate pictures, and the grid's rows."""

import numpy as np
import pytest

from mind_diffusion.evaluate import Reference


@pytest.fixture
def bench(bench_script):
    return bench_script("emoji_fidelity")


def emoji_like(pictures):
    """The emoji set's layout: item 2k is picture k with its English caption, 2k + 1 with its Chinese one."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (pictures, 3, 4, 4), dtype=np.uint8)
    captions = [name for k in range(pictures) for name in (f"emoji {k}", f"表情{k}")]
    return Reference(np.repeat(images, 2, axis=0), captions, None, "emoji-test"), images


def test_the_reference_holds_each_picture_once(bench):
    items, images = emoji_like(5)
    reference = bench.distinct_pictures(items)
    np.testing.assert_array_equal(reference.images, images)
    assert reference.captions == [f"emoji {k}" for k in range(5)] and reference.key != items.key
    shifted = np.roll(items.images, 1, axis=0)  # item 2k no longer shares its picture with 2k + 1
    with pytest.raises(ValueError, match="not \\(English, Chinese\\) pairs"):
        bench.distinct_pictures(Reference(shifted, items.captions, None, "other"))


def test_grid_rows_pair_each_english_name_with_its_chinese_one(bench):
    items, _ = emoji_like(5)
    assert bench.grid_rows(items, ["emoji 3", "emoji 0"]) == [(6, "emoji 3", "表情3"), (0, "emoji 0", "表情0")]
    with pytest.raises(ValueError, match="emoji 9"):
        bench.grid_rows(items, ["emoji 1", "emoji 9"])
