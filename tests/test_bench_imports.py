"""The bench scripts' imports from the project resolve: a renamed or moved function fails here,
not in a user's benchmark run (bench/train_throughput.py once imported a function that was gone)."""
import ast
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(glob.glob(os.path.join(ROOT, "bench", "*.py")))
PROJECT = ("mind_diffusion", "models")


def project_imports(path):
    """(module, name) for every ``from <project module> import name`` in the file, at any depth."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and node.module.split(".")[0] in PROJECT for alias in node.names]


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: os.path.basename(p))
def test_bench_imports_resolve(path):
    missing = []
    for module_name, name in project_imports(path):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{module_name}.{name}")
    assert missing == [], f"{os.path.basename(path)} imports what the project no longer has: {missing}"


def test_the_check_sees_a_missing_name(tmp_path):
    script = tmp_path / "stale_bench.py"
    script.write_text("def main():\n    from mind_diffusion.train.trainer import step_randomness\n")
    assert project_imports(str(script)) == [("mind_diffusion.train.trainer", "step_randomness")]
    with pytest.raises(AssertionError, match="step_randomness"):
        test_bench_imports_resolve(str(script))
