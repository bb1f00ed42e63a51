"""The kernel gate of tests/conftest.py: MIND_DIFFUSION_REQUIRE_KERNELS turns a missing C++ kernel
from a listed skip into a failure, and a marked test always runs with its kernel switched on.

The end-to-end cases run pytest in a subprocess on one kernel test and one fallback test of
tests/test_kernel_dropout.py with no compiler on PATH and an empty kernel cache, so the
counter-based dropout kernel cannot be built.
"""
import os
import re
import subprocess
import sys

import pytest

from mind_diffusion.kernels import dropout
from tests.conftest import REQUIRE_KERNELS, ROOT, kernels_required

NEEDS_KERNEL = "tests/test_kernel_dropout.py::test_masks_differ_between_counters_and_repeat_for_the_same_one"
NO_KERNEL = "tests/test_kernel_dropout.py::test_op_once_makes_each_operator_once_and_warns_once_when_refused"
NO_COMPILER = "no C++ compiler (g++) on PATH"


def pytest_without_compiler(tmp_path, require):
    """(exit code, output) of pytest on NEEDS_KERNEL and NO_KERNEL where no kernel can be built."""
    (tmp_path / "bin").mkdir()
    env = dict(os.environ, PATH=str(tmp_path / "bin"), MIND_DIFFUSION_CACHE=str(tmp_path / "cache"))
    env.pop(dropout.ENV_SWITCH, None)
    env.pop(REQUIRE_KERNELS, None)
    if require is not None:
        env[REQUIRE_KERNELS] = require
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", NEEDS_KERNEL, NO_KERNEL], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return result.returncode, result.stdout


def outcomes(output):
    """{"passed": n, "error": n, ...} from pytest's last line."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|warnings?)", output)}


def test_required_kernel_unavailable_fails_the_run(tmp_path):
    code, output = pytest_without_compiler(tmp_path, "1")
    assert code == 1, output
    assert outcomes(output.splitlines()[-1]) == {"passed": 1, "error": 1, "warning": 1}, output
    assert (f"{REQUIRE_KERNELS} is set but the C++ kernel of mind_diffusion.kernels.dropout is unavailable: "
            f"{NO_COMPILER}") in output, output


def test_unavailable_kernel_skips_with_the_reason_listed(tmp_path):
    code, output = pytest_without_compiler(tmp_path, None)
    assert code == 0, output
    assert outcomes(output.splitlines()[-1]) == {"passed": 1, "skipped": 1, "warning": 1}, output
    assert "C++ kernels unavailable: their tests were SKIPPED" in output, output
    assert f"mind_diffusion.kernels.dropout: 1 test(s) skipped ({NO_COMPILER})" in output, output


@pytest.mark.parametrize("value,required", [("1", True), ("on", True), ("TRUE", True), ("yes", True),
                                            ("", False), ("0", False), ("off", False), ("no", False)])
def test_require_values(monkeypatch, value, required):
    monkeypatch.setenv(REQUIRE_KERNELS, value)
    assert kernels_required() is required


def test_require_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(REQUIRE_KERNELS, "maybe")
    with pytest.raises(pytest.UsageError, match=f"{REQUIRE_KERNELS}='maybe' is neither on"):
        kernels_required()


@pytest.mark.kernel(dropout)
def test_marked_test_runs_with_its_kernel_on_whatever_the_environment_says():
    """A deliberate MIND_DIFFUSION_FAST_DROPOUT=0 chooses nn.Dropout for the library, not for the kernel's tests."""
    assert os.environ[dropout.ENV_SWITCH] == "1" and dropout.status()[0]
