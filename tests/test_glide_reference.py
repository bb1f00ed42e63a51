"""glide-text2im's text-conditional base model and upsampler, reproduced from their PyTorch checkpoints.

The fixtures (tests/fixtures/glide_text2im.*, glide_upsample.*; made by
tests/fixtures/make_glide_fixtures.py from glide-text2im's own create_model, random weights)
hold a torch.save state dict, the create_model arguments and glide-text2im's eval-mode output
for fixed inputs. Here the checkpoint goes through the converter's command line, without torch,
and our network (models/glide.py), compiled in GRAPH_MODE, must give the same output. Unlike a
round trip through our own converter, this catches a parameter mapped to the wrong place or an
operation that differs from the original.
"""
import json
import os

import mindspore as ms
import numpy as np

from mind_diffusion.convert import build_model, main as convert_main
from models.glide import SuperResText2ImUNet, Text2ImUNet
from tests.conftest import FIXTURES, load_fixture


def converted_model(name, tmp_path):
    """Our network for fixture ``name``, its weights read from the .ckpt the converter CLI wrote."""
    config, arrays, torch_sd = load_fixture(name)
    ckpt = str(tmp_path / f"{name}.ckpt")
    status = convert_main([os.path.join(FIXTURES, f"{name}.pt"), ckpt, "--model-config", json.dumps(config)])
    assert status == 0
    model = build_model(config, torch_sd)  # vocab_size: from the checkpoint's token embedding
    model.set_train(False)
    not_loaded, unused = ms.load_param_into_net(model, ms.load_checkpoint(ckpt), strict_load=True)
    assert not not_loaded and not unused
    return model, arrays


def run(model, arrays, *names):
    tensors = [ms.Tensor(arrays[n]) for n in ("x", "t", "tokens", "mask", *names)]
    return model(*tensors).asnumpy()


def test_reproduces_glide_text2im_base_model(tmp_path):
    """Text2ImUNet: text transformer with learned padding and final LayerNorm, pooled caption added
    to the timestep embedding, token states as extra keys/values of every attention block."""
    model, arrays = converted_model("glide_text2im", tmp_path)
    assert type(model) is Text2ImUNet
    assert model.token_embedding.embedding_table.shape == (64, 32)
    assert not arrays["mask"][-1].any()  # the last sample is the empty caption (classifier-free guidance)
    out = run(model, arrays)
    assert out.shape == arrays["out"].shape == (4, 6, 16, 16)
    # measured 3.0e-6 with the C++ kernels, 3.7e-6 on pure ops (outputs up to 2.9)
    assert np.abs(out - arrays["out"]).max() <= 1e-5


def test_reproduces_glide_text2im_upsampler(tmp_path):
    """SuperResText2ImUNet: x concatenated with the bilinearly upsampled 4 px low_res image."""
    model, arrays = converted_model("glide_upsample", tmp_path)
    assert type(model) is SuperResText2ImUNet and model.in_channels == 6
    out = run(model, arrays, "low_res")
    assert out.shape == arrays["out"].shape == (4, 6, 16, 16)
    # measured 3.6e-6 with the C++ kernels and on pure ops (outputs up to 2.7)
    assert np.abs(out - arrays["out"]).max() <= 1e-5

