# shellcheck shell=bash disable=SC2034  # part of sched.sh: the same job records and globals
# sched:: (continued) — a failed job: why (CUDA out of memory, the host's OOM killer, an NCCL/collective
# failure, a full disk, a signal, an error), and what follows: a retry elsewhere, a retry with half the batch and twice
# the accumulation (--on-oom halve-batch: the same global batch, resumed from the last checkpoint), or
# the failure recorded. Also each job's peak GPU memory, sampled while it runs. Sourced by sched.sh only.

declare -A JOB pids # sched.sh's job records and running-job table (declared there)

# sched::_failed JOB STATUS GPUS — classify the failure and retry it or not; 0 recorded as failed, 1
# queued again.
sched::_failed() {
  local job=$1 rc=$2 gpus=$3 kind budget=$RETRIES
  kind=$(ledger::failure_kind "${JOB[$job,log]}" "$rc")
  if [[ $kind == "signal KILL" || $kind == error ]] && sched::_host_oom "$job"; then
    kind="host oom"
  fi
  JOB[$job,kind]=$kind JOB[$job,fails]+="$kind on GPU $gpus"$'\n'
  [[ $kind != "disk full" && $kind != "shm full" ]] || budget=0 # a retry would only fail again: nothing fits
  if [[ $kind == oom || $kind == "host oom" ]]; then
    case $ON_OOM in
      fail) budget=0 ;;
      halve-batch)
        ((budget >= 2)) || budget=2
        ((JOB[$job,retries] < budget)) && sched::_halve "$job" || budget=0
        ;;
      retry-elsewhere) JOB[$job,prefer_mem]=${JOB[$job,peak]:-} ;;
    esac
  fi
  if ((JOB[$job,retries] < budget)); then
    core::now_ms
    JOB[$job,retries]=$((JOB[$job,retries] + 1))
    JOB[$job,avoid]=${gpus//,/ } JOB[$job,status]=queued
    JOB[$job,ready_at]=$((CORE_NOW_MS + MGPU_RETRY_BACKOFF_MS * (1 << (JOB[$job,retries] - 1))))
    SCHED_QUEUE=("$job" "${SCHED_QUEUE[@]}")
    ledger::ev retry "${JOB[$job,name]}" "${JOB[$job,retries]}" "$kind"
    ledger::event "retrying ${JOB[$job,name]} ($kind, exit $rc on GPU $gpus; retry ${JOB[$job,retries]} of $budget, ${JOB[$job,retry_how]:-preferring another GPU})"
    return 1
  fi
  JOB[$job,status]=failed
  return 0
}

# sched::_halve JOB — the job's argv again with half its --batch-size and twice its --accum-steps (the
# same global batch, so results stay comparable) and --resume auto; 1 when its batch cannot be halved.
sched::_halve() {
  local job=$1 i batch="" accum=1 word next
  sched::argv "$job"
  for ((i = 0; i < ${#SCHED_ARGV[@]}; i++)); do
    word=${SCHED_ARGV[i]} next=${SCHED_ARGV[i + 1]:-}
    case $word in
      --batch-size | --batch_size | --batchsize) batch=$next ;;
      --batch-size=* | --batch_size=* | --batchsize=*) batch=${word#*=} ;;
      --accum-steps | --accum_steps) accum=$next ;;
      --accum-steps=* | --accum_steps=*) accum=${word#*=} ;;
    esac
  done
  if [[ ! $batch =~ ^[0-9]+$ || ! $accum =~ ^[0-9]+$ ]] || ((batch < 2)); then
    JOB[$job,retry_how]="" JOB[$job,detail]="out of memory; --on-oom halve-batch needs a --batch-size of 2 or more in the command, got '${batch:-none}'"
    return 1
  fi
  SCHED_ARGV+=(--batch-size $((batch / 2)) --accum-steps $((accum * 2)) --resume auto)
  printf '%s\0' "${SCHED_ARGV[@]}" >"$SCHED_STATE/job$job.argv" # the hash (--resume's identity) stays
  JOB[$job,detail]="batch $batch -> $((batch / 2)), accum $accum -> $((accum * 2)) after out of memory"
  JOB[$job,retry_how]="with ${JOB[$job,detail]%% after*}, resuming from its last checkpoint"
}

# sched::_host_oom JOB — did the kernel's OOM killer kill one of the job's processes? The kernel's log
# (${DMESG:-dmesg}, where readable) has an "Out of memory: Killed process" line timed within the job's
# run (seconds since boot, as /proc/uptime counts them).
sched::_host_oom() {
  local line t up _ log
  [[ -n ${JOB[$1,up_start]:-} ]] || return 1
  read -r up _ </proc/uptime 2>/dev/null || return 1
  log=$("${DMESG:-dmesg}" 2>/dev/null) || return 1
  while IFS= read -r line; do
    [[ $line =~ ^\[\ *([0-9]+)\.[0-9]+\]\ .*(Out\ of\ memory:\ Killed\ process|oom-kill:) ]] || continue
    t=${BASH_REMATCH[1]}
    ((t >= ${JOB[$1,up_start]%.*} && t <= ${up%.*} + 1)) && return 0
  done <<<"$log"
  return 1
}

# sched::_sample NOW_MS — read the GPUs (SCHED_SAMPLED 1, or -1 when they cannot be read) unless a
# reading of the last 500 ms serves this fill (SCHED_SAMPLED already set by sched::_fill).
sched::_sample() {
  ((!SCHED_SAMPLED)) || return 0
  gpu::sample "${SCHED_GPUS[@]}" 2>/dev/null && SCHED_SAMPLED=1 || SCHED_SAMPLED=-1
  SCHED_SAMPLE_MS=$1
}

# sched::_sample_usage — every running job's GPU memory now (its processes in the per-process list), and
# its peak so far (JOB[<i>,peak], MiB on its busiest GPU): the summary's figure, and what --need-mem auto
# learns for the next sweep. Runs on timer wake-ups, never between a job's end and the next start.
sched::_sample_usage() {
  local name job slot use most
  gpu::sample "${SCHED_GPUS[@]}" 2>/dev/null || return 0
  core::now_ms
  SCHED_SAMPLE_MS=$CORE_NOW_MS SCHED_USAGE_MS=$CORE_NOW_MS
  for name in "${!pids[@]}"; do
    job=${SCHED_BY_NAME[$name]} most=0
    for slot in ${JOB[$job,slots]}; do
      lease::usage "${pids[$name]}" "${slot%:*}"
      use=$LEASE_USAGE
      ((use <= most)) || most=$use
    done
    ((most <= ${JOB[$job,peak]:-0})) || JOB[$job,peak]=$most
  done
}
