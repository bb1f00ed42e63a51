"""Give a network random non-zero weights, so tests see every branch (zero-initialised layers included)."""
import mindspore as ms
import numpy as np


def randomize_parameters(cell, seed=0, scale=0.2):
    """Set every parameter of ``cell`` to N(0, scale²) draws (norm gains around 1), reproducibly."""
    rng = np.random.default_rng(seed)
    for param in cell.get_parameters():
        values = rng.normal(0.0, scale, param.shape)
        if param.name.endswith(".gamma"):
            values += 1.0
        param.set_data(ms.Tensor(values.astype(np.float32), dtype=param.dtype))
