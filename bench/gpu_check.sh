#!/usr/bin/env bash
# bench/gpu_check.sh — every GPU path of mgpu on a real machine, in one command (under 8 minutes on one
# GPU): the GPU readers against the real driver, a sweep with a busy-GPU wait, trainer throughput and
# memory at a real size (bf16, fp16 with its GradScaler, --grad-checkpointing, --compile), inference
# against a CPU run, and with 2+ GPUs DDP over NCCL, --dp and scaling. Prints a table of what held and
# the figures; writes them as JSON to $OUT (when set) or --out DIR. --smoke runs the same steps with
# tiny sizes on the CPU against a scenario file, so the script cannot rot (CI runs it).
#   bash bench/gpu_check.sh [--smoke] [--out DIR] [--only STEP,...] [--budget SECONDS] [--keep] [--dry-run]
set -Eeuo pipefail

ROOT=$(readlink -f "${BASH_SOURCE[0]}") ROOT=${ROOT%/bench/*}
STEPS=(gpus sweep throughput infer resume multi_gpu)

usage() {
  cat <<USAGE
Usage: bash bench/gpu_check.sh [options]
  --smoke        the same steps with tiny sizes on the CPU, against a 2-GPU scenario file (no CUDA)
  --out DIR      where the figures go: DIR/gpu_check.json, DIR/step_*.json, DIR/*.log
                 (default: \$OUT when set, else bench/results/gpu_check_<date>)
  --only S,...   run only these steps, in this order: ${STEPS[*]}
  --budget S     the seconds the steps may take together, counted from the first (default: no limit): a
                 command still running when they are spent is stopped and its step fails; a step not
                 started by then is recorded as skipped; the table and JSON are written all the same (on a
                 lent machine with a hard time limit, set it a minute or two below that limit)
  --keep         keep the scratch folder (checkpoints, sweep logs) and print where it is
  --dry-run      print the steps and each command; run nothing
Needs: torch (the CUDA build for a GPU), nvidia-ml-py, the driver's nvidia-smi, jq. Without a Python
that has mgpu's dependencies and without .venv, it runs \`make deps\` first (needs the package index).
Each command of a step may run GPU_CHECK_LIMIT seconds (default 300).
Exit status: 0 every step held (or was skipped, with the reason); 1 a step failed; 2 bad usage.
USAGE
}

SMOKE=0 KEEP=0 DRY=0 ONLY="" DEST=${OUT:-} BUDGET=""
LIMIT=${GPU_CHECK_LIMIT:-300} # seconds one command of a step may take
while (($#)); do
  case $1 in
    --smoke) SMOKE=1 ;;
    --keep) KEEP=1 ;;
    --dry-run) DRY=1 ;;
    --out) [[ $# -ge 2 && -n $2 ]] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; DEST=$2; shift ;;
    --out=*) DEST=${1#*=} ;;
    --only) [[ $# -ge 2 ]] || { echo "gpu_check: --only needs steps (${STEPS[*]})" >&2; exit 2; }; ONLY=$2; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --budget) [[ $# -ge 2 ]] || { echo "gpu_check: --budget needs seconds" >&2; exit 2; }; BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n $ONLY ]]; then
  IFS=, read -ra chosen <<<"$ONLY"
  for s in "${chosen[@]}"; do
    [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "gpu_check: --only: unknown step '$s'; known: ${STEPS[*]}" >&2; exit 2; }
  done
  STEPS=("${chosen[@]}")
fi
[[ $LIMIT =~ ^[1-9][0-9]{0,5}$ ]] ||
  { echo "gpu_check: GPU_CHECK_LIMIT='$LIMIT': allowed: whole seconds from 1 to 999999" >&2; exit 2; }
if [[ -n $BUDGET ]]; then
  [[ $BUDGET =~ ^[1-9][0-9]{0,5}$ ]] || { echo "gpu_check: --budget '$BUDGET': allowed: whole seconds from 1 to 999999" >&2; exit 2; }
fi
DEST=${DEST:-$ROOT/bench/results/gpu_check_$(date +%Y%m%d_%H%M%S)}

# ---- the sizes of each mode ----------------------------------------------------------------------------------------
if ((SMOKE)); then
  TINY=(--train-size 64 --val-size 32 --max-steps 4 --warmup 1 --device cpu) # CPU even where CUDA exists
  SWEEP_ARGS=(-- "${TINY[@]}")
  BURN_S=3
  MODEL=(--image-encoder starnet_s050 --text-encoder clip:tiny --image-size 32 --embed-dim 64)
  THROUGHPUT=("${MODEL[@]}" --batch-size 8 --steps 8 --amp off --device cpu)
  MEMORY=("${MODEL[@]}" --batch-size 8 --steps 1 --amp off --device cpu)
  AMP=(--amp bf16) AMP_NAME="bf16 (smoke: fp16 needs CUDA)"
  SHORT=("${MODEL[@]}" --batch-size 8 --train-size 32 --val-size 16 --max-steps 3 --warmup 1 --device cpu)
  INFER_TOL=0 DDP_BENCH=()
  RESUME=(--image-encoder starnet_s050 --text-encoder clip:tiny --image-size 32 --embed-dim 32 --batch-size 4
    --train-size 16 --val-size 8 --max-steps 4 --warmup 1 --deterministic --no-tb --device cpu) RESUME_AT=2
  RESUME_WHAT="--deterministic, on the CPU"
else
  SWEEP_ARGS=()
  BURN_S=8
  MODEL=(--image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --image-size 224 --embed-dim 512)
  THROUGHPUT=("${MODEL[@]}" --batch-size 128 --steps 60 --amp bf16 --workers 12)
  MEMORY=("${MODEL[@]}" --batch-size 128 --steps 3 --amp bf16)
  AMP=(--amp fp16) AMP_NAME=fp16
  SHORT=("${MODEL[@]}" --batch-size 64 --train-size 1280 --val-size 128 --max-steps 20 --warmup 5 --workers 8)
  # cuDNN convolutions run in TF32 by default on Ampere and newer (torch.backends.cudnn.allow_tf32): float32
  # embeddings agree with the CPU to about 1e-3, not bit for bit
  INFER_TOL=5e-3 DDP_BENCH=(2 30 256)
  RESUME=(--image-encoder starnet_s4 --text-encoder clip:tiny --image-size 64 --embed-dim 64 --batch-size 32
    --train-size 640 --val-size 64 --max-steps 20 --warmup 2 --deterministic --no-tb) RESUME_AT=10
  RESUME_WHAT="StarNet-s4's DropPath draws from the GPU's generator; --deterministic"
fi

# ---- helpers ------------------------------------------------------------------------------------------------------
say() { printf '%s gpu_check: %s\n' "$(date +%T)" "$*" >&2; }

now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((10#$t / 1000)); }

# limit: the seconds a command may take now: GPU_CHECK_LIMIT, or what is left of --budget (rounded up) when
# that is less; 0 when the budget is spent
limit() {
  local left
  if [[ -z $BUDGET ]]; then echo "$LIMIT"; return; fi
  left=$((BUDGET_END_MS - $(now_ms)))
  ((left > 0)) || left=0
  left=$(((left + 999) / 1000))
  echo $((left < LIMIT ? left : LIMIT))
}

# run_cmd LOG CMD...: print the command, run it (limit seconds at most) with its output in LOG, shown on
# stderr when it fails
run_cmd() {
  local log=$1 rc=0 seconds
  shift
  printf '  $ %s\n' "$*" >&2
  ((DRY)) && return 0
  seconds=$(limit)
  if ((seconds == 0)); then
    say "not run: the --budget of ${BUDGET}s is spent: $*"
    echo "not run: the --budget of ${BUDGET}s was spent" >"$log"
    return 124
  fi
  timeout -k 10 "$seconds" "$@" >"$log" 2>&1 || rc=$?
  ((rc != 124)) || say "stopped after ${seconds}s ($( ((seconds < LIMIT)) && echo "the end of --budget ${BUDGET}s" ||
    echo GPU_CHECK_LIMIT)): $*"
  ((rc == 0)) || { say "exit $rc: $*"; tail -n 25 "$log" | sed 's/^/    | /' >&2; }
  return "$rc"
}

# kill_tree PID: TERM a process and every descendant (found through /proc: our own children only)
kill_tree() {
  local child
  local kids
  kids=$(cat /proc/"$1"/task/*/children 2>/dev/null) || true
  for child in $kids; do kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}

