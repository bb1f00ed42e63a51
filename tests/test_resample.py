"""Timestep samplers: draws, importance weights, unbiasedness and the loss history, in GRAPH_MODE."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from mind_diffusion.resample import (HighNoiseSampler, LossSecondMomentResampler, UniformSampler,
                                     create_named_schedule_sampler)


class Update(nn.Cell):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def construct(self, t, losses):
        return self.sampler.update(t, losses)


class Probabilities(nn.Cell):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def construct(self):
        return self.sampler.probabilities()


class ReferenceHistory:
    """improved DDPM's bookkeeping, example by example, in plain numpy."""

    def __init__(self, steps, history, uniform_prob):
        self.history = np.zeros((steps, history))
        self.counts = np.zeros(steps, int)
        self.uniform_prob = uniform_prob

    def update(self, ts, losses):
        size = self.history.shape[1]
        for t, loss in zip(ts, losses):
            if self.counts[t] == size:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1

    def probabilities(self):
        steps = len(self.counts)
        if not (self.counts == self.history.shape[1]).all():
            return np.full(steps, 1 / steps)
        w = np.sqrt((self.history ** 2).mean(axis=1))
        w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / steps
        return w / w.sum()


def test_uniform_sampler():
    sampler = UniformSampler(10)
    u = np.array([0.0, 0.0999, 0.1, 0.55, 0.9999999], np.float32)
    t, w = sampler(ms.Tensor(u))
    np.testing.assert_array_equal(t.asnumpy(), [0, 0, 1, 5, 9])
    np.testing.assert_array_equal(w.asnumpy(), 1.0)


def test_high_noise_sampler_draws_its_tail_share_with_unit_weights():
    sampler = HighNoiseSampler(10, share=0.4, steps=2)
    # u below the share maps onto the last 2 steps, the rest onto all 10, each linearly
    u = np.array([0.0, 0.1999, 0.21, 0.3999, 0.41, 0.45, 0.47, 0.9999999], np.float32)
    t, w = sampler(ms.Tensor(u))
    np.testing.assert_array_equal(t.asnumpy(), [8, 8, 9, 9, 0, 0, 1, 9])
    np.testing.assert_array_equal(w.asnumpy(), 1.0)
    # p_t: 0.6/10 everywhere plus 0.4/2 on the tail, and the draws on a fine grid of u follow it
    expected = np.full(10, 0.06)
    expected[-2:] += 0.2
    np.testing.assert_allclose(Probabilities(sampler)().asnumpy(), expected, rtol=1e-6)
    grid = ((np.arange(100_000) + 0.5) / 100_000).astype(np.float32)
    draws = sampler(ms.Tensor(grid))[0].asnumpy()
    np.testing.assert_allclose(np.bincount(draws, minlength=10) / len(grid), expected, atol=2e-5)


def test_a_middle_band_takes_its_share_before_its_end():
    """``end`` < T: the share goes to [end − steps, end), here t = 4, 5, 6 of 10."""
    sampler = HighNoiseSampler(10, share=0.3, steps=3, end=7)
    t, w = sampler(ms.Tensor(np.array([0.0, 0.0999, 0.11, 0.2999999, 0.3, 0.9999999], np.float32)))
    np.testing.assert_array_equal(t.asnumpy(), [4, 4, 5, 6, 0, 9])
    np.testing.assert_array_equal(w.asnumpy(), 1.0)
    expected = np.full(10, 0.07)
    expected[4:7] += 0.1
    np.testing.assert_allclose(Probabilities(sampler)().asnumpy(), expected, rtol=1e-6)
    grid = ((np.arange(100_000) + 0.5) / 100_000).astype(np.float32)
    draws = sampler(ms.Tensor(grid))[0].asnumpy()
    np.testing.assert_allclose(np.bincount(draws, minlength=10) / len(grid), expected, atol=2e-5)
    named = create_named_schedule_sampler("uniform", 10, high_noise_share=0.3, high_noise_steps=50, high_noise_end=7)
    assert (named.steps, named.end) == (7, 7)  # the band is at most its end: [0, 7)
    for end, steps, match in ((11, 2, "the band's end must lie in"), (0, 1, "the band's end must lie in"),
                              (3, 4, r"high-noise steps must lie in \[1, 3\]")):
        with pytest.raises(ValueError, match=match):
            HighNoiseSampler(10, 0.3, steps, end)


def test_loss_second_moment_history_and_weights():
    steps, history = 6, 3
    sampler = LossSecondMomentResampler(steps, history_per_term=history, uniform_prob=0.05)
    reference = ReferenceHistory(steps, history, 0.05)
    update, probabilities = Update(sampler), Probabilities(sampler)
    rng = np.random.default_rng(0)
    for round_ in range(8):
        # Repeated timesteps in a batch, and the history wrapping around: both exercised.
        ts = rng.integers(0, steps, 8).astype(np.int32)
        if round_ == 0:
            ts[:4] = 2
        losses = rng.uniform(0.1, 3.0, 8).astype(np.float32)
        update(ms.Tensor(ts), ms.Tensor(losses))
        reference.update(ts, losses)
        np.testing.assert_allclose(sampler.loss_history.asnumpy(), reference.history, rtol=1e-6)
        np.testing.assert_array_equal(sampler.loss_counts.asnumpy(), reference.counts)
        np.testing.assert_allclose(probabilities().asnumpy(), reference.probabilities(), rtol=1e-5)
    assert (reference.counts == history).all(), "the test must reach the warmed-up regime"


