"""The compiled train step's parts against hand computations: EMA, warm-up, clipping, loss scaling, skips."""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.checkpoints import ema_rates, ema_state
from mind_diffusion.gaussian_diffusion import create_diffusion
from mind_diffusion.resample import UniformSampler
from mind_diffusion.train.step import EMA, AdamW, DiffusionLoss, TrainStep, WarmupLR
from mind_diffusion.data.pipeline import sample_randomness


class Toy(nn.Cell):
    """ε̂ = w ⊙ x_t + b: small enough to differentiate by hand."""

    def __init__(self, poison=False):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.full((1, 3, 1, 1), 0.5, np.float32)), name="w")
        self.b = ms.Parameter(ms.Tensor(np.zeros((1, 3, 1, 1), np.float32)), name="b")
        self.poison = poison

    def construct(self, x, t):
        out = self.w * x + self.b
        if self.poison:
            out = out * ops.log(ops.zeros_like(out) - 1.0)  # NaN
        return out


def make_step(model, lr=0.1, warmup=0, clip=0.0, loss_scale=0.0, rates=(0.9,)):
    diffusion = create_diffusion(30, "cosine")
    loss_net = DiffusionLoss(model, diffusion, UniformSampler(30))
    named = [(n, p) for n, p in model.parameters_and_names()]
    optimizer = AdamW(named, WarmupLR(lr, warmup), eps=1e-8, weight_decay=0.0)
    return TrainStep(loss_net, optimizer, EMA(named, rates), grad_clip=clip, loss_scale=loss_scale), diffusion


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (4, 3, 4, 4)).astype(np.float32)
    draws = [sample_randomness(0, 0, 4 * seed + j, (3, 4, 4)) for j in range(4)]
    u, noise = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
    return ms.Tensor(x), ms.Tensor(u), ms.Tensor(noise)


def test_warmup_lr_with_bias_correction():
    schedule = WarmupLR(1e-3, 4)
    values = [float(schedule(ms.Tensor(s, ms.int32)).asnumpy()) for s in range(6)]
    correction = [np.sqrt(1 - 0.999 ** n) / (1 - 0.9 ** n) for n in range(1, 7)]
    warmup = [0.25, 0.5, 0.75, 1, 1, 1]
    # float32 1 − β2^s cancels (1 − 0.998001 keeps ~4 digits), hence 1e-4.
    np.testing.assert_allclose(values, [1e-3 * w * c for w, c in zip(warmup, correction)], rtol=1e-4)
    first = np.sqrt(1 - 0.999) / (1 - 0.9)
    assert float(WarmupLR(2e-4, 0)(ms.Tensor(0, ms.int32)).asnumpy()) == pytest.approx(2e-4 * first, rel=1e-4)


