#!/usr/bin/env bash
# libexec/slurm_task.sh SWEEP_DIR — one array task of an mgpu sweep on Slurm, run by the sweep's sweep.sbatch:
# the job of task<SLURM_ARRAY_TASK_ID>.meta/.argv, with the environment, log file and completion
# marker a local run gives it, and its own records for --wait/--status: task<i>.started (each run),
# task<i>.result (the task's end, written once it will not run again) and task<i>.requeues (a line a
# requeue: class, words, exit status, GPU, time). lib/slurm_job.sh supervises the command: Slurm's TERM,
# the --signal warning (USR1) and the time-limit watch reach every process of it as SIGTERM. With
# --requeue a warned or preempted task requeues itself once its trainer has saved; with --retries N a
# failed one does, up to N times; a requeued trainer task continues with --resume auto.
set -Eeuo pipefail
MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/libexec/*}
# shellcheck source=lib/core.sh
source "$MGPU_ROOT/lib/core.sh"
# shellcheck source=lib/ledger.sh
source "$MGPU_ROOT/lib/ledger.sh" # ledger::log_path (the local runs' log naming), ledger::failure_kind
# shellcheck source=lib/slurm_job.sh
source "$MGPU_ROOT/lib/slurm_job.sh"

# write_atomic FILE LINE... — FILE holds the lines, whole or not at all (a reader may look at any time)
write_atomic() {
  local file=$1
  shift
  printf '%s\n' "$@" >"$file.tmp.$$"
  mv -f -- "$file.tmp.$$" "$file"
}

# catch_up — runs that Slurm requeued itself (preemption by TERM, a failed node, an administrator) get
# their requeue line now, from the record their run left; that record goes (it was not the end).
catch_up() {
  local file=$base.requeues seen=0 result=() class=slurm words="requeued by Slurm"
  [[ ! -f $file ]] || seen=$(grep -c '' "$file" || true)
  [[ ! -f $base.result ]] || mapfile -t result <"$base.result" # exit end_ms stop cause note
  while ((seen < restart)); do
    if ((${#result[@]} >= 4)); then
      if [[ ${result[3]} == "time limit" ]]; then
        class="time limit" words="time limit (requeued)"
      elif [[ ${result[2]} == TERM ]]; then
        class=preempted words="preempted (requeued)"
      fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$class" "$words" "${result[0]:-}" "${prev_gpu:-}" "${result[1]:-}" >>"$file"
    result=() class=slurm words="requeued by Slurm" seen=$((seen + 1))
  done
  rm -f -- "$base.result"
}

# requeue_task CLASS WORDS — record the requeue, then ask Slurm for it; returns only when refused
# (NOTE says why).
requeue_task() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$SJ_RC" "$gpu" "$CORE_NOW_MS" >>"$base.requeues"
  echo "[INFO] ${meta[0]}: exit $SJ_RC after $(((CORE_NOW_MS - start) / 1000))s: $2 (requeue $((restart + 1)))"
  slurm_job::requeue && exit 0
  sed -i '$d' "$base.requeues"
  NOTE="requeue refused: ${SJ_ERROR//$'\n'/ }"
  echo "[ERROR] ${meta[0]}: $NOTE" >&2
}

main() {
  local dir=${1:?usage: slurm_task.sh SWEEP_DIR} k=${SLURM_ARRAY_TASK_ID:?not inside a Slurm job array}
  local meta=() argv=() gpu node start base prev=() prev_gpu="" restart=${SLURM_RESTART_COUNT:-0} failures=0 kind
  mapfile -t meta <"$dir/task$k.meta" # name, image, text, output dir, marker, hash, LOG_DIR, requeue, lead, retries
  mapfile -d '' -t argv <"$dir/task$k.argv"
  base=$dir/task$k NOTE=""
  [[ ! -f $base.started ]] || { mapfile -t prev <"$base.started" && prev_gpu=${prev[0]:-}; }
  catch_up
  gpu=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}
  [[ -n $gpu ]] || gpu=cpu
  node=${SLURMD_NODENAME:-$HOSTNAME}
  LOG_DIR=${meta[6]}
  ledger::log_path "${meta[0]}" "${gpu//,/+}" || { echo "[ERROR] ${meta[0]}: $LEDGER_ERROR" >&2; exit 1; }
  [[ -z ${meta[3]} || -d ${meta[3]} ]] || mkdir -p -- "${meta[3]}"
  # A requeued trainer continues where it saved: same output folder, TensorBoard run and data offset.
  if ((restart)) && [[ -n ${meta[3]} ]] && ! slurm_job::has_resume "${argv[@]}"; then argv+=(--resume auto); fi
  core::now_ms
  start=$CORE_NOW_MS
  write_atomic "$base.started" "$gpu" "$node" "$LEDGER_LOG" "$start" "$restart"
  local again=""
  ((restart == 0)) || again=" (run $((restart + 1)), after $restart requeue(s))"
  echo "[INFO] ${meta[0]}: Slurm job ${SLURM_ARRAY_JOB_ID:-?}_$k on $node, GPU $gpu$again; log $LEDGER_LOG"
  SJ_LEAD=${meta[8]:-60} SJ_REQUEUE=${meta[7]:-false} SJ_OUT=${meta[3]} SJ_SINCE=$base.started SJ_NOTE=$LEDGER_LOG
  SJ_DEFER=0
  [[ -z ${meta[3]} ]] || SJ_DEFER=1 # a trainer: a stop waits (within limits) for its SIGTERM handler
  slurm_job::run "$LEDGER_LOG" env CUDA_DEVICE_ORDER=PCI_BUS_ID "MGPU_CONFIG_NAME=${meta[0]}" "MGPU_GPU=$gpu" \
    "MGPU_RESTART=$restart" "OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}" "${argv[@]}"
  core::now_ms
  [[ ! -f $base.requeues ]] || failures=$(grep -c '^failure' "$base.requeues" || true)
  if ((SJ_RC == 0)); then
    mkdir -p -- "${meta[4]%/*}"
    write_atomic "${meta[4]}" "${meta[5]}"
  elif [[ $SJ_REQUEUE == true && ($SJ_STOP == USR1 || $SJ_STOP == watch) ]]; then
    requeue_task "$SJ_CAUSE" "$SJ_CAUSE (requeued)"
  elif [[ -z $SJ_STOP ]] && ((failures < ${meta[9]:-0})); then
    kind=$(ledger::failure_kind "$LEDGER_LOG" "$SJ_RC")
    [[ $kind == *" full" ]] || requeue_task failure "$kind (requeued)" # as locally: it would fail again
  fi
  write_atomic "$base.result" "$SJ_RC" "$CORE_NOW_MS" "$SJ_STOP" "$SJ_CAUSE" "$NOTE"
  echo "[INFO] ${meta[0]}: exit $SJ_RC after $(((CORE_NOW_MS - start) / 1000))s${SJ_STOP:+ (stopped: ${SJ_CAUSE:-SIG$SJ_STOP})}"
  exit "$SJ_RC"
}

main "$@"
