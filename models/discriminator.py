"""The patch discriminator of the KL autoencoder's adversarial term (Rombach et al. 2022, App. G, after
Esser et al. 2021's VQGAN; the network is pix2pix's "PatchGAN", Isola et al. 2017).

D maps an image [N, C, H, W] to a grid of logits, one per overlapping patch:

    conv 4×4 /2 (C → c), LeakyReLU(0.2)
    L − 1 times: conv 4×4 /2 (no bias), BatchNorm, LeakyReLU(0.2)     widths c·min(2^l, 8)
    conv 4×4 /1 (no bias), BatchNorm, LeakyReLU(0.2)                   width c·min(2^L, 8)
    conv 4×4 /1 → 1 logit per patch

with padding 1 everywhere, L = ``num_layers`` and c = ``channels`` (CompVis: L = 3, c = 64). Weights start
as CompVis's ``weights_init``: convolutions N(0, 0.02²), norm scales N(1, 0.02²), biases 0.

D exists only while an autoencoder trains, always in training mode, so every BatchNorm normalises by
the statistics of the batch it is given (biased variance, ε = 1e-5); no running statistics are kept.
:meth:`PatchDiscriminator.construct` takes ``frozen``: the generator's term uses D with its weights
behind ``stop_gradient``, so that one backward pass gives the autoencoder the gradient of its loss and D
the gradient of its own (see :class:`mind_diffusion.train.latent.AutoencoderLoss`).
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, nn, ops

from mind_diffusion.kernels import conv as conv_kernels

__all__ = ["PatchDiscriminator", "LEAKY_SLOPE", "BN_EPS"]

LEAKY_SLOPE = 0.2
BN_EPS = 1e-5


class PatchDiscriminator(nn.Cell):
    """PatchGAN logits [N, 1, h, w] of images [N, C, H, W]; ``construct(x, frozen=False)``.

    :param in_channels: C (3 for RGB).
    :param channels: c, the first layer's width.
    :param num_layers: L, the number of stride-2 convolutions.
    :param seed: seeds the initial weights.
    """

    def __init__(self, in_channels=3, channels=64, num_layers=3, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        widths = [in_channels, channels] + [channels * min(2 ** n, 8) for n in range(1, num_layers + 1)] + [1]
        self.strides = (2,) * num_layers + (1, 1)
        # norm on every layer but the first and the last; bias where there is no norm (CompVis: use_bias=False)
        self.normed = tuple(0 < i < len(self.strides) - 1 for i in range(len(self.strides)))
        weights, biases, scales, shifts = [], [], [], []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            weights.append(Parameter(ms.Tensor(rng.normal(0.0, 0.02, (c_out, c_in, 4, 4)).astype(np.float32)),
                                     name=f"conv{i}.weight"))
            if self.normed[i]:
                scales.append(Parameter(ms.Tensor(rng.normal(1.0, 0.02, (c_out,)).astype(np.float32)),
                                        name=f"norm{i}.gamma"))
                shifts.append(Parameter(ms.Tensor(np.zeros(c_out, np.float32)), name=f"norm{i}.beta"))
            else:
                biases.append(Parameter(ms.Tensor(np.zeros(c_out, np.float32)), name=f"conv{i}.bias"))
        # oneDNN's direct convolution on CPU (mind_diffusion/kernels/conv.py) where it builds; None elsewhere
        # (other backends, no compiler), where ops.conv2d serves
        geometries = [conv_kernels.geometry_of(4, stride, "pad", 1) for stride in self.strides]
        self.fast_ops = [conv_kernels.forward_op(geometry) for geometry in geometries]
        self.fast_geometries = [conv_kernels.geometry_tensor(geometry) for geometry in geometries]
        self.zero_biases = [ms.Tensor(np.zeros(c_out, np.float32)) for c_out in widths[1:]]
        self.weights = ms.ParameterTuple(weights)
        self.biases = ms.ParameterTuple(biases)
        self.scales = ms.ParameterTuple(scales)
        self.shifts = ms.ParameterTuple(shifts)

    def construct(self, x, frozen=False):
        h = x
        bias_i, norm_i = 0, 0
        last = len(self.strides) - 1
        for i in range(len(self.strides)):
            bias = self.zero_biases[i] if self.normed[i] else _frozen(self.biases[bias_i], frozen)
            h = self.conv(i, h, _frozen(self.weights[i], frozen), bias)
            if self.normed[i]:
                h = _batch_norm(h, _frozen(self.scales[norm_i], frozen), _frozen(self.shifts[norm_i], frozen))
                norm_i += 1
            else:
                bias_i += 1
            if i < last:
                h = ops.leaky_relu(h, LEAKY_SLOPE)
        return h

    def conv(self, i, h, weight, bias):
        """Layer i's 4×4 convolution (padding 1, its stride) plus ``bias`` [O]."""
        if self.fast_ops[i] is not None and h.dtype == ms.float32:
            return self.fast_ops[i](h, weight, bias, self.fast_geometries[i])
        h = ops.conv2d(h, weight, pad_mode="pad", padding=1, stride=self.strides[i])
        return h + bias.reshape(1, -1, 1, 1)


def _frozen(param, frozen):
    return ops.stop_gradient(param) if frozen else param


def _batch_norm(h, gamma, beta):
    """BatchNorm in training mode: the batch's per-channel mean and biased variance."""
    mean = h.mean(axis=(0, 2, 3), keep_dims=True)
    var = ops.square(h - mean).mean(axis=(0, 2, 3), keep_dims=True)
    return (h - mean) / ops.sqrt(var + BN_EPS) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
