# shellcheck shell=bash disable=SC2034  # job records and results are read by ledger.sh, sweep.sh, slurm.sh
# sched:: — the one owner of job state. Runs queued jobs on GPU slots, at most JOBS_PER_GPU a GPU across
# every launcher on the machine (lease.sh), each job in its own process group, `wait -n` for job ends,
# waits for busy GPUs and held slots (bounded by MAX_WAIT), retries, and stops that lose nothing.
#
# A job's record is JOB[<i>,<field>], created by sched::add and changed only here (sched::set is the one
# door for entry scripts and the Slurm backend). Fields: name image text out marker hash (given); marker_old
# (where an earlier version put the marker: --resume reads it too); status (queued running
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
# shellcheck source=lib/place.sh
source "$MGPU_LIB/place.sh"
# shellcheck source=lib/sched_job.sh
source "$MGPU_LIB/sched_job.sh"
# shellcheck source=lib/sched_wait.sh
source "$MGPU_LIB/sched_wait.sh"
# shellcheck source=lib/sched_stop.sh
source "$MGPU_LIB/sched_stop.sh"
# shellcheck source=lib/sched_retry.sh
source "$MGPU_LIB/sched_retry.sh"

declare -A pids=()        # config name -> pid of its running job: the table of running jobs
declare -A JOB=()         # the job records (see above)
declare -A SCHED_BY_NAME=() SLOT_JOB=() SCHED_BASH_WORDS=() # bash's builtins and keywords: not plain commands
declare -a SCHED_SLOTS=() SCHED_QUEUE=() SCHED_ENDED=() SCHED_ARGV=()
SCHED_QHEAD=0
SCHED_LEFT=() # jobs whose command left processes running, JOB:PGID (sched::_leftovers)
SCHED_N=0 SCHED_RUNNING="" SCHED_STATE="" SCHED_STOP="" SCHED_AGAIN="" SCHED_TIMER="" SCHED_EXIT=0 SCHED_THREADS=1
SCHED_OWNER="" # the launcher's own pid ($BASHPID where sched::init ran): its traps act there only, not in its forks

