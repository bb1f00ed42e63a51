"""CLIP text encoder (models/clip_text.py) and its checkpoint names (mind_diffusion/clip_names.py).

Parity: the SD v1 fixture (ldm_sd1_tiny, made by transformers' CLIPTextModel) and the Wukong fixture
(wukong_tiny, made by Wukong-Huahua's own MindSpore TextEncoder), both read through the checkpoint
name maps. Layouts without a fixture (OpenCLIP / SD v2: exact GELU, penultimate layer; other widths,
depths and MLP widths) are checked against a float64 numpy re-derivation of CLIP's text transformer.
"""
import os

import numpy as np
import pytest
from scipy.special import erf

import mindspore as ms

from mind_diffusion import clip_names
from mind_diffusion.clip_names import TextEncoderNamesError, extract_text_encoder, infer_text_config
from mind_diffusion.device import building_for
from mind_diffusion.torch_pickle import load_state_dict
from models.clip_text import CLIPTextEncoder, encoder_arguments, text_encoder_from_state_dict
from tests.test_graph_audit import audit, exported

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY_HEADS = 2  # the fixtures' head count (ldm_sd1_tiny.json "clip"); width 32 is not a multiple of 64


@pytest.fixture(scope="module")
def sd1_checkpoint():
    return load_state_dict(os.path.join(FIXTURES, "ldm_sd1_tiny.ckpt"))["state_dict"]


@pytest.fixture(scope="module")
def wukong_checkpoint():
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(FIXTURES, "wukong_tiny.ckpt")).items()}


def run(net, tokens):
    return net(ms.Tensor(np.asarray(tokens, np.int32))).asnumpy()


# ---------------------------------------------------------------- numpy reference


def np_layer_norm(x, gain, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gain + bias


def np_clip_text(p, tokens, heads, activation="quick_gelu", eps=1e-5, run_layers=None):
    """CLIP's text transformer in float64 from OpenAI-layout parameters (our names)."""
    x = p["token_embedding.embedding_table"][tokens] + p["positional_embedding"][None, : tokens.shape[1]]
    batch, length, width = x.shape
    d = width // heads
    future = np.triu(np.ones((length, length), bool), k=1)
    layers = len({k.split(".")[2] for k in p if k.startswith("transformer.resblocks.")})
    for i in range(layers if run_layers is None else run_layers):
        pre = f"transformer.resblocks.{i}."
        h = np_layer_norm(x, p[pre + "ln_1.gamma"], p[pre + "ln_1.beta"], eps)
        qkv = h @ p[pre + "attn.in_proj.weight"].T + p[pre + "attn.in_proj.bias"]
        q, k, v = (qkv[..., j * width:(j + 1) * width].reshape(batch, length, heads, d) for j in range(3))
        logits = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(d)
        logits = np.where(future[None, None], -np.inf, logits)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = np.einsum("bhts,bshc->bthc", w, v).reshape(batch, length, width)
        x = x + a @ p[pre + "attn.out_proj.weight"].T + p[pre + "attn.out_proj.bias"]
        h = np_layer_norm(x, p[pre + "ln_2.gamma"], p[pre + "ln_2.beta"], eps)
        h = h @ p[pre + "mlp.c_fc.weight"].T + p[pre + "mlp.c_fc.bias"]
        if activation == "quick_gelu":
            h = h / (1.0 + np.exp(-1.702 * h))
        else:
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = x + h @ p[pre + "mlp.c_proj.weight"].T + p[pre + "mlp.c_proj.bias"]
    return np_layer_norm(x, p["ln_final.gamma"], p["ln_final.beta"], eps)


def open_clip_state_dict(rng, vocab, ctx, width, layers, mlp_width, prefix="cond_stage_model.model."):
    """A random SD v2 (OpenCLIP) text tower, with the extras such checkpoints carry."""
    sd = {prefix + "token_embedding.weight": rng.normal(0, 0.5, (vocab, width)),
          prefix + "positional_embedding": rng.normal(0, 0.5, (ctx, width)),
          prefix + "ln_final.weight": 1 + rng.normal(0, 0.2, width), prefix + "ln_final.bias": rng.normal(0, 0.2, width),
          prefix + "text_projection": rng.normal(0, 0.5, (width, width)), prefix + "logit_scale": np.array(4.6),
          prefix + "visual.proj": rng.normal(0, 0.5, (8, 8))}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": 1 + rng.normal(0, 0.2, width), b + "ln_1.bias": rng.normal(0, 0.2, width),
                   b + "attn.in_proj_weight": rng.normal(0, 0.3, (3 * width, width)),
                   b + "attn.in_proj_bias": rng.normal(0, 0.3, 3 * width),
                   b + "attn.out_proj.weight": rng.normal(0, 0.3, (width, width)),
                   b + "attn.out_proj.bias": rng.normal(0, 0.3, width),
                   b + "ln_2.weight": 1 + rng.normal(0, 0.2, width), b + "ln_2.bias": rng.normal(0, 0.2, width),
                   b + "mlp.c_fc.weight": rng.normal(0, 0.3, (mlp_width, width)),
                   b + "mlp.c_fc.bias": rng.normal(0, 0.3, mlp_width),
                   b + "mlp.c_proj.weight": rng.normal(0, 0.3, (width, mlp_width)),
                   b + "mlp.c_proj.bias": rng.normal(0, 0.3, width)})
    return {k: v.astype(np.float32) for k, v in sd.items()}


