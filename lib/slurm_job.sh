# shellcheck shell=bash disable=SC2034  # SJ_* settings and results are shared with the scripts that source this
# slurm_job:: — the inside of an mgpu Slurm job: libexec/slurm_task.sh runs a sweep's task with it,
# train_slurm.sbatch a DDP run. The job's command runs in its own process group while this shell
# watches three things: the `--signal=B:USR1@LEAD` warning (the time limit is near, or a preemption
# notice), Slurm's own TERM, and the time left (`slurm_job::watch`). A stop reaches the command as
# SIGTERM, the trainer's "checkpoint at the next step boundary, then exit", on every process of it:
#   - never as USR1: NCCL can take SIGUSR1 for itself (NCCL_PROXY_DUMP_SIGNAL), and torchrun (torch
#     2.13) handles only TERM, INT, HUP and QUIT: USR1 kills torchrun at once, and its workers, though
#     they then get SIGTERM from the kernel (the trainer asks for it), no longer have its wait to save in;
#   - to each process, not only the process group: torchrun starts its workers in sessions of their
#     own (start_new_session), so a signal to torchrun's group misses every rank;
#   - through `scancel --signal=TERM JOB` for srun steps (train_slurm.sbatch): srun itself turns a TERM
#     into SIGKILL for its tasks, so the batch shell must not pass TERM to srun.
# The caller then requeues the job (`slurm_job::requeue`) or records its end. Needs core.sh.
#
# Settings the caller sets before slurm_job::run: SJ_LEAD (seconds a step plus a save need; default
# 60), SJ_REQUEUE (true: the caller requeues after a stop), SJ_DELIVER (tree: TERM to every process of
# the command; steps: scancel --signal=TERM to the job's srun steps), SJ_DEFER (1: hold a stop until
# the command catches SIGTERM, the trainer's handler), SJ_OUT (the output folder whose checkpoint_*.pt
# the watch reads), SJ_SINCE (a file whose time is this run's start), SJ_NOTE (a file the notes also go to),
# SJ_TEMP_FILES (the caller's temporary files: removed with the run's own when it ends, or when the shell
# exits during it, since the run's EXIT trap replaces the caller's).

SJ_LEAD=60 SJ_REQUEUE=false SJ_DELIVER=tree SJ_DEFER=0 SJ_OUT="" SJ_SINCE="" SJ_NOTE="" SJ_END="" SJ_END_READ=0
SJ_TEMP_FILES=()
SJ_PID="" SJ_RC=0 SJ_STOP="" SJ_CAUSE="" SJ_GOT="" SJ_ASKED=0 SJ_SENT=0 SJ_KILLED=0
SJ_WATCH_S=${MGPU_SLURM_WATCH_S:-5}

# slurm_job::note TEXT — one line on the job's output (and into SJ_NOTE, the job's log, when set).
slurm_job::note() {
  printf '[INFO] mgpu: %s\n' "$1"
  [[ -z $SJ_NOTE ]] || printf 'mgpu: %s\n' "$1" 2>/dev/null >>"$SJ_NOTE"
}

