"""The ADM UNet: guided-diffusion's output reproduced from its weights, options, attention, mixed precision."""
import mindspore as ms
import numpy as np
import pytest

from mind_diffusion.convert import convert_state_dict, load_into
from models.unet import AttentionBlock, SuperResModel, UNetModel, attention_downsample_rates, create_model
from tests.conftest import load_fixture
from tests.params_util import randomize_parameters

TINY = dict(
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_heads=2,
)


def _inputs(batch=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = ms.Tensor(rng.normal(size=(batch, 3, size, size)).astype(np.float32))
    t = ms.Tensor(np.array([3, 900][:batch], dtype=np.int64))
    return x, t


def fixture_unet(name):
    """Our UNet built from the fixture's create_model arguments, in eval mode, with its converted weights."""
    config, arrays, torch_sd = load_fixture(name)
    assert config.pop("kind") == "unet"
    model = create_model(**config)
    model.set_train(False)
    load_into(model, convert_state_dict(torch_sd, model))
    return model, arrays, torch_sd


def test_reproduces_guided_diffusion_unet_fixture():
    model, fixture, _ = fixture_unet("guided_diffusion_unet")
    out = model(ms.Tensor(fixture["x"]), ms.Tensor(fixture["t"]), ms.Tensor(fixture["y"])).asnumpy()
    assert out.shape == fixture["out"].shape == (4, 6, 32, 32)
    # measured 8.9e-8 with the C++ kernels, 1.6e-7 on pure ops (outputs up to 0.15)
    assert np.abs(out - fixture["out"]).max() <= 5e-7


def test_reproduces_guided_diffusion_unet_with_conv_resampling():
    """resblock_updown False (the DDPM / improved-DDPM layout): Downsample is a stride-2 3x3 conv, Upsample
    nearest ×2 then a 3x3 conv; with the additive timestep embedding and the legacy attention order."""
    model, fixture, torch_sd = fixture_unet("guided_diffusion_unet_conv_resample")
    assert {"input_blocks.2.0.op.weight", "output_blocks.1.2.conv.weight"} <= set(torch_sd)
    out = model(ms.Tensor(fixture["x"]), ms.Tensor(fixture["t"])).asnumpy()
    assert out.shape == fixture["out"].shape == (4, 6, 16, 16)
    # measured 2.1e-6 with the C++ kernels, 2.9e-6 on pure ops (outputs up to 2.3)
    assert np.abs(out - fixture["out"]).max() <= 1e-5


def test_attention_resolutions_are_converted_to_downsample_rates():
    assert attention_downsample_rates(64, "32,16,8") == (2, 4, 8)
    assert attention_downsample_rates(32, [16, 8]) == (2, 4)


@pytest.mark.parametrize(
    "options, out_channels",
    [
        (dict(), 3),  # conv up/down-sampling, legacy attention order, additive embedding
        (dict(conv_resample=False, use_scale_shift_norm=True), 3),  # average pool / nearest, AdaGN
        (dict(resblock_updown=True, use_new_attention_order=True, num_head_channels=16, num_classes=5), 6),
    ],
    ids=["conv-resample", "pool-adagn", "biggan-newattn-class-sigma"],
)
def test_option_combinations_give_image_shaped_float32(options, out_channels):
    model = UNetModel(**{**TINY, "out_channels": out_channels, **options})
    randomize_parameters(model)
    x, t = _inputs()
    y = ms.Tensor(np.array([0, 4], dtype=np.int32)) if "num_classes" in options else None
    out = model(x, t, y)
    assert out.shape == (2, out_channels, 16, 16) and out.dtype == ms.float32
    assert np.isfinite(out.asnumpy()).all()


def test_fresh_model_predicts_zero_through_zero_initialised_layers():
    model = UNetModel(**TINY)
    zeroed = [p for p in model.get_parameters() if p.name.startswith("out.2.") or ".out_layers.3." in p.name
              or ".proj_out." in p.name]
    assert len(zeroed) == 2 + 2 * 8 + 2 * 4  # output conv; 8 res blocks; 4 attention blocks
    assert all(not p.asnumpy().any() for p in zeroed)
    x, t = _inputs()
    assert not model(x, t).asnumpy().any()


def test_class_label_required_exactly_for_class_conditional_models():
    model = UNetModel(**TINY)
    x, t = _inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t, ms.Tensor(np.array([0, 1], dtype=np.int32)))


