"""Training latent diffusion (mind_diffusion/train/latent.py): the latent and autoencoder objectives against
NumPy, the frozen parts, a jointly trained text encoder, an exact resume, and a run's checkpoint sampled by run_infer.

One tiny latent model (16×16 images, a factor-2 autoencoder → 4×8×8 latents, a one-level-attention UNet of
width 32, a one-layer text encoder over the demo vocabulary) is trained by one Trainer for the whole
module, so its train step compiles once.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest

from mind_diffusion.checkpoints import ema_prefix, read_checkpoint
from mind_diffusion.cli import latent as latent_cli
from mind_diffusion.cli.factory import build_diffusion, build_model, latent_parts
from mind_diffusion.config import ConfigError, config_from_dict
from mind_diffusion.data import latents, transforms
from mind_diffusion.data.pipeline import _items_for
from mind_diffusion.train.latent import AutoencoderLoss, LatentDiffusionLoss
from mind_diffusion.train.trainer import Trainer
from tests.helpers.infer_main import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "configs", "demo_vocab.txt")
BATCH, C, SIDE, LATENT = 2, 4, 16, 8


def tiny_recipe(**diffusion):
    return {
        "name": "ldm_tiny", "seed": 3,
        "model": {"arch": "latent", "image_size": SIDE, "num_channels": 32, "num_res_blocks": 1,
                  "channel_mult": [1, 2], "attention_resolutions": [4], "num_head_channels": 32,
                  "vocab": VOCAB, "text_ctx": 77, "xf_width": 32, "xf_layers": 1, "xf_heads": 2,
                  "ae_channels": 32, "ae_channel_mult": [1, 2], "ae_num_res_blocks": 1, "latent_channels": C,
                  "scale_factor": 0.5},
        "diffusion": {"steps": 1000, "noise_schedule": "scaled_linear", **diffusion},
        "data": {"kind": "demo", "demo_size": 16, "random_flip": False, "caption_dropout": 0.5},
        "train": {"batch_size": BATCH, "lr": 1e-3, "ema_rate": [0.5], "total_steps": 2, "save_every": 1,
                  "log_every": 1},
    }


def numpy_alphas_cumprod(steps, zero_terminal_snr=False):
    """ᾱ_t of latent diffusion's schedule, derived here: √β evenly spaced from √0.00085 to √0.012; with
    ``zero_terminal_snr`` √ᾱ mapped affinely to keep √ᾱ_1 and reach 0 (ᾱ_T = 2⁻²⁴) at T."""
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), steps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        root = np.sqrt(alphas_cumprod)
        alphas_cumprod = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
        alphas_cumprod[-1] = 2.0 ** -24
    return alphas_cumprod


def batch(seed, channels):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (BATCH, 3, SIDE, SIDE)).astype(np.float32)
    u = np.array([0.0123, 0.9371], np.float32)
    noise = rng.standard_normal((BATCH, channels, LATENT, LATENT)).astype(np.float32)
    return images, u, noise


@pytest.fixture(scope="module")
def model_and_tokenizer():
    config = config_from_dict(tiny_recipe())
    ms.set_seed(config.seed)  # as the training command seeds it, so the exporter's --debias-ema rebuilds θ_0
    return build_model(config.model)


@pytest.mark.parametrize("predict_v, zero_snr", [(False, False), (True, False), (True, True)],
                         ids=["eps", "v", "v-zero-snr"])
def test_latent_loss_matches_numpy(model_and_tokenizer, predict_v, zero_snr):
    model, tokenizer = model_and_tokenizer
    config = config_from_dict(tiny_recipe(predict_v=predict_v, zero_terminal_snr=zero_snr))
    diffusion = build_diffusion(config.diffusion, config.model)
    from mind_diffusion.resample import UniformSampler
    loss_net = LatentDiffusionLoss(model, diffusion, UniformSampler(1000), C, sample_posterior=True)
    images, u, noise = batch(1, 2 * C)
    if zero_snr:
        u[0] = 0.9999  # t = T − 1, the (near) zero-SNR step: the loss stays finite and exact there
    tokens, _ = tokenizer(["a red circle", ""])
    loss, t, losses, mse, z_rms = (v.asnumpy() for v in loss_net(
        ms.Tensor(images), ms.Tensor(u), ms.Tensor(noise), ms.Tensor(tokens)))

    # The same quantities composed by hand: the networks run alone, every formula in NumPy.
    eps, draw = noise[:, :C], noise[:, C:]
    mean, logvar = (v.asnumpy().astype(np.float64) for v in model.vae.posterior(ms.Tensor(images)))
    z0 = 0.5 * (mean + np.exp(0.5 * logvar) * draw)                    # scale_factor · (μ + σ n)
    want_t = np.floor(u.astype(np.float64) * 1000).astype(np.int32)
    abar = numpy_alphas_cumprod(1000, zero_snr)[want_t].reshape(-1, 1, 1, 1)
    z_t = np.sqrt(abar) * z0 + np.sqrt(1 - abar) * eps
    context = model.text_encoder(ms.Tensor(tokens))
    out = model.unet(ms.Tensor(z_t.astype(np.float32)), ms.Tensor(want_t.astype(np.float32)), context)
    target = np.sqrt(abar) * eps - np.sqrt(1 - abar) * z0 if predict_v else eps
    want = ((target - out.asnumpy().astype(np.float64)) ** 2).mean(axis=(1, 2, 3))

    np.testing.assert_array_equal(t, want_t)
    np.testing.assert_allclose(losses, want, rtol=2e-5)
    np.testing.assert_allclose(mse, want, rtol=2e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=2e-5)
    np.testing.assert_allclose(z_rms, np.sqrt((z0 ** 2).mean(axis=(1, 2, 3))), rtol=1e-5)
    assert abs(want[0] - want[1]) > 1e-3  # the two examples differ: a swapped t or context would show


def test_autoencoder_loss_matches_numpy():
    config = config_from_dict({"model": {"arch": "autoencoder", "image_size": SIDE, "ae_channels": 32,
                                         "ae_channel_mult": [1, 2], "ae_num_res_blocks": 1,
                                         "latent_channels": C}})
    ms.set_seed(1)
    vae, _ = build_model(config.model)
    loss_net = AutoencoderLoss(vae, kl_weight=0.25)
    images, u, noise = batch(2, C)
    loss, t, losses, l1, kl = (v.asnumpy() for v in loss_net(ms.Tensor(images), ms.Tensor(u), ms.Tensor(noise)))

    mean, logvar = (v.asnumpy().astype(np.float64) for v in vae.posterior(ms.Tensor(images)))
    z = mean + np.exp(0.5 * logvar) * noise
    decoded = vae.decode(ms.Tensor(z.astype(np.float32))).asnumpy().astype(np.float64)
    want_l1 = np.abs(images - decoded).sum(axis=(1, 2, 3))
    want_kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3))
    want = want_l1 + 0.25 * want_kl
    np.testing.assert_array_equal(t, [0, 0])
    np.testing.assert_allclose(l1, want_l1 / (3 * SIDE * SIDE), rtol=1e-5)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4)
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
    assert want_kl.min() > 1.0  # a random encoder's posterior is far from N(0, I): the KL term is exercised


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_and_tokenizer):
    """(trainer, initial state, state after 2 steps) of the tiny latent model, v-predicting."""
    model, tokenizer = model_and_tokenizer
    config = config_from_dict(tiny_recipe(predict_v=True))
    run_dir = str(tmp_path_factory.mktemp("ldm_run"))
    trainer = Trainer(config, model, build_diffusion(config.diffusion, config.model), run_dir, tokenizer=tokenizer)
    initial = {name: p.asnumpy().copy() for name, p in trainer.state.items()}
    trainer.fit(progress=False)
    after = {name: p.asnumpy().copy() for name, p in trainer.state.items()}
    trainer.first_metrics = read_metrics(run_dir)  # before any later test resumes the run
    return trainer, initial, after


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_frozen_parts_get_no_gradient_moment_average_or_update(trained):
    trainer, initial, after = trained
    frozen = [n for n in initial if n.startswith(("model.vae.", "model.text_encoder."))]
    unet = [n for n in initial if n.startswith("model.unet.")]
    assert frozen and unet
    assert all(np.array_equal(initial[n], after[n]) for n in frozen)
    # two applied steps; the UNet moved (not all of it: ADM's zero-initialised output layers pass no gradient
    # upstream in the first step)
    assert int(after["optimizer.global_step"]) == 2
    assert any(not np.array_equal(initial[n], after[n]) for n in unet)
    # the optimizer (hence the gradients: value_and_grad takes its parameters) and the EMA hold the UNet only
    names = {id(p): n for n, p in trainer.model.parameters_and_names()}
    assert {names[id(p)].split(".")[0] for p in trainer.train_step.optimizer.parameters} == {"unet"}
    assert {n.split(".")[0] for n in trainer.train_step.ema.names} == {"unet"}
    assert not [n for n in initial if n.startswith(("optimizer.", ema_prefix(0.5))) and
                (".vae." in n or ".text_encoder." in n or n.startswith(f"{ema_prefix(0.5)}vae."))]


def test_two_steps_resume_exactly(trained):
    trainer, initial, after = trained
    for name, value in initial.items():  # back to the start, so nothing of the finished run lingers
        trainer.state[name].set_data(ms.Tensor(value))
    trainer.fit(resume=os.path.join(trainer.run_dir, "ckpt_00000001.ckpt"), progress=False)
    resumed = {name: p.asnumpy() for name, p in trainer.state.items()}
    changed = [n for n in after if not np.array_equal(after[n], resumed[n])]
    assert changed == []


def test_a_runs_export_samples_through_run_infer(trained, tmp_path, capsys):
    trainer, _, after = trained
    export = os.path.join(trainer.run_dir, "ldm_00000002.ckpt")
    assert latent_cli.is_latent_checkpoint(export)

    class Args:
        num_heads = num_head_channels = text_heads = merges = None
        prediction, vocab = "eps", VOCAB
    config, unet, vae, text, _ = latent_cli.load_latent_model(export, Args)
    assert config["prediction"] == "v" and config["scale_factor"] == 0.5
    checkpoint = read_checkpoint(os.path.join(trainer.run_dir, "ckpt_00000002.ckpt"))
    for network, part in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        for param in network.get_parameters():  # the UNet's EMA copy, the frozen parts as they are
            key = f"{ema_prefix(0.5)}unet.{param.name}" if part == "unet" else f"model.{part}.{param.name}"
            np.testing.assert_array_equal(param.asnumpy(), checkpoint[key].asnumpy(), err_msg=key)
    status, out, err = run_main(["a red circle", "--ckpt", export, "--vocab", VOCAB, "--size", str(SIDE),
                                 "--sampler", "ddim", "--steps", "2", "--n", "1", "--batch", "1",
                                 "--out", str(tmp_path)], capsys)
    assert status == 0, err
    assert os.path.isfile(out.strip().splitlines()[-1])


def test_the_exporter_writes_a_latent_runs_checkpoint_as_its_sampling_export(trained, tmp_path):
    """``cli.export`` on a latent run's ckpt_<step>.ckpt: the same tensors and ldm_config as the run's own
    ldm_<step>.ckpt; ``--debias-ema`` gives (θ̄_n − r^n θ_0) / (1 − r^n) for the UNet (θ_0: the run's initial
    weights, rebuilt from the recipe's seed) and leaves the frozen parts; ``--fp16`` loads back as float32."""
    from mind_diffusion.cli import export as export_cli
    trainer, initial, _ = trained
    source = os.path.join(trainer.run_dir, "ckpt_00000002.ckpt")
    plain, debiased = str(tmp_path / "plain.ckpt"), str(tmp_path / "debiased.ckpt")
    assert export_cli.main([source, plain]) == 0
    assert export_cli.main([source, debiased, "--debias-ema", "--fp16"]) == 0
    own = ms.load_checkpoint(os.path.join(trainer.run_dir, "ldm_00000002.ckpt"), format="ckpt")
    out = ms.load_checkpoint(plain, format="ckpt")
    assert sorted(out) == sorted(own)
    for name in own:
        if name == "ldm_config":
            assert json.loads(str(out[name])) == json.loads(str(own[name]))
        else:
            np.testing.assert_array_equal(out[name].asnumpy(), own[name].asnumpy(), err_msg=name)

    class Args:
        num_heads = num_head_channels = text_heads = merges = prediction = None
        vocab = VOCAB
    _, unet, vae, text, _ = latent_cli.load_latent_model(debiased, Args)
    weight = 0.5 ** 2  # r^n
    for network, part in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        for param in network.get_parameters():
            got = param.asnumpy()
            assert got.dtype == np.float32
            averaged = own[f"{part}.{param.name}"].asnumpy().astype(np.float64)
            want = (averaged - weight * initial[f"model.{part}.{param.name}"]) / (1 - weight) if part == "unet" \
                else averaged
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=param.name)
    moved = [p.name for p in unet.get_parameters()
             if not np.allclose(own[f"unet.{p.name}"].asnumpy(), initial[f"model.unet.{p.name}"])]
    assert moved  # the debiasing had something to remove


