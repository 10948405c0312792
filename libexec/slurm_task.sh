#!/usr/bin/env bash
# libexec/slurm_task.sh SWEEP_DIR — one array task of an mgpu sweep on Slurm, run by the sweep's sweep.sbatch:
# the job of task<SLURM_ARRAY_TASK_ID>.meta/.argv, with the environment, log file and completion
# marker a local run gives it, and its own record (task<i>.started, task<i>.result) for --wait/--status.
# A TERM from Slurm (scancel, the time limit) reaches the job's whole process group; the record says so.
set -Eeuo pipefail
MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/libexec/*}
# shellcheck source=lib/core.sh
source "$MGPU_ROOT/lib/core.sh"
# shellcheck source=lib/ledger.sh
source "$MGPU_ROOT/lib/ledger.sh" # for ledger::log_path, the local runs' log naming

# write_atomic FILE LINE... — FILE holds the lines, whole or not at all (a reader may look at any time)
write_atomic() {
  local file=$1
  shift
  printf '%s\n' "$@" >"$file.tmp.$$"
  mv -f -- "$file.tmp.$$" "$file"
}

main() {
  local dir=${1:?usage: slurm_task.sh SWEEP_DIR} k=${SLURM_ARRAY_TASK_ID:?not inside a Slurm job array}
  local meta=() argv=() gpu node start pid rc=0 stopped=""
  mapfile -t meta <"$dir/task$k.meta" # name, image, text, output dir, marker, hash, LOG_DIR
  mapfile -d '' -t argv <"$dir/task$k.argv"
  gpu=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}
  gpu=${gpu%%,*}
  [[ -n $gpu ]] || gpu=cpu
  node=${SLURMD_NODENAME:-$HOSTNAME}
  LOG_DIR=${meta[6]}
  ledger::log_path "${meta[0]}" "$gpu" || { echo "[ERROR] ${meta[0]}: $LEDGER_ERROR" >&2; exit 1; }
  [[ -z ${meta[3]} || -d ${meta[3]} ]] || mkdir -p -- "${meta[3]}"
  core::now_ms
  start=$CORE_NOW_MS
  write_atomic "$dir/task$k.started" "$gpu" "$node" "$LEDGER_LOG" "$start"
  echo "[INFO] ${meta[0]}: Slurm job ${SLURM_ARRAY_JOB_ID:-?}_$k on $node, GPU $gpu; log $LEDGER_LOG"
  trap 'stopped=TERM; kill -TERM -- "-$pid" 2>/dev/null || true' TERM
  trap 'stopped=INT; kill -TERM -- "-$pid" 2>/dev/null || true' INT
  set -m # the job leads its own process group, as in a local run
  CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=${meta[0]} MGPU_GPU=$gpu \
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}} "${argv[@]}" </dev/null >"$LEDGER_LOG" 2>&1 &
  pid=$!
  set +m
  wait "$pid" || rc=$?
  while [[ -n $stopped ]] && kill -0 "$pid" 2>/dev/null; do # the signal cut the wait short: wait again
    rc=0
    wait "$pid" || rc=$?
  done
  core::now_ms
  if ((rc == 0)); then
    mkdir -p -- "${meta[4]%/*}"
    write_atomic "${meta[4]}" "${meta[5]}"
  fi
  write_atomic "$dir/task$k.result" "$rc" "$CORE_NOW_MS" "$stopped"
  echo "[INFO] ${meta[0]}: exit $rc after $(((CORE_NOW_MS - start) / 1000))s${stopped:+ (stopped by SIG$stopped)}"
  exit "$rc"
}

main "$@"
