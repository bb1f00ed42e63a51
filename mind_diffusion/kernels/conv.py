"""Fast CPU 2-D convolution: oneDNN's direct convolution on blocked layouts, as C++ custom operators.

MindSpore's CPU Conv2D hands oneDNN plain NCHW tensors, and oneDNN then runs
its gemm-based convolution; the backward passes (data and weights) are 2-3x
slower than oneDNN's direct AVX2 convolution on channel-blocked layouts, which
PyTorch uses (see shared PERF_NOTES). Here the forward, backward-data and
backward-weights are three ``ops.Custom(func_type="aot")`` operators
(``csrc/conv_dnnl.cc``) that call the oneDNN library MindSpore itself ships
(``mindspore/lib/libdnnl.so.3``) with layout "any", reordering from and to
NCHW around each primitive. The backward operators are the forward's
``bprop``, so ``ms.value_and_grad`` / ``ops.GradOperation`` differentiate
through it in GRAPH_MODE; an unused gradient (e.g. of the network's input) is
pruned with its operator.

:class:`Conv2d` is :class:`mindspore.nn.Conv2d` (same arguments, same
``weight`` [O, C, kh, kw] and ``bias`` [O] parameters and initialisation) whose
``construct`` takes the fast path when it can, so it is a drop-in replacement.
The fast path is chosen when the Cell is built, in Python, and only on the CPU
backend, for NCHW, one group, dilation 1 and pad_mode "pad"/"valid" (or "same"
with stride 1 and odd kernels); inside the graph, input or weight dtypes other
than float32 take MindSpore's convolution (decided from dtypes, which are
compile-time constants). Otherwise:

- ``MIND_DIFFUSION_FAST_CONV=0`` (or ``false``/``off``/``no``) disables it;
- any other device target, no g++, no ``libdnnl.so.3`` in the MindSpore
  package, a oneDNN that is not v3 with the threadpool runtime, a failed build,
  or an ``MS_CUSTOM_AOT_WHITE_LIST`` that excludes the kernel cache falls back,
  with one RuntimeWarning saying why (none for the env var or the device);
- ``MIND_DIFFUSION_CONV_THREADS`` sets the kernel's threads (default: the CPUs
  this process may use, at most 16);
- ``MIND_DIFFUSION_CONV_LAYOUT``: ``blocked`` (default: oneDNN's choice),
  ``plain`` (NCHW, oneDNN's gemm convolution, what MindSpore runs, bias fused)
  or ``auto`` (per shape and primitive, the faster of the two over the first
  calls; ``MIND_DIFFUSION_CONV_VERBOSE=1`` prints the choices). Read when a
  shape is first run.

The library is built once per source/flags hash by :mod:`mind_diffusion.kernels.aot`
(the link flags name the MindSpore package's lib folder, so another install rebuilds).
"""
import ctypes
import os
import threading

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mind_diffusion.kernels import aot

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "conv_dnnl.cc")
CXX_FLAGS = aot.DEFAULT_FLAGS
ENV_SWITCH = "MIND_DIFFUSION_FAST_CONV"
DNNL_LIBRARY = "libdnnl.so.3"

_lock = threading.Lock()
_library = {}  # "path" -> built .so path or None, "reason" -> why not, "info" -> oneDNN version/threads
_ops = {}  # geometry -> forward Custom op (with its bprop), or None


def dnnl_dir():
    """The folder of the oneDNN library shipped with MindSpore, or None."""
    folder = os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")
    return folder if os.path.isfile(os.path.join(folder, DNNL_LIBRARY)) else None


def _build():
    """(path or None, reason, info): build the library and check that it can run here."""
    folder = dnnl_dir()
    if folder is None:
        return None, f"no {DNNL_LIBRARY} in the MindSpore package", None
    link = (f"-L{folder}", f"-l:{DNNL_LIBRARY}", f"-Wl,-rpath,{folder}", "-pthread")
    path, reason = aot.build(SOURCE, CXX_FLAGS, link)
    if path is None:
        return None, reason, None
    try:
        probe = ctypes.CDLL(path).md_conv2d_probe
        version = [ctypes.c_int(0) for _ in range(4)]
        code = probe(*[ctypes.byref(v) for v in version])
    except OSError as err:
        return None, f"cannot load {os.path.basename(path)}: {err}", None
    major, minor, patch, threads = (v.value for v in version)
    info = f"oneDNN {major}.{minor}.{patch}, {threads} threads"
    if code != 0:
        return None, f"oneDNN unusable ({info}; needs v3 with the threadpool runtime; code {code})", None
    return path, reason, info


def library():
    """Path of the built kernel library, or None (the reason is in :func:`status`)."""
    return aot.load_once(_library, _lock, lambda: _build(), "fast convolution unavailable, using MindSpore's")


def status():
    """(use_fast, reason): whether convolution Cells built now take the C++ kernels, and why (not)."""
    return aot.library_status(ENV_SWITCH, "fast convolution", _library, library)


