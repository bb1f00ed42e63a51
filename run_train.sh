#!/usr/bin/env bash
# Train a diffusion model: bash run_train.sh [N] [config.yaml] [key=value ... | --resume [PATH] | --run-dir DIR]
#   N        number of data-parallel workers (default 1); N > 1 launches them with msrun.
#   config   a recipe in configs/ (default: configs/demo.yaml; with no arguments at all, a short demo run).
#   key=value overrides, e.g. train.lr=1e-4 (same as --set key=value).
# Multi-node Ascend clusters: set MASTER_ADDR, MASTER_PORT, NODE_RANK and LOCAL_WORKER_NUM
# (workers on this node; N is the total) on every node and run the same command there.
set -euo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  echo
  source scripts/env.sh
  exec "$PY" mind_diffusion/cli/train.py --help
fi

args=("$@")
workers=1
if [[ ${#args[@]} -gt 0 && "${args[0]}" =~ ^[0-9]+$ ]]; then workers=${args[0]}; args=("${args[@]:1}"); fi
config=configs/demo.yaml
if [[ ${#args[@]} -gt 0 && "${args[0]}" != -* && "${args[0]}" != *=* ]]; then config=${args[0]}; args=("${args[@]:1}"); fi
extra=()
if [[ $# -eq 0 ]]; then
  # The built-in default: a few minutes of the demo recipe on CPU, ending with a sample grid.
  extra=(--set train.total_steps=200 --set train.batch_size=32 --set train.log_every=25
         --set train.save_every=200 --set train.sample_every=0 --run-dir runs/demo_quick)
fi
for a in "${args[@]+"${args[@]}"}"; do
  if [[ "$a" == *=* && "$a" != -* ]]; then extra+=(--set "$a"); else extra+=("$a"); fi
done

source scripts/env.sh
# msrun starts its workers with `python` from PATH: make it ours.
export PATH="$(dirname "$PY"):$PATH"

if [[ "$workers" -le 1 ]]; then
  exec "$PY" mind_diffusion/cli/train.py --config "$config" "${extra[@]+"${extra[@]}"}"
fi
log_dir=${LOG_DIR:-runs/msrun_logs}
mkdir -p "$log_dir"
echo "[mind_diffusion] $workers workers via msrun; per-rank logs in $log_dir/worker_<rank>.log" >&2
exec "$(dirname "$PY")/msrun" --worker_num="$workers" --local_worker_num="${LOCAL_WORKER_NUM:-$workers}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}" --node_rank="${NODE_RANK:-0}" \
  --log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" \
  mind_diffusion/cli/train.py --config "$config" "${extra[@]+"${extra[@]}"}"
