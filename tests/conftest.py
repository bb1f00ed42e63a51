"""Every test runs on the CPU backend in GRAPH_MODE, as the project promises.

C++ kernel tests
----------------
A test that exercises one of the project's C++ kernels carries
``@pytest.mark.kernel(module)``, where ``module`` is the kernel's Python module
(``mind_diffusion.kernels.attention``, ``.conv``, ``.dropout``, ``.group_norm``,
``.multi_tensor`` or ``mind_diffusion.sampling.fused``: each has ``ENV_SWITCH`` and ``status()``).
The :func:`_kernel_gate` fixture below then

- switches that kernel on for the test (``ENV_SWITCH=1``): a deliberate
  ``MIND_DIFFUSION_FAST_*=0`` in the environment chooses the pure-ops path for
  the library and for every other test, but never removes a kernel's own tests;
- when the kernel is unavailable (no g++, a failed build, an unwritable cache),
  skips the test with the reason, and lists every such skip at the end of the
  run — or, with ``MIND_DIFFUSION_REQUIRE_KERNELS=1`` (CI sets it in
  ``.ci/run``), fails it instead.

Tests without the mark never skip for a missing kernel: fallback tests, float64
reference checks and the like run everywhere. Every skip, of any kind, is listed
with its reason in the run's short summary.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
REQUIRE_KERNELS = "MIND_DIFFUSION_REQUIRE_KERNELS"

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")

_unavailable = {}  # kernel module name -> [reason, number of tests skipped for it]


def kernels_required():
    """Whether MIND_DIFFUSION_REQUIRE_KERNELS asks for every kernel test to run (1/true/yes/on; default off)."""
    value = os.environ.get(REQUIRE_KERNELS, "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise pytest.UsageError(f"{REQUIRE_KERNELS}={value!r} is neither on (1/true/yes/on) nor off "
                            f"(0/false/no/off or unset); set it to 1 to make unavailable C++ kernels fail the run")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel(module): the test exercises the C++ kernel of `module` "
                                       "(see tests/conftest.py)")
    kernels_required()  # a bad value stops the run before any test
    # Every skip is listed with its reason at the end of a run, even under -q (as -rs would ask).
    if not any(c in config.option.reportchars for c in "sSaA"):
        config.option.reportchars += "s"


@pytest.fixture(autouse=True)
def _kernel_gate(request, monkeypatch):
    """For a test marked ``kernel(module)``: that kernel on, or the test skipped (failed under REQUIRE)."""
    marker = request.node.get_closest_marker("kernel")
    if marker is None:
        return
    (module,) = marker.args
    monkeypatch.setenv(module.ENV_SWITCH, "1")
    available, reason = module.status()
    if available:
        return
    if kernels_required():
        pytest.fail(f"{REQUIRE_KERNELS} is set but the C++ kernel of {module.__name__} is unavailable: {reason}",
                    pytrace=False)
    _unavailable.setdefault(module.__name__, [reason, 0])[1] += 1
    pytest.skip(f"C++ kernel of {module.__name__} unavailable here: {reason}")


def pytest_terminal_summary(terminalreporter):
    """Kernel skips are listed even under -q: a run that skipped them must say so."""
    if not _unavailable:
        return
    terminalreporter.write_sep("=", "C++ kernels unavailable: their tests were SKIPPED", yellow=True)
    for name, (reason, count) in sorted(_unavailable.items()):
        terminalreporter.write_line(f"{name}: {count} test(s) skipped ({reason})")
    terminalreporter.write_line(f"Set {REQUIRE_KERNELS}=1 (as .ci/run does) to make this a failure.")


def load_fixture(name):
    """(config, arrays, PyTorch state dict) of the guided-diffusion fixture ``name``.npz / ``name``.pt

    (see tests/fixtures/README.md).
    """
    from mind_diffusion.convert import load_torch_state_dict

    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    config = json.loads(str(arrays.pop("config")))
    return config, arrays, load_torch_state_dict(os.path.join(FIXTURES, f"{name}.pt"))


@pytest.fixture(scope="session")
def ref():
    """improved-diffusion reference outputs (see tests/fixtures/README.md)."""
    with np.load(os.path.join(FIXTURES, "improved_diffusion_reference.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def bench_script(monkeypatch):
    """``bench_script(name)``: the module of ``bench/<name>.py``, imported as the bench scripts import their
    siblings (by name, with ``bench/`` on the path for this test only)."""
    import importlib
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    return importlib.import_module
