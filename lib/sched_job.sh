# shellcheck shell=bash disable=SC2034  # part of sched.sh: the same job records and globals
# sched:: (continued) — a job's life: what must exist before it starts, its launch on the slots sched::_pick
# chose, the job's own process (a fork of the launcher that records its end itself), and its end. Sourced
# by sched.sh only.

declare -A JOB pids SLOT_JOB GPU_OURS_UNTIL LEASE_KEPT LEASE_LOCKED SCHED_BASH_WORDS # sched.sh's job records and tables (declared there and in sched_wait.sh)

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
    SCHED_CAUSE="its lock file $SCHED_DIR_LOCK: $LEASE_OPEN_WHY"
  fi
  printf 'mgpu: %s could not start: %s\n' "${JOB[$job,name]}" "$SCHED_CAUSE" 2>/dev/null >>"$LEDGER_LOG"
  return 1
}

# sched::_launch JOB — start the job on the slots of SCHED_PICK (their lease files open in LEASE_FDS,
# its memory reserved in LEASE_RESERVATIONS).
sched::_launch() {
  local job=$1 slot devs=() pid visible gpus i
  for slot in $SCHED_PICK; do devs+=("${slot%:*}"); done
  printf -v gpus '%s,' "${devs[@]}"
  gpus=${gpus%,} visible=$gpus
  [[ $gpus != cpu ]] || visible=""
  JOB[$job,since]="" # no start file: no metrics.json is this attempt's until its command starts
  if ! sched::_prepare "$job" "$gpus"; then
    sched::_release
    ((${#LEASE_RESERVATIONS[@]} == 0)) || rm -f -- "${LEASE_RESERVATIONS[@]}"
    JOB[$job,status]=failed JOB[$job,kind]="could not start" JOB[$job,reason]=$SCHED_CAUSE JOB[$job,gpu]=$gpus
    JOB[$job,log]=$LEDGER_LOG
    SCHED_ENDED+=("$job")
    log::error "${JOB[$job,name]} could not start: $SCHED_CAUSE"
    return 0
  fi
  sched::argv "$job"
  sched::_tie "${SCHED_PICK%% *}"
  # Job control on for this one fork: the job leads its own process group (its pid is the group id), so a
  # stop reaches every process it started, and SIGINT is not ignored in it as in plain `&` jobs.
  set -m
  sched::_job "$job" "$visible" "$gpus" &
  pid=$!
  set +m
  [[ -z $SCHED_TIE_W ]] || exec {SCHED_TIE_W}>&-
  JOB[$job,tie]=${SCHED_TIE_W:+${SCHED_PICK%% *}} JOB[$job,tie_file]=$SCHED_TIE_FILE
  JOB[$job,since]=$SCHED_STATE/job$job.$pid.start # this attempt's, made by its process as the command starts
  LEASE_FDS=() LEASE_FILES=() LEASE_SLOTS=() # the slots' lease files stay open here, kept for their next job
  exec {SCHED_DIR_FD}<&-
  for i in "${!LEASE_RESERVATIONS[@]}"; do # the job's pid: its reservation now counts its own use against it
    printf '%s %s\n' "${LEASE_RESERVED_MIB[i]}" "$pid" 2>/dev/null >"${LEASE_RESERVATIONS[i]}"
  done
  JOB[$job,reservations]="${LEASE_RESERVATIONS[*]}"
  for slot in $SCHED_PICK; do SLOT_JOB[$slot]=$job GPU_OURS_UNTIL[${GPU_PARENT[${slot%:*}]:-${slot%:*}}]=9999999999999; done
  pids[${JOB[$job,name]}]=$pid
  core::now_ms
  JOB[$job,pid]=$pid JOB[$job,slots]=$SCHED_PICK JOB[$job,status]=running JOB[$job,gpu]=$gpus JOB[$job,log]=$LEDGER_LOG
  JOB[$job,start_ms]=$CORE_NOW_MS JOB[$job,ngpus]=${#devs[@]}
  local up=""
  read -r up _ 2>/dev/null </proc/uptime || true
  JOB[$job,up_start]=$up
  local where="GPU $gpus"
  place::worst "${devs[@]}"
  [[ -z $PLACE_LEVEL ]] || where="GPUs $gpus ($PLACE_LEVEL)"
  [[ $gpus != cpu ]] || where="the CPU"
  ledger::ev start "${JOB[$job,name]}" "$gpus" "$LEDGER_LOG" "$CORE_NOW_MS"
  ledger::event "started ${JOB[$job,name]} on $where (log $LEDGER_LOG)"
}

# sched::_tie SLOT — the job's tie: a write end (SCHED_TIE_W) of its first slot's FIFO, which the job's
# process and all it starts inherit, while the launcher keeps the slot's read end open (SCHED_TIES[SLOT]).
# Once every holder of a write end has ended, the read end is at end of file: sched::_ended sees what a
# job left running in a session or group of its own (`setsid cmd &`), which holds its slot's lease too,
# with one builtin and no scan. A process that closed what it inherited (Python's Popen closes every
# descriptor above 2 by default, start_new_session=True or not) holds neither and is not seen. Nothing
# when the FIFO cannot be made; then such processes are found only when the slot is next locked.
declare -A SCHED_TIES=()

sched::_tie() {
  local rw r
  SCHED_TIE_W="" SCHED_TIE_FILE=$SCHED_STATE/tie.${1//[!0-9A-Za-z]/.}
  if [[ -z ${SCHED_TIES[$1]:-} ]]; then # once a slot: read-write first, so the read-only open does not wait
    SCHED_TIES[$1]=- # (none, should it fail: tried once)
    # shellcheck disable=SC2094  # one FIFO's two ends, opened on purpose
    { mkfifo -m 600 -- "$SCHED_TIE_FILE" && exec {rw}<>"$SCHED_TIE_FILE" {r}<"$SCHED_TIE_FILE" {rw}>&-; } 2>/dev/null &&
      SCHED_TIES[$1]=$r
  fi
  [[ ${SCHED_TIES[$1]} != - ]] && { exec {SCHED_TIE_W}>"$SCHED_TIE_FILE"; } 2>/dev/null || SCHED_TIE_W="" SCHED_TIE_FILE=""
}

# sched::close_ties — close every slot's read end (in a job's process; in the launcher once the jobs are
# done, so what the entry script runs next holds none).
sched::close_ties() {
  local slot fd
  for slot in "${!SCHED_TIES[@]}"; do
    fd=${SCHED_TIES[$slot]}
    [[ $fd == - ]] || exec {fd}<&-
  done
  SCHED_TIES=()
}

# sched::_job JOB VISIBLE GPUS — the job's own process: a fork of the launcher, leader of its process
# group. It takes its slots' leases (another launcher may hold one: then it ends at once, saying which)
# and the lock of the job's folder for the whole run (another run of it: "running elsewhere"), runs the
# command, and writes the completion marker (on success) and its end record itself. TERM and INT are
# trapped, not ignored: the command keeps their default, and this process outlives it to record its end.
sched::_job() {
  local job=$1 rc=0 end=$SCHED_STATE/job$1.end i note="" held=""
  set +eEm
  trap - ERR EXIT
  trap : INT TERM
  lease::close_others "${LEASE_SLOTS[@]}"
  sched::close_ties # the slots' read ends are the launcher's: its own write end is all a job keeps
  for i in "${!LEASE_FDS[@]}"; do
    [[ -z ${LEASE_LOCKED[${LEASE_SLOTS[i]}]:-} ]] || continue # kept locked since this slot's last job
    lease::lock "${LEASE_FDS[i]}" "${LEASE_FILES[i]}" || { rc=$? held=${LEASE_FILES[i]} && break; }
  done
  if ((rc == 0)); then
    lease::lock "$SCHED_DIR_FD" "$SCHED_DIR_LOCK" || rc=$?
    ((rc != 1)) || rc=76 # held: the folder's lock this time, not a slot's
  fi
  # With --resume, the folder's lock held: a run of this job that outlived a killed launcher may have
  # finished while this one waited for its slot (the marker was read when the sweep was planned).
  if ((rc == 0)) && [[ $RESUME == true ]] && ledger::is_done "$job"; then
    rc=75 held="done"
  fi
  if ((rc)); then
    note="stopped before it started"
    ((rc != 1)) || note="slot held by $LEASE_HOLDER|${held##*/gpu}"
    ((rc != 76)) || note="running elsewhere ($LEASE_HOLDER)"
    [[ $held != "done" ]] || note="done meanwhile"
    printf '%s\t%s\t%s\n' "$rc" "${EPOCHREALTIME/./}" "$note" >"$end"
    exit "$rc"
  fi
  # A stop (the launcher's TERM to this group, which this process's trap took) before the command started:
  # the stop's file is made before any TERM is sent, so the command never starts after it.
  if [[ -e $SCHED_STATE/term ]]; then
    printf '%s\t%s\t%s\n' 143 "${EPOCHREALTIME/./}" "stopped before it started" >"$end"
    exit 143
  fi
  [[ -z ${JOB[$job,out]} ]] || : 2>/dev/null >"$SCHED_STATE/job$job.$BASHPID.start" # a newer metrics.json is ours
  # A log that cannot be written (a full disk): the command would run blind, so it does not run.
  if ! ledger::header "$job" "$3" "$2" "${SCHED_ARGV[@]}" 2>/dev/null >>"$LEDGER_LOG"; then
    ledger::why_not "$LEDGER_LOG"
    printf '%s\t%s\t%s\n' 74 "${EPOCHREALTIME/./}" "could not start: cannot write its log $LEDGER_LOG: $LEDGER_WHY" 2>/dev/null >"$end"
    exit 74
  fi
  ! sched::_plain "${SCHED_ARGV[@]}" || SCHED_ARGV=("${SCHED_PLAIN[@]}")
  # Terminal input is none of a job's (it runs in the background): a read of /dev/tty fails (EIO) instead
  # of stopping the job for good (SIGTTIN), as a password prompt did, shown as running; ignored
  # dispositions pass to the command.
  trap '' TTIN TTOU
  # In a group, so that bash's own line on a command a signal killed ("<file>: line N: <pid> Killed ...")
  # goes to the job's log, not the terminal; a trace of this process (SHELLOPTS=xtrace exported) does not.
  [[ $- != *x* ]] || { exec {i}>&2 && BASH_XTRACEFD=$i; }
  # The command runs in a subshell (bash execs its last command: no extra process) that looks for the
  # stop's file once more, after the fork: a TERM sent between the check above and the fork reached only
  # this process, which ignores it; one sent later reaches the command, whose TERM is the default again.
  {
    (
      [[ ! -e $SCHED_STATE/term ]] || exit 143
      CUDA_VISIBLE_DEVICES=$2 CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=${JOB[$job,name]} MGPU_GPU=$3 \
        OMP_NUM_THREADS=$SCHED_THREADS "${SCHED_ARGV[@]}"
    )
  } </dev/null >>"$LEDGER_LOG" 2>&1
  rc=$?
  ((rc <= 128 || rc >= 160)) || printf '# mgpu: the command ended by signal %s (exit %s)\n' "$(kill -l "$rc")" "$rc" 2>/dev/null >>"$LEDGER_LOG"
  ((rc)) || printf '%s\n' "${JOB[$job,hash]}" 2>/dev/null >"${JOB[$job,marker]}"
  printf '%s\t%s\t\n' "$rc" "${EPOCHREALTIME/./}" 2>/dev/null >"$end"
  ((${#LEASE_RESERVATIONS[@]} == 0)) || rm -f -- "${LEASE_RESERVATIONS[@]}"
  exit "$rc"
}

# sched::_plain ARGV... — 0, with the command's words in SCHED_PLAIN, when ARGV is `bash -c LINE` and LINE
# is one plain command: words of letters, digits and _./,:+=@%- only (nothing bash would expand, quote or
# redirect), the first a program (no assignment, builtin, keyword or function) that is a binary or a
# script whose #! names an executable, and nothing for that bash to read first (BASH_ENV, exported
# SHELLOPTS or BASHOPTS). Such a job runs that program directly, as bash -c itself would exec it, without
# starting a bash first (1-2 ms a job). Anything else, and any program that could fail to start, goes
# through bash -c, whose messages users know ("bash: line 1: ...").
sched::_plain() {
  (($# == 3 && ${#SCHED_BASH_WORDS[@]})) && [[ $1 == bash && $2 == -c && -z ${BASH_ENV:-} ]] || return 1
  [[ ${SHELLOPTS@a} != *x* && ${BASHOPTS@a} != *x* ]] || return 1
  [[ $3 =~ ^\ *[A-Za-z0-9_./,:+=@%-]+(\ +[A-Za-z0-9_./,:+=@%-]+)*\ *$ ]] || return 1
  # shellcheck disable=SC2206  # split at the spaces: the pattern above leaves nothing else to expand
  SCHED_PLAIN=($3)
  local word=${SCHED_PLAIN[0]} path head=""
  [[ $word != *=* && -z ${SCHED_BASH_WORDS[$word]:-} ]] && ! declare -F -- "$word" >/dev/null || return 1
  path=$word
  if [[ $word != */* ]]; then hash -- "$word" 2>/dev/null && path=${BASH_CMDS[$word]:-} || return 1; fi
  [[ -f $path && -x $path && -r $path ]] || return 1
  read -r -N 128 head <"$path" 2>/dev/null || [[ -n $head ]] || return 1
  [[ $head == $'\x7fELF'* ]] && return 0
  [[ $head == '#!'* ]] || return 1 # no #!: bash -c runs it as a script itself
  head=${head#\#!} head=${head%%$'\n'*} # (saved with CRLF line ends, its interpreter ends with \r: none such)
  head=${head#"${head%%[! ]*}"}
  head=${head%%[ $'\t']*}
  [[ -f $head && -x $head ]]
}

# sched::_ended PID STATUS — a job's process ended: free its slots, then queue it again (retry) or leave
# it to sched::_settle, which records it once the freed slots have their next jobs.
sched::_ended() {
  local pid=$1 rc=$2 name job slot gpu other still end=() note="" slots
  for name in "${!pids[@]}"; do [[ ${pids[$name]} != "$pid" ]] || break; done
  job=${SCHED_BY_NAME[$name]} slots=${JOB[$job,slots]} gpu=${JOB[$job,gpu]}
  unset "pids[$name]"
  core::now_ms
  for slot in $slots; do
    unset "SLOT_JOB[$slot]"
    still=0
    for other in "${SLOT_JOB[@]}"; do [[ " ${JOB[$other,slots]} " != *" ${slot%:*}:"* ]] || still=1; done
    ((still)) || GPU_OURS_UNTIL[${GPU_PARENT[${slot%:*}]:-${slot%:*}}]=$((CORE_NOW_MS + 2000))
  done
  # a job sharing its GPUs by memory: the last reading may still count its memory, so the next memory
  # check reads the GPUs again (sched::_slot_ready); other jobs' ends read nothing (the hot path)
  [[ ${JOB[$job,need]:-0} == 0 ]] || SCHED_SAMPLE_MS=0
  if [[ -n ${JOB[$job,reservations]} ]]; then # the job's own process removes them; not if it was killed
    local files=()
    read -ra files <<<"${JOB[$job,reservations]}"
    rm -f -- "${files[@]}"
    JOB[$job,reservations]=""
  fi
  # The job's own end record knows what bash may have lost (a job reaped while bash printed "Killed").
  [[ ! -f $SCHED_STATE/job$job.end ]] || IFS=$'\t' read -r -a end <"$SCHED_STATE/job$job.end" || true
  if ((rc == 127)) && ((${#end[@]})); then rc=${end[0]}; fi
  note=${end[2]:-}
  # No end record and status 0 during a stop: the process ended before its job began (a Ctrl-C in the
  # instant after its fork, before it set its own traps), not by the command's success, which it records.
  # (Without a stop, a record that could not be written, TMPDIR full, leaves the status to tell.)
  ((${#end[@]} || rc)) || [[ -z $SCHED_STOP ]] || rc=143 note="stopped before it started"
  # Its slots' kept leases: still locked when it held them and nothing it started runs on; else closed.
  local alive=0 tie=${JOB[$job,tie]:-}
  ! kill -0 -- "-$pid" 2>/dev/null || alive=1
  [[ $alive == 0 || -n $note ]] || SCHED_LEFT+=("$job:$pid") # its command ran and left some: sched::_leftovers
  if [[ -n $tie ]]; then # its tie not at end of file: something it started holds a write end still
    read -r -t 0 -u "${SCHED_TIES[$tie]}" 2>/dev/null || { [[ -n $note ]] || sched::_away "$job" "$pid"; alive=1; }
    JOB[$job,tie]=""
  fi
  for slot in $slots; do
    if ((${#end[@]} && !alive)) && [[ -z $note || $note == "running elsewhere"* || $note == "done meanwhile" ]]; then
      [[ -z ${LEASE_KEPT[$slot]:-} ]] || LEASE_LOCKED[$slot]=1
    else
      lease::drop "$slot"
    fi
  done
  : >"$SCHED_STATE/job$job.end" # read once: a retry's record is its own
  JOB[$job,exit]=$rc JOB[$job,ms]=$((CORE_NOW_MS - JOB[$job,start_ms])) JOB[$job,pid]=""
  JOB[$job,gpu_ms]=$((${JOB[$job,gpu_ms]:-0} + JOB[$job,ms] * JOB[$job,ngpus]))
  if [[ $note == "slot held by "* ]]; then
    note=${note#slot held by }
    slot=${note##*|} slot=${slot%.lock} slot=${slot/.slot/:}
    sched::_held "$job" "$slot" "${note%|*}"
    return 0
  elif [[ $note == "running elsewhere"* || $note == "done meanwhile" ]]; then
    JOB[$job,status]=skipped JOB[$job,reason]=$note JOB[$job,exit]=""
    rm -f -- "${JOB[$job,log]}"
    JOB[$job,log]=""
    if [[ $note == "done meanwhile" ]]; then # as if found when planned: what its run left counts
      JOB[$job,reason]="done earlier (--resume)"
      log::info "skipping ${JOB[$job,name]}: done with the same configuration while it waited, by a run that outlived an earlier launcher (--resume)"
    fi
  elif [[ $note == "could not start: "* ]]; then
    JOB[$job,status]=failed JOB[$job,kind]="could not start" JOB[$job,reason]=${note#could not start: }
  elif [[ -n $SCHED_STOP ]]; then
    JOB[$job,status]=interrupted
    [[ $note != "stopped before it started" ]] || JOB[$job,detail]=$note
    sched::_stop_detail "$job" "$rc"
  elif ((rc == 0)); then
    JOB[$job,status]=succeeded JOB[$job,kind]=""
  else
    sched::_failed "$job" "$rc" "$gpu" || return 0 # 1: queued again
  fi
  SCHED_ENDED+=("$job")
}
