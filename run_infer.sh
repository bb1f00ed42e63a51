#!/usr/bin/env bash
# Sample a PNG grid: bash run_infer.sh "prompt" [--scale S --steps K --sampler ddpm|ddim --n N --seed S
#                                              --ckpt PATH --out DIR --label L --device-id I]
# Prints which checkpoint it uses and why, then the path of the grid. See --help for every option.
# Paths are the current directory's: run it from anywhere (checkpoints/... also finds the shipped files).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/env.sh"
exec "$PY" "$ROOT/mind_diffusion/cli/infer.py" "$@"
