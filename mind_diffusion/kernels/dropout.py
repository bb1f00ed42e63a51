"""Dropout whose masks resume exactly: counter-based masks from the dropout layers' own counter.

MindSpore's CPU dropout kernel keeps its own random state, which a checkpoint
cannot hold: after a resume every mask differs from the uninterrupted run's.
Here a training-mode :class:`Dropout` takes a counter from :data:`COUNTER`, an
int64 Parameter that belongs to the dropout layers alone (each call takes the
current value and advances it by one, so every layer of a step gets its own),
and a C++ kernel (``csrc/dropout.cc``) keeps element i when a 32-bit hash of
(counter, i) is ≥ p·2^32, scaling kept values by 1/(1 − p) as ``nn.Dropout``
does. The backward recomputes the mask from the same counter rather than
storing it. The trainer sets the counter at every step from (run seed, rank,
step) (:func:`seed_step`), so masks are a function of the step like the
timesteps and the noise. MindSpore's default generator (``ms.get_rng_state``),
which other random ops draw from, is never read or written here.

The path is chosen when a Dropout is built, in Python. Graphs built for Ascend
or GPU (``device.graph_target()``) use ``mint.nn.functional.dropout``, whose
kernels (DropoutExt, DropoutGradExt) exist there. On CPU the C++ kernel is used,
with ``nn.Dropout`` as the fallback (its masks do not resume):

- ``MIND_DIFFUSION_FAST_DROPOUT=0`` (or ``false``/``off``/``no``) disables it;
- no g++, a failed build, or an ``MS_CUSTOM_AOT_WHITE_LIST`` that excludes the
  kernel cache falls back, with one RuntimeWarning saying why (none for the env var);
- inside the graph a non-float32 input (an fp16 model) takes ``nn.Dropout``.
"""
import os
import threading

import numpy as np
import mindspore as ms
from mindspore import Parameter, mint, nn, ops

from mind_diffusion.device import graph_target
from mind_diffusion.kernels import aot

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "dropout.cc")
ENV_SWITCH = "MIND_DIFFUSION_FAST_DROPOUT"

_lock = threading.Lock()
_library = {}  # "path" -> built .so path or None, "reason" -> why not
_ops = {}  # "op" -> the Custom op with its bprop, or None when MindSpore refused it


def library():
    """Path of the built kernel library, or None (the reason is in :func:`status`)."""
    return aot.load_once(_library, _lock, lambda: aot.build(SOURCE), "counter-based dropout unavailable, "
                         "using nn.Dropout (masks will not resume exactly)")


def status():
    """(use_fast, reason): whether Dropout Cells built now take the C++ kernel, and why (not)."""
    return aot.library_status(ENV_SWITCH, "counter-based dropout", _library, library)


def _make():
    path = library()
    op = None

    def bprop(x, counter, p, out, dout):
        # d(x·m/(1−p))/dx = m/(1−p): the same call on dout, same counter, same mask.
        return op(dout, counter, p), ops.zeros_like(counter), ops.zeros_like(p)

    op = ops.Custom(f"{path}:md_dropout", func_type="aot", bprop=bprop,
                    out_shape=lambda x, counter, p: x, out_dtype=lambda x, counter, p: x)
    return op


def dropout_op():
    """The counter-based dropout operator ``op(x, counter, p)``, or None when nn.Dropout must be used.

    x float32 of any shape, counter an int64 scalar Tensor (one value of :data:`COUNTER`),
    p a [1] float32 Tensor in [0, 1).
    """
    if not status()[0]:
        return None
    return aot.op_once(_ops, _library, _lock, "op", _make, "counter-based dropout unavailable, using nn.Dropout")


@ms.jit_class
class DropoutCounter:
    """The counter the dropout masks are keyed by: one int64 Parameter, outside every network.

    Not a Cell attribute, so it is in no network's parameters (nor in checkpoints: the trainer
    sets it from the step). Inside a graph, :meth:`take` returns the current value and
    advances it by ``count``; MindSpore orders the layers' calls as written.
    """

    def __init__(self):
        self.value = Parameter(ms.Tensor(0, ms.int64), name="mind_diffusion_dropout_counter", requires_grad=False)

    def take(self, count):
        return ops.assign_add(self.value, count) - count

    def set(self, start):
        self.value.set_data(ms.Tensor(start, ms.int64))


COUNTER = DropoutCounter()


def seed_step(seed, rank, step):
    """Set the dropout counter for one train step from (seed, rank, step) alone.

    The step's calls use counters start, start + 1, …; start is 62 random bits, so two
    steps' ranges of a few hundred counters practically never meet (and never overflow).
    """
    words = np.random.SeedSequence([seed, rank, step, 0x64726F70]).generate_state(2, np.uint32)  # "drop"
    COUNTER.set(int(words[0]) << 30 | int(words[1]) >> 2)


class Dropout(nn.Cell):
    """Zero each element with probability p during training, scale the rest by 1/(1 − p).

    On CPU the masks are counter-based (see the module docstring). In graphs built for
    Ascend or GPU it is ``mint.nn.functional.dropout`` (DropoutExt, whose backward
    DropoutGradExt has an Ascend kernel, unlike ``nn.Dropout``'s DropoutGrad), drawing
    from MindSpore's default generator. Identity in eval mode and for p = 0.

    :param p: the drop probability, in [0, 1).
    """

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = float(p)
        self.op = dropout_op() if self.p > 0 else None
        self.fast = self.op is not None
        self.p_tensor = ms.Tensor([self.p], ms.float32)
        self.one = ms.Tensor(1, ms.int64)
        self.fallback = nn.Dropout(p=self.p)
        self.on_npu = graph_target() != "CPU"

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.on_npu:
            return mint.nn.functional.dropout(x, self.p, training=True)
        if self.fast and x.dtype == ms.float32:
            return self.op(x, COUNTER.take(self.one), self.p_tensor)
        return self.fallback(x)
