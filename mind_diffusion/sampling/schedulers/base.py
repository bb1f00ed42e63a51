"""The scheduler interface: K timesteps of the base process, then one compiled update per model call.

A scheduler is a sampling algorithm in two halves.

- Host side, :class:`Scheduler`: ``set_timesteps(K)`` respaces the *base*
  (trained) process to K of its steps (the kept steps keep their ᾱ_t, improved
  DDPM Sec. 4) and plans the model calls: for call k, the step t_k at which the
  network runs and the update's coefficients, computed in float64 from the
  respaced process's own schedule (``process.schedule``) and rounded once to
  float32. ``num_calls`` is the NFE (K, or K + 1 for PLMS's warm-up).
- Graph side, :class:`SchedulerStep` (an ``nn.Cell``): ``step(model_output, x, k,
  noise, grad, *history) -> (x_next, *history)``. Every per-call quantity is
  gathered from the tables by the call index k, a Tensor input, so one compiled
  graph serves every call; multistep solvers carry their previous model outputs
  as ``history`` tensors shaped like x (inputs and outputs of the graph, so shapes
  stay static). ``grad`` is the classifier-guidance gradient s·∇_x log p_φ(y | x_t)
  (ADM's ``cond_fn``), or None in a step built without guidance (a compile-time
  constant): see :mod:`mind_diffusion.sampling.guidance`.

The state a call returns lies at the step after t_k in the respaced chain,
ᾱ_{t−1} = ``alphas_cumprod_prev[t]``; the last call lands at ᾱ = 1, the sample x_0.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ..guidance import condition_score
from .ldm import respace_ldm

# How set_timesteps spreads K steps over the T of the base process (see schedules.space_timesteps).
SPACINGS = {
    "even": lambda k: str(k),       # improved DDPM: K steps evenly from 0 to T − 1 (generate.py's choice)
    "ddim": lambda k: f"ddim{k}",   # DDIM: range(0, T, T / K), when an integer stride gives exactly K
    "ldm": None,                    # CompVis's DDIM/PLMS: range(0, T, T // K) + 1, down to ᾱ_0 (see .ldm)
}
MIN_STEPS = 2  # GaussianDiffusion needs two steps (β̃ at t = 0 is borrowed from t = 1)


class Scheduler:
    """Host half of a sampler: the timesteps, the per-call coefficient tables, the step Cell.

    :param diffusion: the base process the network was trained on (not respaced:
        every ``set_timesteps`` respaces this one).
    :param clip_denoised: clip every x̂_0 to [−1, 1].

    Subclasses set ``name``, ``step_class``, ``history_size`` (tensors carried between
    calls) and ``needs_noise``, and implement :meth:`plan`.
    """

    name = "scheduler"
    step_class = None
    history_size = 0
    needs_noise = False

    def __init__(self, diffusion, clip_denoised=True):
        if diffusion.num_timesteps != diffusion.original_num_steps:
            raise ValueError(f"{type(self).__name__} needs the base process the network was trained on "
                             f"(T = {diffusion.original_num_steps}), not one respaced to {diffusion.num_timesteps} "
                             "steps: set_timesteps(K) respaces it")
        self.base = diffusion
        self.clip_denoised = bool(clip_denoised)
        self.process = None
        self.num_steps = 0
        self.spacing = None
        self.lowest_step = 0  # the last call runs at this respaced step and lands on the one below it
        self.call_t = None
        self.tables = {}
        self._graphs = {}

    def set_timesteps(self, num_steps, spacing="even"):
        """Sample on ``num_steps`` = K steps of the base process; returns self.

        :param spacing: ``"even"`` (K steps evenly over [0, T − 1], improved DDPM),
            ``"ddim"`` (DDIM's integer stride; K must divide T suitably) or ``"ldm"``
            (CompVis's latent-diffusion samplers: τ = range(0, T, T // K) + 1, the last update
            landing on ᾱ_0 rather than 1; :mod:`.ldm`).
        """
        total = self.base.num_timesteps
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or not MIN_STEPS <= num_steps <= total:
            raise ValueError(f"{self.name}: the number of steps must be an integer in {MIN_STEPS}..{total} "
                             f"(the base process has T = {total} steps), got {num_steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"{self.name}: unknown spacing {spacing!r}; use one of {sorted(SPACINGS)}")
        num_steps = int(num_steps)
        self.lowest_step = 0
        if spacing == "ldm":
            self.process, self.lowest_step = respace_ldm(self.base, num_steps), 1
        elif num_steps == total:
            self.process = self.base  # every step: the base itself, not a re-derived copy of its betas
        else:
            self.process = self.base.respace(SPACINGS[spacing](num_steps))
        self.num_steps, self.spacing = num_steps, spacing
        call_t, tables = self.plan(self.process)
        self.call_t = np.asarray(call_t, np.int32)
        self.tables = {name: np.asarray(values, np.float64) for name, values in tables.items()}
        for name, values in self.tables.items():
            if values.shape != self.call_t.shape or not np.all(np.isfinite(values)):
                raise AssertionError(f"{self.name}: table {name} must hold one finite value per call")
        self._graphs = {}
        return self

    def plan(self, process):
        """(t_k for each call k, {table name: float64 [num_calls]}) on the respaced ``process``."""
        raise NotImplementedError

    @property
    def num_calls(self):
        """Model evaluations per sample (the NFE)."""
        self._require_timesteps()
        return len(self.call_t)

    @property
    def timesteps(self):
        """The base process's step at which each call runs the network."""
        self._require_timesteps()
        return self.process.schedule["timestep_map"][self.call_t]

    def _require_timesteps(self):
        if self.process is None:
            raise ValueError(f"{self.name}: call set_timesteps(K) before sampling")

    def make_step(self, guided=False):
        """A new :class:`SchedulerStep` on the current timesteps (``guided``: takes a classifier gradient)."""
        self._require_timesteps()
        return self.step_class(self, guided)

    def graph(self, key, build):
        """The compiled sampling graph cached under ``key`` (built by ``build()`` once per set_timesteps)."""
        if key not in self._graphs:
            self._graphs[key] = build()
        return self._graphs[key]


def descending(process, lowest=0):
    """The plain plan: call k runs at t = K−1−k and moves to t − 1; (t, ᾱ_t, ᾱ_{t−1}) per call, float64.

    The last call runs at t = ``lowest``: with 0, ᾱ_{t−1} is 1 and it lands on x_0; with 1 (the
    "ldm" spacing) it lands on the base process's ᾱ_0, as CompVis's samplers do.
    """
    steps = process.num_timesteps
    t = np.arange(steps - 1, lowest - 1, -1)
    return t, process.schedule["alphas_cumprod"][t], process.schedule["alphas_cumprod_prev"][t]


class SchedulerStep(nn.Cell):
    """Graph half of a sampler: one update for any call k, its coefficients gathered by k.

    Holds the respaced process (for its parametrisation methods) and every table
    of the scheduler as a [num_calls, 1, 1, 1] float32 Tensor attribute of the same name.
    """

    def __init__(self, scheduler, guided=False):
        super().__init__(auto_prefix=False)
        self.diffusion = scheduler.process
        self.clip_denoised = scheduler.clip_denoised
        self.guided = bool(guided)
        self.history_size = scheduler.history_size
        self.call_t = ms.Tensor(scheduler.call_t, ms.int32)
        for name, values in scheduler.tables.items():
            setattr(self, name, ms.Tensor(values.reshape(-1, 1, 1, 1), ms.float32))

    def timestep(self, k):
        """t_k, the respaced step at which call k runs the network, for each example ([B] int32)."""
        return ops.gather(self.call_t, k, 0)

    def coef(self, table, k, ndim):
        """table[k] shaped to broadcast over an ndim-D batch."""
        return self.diffusion._extract(table, k, ndim)

    def prediction(self, model_output, x, t, grad):
        """(x̂_0, ε̂) at (x_t, t) from a network output of any parametrisation (ε, x_0, v, μ).

        x̂_0 is read off the first C channels (a learned Σ's channels are ignored)
        and clipped when the scheduler clips; ε̂ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t) is the
        noise it implies (as in DDIM). With classifier guidance, ε̂ ← ε̂ − √(1 − ᾱ_t)·grad
        and x̂_0 is read off the guided ε̂, not clipped again (ADM's condition_score).
        """
        _, _, _, pred_xstart = self.diffusion.p_mean_variance_from_output(model_output, x, t, self.clip_denoised)
        eps = self.diffusion.predict_eps_from_xstart(x, t, pred_xstart)
        if grad is None:
            return pred_xstart, eps
        eps = condition_score(eps, self.coef(self.diffusion.sqrt_one_minus_alphas_cumprod, t, x.ndim), grad)
        return self.diffusion.predict_xstart_from_eps(x, t, eps), eps

    def guided_output(self, model_output, x, t, grad):
        """The network output, in the network's own parametrisation, that predicts the guided (x̂_0, ε̂).

        An unguided step fed this output (without clipping again) takes ADM's
        condition_score step; the variance channels, if any, are kept.
        """
        pred_xstart, eps = self.prediction(model_output, x, t, grad)
        mean_type = self.diffusion._mean
        if mean_type == "epsilon":
            mean_part = eps
        elif mean_type == "start_x":
            mean_part = pred_xstart
        elif mean_type == "velocity":
            mean_part = self.diffusion.velocity(pred_xstart, t, eps)
        else:
            mean_part, _, _ = self.diffusion.q_posterior_mean_variance(pred_xstart, x, t)
        _, var_values = self.diffusion.split_output(model_output, x.shape[1])
        if var_values is None:
            return mean_part
        return ops.concat((mean_part, var_values), axis=1)