def test_first_step_is_adam_and_ema_follows():
    """Adam's first step moves each weight by lr · sign(g) (bias-corrected m̂/√v̂ = g/|g|); EMA = r θ_0 + (1 − r) θ_1."""
    model = Toy()
    step, diffusion = make_step(model)
    x, u, noise = batch()
    before = model.w.asnumpy().copy()
    # The gradient by hand: loss = mean_b mean((ε − w x_t − b)²), t = floor(u T).
    t = np.minimum(np.floor(u.asnumpy() * 30).astype(int), 29)
    abar = diffusion.schedule["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * x.asnumpy() + np.sqrt(1 - abar) * noise.asnumpy()
    residual = noise.asnumpy() - (before * x_t)
    grad_w = (-2 * residual * x_t).mean(axis=(2, 3)).mean(axis=0) / 3  # mean over C as well
    loss, *_, finite = step(x, u, noise)
    assert bool(finite.asnumpy())
    np.testing.assert_allclose(float(loss.asnumpy()), (residual ** 2).mean(), rtol=1e-5)
    after = model.w.asnumpy().reshape(-1)
    np.testing.assert_allclose(after, before.reshape(-1) - 0.1 * np.sign(grad_w), rtol=1e-4)
    shadow = step.ema.shadows[0][0].asnumpy().reshape(-1)
    np.testing.assert_allclose(shadow, 0.9 * before.reshape(-1) + 0.1 * after, rtol=1e-6)


def test_gradient_clipping_bounds_the_update_direction():
    """With clipping the step is still Adam's sign step on the first iteration, but the moments see the clipped g."""
    model = Toy()
    step, _ = make_step(model, clip=1e-6)
    step(*batch())
    m = step.optimizer.moments1[0].asnumpy()
    assert np.linalg.norm(m) <= 0.1 * 1e-6 * 1.0001  # m_1 = (1 − β1) g_clipped, ‖g_clipped‖ ≤ 1e-6


def test_overflow_skips_the_update_and_halves_the_scale():
    model = Toy(poison=True)
    step, _ = make_step(model, loss_scale=1024.0)
    before = model.w.asnumpy().copy()
    *_, finite = step(*batch())
    assert not bool(finite.asnumpy())
    np.testing.assert_array_equal(model.w.asnumpy(), before)
    np.testing.assert_array_equal(step.ema.shadows[0][0].asnumpy(), before)
    assert float(step.loss_scale.asnumpy()) == 512.0
    assert int(step.optimizer.global_step.asnumpy().reshape(-1)[0]) == 0


def test_loss_scaling_does_not_change_a_finite_step():
    plain, scaled = Toy(), Toy()
    step_plain, _ = make_step(plain)
    step_scaled, _ = make_step(scaled, loss_scale=4096.0)
    for seed in range(3):
        step_plain(*batch(seed))
        step_scaled(*batch(seed))
    np.testing.assert_allclose(scaled.w.asnumpy(), plain.w.asnumpy(), rtol=1e-5)
    assert float(step_scaled.loss_scale.asnumpy()) == 4096.0


def test_ema_names_and_helpers():
    model = Toy()
    ema = EMA(list(model.parameters_and_names()), [0.999, 0.9999])
    checkpoint = {p.name: p for shadow in ema.shadows for p in shadow}
    assert ema_rates(checkpoint) == [0.999, 0.9999]
    assert set(ema_state(checkpoint, 0.9999)) == {"w", "b"}
    with pytest.raises(KeyError, match="0.5"):
        ema_state(checkpoint, 0.5)
    with pytest.raises(ValueError, match="ema_rate"):
        EMA(list(model.parameters_and_names()), [1.0])


def test_sample_randomness_is_counter_based():
    a = sample_randomness(3, 0, 10, (1, 2, 2))
    b = sample_randomness(3, 0, 10, (1, 2, 2))
    c = sample_randomness(3, 1, 10, (1, 2, 2))
    d = sample_randomness(3, 0, 11, (1, 2, 2))
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0] == b[0] and 0.0 <= float(a[0]) < 1.0
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[1], d[1])


def test_divergence_writes_no_checkpoint_and_names_one_from_before_it(tmp_path):
    """lr = 1e6: Adam's first step moves every weight by 1e6, the loss explodes and then turns NaN.
    The stop names the checkpoint saved before the explosion, and none is written after it."""
    from mind_diffusion.cli.factory import build_diffusion, build_model
    from mind_diffusion.config import load_config
    from mind_diffusion.checkpoints import list_checkpoints, read_checkpoint
    from mind_diffusion.train.trainer import MAX_NONFINITE_STREAK, Trainer, TrainingDiverged

    config = load_config("configs/tiny.yaml", [f"train.total_steps={MAX_NONFINITE_STREAK + 10}", "train.lr=1e6",
                                               "train.save_every=1", "train.log_every=1", "train.warmup_steps=0"])
    model, tokenizer = build_model(config.model)
    trainer = Trainer(config, model, build_diffusion(config.diffusion, config.model), str(tmp_path),
                      tokenizer=tokenizer)
    with pytest.raises(TrainingDiverged, match="ckpt_00000001.ckpt"):
        trainer.fit(progress=False)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [1]
    weights = read_checkpoint(str(tmp_path / "ckpt_00000001.ckpt"))
    assert all(np.isfinite(v.asnumpy()).all() for k, v in weights.items() if k.startswith("model."))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
    assert records[0]["skipped_steps"] == 0 and records[-1]["nonfinite_streak"] >= MAX_NONFINITE_STREAK


