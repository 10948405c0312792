# shellcheck shell=bash disable=SC2034  # job records and results are read by ledger.sh, sweep.sh, slurm.sh
# sched:: — the one owner of job state. Runs queued jobs on GPU slots, at most JOBS_PER_GPU a GPU across
# every launcher on the machine (lease.sh), each job in its own process group, `wait -n` for job ends,
# waits for busy GPUs and held slots (bounded by MAX_WAIT), retries, and stops that lose nothing.
#
# A job's record is JOB[<i>,<field>], created by sched::add and changed only here (sched::set is the one
# door for the Slurm backend). Fields: name image text out marker hash (given); status (queued running
# succeeded failed skipped interrupted) exit kind (failure kind) detail retries gpu log pid start_ms ms
# waited reason ready_at avoid fails wait_since next_note since (a file whose time is the job's start)
# params (the varying hyper-parameters, compact JSON) command (the job's line, for gpu_queue.sh).
# The running jobs are the `pids` table (config name -> pid), which the wait loop and the stop path read.
# Each job is a fork of the launcher that runs the command, then records its own end (exit status, and
# the completion marker when it succeeded): work that finishes after the launcher died is never redone.
#
# Entry scripts set SCHED_SLOTS=(0:0 1:0 0:1 1:1) (GPU:slot, in launch-preference order; cpu:N without
# GPU), then call sched::init, sched::add for each job, and sched::run; SCHED_EXIT is the exit status.
# Settings: MAX_UTIL MAX_WAIT ON_TIMEOUT(run|skip|fail) RETRIES GRACE, and core.sh's MGPU_* tuning.

# shellcheck source=lib/core.sh
[[ -n ${MGPU_LIB:-} ]] || source "${BASH_SOURCE[0]%/*}/core.sh"
# shellcheck source=lib/gpu.sh
source "$MGPU_LIB/gpu.sh"
# shellcheck source=lib/lease.sh
source "$MGPU_LIB/lease.sh"
# shellcheck source=lib/ledger.sh
source "$MGPU_LIB/ledger.sh"
# shellcheck source=lib/sched_wait.sh
source "$MGPU_LIB/sched_wait.sh"

declare -A pids=()        # config name -> pid of its running job: the table of running jobs
declare -A JOB=()         # the job records (see above)
declare -A SCHED_BY_NAME=() SLOT_JOB=()
declare -a SCHED_SLOTS=() SCHED_QUEUE=() SCHED_ENDED=() SCHED_ARGV=()
SCHED_N=0 SCHED_RUNNING="" SCHED_STATE="" SCHED_STOP="" SCHED_AGAIN="" SCHED_TIMER="" SCHED_EXIT=0 SCHED_THREADS=1

