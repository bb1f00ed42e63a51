"""The latent diffusion converter (mind_diffusion/convert_ldm.py, `python -m mind_diffusion.convert`): SD .ckpt,
.safetensors and Wukong-Huahua MindSpore checkpoints, the configuration read off names and shapes, every key
accounted for, and an SD 2.x-style layout (linear projections, head channels, depth 2) converted back."""
import json
import os

import numpy as np
import pytest

import mindspore as ms

from mind_diffusion import convert
from mind_diffusion.convert import load_into
from mind_diffusion.convert_ldm import (LDMConfigError, SD_UNET, convert_ldm_state_dict, infer_unet_config,
                                        load_ldm_checkpoint, read_checkpoint, read_converted, sd_names_of,
                                        wukong_to_sd_names)
from mind_diffusion.safetensors import save_safetensors
from models.latent_unet import create_latent_unet
from tests.ldm_util import FIXTURES, SD_CKPT, SD_SAFETENSORS, TINY_HEADS, WUKONG_CKPT, component

TINY = ["--num-heads", str(TINY_HEADS), "--text-heads", str(TINY_HEADS)]


def fixture_json(name):
    with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def test_wukong_names_become_sd_names_key_for_key():
    """Every UNet and VAE key of the Wukong checkpoint maps to the SD key the fixture's json pairs it with."""
    pairs = fixture_json("wukong_tiny")["sd_v1_to_wukong"]
    wukong, fmt = read_checkpoint(WUKONG_CKPT)
    assert fmt == "mindspore"
    image_side = {w: sd for sd, w in pairs.items() if w and sd.startswith(("model.", "first_stage_model."))}
    assert set(image_side) == {k for k in wukong if k.startswith(("model.", "first_stage_model."))}
    renamed = wukong_to_sd_names({k: wukong[k] for k in image_side})
    assert sorted(renamed) == sorted(image_side.values())


def test_configuration_is_read_off_the_shapes():
    reference = fixture_json("ldm_sd1_tiny")
    _, config, fmt = load_ldm_checkpoint(SD_CKPT, num_heads=TINY_HEADS, text_heads=TINY_HEADS)
    assert fmt == "torch"
    unet, expected = config["unet"], reference["unet"]
    for key in ("in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
                "channel_mult", "num_heads", "transformer_depth", "context_dim"):
        assert unet[key] == expected[key], key
    assert not unet["use_linear_in_transformer"] and not unet["gelu_approximate"]
    vae = reference["vae"]
    assert config["vae"]["embed_dim"] == vae["embed_dim"]
    for key in ("double_z", "z_channels", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                "attn_resolutions"):
        assert config["vae"]["ddconfig"][key] == vae["ddconfig"][key], key
    text, clip = config["text_encoder"], reference["clip"]
    assert (text["vocab_size"], text["width"], text["layers"], text["heads"], text["mlp_width"],
            text["context_length"]) == (clip["vocab_size"], clip["hidden_size"], clip["num_hidden_layers"],
                                        clip["num_attention_heads"], clip["intermediate_size"],
                                        clip["max_position_embeddings"])
    latent = reference["latent_diffusion"]
    assert config["schedule"] == {"timesteps": latent["timesteps"], "linear_start": latent["linear_start"],
                                  "linear_end": latent["linear_end"]}
    assert config["scale_factor"] == latent["scale_factor"] and config["prediction"] == "eps"
    assert config["numerics"] == "sd" and text["numerics"] == "clip"


def test_heads_follow_sd_conventions_unless_given():
    state, _ = read_checkpoint(SD_SAFETENSORS)
    shapes = {k: v.shape for k, v in state.items()}
    unet, source = infer_unet_config(shapes)
    assert (unet["num_heads"], unet["num_head_channels"]) == (8, -1) and "SD 1.x" in source
    unet, source = infer_unet_config(shapes, num_head_channels=16)
    assert (unet["num_heads"], unet["num_head_channels"], source) == (-1, 16, "given")
    with pytest.raises(LDMConfigError, match="does not split into 3"):
        infer_unet_config(shapes, num_heads=3)
    linear = dict(shapes, **{k: v[:2] for k, v in shapes.items() if k.endswith(("proj_in.weight", "proj_out.weight"))})
    with pytest.raises(LDMConfigError, match="SD 2.x convention"):  # 64 channels per head do not divide 32
        infer_unet_config(linear)


def test_three_formats_give_the_same_parameters():
    """The .ckpt, the .safetensors and Wukong's MindSpore file hold the same weights: converted, they agree
    tensor for tensor (Wukong's text q|k|v arrive fused, SD's separate)."""
    converted = []
    for path in (SD_CKPT, SD_SAFETENSORS, WUKONG_CKPT):
        state, config, _ = load_ldm_checkpoint(path, num_heads=TINY_HEADS, text_heads=TINY_HEADS)
        params, report = convert_ldm_state_dict(state, config)
        assert report["unexpected"] == []
        converted.append(params)
    assert len(converted[0]) == 384
    for other in converted[1:]:
        assert set(other) == set(converted[0])
        for name, value in converted[0].items():
            assert np.array_equal(other[name], value), name


