"""What a path the user typed means: the user's current directory, with the project's shipped files as a fallback.

One rule for every entry point (``run_train.sh``, ``run_infer.sh``, the Python
CLIs) and every path-valued recipe key:

- A relative path is relative to the directory the user runs the command in,
  never to the repository. Outputs (``--out``, ``--run-dir``,
  ``train.out_dir``) are written there; inputs (``--ckpt``, ``--config``,
  ``--low-res``, ``data.path``, ``train.init_from``) are read from there.
- An input that does not exist there, and names a file that ships with the
  project (under ``configs/`` or ``checkpoints/``), is read from the project.
  So ``bash /path/to/run_train.sh`` finds ``configs/demo.yaml`` and that
  recipe's ``train.init_from: checkpoints/demo_eps.ckpt`` from any directory,
  while a file of the same name in the user's directory wins.
"""
import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_FOLDERS = ("configs", "checkpoints")


def output_path(path):
    """Absolute form of an output path: relative to the current directory, ``~`` expanded."""
    return os.path.abspath(os.path.expanduser(path))


def shipped_path(path):
    """The project's own copy of ``path`` when it names an existing file under configs/ or checkpoints/, else None."""
    if os.path.isabs(path):
        return None
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 2 or parts[0] not in SHIPPED_FOLDERS:
        return None
    candidate = os.path.join(PROJECT_ROOT, *parts)
    return candidate if os.path.exists(candidate) else None


def input_path(path):
    """Absolute path of an input the user named (see the module's rule).

    The user's own file wins; a missing one falls back to the project's shipped
    copy, and otherwise stays the path under the current directory, so that the
    caller's "not found" message names the place the user meant.
    """
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded) or os.path.exists(expanded):
        return os.path.abspath(expanded)
    return shipped_path(expanded) or os.path.abspath(expanded)
