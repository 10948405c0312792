# shellcheck shell=bash disable=SC2034  # settings shared with sweep.sh and the entry scripts
# slurm:: — the Slurm backend of the sweep launchers (--backend slurm): the queued jobs become one job
# array, one GPU per task, with the names, logs, output folders, completion markers and summary of a
# local run. mgpu hands the scheduling to Slurm; it only writes the array, follows it and sums it up.
# Needs core.sh, sched.sh (the queue and the job records), ledger.sh. The task side is libexec/slurm_task.sh.
#
# A submission writes LOG_DIR/slurm_<YYYYmmdd_HHMMSS>/:
#   task<i>.meta     the task's name, image encoder, text encoder, output dir, marker, hash and LOG_DIR
#                    (as given: tasks run in the folder the sweep was submitted from), a line each
#   task<i>.argv     its command, NUL-separated (never evaluated by a shell)
#   sweep.sbatch     the batch script; job_id: the array's job id once submitted
#   task<i>.started, task<i>.result    written by the task itself (lib/slurm_task.sh)

SB_EXTRA=()

# slurm::flag ARGS... — take one Slurm flag; SWEEP_SHIFT is the words it used (0: not one of them).
slurm::flag() {
  SWEEP_SHIFT=2
  case $1 in
    --wait) SB_WAIT=true SWEEP_SHIFT=1 ;;
    --status) SB_STATUS=true SWEEP_SHIFT=1 ;;
    --backend | --partition | --time | --cpus-per-task | --mem | --account | --qos | --gres | --max-parallel | --sbatch-arg)
      (($# >= 2)) || { log::error "$1 needs a value (see --help)"; return 2; }
      case $1 in
        --backend) MGPU_BACKEND=$2 ;;
        --partition) SB_PARTITION=$2 ;;
        --time) SB_TIME=$2 ;;
        --cpus-per-task) SB_CPUS=$2 ;;
        --mem) SB_MEM=$2 ;;
        --account) SB_ACCOUNT=$2 ;;
        --qos) SB_QOS=$2 ;;
        --gres) SB_GRES=$2 ;;
        --max-parallel) SB_MAX_PARALLEL=$2 ;;
        --sbatch-arg) SB_EXTRA+=("$2") ;;
      esac
      ;;
    *) SWEEP_SHIFT=0 ;;
  esac
}

# slurm::defaults — flags first, then Slurm's own SBATCH_* variables, then mgpu's defaults.
slurm::defaults() {
  MGPU_BACKEND=${MGPU_BACKEND:-local} SB_WAIT=${SB_WAIT:-false} SB_STATUS=${SB_STATUS:-false}
  SB_PARTITION=${SB_PARTITION:-${SBATCH_PARTITION:-}} SB_TIME=${SB_TIME:-${SBATCH_TIMELIMIT:-}}
  SB_CPUS=${SB_CPUS:-${SBATCH_CPUS_PER_TASK:-}} SB_MEM=${SB_MEM:-${SBATCH_MEM_PER_NODE:-}}
  SB_ACCOUNT=${SB_ACCOUNT:-${SBATCH_ACCOUNT:-}} SB_QOS=${SB_QOS:-${SBATCH_QOS:-}}
  SB_GRES=${SB_GRES:-${SBATCH_GRES:-gpu:1}} SB_MAX_PARALLEL=${SB_MAX_PARALLEL:-}
}

