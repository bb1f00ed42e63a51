"""Fast CPU group normalisation: forward and backward as C++ custom operators.

For x [N, C, *] split into G groups of C/G channels, the forward computes

    y = γ_c (x − μ_g) / √(σ_g² + ε) + β_c

with μ_g, σ_g² the mean and biased variance of each (example, group), optionally
followed in the same pass by ADM's scale-shift ``y (1 + s) + t`` (AdaGN, with
``ss = [s | t]`` of shape [N, 2C]) and by SiLU ``y · sigmoid(y)``. The backward
is a second C++ operator that gives ∂L/∂x, ∂L/∂γ, ∂L/∂β (and ∂L/∂ss); it is
attached as the forward's ``bprop``, so ``ms.value_and_grad`` / ``ops.GradOperation``
differentiate through it in GRAPH_MODE.

Why: MindSpore's CPU GroupNorm, and above all its backward, is several times
slower than PyTorch's (see shared PERF_NOTES), and norm → SiLU is two kernel
launches and two full passes over the activations where one does. The C++
source (``csrc/group_norm.cc``) explains the numerics (float64 two-pass
statistics) and the threading (over (example, group) pairs).

The fast path is chosen when a norm Cell is built, in Python, and only on the
CPU backend; the pure-ops path (``ops.group_norm`` then ``ops.silu``) stays the
fallback:

- ``MIND_DIFFUSION_FAST_NORM=0`` (or ``false``/``off``/``no``) disables it;
- any other device target, no g++, a failed build, or an
  ``MS_CUSTOM_AOT_WHITE_LIST`` that excludes the kernel cache falls back, with
  one RuntimeWarning saying why (none for the env var or the device);
- ``MIND_DIFFUSION_NORM_THREADS`` caps the kernel's threads (default: the CPUs
  this process may use, at most 16).

The library is built once per source/flags hash by :mod:`mind_diffusion.kernels.aot`.
"""
import os
import threading

import mindspore as ms
from mindspore import ops

from mind_diffusion.kernels import aot

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "group_norm.cc")
# -fopenmp-simd honours `#pragma omp simd` (vectorised float64 reductions) without
# linking an OpenMP runtime; threads are std::thread, hence -pthread.
CXX_FLAGS = aot.DEFAULT_FLAGS + ("-fopenmp-simd",)
LINK = ("-pthread",)
ENV_SWITCH = "MIND_DIFFUSION_FAST_NORM"

_lock = threading.Lock()
_library = {}  # "path" -> built .so path or None, "reason" -> why not
_ops = {}  # (groups, silu, scale_shift) -> forward Custom op (with its bprop), or None


def library():
    """Path of the built kernel library, or None (the reason is in :func:`status`)."""
    return aot.load_once(_library, _lock, lambda: aot.build(SOURCE, CXX_FLAGS, LINK),
                         "fast GroupNorm unavailable, using pure ops")


def status():
    """(use_fast, reason): whether norm Cells built now take the C++ kernels, and why (not)."""
    return aot.library_status(ENV_SWITCH, "fast GroupNorm", _library, library)


def _make(groups, silu, scale_shift):
    """The forward Custom op of one variant with its backward op as bprop; raises when MindSpore refuses."""
    path = library()
    name = "md_group_norm" + ("_ss" if scale_shift else "") + ("_silu" if silu else "")
    f32, f64 = ms.float32, ms.float64

    def stats_shape(x):
        return [x[0], groups]

    if scale_shift:
        backward = ops.Custom(f"{path}:{name}_bwd", func_type="aot",
                              out_shape=lambda x, g, b, ss, mean, rstd, dy: (x, g, b, ss),
                              out_dtype=lambda x, g, b, ss, mean, rstd, dy: (f32, f32, f32, f32))

        def bprop(x, gamma, beta, ss, eps, out, dout):
            # Only y is ever used; the statistics (out[1], out[2]) get no gradient.
            dx, dgamma, dbeta, dss = backward(x, gamma, beta, ss, out[1], out[2], dout[0])
            return dx, dgamma, dbeta, dss, ops.zeros_like(eps)

        return ops.Custom(f"{path}:{name}_fwd", func_type="aot", bprop=bprop,
                          out_shape=lambda x, g, b, ss, eps: (x, stats_shape(x), stats_shape(x)),
                          out_dtype=lambda x, g, b, ss, eps: (f32, f64, f64))

    backward = ops.Custom(f"{path}:{name}_bwd", func_type="aot",
                          out_shape=lambda x, g, b, mean, rstd, dy: (x, g, b),
                          out_dtype=lambda x, g, b, mean, rstd, dy: (f32, f32, f32))

    def bprop(x, gamma, beta, eps, out, dout):
        # Only y is ever used; the statistics (out[1], out[2]) get no gradient.
        dx, dgamma, dbeta = backward(x, gamma, beta, out[1], out[2], dout[0])
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return ops.Custom(f"{path}:{name}_fwd", func_type="aot", bprop=bprop,
                      out_shape=lambda x, g, b, eps: (x, stats_shape(x), stats_shape(x)),
                      out_dtype=lambda x, g, b, eps: (f32, f64, f64))


def forward_op(groups, silu=False, scale_shift=False):
    """The fast GroupNorm operator for ``groups`` groups, or None when the pure-ops path must be taken.

    Call it as ``op(x, gamma, beta, eps)`` (or ``op(x, gamma, beta, ss, eps)`` with ``scale_shift``):
    x [N, C, *] float32, gamma/beta [C] float32, ss [N, 2C] float32, eps a [1] float32 Tensor.
    It returns ``(y, mean, rstd)``; y is the result, mean and rstd ([N, groups] float64)
    are kept for the backward. Operators are shared by all Cells of one variant.
    """
    if not status()[0]:
        return None
    key = (int(groups), bool(silu), bool(scale_shift))
    return aot.op_once(_ops, _library, _lock, key, lambda: _make(*key), "fast GroupNorm unavailable, using pure ops")
