"""Packaging: pyproject.toml installs the project (``pip install -e .``), scripts/env.sh does it for the project's
own .venv and uses PYTHONPATH for any other Python, and no code edits ``sys.path`` to find the project."""
import ast
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("mind_diffusion", "models", "bench", "scripts", "tests")
# Scripts there run in a side environment with torch and put the ORIGINAL code's checkout (a path the user gives)
# on sys.path; they never look for this project that way.
NOT_SCANNED = (os.path.join("tests", "fixtures"),)


def python_files():
    for top in SCANNED:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"
                       and os.path.relpath(os.path.join(folder, d), ROOT) not in NOT_SCANNED]
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def sys_path_uses(path):
    """Line numbers where ``sys.path`` is touched (read or written) in the file at ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def test_no_code_edits_sys_path():
    found = {os.path.relpath(path, ROOT): lines for path in python_files() if (lines := sys_path_uses(path))}
    assert not found, ("sys.path is touched at (file: lines) " + ", ".join(f"{k}: {v}" for k, v in found.items())
                       + "; the project is installed (pip install -e .) or on PYTHONPATH (scripts/env.sh)")


def test_the_scan_sees_a_sys_path_edit(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os, sys\nx = 1\nsys.path.insert(0, os.getcwd())\n")
    assert sys_path_uses(str(sample)) == [3]


def run_from_elsewhere(tmp_path, *args):
    """``python *args`` from a folder outside the project, with the environment this test run has."""
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GLOG_v": "3"})


@pytest.mark.parametrize("command", [
    ("-m", "mind_diffusion.cli.train", "--help"),
    (os.path.join(ROOT, "mind_diffusion", "cli", "train.py"), "--help"),  # msrun starts files
    (os.path.join(ROOT, "mind_diffusion", "cli", "export.py"), "--help"),
    ("-m", "mind_diffusion.cli.export", "--help"),
    ("-m", "mind_diffusion.cli.encode_latents", "--help"),
])
def test_the_command_line_programs_start_from_any_folder(tmp_path, command):
    result = run_from_elsewhere(tmp_path, *command)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_both_packages_import_from_this_checkout(tmp_path):
    result = run_from_elsewhere(tmp_path, "-c", "import mind_diffusion.train.step, models.unet; "
                                                "print(mind_diffusion.__file__); print(models.__file__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [os.path.join(ROOT, "mind_diffusion", "__init__.py"),
                                     os.path.join(ROOT, "models", "__init__.py")]


# ---------------------------------------------------------------------------
# scripts/env.sh on a copy of the project whose .venv python is a fake that logs its calls
# ---------------------------------------------------------------------------

def make_project_copy(tmp_path):
    """A project folder with the real env.sh, requirements.txt and pyproject.toml; its .venv/bin/python logs
    every call and answers pip calls itself (exit 0); python3 on PATH has no MindSpore (so env.sh picks .venv)."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    for name in ("scripts/env.sh", "requirements.txt", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), project / name)
    log = tmp_path / "calls.log"
    venv_python = project / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n'
                           f'case "$1" in -m) [ "$2" = pip ] && exit 0 ;; esac\nexec {shlex.quote(sys.executable)} "$@"\n')
    venv_python.chmod(0o755)
    bare = tmp_path / "bin" / "python3"
    bare.parent.mkdir()
    bare.write_text("#!/bin/sh\nexit 1\n")  # a python without MindSpore (nor anything else)
    bare.chmod(0o755)
    return project, log, venv_python


def source(project, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "PYTHONPATH")}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    return subprocess.run(["bash", "-c", f"source {shlex.quote(str(project / 'scripts' / 'env.sh'))} "
                                         '&& echo "PY=$PY" && echo "PYTHONPATH=${PYTHONPATH:-}"'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_env_installs_the_project_editable_into_its_venv_once(tmp_path):
    project, log, venv_python = make_project_copy(tmp_path)
    result = source(project, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"PY={venv_python}", "PYTHONPATH="]  # the installed package, not a path
    calls = log.read_text().splitlines()
    assert f"-m pip install --quiet --disable-pip-version-check -r {project}/requirements.txt setuptools>=64" in calls
    # offline: setuptools from the venv (no build isolation), requirements already there (no resolution)
    assert (f"-m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e {project}"
            in calls)

    log.write_text("")
    assert source(project, tmp_path).returncode == 0
    assert "pip" not in log.read_text(), "installed again although nothing changed"

    with open(project / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    assert source(project, tmp_path).returncode == 0
    assert f"--no-deps -e {project}" in log.read_text(), "pyproject.toml changed: the project must be reinstalled"


def test_env_puts_the_project_on_pythonpath_for_any_other_python(tmp_path):
    project, log, _ = make_project_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(["bash", "-c", f"source {shlex.quote(str(project / 'scripts' / 'env.sh'))} "
                                           '&& echo "PYTHONPATH=$PYTHONPATH"'],
                            cwd=tmp_path, env={**env, "PY": sys.executable}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"PYTHONPATH={project}", result.stderr
    assert not log.exists(), "a Python that is not the project's .venv must not be pip-installed into"
