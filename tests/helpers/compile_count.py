"""Which graphs MindSpore compiles during a test: a check that a compiled step is built once and reused."""
from mindspore.graph import api as graph_api


def record_compiles(monkeypatch):
    """A list that receives the class name of every Cell compiled from now on, until the test ends.

    A call that reuses a cached graph adds nothing, so ``["SamplingGraph"]`` after a whole sampling
    loop means one graph served every step.
    """
    compiles = []
    executor = type(graph_api._cell_graph_executor)
    original = executor.compile

    def counting_compile(self, obj, *args, **kwargs):
        result = original(self, obj, *args, **kwargs)  # (phase, False) when a cached graph is reused
        if result[1]:
            compiles.append(type(obj).__name__)
        return result

    monkeypatch.setattr(executor, "compile", counting_compile)
    return compiles