# wait_for_line TEXT FILE PID TENTHS: 0 once FILE holds TEXT; 1 when PID ended first or after TENTHS x 0.1 s
wait_for_line() {
  local i
  for ((i = 0; i < $4; i++)); do
    grep -qF -- "$1" "$2" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# record STEP STATUS DETAIL [FIGURES_JSON]: the step's JSON record, with its seconds
record() {
  ((DRY)) && return 0
  local now=$EPOCHSECONDS
  jq -n --arg step "$1" --arg status "$2" --arg detail "$3" --argjson figures "${4:-{\}}" \
    --argjson seconds "$((now - STEP_START))" \
    '{step: $step, status: $status, detail: $detail, seconds: $seconds, figures: $figures}' \
    >"$DEST/step_$(printf %02d "$STEP_NO")_$1.json"
  say "$1: $2 — $3"
}

# py_record STEP JSON: a record from gpu_check.py's {status, detail, figures}
py_record() {
  local json=$2
  record "$1" "$(jq -r .status <<<"$json")" "$(jq -r .detail <<<"$json")" "$(jq -c .figures <<<"$json")"
}

# ---- the environment ----------------------------------------------------------------------------------------------
find_python() {
  PY=${PYTHON:-}
  [[ -n $PY ]] || { [[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python; } || PY=python3
  if ! "$PY" -c 'import torch, numpy, pynvml, PIL, ftfy, regex, tqdm' 2>/dev/null; then
    if [[ -z ${PYTHON:-} && ! -x $ROOT/.venv/bin/python ]]; then
      say "$PY lacks mgpu's dependencies: make deps (a .venv with them)"
      make -C "$ROOT" deps >&2
      PY=$ROOT/.venv/bin/python
    else
      "$PY" -c 'import torch, numpy, pynvml, PIL, ftfy, regex, tqdm' # names what is missing
    fi
  fi
  command -v jq >/dev/null || bash "$ROOT/tools/ensure-tools.sh" jq >&2
  export PYTHON=$PY PYTHONPATH=$ROOT/py${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
}

smoke_scenario() { # two idle 24 GB GPUs, as the examples' RTX 4090s
  jq '.gpus |= (.[:2] | map(.utilization_gpu = 0 | .processes = [] | .memory_used_mib = 300))' \
    "$ROOT/examples/scenarios/4x-rtx4090-idle.json" >"$WORK/scenario.json"
  export MGPU_FAKE_GPUS=$WORK/scenario.json NVIDIA_SMI=$ROOT/tests/fakes/nvidia-smi
  # one thread a process: the models are tiny, and a second OpenMP thread mostly spins between their ops
  export MGPU_FAKE_SMI_SCENARIO=$WORK/scenario.json MGPU_UTIL_SAMPLES=1 MGPU_UTIL_WINDOW_MS=0 OMP_NUM_THREADS=1
}

gpu_count() {
  "$PY" - <<'PY'
from mgpu.gpus import inventory
print(len(inventory(samples=1).gpus))
PY
}

# shellcheck source=bench/gpu_check_steps.sh
source "$ROOT/bench/gpu_check_steps.sh" # step_gpus, step_sweep, step_throughput, step_infer, step_multi_gpu

# ---- the run ------------------------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STEP_PID=""
cleanup() { # a step still running (Ctrl-C, TERM): it and everything it started get TERM, then the scratch goes
  if [[ -n $STEP_PID ]] && kill -0 "$STEP_PID" 2>/dev/null; then
    say "stopping the running step and what it started"
    kill_tree "$STEP_PID"
    local i
    for ((i = 0; i < 150; i++)); do kill -0 "$STEP_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  if ((KEEP)); then say "scratch kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ((DRY)); then
  PY=${PYTHON:-python3}
else
  find_python
  mkdir -p "$DEST"
  rm -f "$DEST"/step_*.json
fi
((SMOKE)) && smoke_scenario
say "$( ((SMOKE)) && echo "smoke mode (CPU, scenario $MGPU_FAKE_GPUS)" || echo "GPU mode") — steps: ${STEPS[*]}; figures to $DEST"
STEP_NO=0
[[ -z $BUDGET ]] || BUDGET_END_MS=$(($(now_ms) + BUDGET * 1000))
for step in "${STEPS[@]}"; do
  STEP_NO=$((STEP_NO + 1)) STEP_START=$EPOCHSECONDS
  say "== $step"
  if ((!DRY)) && [[ -n $BUDGET ]] && (($(limit) == 0)); then
    record "$step" skip "not run: the --budget of ${BUDGET}s was spent before this step"
    continue
  fi
  # each step in a subshell of its own, waited for (so a signal is handled at once): a command that fails
  # unexpectedly ends its step, which is recorded as failed, and the next steps still run
  (
    trap 'say "$step: line $LINENO: $BASH_COMMAND failed"' ERR
    "step_$step"
  ) &
  STEP_PID=$!
  rc=0
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  if ((!DRY && rc != 0)) && ! compgen -G "$DEST/step_$(printf %02d "$STEP_NO")_*.json" >/dev/null; then
    record "$step" fail "the step stopped (exit $rc) before it recorded a result: see the messages above"
  fi
done
((DRY)) && exit 0
"$PY" "$ROOT/bench/gpu_check.py" report "$DEST"