def call_counts():
    """(forward, backward-data, backward-weights): how many times each kernel has run in this process."""
    path = library()
    if path is None:
        return 0, 0, 0
    calls = ctypes.CDLL(path).md_conv2d_calls
    calls.restype = ctypes.c_int64
    return tuple(int(calls(kind)) for kind in range(3))


def _out_size(size, pad_before, pad_after, kernel, stride):
    if size < 0 or kernel < 0:
        return -1
    return (size + pad_before + pad_after - kernel) // stride + 1


def _make(geometry):
    """The forward Custom op of one geometry with its backward ops as bprop; raises when MindSpore refuses."""
    path = library()
    sh, sw, pt, pb, pl, pr = geometry
    f32 = ms.float32

    def y_shape(x, w):
        return [x[0], w[0], _out_size(x[2], pt, pb, w[2], sh), _out_size(x[3], pl, pr, w[3], sw)]

    backward_data = ops.Custom(f"{path}:md_conv2d_bwd_data", func_type="aot",
                               out_shape=lambda x, w, dy, g: x, out_dtype=lambda x, w, dy, g: f32)
    backward_weights = ops.Custom(f"{path}:md_conv2d_bwd_weights", func_type="aot",
                                  out_shape=lambda x, w, dy, g: (w, [w[0]]),
                                  out_dtype=lambda x, w, dy, g: (f32, f32))

    def bprop(x, w, b, g, out, dout):
        dx = backward_data(x, w, dout, g)
        dw, db = backward_weights(x, w, dout, g)
        return dx, dw, db, ops.zeros_like(g)

    return ops.Custom(f"{path}:md_conv2d_fwd", func_type="aot", bprop=bprop,
                      out_shape=lambda x, w, b, g: y_shape(x, w), out_dtype=lambda x, w, b, g: f32)


def geometry_of(kernel_size, stride, pad_mode, padding, dilation=(1, 1), group=1, data_format="NCHW"):
    """(stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right) of an ``nn.Conv2d``'s settings,
    or None when the fast kernels do not take them."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)[-2:]
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)[-2:]
    if data_format != "NCHW" or group != 1 or tuple(dilation) != (1, 1):
        return None
    if pad_mode == "pad":
        pads = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
        if len(pads) != 4:
            return None
    elif pad_mode == "valid":
        pads = (0, 0, 0, 0)
    elif pad_mode == "same" and sh == sw == 1 and kh % 2 == 1 and kw % 2 == 1:
        pads = ((kh - 1) // 2, (kh - 1) // 2, (kw - 1) // 2, (kw - 1) // 2)
    else:
        return None
    return tuple(int(v) for v in (sh, sw, *pads))


def forward_op(geometry):
    """The fast convolution operator of a geometry (see :func:`geometry_of`), or None when
    MindSpore's convolution must be used.

    Call it as ``op(x, weight, bias, g)``: x [N, C, H, W], weight [O, C, kh, kw], bias [O], all
    float32, and g = ``geometry_tensor(geometry)``. It returns conv(x, weight) + bias [N, O, OH, OW].
    Operators are shared by all Cells of one geometry.
    """
    if geometry is None or not status()[0]:
        return None
    key = tuple(geometry)
    return aot.op_once(_ops, _library, _lock, key, lambda: _make(key),
                       "fast convolution unavailable, using MindSpore's")


def geometry_tensor(geometry):
    """The int64 [6] operand that tells the kernels the strides and paddings."""
    return ms.Tensor(np.asarray(geometry, np.int64))


class Conv2d(nn.Conv2d):
    """:class:`mindspore.nn.Conv2d` computed by the fast CPU kernels where they apply.

    Same arguments, parameters (``weight`` [O, C, kh, kw], ``bias`` [O]) and initialisation as
    ``nn.Conv2d``; outside the cases the kernels take (see the module's doc) it is ``nn.Conv2d``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, pad_mode="same", padding=0, dilation=1,
                 group=1, has_bias=False, weight_init=None, bias_init=None, data_format="NCHW",
                 dtype=ms.float32):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode=pad_mode, padding=padding,
                         dilation=dilation, group=group, has_bias=has_bias, weight_init=weight_init,
                         bias_init=bias_init, data_format=data_format, dtype=dtype)
        geometry = geometry_of(self.kernel_size, self.stride, self.pad_mode, self.padding, self.dilation,
                               self.group, self.data_format)
        self.fast_op = forward_op(geometry)
        self.fast = self.fast_op is not None
        self.fast_geometry = geometry_tensor(geometry) if self.fast else None
        self.fast_zero_bias = ms.Tensor(np.zeros([out_channels], np.float32)) if self.fast else None

    def construct(self, x):
        if self.fast and x.dtype == ms.float32 and self.weight.dtype == ms.float32 and x.ndim == 4:
            bias = self.bias if self.has_bias else self.fast_zero_bias
            return self.fast_op(x, self.weight, bias, self.fast_geometry)
        output = self.conv2d(x, self.weight)
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output
