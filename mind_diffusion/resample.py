"""Timestep samplers for training: uniform, importance sampling of L_vlb (improved DDPM, Sec. 3.3),
and a uniform draw with extra weight on the noisiest steps.

A sampler is a Cell used inside the compiled train step. It turns uniform
draws u ∈ [0, 1) (fed from the host's seeded generator, so a resumed run
draws the same timesteps) into timesteps t ~ p_t and importance weights
w_t = 1 / (T p_t), so that E_{t∼p}[w_t L_t] = (1/T) Σ_t L_t: the weighted loss
stays an unbiased estimate of the uniform-t objective. :class:`HighNoiseSampler`
is the exception: it changes the objective's weighting on purpose (unit weights).
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops


class ScheduleSampler(nn.Cell):
    """Base class: ``construct(u) -> (t, weights)`` for u of shape [B].

    Subclasses define :meth:`probabilities` (p_t, shape [T]) and may learn from
    the losses through :meth:`update`; those set ``learns_from_losses``, and the
    train step calls ``update`` (gathering t and the losses from every rank for
    it) only for them.
    """

    learns_from_losses = False

    def __init__(self, num_timesteps):
        super().__init__()
        self.num_timesteps = int(num_timesteps)

    def probabilities(self):
        """p_t for t = 0..T−1 (sums to 1)."""
        raise NotImplementedError

    def construct(self, u):
        probs = self.probabilities()
        # Inverse-CDF draw: t is the number of CDF values ≤ u, i.e. P(t = k) = p_k.
        cdf = ops.cumsum(probs, 0)
        t = (cdf.reshape(1, -1) <= u.reshape(-1, 1)).astype(ms.int32).sum(axis=1).astype(ms.int32)
        t = ops.minimum(t, self.num_timesteps - 1)
        weights = 1.0 / (self.num_timesteps * ops.gather(probs, t, 0))
        return t, weights


class UniformSampler(ScheduleSampler):
    """t ~ U{0..T−1} with unit weights: DDPM's L_simple sampling."""

    def probabilities(self):
        return ops.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=ms.float32)

    def construct(self, u):
        t = ops.minimum(ops.floor(u * self.num_timesteps).astype(ms.int32), self.num_timesteps - 1)
        return t, ops.ones(u.shape, ms.float32)


class HighNoiseSampler(ScheduleSampler):
    """t uniform, with a share ``share`` of the draws from a band of ``steps`` timesteps, and unit weights.

    The band is [end − steps, end), by default (``end`` None) the last ``steps`` timesteps. Unlike
    importance sampling this reweights the objective, to Σ_t p_t L_t: the band weighs
    ``share·T/steps + 1 − share`` times as much as under uniform draws. It is for what only the
    condition can tell: an image's mean colour (a background filling most of it) is read off x_t
    itself at all but the highest noise levels (its mean over H·W pixels carries √ᾱ_t·√(HW) of
    signal per unit of noise), so under uniform draws only the few noisiest steps teach the model
    that the caption names it, and it learns to ignore it. A middle band is for what x_t loses at
    middle noise levels while the caption could still place it, such as a small shape's outline.
    """

    def __init__(self, num_timesteps, share, steps, end=None):
        super().__init__(num_timesteps)
        end = num_timesteps if end is None else int(end)
        if not 0.0 < share < 1.0:
            raise ValueError(f"high-noise share must lie in (0, 1), got {share}")
        if not 1 <= end <= num_timesteps:
            raise ValueError(f"the band's end must lie in [1, {num_timesteps}], got {end}")
        if not 1 <= steps <= end:
            raise ValueError(f"high-noise steps must lie in [1, {end}] (the band ends at {end}), got {steps}")
        self.share, self.steps, self.end = float(share), int(steps), end

    def probabilities(self):
        probs = np.full(self.num_timesteps, (1.0 - self.share) / self.num_timesteps)
        probs[self.end - self.steps:self.end] += self.share / self.steps
        return ms.Tensor(probs, ms.float32)

    def construct(self, u):
        # u < share: the band's `steps` timesteps, u rescaled to [0, 1); else all T, likewise
        band = (self.end - self.steps) + ops.floor(u / self.share * self.steps)
        whole = ops.floor((u - self.share) / (1.0 - self.share) * self.num_timesteps)
        t = ops.select(u < self.share, ops.minimum(band, self.end - 1), whole).astype(ms.int32)
        t = ops.clip_by_value(t, 0, self.num_timesteps - 1)
        return t, ops.ones(u.shape, ms.float32)


