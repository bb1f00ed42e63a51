"""mind_diffusion/sampling/latent.py: prompts -> text states -> guided latent sampling -> decoded images, end to end
on the tiny SD fixture with the project's own text encoder (models/clip_text.py), in GRAPH_MODE."""
import numpy as np
import pytest

import mindspore as ms

from mind_diffusion.convert import load_into
from mind_diffusion.convert_ldm import convert_ldm_state_dict, load_ldm_checkpoint
from mind_diffusion.sampling.latent import ContextGuidance, text_to_image, text_to_image_batches
from mind_diffusion.sampling.schedulers import create_scheduler
from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
from models.autoencoder import LatentDecoder, create_autoencoder
from models.clip_text import CLIPTextEncoder
from models.latent_unet import create_latent_unet
from tests.ldm_util import SD_CKPT, TINY_HEADS, WUKONG_CKPT, component, fixture_arrays


def converted(path):
    """(unet, text encoder, decoder, config) of a checkpoint through the converter, in eval mode."""
    state, config, _ = load_ldm_checkpoint(path, num_heads=TINY_HEADS, text_heads=TINY_HEADS)
    params, _ = convert_ldm_state_dict(state, config)
    unet = create_latent_unet(**config["unet"])
    vae = create_autoencoder(config["vae"]["ddconfig"], config["vae"]["embed_dim"], config["scale_factor"])
    text = CLIPTextEncoder(**{k: v for k, v in config["text_encoder"].items() if k not in ("layout", "prefix")})
    for network, name in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        load_into(network, component(params, name))
        network.set_train(False)
    return unet, text, LatentDecoder(vae), config


@pytest.fixture(scope="module")
def tiny_sd():
    return converted(SD_CKPT)


def test_text_to_image_reproduces_compvis_ddim(tiny_sd):
    """The fixture's two token rows stand for two prompts (a lookup tokenizer), the empty prompt's row for
    the default negative prompt: the 5-step DDIM sample and its decoding are CompVis's."""
    unet, text, decoder, config = tiny_sd
    ref = fixture_arrays("ldm_sd1_tiny")
    table = {"a": ref["clip_tokens"][0], "b": ref["clip_tokens"][1], "": ref["clip_empty_tokens"][0]}
    scheduler = create_scheduler("ddim", create_ldm_diffusion(**config["schedule"]), clip_denoised=False)
    images, latents = text_to_image(unet, text, lambda prompts: np.stack([table[p] for p in prompts]), decoder,
                                    scheduler.set_timesteps(5, "ldm"), ["a", "b"], guidance_scale=7.5,
                                    latent_shape=(4, 8, 8), x_T=ref["txt2img_x_T"])
    # measured 8.7e-5 on latents up to 26.5 (the text encoder adds its 1.7e-6) and 1.1e-5 decoded
    assert np.abs(latents.asnumpy() - ref["txt2img_latent"]).max() <= 1e-4
    assert np.abs(images.asnumpy() - ref["txt2img_decoded"]).max() <= 1e-4


def test_wukong_checkpoint_reproduces_wukong_plms():
    """Wukong-Huahua's MindSpore checkpoint, converted with its numerics (text LayerNorm 1e-7, tanh-GELU, float32
    frequencies), run from token ids: Wukong's own 5-step PLMS sample."""
    unet, text, decoder, config = converted(WUKONG_CKPT)
    assert config["numerics"] == "wukong" and config["text_encoder"]["numerics"] == "wukong"
    ref = fixture_arrays("wukong_tiny")
    table = {"a": ref["text_tokens"][0], "b": ref["text_tokens"][1], "": ref["text_empty_tokens"][0]}
    scheduler = create_scheduler("plms", create_ldm_diffusion(**config["schedule"]), clip_denoised=False)
    images, latents = text_to_image(unet, text, lambda prompts: np.stack([table[p] for p in prompts]), decoder,
                                    scheduler.set_timesteps(5, "ldm"), ["a", "b"], guidance_scale=7.5,
                                    latent_shape=(4, 8, 8), x_T=ref["txt2img_x_T"])
    # measured 6.6e-5 on latents up to 25.9 and 9.0e-6 decoded
    assert np.abs(latents.asnumpy() - ref["txt2img_plms_latent"]).max() <= 1e-4
    assert np.abs(images.asnumpy() - ref["txt2img_plms_decoded"]).max() <= 1e-4


def test_batches_pad_the_last_one_and_seed_by_start(tiny_sd):
    """Three prompts in batches of two: the first batch is text_to_image's draw at seed s, the second its draw
    of the last prompt padded with itself at seed s + 2 (first image kept); the result is clamped to [−1, 1]."""
    unet, text, decoder, config = tiny_sd
    ref = fixture_arrays("ldm_sd1_tiny")
    table = {"a": ref["clip_tokens"][0], "b": ref["clip_tokens"][1], "": ref["clip_empty_tokens"][0]}
    tokenize = lambda prompts: np.stack([table[p] for p in prompts])  # noqa: E731
    scheduler = create_scheduler("ddim", create_ldm_diffusion(**config["schedule"]), clip_denoised=False)
    scheduler.set_timesteps(2, "ldm")
    guided = ContextGuidance(unet, 5.0)
    images = text_to_image_batches(unet, text, tokenize, decoder, scheduler, ["a", "b", "b"], 2, (4, 8, 8),
                                   seed=7, guided=guided)
    first, _ = text_to_image(unet, text, tokenize, decoder, scheduler, ["a", "b"], latent_shape=(4, 8, 8),
                             seed=7, guided=guided)
    last, _ = text_to_image(unet, text, tokenize, decoder, scheduler, ["b", "b"], latent_shape=(4, 8, 8),
                            seed=9, guided=guided)
    expected = np.clip(np.concatenate([first.asnumpy(), last.asnumpy()[:1]]), -1.0, 1.0)
    assert images.shape == expected.shape and len(images) == 3
    np.testing.assert_array_equal(images, expected)
    assert not np.array_equal(images[1], images[2])  # same prompt, different batch seed
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        text_to_image_batches(unet, text, tokenize, decoder, scheduler, ["a"], 0, (4, 8, 8))


def test_negative_prompts_are_checked():
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        text_to_image(None, None, None, None, None, ["a"], negative_prompts=["x", "y"])
    with pytest.raises(ValueError, match="at least one prompt"):
        text_to_image(None, None, None, None, None, [])


def test_guidance_scale_one_is_the_conditional_model():
    class Affine(ms.nn.Cell):
        def construct(self, x, t, context):
            return x * 2.0 + context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)

    x = ms.Tensor(np.ones((2, 1, 2, 2), np.float32))
    t = ms.Tensor(np.zeros(2, np.int32))
    c = ms.Tensor(np.full((2, 3, 4), 0.5, np.float32))
    n = ms.Tensor(np.zeros((2, 3, 4), np.float32))
    np.testing.assert_allclose(ContextGuidance(Affine(), 1.0)(x, t, c, n).asnumpy(), 2.5)
    # s = 3: n-output 2 + 3 (2.5 - 2) = 3.5
    np.testing.assert_allclose(ContextGuidance(Affine(), 3.0)(x, t, c, n).asnumpy(), 3.5)
