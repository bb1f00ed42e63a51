"""Every test runs on the CPU backend in GRAPH_MODE, as the project promises."""
import os
import sys

import mindspore as ms
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FIXTURES = os.path.join(ROOT, "tests", "fixtures")

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")


@pytest.fixture(scope="session")
def ref():
    """improved-diffusion reference outputs (see tests/fixtures/README.md)."""
    with np.load(os.path.join(FIXTURES, "improved_diffusion_reference.npz")) as data:
        return {k: data[k] for k in data.files}
