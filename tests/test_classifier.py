"""ADM's noisy classifier: guided-diffusion's logits reproduced from its weights, every pooling head, the
attention pool against numpy, zero-initialised head."""
import mindspore as ms
import numpy as np
import pytest

from mind_diffusion.convert import convert_state_dict, load_into
from models.classifier import POOLS, AttentionPool2d, EncoderUNetModel, create_classifier
from tests.conftest import load_fixture
from tests.params_util import randomize_parameters

TINY = dict(
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=10,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


def _inputs():
    rng = np.random.default_rng(0)
    return ms.Tensor(rng.normal(size=(2, 3, 16, 16)).astype(np.float32)), ms.Tensor(np.array([5, 700], np.int64))


def test_reproduces_guided_diffusion_classifier_fixture():
    """guided-diffusion's EncoderUNetModel (AdaGN, BigGAN up/down-sampling blocks, attention-pool head)."""
    config, fixture, torch_sd = load_fixture("guided_diffusion_classifier")
    model = EncoderUNetModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    model.set_train(False)
    load_into(model, convert_state_dict(torch_sd, model))
    logits = model(ms.Tensor(fixture["x"]), ms.Tensor(fixture["t"])).asnumpy()
    assert logits.shape == fixture["out"].shape == (4, 10)
    # measured 2.1e-7 with the C++ kernels, 2.7e-7 on pure ops (logits up to 0.42)
    assert np.abs(logits - fixture["out"]).max() <= 1e-6


@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_gives_logits(pool):
    model = EncoderUNetModel(**TINY, pool=pool)
    randomize_parameters(model, seed=1, scale=0.1)
    logits = model(*_inputs())
    assert logits.shape == (2, 10) and logits.dtype == ms.float32
    assert np.isfinite(logits.asnumpy()).all() and logits.asnumpy().std() > 0


def test_adaptive_head_starts_at_zero_logits():
    model = EncoderUNetModel(**TINY, pool="adaptive")
    assert not model(*_inputs()).asnumpy().any()


def test_unknown_pool_and_headless_attention_pool_are_refused():
    with pytest.raises(ValueError, match="unknown pool"):
        EncoderUNetModel(**TINY, pool="max")
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetModel(**{**TINY, "num_head_channels": -1}, pool="attention")


def test_create_classifier_follows_guided_diffusion_defaults():
    model = create_classifier(image_size=64)
    names = {p.name for p in model.get_parameters()}
    # 64 px: channel_mult (1, 2, 3, 4), width 128, attention at 32/16/8, attention pool over 8x8 + mean token.
    assert model.out[2].positional_embedding.shape == (512, 8 * 8 + 1)
    assert {"out.2.qkv_proj.weight", "out.2.c_proj.weight", "input_blocks.3.0.in_layers.2.weight"} <= names
    assert model.out[2].c_proj.weight.shape == (1000, 512, 1)


def test_attention_pool_matches_numpy():
    pool = AttentionPool2d(spatial_dim=3, embed_dim=32, num_head_channels=8, output_dim=5)
    randomize_parameters(pool, seed=2, scale=0.3)
    p = {k: v.asnumpy().astype(np.float64) for k, v in pool.parameters_and_names()}
    x = np.random.default_rng(3).normal(size=(2, 32, 3, 3)).astype(np.float32)
    tokens = x.reshape(2, 32, 9).astype(np.float64)
    tokens = np.concatenate([tokens.mean(-1, keepdims=True), tokens], -1) + p["positional_embedding"]
    qkv = np.einsum("oi,bil->bol", p["qkv_proj.weight"][:, :, 0], tokens) + p["qkv_proj.bias"][:, None]
    q, k, v = (a.reshape(2 * 4, 8, 10) for a in np.split(qkv, 3, axis=1))  # new order: q/k/v, then heads
    logits = np.einsum("bct,bcs->bts", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bts,bcs->bct", weights, v).reshape(2, 32, 10)
    want = (np.einsum("oi,bil->bol", p["c_proj.weight"][:, :, 0], attended) + p["c_proj.bias"][:, None])[:, :, 0]
    got = pool(ms.Tensor(x)).asnumpy()
    assert got.shape == want.shape
    # relative to the largest logit: measured 5.6e-7 (1.5e-6 on values up to 2.6)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
