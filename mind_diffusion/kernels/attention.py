"""Fast CPU attention core: forward and backward as C++ custom operators.

Per row of R = batch × heads, with q [R, d, T] and k, v [R, d, S] (ADM's
channels-first layout), the forward computes

    P = softmax_s(qᵀk / √d)  [R, T, S]   and   O = v Pᵀ  [R, d, T]

and returns both; P is kept for the backward, a second C++ operator giving
∂L/∂q, ∂L/∂k, ∂L/∂v from P and ∂L/∂O without recomputing the products. It is
attached as the forward's ``bprop``, so ``ms.value_and_grad`` differentiates
through it in GRAPH_MODE. ``csrc/attention.cc`` gives the formulas, the loop
blocking and the threading (over R).

Why: MindSpore's CPU BatchMatMul runs these small batched products at ~13
GFLOP/s, and the ops path (scale, scale, matmul, softmax, matmul and their
backward) makes many passes over [R, T, S] tensors; one C++ pass per direction
keeps each row's q, k, v and P in cache.

The fast path is chosen in Python, on the CPU backend only, when a graph is
built (see :func:`forward_op`); the ops path in ``models/unet.py`` stays the
fallback and serves float16:

- ``MIND_DIFFUSION_FAST_ATTENTION=0`` (or ``false``/``off``/``no``) disables it;
- any other device target, no g++, a failed build, or an
  ``MS_CUSTOM_AOT_WHITE_LIST`` that excludes the kernel cache falls back, with
  one RuntimeWarning saying why (none for the env var or the device);
- ``MIND_DIFFUSION_ATTENTION_THREADS`` caps the kernel's threads (default: the
  CPUs this process may use, at most 16).
"""
import os
import threading

import mindspore as ms
from mindspore import ops

from mind_diffusion.kernels import aot

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "attention.cc")
# -fopenmp-simd honours `#pragma omp simd` without an OpenMP runtime (threads are
# std::thread, hence -pthread); -ffp-contract=fast (after the default "off") lets the
# products use FMA, which doubles their arithmetic rate — they are float32 sums of
# products either way, and the tests hold them to float32 accuracy.
CXX_FLAGS = aot.DEFAULT_FLAGS + ("-fopenmp-simd", "-ffp-contract=fast")
LINK = ("-pthread",)
ENV_SWITCH = "MIND_DIFFUSION_FAST_ATTENTION"

_lock = threading.Lock()
_library = {}  # "path" -> built .so path or None, "reason" -> why not
_ops = {}  # "op" -> the forward Custom op (with its bprop), or None


def library():
    """Path of the built kernel library, or None (the reason is in :func:`status`)."""
    return aot.load_once(_library, _lock, lambda: aot.build(SOURCE, CXX_FLAGS, LINK),
                         "fast attention unavailable, using pure ops")


def status():
    """(use_fast, reason): whether attention graphs built now take the C++ kernels, and why (not)."""
    return aot.library_status(ENV_SWITCH, "fast attention", _library, library)


def _make():
    """The forward Custom op with its backward op as bprop; raises when MindSpore refuses."""
    path = library()
    f32 = ms.float32

    backward = ops.Custom(f"{path}:md_attention_bwd", func_type="aot",
                          out_shape=lambda q, k, v, p, g: (q, k, v),
                          out_dtype=lambda q, k, v, p, g: (f32, f32, f32))

    def bprop(q, k, v, out, dout):
        # Only O is used by callers; P (out[1]) is the forward's saved state and gets no gradient.
        return backward(q, k, v, out[1], dout[0])

    return ops.Custom(f"{path}:md_attention_fwd", func_type="aot", bprop=bprop,
                      out_shape=lambda q, k, v: (q, [q[0], q[2], k[2]]),
                      out_dtype=lambda q, k, v: (f32, f32))


def forward_op():
    """The fast attention operator, or None when the pure-ops path must be taken.

    Call it as ``op(q, k, v)`` with q [R, d, T], k, v [R, d, S] float32; it returns
    ``(O, P)``: O = v·softmax(qᵀk/√d)ᵀ [R, d, T], the result, and P [R, T, S], the
    softmax weights kept for the backward. One operator serves every shape.
    """
    if not status()[0]:
        return None
    return aot.op_once(_ops, _library, _lock, "op", _make, "fast attention unavailable, using pure ops")


class _Choice:
    """``CHOICE.op`` is :func:`forward_op` evaluated on each access (a property).

    MindSpore's graph parser resolves attributes of Python objects in Python when
    it builds a graph, so ``CHOICE.op`` inside a construct is a constant of that
    graph: the env switch, device and build are consulted per graph build.
    """

    @property
    def op(self):
        return forward_op()


CHOICE = _Choice()