# sched::init — the launcher's private folder (argv files, the jobs' end records), removed on every exit
# path by the EXIT trap set here; folders left by launchers that were killed are removed too.
sched::init() {
  local dir pid
  for dir in "${TMPDIR:-/tmp}"/mgpu-sched.*.*; do
    pid=${dir#*/mgpu-sched.} pid=${pid%%.*}
    [[ -O $dir && $pid =~ ^[0-9]+$ && ! -e /proc/$pid ]] && rm -rf -- "$dir"
  done
  SCHED_STATE=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-sched.$$.XXXXXX") || return 1
  trap 'sched::_on_exit' EXIT
  core::sleep_fd "$SCHED_STATE" || true
  ledger::begin
  ledger::version
}

# sched::add NAME IMAGE TEXT OUTPUT_DIR MARKER -- ARGV... — queue one job; its hash (of its exact argv)
# decides --resume.
sched::add() {
  sched::new "$1" "$2" "$3" "$4" "$5"
  shift 6
  printf '%s\0' "$@" >"$SCHED_STATE/job$SCHED_NEW.argv"
  SCHED_QUEUE+=("$SCHED_NEW")
}

# sched::new NAME IMAGE TEXT OUTPUT_DIR MARKER — a new record (index SCHED_NEW), status queued.
sched::new() {
  local i=$SCHED_N field
  SCHED_N=$((i + 1)) SCHED_NEW=$i SCHED_BY_NAME[$1]=$i
  JOB[$i,name]=$1 JOB[$i,image]=$2 JOB[$i,text]=$3 JOB[$i,out]=$4 JOB[$i,marker]=$5
  for field in hash exit kind detail gpu log pid slot since reason avoid fails wait_since tried_since params command; do JOB[$i,$field]=""; done
  JOB[$i,status]=queued JOB[$i,retries]=0 JOB[$i,waited]=0 JOB[$i,ready_at]=0 JOB[$i,ms]=0 JOB[$i,start_ms]=0
}

# sched::reset — no jobs (the Slurm backend rebuilds its records from the tasks' files at every look).
sched::reset() {
  JOB=() SCHED_BY_NAME=() SCHED_QUEUE=() SCHED_ENDED=() LEDGER_JSON=() LEDGER_ROW=() LEDGER_TSV=()
  SCHED_N=0 LEDGER_DONE=0 LEDGER_RAN=0 LEDGER_RAN_MS=0 LEDGER_FAILED=0
}

# sched::set JOB FIELD=VALUE... — change a record from outside this file (the Slurm backend's collect).
sched::set() {
  local job=$1 pair
  shift
  for pair in "$@"; do JOB[$job,${pair%%=*}]=${pair#*=}; done
}

# sched::hash_jobs — every job's hash (of its exact argv), in one sha256sum call.
sched::hash_jobs() {
  local sum file job
  ((SCHED_N)) && [[ -z ${JOB[0,hash]} ]] || return 0
  while read -r sum file; do
    job=${file#job}
    JOB[${job%.argv},hash]=$sum
  done < <(cd "$SCHED_STATE" && sha256sum -- job*.argv)
}

# sched::argv JOB — the job's argv into the global array SCHED_ARGV.
sched::argv() { mapfile -d '' -t SCHED_ARGV <"$SCHED_STATE/job$1.argv"; }

# sched::mark JOB STATUS [REASON] — a job that will not run (skipped, or failed before it started) is
# recorded as such now.
sched::mark() {
  JOB[$1,status]=$2
  [[ -z ${3:-} ]] || JOB[$1,reason]=$3
  ledger::record "$1"
}

# ---------------------------------------------------------------- launching

# sched::_prepare JOB GPU — what must exist before the job's process starts: a new log file, its output
# folder, its marker's folder, and the open lock file of its folder (SCHED_DIR_LOCK, SCHED_DIR_FD). 1 with
# SCHED_CAUSE (the true cause, e.g. "File name too long") when the job cannot start; the log says it too.
sched::_prepare() {
  local job=$1 out=${JOB[$1,out]} marker=${JOB[$1,marker]} err
  SCHED_CAUSE="" SCHED_DIR_FD="" LEDGER_LOG=""
  if ! ledger::log_path "${JOB[$job,name]}" "$2"; then
    SCHED_CAUSE=$LEDGER_ERROR
    return 1
  fi
  if [[ -n $out && ! -d $out ]] && ! err=$(mkdir -p -- "$out" 2>&1); then
    SCHED_CAUSE="cannot make its output folder: ${err##*: }"
  elif [[ ! -d ${marker%/*} ]] && ! err=$(mkdir -p -- "${marker%/*}" 2>&1); then
    SCHED_CAUSE="cannot make the folder of its completion marker: ${err##*: }"
  else
    SCHED_DIR_LOCK=${out:+$out/.mgpu.lock}
    [[ -n $out ]] || SCHED_DIR_LOCK=$marker.lock
    if lease::_open "$SCHED_DIR_LOCK" "the lock of ${JOB[$job,name]}" 2>/dev/null; then
      SCHED_DIR_FD=$LEASE_OPEN_FD
      return 0
    fi
    SCHED_CAUSE="its lock file $SCHED_DIR_LOCK is not a regular file or cannot be made"
  fi
  printf 'mgpu: %s could not start: %s\n' "${JOB[$job,name]}" "$SCHED_CAUSE" 2>/dev/null >>"$LEDGER_LOG"
  return 1
}

# sched::_launch JOB SLOT — start the job on the slot (its lease, if taken, is in LEASE_FD).
sched::_launch() {
  local job=$1 s=$2 gpu=${SCHED_SLOTS[$2]%%:*} pid visible
  visible=$gpu
  [[ $gpu != cpu ]] || visible=""
  if ! sched::_prepare "$job" "$gpu"; then
    [[ -z $LEASE_FD ]] || exec {LEASE_FD}<&-
    LEASE_FD=""
    JOB[$job,status]=failed JOB[$job,kind]="could not start" JOB[$job,reason]=$SCHED_CAUSE JOB[$job,gpu]=$gpu
    JOB[$job,log]=$LEDGER_LOG
    SCHED_ENDED+=("$job")
    log::error "${JOB[$job,name]} could not start: $SCHED_CAUSE"
    return 0
  fi
  sched::argv "$job"
  JOB[$job,since]=$SCHED_STATE/job$job.start
  : >"${JOB[$job,since]}" # its time is the job's start: only a metrics.json newer than it is this run's
  # Job control on for this one fork: the job leads its own process group (its pid is the group id), so a
  # stop reaches every process it started, and SIGINT is not ignored in it as in plain `&` jobs.
  set -m
  sched::_job "$job" "$visible" "$gpu" &
  pid=$!
  set +m
  [[ -z $LEASE_FD ]] || exec {LEASE_FD}<&-
  exec {SCHED_DIR_FD}<&-
  LEASE_FD=""
  SLOT_JOB[$s]=$job pids[${JOB[$job,name]}]=$pid
  core::now_ms
  JOB[$job,pid]=$pid JOB[$job,slot]=$s JOB[$job,status]=running JOB[$job,gpu]=$gpu JOB[$job,log]=$LEDGER_LOG
  JOB[$job,start_ms]=$CORE_NOW_MS
  GPU_OURS_UNTIL[$gpu]=9999999999999
  local where="GPU $gpu"
  [[ $gpu != cpu ]] || where="the CPU"
  ledger::ev start "${JOB[$job,name]}" "$gpu" "$LEDGER_LOG" "$CORE_NOW_MS"
  ledger::event "started ${JOB[$job,name]} on $where (log $LEDGER_LOG)"
}

# sched::_job JOB VISIBLE GPU — the job's own process: a fork of the launcher, leader of its process group.
# It takes the slot's lease (another launcher may have it: then it ends at once, saying so) and the lock
# of the job's folder for the whole run (another run of it: "running elsewhere"), runs the command, and
# writes the completion marker (on success) and its end record itself. TERM and INT are
# trapped, not ignored: the command keeps their default, and this process outlives it to record its end.
sched::_job() {
  local job=$1 rc=0 end=$SCHED_STATE/job$1.end
  set +eEm
  trap - ERR EXIT
  trap : INT TERM
  if [[ -n $LEASE_FD ]]; then lease::lock "$LEASE_FD" "$SCHED_LEASE_FILE" || rc=$?; fi
  if ((rc == 0)); then
    lease::lock "$SCHED_DIR_FD" "$SCHED_DIR_LOCK" || rc=$?
    ((rc != 1)) || rc=76 # held: the folder's lock this time, not the slot's
  fi
  if ((rc)); then
    local note="stopped before it started"
    ((rc != 1)) || note="slot held by $LEASE_HOLDER"
    ((rc != 76)) || note="running elsewhere ($LEASE_HOLDER)"
    printf '%s\t%s\t%s\n' "$rc" "${EPOCHREALTIME/./}" "$note" >"$end"
    exit "$rc"
  fi
  ledger::header "$job" "$3" "$2" "${SCHED_ARGV[@]}" >>"$LEDGER_LOG"
  CUDA_VISIBLE_DEVICES=$2 CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=${JOB[$job,name]} MGPU_GPU=$3 \
    OMP_NUM_THREADS=$SCHED_THREADS "${SCHED_ARGV[@]}" </dev/null >>"$LEDGER_LOG" 2>&1
  rc=$?
  ((rc)) || printf '%s\n' "${JOB[$job,hash]}" 2>/dev/null >"${JOB[$job,marker]}"
  printf '%s\t%s\t\n' "$rc" "${EPOCHREALTIME/./}" 2>/dev/null >"$end"
  exit "$rc"
}

# ---------------------------------------------------------------- filling slots

# sched::_fill — start every queued job that can start now; arm a timer when some must wait.
sched::_fill() {
  local i job rest=() need_timer=0
  core::now_ms
  local now=$CORE_NOW_MS
  SCHED_SAMPLED=$((now - SCHED_SAMPLE_MS < 500 ? 1 : 0)) # one GPU sample serves fills for 500 ms
  for i in "${!SCHED_QUEUE[@]}"; do
    job=${SCHED_QUEUE[i]}
    if ((JOB[$job,ready_at] > now)); then
      rest+=("$job") need_timer=1
      continue
    fi
    sched::_pick "$job" "$now"
    if [[ -n $SCHED_PICK ]]; then
      sched::_started_after_wait "$job" "$now"
      sched::_launch "$job" "$SCHED_PICK"
    elif [[ $SCHED_PICK_WHY == wait ]] && sched::_waits "$job" "$now"; then
      sched::_expired "$job" || continue # recorded as skipped or failed: the next job may go
      sched::_launch "$job" "$SCHED_PICK"
    elif [[ $SCHED_PICK_WHY == broken ]]; then
      JOB[$job,status]=failed JOB[$job,kind]="could not start" JOB[$job,reason]="no usable GPU slot (see the errors above)"
      SCHED_ENDED+=("$job")
    else
      rest+=("${SCHED_QUEUE[@]:i}")
      [[ $SCHED_PICK_WHY == full ]] || need_timer=1
      break
    fi
  done
  SCHED_QUEUE=("${rest[@]}")
  if ((need_timer)) && [[ -z $SCHED_TIMER ]]; then
    core::seconds "$MGPU_TICK_MS"
    sleep "$CORE_SECONDS" &
    SCHED_TIMER=$!
  fi
}

# ---------------------------------------------------------------- ending

# sched::_ended PID STATUS — a job's process ended: free its slot, then queue it again (retry) or leave
# it to sched::_settle, which records it once the freed slot has its next job.
sched::_ended() {
  local pid=$1 rc=$2 name job s gpu other still=0 end=() note=""
  for name in "${!pids[@]}"; do [[ ${pids[$name]} != "$pid" ]] || break; done
  job=${SCHED_BY_NAME[$name]} s=${JOB[$job,slot]} gpu=${JOB[$job,gpu]}
  unset "pids[$name]" "SLOT_JOB[$s]"
  for other in "${SLOT_JOB[@]}"; do [[ ${JOB[$other,gpu]} != "$gpu" ]] || still=1; done
  core::now_ms
  ((still)) || GPU_OURS_UNTIL[$gpu]=$((CORE_NOW_MS + 2000))
  # The job's own end record knows what bash may have lost (a job reaped while bash printed "Killed").
  [[ ! -f $SCHED_STATE/job$job.end ]] || IFS=$'\t' read -r -a end <"$SCHED_STATE/job$job.end" || true
  if ((rc == 127)) && ((${#end[@]})); then rc=${end[0]}; fi
  note=${end[2]:-}
  : >"$SCHED_STATE/job$job.end" # read once: a retry's record is its own
  JOB[$job,exit]=$rc JOB[$job,ms]=$((CORE_NOW_MS - JOB[$job,start_ms])) JOB[$job,pid]=""
  if [[ $note == "slot held by "* ]]; then
    sched::_held "$job" "$s" "${note#slot held by }"
    return 0
  elif [[ $note == "running elsewhere"* ]]; then
    JOB[$job,status]=skipped JOB[$job,reason]=$note JOB[$job,exit]=""
    rm -f -- "${JOB[$job,log]}"
    JOB[$job,log]=""
  elif [[ -n $SCHED_STOP ]]; then
    JOB[$job,status]=interrupted
    [[ $note != "stopped before it started" ]] || JOB[$job,detail]=$note
    sched::_stop_detail "$job" "$rc"
  elif ((rc == 0)); then
    JOB[$job,status]=succeeded JOB[$job,kind]=""
  else
    JOB[$job,kind]=$(ledger::failure_kind "${JOB[$job,log]}" "$rc")
    JOB[$job,fails]+="${JOB[$job,kind]} on GPU $gpu"$'\n'
    if ((JOB[$job,retries] < RETRIES)); then
      JOB[$job,retries]=$((JOB[$job,retries] + 1))
      JOB[$job,avoid]=$gpu JOB[$job,status]=queued
      JOB[$job,ready_at]=$((CORE_NOW_MS + MGPU_RETRY_BACKOFF_MS * (1 << (JOB[$job,retries] - 1))))
      SCHED_QUEUE=("$job" "${SCHED_QUEUE[@]}")
      ledger::ev retry "$name" "${JOB[$job,retries]}" "${JOB[$job,kind]}"
      ledger::event "retrying $name (${JOB[$job,kind]}, exit $rc on GPU $gpu; retry ${JOB[$job,retries]} of $RETRIES, preferring another GPU)"
      return 0
    fi
    JOB[$job,status]=failed
  fi
  SCHED_ENDED+=("$job")
}

# sched::_settle — the records of ended jobs: summary record, progress line, and a failed job's last log
# lines. Kept off the path from a job's end to the next start on its GPU. The job wrote its marker
# itself; should that have failed (a full disk), the launcher writes it.
sched::_settle() {
  local job took
  for job in "${SCHED_ENDED[@]}"; do
    SCHED_ENDED=("${SCHED_ENDED[@]:1}")
    if [[ ${JOB[$job,status]} == succeeded ]] && ! ledger::is_done "$job"; then
      ledger::mark_done "$job" || log::warn "${JOB[$job,name]}: cannot write its completion marker ${JOB[$job,marker]}"
    fi
    printf -v took '%d.%03d' $((JOB[$job,ms] / 1000)) $((JOB[$job,ms] % 1000))
    ledger::record "$job"
    ledger::ev end "${JOB[$job,name]}" "${JOB[$job,status]}" "${JOB[$job,exit]}" "${JOB[$job,kind]}" \
      "${JOB[$job,detail]:-${JOB[$job,reason]}}" "${JOB[$job,ms]}"
    if [[ ${JOB[$job,status]} == skipped ]]; then
      ledger::event "skipped ${JOB[$job,name]}: ${JOB[$job,reason]}"
    else
      ledger::event "${JOB[$job,status]} ${JOB[$job,name]} (exit ${JOB[$job,exit]:--}${JOB[$job,kind]:+, ${JOB[$job,kind]}}${JOB[$job,detail]:+, ${JOB[$job,detail]}}, ${took}s)"
    fi
    [[ ${JOB[$job,status]} != failed ]] || ledger::show_tail "$job"
  done
}

# ---------------------------------------------------------------- the loop

# sched::run — run the queue to the end (or to a signal); the summary is written either way, and
# SCHED_EXIT set: 0 every job succeeded (or was done earlier), 1 some did not, 130/143 interrupted.
sched::run() {
  SCHED_RUNNING=1
  sched::hash_jobs
  ledger::events_begin
  trap 'SCHED_STOP=${SCHED_STOP:-INT}' INT
  trap 'SCHED_STOP=${SCHED_STOP:-TERM}' TERM
  while ((${#SCHED_QUEUE[@]} || ${#pids[@]})) && [[ -z $SCHED_STOP ]]; do
    sched::_fill
    sched::_settle
    [[ -z $SCHED_STOP ]] || break
    ((${#SCHED_QUEUE[@]} || ${#pids[@]})) || break
    sched::_wait_one
  done
  sched::_settle
  if [[ -n $SCHED_STOP ]]; then
    log::warn "got SIG$SCHED_STOP: no new jobs start"
    sched::stop_all
  fi
  [[ -z $SCHED_TIMER ]] || kill "$SCHED_TIMER" 2>/dev/null || true
  sched::finish
}

# sched::finish — every job still queued is recorded as never started; the summary; SCHED_EXIT.
sched::finish() {
  local job bad=0
  for job in "${SCHED_QUEUE[@]}"; do
    sched::mark "$job" interrupted "never started"
    ledger::ev end "${JOB[$job,name]}" interrupted "" "" "never started" 0
  done
  SCHED_QUEUE=()
  ledger::finish
  for ((job = 0; job < SCHED_N; job++)); do
    [[ ${JOB[$job,status]} == succeeded || ${JOB[$job,reason]} == "done earlier (--resume)" ]] || bad=1
  done
  case $SCHED_STOP in
    INT) SCHED_EXIT=130 ;;
    TERM) SCHED_EXIT=143 ;;
    *) SCHED_EXIT=$bad ;;
  esac
  core::now_ms
  ledger::ev finish "$CORE_NOW_MS" "$SCHED_EXIT"
}

# An exit of the launcher itself (an error, or an entry script's `exit` before or after the sweep) still
# stops every job, writes the summary once jobs were recorded, and removes the private folder.
sched::_on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if ((${#pids[@]})); then
    SCHED_STOP=${SCHED_STOP:-EXIT}
    sched::stop_all
  fi
  [[ -z $SCHED_RUNNING || -n $LEDGER_FINISHED ]] || { sched::_settle && sched::finish; }
  [[ -z $SCHED_STATE ]] || rm -rf -- "$SCHED_STATE"
  exit "$rc"
}
