# Sourced by the launchers: makes sure a Python with the pinned packages is at
# hand and exports it as $PY. Uses the current interpreter when MindSpore is
# already importable (e.g. a cluster image), else a project-local .venv.
_md_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_md_venv="$_md_root/.venv"
_md_stamp="$_md_venv/.requirements.sha"
_md_want="$(sha1sum "$_md_root/requirements.txt" | cut -d' ' -f1)"

if [ -z "${PY:-}" ]; then
  if python3 -c 'import mindspore, yaml, tqdm, PIL, scipy, pytest' >/dev/null 2>&1; then
    PY="$(command -v python3)"
  else
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