# slurm_job::_seconds TEXT — a Slurm duration ([days-]hours:minutes:seconds, minutes:seconds) as seconds
# into SJ_SECONDS; 1 for UNLIMITED, NOT_SET, INVALID or anything else.
slurm_job::_seconds() {
  [[ $1 =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 1
  SJ_SECONDS=$((10#${BASH_REMATCH[2]:-0} * 86400 + 10#${BASH_REMATCH[4]:-0} * 3600 + 10#${BASH_REMATCH[5]} * 60 + 10#${BASH_REMATCH[6]}))
}

# slurm_job::end_time — when the job's time limit ends, in epoch seconds, into SJ_END ("" when it has
# none or it cannot be read): SLURM_JOB_END_TIME where Slurm sets it, else the time left from squeue
# (%L), asked again at most every 30 s (a limit changed with scontrol update counts).
slurm_job::end_time() {
  local left
  if [[ ${SLURM_JOB_END_TIME:-} =~ ^[1-9][0-9]*$ ]]; then
    SJ_END=$SLURM_JOB_END_TIME
    return 0
  fi
  ((EPOCHSECONDS - SJ_END_READ >= 30)) || return 0
  SJ_END_READ=$EPOCHSECONDS SJ_END=""
  left=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %L 2>/dev/null) || return 0
  slurm_job::_seconds "$left" || return 0
  SJ_END=$((EPOCHSECONDS + SJ_SECONDS))
}

# slurm_job::tree PID — PID, the members of its process group and all their descendants, into SJ_TREE
# (torchrun's workers lead sessions of their own: only the parent links find them).
slurm_job::tree() {
  local stat pid ppid pgrp grew=1 have=" $1 "
  local -a procs=()
  for stat in /proc/[0-9]*/stat; do
    pid=${stat//[!0-9]/}
    core::proc_stat "$pid" || continue
    [[ ${CORE_STAT[0]} == Z ]] || procs+=("$pid ${CORE_STAT[1]} ${CORE_STAT[2]}")
  done
  while ((grew)); do
    grew=0
    for stat in "${procs[@]}"; do
      read -r pid ppid pgrp <<<"$stat"
      [[ $have != *" $pid "* ]] || continue
      if [[ $have == *" $ppid "* || $pgrp == "$1" ]]; then have+="$pid " grew=1; fi
    done
  done
  read -r -a SJ_TREE <<<"$have"
}

# slurm_job::_alive PID — is the process still running (not gone, not a zombie)?
slurm_job::_alive() {
  core::proc_stat "$1" && [[ ${CORE_STAT[0]} != Z ]]
}

# slurm_job::ready — can the command save now: does its process (the recording fork's child: the
# trainer, or torchrun, which passes TERM on to its workers once it has started them) catch SIGTERM?
slurm_job::ready() {
  local stat pid n=0
  for stat in /proc/[0-9]*/stat; do
    pid=${stat//[!0-9]/}
    core::proc_stat "$pid" || continue
    [[ ${CORE_STAT[1]} == "$SJ_PID" && ${CORE_STAT[0]} != Z ]] || continue
    slurm_job::catches_term "$pid" || return 1
    n=$((n + 1))
  done
  ((n))
}

# slurm_job::catches_term PID — does the process catch SIGTERM (its SigCgt mask)?
slurm_job::catches_term() {
  local line
  while read -r line; do
    [[ $line == SigCgt:* ]] || continue
    line=${line#SigCgt:} line=${line//[[:space:]]/}
    (((16#$line >> 14) & 1))
    return
  done 2>/dev/null <"/proc/$1/status"
  return 1
}

# slurm_job::_deliver SIGNAL — the signal to every process of the command (SJ_DELIVER tree), or TERM
# to the job's srun steps and their processes on every node (steps).
slurm_job::_deliver() {
  if [[ $SJ_DELIVER == steps && $1 == TERM ]]; then
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
    return 0
  fi
  slurm_job::tree "$SJ_PID"
  kill "-$1" "${SJ_TREE[@]}" 2>/dev/null || true
}

# slurm_job::interval — this run's last checkpoint interval in seconds into SJ_INTERVAL: between its
# two newest checkpoint_*.pt, else from its start to its first; "" before its first checkpoint.
slurm_job::interval() {
  local times=() start
  SJ_INTERVAL=""
  [[ -n $SJ_OUT && -n $SJ_SINCE && -d $SJ_OUT ]] || return 0
  mapfile -t times < <(find "$SJ_OUT" -maxdepth 1 -name 'checkpoint_*.pt' -newer "$SJ_SINCE" -printf '%T@\n' 2>/dev/null | sort -n)
  ((${#times[@]})) || return 0
  if ((${#times[@]} >= 2)); then start=${times[-2]}; else start=$(stat -c %Y -- "$SJ_SINCE" 2>/dev/null) || return 0; fi
  SJ_INTERVAL=$((${times[-1]%.*} - ${start%.*}))
}

# slurm_job::watch NOW — the time-limit watch: with --requeue, or while the time left is shorter than
# this run's last checkpoint interval (no periodic checkpoint can land before the end: the work since
# the last one would be lost), ask for a stop once SJ_LEAD seconds (and one watch period) are left.
slurm_job::watch() {
  local left
  slurm_job::end_time
  [[ -n $SJ_END ]] || return 0
  left=$((SJ_END - $1))
  ((left <= SJ_LEAD + SJ_WATCH_S)) || return 0
  if [[ $SJ_REQUEUE != true ]]; then # then only for a trainer, whose checkpoints tell what is at stake
    [[ -n $SJ_OUT ]] || return 0
    slurm_job::interval
    [[ -z $SJ_INTERVAL ]] || ((left < SJ_INTERVAL)) || return 0
  fi
  SJ_ASKED=$1 SJ_STOP=watch SJ_CAUSE="time limit"
  slurm_job::note "${left}s left before the time limit (--signal-lead $SJ_LEAD): asking the job to checkpoint and stop"
}

# slurm_job::_signals NOW — act on the signals this shell got: TERM/INT from Slurm go on at once (its
# KILL follows within KillWait); USR1 asks for a stop, at once or when the command catches TERM.
slurm_job::_signals() {
  local now=$1 sig left=""
  [[ -z $SJ_END ]] || left=$((SJ_END - now))
  for sig in $SJ_GOT; do
    if [[ $sig == USR1 ]]; then
      ((SJ_ASKED == 0)) || continue
      SJ_ASKED=$now SJ_STOP=USR1 SJ_CAUSE=preempted
      # Slurm sends the --signal warning LEAD to LEAD+30 s before the end (its time-limit check runs every 30 s)
      [[ -z $left ]] || ((left > SJ_LEAD + 45)) || SJ_CAUSE="time limit"
      slurm_job::note "got SIGUSR1 (${SJ_CAUSE/preempted/preemption notice}${left:+, ${left}s left}): asking the job to checkpoint and stop"
    elif ((SJ_SENT == 0)); then # TERM/INT from Slurm (after a stop of ours, Slurm's KILL is near anyway)
      ((SJ_ASKED)) || SJ_ASKED=$now
      SJ_STOP=$sig SJ_CAUSE=""
      [[ -z $left ]] || ((left > 5)) || SJ_CAUSE="time limit"
      slurm_job::_deliver TERM
      SJ_SENT=$now
    fi
  done
  SJ_GOT=""
}

# slurm_job::_tick NOW — signals, the watch, then a held stop delivered (the command catches TERM, half
# the lead has passed, or 15 s are left) and, SJ_LEAD seconds after our own stop, KILL for what is left.
slurm_job::_tick() {
  local now=$1
  slurm_job::_signals "$now"
  ((SJ_ASKED)) || slurm_job::watch "$now"
  if ((SJ_ASKED && !SJ_SENT)); then
    if ((!SJ_DEFER || now - SJ_ASKED >= SJ_LEAD / 2)) || slurm_job::ready ||
      { [[ -n $SJ_END ]] && ((SJ_END - now <= 15)); }; then
      slurm_job::_deliver TERM
      SJ_SENT=$now
    fi
  elif ((SJ_SENT && !SJ_KILLED)) && [[ $SJ_STOP == USR1 || $SJ_STOP == watch ]] && ((now - SJ_SENT > SJ_LEAD)); then
    slurm_job::note "the job did not stop within ${SJ_LEAD}s of SIGTERM (--signal-lead): KILL"
    slurm_job::_deliver KILL
    SJ_KILLED=1
  fi
}

# slurm_job::run LOG ARGV... — run the command (its own process group, output appended to LOG, or this
# shell's own output for "-") to its end under the watch above. SJ_RC is its exit status, SJ_STOP what stopped it (USR1, watch, TERM, INT,
# or "" when nothing did), SJ_CAUSE "preempted", "time limit" or "". Leaves no process of it behind.
slurm_job::run() {
  local log=$1 timer="" ended rc period end # (no timer when the command ended before the first look)
  shift
  SJ_GOT="" SJ_STOP="" SJ_CAUSE="" SJ_ASKED=0 SJ_SENT=0 SJ_KILLED=0 SJ_RC=0 SJ_END_READ=0
  slurm_job::end_time
  trap 'SJ_GOT+=" USR1"' USR1
  trap 'SJ_GOT+=" TERM"' TERM
  trap 'SJ_GOT+=" INT"' INT
  end=$(mktemp "${TMPDIR:-/tmp}/mgpu-slurm-job.XXXXXX")
  SJ_TEMP_FILES+=("$end")
  set -m # the command's own process group, led by a fork of this shell that records its exit status
  slurm_job::_job "$log" "$end" "$@" &
  SJ_PID=$!
  set +m
  trap 'slurm_job::_leftovers' EXIT # this shell failing must not leave the command running (an orphan escapes Slurm)
  while :; do
    if ! slurm_job::_alive "$SJ_PID"; then # it ended while a trap or a tick ran: `wait -n` may not report it
      wait "$SJ_PID" 2>/dev/null || true
      break
    fi
    period=$SJ_WATCH_S
    ((!SJ_ASKED)) || period=1 # a stop under way: see its end soon (Slurm's KillWait may follow)
    ((!SJ_ASKED || SJ_SENT)) || period=0.2 # a held stop: look for the trainer's handler often
    sleep "$period" &
    timer=$! ended="" rc=0
    wait -n -p ended "$SJ_PID" "$timer" || rc=$?
    if [[ ${ended:-} == "$SJ_PID" ]]; then
      SJ_RC=$rc
      break
    fi
    [[ ${ended:-} == "$timer" ]] || { kill "$timer" 2>/dev/null; wait "$timer" 2>/dev/null; } || true
    slurm_job::_tick "$EPOCHSECONDS"
  done
  [[ -z $timer ]] || { kill "$timer" 2>/dev/null; wait "$timer" 2>/dev/null; } || true
  # bash may lose a child's status when it ends while a trap runs (`wait` then says -1 or 127): the
  # command's own record has it
  read -r rc 2>/dev/null <"$end" && [[ $rc =~ ^[0-9]+$ ]] && SJ_RC=$rc
  slurm_job::_signals "$EPOCHSECONDS" # a signal that came with the end still names the cause
  slurm_job::_ended_by_slurm
  slurm_job::_leftovers
}

# slurm_job::_job LOG END ARGV... — the command's process: leader of its group, it runs the command
# (stdin /dev/null, output to LOG, or inherited for "-") and writes its exit status to END. TERM and INT
# are trapped, not ignored: the command keeps their default, and this process outlives it to record.
slurm_job::_job() {
  local log=$1 end=$2 rc=0
  shift 2
  set +eEm
  trap - ERR EXIT USR1
  trap : TERM INT
  if [[ $log == - ]]; then "$@" </dev/null || rc=$?; else "$@" </dev/null >>"$log" 2>&1 || rc=$?; fi
  printf '%s\n' "$rc" >"$end"
  exit "$rc"
}

# slurm_job::_ended_by_slurm — a command killed by a signal before this shell's own TERM trap ran (Slurm
# signals every process at once) still counts as stopped by Slurm when Slurm no longer runs the job.
slurm_job::_ended_by_slurm() {
  local state
  [[ -z $SJ_STOP ]] && ((SJ_RC > 128)) || return 0
  state=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %T 2>/dev/null) || return 0
  [[ -z $state || $state == RUNNING ]] && return 0
  SJ_GOT+=" TERM"
  slurm_job::_signals "$EPOCHSECONDS"
}

# slurm_job::_leftovers — KILL whatever of the command still runs (its group, their descendants); remove
# the temporary files (SJ_TEMP_FILES).
slurm_job::_leftovers() {
  ((${#SJ_TEMP_FILES[@]} == 0)) || rm -f -- "${SJ_TEMP_FILES[@]}"
  SJ_TEMP_FILES=()
  [[ -n $SJ_PID ]] || return 0
  slurm_job::tree "$SJ_PID"
  kill -KILL -- "-$SJ_PID" 2>/dev/null || true # the group, its leader included while it runs
  ((${#SJ_TREE[@]} <= 1)) || kill -KILL "${SJ_TREE[@]:1}" 2>/dev/null || true
}

# slurm_job::requeue — `scontrol requeue` this job: Slurm ends this run (TERM to this shell, which
# should exit now) and runs the job again, SLURM_RESTART_COUNT one higher, once a requeued job may
# start (AuthInfo cred_expire, 120 s by default). 1 with SJ_ERROR (scontrol's words) when refused.
slurm_job::requeue() {
  local out
  trap '' TERM USR1 # Slurm's TERM for this run is expected now
  out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1) && return 0
  SJ_ERROR=${out:-scontrol requeue failed}
  trap - TERM USR1
  return 1
}

# slurm_job::has_resume ARGV... — 0 when the command already names --resume.
slurm_job::has_resume() {
  local arg
  for arg in "$@"; do [[ $arg != --resume && $arg != --resume=* ]] || return 0; done
  return 1
}