# slurm::validate — the Slurm settings, each named with what is allowed (2, logged).
slurm::validate() {
  local pair var value arg problem=""
  [[ $MGPU_BACKEND =~ ^(local|slurm)$ ]] || { log::error "--backend must be local or slurm, got '$MGPU_BACKEND'"; return 2; }
  if [[ $MGPU_BACKEND == local ]]; then
    [[ $SB_WAIT == false ]] || { log::error "--wait follows a Slurm sweep: add --backend slurm"; return 2; }
    return 0
  fi
  [[ -z $SB_MAX_PARALLEL ]] || log::require_int "--max-parallel" "$SB_MAX_PARALLEL" 1 || return 2
  [[ -z $SB_CPUS ]] || log::require_int "--cpus-per-task" "$SB_CPUS" 1 || return 2
  ((RETRIES == 0)) || problem="--retries is for local runs; on Slurm, run the sweep again with --resume to resubmit what failed"
  ((JOBS_PER_GPU == 1)) || problem="JOBS_PER_GPU must be 1 with --backend slurm (each task gets its GPU from --gres), got '$JOBS_PER_GPU'"
  [[ -z $SB_TIME || $SB_TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$|^(UNLIMITED|INFINITE)$ ]] ||
    problem="--time must be a Slurm time limit like 90, 4:00:00 or 2-00:00:00, got '$SB_TIME'"
  [[ -z $SB_MEM || $SB_MEM =~ ^[0-9]+[KMGT]?$ ]] || problem="--mem must be a size like 32G or 16000M, got '$SB_MEM'"
  for pair in partition:SB_PARTITION account:SB_ACCOUNT qos:SB_QOS gres:SB_GRES; do
    var=${pair#*:}
    value=${!var}
    [[ -z $value || $value =~ ^[A-Za-z0-9_.:,=-]+$ ]] || problem="--${pair%%:*} must be a Slurm name like gpu or gpu:a100:1 (letters, digits, _.:,=-), got '$value'"
  done
  for arg in "${SB_EXTRA[@]}"; do
    [[ $arg == --?* && $arg != *[$'\n"']* ]] || problem="--sbatch-arg must be one sbatch option like --constraint=a100 (no quotes or newlines), got '$arg'"
  done
  command -v sbatch >/dev/null 2>&1 || problem="--backend slurm needs Slurm's client commands (sbatch, squeue) on PATH; none found"
  [[ -z $problem ]] || { log::error "$problem"; return 2; }
}

# slurm::launch — --status, or submit the queue (already filtered by --resume and ordered) as one
# array, then --wait follows it. Returns the exit status.
slurm::launch() {
  local dir out job_id
  if [[ $SB_STATUS == true ]]; then
    slurm::latest || return
    slurm::status "$SB_DIR"
    return 0
  fi
  if ((${#SCHED_QUEUE[@]} == 0)); then
    log::info "nothing to submit: every job is done (--resume)"
    sched::finish
    return "$SCHED_EXIT"
  fi
  slurm::write || return
  dir=$SB_DIR
  if [[ $DRY_RUN == true ]]; then
    slurm::dry_run "$dir"
    rm -rf -- "$dir"
    return 0
  fi
  if ! out=$(sbatch --parsable "$dir/sweep.sbatch" 2>&1); then
    log::error "sbatch refused the sweep: $out (the batch script: $dir/sweep.sbatch)"
    return 1
  fi
  job_id=${out##*$'\n'} job_id=${job_id%%;*}
  echo "$job_id" >"$dir/job_id"
  log::info "submitted ${#SCHED_QUEUE[@]} job(s) as Slurm job array $job_id; logs in $LOG_DIR, records in $dir"
  if [[ $SB_WAIT != true ]]; then
    log::info "follow it with --status (or --wait); stop it with: scancel $job_id"
    return 0
  fi
  slurm::wait "$dir"
}

# slurm::write — the sweep folder (SB_DIR) for the queued jobs: one meta and one argv file per array
# index, and the batch script.
slurm::write() {
  local k=0 job dir last script line arg
  dir=$LOG_DIR/slurm_$LEDGER_TS
  [[ $dir == /* ]] || dir=$PWD/$dir
  [[ $dir != *[$'\n"']* && $PWD != *[$'\n"']* ]] || {
    log::error "the log folder and the current folder must not contain quotes or newlines for sbatch: $dir"
    return 2
  }
  mkdir -p -- "$dir"
  for job in "${SCHED_QUEUE[@]}"; do
    printf '%s\n' "${JOB[$job,name]}" "${JOB[$job,image]}" "${JOB[$job,text]}" "${JOB[$job,out]}" "${JOB[$job,marker]}" \
      "${JOB[$job,hash]}" "$LOG_DIR" >"$dir/task$k.meta"
    cp -- "$SCHED_STATE/job$job.argv" "$dir/task$k.argv"
    k=$((k + 1))
  done
  last=$((k - 1))
  script="#!/usr/bin/env bash"$'\n'
  for line in "--job-name=mgpu-${LOG_DIR##*/}" "--array=0-$last${SB_MAX_PARALLEL:+%$SB_MAX_PARALLEL}" \
    "--gres=$SB_GRES" "--ntasks=1" "--chdir=\"$PWD\"" "--output=\"$dir/task_%a.out\"" \
    ${SB_PARTITION:+"--partition=$SB_PARTITION"} ${SB_TIME:+"--time=$SB_TIME"} \
    ${SB_CPUS:+"--cpus-per-task=$SB_CPUS"} ${SB_MEM:+"--mem=$SB_MEM"} ${SB_ACCOUNT:+"--account=$SB_ACCOUNT"} \
    ${SB_QOS:+"--qos=$SB_QOS"} "${SB_EXTRA[@]}"; do
    script+="#SBATCH $line"$'\n'
  done
  printf -v arg '%q ' "$MGPU_ROOT/libexec/slurm_task.sh" "$dir"
  script+="# Written by mgpu: each array task runs one job of this folder's task<i>.meta and task<i>.argv."$'\n'
  script+="exec bash ${arg% }"$'\n'
  printf '%s' "$script" >"$dir/sweep.sbatch"
  SB_DIR=$dir
}

# slurm::dry_run DIR — the batch script and each task's exact command; nothing is submitted.
slurm::dry_run() {
  local dir=$1 k=0 job
  printf 'Plan: %d job(s) as one Slurm job array (%s a task); the batch script:\n' "${#SCHED_QUEUE[@]}" "$SB_GRES"
  sed 's/^/    /' "$dir/sweep.sbatch"
  for job in "${SCHED_QUEUE[@]}"; do
    sched::argv "$job"
    printf 'task %d %s: ' "$k" "${JOB[$job,name]}"
    printf '%q ' "MGPU_CONFIG_NAME=${JOB[$job,name]}" "${SCHED_ARGV[@]}"
    echo
    k=$((k + 1))
  done
}

# slurm::latest — SB_DIR: the newest sweep folder in LOG_DIR; 1 (logged) when there is none.
slurm::latest() {
  local dirs=("$LOG_DIR"/slurm_*/job_id)
  [[ -e ${dirs[0]} ]] || { log::error "no submitted Slurm sweep in $LOG_DIR (--status reads LOG_DIR/slurm_*/)"; return 1; }
  SB_DIR=${dirs[-1]%/job_id}
}

# slurm::collect DIR — the job records of every task (sched::set), from the tasks' own files, squeue
# (pending and running) and, where the cluster keeps accounting, sacct (tasks that ended without a record).
slurm::collect() {
  local dir=$1 meta=() k job_id task state started=() result=() acct status kind reason
  local -A queued=() accounted=()
  job_id=$(<"$dir/job_id")
  SB_JOB_ID=$job_id
  while read -r task state; do [[ -z $task ]] || queued[$task]=${state,,}; done < <(squeue -h -r -j "$job_id" -o '%K %T' 2>/dev/null || true)
  if acct=$(sacct -n -P -X -j "$job_id" -o JobID,State 2>/dev/null); then
    while IFS='|' read -r task state; do [[ $task != *_* ]] || accounted[${task##*_}]=${state%% *}; done <<<"$acct"
  fi
  sched::reset
  for ((k = 0; ; k++)); do
    [[ -f $dir/task$k.meta ]] || break
    mapfile -t meta <"$dir/task$k.meta"
    sched::new "${meta[0]}" "${meta[1]}" "${meta[2]}" "${meta[3]}" "${meta[4]}"
    started=() result=() kind="" reason="Slurm job ${job_id}_$k"
    sched::set "$k" "hash=${meta[5]}"
    [[ ! -f $dir/task$k.started ]] || mapfile -t started <"$dir/task$k.started" # gpu node log start_ms
    [[ ! -f $dir/task$k.result ]] || mapfile -t result <"$dir/task$k.result"    # exit end_ms stopped
    if ((${#started[@]} >= 4)); then
      sched::set "$k" "gpu=${started[0]}" "log=${started[2]}" "since=$dir/task$k.started"
      reason+=" on ${started[1]}"
    fi
    if ((${#result[@]} >= 3 && ${#started[@]} >= 4)); then
      sched::set "$k" "exit=${result[0]}" "ms=$((result[1] - started[3]))"
      if ((result[0] == 0)); then
        status=succeeded
      elif [[ -n ${result[2]} && ${accounted[$k]:-} != TIMEOUT ]]; then
        status=interrupted kind="signal ${result[2]}"
      else
        status=failed kind=$(ledger::failure_kind "${started[2]}" "${result[0]}")
        [[ ${accounted[$k]:-} != TIMEOUT ]] || kind="time limit"
      fi
    elif [[ -n ${queued[$k]:-} ]]; then
      status=${queued[$k]}
    elif [[ -n ${accounted[$k]:-} && ${accounted[$k]} =~ ^(PENDING|RUNNING|REQUEUED|SUSPENDED)$ ]]; then
      status=${accounted[$k],,}
    elif [[ ${accounted[$k]:-} == CANCELLED ]]; then
      status=interrupted kind=cancelled
    elif [[ -n ${accounted[$k]:-} ]]; then
      status=failed kind=${accounted[$k],,}
    else
      status=failed kind=lost reason+=": ended without writing its record (cancelled before it started, or its node failed)"
    fi
    sched::set "$k" "status=$status" "kind=$kind" "reason=$reason"
  done
}

# slurm::_counts — SB_LEFT (tasks not ended) and SB_COUNTS ("2 pending, 3 running, 1 succeeded").
slurm::_counts() {
  local -A n=()
  local k state
  SB_LEFT=0 SB_COUNTS=""
  for ((k = 0; k < SCHED_N; k++)); do
    state=${JOB[$k,status]}
    n[$state]=$((${n[$state]:-0} + 1))
    [[ $state =~ ^(succeeded|failed|interrupted|skipped)$ ]] || SB_LEFT=$((SB_LEFT + 1))
  done
  for state in pending running succeeded failed interrupted; do
    [[ -z ${n[$state]:-} ]] || SB_COUNTS+="${SB_COUNTS:+, }${n[$state]} $state"
  done
}

# slurm::status DIR — the sweep's table now (pending and running tasks included).
slurm::status() {
  local k
  slurm::collect "$1"
  slurm::_counts
  for ((k = 0; k < SCHED_N; k++)); do ledger::record "$k"; done
  ledger::_table "$LEDGER_HEADER" "${LEDGER_ROW[@]}"
  log::info "Slurm job array $SB_JOB_ID: $SB_COUNTS ($1)"
}

# slurm::wait DIR — follow the array to its end (a line whenever the counts change), then write the
# summary as a local run does and return its exit status. Ctrl-C stops following, not the array.
slurm::wait() {
  local dir=$1 k seen="" stop=""
  trap 'stop=1' INT
  while [[ -z $stop ]]; do
    slurm::collect "$dir"
    slurm::_counts
    core::now_ms
    if [[ $SB_COUNTS != "$seen" ]]; then
      log::info "[$(((CORE_NOW_MS - LEDGER_STARTED_MS) / 1000))s] Slurm job array $SB_JOB_ID: $SB_COUNTS"
      seen=$SB_COUNTS
    fi
    ((SB_LEFT)) || break
    core::sleep_ms $((MGPU_SLURM_POLL_S * 1000))
  done
  trap - INT
  if [[ -n $stop ]]; then
    log::warn "stopped following; the array runs on (scancel $SB_JOB_ID stops it; --status shows it)"
    return 130
  fi
  for ((k = 0; k < SCHED_N; k++)); do
    ledger::record "$k"
    [[ ${JOB[$k,status]} != failed ]] || ledger::show_tail "$k"
  done
  sched::finish
  return "$SCHED_EXIT"
}