def test_float16_torso_keeps_float32_norms_and_output():
    """ADM's use_fp16 (CPU has float16 kernels): close to the float32 model with the same weights."""
    model32 = UNetModel(**TINY, use_scale_shift_norm=True)
    model16 = UNetModel(**TINY, use_scale_shift_norm=True, use_fp16=True)
    randomize_parameters(model32, seed=3)
    randomize_parameters(model16, seed=3)
    assert all(p.dtype == ms.float32 for p in model16.get_parameters())
    x, t = _inputs()
    out32, out16 = model32(x, t).asnumpy(), model16(x, t)
    assert out16.dtype == ms.float32
    assert np.abs(out16.asnumpy() - out32).max() <= 1e-2 * np.abs(out32).max()  # measured 2.0e-3
    assert np.abs(out16.asnumpy() - out32).max() > 0  # the torso really ran in float16


def _group_norm(x, gamma, beta, groups=32, eps=1e-5):
    n, c, length = x.shape
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(n, c, length) * gamma[:, None] + beta[:, None]


def _attention_reference(x, params, heads, new_order, encoder_out=None):
    """glide-text2im / guided-diffusion AttentionBlock in numpy (float64)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    n, c = x.shape[:2]
    tokens = x.reshape(n, c, -1).astype(np.float64)
    length, d = tokens.shape[-1], c // heads

    def proj(name, h):
        return np.einsum("oi,bil->bol", p[f"{name}.weight"][:, :, 0], h) + p[f"{name}.bias"][:, None]

    qkv = proj("qkv", _group_norm(tokens, p["norm.gamma"], p["norm.beta"]))
    if new_order:
        q, k, v = (a.reshape(n * heads, d, length) for a in np.split(qkv, 3, axis=1))
    else:
        q, k, v = np.split(qkv.reshape(n * heads, 3 * d, length), 3, axis=1)
    if encoder_out is not None:
        kv = proj("encoder_kv", encoder_out.astype(np.float64))
        if new_order:
            ek, ev = (a.reshape(n * heads, d, -1) for a in np.split(kv, 2, axis=1))
        else:
            ek, ev = np.split(kv.reshape(n * heads, 2 * d, -1), 2, axis=1)
        k, v = np.concatenate([ek, k], -1), np.concatenate([ev, v], -1)
    logits = np.einsum("bct,bcs->bts", q, k) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    h = np.einsum("bts,bcs->bct", weights, v).reshape(n, c, length)
    return (tokens + proj("proj_out", h)).reshape(x.shape)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
@pytest.mark.parametrize("with_text", [False, True], ids=["self", "encoder_kv"])
def test_attention_block_matches_numpy(new_order, with_text):
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order, encoder_channels=24 if with_text else None)
    randomize_parameters(block, seed=5, scale=0.3)
    params = {p.name: p.asnumpy() for p in block.get_parameters()}
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 64, 3, 4)).astype(np.float32)
    encoder_out = rng.normal(size=(2, 24, 5)).astype(np.float32) if with_text else None
    got = block(ms.Tensor(x), None if encoder_out is None else ms.Tensor(encoder_out)).asnumpy()
    want = _attention_reference(x, params, 4, new_order, encoder_out)
    assert got.shape == want.shape
    # relative to the largest output: measured 9.8e-7 (1.8e-5 on values up to 19)
    assert np.abs(got - want).max() <= 3e-6 * np.abs(want).max()


class _Conditioned(UNetModel):
    """The GLIDE subclassing pattern: extra term in the embedding, states to every attention block."""

    def construct(self, x, timesteps, extra, encoder_out):
        return self.forward_with_emb(x, self.embed(timesteps) + extra, encoder_out)


def test_subclass_hook_passes_encoder_states_to_every_attention_block():
    model = _Conditioned(**TINY, encoder_channels=8)
    assert sum(".encoder_kv." in p.name for p in model.get_parameters()) == 2 * 4
    randomize_parameters(model, seed=7)
    x, t = _inputs()
    rng = np.random.default_rng(8)
    extra = ms.Tensor(np.zeros((2, 128), np.float32))
    states = rng.normal(size=(2, 8, 6)).astype(np.float32)
    first = model(x, t, extra, ms.Tensor(states)).asnumpy()
    other_states = model(x, t, extra, ms.Tensor(states[::-1].copy())).asnumpy()
    other_emb = model(x, t, ms.Tensor(np.ones((2, 128), np.float32)), ms.Tensor(states)).asnumpy()
    assert first.shape == (2, 3, 16, 16)
    assert np.abs(first - other_states).max() > 1e-3 and np.abs(first - other_emb).max() > 1e-3


def _bilinear_reference(image, size):
    """PyTorch's F.interpolate(mode="bilinear", align_corners=False) in numpy."""
    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), lo), 1 - (src - lo))
        np.add.at(matrix, (np.arange(n_out), hi), src - lo)
        return matrix

    rows, cols = axis_weights(image.shape[2], size), axis_weights(image.shape[3], size)
    return np.einsum("oh,nchw,pw->ncop", rows, image, cols)