# ---------------------------------------------------------------- fixtures of the original code


def test_sd1_text_encoder_matches_transformers(sd1_checkpoint):
    net, config = text_encoder_from_state_dict(sd1_checkpoint, heads=TINY_HEADS)
    assert config == dict(vocab_size=1000, context_length=77, width=32, layers=2, heads=2, mlp_width=128,
                          activation="quick_gelu", numerics="clip", skip_last_layers=0)
    ref = np.load(os.path.join(FIXTURES, "ldm_sd1_tiny.npz"))
    for tokens, states in (("clip_tokens", "clip_last_hidden_state"),
                           ("clip_empty_tokens", "clip_empty_last_hidden_state")):
        # measured 1.7e-6 (prompt) and 1.4e-6 (empty prompt): float32 rounding
        np.testing.assert_allclose(run(net, ref[tokens]), ref[states], rtol=0, atol=4e-6)


def test_sd1_penultimate_layer_is_the_final_norm_of_the_hidden_state(sd1_checkpoint):
    """skip_last_layers=1 (SD v2's reading) gives LN_final of transformers' hidden_states[-2]."""
    net, _ = text_encoder_from_state_dict(sd1_checkpoint, heads=TINY_HEADS, skip_last_layers=1)
    ref = np.load(os.path.join(FIXTURES, "ldm_sd1_tiny.npz"))
    prefix = "cond_stage_model.transformer.text_model.final_layer_norm."
    expected = np_layer_norm(ref["clip_hidden_states"][1].astype(np.float64), sd1_checkpoint[prefix + "weight"],
                             sd1_checkpoint[prefix + "bias"], 1e-5)
    np.testing.assert_allclose(run(net, ref["clip_tokens"]), expected, rtol=0, atol=4e-6)  # measured 1.4e-6


def test_wukong_text_encoder_matches_wukong(wukong_checkpoint):
    net, config = text_encoder_from_state_dict(wukong_checkpoint, heads=TINY_HEADS)
    assert config["numerics"] == "wukong" and config["activation"] == "quick_gelu"
    ref = np.load(os.path.join(FIXTURES, "wukong_tiny.npz"))
    for tokens, states in (("text_tokens", "text_last_hidden_state"),
                           ("text_empty_tokens", "text_empty_last_hidden_state")):
        np.testing.assert_allclose(run(net, ref[tokens]), ref[states], rtol=0, atol=2e-6)  # measured 8.3e-7


def test_wukong_needs_its_layer_norm_epsilon(wukong_checkpoint):
    """With CLIP's ε = 1e-5 the Wukong output is off by ~6e-5 (wukong_tiny.json): the switch is what matches."""
    net, _ = text_encoder_from_state_dict(wukong_checkpoint, heads=TINY_HEADS, numerics="clip")
    ref = np.load(os.path.join(FIXTURES, "wukong_tiny.npz"))
    assert np.abs(run(net, ref["text_tokens"]) - ref["text_last_hidden_state"]).max() > 2e-5