def test_resume_refuses_a_checkpoint_of_other_network_or_diffusion_settings():
    """Same shapes would load silently; a changed target (here ε → v) or network must be named instead."""
    from types import SimpleNamespace

    from mind_diffusion.config import config_from_dict, config_to_dict
    from mind_diffusion.train.trainer import Trainer

    saved = config_to_dict(config_from_dict({"diffusion": {"noise_schedule": "cosine"}}))
    same = SimpleNamespace(config=config_from_dict({"diffusion": {"noise_schedule": "cosine"},
                                                    "train": {"lr": 3e-4}}))
    Trainer._check_same_process(same, saved, "ckpt_00000010.ckpt")  # train.* may change
    Trainer._check_same_process(same, None, "old.ckpt")  # no config saved: nothing to compare
    other = SimpleNamespace(config=config_from_dict({"diffusion": {"noise_schedule": "cosine",
                                                                   "predict_v": True},
                                                     "model": {"num_channels": 32}}))
    with pytest.raises(ValueError) as info:
        Trainer._check_same_process(other, saved, "ckpt_00000010.ckpt")
    message = str(info.value)
    assert "diffusion.predict_v: False in the checkpoint, True here" in message
    assert "model.num_channels" in message and "config.yaml" in message


def test_init_from_loads_the_ema_copy_and_debiasing_subtracts_it(tmp_path):
    """train.init_from starts the network (and so its EMA copies) at another checkpoint's EMA weights;
    the exporter's debiasing then takes θ_0 from that checkpoint, not from the recipe's seed."""
    from mind_diffusion.cli.export import debiased_ema
    from mind_diffusion.config import config_from_dict, config_to_dict
    from mind_diffusion.checkpoints import read_checkpoint
    from mind_diffusion.train.checkpoint import load_initial_weights

    rng = np.random.default_rng(0)
    start = {"weight": rng.standard_normal((3, 2)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
    path = str(tmp_path / "start.ckpt")
    records = [{"name": f"ema_0.99.{k}", "data": ms.Tensor(v)} for k, v in start.items()]
    records += [{"name": f"model.{k}", "data": ms.Tensor(np.zeros_like(v))} for k, v in start.items()]
    ms.save_checkpoint(records, path)
    model = nn.Dense(2, 3)
    load_initial_weights(model, path)
    np.testing.assert_array_equal(model.weight.asnumpy(), start["weight"])  # the EMA copy, not model.*
    np.testing.assert_array_equal(model.bias.asnumpy(), start["bias"])
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        load_initial_weights(model, str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="does not fit"):
        load_initial_weights(nn.Dense(2, 4), path)
    # train.init_exclude: the named parameters keep their fresh values, whatever their shape there
    other = nn.Dense(2, 4)
    fresh_weight = other.weight.asnumpy().copy()
    with pytest.raises(ValueError, match="does not fit"):  # the bias does not fit either
        load_initial_weights(other, path, exclude=["weight"])
    model = nn.Dense(2, 3)
    fresh_bias = model.bias.asnumpy().copy()
    assert load_initial_weights(model, path, exclude=["bias"]) == ["bias"]
    np.testing.assert_array_equal(model.weight.asnumpy(), start["weight"])
    np.testing.assert_array_equal(model.bias.asnumpy(), fresh_bias)
    with pytest.raises(ValueError, match="'bais' names no parameter"):
        load_initial_weights(model, path, exclude=["bais"])
    np.testing.assert_array_equal(other.weight.asnumpy(), fresh_weight)

    # θ̄_n = r^n θ_0 + (1 − r^n) θ*  →  debiasing returns θ* exactly (up to float64 rounding).
    rate, steps = 0.9, 7
    target = {k: rng.standard_normal(v.shape) for k, v in start.items()}
    averaged = {k: rate ** steps * start[k].astype(np.float64) + (1 - rate ** steps) * target[k] for k in start}
    config = config_to_dict(config_from_dict({"train": {"init_from": path, "ema_rate": [rate]}}))
    run_checkpoint = {f"ema_0.9.{k}": None for k in start}
    out = debiased_ema(averaged, run_checkpoint, config, None, steps)
    for k in start:
        np.testing.assert_allclose(out[k], target[k], rtol=1e-9, atol=1e-9)
    assert read_checkpoint(path)  # the start checkpoint is only read
