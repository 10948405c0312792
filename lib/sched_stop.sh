# shellcheck shell=bash disable=SC2034  # part of sched.sh: the same job records and globals
# sched:: (continued) — stopping: TERM to every job's process group (and to what finished jobs left
# running), the grace period, KILL, how each stopped job ended; and what jobs left running at a sweep's
# end. Sourced by sched.sh only.

declare -A JOB pids SCHED_TERMED=() # sched.sh's job records and running-job table (declared there); groups sent TERM
SCHED_LEFT_TERMED=() # entries of SCHED_LEFT (JOB:PGID) that a stop sent TERM, with what ran then (SCHED_LEFT_SAID)
declare -A SCHED_LEFT_SAID=()
SCHED_SID="" SCHED_PGRP="" # the launcher's session and group (sched::_left_members, sched::_away)
declare -A SCHED_AWAY=() # entries of SCHED_LEFT (JOB:PGID) for groups a job's command made (setsid): sched::_away

# sched::group_alive PGID — does any process of the group still run? Zombies do not count: our own
# un-reaped job leader is one, and orphans wait as zombies until PID 1 reaps them (some never do).
sched::group_alive() {
  local stat
  [[ -r /proc/self/stat ]] || { kill -0 -- "-$1" 2>/dev/null; return; }
  for stat in /proc/[0-9]*/stat; do
    core::proc_stat "${stat//[!0-9]/}" && [[ ${CORE_STAT[2]} == "$1" && ${CORE_STAT[0]} != Z ]] && return 0
  done
  return 1
}

# sched::term_all — TERM, then CONT (a job stopped by hand acts on it), to each running job's process group
# not sent them yet. The stop's traps call it themselves, so no message that a stalled terminal or pipe
# holds up holds the TERM; the stop calls it again for a job forked meanwhile. The first call marks the
# stop's time (the file term). Nothing here reads a file: in bash 5.2 a `read` inside a trap cancels the
# timeout of the `read -t` it interrupted (core::sleep_ms), which then never returns.
sched::term_all() {
  local name pid
  [[ -e $SCHED_STATE/term ]] || : 2>/dev/null >"$SCHED_STATE/term" || true
  for name in "${!pids[@]}"; do
    pid=${pids[$name]}
    [[ -z ${SCHED_TERMED[$pid]:-} ]] || continue
    SCHED_TERMED[$pid]=1
    { kill -TERM -- "-$pid" && kill -CONT -- "-$pid"; } 2>/dev/null || true
  done
}

