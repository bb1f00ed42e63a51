"""Byte tokenizer and GLIDE text transformer (models/text.py), checked against a numpy
re-derivation of glide-text2im's transformer."""
import numpy as np
import pytest
from scipy.special import erf

import mindspore as ms

from models.text import ByteTokenizer, TextTransformer

CTX, WIDTH, LAYERS, HEADS = 16, 32, 2, 4
PROMPTS = ["red", "蓝色", "🐱 cat", ""]


def randomize(net, seed):
    """Random values for every parameter (LayerNorm gains included) so no term hides behind a 0 or 1."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        param.set_data(ms.Tensor(rng.normal(0.0, 0.3, param.shape).astype(np.float32)))
    return {p.name: p.asnumpy().astype(np.float64) for p in net.get_parameters()}


def np_layer_norm(x, gain, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gain + bias


def np_attention_mask(mask, causal, key_padding_mask):
    """allowed[b, t, s]: may query t of sample b look at key s."""
    length = mask.shape[1]
    keys = np.ones_like(mask)
    if key_padding_mask:
        keys = mask | ~mask.any(axis=1, keepdims=True)  # an all-padding caption attends everywhere
    allowed = np.repeat(keys[:, None, :], length, axis=1)
    if causal:
        allowed &= np.tril(np.ones((length, length), bool))[None]
    return allowed


def np_text_transformer(p, tokens, mask, heads, causal, key_padding_mask, padding_embedding, pool, final_ln):
    """glide-text2im's Text2ImUNet.get_text_emb + xf.Transformer, in float64 numpy."""
    x = p["token_embedding.embedding_table"][tokens] + p["positional_embedding"][None]
    if padding_embedding:
        x = np.where(mask[..., None], x, p["padding_embedding"][None])
    batch, length, width = x.shape
    allowed = np_attention_mask(mask, causal, key_padding_mask)
    for i in range(LAYERS):
        pre = f"transformer.resblocks.{i}."
        h = np_layer_norm(x, p[pre + "ln_1.gamma"], p[pre + "ln_1.beta"])
        qkv = h @ p[pre + "attn.c_qkv.weight"].T + p[pre + "attn.c_qkv.bias"]
        d = width // heads
        qkv = qkv.reshape(batch, length, heads, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        logits = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(d)
        logits = np.where(allowed[:, None], logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = np.einsum("bhts,bshc->bthc", w, v).reshape(batch, length, width)
        x = x + a @ p[pre + "attn.c_proj.weight"].T + p[pre + "attn.c_proj.bias"]
        h = np_layer_norm(x, p[pre + "ln_2.gamma"], p[pre + "ln_2.beta"])
        h = h @ p[pre + "mlp.c_fc.weight"].T + p[pre + "mlp.c_fc.bias"]
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = x + h @ p[pre + "mlp.c_proj.weight"].T + p[pre + "mlp.c_proj.bias"]
    if final_ln:
        x = np_layer_norm(x, p["final_ln.gamma"], p["final_ln.beta"])
    if pool == "last":
        pooled = x[:, -1]
    else:
        last_real = [np.flatnonzero(m)[-1] if m.any() else length - 1 for m in mask]
        pooled = x[np.arange(batch), last_real]
    return x, pooled


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return ByteTokenizer(64)


@pytest.fixture(scope="module")
def raw_tokenizer():
    """Bytes as written (no prompt normalisation): the byte-level round trip itself."""
    return ByteTokenizer(64, normalise=False)


@pytest.mark.parametrize("text", ["蓝色背景上的红色圆形", "a red circle on a blue background",
                                  "一只猫 a cat, 2 只狗!", "🐱 cat", "ｆｕｌｌ－ｗｉｄｔｈ，标点。"])
def test_round_trip_and_mask(raw_tokenizer, text):
    tokenizer = raw_tokenizer
    tokens, mask = tokenizer(text)
    data = text.encode("utf-8")
    assert tokens.shape == mask.shape == (1, 64)
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    assert mask[0].tolist() == [True] * (len(data) + 1) + [False] * (64 - len(data) - 1)
    assert tokens[0, : len(data)].tolist() == list(data)
    assert tokens[0, len(data)] == ByteTokenizer.end_token
    assert (tokens[0, len(data) + 1:] == ByteTokenizer.pad_token).all()
    assert tokenizer.decode(tokens[0]) == text


def test_empty_caption_is_all_padding(tokenizer):
    tokens, mask = tokenizer("")
    assert (tokens == ByteTokenizer.pad_token).all() and not mask.any()
    assert tokenizer.decode(tokens[0]) == ""
    uncond_tokens, uncond_mask = tokenizer.unconditional(3)
    assert uncond_tokens.shape == (3, 64)
    np.testing.assert_array_equal(uncond_tokens, np.repeat(tokens, 3, axis=0))
    np.testing.assert_array_equal(uncond_mask, np.repeat(mask, 3, axis=0))


def test_batch_of_mixed_prompts(tokenizer):
    tokens, mask = tokenizer(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 64)
    assert [tokenizer.decode(t) for t in tokens] == PROMPTS
    assert mask.sum(axis=1).tolist() == [len(p.encode("utf-8")) + 1 if p else 0 for p in PROMPTS]


def test_truncation_keeps_whole_characters_and_warns():
    tokenizer = ByteTokenizer(8)  # room for 7 bytes: two 3-byte characters
    prompt = "蓝色背景上的红色圆形"
    with pytest.warns(UserWarning, match=r"蓝色背景上的红色圆形.*kept the first 6 bytes"):
        tokens, mask = tokenizer(prompt)
    assert tokenizer.decode(tokens[0]) == "蓝色"
    assert mask[0].tolist() == [True] * 7 + [False]
    assert tokens[0, 6] == ByteTokenizer.end_token


def test_prompt_that_fits_does_not_warn(recwarn):
    ByteTokenizer(8)("abcdefg")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------- transformer

CONFIGS = {
    "glide": dict(final_ln=True, padding_embedding=True, causal=False, key_padding_mask=False, pool="last"),
    "causal_eot": dict(final_ln=False, padding_embedding=False, causal=True, key_padding_mask=True, pool="eot"),
    "bidirectional_masked": dict(final_ln=True, padding_embedding=False, causal=False, key_padding_mask=True,
                                 pool="eot"),
}


@pytest.fixture(scope="module")
def batch():
    tokens, mask = ByteTokenizer(CTX)(PROMPTS)
    return tokens, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def encoder(request):
    config = CONFIGS[request.param]
    net = TextTransformer(ByteTokenizer.n_vocab, CTX, WIDTH, LAYERS, HEADS, **config)
    params = randomize(net, seed=len(request.param))
    return net, params, config


def test_transformer_matches_numpy(encoder, batch):
    net, params, config = encoder
    tokens, mask = batch
    states, pooled = net(ms.Tensor(tokens), ms.Tensor(mask))
    assert states.shape == (len(PROMPTS), CTX, WIDTH) and pooled.shape == (len(PROMPTS), WIDTH)
    assert states.dtype == ms.float32
    want_states, want_pooled = np_text_transformer(params, tokens, mask, HEADS, **config)
    np.testing.assert_allclose(states.asnumpy(), want_states, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled.asnumpy(), want_pooled, rtol=1e-4, atol=1e-4)


def test_padding_cannot_change_real_tokens(encoder, batch):
    """Perturb the ids at padded positions: with the key-padding mask the real tokens'
    states stay put; GLIDE's unmasked encoder (the sensitivity control) changes."""
    net, _, config = encoder
    tokens, mask = batch
    rng = np.random.default_rng(0)
    perturbed = np.where(mask, tokens, rng.integers(0, 256, tokens.shape)).astype(np.int32)
    states = net(ms.Tensor(tokens), ms.Tensor(mask))[0].asnumpy()
    states_perturbed = net(ms.Tensor(perturbed), ms.Tensor(mask))[0].asnumpy()
    if config["key_padding_mask"]:
        np.testing.assert_allclose(states_perturbed[mask], states[mask], rtol=0, atol=1e-6)
        assert not np.allclose(states_perturbed[~mask], states[~mask])  # the padded ids did matter there
    else:
        # xf_padding replaces padded positions by a learned embedding: the ids themselves never count
        np.testing.assert_array_equal(states_perturbed, states)


def test_unmasked_padding_does_influence_real_tokens(batch):
    net = TextTransformer(ByteTokenizer.n_vocab, CTX, WIDTH, LAYERS, HEADS, key_padding_mask=False)
    tokens, mask = batch
    perturbed = np.where(mask, tokens, 7).astype(np.int32)
    states = net(ms.Tensor(tokens), ms.Tensor(mask))[0].asnumpy()
    states_perturbed = net(ms.Tensor(perturbed), ms.Tensor(mask))[0].asnumpy()
    assert not np.allclose(states_perturbed[mask], states[mask], atol=1e-6)


def test_rejects_unknown_pool():
    with pytest.raises(ValueError, match="pool"):
        TextTransformer(ByteTokenizer.n_vocab, CTX, WIDTH, LAYERS, HEADS, pool="mean")
