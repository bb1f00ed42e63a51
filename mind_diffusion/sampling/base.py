"""The shared loop of every sampler: one compiled step graph, driven from the host.

A sampler holds a (possibly respaced) :class:`GaussianDiffusion` and a model,
i.e. any callable Cell ``model(x, t, **cond) -> output`` — a UNet, or a
guidance wrapper around one. Each step is the same compiled graph with the
step index ``t`` and the step's noise as Tensor inputs, so a 1000-step loop
compiles once. Noise comes from a NumPy generator seeded by the caller: the
same seed gives the same images on every backend, and nothing is read back
from the device inside the loop.
"""
import numpy as np
import mindspore as ms
from mindspore import nn
from tqdm.auto import tqdm


class ModelStep(nn.Cell):
    """Base of the step graphs: runs the model at the diffusion's model timesteps.

    :param diffusion: the process the sampler walks.
    :param model: ``model(x, t_model, **cond)``.
    :param cond_names: names of the conditioning tensors, in the order the step receives them.
    :param pred_xstart: also return x̂_0; a sampling loop that discards it builds its step
        without, since every graph output is allocated and handed back on each call.
    """

    def __init__(self, diffusion, model, cond_names=(), pred_xstart=True):
        # auto_prefix=False: wrapping must not rename the model's parameters (checkpoints keep their names).
        super().__init__(auto_prefix=False)
        self.diffusion = diffusion
        self.model = model
        self.cond_names = tuple(cond_names)
        self.pred_xstart = bool(pred_xstart)

    def model_output(self, x, t, cond):
        kwargs = {}
        for name, value in zip(self.cond_names, cond):
            kwargs[name] = value
        return self.model(x, self.diffusion.model_timesteps(t), **kwargs)

    def outputs(self, sample, pred_xstart):
        """What the step returns: (x_next, x̂_0), or x_next alone (a constant choice at compile time)."""
        if self.pred_xstart:
            return sample, pred_xstart
        return sample


class Sampler:
    """Runs a step graph from t = T−1 down to 0.

    Subclasses set ``needs_noise`` and build their step in :meth:`make_step`; the
    step is called as ``step(x, t, noise, *cond)`` and returns x_{t-1}, or
    (x_{t-1}, x̂_0) when built with ``pred_xstart``.

    :param diffusion: a :class:`GaussianDiffusion` (respace it first for fewer steps).
    :param model: ``model(x, t, **cond) -> output``.
    :param clip_denoised: clip x̂_0 to [−1, 1] at every step.
    :param progress: show a tqdm progress bar.
    """

    needs_noise = True
    name = "sampler"

    def __init__(self, diffusion, model, clip_denoised=True, progress=False):
        self.diffusion = diffusion
        self.model = model
        self.clip_denoised = clip_denoised
        self.progress = progress
        self._steps = {}

    def make_step(self, cond_names, pred_xstart):
        raise NotImplementedError

    def step_graph(self, cond_names, pred_xstart=False):
        """The compiled step for these conditioning names (built once, then reused).

        It returns x_{t-1}, or (x_{t-1}, x̂_0) with ``pred_xstart``.
        """
        key = (tuple(cond_names), bool(pred_xstart))
        if key not in self._steps:
            self._steps[key] = self.make_step(*key)
        return self._steps[key]

    def sample(self, shape, model_kwargs=None, seed=0, x_T=None, noises=None):
        """Draw samples x_0 of ``shape`` = (B, C, H, W) by walking the chain down.

        :param model_kwargs: conditioning tensors passed to the model by name (e.g. tokens, y).
        :param seed: seeds the NumPy generator of x_T and of each step's noise.
        :param x_T: the starting noise (default: drawn from the seed).
        :param noises: an optional array [num_steps, *shape] of per-step noise,
            step k being t = T−1−k; drawn from the seed when absent.
        :return: x_0 as a float32 Tensor.
        """
        rng = np.random.default_rng(seed)
        x = ms.Tensor(rng.standard_normal(shape, dtype=np.float32) if x_T is None
                      else np.asarray(x_T, dtype=np.float32))
        names = tuple(sorted(model_kwargs or {}))
        cond = tuple(as_tensor(model_kwargs[n]) for n in names)
        step = self.step_graph(names)
        zeros = ms.Tensor(np.zeros(shape, np.float32))
        num_steps = self.diffusion.num_timesteps
        for k in tqdm(range(num_steps), desc=self.name, disable=not self.progress, leave=False):
            t = ms.Tensor(np.full((shape[0],), num_steps - 1 - k, np.int32))
            if not self.needs_noise:
                noise = zeros
            elif noises is not None:
                noise = ms.Tensor(np.asarray(noises[k], dtype=np.float32))
            else:
                noise = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
            x = step(x, t, noise, *cond)
        return x


def as_tensor(value):
    """A Tensor as it is, anything else (an array, a list) made one: the loops' conditioning inputs."""
    return value if isinstance(value, ms.Tensor) else ms.Tensor(value)
