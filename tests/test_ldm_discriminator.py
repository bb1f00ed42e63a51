"""The autoencoder's patch discriminator (models/discriminator.py) and adversarial objective
(mind_diffusion/train/latent.py:AutoencoderLoss): the network against NumPy, the step's gradients against
separately computed gradients of each term (the adaptive weight λ from full backward passes), the start
step, the trainer's checkpoint of the discriminator and an exact resume across the start step.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from mind_diffusion.cli.factory import build_diffusion, build_discriminator, build_model
from mind_diffusion.config import ConfigError, config_from_dict, discriminator_grid
from mind_diffusion.kernels import conv as conv_kernels
from mind_diffusion.train.latent import AutoencoderLoss
from mind_diffusion.train.trainer import Trainer
from models.discriminator import PatchDiscriminator

BATCH, C, SIDE, LATENT = 2, 4, 16, 8


def np_conv(x, w, stride):
    """Cross-correlation of x [N, C, H, W] with w [O, C, 4, 4], padding 1 (float64)."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    k = w.shape[-1]
    out_h, out_w = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out


def np_discriminator(x, params, layers):
    """PatchGAN, written from the pix2pix layout: conv/2 + lrelu, (L−1)·(conv/2 + BN + lrelu), conv/1 + BN +
    lrelu, conv/1; BN with the batch's statistics (biased variance, ε 1e-5)."""
    h = x.astype(np.float64)
    count = layers + 2
    for i in range(count):
        h = np_conv(h, params[f"conv{i}.weight"], 2 if i < layers else 1)
        if 0 < i < count - 1:
            mean = h.mean(axis=(0, 2, 3), keepdims=True)
            var = h.var(axis=(0, 2, 3), keepdims=True)
            h = (h - mean) / np.sqrt(var + 1e-5) * params[f"norm{i}.gamma"].reshape(1, -1, 1, 1) \
                + params[f"norm{i}.beta"].reshape(1, -1, 1, 1)
        else:
            h = h + params[f"conv{i}.bias"].reshape(1, -1, 1, 1)
        if i < count - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h


@pytest.mark.parametrize("fast", [pytest.param(True, marks=pytest.mark.kernel(conv_kernels)), False],
                         ids=["onednn", "ops"])
def test_discriminator_matches_numpy_and_the_grid_formula(fast, monkeypatch):
    """Both convolution paths: the C++ kernels (CPU) and ``ops.conv2d`` (other backends, no compiler)."""
    if not fast:
        monkeypatch.setenv(conv_kernels.ENV_SWITCH, "0")
    disc = PatchDiscriminator(3, 8, 2, seed=4)
    assert [op is not None for op in disc.fast_ops] == [fast] * 4
    params = {name.split(".", 1)[1] if name.startswith("discriminator.") else name: p.asnumpy().astype(np.float64)
              for name, p in disc.parameters_and_names()}
    for name in [n for n in params if n.endswith(".beta") or n.endswith(".bias")]:  # non-zero, to be exercised
        params[name] = np.random.default_rng(len(name)).normal(0, 0.1, params[name].shape)
    for name, p in disc.parameters_and_names():
        p.set_data(ms.Tensor(params[name].astype(np.float32)))
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 24, 24)).astype(np.float32)
    got = disc(ms.Tensor(x)).asnumpy()
    want = np_discriminator(x, params, 2)
    assert got.shape == (3, 1, discriminator_grid(24, 2), discriminator_grid(24, 2)) == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert sorted(params) == sorted(["conv0.weight", "conv1.weight", "conv2.weight", "conv3.weight", "conv0.bias",
                                     "conv3.bias", "norm1.gamma", "norm1.beta", "norm2.gamma", "norm2.beta"])
    # CompVis's initialisation: N(0, 0.02) convolutions, N(1, 0.02) norm scales, zero biases
    fresh = {n: p.asnumpy() for n, p in PatchDiscriminator(3, 64, 3, seed=0).parameters_and_names()}
    assert abs(fresh["conv1.weight"].std() - 0.02) < 1e-3 and abs(fresh["norm1.gamma"].mean() - 1.0) < 0.01
    assert not fresh["conv0.bias"].any() and not fresh["norm1.beta"].any()


def tiny_autoencoder():
    config = config_from_dict({"model": {"arch": "autoencoder", "image_size": SIDE, "ae_channels": 32,
                                         "ae_channel_mult": [1, 2], "ae_num_res_blocks": 1,
                                         "latent_channels": C}})
    ms.set_seed(5)
    return build_model(config.model)[0]


def batch(seed):
    rng = np.random.default_rng(seed)
    return (ms.Tensor(rng.uniform(-1, 1, (BATCH, 3, SIDE, SIDE)).astype(np.float32)),
            ms.Tensor(np.array([0.25, 0.75], np.float32)),
            ms.Tensor(rng.standard_normal((BATCH, C, LATENT, LATENT)).astype(np.float32)))


