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

A recipe's input that a trained model needs again at sampling time (a text
tokenizer's ``model.vocab``) is recorded in the run's config, and so in its
checkpoints, as a shipped file's project-relative name when it is one
(:func:`portable_path`), so that a checkpoint trained on one machine samples on
another; :func:`recorded_path` reads it back.
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


def portable_path(path):
    """``path`` as recorded in a run's config: a file shipped under configs/ or checkpoints/ by its
    project-relative name (e.g. ``configs/demo_vocab.txt``), any other path unchanged."""
    relative = os.path.relpath(os.path.abspath(path), PROJECT_ROOT)
    shipped = shipped_path(relative)
    return relative if shipped and os.path.samefile(shipped, path) else path


def recorded_path(path):
    """The file a recorded path names: a project-relative shipped name is the project's own file, whatever
    the current directory holds; any other path is the user's, as :func:`input_path` reads it."""
    return shipped_path(path) or input_path(path)
