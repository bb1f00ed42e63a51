"""GLIDE's text-conditional UNet and upsampler (models/glide.py) at tiny widths."""
import numpy as np
import pytest

import mindspore as ms

from mind_diffusion.convert import (convert_state_dict, export_torch_state_dict, load_into,
                                    load_torch_state_dict, to_torch_state_dict)
from models.glide import SuperResText2ImUNet, Text2ImUNet, create_model
from models.text import ByteTokenizer

CTX, IMAGE, LOW_RES = 16, 8, 4
PROMPTS = ["蓝色的圆", "🐱 cat", ""]
UNET = dict(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
            num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
TEXT = dict(text_ctx=CTX, xf_width=32, xf_layers=2, xf_heads=4, xf_final_ln=True, xf_padding=True)


def randomize(net, seed):
    """Random weights everywhere (the zero-initialised output layers too, else every output is 0)."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        param.set_data(ms.Tensor(rng.normal(0.0, 0.2, param.shape).astype(np.float32)))


def np_upsample_bilinear(image, size):
    """PyTorch's F.interpolate(mode="bilinear", align_corners=False), written out."""
    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    (y0, y1, wy), (x0, x1, wx) = taps(size[0], image.shape[2]), taps(size[1], image.shape[3])
    rows = image[:, :, y0] * (1 - wy)[:, None] + image[:, :, y1] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens, mask = ByteTokenizer(CTX)(PROMPTS)
    return dict(
        x=rng.normal(size=(len(PROMPTS), 3, IMAGE, IMAGE)).astype(np.float32),
        t=np.array([0, 500, 999], np.int32),
        tokens=tokens,
        mask=mask,
        low_res=rng.normal(size=(len(PROMPTS), 3, LOW_RES, LOW_RES)).astype(np.float32),
    )


@pytest.fixture(scope="module")
def text2im():
    model = Text2ImUNet(**TEXT, image_size=IMAGE, in_channels=3, out_channels=6, **UNET)
    randomize(model, 0)
    model.set_train(False)
    return model


def call(model, inputs, **extra):
    args = [inputs["x"], inputs["t"], inputs["tokens"], inputs["mask"]]
    return model(*[ms.Tensor(a) for a in args], **{k: ms.Tensor(v) for k, v in extra.items()}).asnumpy()


def test_parameters_have_glide_text2im_names(text2im):
    """The PyTorch keys our parameters map to are glide-text2im's Text2ImUNet keys."""
    keys = set(to_torch_state_dict(text2im))
    text_keys = {"token_embedding.weight", "positional_embedding", "padding_embedding",
                 "final_ln.weight", "final_ln.bias", "transformer_proj.weight", "transformer_proj.bias"}
    for i in range(TEXT["xf_layers"]):
        for sub in ["attn.c_qkv", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2"]:
            text_keys |= {f"transformer.resblocks.{i}.{sub}.weight", f"transformer.resblocks.{i}.{sub}.bias"}
    assert text_keys <= keys
    assert {"time_embed.0.weight", "middle_block.1.encoder_kv.weight", "out.2.weight"} <= keys
    assert text2im.transformer_proj.weight.shape == (4 * UNET["model_channels"], TEXT["xf_width"])
    assert text2im.middle_block[1].encoder_kv.weight.shape[:2] == (2 * 64, TEXT["xf_width"])


def test_output_shape_and_prompt_dependence(text2im, inputs):
    out = call(text2im, inputs)
    assert out.shape == (len(PROMPTS), 6, IMAGE, IMAGE) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # the same images and timesteps with the prompts rotated: every sample's output changes
    rotated = call(text2im, dict(inputs, tokens=np.roll(inputs["tokens"], 1, axis=0),
                                 mask=np.roll(inputs["mask"], 1, axis=0)))
    for i in range(len(PROMPTS)):
        assert not np.allclose(out[i], rotated[i], atol=1e-4), i


def test_upsampler_conditions_on_bilinear_low_res(inputs):
    """The upsampler equals a plain Text2ImUNet (same weights) fed [x, bilinear(low_res)]."""
    upsampler = SuperResText2ImUNet(**TEXT, image_size=IMAGE, in_channels=3, out_channels=6, **UNET)
    plain = Text2ImUNet(**TEXT, image_size=IMAGE, in_channels=6, out_channels=6, **UNET)
    randomize(upsampler, 1)
    for net in (upsampler, plain):
        net.set_train(False)
    ms.load_param_into_net(plain, {p.name: p for p in upsampler.get_parameters()}, strict_load=True)
    out = call(upsampler, inputs, low_res=inputs["low_res"])
    assert out.shape == (len(PROMPTS), 6, IMAGE, IMAGE)
    stacked = dict(inputs, x=np.concatenate(
        [inputs["x"], np_upsample_bilinear(inputs["low_res"], (IMAGE, IMAGE)).astype(np.float32)], axis=1))
    np.testing.assert_allclose(out, call(plain, stacked), rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_through_torch_layout(text2im, tmp_path):
    path = str(tmp_path / "text2im.pt")
    export_torch_state_dict(text2im, path)
    fresh = Text2ImUNet(**TEXT, image_size=IMAGE, in_channels=3, out_channels=6, **UNET)
    load_into(fresh, convert_state_dict(load_torch_state_dict(path), fresh))
    for ours, theirs in zip(text2im.get_parameters(), fresh.get_parameters()):
        assert ours.name == theirs.name
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())


@pytest.mark.parametrize("super_res", [False, True])
def test_create_model_with_glide_text2im_arguments(super_res):
    model = create_model(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2,2",
                         attention_resolutions="16,8", num_head_channels=16, text_ctx=CTX, xf_width=32,
                         xf_layers=1, xf_heads=4, super_res=super_res)
    assert isinstance(model, SuperResText2ImUNet if super_res else Text2ImUNet)
    assert model.in_channels == (6 if super_res else 3) and model.out_channels == 6
    assert model.xf_padding and model.xf_final_ln and model.text_ctx == CTX
    assert model.token_embedding.embedding_table.shape == (ByteTokenizer.n_vocab, 32)


def test_float16_torso_keeps_float32_output(text2im, inputs):
    """ADM's use_fp16 torso (text encoder and norms stay float32) tracks the float32 model."""
    half = Text2ImUNet(**TEXT, image_size=IMAGE, in_channels=3, out_channels=6, use_fp16=True, **UNET)
    half.set_train(False)
    load_into(half, {p.name: p.asnumpy() for p in text2im.get_parameters()})
    out = call(half, inputs)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, call(text2im, inputs), rtol=0, atol=2e-2)