class Objective(nn.Cell):
    """The scalar a loss cell's step minimises (its first output)."""

    def __init__(self, loss_net):
        super().__init__()
        self.loss_net = loss_net

    def construct(self, images, u, noise):
        return self.loss_net(images, u, noise)[0]


class Reconstruction(nn.Cell):
    """x̂ = Dec(μ + σ·n): the autoencoder's forward, written here."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, images, noise):
        mean, logvar = self.vae.posterior(images)
        return self.vae.decode(mean + ops.exp(0.5 * logvar) * noise)


class GeneratorTerm(nn.Cell):
    """L_G = −mean D(x̂) (D frozen)."""

    def __init__(self, vae, disc):
        super().__init__()
        self.reconstruction, self.disc = Reconstruction(vae), disc

    def construct(self, images, noise):
        return -self.disc(self.reconstruction(images, noise), True).mean()


class NllTerm(nn.Cell):
    """L_nll = Σ|x − x̂| / B."""

    def __init__(self, vae):
        super().__init__()
        self.reconstruction = Reconstruction(vae)

    def construct(self, images, noise):
        return ops.abs(images - self.reconstruction(images, noise)).sum() / images.shape[0]


class HingeTerm(nn.Cell):
    """L_D = ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))), x̂ a constant."""

    def __init__(self, vae, disc):
        super().__init__()
        self.reconstruction, self.disc = Reconstruction(vae), disc

    def construct(self, images, noise):
        fake = ops.stop_gradient(self.reconstruction(images, noise))
        return 0.5 * (ops.relu(1.0 - self.disc(images)).mean() + ops.relu(1.0 + self.disc(fake)).mean())


def test_one_backward_gives_each_network_its_own_loss_gradient():
    """Autoencoder: ∇L_rec + λ ∇L_G with λ = s‖∇_W L_nll‖ / (‖∇_W L_G‖ + 1e-4) from full backward passes (W the
    decoder's last weight); discriminator: ∇L_D; before ``disc_start`` ∇L_rec alone and nothing for D."""
    vae = tiny_autoencoder()
    disc = PatchDiscriminator(3, 8, 2, seed=1)
    loss_net = AutoencoderLoss(vae, kl_weight=0.25, discriminator=disc, disc_weight=0.5, disc_start=1)
    plain = AutoencoderLoss(vae, kl_weight=0.25)
    ae_params = vae.trainable_params()
    d_params = disc.trainable_params()
    step = ops.value_and_grad(Objective(loss_net), None, ae_params + d_params)
    images, u, noise = batch(3)

    rec_grads = ops.grad(Objective(plain), None, ae_params)(images, u, noise)
    nll_grads = ops.grad(NllTerm(vae), None, ae_params)(images, noise)
    g_grads = ops.grad(GeneratorTerm(vae, disc), None, ae_params)(images, noise)
    d_grads = ops.grad(HingeTerm(vae, disc), None, d_params)(images, noise)
    last = [i for i, p in enumerate(ae_params) if p is vae.decoder.conv_out.weight][0]
    ratio = np.linalg.norm(nll_grads[last].asnumpy()) / (np.linalg.norm(g_grads[last].asnumpy()) + 1e-4)
    lam = 0.5 * min(max(ratio, 0.0), 1e4)

    # step 0 (< disc_start): the reconstruction objective alone, and no gradient for D
    _, grads = step(images, u, noise)
    for got, want in zip(grads[:len(ae_params)], rec_grads):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-4, atol=1e-6)
    assert all(not g.asnumpy().any() for g in grads[len(ae_params):])

    # step 1: both terms. Float32 agreement per parameter: a relative error of the whole tensor, or against the
    # largest gradient for the few whose gradient is zero but for rounding (conv biases before a GroupNorm)
    loss, grads = step(images, u, noise)
    wants = [rec.asnumpy() + lam * gen.asnumpy() for rec, gen in zip(rec_grads, g_grads)]
    scale = max(np.abs(w).max() for w in wants)
    for got, want in zip(grads[:len(ae_params)], wants):
        error = np.abs(got.asnumpy() - want)
        if np.abs(want).max() > 1e-3 * scale:
            assert np.linalg.norm(error) <= 1e-5 * np.linalg.norm(want)
        else:
            assert error.max() <= 1e-6 * scale
    shares = [np.linalg.norm(lam * gen.asnumpy()) / np.linalg.norm(rec.asnumpy()) for rec, gen in zip(rec_grads, g_grads)]
    assert np.median(shares) > 0.1  # the adversarial share is a visible part of the gradients
    for got, want in zip(grads[len(ae_params):], d_grads):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-4, atol=1e-6)
    assert int(loss_net.steps.asnumpy()) == 2

    # the reported terms
    out = [v.asnumpy() for v in loss_net(images, u, noise)]
    _, _, losses, l1, kl, g_losses, d_losses, d_weight = out
    recon = Reconstruction(vae)(images, noise)
    fake = disc(recon, True).asnumpy().astype(np.float64)
    real = disc(images).asnumpy().astype(np.float64)
    want_g = -fake.mean(axis=(1, 2, 3))
    want_d = 0.5 * (np.maximum(1 - real, 0).mean(axis=(1, 2, 3)) + np.maximum(1 + fake, 0).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(g_losses, want_g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_losses, want_d, rtol=1e-5)
    np.testing.assert_allclose(d_weight, [lam, lam], rtol=1e-4)
    rec_losses = plain(images, u, noise)[2].asnumpy()
    np.testing.assert_allclose(losses, rec_losses + lam * want_g + want_d, rtol=1e-5)


def adversarial_recipe(**train):
    return {
        "name": "ae_gan_tiny", "seed": 2,
        "model": {"arch": "autoencoder", "image_size": SIDE, "ae_channels": 32, "ae_channel_mult": [1, 2],
                  "ae_num_res_blocks": 1, "latent_channels": C},
        "data": {"kind": "demo", "demo_size": 8, "random_flip": False},
        "train": {"batch_size": BATCH, "lr": 1e-3, "ema_rate": [0.5], "total_steps": 3, "save_every": 1,
                  "log_every": 1, "disc_weight": 0.5, "disc_start": 2, "disc_layers": 2, "disc_channels": 8,
                  **train},
    }


@pytest.fixture(scope="module")
def adversarial_run(tmp_path_factory):
    config = config_from_dict(adversarial_recipe())
    model, _ = build_model(config.model)
    run_dir = str(tmp_path_factory.mktemp("ae_gan"))
    trainer = Trainer(config, model, build_diffusion(config.diffusion, config.model), run_dir,
                      discriminator=build_discriminator(config))
    initial = {name: p.asnumpy().copy() for name, p in trainer.state.items()}
    trainer.fit(progress=False)
    after = {name: p.asnumpy().copy() for name, p in trainer.state.items()}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    return trainer, initial, after, metrics


def test_the_run_trains_and_checkpoints_the_discriminator(adversarial_run):
    trainer, initial, after, metrics = adversarial_run
    disc = [n for n in after if n.startswith("loss.discriminator.")]
    assert len(disc) == 10 and int(after["loss.steps"]) == 3
    assert all(f"optimizer.moments1.{n}" in after for n in disc)
    assert not [n for n in after if n.startswith("ema_") and "discriminator" in n]  # no EMA of D
    # D is still at its start after steps 1-2 (f = 0), and moves in step 3
    ckpt2 = ms.load_checkpoint(os.path.join(trainer.run_dir, "ckpt_00000002.ckpt"))
    assert all(np.array_equal(ckpt2[n].asnumpy(), initial[n]) for n in disc)
    assert any(not np.array_equal(after[n], initial[n]) for n in disc)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"l1", "kl", "g_loss", "d_loss", "d_weight"} <= set(m) and m["d_weight"] > 0
    # the logged loss is the autoencoder's objective, plus the adversarial terms from step 3 on
    assert abs(metrics[0]["loss"] - (metrics[0]["l1"] * 3 * SIDE * SIDE + 1e-6 * metrics[0]["kl"])) \
        < 1e-4 * metrics[0]["loss"]
    last = metrics[2]
    want = last["l1"] * 3 * SIDE * SIDE + 1e-6 * last["kl"] + last["d_weight"] * last["g_loss"] + last["d_loss"]
    assert abs(last["loss"] - want) < 1e-4 * last["loss"]
    # an autoencoder checkpoint with a discriminator still serves latent recipes: model.* holds the autoencoder
    assert not [n for n in after if n.startswith("model.") and "discriminator" in n]