def test_sd1_and_wukong_checkpoints_hold_the_same_encoder(sd1_checkpoint, wukong_checkpoint):
    """wukong_tiny is ldm_sd1_tiny renamed: both name maps must give identical parameters."""
    sd1, _ = extract_text_encoder(sd1_checkpoint, heads=TINY_HEADS)
    wukong, _ = extract_text_encoder(wukong_checkpoint, heads=TINY_HEADS)
    assert sorted(sd1) == sorted(wukong)
    for name in sd1:
        np.testing.assert_array_equal(sd1[name], wukong[name], err_msg=name)


# ---------------------------------------------------------------- other layouts, against numpy


@pytest.mark.parametrize("width, heads, layers, mlp_width, length", [(48, 3, 3, 96, 9), (64, None, 2, 256, 12)])
def test_open_clip_layout_against_numpy(width, heads, layers, mlp_width, length):
    """SD v2's text tower: exact GELU, penultimate layer, any MLP width; tokens shorter than the context."""
    rng = np.random.default_rng(width)
    sd = open_clip_state_dict(rng, vocab=50, ctx=12, width=width, layers=layers, mlp_width=mlp_width)
    net, config = text_encoder_from_state_dict(sd, heads=heads)
    assert config == dict(vocab_size=50, context_length=12, width=width, layers=layers, heads=heads or width // 64,
                          mlp_width=mlp_width, activation="gelu", numerics="clip", skip_last_layers=1)
    params, _ = extract_text_encoder(sd, heads=heads)
    tokens = rng.integers(0, 50, (2, length))
    expected = np_clip_text({k: v.astype(np.float64) for k, v in params.items()}, tokens, config["heads"],
                            activation="gelu", run_layers=layers - 1)
    np.testing.assert_allclose(run(net, tokens), expected, rtol=0, atol=1.5e-5)  # measured 3.5e-6, 5.7e-6


def test_quick_gelu_and_wukong_epsilon_against_numpy():
    rng = np.random.default_rng(3)
    net = CLIPTextEncoder(vocab_size=40, context_length=10, width=32, layers=2, heads=4, numerics="wukong")
    params = {}
    for param in net.get_parameters():
        values = rng.normal(0, 0.4, param.shape) + (1.0 if param.name.endswith(".gamma") else 0.0)
        param.set_data(ms.Tensor(values.astype(np.float32)))
        params[param.name] = param.asnumpy().astype(np.float64)
    tokens = rng.integers(0, 40, (3, 10))
    expected = np_clip_text(params, tokens, 4, activation="quick_gelu", eps=1e-7)
    np.testing.assert_allclose(run(net, tokens), expected, rtol=0, atol=8e-6)  # measured 2.8e-6


def test_causal_mask_later_tokens_do_not_change_earlier_states():
    net = CLIPTextEncoder(vocab_size=30, context_length=8, width=32, layers=2, heads=2)
    a = run(net, [[1, 2, 3, 4, 5, 6, 7, 8]])
    b = run(net, [[1, 2, 3, 4, 9, 9, 9, 9]])
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert np.abs(a[:, 4:] - b[:, 4:]).min() > 0


@pytest.mark.parametrize("activation, skip", [("quick_gelu", 0), ("gelu", 1)])
def test_graph_built_for_ascend_is_clean(activation, skip):
    """No float64, no C++ CPU operator, no control flow, only primitives Ascend has (tests/test_graph_audit.py)."""
    with building_for("Ascend", "910B"):
        net = CLIPTextEncoder(vocab_size=30, context_length=8, width=32, layers=2, heads=2, activation=activation,
                              skip_last_layers=skip)
        net.set_train(False)
        assert audit(exported(net, [ms.Tensor(np.zeros((2, 8), np.int32))]), train_step=True) == []


# ---------------------------------------------------------------- names and sizes


def test_encoder_arguments_drop_where_the_weights_came_from(sd1_checkpoint):
    config = infer_text_config({k: v.shape for k, v in sd1_checkpoint.items()}, heads=TINY_HEADS)
    arguments = encoder_arguments(config, numerics="wukong")
    assert "layout" not in arguments and "prefix" not in arguments and arguments["numerics"] == "wukong"
    assert sorted(p.name for p in CLIPTextEncoder(**arguments).get_parameters()) == sorted(
        clip_names.text_encoder_plan(config["layout"], config["prefix"], config["layers"]))


