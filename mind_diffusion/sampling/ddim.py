"""DDIM sampling (Song et al. 2021) with stochasticity η, and deterministic inversion."""
import numpy as np
import mindspore as ms
from tqdm.auto import tqdm

from . import fused as _fused
from .base import ModelStep, Sampler, as_tensor


class DDIMStep(ModelStep, _fused.FusedStep):
    """One DDIM update x_t → x_{t-1} with σ_t scaled by η; returns (x_{t-1}, x̂_0), or x_{t-1}.

    On CPU everything after the network is one fused C++ kernel (see
    :mod:`mind_diffusion.sampling.fused`; ``self.fused`` says whether it is used),
    else the pure-ops :meth:`GaussianDiffusion.ddim_sample_from_output`.
    """

    def __init__(self, diffusion, model, cond_names=(), clip_denoised=True, eta=0.0, pred_xstart=True):
        super().__init__(diffusion, model, cond_names, pred_xstart)
        self.clip_denoised = clip_denoised
        self.eta = float(eta)
        self._init_fused(_fused.ddim_kernel(diffusion, self.eta, clip_denoised, pred_xstart),
                         diffusion._learned_sigma)

    def construct(self, x, t, noise, *cond):
        output = self.model_output(x, t, cond)
        if self.fused and _fused.fits(output, x, t, noise, self.fused_out_channels):
            return self.fused_op(x, output, noise, t, self.fused_table)
        return self.outputs(*self.diffusion.ddim_sample_from_output(output, x, t, noise, self.eta,
                                                                    self.clip_denoised))


class DDIMReverseStep(ModelStep):
    """One deterministic DDIM update up the chain, x_t → x_{t+1}; returns (x_{t+1}, x̂_0), or x_{t+1}."""

    def __init__(self, diffusion, model, cond_names=(), clip_denoised=True, pred_xstart=True):
        super().__init__(diffusion, model, cond_names, pred_xstart)
        self.clip_denoised = clip_denoised

    def construct(self, x, t, *cond):
        output = self.model_output(x, t, cond)
        return self.outputs(*self.diffusion.ddim_reverse_sample_from_output(output, x, t, self.clip_denoised))


class DDIMSampler(Sampler):
    """DDIM: η = 0 is the deterministic implicit model, η = 1 has DDPM's posterior variance.

    :param eta: η ≥ 0.
    """

    name = "ddim"

    def __init__(self, diffusion, model, eta=0.0, clip_denoised=True, progress=False):
        super().__init__(diffusion, model, clip_denoised, progress)
        if not 0.0 <= eta <= 1.0:
            # Beyond 1, σ_t² can exceed 1 − ᾱ_{t−1} and √(1 − ᾱ_{t−1} − σ_t²) is undefined.
            raise ValueError(f"DDIM eta must lie in [0, 1] (0 = deterministic, 1 = DDPM-like), got {eta}")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        self._reverse_steps = {}

    def make_step(self, cond_names, pred_xstart):
        return DDIMStep(self.diffusion, self.model, cond_names, self.clip_denoised, self.eta, pred_xstart)

    def invert(self, x_0, model_kwargs=None):
        """Encode x_0 into x_T by running the η = 0 update backwards.

        ``x_0`` is taken at the noise level of the first kept step (t = 0); the
        result is at the level of the last one (t = K−1), where :meth:`sample`
        starts, so ``sample(x_T=invert(x))`` walks back to ``x``.
        """
        names = tuple(sorted(model_kwargs or {}))
        cond = tuple(as_tensor(model_kwargs[n]) for n in names)
        if names not in self._reverse_steps:
            self._reverse_steps[names] = DDIMReverseStep(self.diffusion, self.model, names, self.clip_denoised,
                                                         pred_xstart=False)
        step = self._reverse_steps[names]
        x = as_tensor(np.asarray(x_0, dtype=np.float32) if not isinstance(x_0, ms.Tensor) else x_0)
        batch = x.shape[0]
        for t in tqdm(range(self.diffusion.num_timesteps - 1), desc="ddim-invert",
                      disable=not self.progress, leave=False):
            x = step(x, ms.Tensor(np.full((batch,), t, np.int32)), *cond)
        return x
