#!/usr/bin/env bash
# Sample a PNG grid: bash run_infer.sh "prompt" [--scale S --steps K --sampler ddpm|ddim --n N --seed S
#                                              --ckpt PATH --out DIR --label L]
# Prints the path of the grid. See --help for every option.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec "$PY" mind_diffusion/cli/infer.py "$@"
