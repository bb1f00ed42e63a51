"""The converter accepts the OpenAI scripts' whole argument set: weightless ones ignored, unsupported refused,
GLIDE's vocabulary size read from the checkpoint."""
import numpy as np
import pytest

from mind_diffusion.convert import build_model

TINY_TEXT2IM = {"kind": "text2im", "image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                "attention_resolutions": "4", "num_head_channels": 8, "xf_width": 32, "xf_layers": 1, "xf_heads": 2,
                "text_ctx": 4}


def test_weightless_script_arguments_are_ignored():
    model = build_model(dict(TINY_TEXT2IM, cache_text_emb=True, inpaint=False, diffusion_steps=1000,
                             noise_schedule="squaredcos_cap_v2", timestep_respacing=""))
    reference = build_model(TINY_TEXT2IM)
    assert [(n, p.shape) for n, p in model.parameters_and_names()] == \
           [(n, p.shape) for n, p in reference.parameters_and_names()]


def test_inpainting_is_refused_by_name():
    with pytest.raises(ValueError, match="inpaint=True is not supported"):
        build_model(dict(TINY_TEXT2IM, inpaint=True))


def test_vocab_size_comes_from_the_checkpoint_embedding():
    embedding = np.zeros((50257, 32), np.float32)
    model = build_model(TINY_TEXT2IM, {"token_embedding.weight": embedding})
    assert model.token_embedding.embedding_table.shape[0] == 50257  # torch's token_embedding.weight
    assert build_model(dict(TINY_TEXT2IM, vocab_size=300), {"token_embedding.weight": embedding}) \
        .token_embedding.embedding_table.shape[0] == 300
