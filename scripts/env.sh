# Sourced by the launchers: finds the Python to run with and exports it as $PY.
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
# Nothing here changes the current directory: relative paths stay the user's.
_md_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_md_venv="$_md_root/.venv"
_md_stamp="$_md_venv/.requirements.sha"
_md_runtime='import mindspore, numpy, yaml, tqdm, PIL, scipy'

_md_pinned() {  # the version requirements.txt pins for package $1
  sed -n "s/^$1==\(.*\)$/\1/p" "$_md_root/requirements.txt"
}

_md_missing() {  # runtime packages interpreter $1 cannot import, space-separated (pip names)
  "$1" - <<'EOF' 2>/dev/null
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
EOF
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
    _md_want="$(sha1sum "$_md_root/requirements.txt" | cut -d' ' -f1)"
    if [ ! -x "$_md_venv/bin/python" ] || [ "$(cat "$_md_stamp" 2>/dev/null)" != "$_md_want" ]; then
      echo "[mind_diffusion] setting up $_md_venv with requirements.txt (once; a few minutes)" >&2
      python3 -m venv "$_md_venv" || { echo "error: python3 -m venv failed; install python3-venv" >&2; return 1; }
      "$_md_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$_md_root/requirements.txt" || { echo "error: pip install -r requirements.txt failed" >&2; return 1; }
      echo "$_md_want" > "$_md_stamp"
    fi
    PY="$_md_venv/bin/python"
  fi
fi
export PY
export PYTHONPATH="$_md_root${PYTHONPATH:+:$PYTHONPATH}"
# MindSpore prints framework warnings at level 2 by default; keep the console readable.
export GLOG_v="${GLOG_v:-3}"
