#!/usr/bin/env bash
# The project's test command: pytest on the CPU backend in GRAPH_MODE.
# Usage: bash run_tests.sh [pytest args...]   (default: the whole tests/ folder)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
[ $# -gt 0 ] || set -- tests
exec "$PY" -m pytest -q "$@"
