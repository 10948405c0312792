#!/usr/bin/env bash
# bench/infer.sh — data-parallel inference throughput: infer_parallel.sh with 1 and with 2 processes on
# the same checkpoint and data; samples/s (slowest shard) and wall time, and the ratio. Prints the
# commands and figures; asserts nothing. On a GPU server set GPUS instead of relying on --cpu-procs.
#   bash bench/infer.sh [SAMPLES (2048)] [BATCH (256)]
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SAMPLES=${1:-2048} BATCH=${2:-256}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHON
work=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bench-infer.XXXXXX")
trap 'rm -rf "$work"' EXIT
PYTHONPATH=$ROOT/py "$PYTHON" -m mgpu.train_clip --preset demo --max-steps 1 --train-size 64 --val-size "$SAMPLES" \
  --no-tb --output-dir "$work/ckpt" >/dev/null 2>&1
for procs in 1 2; do
  cmd=(bash "$ROOT/infer_parallel.sh" --checkpoint "$work/ckpt/model.pt" --out "$work/out$procs" --cpu-procs "$procs"
    --batch-size "$BATCH")
  printf '$ %s\n' "${cmd[*]}"
  start=$EPOCHREALTIME
  "${cmd[@]}" >"$work/log$procs" 2>&1 || { cat "$work/log$procs"; exit 1; }
  end=$EPOCHREALTIME
  jq -r --arg p "$procs" --arg begin "$start" --arg stop "$end" \
    '"\($p) process(es): \(.samples_per_second | floor) samples/s (slowest shard), \(($stop | tonumber) - ($begin | tonumber) | . * 10 | floor / 10) s wall in all (start-up, \(.samples) samples of starnet_s050 x clip:tiny, 32 px)"' \
    "$work/out$procs/metrics.json"
done
jq -rn --slurpfile a "$work/out1/metrics.json" --slurpfile b "$work/out2/metrics.json" \
  '"ratio 2/1: \($b[0].samples_per_second / $a[0].samples_per_second * 100 | floor / 100)x"'
