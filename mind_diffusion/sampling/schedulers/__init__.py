"""Schedulers: each sampling algorithm is K timesteps of the base process and one compiled update.

    scheduler = create_scheduler("dpm++2m", diffusion).set_timesteps(20)
    images = sample(model, (16, 3, 64, 64), scheduler, seed=0, model_kwargs={"y": labels})

See :mod:`.base` for the interface and :mod:`.loop` for the sampling loop.
"""
from .base import Scheduler, SchedulerStep
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverScheduler
from .euler import EulerAncestralScheduler
from .loop import SamplingGraph, sample
from .plms import PLMSScheduler

SCHEDULERS = {
    "ddpm": lambda diffusion, eta, clip: DDPMScheduler(diffusion, clip),
    "ddim": lambda diffusion, eta, clip: DDIMScheduler(diffusion, eta, clip),
    "plms": lambda diffusion, eta, clip: PLMSScheduler(diffusion, clip),
    "dpm++2m": lambda diffusion, eta, clip: DPMSolverScheduler(diffusion, 2, clip),
    "dpm++3m": lambda diffusion, eta, clip: DPMSolverScheduler(diffusion, 3, clip),
    "euler_a": lambda diffusion, eta, clip: EulerAncestralScheduler(diffusion, 1.0 if eta is None else eta, clip),
}


def create_scheduler(name, diffusion, eta=None, clip_denoised=True):
    """A scheduler by name on the base process ``diffusion``.

    :param eta: DDIM's η (default 0) or Euler ancestral's (default 1); the others have none
        (None or 0 there).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SCHEDULERS)}")
    if name not in ("ddim", "euler_a") and eta not in (None, 0.0):
        raise ValueError(f"sampler {name!r} is deterministic and has no eta (got {eta}); "
                         "eta applies to 'ddim' and 'euler_a'")
    if name == "ddim" and eta is None:
        eta = 0.0
    return SCHEDULERS[name](diffusion, eta, clip_denoised)


__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverScheduler", "EulerAncestralScheduler", "PLMSScheduler",
           "SCHEDULERS", "SamplingGraph", "Scheduler", "SchedulerStep", "create_scheduler", "sample"]
