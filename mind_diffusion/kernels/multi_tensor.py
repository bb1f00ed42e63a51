"""AdamW and the EMA over all parameter tensors in one C++ call each (CPU).

The train step updates a UNet's ~300 parameter tensors one by one: on MindSpore's
CPU backend that is ~2,700 small kernel launches per step for AdamW and the EMA,
each with the runtime's fixed cost (MindSpore's profiler counts 4,765 kernels in a
train step of the improved-diffusion CIFAR-10 UNet, 334 parameter tensors; 1,513
with these operators and the grouped finiteness check of ``OverflowCheck``). ``csrc/multi_tensor.cc`` walks all tensors in one
``ops.Custom(func_type="aot")`` call (``md_adamw``, ``md_ema``), updating the
Parameters' memory in place and returning a token the graph depends on (see
:class:`mind_diffusion.train.step.TrainStep`).

The path is chosen when :class:`~mind_diffusion.train.step.AdamW` and
:class:`~mind_diffusion.train.step.EMA` are built, in Python: CPU graphs with
float32 parameters only. Otherwise the ops path (``AdamWeightDecay`` per
tensor, the EMA in ops) is used, as on Ascend, where these operators do not
exist:

- ``MIND_DIFFUSION_FAST_UPDATE=0`` (or ``false``/``off``/``no``) disables it;
- no g++, a failed build, or an ``MS_CUSTOM_AOT_WHITE_LIST`` that excludes the
  kernel cache falls back, with one RuntimeWarning saying why (none for the env var
  or the device);
- ``MIND_DIFFUSION_UPDATE_THREADS`` sets the kernels' threads (default: the CPUs this
  process may use, at most 16).

The EMA rounds bit for bit as the ops path; AdamW agrees with ``AdamWeightDecay`` to
float32 rounding (see ``csrc/multi_tensor.cc``), so a run resumed with the other path
continues within rounding, not bit for bit.
"""
import os
import threading

import mindspore as ms
from mindspore import ops

from mind_diffusion.kernels import aot

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "multi_tensor.cc")
ENV_SWITCH = "MIND_DIFFUSION_FAST_UPDATE"

_lock = threading.Lock()
_library = {}  # "path" -> built .so path or None, "reason" -> why not
_ops = {}  # kernel name -> its Custom op, or None when MindSpore refused it


def library():
    """Path of the built kernel library, or None (the reason is in :func:`status`)."""
    return aot.load_once(_library, _lock, lambda: aot.build(SOURCE),
                         "multi-tensor AdamW / EMA unavailable, updating tensor by tensor")


def status():
    """(use_fast, reason): whether optimizers and EMAs built now take the C++ kernels, and why (not)."""
    return aot.library_status(ENV_SWITCH, "multi-tensor update", _library, library)


def _token(*shapes):
    return [1]


def _token_dtype(*dtypes):
    return ms.float32


def _op(name):
    path = library()
    return ops.Custom(f"{path}:{name}", func_type="aot", out_shape=_token, out_dtype=_token_dtype)


def update_op(name, parameters):
    """The Custom op ``name`` (``md_adamw`` or ``md_ema``) for these parameters, or None for the ops path.

    None unless the C++ path is on (:func:`status`) and every parameter is float32.
    """
    if not all(p.dtype == ms.float32 for p in parameters) or not status()[0]:
        return None
    return aot.op_once(_ops, _library, _lock, name, lambda: _op(name),
                       "multi-tensor AdamW / EMA unavailable, updating tensor by tensor")
