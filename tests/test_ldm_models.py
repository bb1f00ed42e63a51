"""The latent UNet and the KL autoencoder against CompVis's Stable Diffusion code and Wukong-Huahua's MindSpore
code (tests/fixtures/ldm_sd1_tiny.*, wukong_tiny.*), in GRAPH_MODE; and the blocks' options against NumPy."""
import numpy as np
import pytest
from scipy.special import erf

import mindspore as ms

from mind_diffusion.convert import load_into
from models.autoencoder import LatentDecoder, LatentEncoder
from models.cross_attention import GEGLU, SpatialTransformer
from models.latent_unet import create_latent_unet
from tests.ldm_util import SD_CKPT, WUKONG_CKPT, fixture_arrays, load_networks


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def run_unet(unet, ref):
    return unet(ms.Tensor(ref["unet_x"]), ms.Tensor(ref["unet_t"].astype(np.int32)),
                ms.Tensor(ref["unet_context"])).asnumpy()


@pytest.fixture(scope="module")
def sd():
    return load_networks(SD_CKPT) + (fixture_arrays("ldm_sd1_tiny"),)


@pytest.fixture(scope="module")
def wukong():
    return load_networks(WUKONG_CKPT) + (fixture_arrays("wukong_tiny"),)


def test_sd_unet_eps(sd):
    unet, _, _, ref = sd
    # measured 2.0e-6 (|eps| up to 1.9; t = 17 and 981)
    assert max_abs(run_unet(unet, ref), ref["unet_eps"]) <= 1e-5


def test_sd_autoencoder_posterior_and_decoder(sd):
    _, vae, config, ref = sd
    mean, logvar = vae(ms.Tensor(ref["vae_image"]))
    assert max_abs(mean.asnumpy(), ref["vae_mean"]) <= 1e-5      # measured 2.8e-6
    assert max_abs(logvar.asnumpy(), ref["vae_logvar"]) <= 1e-5  # measured 3.0e-6
    latent = ms.Tensor(ref["vae_latent"])
    assert max_abs(LatentDecoder(vae, scaled=False)(latent).asnumpy(), ref["vae_decoded"]) <= 1e-5
    # decode_first_stage: decode(z / 0.18215)
    assert config["scale_factor"] == 0.18215
    assert max_abs(LatentDecoder(vae)(latent).asnumpy(), ref["vae_decode_first_stage"]) <= 1e-5


def test_latent_encoder_scales_the_posterior_mean_or_draw(sd):
    _, vae, config, ref = sd
    image = ms.Tensor(ref["vae_image"])
    scale = config["scale_factor"]
    assert max_abs(LatentEncoder(vae)(image).asnumpy(), scale * ref["vae_mean"]) <= 1e-5
    noise = np.random.default_rng(0).standard_normal(ref["vae_mean"].shape).astype(np.float32)
    drawn = LatentEncoder(vae)(image, ms.Tensor(noise)).asnumpy()
    assert max_abs(drawn, scale * (ref["vae_mean"] + ref["vae_std"] * noise)) <= 1e-5


def test_wukong_unet_eps_needs_its_tanh_gelu(wukong, sd):
    unet, _, config, ref = wukong
    assert config["numerics"] == "wukong" and config["unet"]["gelu_approximate"]
    assert config["unet"]["float32_frequencies"]
    # measured 2.6e-6 (5.4e-5 at t = 981 with float64 frequencies, 2.4e-4 with exact GELU)
    assert max_abs(run_unet(unet, ref), ref["unet_eps"]) <= 1e-5
    # The same weights with SD's exact GELU miss Wukong's output by far more (json: 2.4e-4 from torch's).
    assert max_abs(run_unet(sd[0], ref), ref["unet_eps"]) > 1e-4


def test_wukong_autoencoder(wukong):
    _, vae, _, ref = wukong
    mean, logvar = vae(ms.Tensor(ref["vae_image"]))
    # measured 3.6e-6, 3.0e-6 and 4.1e-6
    assert max_abs(mean.asnumpy(), ref["vae_mean"]) <= 1e-5
    assert max_abs(logvar.asnumpy(), ref["vae_logvar"]) <= 1e-5
    assert max_abs(LatentDecoder(vae, scaled=False)(ms.Tensor(ref["vae_latent"])).asnumpy(),
                   ref["vae_decoded"]) <= 1e-5


def test_geglu_gate_is_exact_or_tanh_gelu():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (3, 5, 4)).astype(np.float32)
    for approximate in (False, True):
        net = GEGLU(4, 6, gelu_approximate=approximate)
        projected = x.astype(np.float64) @ net.proj.weight.asnumpy().T + net.proj.bias.asnumpy()
        value, gate = projected[..., :6], projected[..., 6:]
        if approximate:
            gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
        else:
            gelu = 0.5 * gate * (1 + erf(gate / np.sqrt(2)))
        np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), value * gelu, rtol=1e-5, atol=1e-5)


