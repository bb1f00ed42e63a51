#!/usr/bin/env bash
# The project's test command: pytest on the CPU backend in GRAPH_MODE.
# Usage: bash run_tests.sh [pytest args...]   (default: the whole tests/ folder)
# Runs in the repository root, so test paths are the repository's (tests/test_x.py). pytest is needed
# only here: it is installed into the project's .venv when missing there; any other Python
# (a cluster image's, an activated environment) is left as it is, with the command to run.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
if ! "$PY" -c 'import pytest' >/dev/null 2>&1; then
  if [ "$("$PY" -c 'import sys; print(sys.prefix)')" = "$(pwd)/.venv" ]; then  # the venv env.sh made
    pin="$(sed -n 's/^pytest==/pytest==/p' requirements.txt)"
    echo "[mind_diffusion] installing ${pin:-pytest} into .venv for the tests" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "${pin:-pytest}"
  else
    echo "error: pytest is not installed for $PY; install it there: $PY -m pip install pytest" >&2
    exit 2
  fi
fi
[ $# -gt 0 ] || set -- tests
# Two test processes by default (pytest-xdist, a file per process at a time, so a file's shared compiled
# graphs stay shared): compiling graphs, most of the suite's time, uses one core. MIND_DIFFUSION_TEST_WORKERS=1
# runs in one process; without pytest-xdist (a Python this script did not set up) the run is serial too.
workers="${MIND_DIFFUSION_TEST_WORKERS:-2}"
if [ "$workers" -gt 1 ] && "$PY" -c 'import xdist' >/dev/null 2>&1; then
  set -- -n "$workers" --dist loadfile "$@"
fi
exec "$PY" -m pytest -q "$@"
