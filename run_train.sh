#!/usr/bin/env bash
# Train a diffusion model: bash run_train.sh [N] [config.yaml] [key=value ... | --resume [PATH] | --run-dir DIR]
#   N          data-parallel workers in all (default 1); N > 1 starts them with msrun.
#   config     a recipe (default: configs/demo.yaml; with no arguments at all, a short demo run
#              into runs/demo_quick (then _2, _3, ...) that fine-tunes checkpoints/demo_eps.ckpt for 200 steps).
#   key=value  overrides, e.g. train.lr=1e-4 (same as --set key=value).
#   --dry-run  print the command and the environment it would get, and run nothing.
# Paths are the current directory's: run it from anywhere. A relative config, --run-dir, --resume
# PATH, data.path, train.out_dir or train.init_from is relative to where you are; configs/... and
# checkpoints/... also find the files that ship with the project.
#
# Environment for several workers (one node: only N; see docs/ASCEND.md):
#   LOCAL_WORKER_NUM   workers on this node (default: N, i.e. one node). Several nodes: the same
#                      command on every node, with LOCAL_WORKER_NUM and MASTER_ADDR set.
#   MASTER_ADDR        address of the node that runs msrun's scheduler (default 127.0.0.1).
#   MASTER_PORT        its port (default 8118).
#   NODE_RANK          this node's index from 0; unset (the default), msrun numbers the workers.
#   LOG_DIR            per-worker logs (default runs/msrun_logs).
#   CLUSTER_TIME_OUT   seconds msrun waits for every worker to join (default 600).
#   BIND_CORE          true|false: pin each worker to its own CPU cores (default: true on Ascend).
#   ASCEND_RT_VISIBLE_DEVICES  NPUs this node may use, e.g. 4,5,6,7; worker i takes the i-th.
#   HCCL_CONNECT_TIMEOUT  seconds ranks wait for each other to connect (default here 1200; HCCL: 120).
#   HCCL_EXEC_TIMEOUT     seconds a collective waits for a late rank (default here 3600; HCCL: 1836;
#                         a 910A rounds it down to a multiple of 68 s).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRAIN="$ROOT/mind_diffusion/cli/train.py"

fail() { echo "run_train.sh: error: $*" >&2; exit 2; }

args=()
dry_run=0
for a in "$@"; do
  case "$a" in
    --dry-run) dry_run=1 ;;
    -h|--help)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      echo
      source "$ROOT/scripts/env.sh"
      exec "$PY" "$TRAIN" --help ;;
    *) args+=("$a") ;;
  esac
done

workers=1
if [[ ${#args[@]} -gt 0 && "${args[0]}" =~ ^[0-9]+$ ]]; then workers=${args[0]}; args=("${args[@]:1}"); fi
[[ "$workers" -ge 1 ]] || fail "N (the number of workers) must be at least 1, got $workers"
config=configs/demo.yaml
if [[ ${#args[@]} -gt 0 && "${args[0]}" != -* && "${args[0]}" != *=* ]]; then config=${args[0]}; args=("${args[@]:1}"); fi
extra=()
if [[ $# -eq $dry_run ]]; then
  # No arguments: a few minutes of the demo recipe on CPU, ending with a sample grid. Each such run gets a
  # folder of its own (runs/demo_quick, runs/demo_quick_2, ...): an earlier one is never mixed or replaced.
  quick=runs/demo_quick; n=2
  while [[ -e "$quick" ]]; do quick=runs/demo_quick_$n; n=$((n + 1)); done
  extra=(--set train.total_steps=200 --set train.batch_size=32 --set train.log_every=25
         --set train.save_every=200 --set train.sample_every=0 --run-dir "$quick")
fi
previous=""
for a in "${args[@]+"${args[@]}"}"; do
  # A bare key=value is an override; the value of an option (--set key=value, --run-dir a=b) is kept as given.
  case "$previous" in
    --set|--config|--run-dir|--resume|--device) extra+=("$a") ;;
    *) if [[ "$a" == *=* && "$a" != -* ]]; then extra+=(--set "$a"); else extra+=("$a"); fi ;;
  esac
  previous="$a"
done

# Collective timeouts: the user's values win. Rank 0 alone writes checkpoints and sample grids while
# the other ranks wait in the next all-reduce, and the first step compiles on every rank at its own
# pace; HCCL's own defaults (120 s to connect) are too short for large recipes. See docs/ASCEND.md.
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-3600}"

source "$ROOT/scripts/env.sh"
command=("$PY" "$TRAIN" --config "$config" "${extra[@]+"${extra[@]}"}")

if [[ "$workers" -gt 1 ]]; then
  local_workers=${LOCAL_WORKER_NUM:-$workers}
  [[ "$local_workers" =~ ^[0-9]+$ && "$local_workers" -ge 1 && "$local_workers" -le "$workers" ]] \
    || fail "LOCAL_WORKER_NUM=$local_workers must be a whole number from 1 to N=$workers"
  if [[ "$local_workers" -lt "$workers" && -z "${MASTER_ADDR:-}" ]]; then
    fail "$local_workers of $workers workers on this node means several nodes: set MASTER_ADDR to the" \
         "address of the node that runs the scheduler, the same on every node (docs/ASCEND.md)"
  fi
  if [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
    [[ "$ASCEND_RT_VISIBLE_DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]] \
      || fail "ASCEND_RT_VISIBLE_DEVICES=$ASCEND_RT_VISIBLE_DEVICES must list device ids, e.g. 0,1,2,3"
    IFS=, read -r -a visible <<< "$ASCEND_RT_VISIBLE_DEVICES"
    [[ ${#visible[@]} -ge "$local_workers" ]] \
      || fail "$local_workers workers on this node but ASCEND_RT_VISIBLE_DEVICES lists ${#visible[@]} devices"
  fi
  msrun=(--worker_num="$workers" --local_worker_num="$local_workers"
         --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}")
  if [[ -n "${NODE_RANK:-}" ]]; then
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || fail "NODE_RANK=$NODE_RANK must be a whole number from 0"
    msrun+=(--node_rank="$NODE_RANK")
  fi
  bind_core=${BIND_CORE:-auto}
  if [[ "$bind_core" == auto ]]; then
    bind_core=false
    compgen -G "/dev/davinci[0-9]*" >/dev/null && bind_core=true
  fi
  case "${bind_core,,}" in
    true) msrun+=(--bind_core=True) ;;
    false) ;;
    *) fail "BIND_CORE=$bind_core must be true, false or auto" ;;
  esac
  log_dir=${LOG_DIR:-runs/msrun_logs}
  msrun+=(--log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}")
  # msrun starts every worker as `python <script>` from PATH: make that name this $PY.
  shim="$log_dir/.python"
  command=("$PY" -m mindspore.parallel.cluster.run "${msrun[@]}" "$TRAIN" "${command[@]:2}")
fi

if [[ "$dry_run" -eq 1 ]]; then
  echo "HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT=$HCCL_EXEC_TIMEOUT" \
       "ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-}"
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if [[ "$workers" -gt 1 ]]; then
  mkdir -p "$shim"
  printf '#!/bin/sh\nexec %q "$@"\n' "$PY" > "$shim/python"
  chmod +x "$shim/python"
  export PATH="$(cd "$shim" && pwd):$PATH"
  echo "[mind_diffusion] $workers workers ($local_workers on this node) via msrun; per-rank logs in" \
       "$log_dir/worker_<rank>.log" >&2
fi
exec "${command[@]}"
