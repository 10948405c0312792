#!/usr/bin/env bash
# bench/ddp.sh — DDP scaling on this machine: samples/s and step time of the trainer in 1 process against
# N processes (train_torchrun.sh) at the same global batch. Prints the figures and the commands; asserts
# nothing. On a CPU-only machine the processes share the cores (gloo), so expect no speed-up there; on a
# GPU server run it with CUDA_VISIBLE_DEVICES set.
#   bash bench/ddp.sh [NPROC (2)] [STEPS (30)] [GLOBAL_BATCH (32)]
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NPROC=${1:-2} STEPS=${2:-30} BATCH=${3:-32}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bench-ddp.XXXXXX")
trap 'rm -rf "$work"' EXIT
common=(--image-encoder starnet_s050 --text-encoder clip:tiny --embed-dim 128 --image-size 32
  --train-size $((BATCH * STEPS)) --val-size "$BATCH" --max-steps "$STEPS" --workers 0 --no-tb --lr-scale none)

report() { # LABEL DIR
  jq -r --arg name "$1" '"\($name): \(.samples_per_second | floor) samples/s, \(1000 * .global_batch / .samples_per_second | floor) ms a step (global batch \(.global_batch), world size \(.world_size))"' "$2/metrics.json"
}

one=(env PYTHONPATH="$ROOT/py" "$PYTHON" -m mgpu.train_clip "${common[@]}" --batch-size "$BATCH" --output-dir "$work/one")
many=(env NPROC_PER_NODE="$NPROC" bash "$ROOT/train_torchrun.sh" "${common[@]}" --batch-size $((BATCH / NPROC)) --output-dir "$work/many")
printf '$ %s\n' "${one[*]}" "${many[*]}"
"${one[@]}" >"$work/one.log" 2>&1 || { cat "$work/one.log"; exit 1; }
"${many[@]}" >"$work/many.log" 2>&1 || { cat "$work/many.log"; exit 1; }
report "1 process   " "$work/one"
report "$NPROC processes " "$work/many"
jq -rn --slurpfile a "$work/one/metrics.json" --slurpfile b "$work/many/metrics.json" \
  '"speed-up: \($b[0].samples_per_second / $a[0].samples_per_second * 1000 | floor / 1000)x"'
