"""Run any method of a Cell inside a compiled graph, for tests."""
import mindspore as ms
from mindspore import nn


class Method(nn.Cell):
    """``Method(obj, "name", **static)(*tensors)`` compiles ``obj.name(*tensors, **static)`` as a graph."""

    def __init__(self, obj, name, **static):
        super().__init__()
        self.obj = obj
        self.fn_name = name
        self.static = static

    def construct(self, *args):
        return getattr(self.obj, self.fn_name)(*args, **self.static)


def run(obj, name, *args, **static):
    """Compile and run ``obj.name(*args, **static)``; numpy arrays come back as numpy."""
    tensors = [a if isinstance(a, ms.Tensor) else ms.Tensor(a) for a in args]
    out = Method(obj, name, **static)(*tensors)
    if isinstance(out, (tuple, list)):
        return tuple(o.asnumpy() for o in out)
    return out.asnumpy()
