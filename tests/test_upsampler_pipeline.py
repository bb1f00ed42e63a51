"""The GLIDE upsampler recipe end to end: low-res inputs in training, sampling and run_infer."""
import os

import numpy as np
import pytest
from PIL import Image

from mind_diffusion.data.transforms import box_downsample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSAMPLER = ["model.arch=glide_upsample", "model.low_res_size=8", "train.total_steps=2", "train.save_every=2",
             "train.log_every=1", "sample.steps=2", "sample.num_samples=2", "sample.batch_size=2"]


def test_box_downsample_is_the_block_mean():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    small = box_downsample(images, 4)
    assert small.shape == (2, 3, 4, 4) and small.dtype == np.float32
    for i in range(4):
        for j in range(4):
            block = images[:, :, 3 * i:3 * i + 3, 3 * j:3 * j + 3].astype(np.float64)
            np.testing.assert_allclose(small[:, :, i, j], block.mean(axis=(2, 3)), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of the target"):
        box_downsample(images, 5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two train steps of a tiny upsampler (16 px from 8 px) and its checkpoint."""
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.config import load_config
    from mind_diffusion.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("upsampler")
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), UPSAMPLER)
    model, tokenizer = build_model(config.model)
    trainer = Trainer(config, model, build_diffusion(config.diffusion, config.model), str(run_dir),
                      tokenizer=tokenizer)
    assert trainer.cond_names == ("tokens", "mask", "low_res")
    assert trainer.step_columns == ["images", "u", "noise", "tokens", "mask", "low_res"]
    # the low-res input is a dataset column: the batch's own images, box-downsampled
    from mind_diffusion.data import create_dataset
    stream = create_dataset(config.data, 4, tokenizer=tokenizer, low_res_size=8, end_step=1)
    batch = next(iter(stream))
    np.testing.assert_array_equal(batch["low_res"], box_downsample(batch["images"], 8))
    final = trainer.fit(progress=False)
    return config, final, run_dir


def test_upsampler_trains_and_samples_from_low_res(trained):
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.cli.train import default_conditions
    from mind_diffusion.generate import ImageGenerator

    config, final, _ = trained
    assert final and os.path.exists(final)
    prompts, labels, low_res = default_conditions(config)
    assert labels is None and len(prompts) == 2 and all(prompts) and low_res.shape == (2, 3, 8, 8)
    model, tokenizer = build_model(config.model)
    generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model), (3, 16, 16), tokenizer,
                               low_res_size=8)
    images = generator.sample(3, prompts=prompts, low_res=low_res, sampler="ddim", steps=2, batch_size=2)
    assert images.shape == (3, 3, 16, 16) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="low-resolution images"):
        generator.sample(2, prompts=prompts, sampler="ddim", steps=2, batch_size=2)
    with pytest.raises(ValueError, match=r"must be \(2, 3, 8, 8\)"):
        generator.sample(2, prompts=prompts, low_res=np.zeros((2, 3, 16, 16)), sampler="ddim", steps=2,
                         batch_size=2)


def test_run_infer_enlarges_an_image(trained, tmp_path, capsys):
    from mind_diffusion.cli import infer

    _, final, _ = trained
    source = tmp_path / "small.png"
    Image.fromarray(np.full((20, 24, 3), (220, 30, 30), np.uint8)).save(source)
    common = ["a red circle", "--ckpt", final, "--n", "2", "--steps", "2", "--out", str(tmp_path / "out")]
    assert infer.main(common) == 2
    assert "give the image to enlarge with --low-res" in capsys.readouterr().err
    assert infer.main(common + ["--low-res", str(tmp_path / "missing.png")]) == 2
    assert "--low-res" in capsys.readouterr().err
    assert infer.main(common + ["--low-res", str(source)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.endswith(".png") and Image.open(out).size[0] > 0