class LossSecondMomentResampler(ScheduleSampler):
    """Importance sampling with p_t ∝ √E[L_t²] (improved DDPM, Eq. 18), mixed with a little uniform.

    Keeps the last ``history_per_term`` losses seen at every t. Until every t
    has a full history it samples uniformly; after that
    p_t = (1 − uniform_prob) · √mean(L_t²) / Σ √mean(L²) + uniform_prob / T.
    The history lives in non-trainable Parameters, so it is saved and restored
    with the checkpoint of the cell that holds the sampler.
    """

    learns_from_losses = True

    def __init__(self, num_timesteps, history_per_term=10, uniform_prob=0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = Parameter(ms.Tensor(np.zeros((num_timesteps, history_per_term), np.float32)),
                                      name="loss_history", requires_grad=False)
        self.loss_counts = Parameter(ms.Tensor(np.zeros((num_timesteps,), np.int32)),
                                     name="loss_counts", requires_grad=False)

    def probabilities(self):
        uniform = ops.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=ms.float32)
        second_moment = ops.sqrt(ops.square(self.loss_history).mean(axis=-1))
        probs = second_moment / second_moment.sum()
        probs = probs * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        warmed_up = (self.loss_counts >= self.history_per_term).all()
        return ops.where(warmed_up, probs, uniform)

    def update(self, t, losses, apply=None):
        """Append each example's loss to its timestep's history, oldest dropped when full.

        Examples are taken in order, so repeated timesteps in one batch are
        recorded one after the other. In data-parallel training pass the
        all-gathered (t, losses) of every rank so that all ranks stay equal.

        Vectorised over the batch (one graph whatever its size): a row holds the
        last min(n, H) of the n losses seen at its t, oldest first. With c ≤ H
        stored and m new ones, the new row's slot s holds element s + max(0, c + m − H)
        of (stored losses, then the new ones in batch order); every example computes
        its t's new row, and the examples sharing a t write the same row. A false ``apply``
        tensor (a skipped train step) writes every row back unchanged.
        """
        size = self.history_per_term
        t = t.reshape(-1)
        losses = losses.astype(ms.float32).reshape(-1)
        batch = t.shape[0]
        order = ops.arange(batch, dtype=ms.int32)
        same = t.reshape(-1, 1) == t.reshape(1, -1)  # [B, B]: examples i and j share a timestep
        earlier = order.reshape(-1, 1) > order.reshape(1, -1)  # j comes before i
        rank = ops.logical_and(same, earlier).astype(ms.int32).sum(axis=1, dtype=ms.int32)  # i's place among its t's new losses
        new = same.astype(ms.int32).sum(axis=1, dtype=ms.int32)  # m: new losses at i's t
        row = ops.gather(self.loss_history, t, 0)  # [B, H]
        count = ops.gather(self.loss_counts, t, 0)  # c ≤ H
        total = count + new
        element = ops.arange(size, dtype=ms.int32).reshape(1, -1) + ops.maximum(total - size, 0).reshape(-1, 1)  # [B, H]
        stored = ops.gather_elements(row, 1, ops.minimum(element, size - 1))
        wanted = (element - count.reshape(-1, 1)).reshape(batch, size, 1)  # rank of the new loss a slot takes
        takes = ops.logical_and(same.reshape(batch, 1, batch), rank.reshape(1, 1, batch) == wanted)
        # where, not a product: a non-finite loss must not leak into the slots that do not take it
        fresh = ops.where(takes, losses.reshape(1, 1, batch), ops.zeros((), ms.float32)).sum(axis=2)
        count_column = count.reshape(-1, 1)
        value = ops.where(element < count_column, stored,
                          ops.where(element < total.reshape(-1, 1), fresh, row))
        counts = ops.minimum(total, size)
        if apply is not None:
            value, counts = ops.select(apply, value, row), ops.select(apply, counts, count)
        ops.scatter_update(self.loss_history, t, value)
        ops.scatter_update(self.loss_counts, t, counts)
        return t


def create_named_schedule_sampler(name, num_timesteps, high_noise_share=0.0, high_noise_steps=50,
                                  high_noise_end=0):
    """A timestep sampler by name: ``uniform`` or ``loss-second-moment``.

    ``uniform`` with ``high_noise_share`` > 0 is a :class:`HighNoiseSampler` over the ``high_noise_steps``
    timesteps (at most T) before ``high_noise_end`` (0: T, the noisiest).
    """
    if name == "uniform":
        if high_noise_share > 0:
            end = min(high_noise_end, num_timesteps) if high_noise_end > 0 else num_timesteps
            return HighNoiseSampler(num_timesteps, high_noise_share, min(high_noise_steps, end), end)
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r}: use 'uniform' or 'loss-second-moment'")