def test_super_res_model_conditions_on_bilinearly_upsampled_low_res():
    model = SuperResModel(**TINY)
    assert model.input_blocks[0][0].in_channels == 6
    randomize_parameters(model, seed=9)
    x, t = _inputs()
    low_res = np.random.default_rng(10).normal(size=(2, 3, 8, 8)).astype(np.float32)
    out = model(x, t, ms.Tensor(low_res))
    assert out.shape == (2, 3, 16, 16)
    # The same weights in a plain 6-channel UNet, fed the concatenation upsampled by PyTorch's bilinear rule.
    plain = UNetModel(**{**TINY, "in_channels": 6})
    load_into(plain, {p.name: p.asnumpy() for p in model.get_parameters()})
    concatenated = np.concatenate([x.asnumpy(), _bilinear_reference(low_res, 16).astype(np.float32)], axis=1)
    direct = plain(ms.Tensor(concatenated), t)
    # relative to the largest output: measured 9.7e-7 (8.7e-6 on values up to 8.9)
    assert np.abs(out.asnumpy() - direct.asnumpy()).max() <= 3e-6 * np.abs(direct.asnumpy()).max()


def test_compute_dtype_options():
    """bfloat16 convolutions have no CPU kernel in MindSpore 2.10: the option is built here, run on Ascend."""
    assert UNetModel(**TINY, dtype=ms.bfloat16).dtype == ms.bfloat16
    assert UNetModel(**TINY, use_fp16=True).dtype == ms.float16
    assert UNetModel(**TINY).dtype == ms.float32
    with pytest.raises(ValueError, match="contradicts"):
        UNetModel(**TINY, use_fp16=True, dtype=ms.bfloat16)


def test_use_checkpoint_recomputes_with_the_same_gradients():
    """Gradient checkpointing (ADM's use_checkpoint) changes memory, not the loss or any gradient."""
    from mindspore import nn, ops

    class Loss(nn.Cell):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def construct(self, x, t):
            return (self.model(x, t) ** 2).mean()

    grads = []
    for use_checkpoint in (False, True):
        model = UNetModel(**TINY, use_scale_shift_norm=True, use_checkpoint=use_checkpoint)
        randomize_parameters(model, seed=5)
        loss = Loss(model)
        grad_fn = ms.jit(ms.value_and_grad(loss, None, loss.trainable_params()))
        value, g = grad_fn(*_inputs())
        grads.append((value.asnumpy(), [v.asnumpy() for v in g]))
    # The recomputation runs the same kernels on the same values: measured bit-identical.
    np.testing.assert_array_equal(grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1]):
        np.testing.assert_array_equal(a, b)