# sched::init — the launcher's private folder (argv files, the jobs' end records), removed on every exit
# path by the EXIT trap set here; folders left by launchers that were killed are removed too. 2, logged,
# when TMPDIR cannot hold it.
sched::init() {
  local dir pid
  for dir in "${TMPDIR:-/tmp}"/mgpu-sched.*.*; do
    pid=${dir#*/mgpu-sched.} pid=${pid%%.*}
    [[ -O $dir && $pid =~ ^[0-9]+$ && ! -e /proc/$pid ]] && rm -rf -- "$dir"
  done
  if ! SCHED_STATE=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-sched.$$.XXXXXX" 2>&1); then
    log::error "TMPDIR '${TMPDIR:-/tmp}': cannot make the launcher's private folder there: ${SCHED_STATE##*: } (set TMPDIR to a writable folder)"
    SCHED_STATE=""
    return 2
  fi
  SCHED_OWNER=$BASHPID
  trap 'sched::_on_exit' EXIT
  core::sleep_fd "$SCHED_STATE" || true
  local word words
  words=$(compgen -b -k 2>/dev/null) # one read, then split: `read` would take the pipe a byte at a time
  for word in ${words//[![:alnum:]._:[$'\n']/}; do SCHED_BASH_WORDS[$word]=1; done
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
  local i=$SCHED_N
  SCHED_N=$((i + 1)) SCHED_NEW=$i SCHED_BY_NAME[$1]=$i
  JOB+=([$i,name]=$1 [$i,image]=$2 [$i,text]=$3 [$i,out]=$4 [$i,marker]=$5 [$i,marker_old]="" [$i,status]=queued [$i,retries]=0
    [$i,waited]=0 [$i,ready_at]=0 [$i,ms]=0 [$i,start_ms]=0 [$i,hash]="" [$i,exit]="" [$i,kind]="" [$i,detail]=""
    [$i,gpu]="" [$i,log]="" [$i,pid]="" [$i,slot]="" [$i,since]="" [$i,reason]="" [$i,avoid]="" [$i,fails]=""
    [$i,wait_since]="" [$i,tried_since]="" [$i,params]="" [$i,command]="")
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
  local job
  ((SCHED_N)) && [[ -z ${JOB[0,hash]} ]] || return 0
  local - sums lines=() line IFS=$'\n'
  # in one read (`read` takes a pipe one byte at a time: 17,000 reads for 200 jobs), then split in memory
  sums=$(cd "$SCHED_STATE" && sha256sum -- job*.argv) || true
  set -f
  # shellcheck disable=SC2206  # split at newlines only, no patterns: the names and sums hold neither
  lines=($sums)
  for line in "${lines[@]}"; do
    job=${line##*job}
    JOB[${job%.argv},hash]=${line%% *}
  done
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

# ---------------------------------------------------------------- filling slots and settling ends

# sched::_fill — start every queued job that can start now; arm a timer when some must wait. The queue is
# read from its head (SCHED_QHEAD, its first index: started jobs are unset there), so a fill that starts
# one job costs the same with 10 or 10,000 queued.
sched::_fill() {
  local i job gone=() need_timer=0 rc count=${#SCHED_QUEUE[@]}
  core::now_ms
  local now=$CORE_NOW_MS
  SCHED_SAMPLED=$((now - SCHED_SAMPLE_MS < 500 ? 1 : 0)) # one GPU sample serves fills for 500 ms
  # the head is right unless the queue was rebuilt (jobs put back in front): then it starts at 0 again
  if ((count)) && [[ -z ${SCHED_QUEUE[SCHED_QHEAD]+x} || -z ${SCHED_QUEUE[SCHED_QHEAD + count - 1]+x} ]]; then
    SCHED_QUEUE=("${SCHED_QUEUE[@]}") SCHED_QHEAD=0
  fi
  for ((i = SCHED_QHEAD; i < SCHED_QHEAD + count; i++)); do
    job=${SCHED_QUEUE[i]}
    if ((JOB[$job,ready_at] > now)); then
      need_timer=1
      continue
    fi
    ((${#SLOT_JOB[@]} < ${#SCHED_SLOTS[@]})) || break # every slot runs a job of ours: the rest waits
    sched::_pick "$job" "$now"
    if [[ -n $SCHED_PICK ]]; then
      sched::_started_after_wait "$job" "$now"
      sched::_launch "$job" || true # started (or recorded as unable to): never queued twice
      gone+=("$i") && continue
    elif [[ $SCHED_PICK_WHY == broken ]]; then
      JOB[$job,status]=failed JOB[$job,kind]="could not start" JOB[$job,reason]="no usable GPU slot (see the errors above)"
      SCHED_ENDED+=("$job")
      gone+=("$i") && continue
    elif [[ $SCHED_PICK_WHY == wait ]] && sched::_waits "$job" "$now"; then
      rc=0
      sched::_expired "$job" || rc=$?
      ((rc != 0)) || { sched::_launch "$job" || true; gone+=("$i") && continue; }
      ((rc != 1)) || { gone+=("$i") && continue; } # recorded as skipped or failed: the next job may go
    fi
    [[ $SCHED_PICK_WHY == full ]] || need_timer=1
    break
  done
  for i in "${gone[@]}"; do unset "SCHED_QUEUE[i]"; done
  # started from the head: the head moves on; from further in: the queue closes up (rare)
  if ((${#gone[@]})) && [[ ${gone[-1]} == $((SCHED_QHEAD + ${#gone[@]} - 1)) ]]; then
    SCHED_QHEAD=$((SCHED_QHEAD + ${#gone[@]}))
  elif ((${#gone[@]})); then
    SCHED_QUEUE=("${SCHED_QUEUE[@]}") SCHED_QHEAD=0
  fi
  for i in "${!LEASE_KEPT[@]}"; do [[ -n ${SLOT_JOB[$i]:-} ]] || lease::drop "$i"; done # no job: let go
  sched::_timer "$need_timer"
}

# sched::_timer NEEDED — arm the wake-up timer (a `sleep` child: `wait -n` wakes when it ends): every
# MGPU_TICK_MS while a job waits, every MGPU_POLL_MS while jobs run (on GPUs their memory is sampled). On
# the CPU too: a job bash has announced as killed ("Killed", after a foreground command of the launcher)
# is never reported by `wait -n` while other jobs run, and the timer's end is when sched::_reap finds it.
sched::_timer() {
  local ms=$MGPU_TICK_MS
  [[ -z $SCHED_TIMER ]] || return 0
  if (($1 == 0)); then
    ((${#pids[@]})) || return 0
    ms=$MGPU_POLL_MS
  fi
  core::seconds "$ms"
  (lease::close_others && exec sleep "$CORE_SECONDS") & # holds no lease
  SCHED_TIMER=$!
}
# sched::_settle — the records of ended jobs: summary record, progress line, and a failed job's last log
# lines. Kept off the path from a job's end to the next start on its GPU. The job wrote its marker
# itself; should that have failed (a full disk), the launcher writes it.
sched::_settle() {
  local job took
  for job in "${SCHED_ENDED[@]}"; do
    SCHED_ENDED=("${SCHED_ENDED[@]:1}")
    if [[ ${JOB[$job,status]} == succeeded ]] && ! ledger::is_done "$job"; then
      ledger::mark_done "$job" || { ledger::why_not "${JOB[$job,marker]}" && log::warn "${JOB[$job,name]}: cannot write its completion marker ${JOB[$job,marker]} ($LEDGER_WHY): --resume will run it again"; }
    fi
    printf -v took '%d.%03d' $((JOB[$job,ms] / 1000)) $((JOB[$job,ms] % 1000))
    sched::_record "$job"
    if [[ ${JOB[$job,status]} == skipped ]]; then
      ledger::event "skipped ${JOB[$job,name]}: ${JOB[$job,reason]}"
    else
      ledger::event "${JOB[$job,status]} ${JOB[$job,name]} (exit ${JOB[$job,exit]:--}${JOB[$job,kind]:+, ${JOB[$job,kind]}}${JOB[$job,detail]:+, ${JOB[$job,detail]}}, ${took}s)"
    fi
    [[ ${JOB[$job,status]} != failed ]] || ledger::show_tail "$job"
  done
}

# sched::_record JOB — the job's summary record and its end event (`--status` reads those). A second call
# (a detail added later: processes it left running) replaces both; the job is counted once.
sched::_record() {
  ledger::record "$1"
  ledger::ev end "${JOB[$1,name]}" "${JOB[$1,status]}" "${JOB[$1,exit]}" "${JOB[$1,kind]}" \
    "${JOB[$1,detail]:-${JOB[$1,reason]}}" "${JOB[$1,ms]}"
}

# ---------------------------------------------------------------- the loop

# sched::run — run the queue to the end (or to a signal); the summary is written either way, and
# SCHED_EXIT set: 0 every job succeeded (or was done earlier), 1 some did not, 129/130/143 stopped by
# SIGHUP (the terminal closed), SIGINT or SIGTERM. A reader of the launcher's output that goes away
# (`2>&1 | tee` ended by the same Ctrl-C, `| head`) neither kills it nor stops the sweep: SIGPIPE is
# trapped, so its writes fail and are lost (log::_emit), while the jobs, their logs and the summary files
# carry on. (A default SIGPIPE would end the launcher at once, its jobs left running as orphans.)
sched::run() {
  SCHED_RUNNING=1
  GPU_WANT_PROCS=1 # nvidia-smi's per-process list too: each job's memory (its peak, reservations)
  sched::hash_jobs
  ledger::events_begin
  sched::_traps
  while ((${#SCHED_QUEUE[@]} || ${#pids[@]})) && [[ -z $SCHED_STOP ]]; do
    sched::_fill
    sched::_settle
    [[ -z $SCHED_STOP ]] || break
    ((${#SCHED_QUEUE[@]} || ${#pids[@]})) || break
    sched::_wait_one
  done
  [[ -z $SCHED_STOP ]] || sched::term_all # a job forked while the trap ran
  lease::drop_all # no slot is ours any more: the jobs left hold their own leases
  sched::_settle
  if [[ -n $SCHED_STOP ]]; then
    log::warn "got SIG$SCHED_STOP: no new jobs start"
    sched::stop_all
  else
    sched::_leftovers
    if [[ -n $SCHED_STOP ]]; then # a stop during that second: what they left gets it too
      log::warn "got SIG$SCHED_STOP"
      sched::stop_all
    fi
  fi
  [[ -z $SCHED_TIMER ]] || kill "$SCHED_TIMER" 2>/dev/null || true
  sched::close_ties
  sched::finish
}

# sched::_traps — the launcher's traps while jobs run. SIGPIPE is trapped, not ignored: the jobs' commands
# get its default back.
sched::_traps() {
  trap 'sched::_signal INT' INT
  trap 'sched::_signal TERM' TERM
  trap 'sched::_signal HUP' HUP # under nohup, ignored: the sweep goes on
  trap : PIPE
}

# sched::_signal SIG — the launcher's INT, TERM or HUP: no new job starts, every running one gets TERM. A
# fork of the launcher that gets one before it has set its own traps (a job's process, the timer, a pipe's
# end) does nothing: the launcher got it too (a Ctrl-C reaches its whole process group), or its stop sent
# it, and then a job's process finds the stop's file and never starts its command.
sched::_signal() {
  [[ $BASHPID == "$SCHED_OWNER" ]] || return 0
  SCHED_STOP=${SCHED_STOP:-$1}
  sched::term_all
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
    HUP) SCHED_EXIT=129 ;;
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
  # A fork of the launcher (a job's process before it clears this trap) that a Ctrl-C ends: not the
  # launcher's exit. Stopping the jobs, the summary and the private folder are the launcher's.
  [[ $BASHPID == "$SCHED_OWNER" ]] || return 0
  set +eEu # nothing in here may cut the stop short: a job left running would be an orphan
  trap - EXIT INT TERM
  trap : HUP PIPE # a hangup during this stop: it goes on
  if ((${#pids[@]})); then
    SCHED_STOP=${SCHED_STOP:-EXIT}
    sched::stop_all
  fi
  [[ -z $SCHED_RUNNING || -n $LEDGER_FINISHED ]] || { sched::_settle && sched::finish; }
  [[ -z $SCHED_STATE ]] || rm -rf -- "$SCHED_STATE"
  exit "$rc"
}