def test_a_resume_across_the_start_step_is_exact(adversarial_run):
    """From the step-1 checkpoint, steps 2 and 3 (the first with the adversarial terms) end where the
    uninterrupted run ended: the step count that gates them is restored with the rest."""
    trainer, initial, after, _ = adversarial_run
    for name, value in initial.items():
        trainer.state[name].set_data(ms.Tensor(value))
    trainer.fit(resume=os.path.join(trainer.run_dir, "ckpt_00000001.ckpt"), progress=False)
    resumed = {name: p.asnumpy() for name, p in trainer.state.items()}
    assert [n for n in after if not np.array_equal(after[n], resumed[n])] == []


def test_config_and_trainer_refuse_a_discriminator_where_it_does_not_fit():
    with pytest.raises(ConfigError, match="train.disc_weight.*arch 'autoencoder' only"):
        config_from_dict({"model": {"arch": "unet"}, "train": {"disc_weight": 0.5}})
    with pytest.raises(ConfigError, match="train.disc_layers.*empty"):
        config_from_dict(adversarial_recipe(disc_layers=4))  # 16 px: 8, 4, 2, 1, then −2
    assert discriminator_grid(16, 3) == 0 and discriminator_grid(32, 3) == 2 and discriminator_grid(256, 3) == 30
    config = config_from_dict(adversarial_recipe())
    model, _ = build_model(config.model)
    with pytest.raises(ValueError, match="needs a discriminator"):
        Trainer(config, model, build_diffusion(config.diffusion, config.model), "unused")
    assert build_discriminator(config_from_dict(adversarial_recipe(disc_weight=0.0))) is None
