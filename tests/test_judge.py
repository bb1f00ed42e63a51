"""The judge's background read and the adherence scores that use it."""
import numpy as np
import pytest

from mind_diffusion.data.demo import ALLOWED_BACKGROUNDS, BACKGROUNDS, COLORS, DemoSet, render
from mind_diffusion.evaluation.judge import adherence, judge

DEMO_RESOLUTION = 16   # configs/demo.yaml


@pytest.mark.parametrize("image_size", [DEMO_RESOLUTION, 32])
def test_background_read_on_the_generators_images(image_size, record_property):
    """Right on >= 99% of 400 demo images (every background colour occurs), the shape and colour reads unchanged."""
    demo = DemoSet(400, image_size, seed=99)
    right = 0
    seen = set()
    for i in range(len(demo)):
        image, _, attributes = demo[i]
        seen.add(attributes["background"])
        right += judge(image)["background"] == attributes["background"]
    record_property("background_accuracy", right / len(demo))
    assert seen == {colour.name for colour in BACKGROUNDS}
    assert right / len(demo) >= 0.99


def test_background_of_every_pair_and_of_a_blank_image():
    for colour in COLORS:
        for background in ALLOWED_BACKGROUNDS[colour.name]:
            image = render("star", colour.name, background, 9.0, (8.0, 8.0), DEMO_RESOLUTION)
            assert judge(image) == {"shape": "star", "color": colour.name, "background": background}
    for background in BACKGROUNDS:
        blank = np.tile(np.array(background.rgb, np.uint8), (DEMO_RESOLUTION, DEMO_RESOLUTION, 1))
        assert judge(blank) == {"shape": None, "color": None, "background": background.name}


def test_background_is_the_nearest_palette_colour_of_a_noisy_border():
    # model samples are never exact: a border near gray with noise of +-20 still reads gray
    rng = np.random.default_rng(0)
    image = render("circle", "red", "gray", 9.0, (8.0, 8.0), DEMO_RESOLUTION).astype(np.int64)
    image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    assert judge(image)["background"] == "gray"


def test_adherence_scores_the_background_only_where_it_is_named():
    demo = DemoSet(12, DEMO_RESOLUTION, seed=7)
    images, attributes = [demo[i][0] for i in range(12)], [demo[i][2] for i in range(12)]
    wanted = [{"shape": a["shape"], "color": a["color"], "background": a["background"] if i % 3 else None}
              for i, a in enumerate(attributes)]
    # a wrong background on two of the named ones
    for i in (1, 2):
        wanted[i]["background"] = next(b for b in ALLOWED_BACKGROUNDS[wanted[i]["color"]]
                                       if b != attributes[i]["background"])
    result = adherence(images, ["a prompt"] * 12, wanted)
    assert result["both"] == 1.0
    assert result["background_named"] == 8
    assert result["background"] == pytest.approx(6 / 8)
    assert [s["background_ok"] for s in result["samples"]][:4] == [None, False, False, None]
    with pytest.raises(ValueError, match="11 wanted attributes but 12 prompts"):
        adherence(images, ["a prompt"] * 12, wanted[:11])


def test_adherence_reads_the_background_from_the_prompt_by_default():
    image = render("square", "yellow", "blue", 9.0, (8.0, 8.0), DEMO_RESOLUTION)
    assert adherence([image], ["a yellow square on a blue background"])["background"] == 1.0
    assert adherence([image], ["蓝色背景上的黄色正方形"])["background"] == 1.0
    assert adherence([image], ["a yellow square, black background"])["background"] == 0.0
    unnamed = adherence([image], ["a yellow square"])
    assert unnamed["background"] is None and unnamed["background_named"] == 0
