"""The sampling loop: one compiled graph per (model, scheduler), driven from the host.

:class:`SamplingGraph` is the network, the classifier gradient (when guided) and
the scheduler's update in one ``nn.Cell``; :func:`sample` calls it once per model
call with the call index k, the call's noise and the history tensors, and never
reads anything back from the device inside the loop.
"""
import numpy as np
import mindspore as ms
from mindspore import nn
from tqdm.auto import tqdm

from ..base import as_tensor


class SamplingGraph(nn.Cell):
    """x_next (and the history) for call k: ``graph(x, k, noise, *history, *model_cond, *guide_cond)``.

    :param model: ``model(x, t_model, **model_cond) -> output`` (ε, x_0, v or μ; 2C channels
        with a learned Σ).
    :param step: the scheduler's :class:`~.base.SchedulerStep`.
    :param model_names: names of the model's conditioning tensors, in input order.
    :param cond_fn: the guidance gradient ``cond_fn(x, t_model, *guide_cond) -> s ∇ log p(y | x_t)``
        (e.g. :class:`~mind_diffusion.sampling.guidance.ClassifierGuidance`), or None.
        It sees the same time input as the network (the original step, rescaled if the
        process rescales), as in ADM.
    :param guide_count: how many conditioning tensors ``cond_fn`` takes.
    """

    def __init__(self, model, step, model_names=(), cond_fn=None, guide_count=0):
        # auto_prefix=False: wrapping must not rename the model's parameters (checkpoints keep their names).
        super().__init__(auto_prefix=False)
        self.model = model
        self.step = step
        self.cond_fn = cond_fn
        self.model_names = tuple(model_names)
        self.history_size = step.history_size
        self.guide_count = int(guide_count)

    def construct(self, x, k, noise, *rest):
        history = rest[:self.history_size]
        model_cond = rest[self.history_size:self.history_size + len(self.model_names)]
        guide_cond = rest[self.history_size + len(self.model_names):]
        t_model = self.step.diffusion.model_timesteps(self.step.timestep(k))
        kwargs = {}
        for name, value in zip(self.model_names, model_cond):
            kwargs[name] = value
        output = self.model(x, t_model, **kwargs)
        grad = None
        if self.cond_fn is not None:
            grad = self.cond_fn(x, t_model, *guide_cond)
        return self.step(output, x, k, noise, grad, *history)


def sample(model, shape, scheduler, seed=0, model_kwargs=None, cond_fn=None, cond_kwargs=None,
           x_T=None, noises=None, progress=False, callback=None):
    """Draw x_0 of ``shape`` = (B, C, H, W) with ``scheduler`` (after its ``set_timesteps``).

    :param model: ``model(x, t, **model_kwargs) -> output``, trained on the scheduler's base process.
    :param seed: seeds the NumPy generator of x_T and of each call's noise (drawn in call
        order after x_T, as :class:`~mind_diffusion.sampling.base.Sampler` does).
    :param model_kwargs: the model's conditioning tensors by name (tokens, mask, y, low_res...).
    :param cond_fn: classifier guidance, a Cell ``cond_fn(x, t, *inputs)`` with an ``inputs``
        attribute naming what it reads from ``cond_kwargs`` (see
        :class:`~mind_diffusion.sampling.guidance.ClassifierGuidance`), or None.
    :param x_T: the starting noise (default: drawn from the seed).
    :param noises: optional per-call noise [num_calls, *shape] (noisy schedulers only).
    :param callback: ``callback(k, x)`` after each call with the new state (a Tensor; reading
        it back is the callback's choice).
    :return: x_0 as a float32 Tensor.
    """
    if scheduler.process is None:
        raise ValueError(f"{scheduler.name}: call set_timesteps(K) before sampling")
    rng = np.random.default_rng(seed)
    x = ms.Tensor(rng.standard_normal(shape, dtype=np.float32) if x_T is None else np.asarray(x_T, np.float32))
    model_names = tuple(sorted(model_kwargs or {}))
    guide_names = _guide_inputs(cond_fn, cond_kwargs)
    cond = tuple(as_tensor(model_kwargs[n]) for n in model_names) + \
        tuple(as_tensor(cond_kwargs[n]) for n in guide_names)
    if noises is not None and np.shape(noises)[0] != scheduler.num_calls:
        raise ValueError(f"noises must hold one array per network call ({scheduler.num_calls}), "
                         f"got {np.shape(noises)[0]}")
    key = (id(model), model_names, id(cond_fn), guide_names)
    graph = scheduler.graph(key, lambda: SamplingGraph(model, scheduler.make_step(guided=cond_fn is not None),
                                                       model_names, cond_fn, len(guide_names)))
    zeros = ms.Tensor(np.zeros(shape, np.float32))
    history = (zeros,) * scheduler.history_size
    for k in tqdm(range(scheduler.num_calls), desc=scheduler.name, disable=not progress, leave=False):
        if not scheduler.needs_noise:
            noise = zeros
        elif noises is not None:
            noise = ms.Tensor(np.asarray(noises[k], np.float32))
        else:
            noise = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
        out = graph(x, ms.Tensor(np.full((shape[0],), k, np.int32)), noise, *history, *cond)
        x, history = out[0], tuple(out[1:])
        if callback is not None:
            callback(k, x)
    return x


def _guide_inputs(cond_fn, cond_kwargs):
    if cond_fn is None:
        if cond_kwargs:
            raise ValueError("cond_kwargs given without a cond_fn to read them")
        return ()
    names = tuple(getattr(cond_fn, "inputs", ()))
    missing = [n for n in names if n not in (cond_kwargs or {})]
    if missing:
        raise ValueError(f"classifier guidance needs {missing} in cond_kwargs (e.g. cond_kwargs={{'y': labels}})")
    return names

