"""Negative log-likelihood in bits/dim through the variational bound (DDPM Eq. 5; improved DDPM Sec. 2.3).

−log p_θ(x_0) ≤ L_T + Σ_{t>1} L_{t−1} + L_0, evaluated term by term: one
compiled graph per term, reused for every t.
"""
import numpy as np
import mindspore as ms
from tqdm.auto import tqdm

from ..losses import mean_flat
from ..sampling.base import ModelStep, as_tensor


class BoundTermStep(ModelStep):
    """At step t: draw x_t ~ q(x_t | x_0) with the given ε and return
    (L_{t−1} or L_0 in bits/dim, MSE of x̂_0, MSE of ε̂), each [B]."""

    def __init__(self, diffusion, model, cond_names=(), clip_denoised=True):
        super().__init__(diffusion, model, cond_names)
        self.clip_denoised = clip_denoised

    def construct(self, x_start, t, noise, *cond):
        x_t = self.diffusion.q_sample(x_start, t, noise)
        output = self.model_output(x_t, t, cond)
        term, pred_xstart = self.diffusion.vb_terms_bpd_from_output(output, x_start, x_t, t, self.clip_denoised)
        eps = self.diffusion.predict_eps_from_xstart(x_t, t, pred_xstart)
        return term, mean_flat((pred_xstart - x_start) ** 2), mean_flat((eps - noise) ** 2)


class BitsPerDim:
    """Evaluates the bound batch after batch with one compiled term graph and one prior graph.

    :param diffusion: the process (usually the full, un-respaced one).
    :param model: ``model(x, t, **cond)``.
    :param cond_names: names of the conditioning tensors the batches will carry.
    :param clip_denoised: clip x̂_0 in the model's p(x_{t−1} | x_t).
    """

    def __init__(self, diffusion, model, cond_names=(), clip_denoised=True):
        self.diffusion = diffusion
        self.cond_names = tuple(sorted(cond_names))
        self.step = BoundTermStep(diffusion, model, self.cond_names, clip_denoised)
        self.prior = _Prior(diffusion)

    def __call__(self, x_start, model_kwargs=None, seed=0, progress=False):
        """The bound for one batch; see :func:`calc_bpd_loop` for the returned dict."""
        x_start = as_tensor(np.asarray(x_start, np.float32) if not isinstance(x_start, ms.Tensor) else x_start)
        model_kwargs = model_kwargs or {}
        if tuple(sorted(model_kwargs)) != self.cond_names:
            raise ValueError(f"expected conditioning {self.cond_names}, got {tuple(sorted(model_kwargs))}")
        cond = tuple(as_tensor(model_kwargs[n]) for n in self.cond_names)
        rng = np.random.default_rng(seed)
        batch, steps = x_start.shape[0], self.diffusion.num_timesteps
        terms = []  # kept on the device until the loop ends
        for t in tqdm(range(steps - 1, -1, -1), desc="bpd", disable=not progress, leave=False):
            noise = ms.Tensor(rng.standard_normal(x_start.shape, dtype=np.float32))
            terms.append(self.step(x_start, ms.Tensor(np.full((batch,), t, np.int32)), noise, *cond))
        # terms[k] belongs to t = T−1−k: reverse to index by t.
        vb, xstart_mse, mse = (np.stack([term[i].asnumpy() for term in reversed(terms)], axis=1)
                               for i in range(3))
        prior = self.prior(x_start).asnumpy()
        return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}


def calc_bpd_loop(diffusion, model, x_start, model_kwargs=None, clip_denoised=True, seed=0, progress=False):
    """The whole bound for a batch of images, in bits/dim.

    Compiles its graphs for this call; to evaluate many batches, make one
    :class:`BitsPerDim` and call it per batch.

    :param x_start: images in [−1, 1], [B, C, H, W].
    :param model_kwargs: conditioning tensors passed to the model by name.
    :param seed: seeds the ε drawn for each term.
    :return: dict of numpy arrays: ``total_bpd`` [B] (prior + every term),
        ``prior_bpd`` [B] (L_T), ``vb`` [B, T] (column t holds L_{t−1}, L_0 in
        column 0 — improved-diffusion stores them in loop order, T−1 first),
        ``xstart_mse`` [B, T] and ``mse`` [B, T] (of ε), indexed the same way.
    """
    evaluator = BitsPerDim(diffusion, model, tuple(model_kwargs or {}), clip_denoised)
    return evaluator(x_start, model_kwargs, seed=seed, progress=progress)


class _Prior(ms.nn.Cell):
    def __init__(self, diffusion):
        super().__init__(auto_prefix=False)
        self.diffusion = diffusion

    def construct(self, x_start):
        return self.diffusion.prior_bpd(x_start)
