# shellcheck shell=bash disable=SC2034  # settings shared with sweep.sh and the entry scripts
# slurm:: — the Slurm backend of the sweep launchers (--backend slurm): the queued jobs become one job
# array, GPUS_PER_JOB GPUs a task (--gres=gpu:N; mgpu's trainer then runs under torchrun, one process a
# GPU), with the names, logs, output folders, completion markers and summary of a local run. mgpu hands
# the scheduling to Slurm; it only writes the array, follows it and sums it up. With --requeue a task
# saves and requeues itself when warned (--signal=B:USR1@LEAD) or preempted, with --retries N when it
# fails; a requeued trainer continues with --resume auto. Needs core.sh, sched.sh (the queue and the job
# records), ledger.sh. The task side is libexec/slurm_task.sh (with lib/slurm_job.sh).
# A submission writes LOG_DIR/slurm_<YYYYmmdd_HHMMSS>/:
#   task<i>.meta     the task's name, image encoder, text encoder, output dir, marker, hash, LOG_DIR (as given:
#                    tasks run where the sweep was submitted), requeue (true|false), lead (s), retries; a line each
#   task<i>.argv     its command, NUL-separated (never evaluated by a shell)
#   sweep.sbatch     the batch script; job_id: the array's job id once submitted
#   task<i>.started, task<i>.result, task<i>.requeues    written by the task itself (libexec/slurm_task.sh)

SB_EXTRA=()

# slurm::flag ARGS... — take one Slurm flag; SWEEP_SHIFT is the words it used (0: not one of them).
slurm::flag() {
  SWEEP_SHIFT=2
  case $1 in
    --wait) SB_WAIT=true SWEEP_SHIFT=1 ;;
    --status) SB_STATUS=true SWEEP_SHIFT=1 ;;
    --requeue) SB_REQUEUE=true SWEEP_SHIFT=1 ;;
    --backend | --partition | --time | --cpus-per-task | --mem | --account | --qos | --gres | --max-parallel | --sbatch-arg | \
      --signal-lead | --gpus-per-job)
      [[ $1 == --sbatch-arg ]] && (($# >= 2)) || core::need_value "$1" $# "${2:-}" || return 2 # --sbatch-arg --exclusive
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
        --signal-lead) SB_LEAD=$2 ;;
        --gpus-per-job) GPUS_PER_JOB=$2 ;; # the local engine may take this flag first: the same setting
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
  SB_GRES=${SB_GRES:-${SBATCH_GRES:-}} SB_MAX_PARALLEL=${SB_MAX_PARALLEL:-}
  SB_REQUEUE=${SB_REQUEUE:-false} SB_LEAD=${SB_LEAD:-60} GPUS_PER_JOB=${GPUS_PER_JOB:-1}
}