def test_command_line_converts_lists_and_names_bad_keys(tmp_path, capsys):
    out = tmp_path / "sd.ckpt"
    assert convert.main([SD_CKPT, str(out)] + TINY) == 0
    components, config = read_converted(out)
    assert {k: len(v) for k, v in components.items()} == {"unet": 208, "vae": 148, "text_encoder": 28}
    assert config["unet"]["num_heads"] == TINY_HEADS and config["text_encoder"]["layout"] == "hf_clip"
    assert convert.main([WUKONG_CKPT, "--list"] + TINY) == 0
    listing = capsys.readouterr().out
    assert '"numerics": "wukong"' in listing and "unexpected (0)" in listing and "unet: 208 tensors" in listing

    state, _ = read_checkpoint(SD_SAFETENSORS)
    extra = dict(state, **{"model.diffusion_model.extra_head.weight": np.zeros((4, 4), np.float32)})
    save_safetensors(extra, tmp_path / "extra.safetensors")
    assert convert.main([str(tmp_path / "extra.safetensors"), str(tmp_path / "x.ckpt")] + TINY) == 1
    assert "model.diffusion_model.extra_head.weight" in capsys.readouterr().err
    lacking = {k: v for k, v in state.items() if k != SD_UNET + "output_blocks.2.0.out_layers.3.bias"}
    save_safetensors(lacking, tmp_path / "lacking.safetensors")
    assert convert.main([str(tmp_path / "lacking.safetensors"), str(tmp_path / "y.ckpt")] + TINY) == 1
    assert SD_UNET + "output_blocks.2.0.out_layers.3.bias" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "lacking.safetensors"), "--list"] + TINY) == 1  # --list checks too
    assert "missing from the checkpoint (1): " + SD_UNET + "output_blocks.2.0.out_layers.3.bias" \
        in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "y.ckpt").exists()


def test_sd2_layout_round_trip(tmp_path):
    """A tiny SD 2.x-style UNet (linear projections, 16 channels per head, depth 2, attention at both levels)
    written under SD's names, read back: same configuration, same weights, same output."""
    arguments = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, num_heads=-1,
                     transformer_depth=2, context_dim=24, use_linear_in_transformer=True)
    original = create_latent_unet(**arguments)
    rng = np.random.default_rng(0)
    load_into(original, {p.name: rng.normal(0, 0.1, p.shape).astype(np.float32) for p in original.get_parameters()})
    sd_state = sd_names_of({"unet." + p.name: p.asnumpy() for p in original.get_parameters()})
    assert SD_UNET + "middle_block.1.proj_in.weight" in sd_state
    save_safetensors(sd_state, tmp_path / "sd2.safetensors")
    state, config, _ = load_ldm_checkpoint(tmp_path / "sd2.safetensors", num_head_channels=16)
    for key, value in arguments.items():
        if key != "image_size":
            assert config["unet"][key] == value, key
    assert config["vae"] is None and config["text_encoder"] is None
    params, report = convert_ldm_state_dict(state, config)
    rebuilt = create_latent_unet(**config["unet"])
    load_into(rebuilt, component(params, "unet"))
    x = ms.Tensor(rng.normal(size=(2, 4, 8, 8)).astype(np.float32))
    t = ms.Tensor(np.array([3, 990], np.int32))
    context = ms.Tensor(rng.normal(size=(2, 5, 24)).astype(np.float32))
    original.set_train(False)
    rebuilt.set_train(False)
    expected = original(x, t, context).asnumpy()
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_array_equal(rebuilt(x, t, context).asnumpy(), expected)


def test_autoencoder_with_attention_levels_round_trips():
    """An autoencoder of another shape (ch_mult 1, 2, 2; two res blocks; attention at the middle level) written
    under SD's names: the inferred config builds a network with exactly its tensors."""
    from mind_diffusion.convert_ldm import infer_vae_config
    from models.autoencoder import create_autoencoder

    ddconfig = dict(double_z=True, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                    num_res_blocks=2, attn_resolutions=[32], dropout=0.0)
    original = create_autoencoder(ddconfig, 3)
    sd_state = sd_names_of({"vae." + p.name: p.asnumpy() for p in original.get_parameters()})
    assert "first_stage_model.encoder.down.1.attn.1.q.weight" in sd_state
    inferred = infer_vae_config({k: v.shape for k, v in sd_state.items()})
    assert inferred["embed_dim"] == 3
    expected = dict(ddconfig, resolution=256, attn_resolutions=[128])  # the nominal side: same level (1)
    assert inferred["ddconfig"] == expected
    rebuilt = create_autoencoder(inferred["ddconfig"], inferred["embed_dim"])
    params, report = convert_ldm_state_dict(sd_state, {"text_encoder": None})
    assert report == {"ignored": [], "unexpected": []}
    load_into(rebuilt, component(params, "vae"))  # strict: the same names and shapes, both ways