@pytest.mark.parametrize("batch", [1, 40])
def test_history_with_more_repeats_than_slots(batch):
    """Batches where one timestep takes more new losses than its history holds (only the last H stay, in
    order), timesteps absent from a batch, and a NaN loss that must stay in its own row."""
    steps, history = 5, 3
    sampler = LossSecondMomentResampler(steps, history_per_term=history, uniform_prob=0.0)
    reference = ReferenceHistory(steps, history, 0.0)
    update = Update(sampler)
    rng = np.random.default_rng(1)
    for round_ in range(6 if batch > 1 else 40):
        ts = rng.integers(0, steps - 1, batch).astype(np.int32)  # t = steps − 1 never drawn until the end
        losses = rng.uniform(0.1, 3.0, batch).astype(np.float32)
        update(ms.Tensor(ts), ms.Tensor(losses))
        reference.update(ts, losses)
        np.testing.assert_array_equal(sampler.loss_history.asnumpy(), reference.history.astype(np.float32))
        np.testing.assert_array_equal(sampler.loss_counts.asnumpy(), reference.counts)
    ts = np.full(batch, steps - 1, np.int32)
    ts[0] = 0
    losses = np.full(batch, 2.0, np.float32)
    losses[0] = np.nan
    update(ms.Tensor(ts), ms.Tensor(losses))
    reference.update(ts, losses)
    got = sampler.loss_history.asnumpy()
    np.testing.assert_array_equal(got, reference.history.astype(np.float32))  # NaN where the reference has it
    assert np.isfinite(got[1:]).all()


def _warmed_sampler(losses_per_t, uniform_prob=0.01):
    steps = len(losses_per_t)
    sampler = LossSecondMomentResampler(steps, history_per_term=2, uniform_prob=uniform_prob)
    ts = np.repeat(np.arange(steps, dtype=np.int32), 2)
    Update(sampler)(ms.Tensor(ts), ms.Tensor(np.repeat(losses_per_t, 2).astype(np.float32)))
    return sampler


def test_importance_draws_follow_probabilities_and_stay_unbiased():
    losses_per_t = np.array([4.0, 1.0, 0.25, 2.0, 0.5], np.float32)
    sampler = _warmed_sampler(losses_per_t)
    p = Probabilities(sampler)().asnumpy().astype(np.float64)
    expected = losses_per_t / losses_per_t.sum() * 0.99 + 0.01 / 5  # √E[L²] = L for a constant history
    np.testing.assert_allclose(p, expected, rtol=1e-5)

    # Inverse-CDF draws on a fine grid of u reproduce p; the weights are 1 / (T p_t).
    u = (np.arange(100_000) + 0.5) / 100_000
    t, w = sampler(ms.Tensor(u.astype(np.float32)))
    t, w = t.asnumpy(), w.asnumpy().astype(np.float64)
    np.testing.assert_allclose(np.bincount(t, minlength=5) / len(u), p, atol=2e-5)
    np.testing.assert_allclose(w, 1.0 / (5 * p[t]), rtol=1e-5)
    # Unbiased: E_p[w_t L_t] equals the uniform average of L_t.
    assert np.mean(w * losses_per_t[t]) == pytest.approx(losses_per_t.mean(), rel=1e-4)
    # And by random draws, as training makes them.
    u_random = np.random.default_rng(1).random(200_000).astype(np.float32)
    t, w = (a.asnumpy() for a in sampler(ms.Tensor(u_random)))
    assert np.mean(w * losses_per_t[t]) == pytest.approx(losses_per_t.mean(), rel=0.02)


def test_state_round_trips_through_a_checkpoint(tmp_path):
    sampler = _warmed_sampler(np.array([1.0, 2.0, 3.0], np.float32))
    path = os.path.join(tmp_path, "sampler.ckpt")
    ms.save_checkpoint(sampler, path)
    fresh = LossSecondMomentResampler(3, history_per_term=2, uniform_prob=0.01)
    np.testing.assert_allclose(Probabilities(fresh)().asnumpy(), 1 / 3)
    ms.load_param_into_net(fresh, ms.load_checkpoint(path))
    np.testing.assert_allclose(Probabilities(fresh)().asnumpy(), Probabilities(sampler)().asnumpy())


def test_named_samplers_and_errors():
    assert isinstance(create_named_schedule_sampler("uniform", 5), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", 5), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("lossaware", 5)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentResampler(5, uniform_prob=2.0)
    high = create_named_schedule_sampler("uniform", 5, high_noise_share=0.25, high_noise_steps=50)
    assert isinstance(high, HighNoiseSampler) and high.steps == 5  # the tail is at most T
    assert isinstance(create_named_schedule_sampler("uniform", 5, high_noise_share=0.0), UniformSampler)
    for share, steps, match in ((1.0, 2, "share"), (0.5, 0, "steps")):
        with pytest.raises(ValueError, match=match):
            HighNoiseSampler(5, share, steps)