def test_a_pooled_text_recipe_builds_exports_and_loads_its_pooled_path(tmp_path):
    """``model.pooled_text``: the recipe's UNet gets GLIDE's pooled-text path and AdaGN, its export records
    them, and the sampler's loader rebuilds the same network (same output, every parameter by name)."""
    from mind_diffusion.convert import load_into
    from mind_diffusion.train.latent import export_config, write_export_weights
    recipe = tiny_recipe()
    recipe["model"]["pooled_text"] = True
    config = config_from_dict(recipe)
    model, _ = build_model(config.model)
    assert model.unet.pooled_context and model.unet.input_blocks[1][0].use_scale_shift_norm
    default = latent_parts(config_from_dict(tiny_recipe()).model, 100)["unet"]
    assert "pooled_context" not in default and "use_scale_shift_norm" not in default  # SD's layout, CompVis's keys
    rng = np.random.default_rng(5)
    weights = {p.name: rng.normal(0, 0.1, p.shape).astype(np.float32) for p in model.unet.get_parameters()}
    load_into(model.unet, weights)
    ldm_config = export_config(model.parts, config)
    assert ldm_config["unet"]["pooled_context"] is True and ldm_config["unet"]["use_scale_shift_norm"] is True
    path = str(tmp_path / "pooled.ckpt")
    write_export_weights(path, {name: p.asnumpy() for name, p in model.parameters_and_names()}, ldm_config)

    class Args:
        num_heads = num_head_channels = text_heads = merges = prediction = None
        vocab = VOCAB
    _, unet, _, _, _ = latent_cli.load_latent_model(path, Args)
    z = ms.Tensor(rng.normal(size=(BATCH, C, LATENT, LATENT)).astype(np.float32))
    t = ms.Tensor(np.array([10, 700], np.int32))
    context = ms.Tensor(rng.normal(size=(BATCH, 77, 32)).astype(np.float32))
    want = model.unet(z, t, context).asnumpy()
    assert np.abs(want).max() > 1e-2
    np.testing.assert_array_equal(unet(z, t, context).asnumpy(), want)
    # the converter reads both options off the tensors (an export under SD's names converts back)
    from mind_diffusion.convert_ldm import infer_unet_config, sd_names_of
    shapes = {k: v.shape for k, v in sd_names_of(weights).items()}
    inferred, _ = infer_unet_config(shapes, num_head_channels=32)
    assert inferred["pooled_context"] is True and inferred["use_scale_shift_norm"] is True
    plain = {k: v for k, v in shapes.items() if "context_proj" not in k}
    plain.update((k, (v[0] // 2,) + v[1:]) for k, v in shapes.items() if ".emb_layers.1." in k)
    inferred, _ = infer_unet_config(plain, num_head_channels=32)
    assert "pooled_context" not in inferred and "use_scale_shift_norm" not in inferred


def test_a_zero_terminal_snr_recipe_exports_the_schedule_sampling_rebuilds(model_and_tokenizer):
    """``diffusion.zero_terminal_snr`` reaches the export's ``schedule``, from which run_infer.sh and the judge
    build their process; recipes without it keep SD's schedule section unchanged."""
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    from mind_diffusion.train.latent import export_config
    model, _ = model_and_tokenizer
    plain = export_config(model.parts, config_from_dict(tiny_recipe(predict_v=True)))["schedule"]
    assert plain == {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}
    config = config_from_dict(tiny_recipe(predict_v=True, zero_terminal_snr=True))
    schedule = export_config(model.parts, config)["schedule"]
    assert schedule == {**plain, "zero_terminal_snr": True}
    rebuilt = create_ldm_diffusion(**json.loads(json.dumps(schedule)), prediction="v")
    np.testing.assert_allclose(rebuilt.schedule["alphas_cumprod"], numpy_alphas_cumprod(1000, True), rtol=1e-12)
    trained = build_diffusion(config.diffusion, config.model)
    np.testing.assert_array_equal(trained.schedule["alphas_cumprod"], rebuilt.schedule["alphas_cumprod"])
    assert all(np.all(np.isfinite(v)) for v in rebuilt.schedule.values() if isinstance(v, np.ndarray))


def test_the_trainer_draws_from_the_recipes_band(model_and_tokenizer, tmp_path):
    """``diffusion.high_noise_end`` reaches the trainer's timestep sampler: its band is [200, 700)."""
    from mind_diffusion.resample import HighNoiseSampler
    model, tokenizer = model_and_tokenizer
    config = config_from_dict(tiny_recipe(high_noise_share=0.5, high_noise_steps=500, high_noise_end=700))
    trainer = Trainer(config, model, build_diffusion(config.diffusion, config.model), str(tmp_path / "run"),
                      tokenizer=tokenizer)
    sampler = trainer.schedule_sampler
    assert isinstance(sampler, HighNoiseSampler) and (sampler.share, sampler.steps, sampler.end) == (0.5, 500, 700)


def text_trained_model(seed):
    """The tiny recipe with ``model.train_text_encoder`` and the model it builds from ``seed``."""
    recipe = tiny_recipe(predict_v=True)
    recipe["model"]["train_text_encoder"] = True
    config = config_from_dict(recipe)
    ms.set_seed(seed)
    model, tokenizer = build_model(config.model)
    return config, model, tokenizer


def test_a_trained_text_encoder_gets_the_chain_rules_gradient(model_and_tokenizer):
    """∂L/∂θ_τ through the loss equals (∂L/∂c) · (∂c/∂θ_τ), composed here from two separate gradients: the
    loss's with respect to the context c = τ(y), then c's vector-Jacobian product with it. The frozen
    encoder's parameters are left out of every gradient."""
    from mindspore import nn
    from mind_diffusion.resample import UniformSampler

    config, model, tokenizer = text_trained_model(5)
    rng = np.random.default_rng(0)
    for param in model.unet.get_parameters():  # the zero-initialised output layers would pass no gradient to c
        if not param.asnumpy().any():
            param.set_data(ms.Tensor(0.05 * rng.standard_normal(param.shape).astype(np.float32)))
    diffusion = build_diffusion(config.diffusion, config.model)
    loss_net = LatentDiffusionLoss(model, diffusion, UniformSampler(1000), C)
    images, u, noise = (ms.Tensor(v) for v in batch(4, 2 * C))
    tokens = ms.Tensor(tokenizer(["a red circle", "一个蓝色的正方形"])[0])
    weights = model.text_encoder.trainable_params()
    assert weights and not model.vae.trainable_params()
    assert not model_and_tokenizer[0].text_encoder.trainable_params()  # the default: frozen

    class Loss(nn.Cell):
        def construct(self, images, u, noise, tokens):
            return loss_net(images, u, noise, tokens)[0]

    class LossOfContext(nn.Cell):  # the same loss, the context an input
        def construct(self, images, u, noise, context):
            t, _ = loss_net.schedule_sampler(u)
            z_start = model.latents(images, noise[:, C:])
            loss, _, _ = diffusion.training_losses(model, z_start, t, noise[:, :C], context=context)
            return loss.mean()

    class Projected(nn.Cell):  # ⟨τ(y), g⟩: its gradient in θ_τ is the vector-Jacobian product gᵀ ∂c/∂θ_τ
        def construct(self, tokens, g):
            return (model.text_encoder(tokens) * g).sum()

    got = ms.grad(Loss(), grad_position=None, weights=weights)(images, u, noise, tokens)
    g = ms.grad(LossOfContext(), grad_position=3)(images, u, noise, model.text_encoder(tokens))
    want = ms.grad(Projected(), grad_position=None, weights=weights)(tokens, g)
    assert len(got) == len(want) == len(weights)
    for param, a, b in zip(weights, got, want):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-7, err_msg=param.name)
    assert max(float(np.abs(a.asnumpy()).max()) for a in got) > 1e-4  # a real gradient, not zeros on both sides


def test_a_run_that_trains_its_text_encoder_updates_averages_and_exports_it(tmp_path):
    config, model, tokenizer = text_trained_model(config_from_dict(tiny_recipe()).seed)
    config.train.total_steps = 3
    run_dir = str(tmp_path / "run")
    trainer = Trainer(config, model, build_diffusion(config.diffusion, config.model), run_dir, tokenizer=tokenizer)
    initial = {name: p.asnumpy().copy() for name, p in trainer.state.items()}
    trainer.fit(progress=False)
    names = {id(p): n for n, p in model.parameters_and_names()}
    assert {names[id(p)].split(".")[0] for p in trainer.train_step.optimizer.parameters} == {"unet", "text_encoder"}
    assert {n.split(".")[0] for n in trainer.train_step.ema.names} == {"unet", "text_encoder"}
    text = [n for n in initial if n.startswith("model.text_encoder.")]
    vae = [n for n in initial if n.startswith("model.vae.")]
    after = {n: trainer.state[n].asnumpy() for n in text + vae}
    assert all(np.array_equal(initial[n], after[n]) for n in vae)
    # the UNet's zero-initialised output layers pass no gradient upstream in step 1, nor its zero-initialised
    # attention outputs to the context in step 2; step 3 moves τ
    previous = read_checkpoint(os.path.join(run_dir, "ckpt_00000002.ckpt"))
    assert all(np.array_equal(initial[n], previous[n].asnumpy()) for n in text)
    assert all(not np.array_equal(initial[n], after[n]) for n in text)
    # the export samples τ's average: θ̄_3 = r θ̄_2 + (1 − r) θ_3 at r = 0.5
    export = ms.load_checkpoint(os.path.join(run_dir, "ldm_00000003.ckpt"), format="ckpt")
    for name in text:
        shadow = previous[ema_prefix(0.5) + name[len("model."):]].asnumpy().astype(np.float64)
        want = 0.5 * shadow + 0.5 * after[name]
        np.testing.assert_allclose(export[name[len("model."):]].asnumpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_the_encoders_downsampling_backward_keeps_running():
    """models/autoencoder.py:Downsample pads inside its convolution: with an ``ops.pad`` before it, this very
    gradient (64 channels, 16×16, batch 16) stopped progressing on its 18th call on MindSpore 2.10's CPU backend,
    which stalled every autoencoder training run (this test then never finishes)."""
    from mindspore import nn, ops
    from models.autoencoder import Downsample

    class Energy(nn.Cell):
        def __init__(self):
            super().__init__()
            self.down = Downsample(64)

        def construct(self, x):
            return ops.square(self.down(x)).sum()

    class Gradient(nn.Cell):  # compiled, as the train step is
        def __init__(self):
            super().__init__()
            self.energy = Energy()
            self.grad = ops.value_and_grad(self.energy, 0, ms.ParameterTuple(self.energy.trainable_params()))

        def construct(self, x):
            return self.grad(x)

    gradient = Gradient()
    x = ms.Tensor(np.random.default_rng(0).standard_normal((16, 64, 16, 16)).astype(np.float32))
    for _ in range(20):
        value, (dx, _) = gradient(x)
    assert dx.shape == x.shape and np.isfinite(float(value.asnumpy()))


# ---- precomputed latents (mind_diffusion/data/latents.py, data.kind latents) -----------------------------

def encoded(model, tmp_path, random_flip, batch_size=5, name="latents"):
    """The tiny recipe's demo set encoded by ``model``'s autoencoder (16 images in batches of 5: the last
    one padded), and its config."""
    recipe = tiny_recipe()
    recipe["data"]["random_flip"] = random_flip
    config = config_from_dict(recipe)
    out = str(tmp_path / name)
    return latents.encode(config, out, model.vae, batch_size=batch_size, progress=False), out, config


def test_precomputed_latents_are_the_encoders_posterior(model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    meta, out, config = encoded(model, tmp_path, random_flip=True)
    items = _items_for(config.data)
    images = np.stack([transforms.to_model_input(items.load(i)[0]) for i in range(len(items))])
    mirrored = images[..., ::-1].copy()
    for array, pixels in (("moments.npy", images), ("moments_flipped.npy", mirrored)):
        mean, logvar = (v.asnumpy() for v in model.vae.posterior(ms.Tensor(pixels)))  # one batch of 16
        stored = np.load(os.path.join(out, array))
        assert stored.shape == (16, 2 * C, LATENT, LATENT) and stored.dtype == np.float32
        np.testing.assert_allclose(stored[:, :C], mean, atol=2e-6, err_msg=array)
        np.testing.assert_allclose(stored[:, C:], logvar, atol=2e-6, err_msg=array)
    assert np.abs(np.load(os.path.join(out, "moments.npy")) - np.load(os.path.join(out, "moments_flipped.npy"))).max() > 1e-2
    with open(os.path.join(out, "captions.json"), encoding="utf-8") as f:
        assert json.load(f) == [items.load(i)[1] for i in range(16)]
    np.testing.assert_array_equal(np.load(os.path.join(out, "labels.npy")), [items.load(i)[2] for i in range(16)])
    assert meta["count"] == 16 and meta["flipped"] and meta["skipped"] == 0
    assert meta["autoencoder"] == latents.autoencoder_digest(model.vae)
    # z_rms: the RMS of draws z = μ + σ·n over the unmirrored set, checked against 200 draws of the stored moments
    stored = np.load(os.path.join(out, "moments.npy")).astype(np.float64)
    draws = stored[:, :C] + np.exp(0.5 * stored[:, C:]) * np.random.default_rng(0).standard_normal((200,) + stored[:, :C].shape)
    assert abs(meta["z_rms"] - np.sqrt(np.mean(np.square(draws)))) < 0.01 * meta["z_rms"]
    assert sorted(os.listdir(tmp_path)) == ["latents"]  # nothing staged is left beside it


def test_unreadable_images_are_skipped_counted_and_cut_from_the_set(model_and_tokenizer, tmp_path):
    from PIL import Image
    model, _ = model_and_tokenizer
    rng = np.random.default_rng(5)
    lines = []
    for i in range(4):
        name = f"img{i}.png"
        if i == 2:
            (tmp_path / name).write_bytes(b"not a picture")
        else:
            Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(tmp_path / name)
        lines.append(json.dumps({"path": name, "text": f"caption {i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = tiny_recipe()
    recipe["data"] = {"kind": "captions", "path": str(tmp_path / "pairs.jsonl"), "random_flip": False}
    config = config_from_dict(recipe)
    meta = latents.encode(config, str(tmp_path / "set"), model.vae, batch_size=2, progress=False)
    assert meta["count"] == 3 and meta["skipped"] == 1 and "img2.png" in meta["skipped_first"][0]
    stored = np.load(tmp_path / "set" / "moments.npy")
    pixels = np.stack([transforms.to_model_input(np.asarray(Image.open(tmp_path / f"img{i}.png").convert("RGB")))
                       for i in (0, 1, 3)])
    mean, logvar = (v.asnumpy() for v in model.vae.posterior(ms.Tensor(pixels)))
    assert stored.shape == (3, 2 * C, LATENT, LATENT)
    np.testing.assert_allclose(stored, np.concatenate([mean, logvar], axis=1), atol=2e-6)
    items = latents.LatentItems(str(tmp_path / "set"))
    assert [items.load(i)[1] for i in range(3)] == ["caption 0", "caption 1", "caption 3"]


def test_the_precomputed_loss_is_the_in_step_loss(model_and_tokenizer, tmp_path):
    """LatentDiffusionLoss on stored moments equals it on the images, draw for draw (ε, n, t, caption)."""
    model, tokenizer = model_and_tokenizer
    _, out, config = encoded(model, tmp_path, random_flip=False)
    diffusion = build_diffusion(config.diffusion, config.model)
    from mind_diffusion.resample import UniformSampler
    items = _items_for(config.data)
    images = np.stack([transforms.to_model_input(items.load(i)[0]) for i in (3, 11)])
    moments = np.load(os.path.join(out, "moments.npy"))[[3, 11]]
    _, u, noise = batch(4, 2 * C)
    tokens, _ = tokenizer(["a red circle", "一个蓝色的方块"])
    results = []
    for precomputed, first in ((False, images), (True, moments)):
        loss_net = LatentDiffusionLoss(model, diffusion, UniformSampler(1000), C, precomputed=precomputed)
        results.append([v.asnumpy() for v in loss_net(ms.Tensor(first), ms.Tensor(u), ms.Tensor(noise),
                                                     ms.Tensor(tokens))])
    for got, want, name in zip(results[1], results[0], ("loss", "t", "losses", "mse", "z_rms")):
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)


def test_a_run_on_precomputed_latents_draws_and_learns_as_the_in_step_run(trained, tmp_path):
    trainer, initial, _ = trained
    model = trainer.model
    _, out, _ = encoded(model, tmp_path, random_flip=False)
    for name, param in model.parameters_and_names():  # the in-step run's starting weights
        param.set_data(ms.Tensor(initial[f"model.{name}"]))
    recipe = tiny_recipe(predict_v=True)
    recipe["data"].update(kind="latents", path=out)
    recipe["train"]["keep_checkpoints"] = 1  # and the exports are pruned with the checkpoints
    config = config_from_dict(recipe)
    run = Trainer(config, model, build_diffusion(config.diffusion, config.model), str(tmp_path / "run"),
                  tokenizer=trainer.tokenizer)
    assert run.step_columns == trainer.step_columns and run.noise_shape == trainer.noise_shape
    run.fit(progress=False)
    got, want = read_metrics(str(tmp_path / "run")), trainer.first_metrics
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for name in ("loss", "mse", "z_rms"):  # step 1: the same latents, draws and weights
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[1]["loss"], want[1]["loss"], rtol=1e-4)  # after one update of each
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.endswith(".ckpt")) == [
        "ckpt_00000002.ckpt", "ldm_00000002.ckpt"]


def test_init_from_a_latent_run_takes_its_unets_average_and_its_frozen_parts(trained, tmp_path, capsys):
    trainer, _, _ = trained
    path = os.path.join(trainer.run_dir, "ckpt_00000002.ckpt")
    recipe = tiny_recipe(predict_v=True)
    recipe["train"]["init_from"] = path
    config = config_from_dict(recipe)
    ms.set_seed(7)
    model, tokenizer = build_model(config.model)  # other random weights, replaced by the checkpoint's
    Trainer(config, model, build_diffusion(config.diffusion, config.model), str(tmp_path / "run"),
            tokenizer=tokenizer)
    saved = read_checkpoint(path)
    for name, param in model.parameters_and_names():
        key = f"{ema_prefix(0.5)}{name}" if name.startswith("unet.") else f"model.{name}"
        np.testing.assert_array_equal(param.asnumpy(), saved[key].asnumpy(), err_msg=name)
    unet = [n for n, _ in model.parameters_and_names() if n.startswith("unet.")]
    assert any(not np.array_equal(saved[f"{ema_prefix(0.5)}{n}"].asnumpy(), saved[f"model.{n}"].asnumpy())
               for n in unet)  # the average differs from the raw weights: the test tells them apart

    # the run's export (ldm_<step>.ckpt, converted format, one copy) starts a run at the same weights: a
    # shipped latent model can be fine-tuned further
    recipe["train"]["init_from"] = os.path.join(trainer.run_dir, "ldm_00000002.ckpt")
    config = config_from_dict(recipe)
    ms.set_seed(8)
    other, tokenizer = build_model(config.model)
    Trainer(config, other, build_diffusion(config.diffusion, config.model), str(tmp_path / "run2"),
            tokenizer=tokenizer)
    want = dict(model.parameters_and_names())
    for name, param in other.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), want[name].asnumpy(), err_msg=name)
    assert "another diffusion process" not in capsys.readouterr().out

    # a run under another process than its init_from's (here the rescaled schedule) says so, and trains on
    recipe["diffusion"]["zero_terminal_snr"] = True
    config = config_from_dict(recipe)
    Trainer(config, other, build_diffusion(config.diffusion, config.model), str(tmp_path / "run3"),
            tokenizer=tokenizer)
    out = capsys.readouterr().out
    assert "was trained under another diffusion process (diffusion.zero_terminal_snr: False there, True here)" in out


def test_latent_sets_refuse_what_they_cannot_serve(model_and_tokenizer, tmp_path, monkeypatch):
    model, _ = model_and_tokenizer
    meta, out, config = encoded(model, tmp_path, random_flip=False)
    shape = tuple(meta["latent_shape"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        encoded(model, tmp_path, random_flip=False)
    with pytest.raises(ValueError, match="mirrored latents"):
        latents.check_matches(out, model.vae, shape, random_flip=True)
    with pytest.raises(ValueError, match="shape"):
        latents.check_matches(out, model.vae, (2 * C, 4, 4), random_flip=False)
    other = build_model(config.model)[0].vae  # a fresh autoencoder: other random weights
    with pytest.raises(ValueError, match="another autoencoder"):
        latents.check_matches(out, other, shape, random_flip=False)
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        latents.check_matches(str(tmp_path), model.vae, shape, random_flip=False)
    with pytest.raises(ConfigError, match="data.kind"):
        config_from_dict({"model": {"arch": "unet"}, "data": {"kind": "latents", "path": out}})
    with pytest.raises(ConfigError, match="data.path"):
        config_from_dict({**tiny_recipe(), "data": {"kind": "latents"}})

    # an encoding that fails part-way leaves neither the folder nor its staging behind, and keeps an old set
    def fail(self, images):
        raise RuntimeError("injected encoder failure")
    monkeypatch.setattr(latents._Posterior, "__call__", fail)
    with pytest.raises(RuntimeError, match="injected"):
        encoded(model, tmp_path, random_flip=False, name="broken")
    with pytest.raises(RuntimeError, match="injected"):
        latents.encode(config, out, model.vae, overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["latents"] and latents.read_meta(out) == meta


def test_the_encode_command_refuses_other_recipes(tmp_path, capsys):
    from mind_diffusion.cli import encode_latents
    status = encode_latents.main([os.path.join(ROOT, "configs", "tiny.yaml"), str(tmp_path / "z")])
    assert status == 2 and "arch 'latent'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "z")


def test_a_latent_runs_sample_grid_is_what_run_infer_draws_from_its_export(trained, tmp_path):
    """cli/train.py:latent_sample_grid_fn draws with the EMA UNet exactly as sampling the run's
    ldm_<step>.ckpt does (same prompts, sampler, steps, guidance, seed)."""
    from PIL import Image

    from mind_diffusion.cli.train import default_conditions, latent_sample_grid_fn
    from mind_diffusion.imaging import save_grid, to_uint8
    from mind_diffusion.sampling.latent import text_to_image
    from mind_diffusion.sampling.schedulers import create_scheduler
    from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
    from models.autoencoder import LatentDecoder

    trainer, _, _ = trained
    recipe = tiny_recipe(predict_v=True)
    recipe["sample"] = {"sampler": "ddim", "steps": 2, "num_samples": 3, "batch_size": 2, "guidance_scale": 3.0}
    config = config_from_dict(recipe)
    ms.set_seed(11)  # the grid's own network starts from other random weights than the run's
    grid = latent_sample_grid_fn(config, trainer.tokenizer, str(tmp_path / "run"))
    path = grid(trainer.ema_model_state(), 2, True)
    assert path == str(tmp_path / "run" / "samples" / "step_00000002.png")

    class Args:
        num_heads = num_head_channels = text_heads = merges = None
        prediction, vocab = "eps", VOCAB
    export, unet, vae, text, tokenizer = latent_cli.load_latent_model(
        os.path.join(trainer.run_dir, "ldm_00000002.ckpt"), Args)
    scheduler = create_scheduler("ddim", create_ldm_diffusion(**export["schedule"], prediction=export["prediction"]),
                                 eta=0.0, clip_denoised=False).set_timesteps(2, "ldm")
    prompts, _, _ = default_conditions(config)
    assert len(prompts) == 3 and any(ord(ch) > 0x4E00 for p in prompts for ch in p)  # both languages
    images = []
    for start in (0, 2):  # the grid's batches of 2, the last padded
        batch = prompts[start:start + 2]
        out, _ = text_to_image(unet, text, tokenizer, LatentDecoder(vae), scheduler, batch + batch[-1:] * (2 - len(batch)),
                               guidance_scale=3.0, latent_shape=(C, LATENT, LATENT), seed=config.seed + start)
        images.append(np.clip(out.asnumpy()[:len(batch)], -1, 1))
    want = save_grid(to_uint8(np.concatenate(images)), str(tmp_path / "want.png"), scale=8, captions=prompts)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(want)))
    with open(os.path.join(os.path.dirname(path), "step_00000002.txt"), encoding="utf-8") as f:
        sidecar = f.read()
    assert all(p in sidecar for p in prompts)
