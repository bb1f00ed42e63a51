"""run_infer on latent diffusion checkpoints: the tiny SD v1 model as CompVis saved it (.ckpt and
.safetensors) and under Wukong-Huahua's MindSpore names, with vocabularies made for the tests.

The sampling arithmetic is checked against CompVis in tests/test_ldm_text_to_image.py; here the
command line reaches it: the grid it writes holds exactly the images text_to_image gives for the
same prompt, seed, sampler and scale.
"""
import os

import numpy as np
import pytest
from PIL import Image

from mind_diffusion.cli import latent
from tests.helpers.infer_main import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SD_CKPT = os.path.join(FIXTURES, "ldm_sd1_tiny.ckpt")
SD_SAFETENSORS = os.path.join(FIXTURES, "ldm_sd1_tiny.safetensors")
WUKONG_CKPT = os.path.join(FIXTURES, "wukong_tiny.ckpt")
CLIP_VOCAB = os.path.join(FIXTURES, "tokenizers", "clip_bpe_vocab.txt.gz")
WUKONG_VOCAB = os.path.join(FIXTURES, "tokenizers", "vocab_zh.txt")
TINY = ["--num-heads", "2", "--text-heads", "2", "--size", "16", "--steps", "4", "--n", "2", "--batch", "2"]


def test_latent_checkpoints_are_recognised():
    assert latent.is_latent_checkpoint(SD_CKPT) and latent.is_latent_checkpoint(SD_SAFETENSORS)
    assert latent.is_latent_checkpoint(WUKONG_CKPT)
    assert not latent.is_latent_checkpoint(os.path.join(ROOT, "checkpoints", "demo.ckpt"))


def test_sd_checkpoint_samples_through_run_infer_as_text_to_image_does(tmp_path, capsys):
    import mindspore as ms
    from mind_diffusion.imaging import to_uint8
    from mind_diffusion.sampling.latent import ContextGuidance, text_to_image
    from mind_diffusion.sampling.schedulers import create_scheduler
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    from models.autoencoder import LatentDecoder

    status, out, err = run_main(["a red cat", "--ckpt", SD_CKPT, "--vocab", CLIP_VOCAB, "--sampler", "ddim",
                                 "--scale", "5", "--seed", "3", "--out", str(tmp_path), *TINY], capsys)
    assert status == 0, err
    grid = out.strip().splitlines()[-1]
    assert "(ddim, 4 steps, scale 5)" in out and os.path.exists(grid)

    class Args:  # what the CLI parsed
        num_heads, num_head_channels, text_heads, prediction, vocab, merges = 2, None, 2, "eps", CLIP_VOCAB, None
    config, unet, vae, text, tokenizer = latent.load_latent_model(SD_CKPT, Args)
    ms.set_context(mode=ms.GRAPH_MODE)
    scheduler = create_scheduler("ddim", create_ldm_diffusion(**config["schedule"]), eta=0.0,
                                 clip_denoised=False).set_timesteps(4, "ldm")
    images, _ = text_to_image(unet, text, tokenizer, LatentDecoder(vae), scheduler, ["a red cat"] * 2,
                              guidance_scale=5.0, latent_shape=(4, 4, 4), seed=3 * 1_000_003,
                              guided=ContextGuidance(unet, 5.0))
    want = to_uint8(np.clip(images.asnumpy(), -1, 1))  # [2, 16, 16, 3]
    saved = np.asarray(Image.open(grid).convert("RGB"))
    found = [saved[y:y + 16, x:x + 16] for y in range(saved.shape[0] - 15) for x in range(saved.shape[1] - 15)
             if np.array_equal(saved[y:y + 16, x:x + 16], want[0])]
    assert found, "the grid holds the image text_to_image draws for the same request"


@pytest.mark.parametrize("path, vocab", [(SD_SAFETENSORS, CLIP_VOCAB), (WUKONG_CKPT, WUKONG_VOCAB)],
                         ids=["safetensors", "wukong"])
def test_other_layouts_sample_too(path, vocab, tmp_path, capsys):
    status, out, err = run_main(["一只红色的猫", "--ckpt", path, "--vocab", vocab, "--out", str(tmp_path), *TINY],
                                capsys)
    assert status == 0, err
    assert "(plms, 4 steps, scale 7.5)" in out and os.path.exists(out.strip().splitlines()[-1])


@pytest.mark.parametrize("args, message", [
    ([], "pass --vocab with bpe_simple_vocab_16e6.txt.gz"),
    (["--vocab", "missing_vocab.txt.gz"], "missing_vocab.txt.gz"),
    (["--vocab", CLIP_VOCAB, "--size", "12"], "--size 12 must be a multiple of 8"),
    (["--vocab", CLIP_VOCAB, "--steps", "3"], "--steps 3: spacing 'ldm'"),
])
def test_latent_requests_that_cannot_work_are_named(args, message, tmp_path, capsys):
    argv = ["a cat", "--ckpt", SD_CKPT, "--out", str(tmp_path), "--text-heads", "2", "--num-heads", "2", *args]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and message in err
