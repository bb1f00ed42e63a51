"""Classifier-free guidance on a tiny GLIDE model, checked against direct model calls;
classifier guidance against the analytic gradient of a linear classifier."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from mind_diffusion.sampling.guidance import ClassifierFreeGuidance, ClassifierGuidance
from models.glide import Text2ImUNet
from models.text import ByteTokenizer

CTX, IMAGE, BATCH = 16, 8, 2
PROMPTS = ["红色圆形", "a blue square"]


def tiny_text2im(out_channels):
    return Text2ImUNet(
        text_ctx=CTX, xf_width=32, xf_layers=2, xf_heads=4, xf_final_ln=True, xf_padding=True,
        vocab_size=ByteTokenizer.n_vocab, image_size=IMAGE, in_channels=3, model_channels=32, out_channels=out_channels,
        num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
        use_scale_shift_norm=True, resblock_updown=True,
    )


def randomize(net, seed):
    """Random weights everywhere, zero-initialised output layers included, so both halves differ."""
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        param.set_data(ms.Tensor(rng.normal(0.0, 0.2, param.shape).astype(np.float32)))


class Direct(nn.Cell):
    """The model called plainly, as a graph, for the reference outputs."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, x, t, tokens, mask):
        return self.model(x, t, tokens, mask)


@pytest.fixture(scope="module")
def setup():
    tokenizer = ByteTokenizer(CTX)
    model = tiny_text2im(out_channels=6)
    randomize(model, 0)
    model.set_train(False)
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32))
    t = ms.Tensor(np.array([10, 700], np.int32))
    tokens, mask = tokenizer(PROMPTS)
    uncond_tokens, uncond_mask = tokenizer.unconditional(BATCH)
    direct = Direct(model)
    cond_out = direct(x, t, ms.Tensor(tokens), ms.Tensor(mask)).asnumpy()
    uncond_out = direct(x, t, ms.Tensor(uncond_tokens), ms.Tensor(uncond_mask)).asnumpy()
    assert not np.allclose(cond_out, uncond_out, atol=1e-3)  # otherwise the checks below prove nothing
    return dict(model=model, tokenizer=tokenizer, x=x, t=t, tokens=ms.Tensor(tokens), mask=ms.Tensor(mask),
                cond_out=cond_out, uncond_out=uncond_out)


def guided(setup, scale):
    uncond_tokens, uncond_mask = setup["tokenizer"].unconditional(1)
    wrapper = ClassifierFreeGuidance(setup["model"], scale, uncond_tokens, uncond_mask, eps_channels=3)
    return wrapper(setup["x"], setup["t"], tokens=setup["tokens"], mask=setup["mask"]).asnumpy()


def test_scale_one_is_the_conditional_model(setup):
    np.testing.assert_allclose(guided(setup, 1.0), setup["cond_out"], rtol=1e-4, atol=1e-4)


def test_scale_zero_is_the_unconditional_eps(setup):
    out = guided(setup, 0.0)
    np.testing.assert_allclose(out[:, :3], setup["uncond_out"][:, :3], rtol=1e-4, atol=1e-4)
    # learned-variance channels: the conditional half's, whatever the scale
    np.testing.assert_allclose(out[:, 3:], setup["cond_out"][:, 3:], rtol=1e-4, atol=1e-4)


def test_scale_three_extrapolates(setup):
    out = guided(setup, 3.0)
    eps_cond, eps_uncond = setup["cond_out"][:, :3], setup["uncond_out"][:, :3]
    np.testing.assert_allclose(out[:, :3], eps_uncond + 3.0 * (eps_cond - eps_uncond), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[:, 3:], setup["cond_out"][:, 3:], rtol=1e-4, atol=1e-4)


def test_wrapping_keeps_parameter_names(setup):
    names = sorted(p.name for p in setup["model"].get_parameters())
    uncond_tokens, uncond_mask = setup["tokenizer"].unconditional(1)
    wrapper = ClassifierFreeGuidance(setup["model"], 2.0, uncond_tokens, uncond_mask)
    assert sorted(p.name for p in wrapper.get_parameters()) == names
    assert "token_embedding.embedding_table" in names


class LinearClassifier(nn.Cell):
    """logits = W · flatten(x) + b + t·c: its log-softmax gradient is known in closed form."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.dense = nn.Dense(in_features, num_classes)
        self.time_weight = ms.Parameter(ms.Tensor(np.linspace(-1, 1, num_classes).astype(np.float32)),
                                        name="time_weight")

    def construct(self, x, t):
        return self.dense(x.reshape(x.shape[0], -1)) + t.astype(ms.float32)[:, None] * 0.01 * self.time_weight


def test_classifier_guidance_gradient():
    classifier = LinearClassifier(3 * 4 * 4, 5)
    guide = ClassifierGuidance(classifier, classifier_scale=2.5)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    t = np.array([0, 50, 999], np.int32)
    y = np.array([4, 0, 2], np.int32)
    grad = guide(ms.Tensor(x), ms.Tensor(t), ms.Tensor(y)).asnumpy()

    weight = classifier.dense.weight.asnumpy().astype(np.float64)
    logits = x.reshape(3, -1) @ weight.T + classifier.dense.bias.asnumpy() + \
        t[:, None] * 0.01 * classifier.time_weight.asnumpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # d/dx log softmax(Wx + b)_y = W_y − Σ_k p_k W_k
    want = 2.5 * (weight[y] - probs @ weight).reshape(x.shape)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


class ScaledByW(nn.Cell):
    """A stand-in diffusion network x · w whose parameter name clashes with the classifier's ``dense.weight``."""

    def __init__(self, shape):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.full(shape, 3.0, np.float32)), name="dense.weight")

    def construct(self, x, t):
        return x * self.weight.mean()


def test_a_classifier_whose_names_clash_with_the_model_guides_with_its_own_weights():
    """The model and the classifier share a parameter name (as an ADM UNet and its classifier do); in one
    sampling graph each still reads its own weights: the guided DDPM step is the model's mean + Σ·g."""
    from mind_diffusion.gaussian_diffusion import create_diffusion
    from mind_diffusion.sampling.schedulers import SamplingGraph, create_scheduler

    classifier = LinearClassifier(3 * 4 * 4, 5)
    model = ScaledByW((5, 3 * 4 * 4))
    assert {p.name for p in model.get_parameters()} & {p.name for p in classifier.get_parameters()}
    guide = ClassifierGuidance(classifier, classifier_scale=2.0)
    scheduler = create_scheduler("ddpm", create_diffusion(steps=10, noise_schedule="cosine")).set_timesteps(10)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    k, y = np.zeros((2,), np.int32), np.array([1, 3], np.int32)
    zeros = ms.Tensor(np.zeros_like(x))

    plain = SamplingGraph(model, scheduler.make_step())(ms.Tensor(x), ms.Tensor(k), zeros)[0].asnumpy()
    guided_graph = SamplingGraph(model, scheduler.make_step(guided=True), (), guide, 1)
    guided = guided_graph(ms.Tensor(x), ms.Tensor(k), zeros, ms.Tensor(y))[0].asnumpy()
    t = np.full((2,), 9, np.int32)  # the first call runs at t = T − 1
    gradient = guide(ms.Tensor(x), ms.Tensor(t), ms.Tensor(y)).asnumpy()  # the classifier's own weights
    sigma = scheduler.process.schedule["fixed_large_variance"][9]  # Σ_t = β_t (fixed large, t > 0)
    np.testing.assert_allclose(guided - plain, sigma * gradient, rtol=1e-4, atol=1e-7)
    assert np.abs(sigma * gradient).max() > 1e-3  # the shift is visible
