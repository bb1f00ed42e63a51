"""Building blocks shared by the diffusion networks in ``models/``.

The helpers mirror the small utility layer of openai/improved-diffusion and
guided-diffusion (``conv_nd``, ``linear``, ``zero_module``, ``normalization``,
``timestep_embedding``) so that the networks built from them carry the same
parameter layout as the released PyTorch checkpoints: every weight here has
PyTorch's shape, and only the names MindSpore fixes for its own layers differ
(``gamma``/``beta`` of a norm, ``embedding_table`` of an embedding; see
:mod:`mind_diffusion.convert`).

Everything here is graph-ready: no Python branching on tensor values.
"""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from mind_diffusion.device import GRAPH
from mind_diffusion.kernels import conv as conv_kernels
from mind_diffusion.kernels import group_norm as group_norm_kernels

__all__ = [
    "timestep_embedding",
    "GroupNorm32",
    "LayerNorm32",
    "normalization",
    "normalization_silu",
    "Conv1x1",
    "conv_nd",
    "linear",
    "zero_module",
    "upsample_nearest_2x",
    "AvgPool2x2",
    "GlobalAvgPool",
]


def timestep_embedding(timesteps, dim, max_period=10000, float32_frequencies=False):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM's Transformer-style position code.

    Row ``i`` is ``[cos(t_i f_0), ..., cos(t_i f_{h-1}), sin(t_i f_0), ..., sin(t_i f_{h-1})]``
    with ``h = dim // 2`` and ``f_j = exp(-ln(max_period) j / h)``; an odd ``dim``
    gets one trailing zero column (improved-diffusion's layout, computed in
    float32 the same way so released weights see the same features).

    :param timesteps: a 1-D Tensor of N timesteps (any real or integer dtype).
    :param dim: the embedding width.
    :param max_period: the longest period of the sinusoids.
    :param float32_frequencies: compute f_j with a float32 exp everywhere, as Wukong-Huahua's
        MindSpore code does (at t ≈ 1000 its arguments then differ from the float64 ones by
        ~1e-4 rad, which moves a UNet's ε by up to ~5e-5).
    :return: an [N x dim] float32 Tensor.
    """
    half = dim // 2
    # The exponent is rounded to float32 as in the reference, but on CPU exp runs
    # in float64: every ulp of a frequency moves the argument at t ≈ 1000 by ~1e-4
    # rad, and MindSpore's float32 CPU exp is less accurate than PyTorch's. Graphs
    # built for Ascend/GPU stay in float32 (GRAPH.wide_float: no float64 kernels there).
    exponent = -math.log(max_period) * ops.arange(0, half, dtype=ms.float32) / half
    wide = ms.float32 if float32_frequencies else GRAPH.wide_float
    frequencies = ops.exp(exponent.astype(wide)).astype(ms.float32)
    args = timesteps.astype(ms.float32)[:, None] * frequencies[None, :]
    embedding = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        embedding = ops.cat([embedding, ops.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """Group normalisation computed in float32 whatever the input dtype (ADM's fp16 recipe),
    optionally fused with AdaGN's scale-shift and a SiLU.

    y = γ_c (x − μ_g) / √(σ_g² + ε) + β_c, with μ_g, σ_g² the mean and biased
    variance of each example's group of C/G channels (all positions); then,
    if ``scale_shift`` [N, 2C, 1, ...] = [s | t] is passed, y ← y (1 + s) + t;
    then, with ``activation="silu"``, y ← y · sigmoid(y).

    Under float16/bfloat16 compute the statistics of a group would lose
    precision, so the input is widened, normalised with float32 affine
    parameters, and narrowed back to its own dtype (the scale-shift and SiLU
    then run in that dtype, as the unfused layers did). Accepts [N, C, *]
    inputs of any rank (the classifier's ``spatial_v2`` head normalises [N, C]).

    On the CPU backend with float32 input the whole thing is one C++ operator
    with a C++ backward (:mod:`mind_diffusion.kernels.group_norm`): MindSpore's
    own CPU GroupNorm backward is several times slower, and fusing the SiLU
    saves a pass over the activations and a launch. The parameters (``gamma``,
    ``beta``) are nn.GroupNorm's either way, so checkpoints do not change.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu', got {activation!r}")
        self.silu = activation == "silu"
        # Chosen here, in Python, so the graph sees a constant: the C++ operators or None.
        self.fast = group_norm_kernels.forward_op(num_groups, silu=self.silu)
        self.fast_ss = group_norm_kernels.forward_op(num_groups, silu=self.silu, scale_shift=True) \
            if self.fast is not None else None
        self.eps_tensor = ms.Tensor([eps], ms.float32)

    def construct(self, x, scale_shift=None):
        if self.fast is not None and x.dtype == ms.float32:
            if scale_shift is None:
                return self.fast(x, self.gamma, self.beta, self.eps_tensor)[0]
            ss = scale_shift.astype(ms.float32).reshape(x.shape[0], -1)
            return self.fast_ss(x, self.gamma, self.beta, ss, self.eps_tensor)[0]
        h = ops.group_norm(x.astype(ms.float32), self.num_groups, self.gamma, self.beta, self.eps).astype(x.dtype)
        if scale_shift is not None:
            scale, shift = ops.chunk(scale_shift.astype(h.dtype), 2, axis=1)
            h = h * (1 + scale) + shift
        if self.silu:
            h = ops.silu(h)
        return h


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last axis (width ``width``), normalised in float32 whatever the input dtype,
    returned in the input's dtype (the float16/bfloat16 torsos' transformer blocks). Parameters
    ``gamma``/``beta`` as nn.LayerNorm's."""

    def __init__(self, width, epsilon=1e-5):
        super().__init__((width,), begin_norm_axis=-1, begin_params_axis=-1, epsilon=epsilon)

    def construct(self, x):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)


def normalization(channels, activation=None):
    """The standard normalisation layer of the ADM networks: GroupNorm with 32 groups.

    ``activation="silu"`` fuses the SiLU that follows it in the networks (see
    :func:`normalization_silu`).
    """
    return GroupNorm32(32, channels, activation=activation)


def normalization_silu(channels):
    """``[GroupNorm → SiLU, Identity]``: the norm and SiLU layer pair of the ADM networks, fused.

    The fused cell does both; the identity (no parameters) keeps the SiLU's
    slot, so the indices of a ``SequentialCell`` — and with them the parameter
    names that checkpoints use (``in_layers.2.weight``, ...) — stay those of
    the reference's ``[normalization, SiLU, ...]``.
    """
    return [normalization(channels, activation="silu"), nn.Identity()]


class Conv1x1(nn.Cell):
    """A 1-D convolution with kernel size 1, i.e. a per-position linear map over channels.

    Used for the attention projections (``qkv``, ``proj_out``, ``encoder_kv``).
    The weight keeps PyTorch ``Conv1d``'s [out, in, 1] shape (MindSpore's
    ``nn.Conv1d`` stores [out, in, 1, 1]), so checkpoints map without reshaping,
    and the product runs as one batched matmul rather than a convolution.

    Input [N, in, L] → output [N, out, L].

    In training graphs on CPU in float32 it is the fast convolution's 1×1 operator on
    [N, in, L, 1] (:mod:`mind_diffusion.kernels.conv`: oneDNN's 1×1 convolution with the
    bias fused, and its backward), where the matmul path costs a broadcast forward and
    transposes and reductions backward: 4 kernels fewer per projection. Its effect on the
    train step is within the noise (``bench/kernel_ab.py``: 1.08x and 1.00x in two paired
    runs). Inference graphs (the Cell's mode) keep the matmul, which was as fast at batch 1.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        bound = 1.0 / math.sqrt(in_channels)  # PyTorch's default init, as the references train from it
        self.weight = ms.Parameter(
            initializer(HeUniform(negative_slope=math.sqrt(5)), (out_channels, in_channels, 1), ms.float32),
            name="weight",
        )
        self.bias = ms.Parameter(initializer(Uniform(bound), (out_channels,), ms.float32), name="bias")
        geometry = (1, 1, 0, 0, 0, 0)
        self.fast_op = conv_kernels.forward_op(geometry)
        self.fast_geometry = conv_kernels.geometry_tensor(geometry) if self.fast_op is not None else None

    def construct(self, x):
        # Reshapes, not indexing: MindSpore runs w[:, :, 0] and b[:, None] as StridedSlice kernels.
        out_channels, in_channels, _ = self.weight.shape
        if self.fast_op is not None and self.training and x.dtype == ms.float32:
            batch, _, length = x.shape
            y = self.fast_op(x.reshape(batch, in_channels, length, 1),
                             self.weight.reshape(out_channels, in_channels, 1, 1), self.bias, self.fast_geometry)
            return y.reshape(batch, out_channels, length)
        weight = self.weight.reshape(out_channels, in_channels).astype(x.dtype)
        return ops.matmul(weight, x) + self.bias.astype(x.dtype).reshape(out_channels, 1)


def conv_nd(dims, in_channels, out_channels, kernel_size, stride=1, padding=0):
    """A convolution with bias in PyTorch's layout: 2-D of any kernel, or 1-D with kernel 1 (:class:`Conv1x1`).

    2-D convolutions are :class:`mind_diffusion.kernels.conv.Conv2d`: ``nn.Conv2d``'s
    parameters and results, run on CPU in float32 through oneDNN's blocked-layout
    convolution (forward ~1.3x, forward + backward ~1.3x faster than MindSpore's own).
    """
    if dims == 2:
        return conv_kernels.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=padding, has_bias=True
        )
    if dims == 1 and kernel_size == 1 and stride == 1 and padding == 0:
        return Conv1x1(in_channels, out_channels)
    raise ValueError(f"unsupported convolution: dims={dims}, kernel_size={kernel_size}, stride={stride}")


def linear(in_features, out_features):
    """A fully connected layer (weight [out, in], as PyTorch's ``nn.Linear``)."""
    return nn.Dense(in_features, out_features)


def zero_module(cell):
    """Zero every parameter of ``cell`` and return it.

    The papers zero-initialise each residual branch's last layer and the
    output layer, so a fresh network starts as (near) identity blocks and
    predicts zero.
    """
    for param in cell.get_parameters():
        param.set_data(initializer("zeros", param.shape, param.dtype))
    return cell


def upsample_nearest_2x(x):
    """Nearest-neighbour 2× upsampling of an [N, C, H, W] Tensor, exact (a broadcast, no interpolation)."""
    n, c, h, w = x.shape
    repeated = ops.broadcast_to(x.reshape(n, c, h, 1, w, 1), (n, c, h, 2, w, 2))
    return repeated.reshape(n, c, 2 * h, 2 * w)


class AvgPool2x2(nn.Cell):
    """2×2 average pooling with stride 2 of an [N, C, H, W] Tensor (even H, W): the mean of each 2×2 block.

    Written as a reshape and a mean rather than ``nn.AvgPool2d``: its backward is a
    broadcast, which every backend has, where AvgPool's backward primitive has no
    Ascend kernel in MindSpore 2.10's declarations (see tests/test_graph_audit.py).
    """

    def construct(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


class GlobalAvgPool(nn.Cell):
    """Mean over the spatial axes, keeping them as size 1 (PyTorch's ``AdaptiveAvgPool2d((1, 1))``)."""

    def construct(self, x):
        return x.mean(axis=(2, 3), keep_dims=True)