def test_linear_and_conv_projections_compute_the_same_transformer():
    """SD 2.x's dense proj_in/proj_out (weights [C', C]) equal SD 1.x's 1x1 convs (weights [C', C, 1, 1])."""
    conv = SpatialTransformer(32, heads=2, dim_head=8, depth=2, context_dim=12)
    linear = SpatialTransformer(32, heads=2, dim_head=8, depth=2, context_dim=12, use_linear=True)
    rng = np.random.default_rng(1)
    values = {p.name: rng.normal(0, 0.2, p.shape).astype(np.float32) for p in conv.get_parameters()}
    load_into(conv, values)
    linear_shapes = {p.name: p.shape for p in linear.get_parameters()}
    load_into(linear, {k: v.reshape(linear_shapes[k]) for k, v in values.items()})
    assert linear.proj_in.weight.shape == (16, 32) and conv.proj_in.weight.shape == (16, 32, 1, 1)
    x = ms.Tensor(rng.normal(size=(2, 32, 4, 4)).astype(np.float32))
    context = ms.Tensor(rng.normal(size=(2, 5, 12)).astype(np.float32))
    out_conv, out_linear = conv(x, context).asnumpy(), linear(x, context).asnumpy()
    assert max_abs(out_conv, x.asnumpy()) > 1e-2  # the blocks do something
    np.testing.assert_allclose(out_linear, out_conv, rtol=1e-5, atol=1e-5)


def test_the_pooled_context_joins_the_timestep_embedding():
    """``pooled_context=True`` (GLIDE's pooled-text path, not SD's): emb = time_embed(t) + W·mean_L(context) + b
    reaches every residual block (AdaGN here). Checked against the same weights without the path, fed that emb
    computed in NumPy; and with every cross-attention silenced (proj_out = 0) the caption still acts."""
    arguments = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                     attention_resolutions=(2,), channel_mult=(1, 2), num_heads=-1, num_head_channels=16,
                     context_dim=12, use_scale_shift_norm=True)
    pooled, plain = create_latent_unet(pooled_context=True, **arguments), create_latent_unet(**arguments)
    rng = np.random.default_rng(4)
    values = {p.name: rng.normal(0, 0.2, p.shape).astype(np.float32) for p in pooled.get_parameters()}
    load_into(pooled, values)
    load_into(plain, {k: v for k, v in values.items() if not k.startswith("context_proj.")})
    x = ms.Tensor(rng.normal(size=(2, 4, 8, 8)).astype(np.float32))
    t = ms.Tensor(np.array([3, 870], np.int32))
    context = rng.normal(size=(2, 7, 12)).astype(np.float32)
    projected = context.astype(np.float64).mean(1) @ values["context_proj.weight"].T.astype(np.float64) \
        + values["context_proj.bias"]
    want = plain.forward_with_emb(x, plain.embed(t) + ms.Tensor(projected.astype(np.float32)), ms.Tensor(context))
    got = pooled(x, t, ms.Tensor(context)).asnumpy()
    assert max_abs(got, plain(x, t, ms.Tensor(context)).asnumpy()) > 1e-2  # the path does something
    np.testing.assert_allclose(got, want.asnumpy(), rtol=1e-5, atol=1e-5)

    silenced = {k: (np.zeros_like(v) if ".proj_out." in k else v) for k, v in values.items()}
    assert sum(".proj_out." in k for k in silenced) >= 2
    other = ms.Tensor(rng.normal(size=(2, 7, 12)).astype(np.float32))
    outputs = {}
    for name, network in (("pooled", pooled), ("plain", plain)):
        load_into(network, {k: v for k, v in silenced.items() if name == "pooled" or not k.startswith("context_proj.")})
        outputs[name] = [network(x, t, c).asnumpy() for c in (ms.Tensor(context), other)]
    np.testing.assert_array_equal(outputs["plain"][0], outputs["plain"][1])  # cross-attention was its only way in
    assert max_abs(*outputs["pooled"]) > 1e-2


def test_float16_torso_stays_close_and_returns_float32():
    """The Ascend recipe's float16 torso (convolutions and the transformers' dense layers in float16, norms and
    softmax in float32) runs on the fixture and lands near the float32 reference."""
    unet, _, _ = load_networks(SD_CKPT, unet_dtype=ms.float16)
    ref = fixture_arrays("ldm_sd1_tiny")
    eps = run_unet(unet, ref)
    assert eps.dtype == np.float32
    assert max_abs(eps, ref["unet_eps"]) <= 1e-2  # measured 3.8e-3 (|eps| up to 1.9; float16 ulp at 1 is 9.8e-4)