# slurm::validate — the Slurm settings, each named with what is allowed (2, logged).
slurm::validate() {
  local pair var value arg problem=""
  [[ $MGPU_BACKEND =~ ^(local|slurm)$ ]] || { log::error "--backend must be local or slurm, got '$MGPU_BACKEND'"; return 2; }
  if [[ $MGPU_BACKEND == local ]]; then
    [[ $SB_WAIT == false && $SB_REQUEUE == false ]] ||
      { log::error "--wait and --requeue are for Slurm sweeps: add --backend slurm"; return 2; }
    return 0
  fi
  [[ -z $SB_MAX_PARALLEL ]] || log::require_int "--max-parallel" "$SB_MAX_PARALLEL" 1 || return 2
  [[ -z $SB_CPUS ]] || log::require_int "--cpus-per-task" "$SB_CPUS" 1 || return 2
  log::require_int "--signal-lead" "$SB_LEAD" 1 65535 || return 2
  log::require_int "--gpus-per-job" "$GPUS_PER_JOB" 1 64 || return 2
  slurm::_gres || return 2
  ((JOBS_PER_GPU == 1)) || problem="JOBS_PER_GPU must be 1 with --backend slurm (each task gets its GPUs from --gres), got '$JOBS_PER_GPU'"
  [[ -z $SB_TIME || $SB_TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$|^(UNLIMITED|INFINITE)$ ]] ||
    problem="--time must be a Slurm time limit like 90, 4:00:00 or 2-00:00:00, got '$SB_TIME'"
  [[ -z $SB_MEM || $SB_MEM =~ ^[0-9]+[KMGT]?$ ]] || problem="--mem must be a size like 32G or 16000M, got '$SB_MEM'"
  for pair in partition:SB_PARTITION account:SB_ACCOUNT qos:SB_QOS gres:SB_GRES; do
    var=${pair#*:} && value=${!var}
    [[ -z $value || $value =~ ^[A-Za-z0-9_.:,=-]+$ ]] || problem="--${pair%%:*} must be a Slurm name like gpu or gpu:a100:1 (letters, digits, _.:,=-), got '$value'"
  done
  for arg in "${SB_EXTRA[@]}"; do
    [[ $arg == --?* && $arg != *[$'\n"']* ]] || problem="--sbatch-arg must be one sbatch option like --constraint=a100 (no quotes or newlines), got '$arg'"
  done
  command -v sbatch >/dev/null 2>&1 || problem="--backend slurm needs Slurm's client commands (sbatch, squeue) on PATH; none found"
  [[ -z $problem ]] || { log::error "$problem"; return 2; }
}

# slurm::_gres — SB_GRES: gpu:GPUS_PER_JOB unless --gres (or SBATCH_GRES) says otherwise; a --gres whose
# GPU count is not GPUS_PER_JOB is an error (2, logged).
slurm::_gres() {
  if [[ -z $SB_GRES ]]; then
    SB_GRES=gpu:$GPUS_PER_JOB
  elif ((GPUS_PER_JOB > 1)) && [[ ! $SB_GRES =~ (^|,)gpu(:[^:,]+)?:$GPUS_PER_JOB(,|$) ]]; then
    log::error "--gpus-per-job $GPUS_PER_JOB asks for $GPUS_PER_JOB GPUs a task, but --gres (or SBATCH_GRES) is '$SB_GRES': give one of them, or a --gres with gpu:$GPUS_PER_JOB"
    return 2
  fi
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
  slurm::_same_gpus || return
  dir=$LOG_DIR/slurm_$LEDGER_TS
  [[ $dir == /* ]] || dir=$PWD/$dir
  [[ $dir != *[$'\n"']* && $PWD != *[$'\n"']* ]] || {
    log::error "the log folder and the current folder must not contain quotes or newlines for sbatch: $dir"
    return 2
  }
  mkdir -p -- "$dir"
  local requeue=false again=()
  [[ $SB_REQUEUE == false ]] || again=("--requeue" "--signal=B:USR1@$SB_LEAD")
  ((RETRIES == 0)) || again[0]=--requeue
  ((${#again[@]} == 0)) || again+=("--open-mode=append") # the task's .out keeps every run
  [[ $SB_REQUEUE == false ]] || requeue=true
  for job in "${SCHED_QUEUE[@]}"; do
    printf '%s\n' "${JOB[$job,name]}" "${JOB[$job,image]}" "${JOB[$job,text]}" "${JOB[$job,out]}" "${JOB[$job,marker]}" \
      "${JOB[$job,hash]}" "$LOG_DIR" "$requeue" "$SB_LEAD" "$RETRIES" >"$dir/task$k.meta"
    sched::argv "$job"
    slurm::_task_argv
    printf '%s\0' "${SB_ARGV[@]}" >"$dir/task$k.argv"
    k=$((k + 1))
  done
  last=$((k - 1))
  script="#!/usr/bin/env bash"$'\n'
  for line in "--job-name=mgpu-${LOG_DIR##*/}" "--array=0-$last${SB_MAX_PARALLEL:+%$SB_MAX_PARALLEL}" \
    "--gres=$SB_GRES" "--ntasks=1" "--chdir=\"$PWD\"" "--output=\"$dir/task_%a.out\"" "${again[@]}" \
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

# slurm::_same_gpus — every job of the array gets the same resources (one --gres for the whole array): a
# config asking for another number of GPUs than --gpus-per-job is an error (2, logged).
slurm::_same_gpus() {
  local job
  for job in "${SCHED_QUEUE[@]}"; do
    ((${JOB[$job,gpus]:-1} == GPUS_PER_JOB)) && continue
    log::error "${JOB[$job,name]} asks for ${JOB[$job,gpus]} GPU(s), but a Slurm job array gives each task the same --gres (--gpus-per-job $GPUS_PER_JOB): run such configs as a sweep of their own"
    return 2
  done
}

# slurm::_task_argv — a task's command into SB_ARGV: the job's (SCHED_ARGV) as is, or with GPUS_PER_JOB > 1
# and mgpu's trainer (... PYTHON -m mgpu.train_clip ARGS), train_torchrun.sh with one process a GPU of
# the task (torchrun gets --signal-lead seconds to let its workers save before it kills them).
slurm::_task_argv() {
  local i
  SB_ARGV=("${SCHED_ARGV[@]}")
  ((GPUS_PER_JOB > 1)) || return 0
  for ((i = 1; i + 1 < ${#SCHED_ARGV[@]}; i++)); do
    [[ ${SCHED_ARGV[i]} == -m && ${SCHED_ARGV[i + 1]} == mgpu.train_clip ]] || continue
    SB_ARGV=(env "PYTHON=${SCHED_ARGV[i - 1]}" "NPROC_PER_NODE=$GPUS_PER_JOB" "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SB_LEAD"
      bash "$MGPU_ROOT/train_torchrun.sh" "${SCHED_ARGV[@]:i+2}")
    return 0
  done
}

# slurm::dry_run DIR — the batch script and each task's exact command; nothing is submitted.
slurm::dry_run() {
  local dir=$1 k=0 job
  printf 'Plan: %d job(s) as one Slurm job array (%s a task); the batch script:\n' "${#SCHED_QUEUE[@]}" "$SB_GRES"
  sed 's/^/    /' "$dir/sweep.sbatch"
  for job in "${SCHED_QUEUE[@]}"; do
    mapfile -d '' -t SB_ARGV <"$dir/task$k.argv"
    printf 'task %d %s: ' "$k" "${JOB[$job,name]}"
    printf '%q ' "MGPU_CONFIG_NAME=${JOB[$job,name]}" "${SB_ARGV[@]}"
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
  local dir=$1 meta=() k job_id task state acct
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
    sched::set "$k" "hash=${meta[5]}"
    slurm::_task "$dir/task$k" "$k" "${queued[$k]:-}" "${accounted[$k]:-}"
  done
}

# slurm::_requeues BASE K — the task's requeues (BASE.requeues): their count is its retries, each one a
# failed attempt ("preempted (requeued) (exit 143 on GPU 0)"), their kinds its detail; into SB_DETAIL.
slurm::_requeues() {
  local class words code gpu _ n=0 fails=""
  SB_DETAIL=""
  if [[ -f $1.requeues ]]; then
    while IFS=$'\t' read -r class words code gpu _; do
      [[ -n $class ]] || continue
      n=$((n + 1)) fails+="$words (exit ${code:--}${gpu:+ on GPU $gpu})"$'\n'
      [[ ", $SB_DETAIL, " == *", $words, "* ]] || SB_DETAIL+="${SB_DETAIL:+, }$words"
    done <"$1.requeues"
  fi
  sched::set "$2" "retries=$n" "fails=$fails"
}

# slurm::_task BASE K SQUEUE_STATE SACCT_STATE — one task's record. Its result file is its end (it is
# written once the task will not run again); while Slurm holds the task pending again, that is its state.
slurm::_task() {
  local base=$1 k=$2 state=$3 acct=$4 started=() result=() status kind="" reason="Slurm job ${SB_JOB_ID}_$2" detail
  local lost="cancelled before it started, or its node failed"
  slurm::_requeues "$base" "$k"
  detail=$SB_DETAIL
  [[ ! -f $base.started ]] || mapfile -t started <"$base.started" # gpu node log start_ms restart
  [[ ! -f $base.result ]] || mapfile -t result <"$base.result"    # exit end_ms stop cause note
  if ((${#started[@]} >= 4)); then
    sched::set "$k" "gpu=${started[0]}" "log=${started[2]}" "since=$base.started"
    reason+=" on ${started[1]}"
  fi
  if ((${#result[@]} >= 3 && ${#started[@]} >= 4)) && [[ ! $state =~ ^(pending|requeued|requeue_hold|requeue_fed)$ ]]; then
    sched::set "$k" "exit=${result[0]}" "ms=$((result[1] - started[3]))"
    if ((result[0] == 0)); then
      status=succeeded
    elif [[ ${result[3]:-} == "time limit" || $acct == TIMEOUT ]]; then
      status=failed kind="time limit" detail+="${detail:+, }time limit (no requeue)"
    elif [[ ${result[3]:-} == preempted ]]; then
      status=interrupted kind=preempted detail+="${detail:+, }preempted (no requeue)"
    elif [[ -n ${result[2]} ]]; then
      status=interrupted kind="signal ${result[2]}"
    else
      status=failed kind=$(ledger::failure_kind "${started[2]}" "${result[0]}")
    fi
    [[ -z ${result[4]:-} ]] || detail+="${detail:+, }${result[4]}"
  elif [[ -n $state ]]; then
    status=$state
  elif [[ $acct =~ ^(PENDING|RUNNING|REQUEUED|SUSPENDED)$ ]]; then
    status=${acct,,}
  elif [[ $acct == CANCELLED ]]; then
    status=interrupted kind=cancelled
  elif [[ -n $acct ]]; then
    status=failed kind=${acct,,}
  else # its script never began, or began and ended on an error of its own (its output says which)
    ((${#started[@]} < 4)) || lost="it started: see ${base%/*}/task_$k.out"
    status=failed kind=lost reason+=": ended without writing its record ($lost)"
  fi
  sched::set "$k" "status=$status" "kind=$kind" "reason=$reason" "detail=$detail"
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
  for state in pending requeued running completing succeeded failed interrupted; do
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
