# Sourced by the launchers: finds the Python to run with and exports it as $PY, with the project importable.
#
#   1. $PY when the caller set it.
#   2. The current python3 (or python) when the RUNTIME packages import there
#      (mindspore, numpy, yaml, tqdm, PIL, scipy): a cluster image's or an
#      activated environment's MindSpore, which matches its CANN, is used as it is.
#      pytest is not needed to train or sample (run_tests.sh sees to it).
#   3. When that python has MindSpore but lacks another runtime package: stop and
#      say which, rather than build a second MindSpore beside the installed one.
#   4. Otherwise the project's own .venv, made once from requirements.txt.
#
# The project's own .venv gets the project installed in editable mode (pip install -e ., offline: no
# build isolation, no dependency resolution), again whenever requirements.txt, pyproject.toml or the
# project's folder change. Any other Python is left untouched: the project is put on its PYTHONPATH.
# Nothing here changes the current directory: relative paths stay the user's.
_md_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_md_venv="$_md_root/.venv"
_md_stamp="$_md_venv/.install.sha"
_md_runtime='import mindspore, numpy, yaml, tqdm, PIL, scipy'

_md_pinned() {  # the version requirements.txt pins for package $1
  sed -n "s/^$1==\(.*\)$/\1/p" "$_md_root/requirements.txt"
}

_md_missing() {  # runtime packages interpreter $1 cannot import, space-separated (pip names)
  "$1" - <<'PYEOF' 2>/dev/null
import importlib
pip_names = {"mindspore": "mindspore", "numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow",
             "scipy": "scipy"}
missing = []
for module, pip in pip_names.items():
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absent or broken: either way not usable
        missing.append(pip)
print(" ".join(missing))
PYEOF
}

_md_install_digest() {  # what the .venv's installation was made from: the two files and where the project is
  { cat "$_md_root/requirements.txt" "$_md_root/pyproject.toml"; echo "$_md_root"; } | sha1sum | cut -d' ' -f1
}

_md_setup_venv() {  # create .venv if needed, install requirements.txt and the project (editable) into it
  local python="$_md_venv/bin/python" pip_quiet=(--quiet --disable-pip-version-check)
  echo "[mind_diffusion] setting up $_md_venv: requirements.txt and the project (editable; once, a few minutes)" >&2
  if [ ! -x "$python" ]; then
    python3 -m venv "$_md_venv" || { echo "error: python3 -m venv failed; install python3-venv" >&2; return 1; }
  fi
  # setuptools builds the editable install here, without build isolation (which would download it).
  "$python" -m pip install "${pip_quiet[@]}" -r "$_md_root/requirements.txt" "setuptools>=64" \
    || { echo "error: pip install -r requirements.txt failed" >&2; return 1; }
  "$python" -m pip install "${pip_quiet[@]}" --no-build-isolation --no-deps -e "$_md_root" \
    || { echo "error: pip install -e $_md_root failed" >&2; return 1; }
  _md_install_digest > "$_md_stamp"
}

if [ -z "${PY:-}" ]; then
  _md_current="$(command -v python3 || command -v python || true)"
  if [ -n "$_md_current" ] \
     && _md_version="$("$_md_current" -c "$_md_runtime; print(mindspore.__version__)" 2>/dev/null)"; then
    PY="$_md_current"
    if [ "$_md_version" != "$(_md_pinned mindspore)" ]; then
      echo "[mind_diffusion] using $PY with its MindSpore $_md_version (the project is tested with" \
           "$(_md_pinned mindspore))" >&2
    fi
  elif [ -n "$_md_current" ] && "$_md_current" -c 'import mindspore' >/dev/null 2>&1; then
    _md_lacks="$(_md_missing "$_md_current")"
    echo "error: $_md_current has MindSpore but lacks: $_md_lacks." >&2
    echo "       Install them for that python ($_md_current -m pip install $_md_lacks)," >&2
    echo "       or set PY=/path/to/python. (No venv is built: it would install a second MindSpore" >&2
    echo "       that may not match this machine's CANN.)" >&2
    return 1
  else
    PY="$_md_venv/bin/python"
  fi
fi
if [ "$PY" = "$_md_venv/bin/python" ]; then
  if [ ! -x "$PY" ] || [ "$(cat "$_md_stamp" 2>/dev/null)" != "$(_md_install_digest)" ]; then
    _md_setup_venv || return 1
  fi
else
  export PYTHONPATH="$_md_root${PYTHONPATH:+:$PYTHONPATH}"
fi
export PY
# MindSpore prints framework warnings at level 2 by default; keep the console readable.
export GLOG_v="${GLOG_v:-3}"