def test_network_parameters_are_exactly_the_plan():
    net = CLIPTextEncoder(vocab_size=30, context_length=8, width=32, layers=3, heads=2)
    for layout in clip_names.LAYOUTS:
        plan = clip_names.text_encoder_plan(layout, "x.", 3)
        assert sorted(plan) == sorted(p.name for p in net.get_parameters())


def test_layouts_are_found_with_their_prefixes(sd1_checkpoint, wukong_checkpoint):
    assert clip_names.find_text_encoders(sd1_checkpoint) == [("hf_clip", "cond_stage_model.transformer.text_model.")]
    assert clip_names.find_text_encoders(wukong_checkpoint) == [("wukong", "cond_stage_model.transformer.")]
    sd2 = open_clip_state_dict(np.random.default_rng(0), 10, 4, 64, 1, 256)
    assert clip_names.find_text_encoders(sd2) == [("open_clip", "cond_stage_model.model.")]
    # a stand-alone transformers CLIPTextModel state dict
    bare = {k[len("cond_stage_model.transformer."):]: v for k, v in sd1_checkpoint.items()
            if k.startswith("cond_stage_model.transformer.")}
    assert clip_names.find_text_encoders(bare) == [("hf_clip", "text_model.")]
    shapes = {k: v.shape for k, v in bare.items()}
    assert infer_text_config(shapes, heads=2)["prefix"] == "text_model."
    # a CLIPTextTransformer saved without its CLIPTextModel wrapper: no "text_model." level
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd1_checkpoint.items()}
    assert clip_names.find_text_encoders(old) == [("hf_clip", "cond_stage_model.transformer.")]
    params, _ = extract_text_encoder(old, heads=TINY_HEADS)
    assert len(params) == 4 + 2 * 12


def test_sd1_plan_concatenates_q_k_v(sd1_checkpoint):
    params, _ = extract_text_encoder(sd1_checkpoint, heads=TINY_HEADS)
    layer = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn."
    np.testing.assert_array_equal(params["transformer.resblocks.1.attn.in_proj.weight"],
                                  np.concatenate([sd1_checkpoint[layer + f"{x}_proj.weight"] for x in "qkv"]))
    np.testing.assert_array_equal(params["transformer.resblocks.1.attn.in_proj.bias"][32:64],
                                  sd1_checkpoint[layer + "k_proj.bias"])


def test_heads_must_be_given_when_width_is_not_a_multiple_of_64(sd1_checkpoint):
    shapes = {k: v.shape for k, v in sd1_checkpoint.items()}
    with pytest.raises(TextEncoderNamesError, match="width 32 is not a multiple of 64.*pass the number of heads"):
        infer_text_config(shapes)
    with pytest.raises(TextEncoderNamesError, match="not divisible by heads=3"):
        infer_text_config(shapes, heads=3)


def test_missing_mis_shaped_and_unexpected_keys_are_named(sd1_checkpoint):
    prefix = "cond_stage_model.transformer.text_model."
    broken = dict(sd1_checkpoint)
    del broken[prefix + "encoder.layers.0.self_attn.v_proj.bias"]
    broken[prefix + "encoder.layers.1.mlp.fc2.weight"] = np.zeros((32, 64), np.float32)
    broken[prefix + "encoder.layers.1.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(TextEncoderNamesError) as err:
        extract_text_encoder(broken, heads=TINY_HEADS)
    message = str(err.value)
    assert "missing: " + prefix + "encoder.layers.0.self_attn.v_proj.bias" in message
    assert "wrong shape: " + prefix + "encoder.layers.1.mlp.fc2.weight: (32, 64), expected (32, 128)" in message
    assert "unexpected: " + prefix + "encoder.layers.1.extra.weight" in message
    assert "position_ids" not in message  # a known non-parameter, dropped by name


def test_no_encoder_and_several_encoders_are_errors(sd1_checkpoint, wukong_checkpoint):
    with pytest.raises(TextEncoderNamesError, match="no CLIP text encoder"):
        extract_text_encoder({"model.diffusion_model.out.2.weight": np.zeros(1)})
    both = {**sd1_checkpoint, **wukong_checkpoint}
    with pytest.raises(TextEncoderNamesError, match="several text encoders"):
        extract_text_encoder(both, heads=TINY_HEADS)
    _, config = extract_text_encoder(both, layout="wukong", heads=TINY_HEADS)
    assert config["prefix"] == "cond_stage_model.transformer."
