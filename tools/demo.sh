#!/usr/bin/env bash
# `make demo`: mgpu on a rehearsal server, no GPU needed. Every step uses a shipped scenario
# (examples/scenarios/), the same way a user rehearses before touching the real machine.
#   bash tools/demo.sh [PYTHON [TRAINER ARGS...]]
# TRAINER ARGS go to the last step's training runs (`make demo DEMO_TRAIN_ARGS="--max-steps 20"`: a
# quicker look; the README's test uses it to run `make demo` in seconds).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${1:-${PYTHON:-python3}}
TRAIN_ARGS=("${@:2}")
# shellcheck source=lib/log.sh
source "$ROOT/lib/log.sh"
# shellcheck source=lib/gpu.sh
source "$ROOT/lib/gpu.sh"

step() {
  if [[ -t 1 ]]; then printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; else printf '\n== %s\n$ %s\n' "$1" "$2"; fi
}

# check_gpus.py exits 1 when it finds problems: in a demo that is the point, not a failure.
check() {
  local rc=0
  "$PYTHON" check_gpus.py "$@" || rc=$?
  ((rc <= 1)) || die "check_gpus.py exited $rc"
}

main() {
  cd "$ROOT"
  local idle=examples/scenarios/4x-rtx4090-idle.json busy=examples/scenarios/4x-rtx4090-gpu2-busy.json

  step "A server with 4 idle RTX 4090s" "MGPU_FAKE_GPUS=$idle python check_gpus.py"
  MGPU_FAKE_GPUS=$idle check

  step "Someone else's job holds GPU 2, and you chose GPUs 2,3; can 15 GiB models run there?" \
    "MGPU_FAKE_GPUS=$busy CUDA_VISIBLE_DEVICES=2,3 python check_gpus.py --plan 15"
  MGPU_FAKE_GPUS=$busy CUDA_VISIBLE_DEVICES=2,3 check --plan 15

  step "The same server, as the shell launchers see it (lib/gpu.sh)" \
    "source lib/gpu.sh; gpu::query; gpu::is_free 2"
  export MGPU_FAKE_GPUS=$busy MGPU_UTIL_WINDOW_MS=200
  gpu::query
  local index
  for index in $(gpu::indices); do
    if gpu::is_free "$index"; then
      echo "GPU $index: free"
    else
      echo "GPU $index: busy: $GPU_REASON"
    fi
  done

  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-demo.XXXXXX")
  export MGPU_LOCK_DIR=$work/locks MGPU_UTIL_SAMPLES=1 MGPU_POLL_MS=500
  step "The sweep set at the top of run_train_clip.sh (3 image x 2 text encoders on GPUs 0-3), planned but not launched" \
    "bash run_train_clip.sh --dry-run"
  PYTHON=$PYTHON bash run_train_clip.sh --dry-run --log-dir "$work/logs" --ckpt-dir "$work/ckpt"

  step "Eight 1-second jobs through gpu_queue.sh: GPU 2 stays busy, so the jobs flow to 0, 1 and 3" \
    "bash gpu_queue.sh --gpus 0,1,2,3 --max-wait 2 jobs.txt"
  local i
  for i in 1 2 3 4 5 6 7 8; do echo "sleep 1; echo job $i ran on GPU \$CUDA_VISIBLE_DEVICES"; done >"$work/jobs.txt"
  bash gpu_queue.sh --gpus 0,1,2,3 --max-wait 2 --log-dir "$work/logs" "$work/jobs.txt" || true
  step "Real CLIP training, two small configs on GPUs 0 and 1 (the scenario's; here the CPU does the work, ~3 min)" \
    "bash run_train_clip.sh --preset demo --gpus 0,1"
  # The training is the demo's one real result: its failure is make demo's.
  local rc=0
  MGPU_FAKE_GPUS=examples/scenarios/4x-rtx4090-idle.json PYTHON=$PYTHON \
    bash run_train_clip.sh --preset demo --gpus 0,1 --log-dir "$work/logs" --ckpt-dir "$work/ckpt" -- --no-tb "${TRAIN_ARGS[@]}" || rc=$?
  printf '\nLogs and summaries of this demo: %s; checkpoints and metrics.json: %s\n' "$work/logs" "$work/ckpt"
  return "$rc"
}

main "$@"