# sched::_term_left — TERM and CONT to the groups of ended jobs whose processes still run (SCHED_LEFT): a
# stop reaches everything the sweep started. What ran is kept for the records (SCHED_LEFT_SAID).
sched::_term_left() {
  local entry found=()
  for entry in "${SCHED_LEFT[@]}"; do
    [[ -z ${SCHED_TERMED[left:$entry]:-} ]] || continue
    SCHED_TERMED[left:$entry]=1
    sched::_left_members "${entry%%:*}" "${entry#*:}" found
    ((${#found[@]})) || continue
    sched::_said "${found[@]}"
    SCHED_LEFT_TERMED+=("$entry") SCHED_LEFT_SAID[$entry]=$SCHED_SAID
    { kill -TERM -- "-${entry#*:}" && kill -CONT -- "-${entry#*:}"; } 2>/dev/null || true
  done
}

# sched::stop_all — TERM every running job's process group (and what ended jobs left running), then wait up
# to GRACE seconds for them to save and exit; what is left then (or at once, on a second Ctrl-C/TERM) gets
# KILL. Each ended job whose processes were stopped says so in its record.
sched::stop_all() {
  local name pid deadline rc entry
  SCHED_AGAIN=""
  trap 'SCHED_AGAIN=1' INT TERM
  sched::term_all
  sched::_term_left
  ((${#pids[@]} + ${#SCHED_LEFT_TERMED[@]})) || return 0
  local what=""
  ((${#pids[@]} == 0)) || what="${#pids[@]} running job(s)"
  ((${#SCHED_LEFT_TERMED[@]} == 0)) || what+="${what:+ and }the processes ${#SCHED_LEFT_TERMED[@]} ended job(s) left running"
  log::warn "stopping $what: TERM now, KILL after ${GRACE}s (--grace) unless they end; press Ctrl-C again to KILL them now"
  core::now_ms
  deadline=$((CORE_NOW_MS + GRACE * 1000))
  local groups=("${pids[@]}")
  for entry in "${SCHED_LEFT_TERMED[@]}"; do groups+=("${entry#*:}"); done
  sched::_grace "$deadline" "${groups[@]}"
  [[ -z $SCHED_AGAIN ]] || log::warn "second stop signal: killing the running jobs now"
  for name in "${!pids[@]}"; do
    pid=${pids[$name]}
    if sched::group_alive "$pid"; then
      JOB[${SCHED_BY_NAME[$name]},detail]="killed after grace (no checkpoint)"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  done
  sched::_stop_left
  for name in "${!pids[@]}"; do
    pid=${pids[$name]} rc=0
    wait "$pid" 2>/dev/null || rc=$?
    sched::_ended "$pid" "$rc"
  done
  # What the stopped jobs left running in a session of their own (found by sched::_ended, through their
  # ties): TERM now, KILL at the end of the same grace period (a second at least).
  local first=${#SCHED_LEFT_TERMED[@]}
  sched::_term_left
  if ((${#SCHED_LEFT_TERMED[@]} > first)); then
    log::warn "stopping the processes $((${#SCHED_LEFT_TERMED[@]} - first)) stopped job(s) left running in a session of their own: TERM now, KILL at the end of the grace period"
    groups=()
    for entry in "${SCHED_LEFT_TERMED[@]:first}"; do groups+=("${entry#*:}"); done
    core::now_ms
    ((deadline > CORE_NOW_MS + 1000)) || deadline=$((CORE_NOW_MS + 1000))
    [[ -n $SCHED_AGAIN ]] || sched::_grace "$deadline" "${groups[@]}"
    sched::_stop_left "$first"
  fi
  sched::_settle
}

# sched::_grace DEADLINE PGID... — wait until no process of these groups runs, DEADLINE (ms) passes, or a
# second stop signal comes (SCHED_AGAIN).
sched::_grace() {
  local deadline=$1 group alive
  shift
  while [[ -z $SCHED_AGAIN ]]; do
    alive=0
    for group in "$@"; do
      if sched::group_alive "$group"; then alive=1 && break; fi
    done
    core::now_ms
    ((alive && CORE_NOW_MS < deadline)) || break
    core::sleep_ms 100
  done
}

# sched::_stop_left [FROM] — after a stop's grace: KILL what ended jobs left running and still runs (its
# environment names the job), and add to each such job's record what was stopped, and how (the entries of
# SCHED_LEFT_TERMED from FROM on).
sched::_stop_left() {
  local entry job how members=()
  for entry in "${SCHED_LEFT_TERMED[@]:${1:-0}}"; do
    job=${entry%%:*} how="ended on the stop's TERM"
    sched::_left_members "$job" "${entry#*:}" members
    if ((${#members[@]})); then
      kill -KILL -- "-${entry#*:}" 2>/dev/null || true
      how="killed after grace"
    fi
    JOB[$job,detail]="${JOB[$job,detail]:+${JOB[$job,detail]}; }left running, $how: ${SCHED_LEFT_SAID[$entry]}"
    sched::_record "$job" # again, with it
  done
}

# sched::_stop_detail JOB STATUS — how a job stopped by us ended: it saved a checkpoint after the TERM
# (a checkpoint_*.pt newer than the stop), it ended within the grace period, or it was killed.
sched::_stop_detail() {
  local job=$1 out=${JOB[$1,out]} saved=""
  [[ -z ${JOB[$job,detail]} ]] || return 0
  if [[ -n $out && -d $out && -e $SCHED_STATE/term ]]; then
    saved=$(find "$out" -maxdepth 1 -name 'checkpoint_*.pt' -newer "$SCHED_STATE/term" -print -quit 2>/dev/null) || true
  fi
  if [[ -n $saved ]]; then
    JOB[$job,detail]="checkpoint saved"
  else
    JOB[$job,detail]="stopped within the grace period (exit $2)"
  fi
}

# sched::_left_members JOB PGID ARRAY — into the array named ARRAY, "pid command" (60 characters at most)
# of each process still running in the group of a job whose command ended. The job's own process, whose
# pid is the group's id, has been reaped; the kernel gives that number to no new process while a member of
# the group lives. So a live process of that number means the group ended and its id was taken since:
# nothing of it is the job's. A member whose environment names another job is not counted either; one
# that names none counts (`env -i cmd &` clears MGPU_CONFIG_NAME). A group the command made (SCHED_AWAY:
# its leader lives, in another session) counts only the members whose environment names the job.
sched::_left_members() {
  local job=$1 group=$2 stat line cmd env e mine away=${SCHED_AWAY[$1:$2]:-}
  local -n _members=$3
  _members=()
  if [[ -z $SCHED_SID ]]; then
    core::proc_stat $$ || true
    SCHED_SID=${CORE_STAT[3]:-none}
  fi
  if [[ -z $away ]] && core::proc_stat "$group" && [[ ${CORE_STAT[0]} != Z ]]; then return 0; fi
  for stat in /proc/[0-9]*/stat; do
    core::proc_stat "${stat//[!0-9]/}" || continue
    [[ ${CORE_STAT[2]} == "$group" && ${CORE_STAT[0]} != Z && (-n $away || ${CORE_STAT[3]} == "$SCHED_SID") ]] || continue
    env=() cmd=() mine=1
    [[ -z $away ]] || mine=""
    mapfile -d '' -t env 2>/dev/null <"${stat%stat}environ" || true
    for e in "${env[@]}"; do
      [[ $e == MGPU_CONFIG_NAME=* ]] || continue
      mine=""
      [[ $e != "MGPU_CONFIG_NAME=${JOB[$job,name]}" ]] || mine=1
      break
    done
    [[ -n $mine ]] || continue
    mapfile -d '' -t cmd 2>/dev/null <"${stat%stat}cmdline" || true
    line="${stat//[!0-9]/} ${cmd[*]//[[:cntrl:]]/ }"
    _members+=("${line:0:60}")
  done
}

# sched::_away JOB PGID — what the job's command left running outside the job's group (in a session or group
# of its own), found through its tie: each process holding the tie's write end, whose group joins
# SCHED_LEFT (JOB:GROUP, marked in SCHED_AWAY) for the stop and the sweep's end. A scan of /proc, made
# only when the tie says there is something to find. Read ends (other jobs inherit the launcher's) and the
# launcher's own group never count.
sched::_away() {
  local job=$1 pid fd flags
  [[ -n ${JOB[$job,tie_file]:-} ]] && lease::holders "${JOB[$job,tie_file]}" || return 0
  [[ -n $SCHED_PGRP ]] || { core::proc_stat $$ && SCHED_PGRP=${CORE_STAT[2]}; }
  for pid in "${LEASE_HOLDERS[@]}"; do
    for fd in "/proc/$pid/fd/"*; do
      [[ $fd -ef ${JOB[$job,tie_file]} ]] || continue
      flags=$(grep -m1 '^flags:' "/proc/$pid/fdinfo/${fd##*/}" 2>/dev/null) || continue
      ((8#${flags//[!0-7]/} & 3)) || continue # opened for reading only
      if ! core::proc_stat "$pid" || [[ ${CORE_STAT[2]} == "$2" || ${CORE_STAT[2]} == "$SCHED_PGRP" ]]; then break; fi
      [[ -n ${SCHED_AWAY[$job:${CORE_STAT[2]}]:-} ]] || SCHED_LEFT+=("$job:${CORE_STAT[2]}")
      SCHED_AWAY[$job:${CORE_STAT[2]}]=1
      break
    done
  done
}

# sched::_said MEMBERS... — the first three, "; "-separated (and "; ..." for more), into SCHED_SAID.
sched::_said() {
  printf -v SCHED_SAID '%s; ' "${@:1:3}"
  SCHED_SAID="${SCHED_SAID%; }${4:+; ...}"
}

# sched::_leftovers — the jobs whose command ended but left processes running in its process group
# (`cmd &`; sched::_ended notes them in SCHED_LEFT as JOB:PGID): each said, with them, and added to its
# record's detail; they hold its slot's lease and its folder's lock until they end. They get a second to
# end first (a trainer's data workers exit after it).
sched::_leftovers() {
  local entry job group deadline members=()
  core::now_ms
  deadline=$((CORE_NOW_MS + 1000))
  for entry in "${SCHED_LEFT[@]}"; do
    job=${entry%%:*} group=${entry#*:}
    while [[ -z $SCHED_STOP ]] && sched::group_alive "$group"; do
      core::now_ms
      ((CORE_NOW_MS < deadline)) || break
      core::sleep_ms 100
    done
    [[ -z $SCHED_STOP ]] || return 0 # a stop came meanwhile: sched::run stops them instead
    sched::group_alive "$group" || continue
    sched::_left_members "$job" "$group" members
    ((${#members[@]})) || continue
    sched::_said "${members[@]}"
    JOB[$job,detail]="${JOB[$job,detail]:+${JOB[$job,detail]}; }left running: $SCHED_SAID"
    sched::_record "$job" # again, with it
    log::warn "${JOB[$job,name]}: its command ended, but ${#members[@]} process(es) it started run on, holding its slot and lock until they end: $SCHED_SAID"
  done
}
