# shellcheck shell=bash disable=SC2034  # part of sched.sh: the same job records and globals
# sched:: (continued) — choosing a slot, waiting for busy GPUs and held slots, reaping job ends, and
# stopping. Sourced by sched.sh only.

declare -A JOB pids # sched.sh's job records and running-job table (declared there)
declare -A GPU_OURS_UNTIL=() GPU_NEXT_CHECK=() SCHED_WHY=() SLOT_NEXT_CHECK=() SLOT_BROKEN=()
SCHED_SAMPLE_MS=0 SCHED_SAMPLED=0

# ---------------------------------------------------------------- GPU load and held slots

# sched::_gpu_ready GPU NOW_MS — 0 when the GPU may take a job now; 1 busy (SCHED_WHY[GPU] says why).
sched::_gpu_ready() {
  local gpu=$1 now=$2 rc=0
  [[ $gpu == cpu || $MAX_UTIL == 100 ]] && return 0
  # Load on a GPU that runs, or ran 2 s ago, one of our jobs is ours: other slots may use it.
  [[ -n ${GPU_OURS_UNTIL[$gpu]:-} ]] && ((GPU_OURS_UNTIL[$gpu] > now)) && return 0
  [[ -n ${GPU_NEXT_CHECK[$gpu]:-} ]] && ((now < GPU_NEXT_CHECK[$gpu])) && return 1
  if ((!SCHED_SAMPLED)); then
    gpu::sample "${SCHED_GPUS[@]}" 2>/dev/null && SCHED_SAMPLED=1 || SCHED_SAMPLED=-1
    SCHED_SAMPLE_MS=$now
  fi
  if ((SCHED_SAMPLED == 1)); then gpu::judge "$gpu" || rc=$?; else rc=2; fi
  if ((rc == 0)); then
    unset "GPU_NEXT_CHECK[$gpu]"
    return 0
  fi
  ((rc == 1)) || GPU_REASON="its load cannot be read right now"
  SCHED_WHY[$gpu]="GPU $gpu is busy: $GPU_REASON"
  GPU_NEXT_CHECK[$gpu]=$((now + MGPU_POLL_MS))
  return 1
}

# sched::_pick JOB NOW_MS — SCHED_PICK becomes a free slot whose GPU may take a job, its lease file open
# in LEASE_FD (the job takes the lock; should another launcher hold it, the job comes back at once and
# the slot waits); or "" with SCHED_PICK_WHY: full (every slot runs one of our jobs), wait (blocked by a
# busy GPU or a slot another process holds; SCHED_BLOCKED is the first such slot and SCHED_BLOCK_WHY
# why), or broken (no slot has a usable lock file).
sched::_pick() {
  local job=$1 now=$2 pass s gpu usable=0
  SCHED_PICK="" SCHED_PICK_WHY=full SCHED_BLOCKED="" SCHED_BLOCK_WHY="" LEASE_FD=""
  for pass in prefer any; do
    for s in "${!SCHED_SLOTS[@]}"; do
      [[ -z ${SLOT_BROKEN[$s]:-} ]] || continue
      usable=1
      [[ -z ${SLOT_JOB[$s]:-} ]] || continue
      gpu=${SCHED_SLOTS[s]%%:*}
      [[ $pass == any || $gpu != "${JOB[$job,avoid]}" ]] || continue
      if ! sched::_gpu_ready "$gpu" "$now"; then
        sched::_blocked "$s" "${SCHED_WHY[$gpu]}"
      elif [[ -n ${SLOT_NEXT_CHECK[$s]:-} ]] && ((now < SLOT_NEXT_CHECK[$s])); then
        sched::_blocked "$s" "${SCHED_WHY[slot$s]}"
      elif lease::open "$gpu" "${SCHED_SLOTS[s]#*:}"; then
        # A slot found held before is locked here first (a child process), so a job is not sent to it in vain.
        if [[ -n ${SCHED_WHY[slot$s]:-} ]] && ! lease::lock "$LEASE_FD" "$LEASE_FILE"; then
          exec {LEASE_FD}<&-
          LEASE_FD=""
          # a holder that ended between the two looks leaves no name: keep the one seen before
          [[ -z $LEASE_HOLDER_PID ]] || SCHED_WHY[slot$s]="GPU $gpu slot ${SCHED_SLOTS[s]#*:} is held by $LEASE_HOLDER"
          SLOT_NEXT_CHECK[$s]=$((now + MGPU_POLL_MS))
          sched::_blocked "$s" "${SCHED_WHY[slot$s]}"
          continue
        fi
        SCHED_PICK=$s SCHED_LEASE_FILE=$LEASE_FILE
        return 0
      else
        SLOT_BROKEN[$s]=1 # a lock file that is no regular file: that slot is never used (logged)
      fi
    done
  done
  ((usable)) || SCHED_PICK_WHY=broken
}

# sched::_held JOB SLOT WHY — the job's process found the slot's lease held by another process: the job
# goes back to the head of the queue, and the slot is tried again after MGPU_POLL_MS.
sched::_held() {
  local job=$1 s=$2
  core::now_ms
  log::info "${JOB[$job,name]} did not start: GPU ${SCHED_SLOTS[s]%%:*} slot ${SCHED_SLOTS[s]#*:} is held by $3"
  JOB[$job,wait_since]=${JOB[$job,tried_since]:-$CORE_NOW_MS}
  SCHED_WHY[slot$s]="GPU ${SCHED_SLOTS[s]%%:*} slot ${SCHED_SLOTS[s]#*:} is held by $3"
  SLOT_NEXT_CHECK[$s]=$((CORE_NOW_MS + MGPU_POLL_MS))
  JOB[$job,status]=queued JOB[$job,gpu]="" JOB[$job,ms]=0
  [[ -z ${JOB[$job,log]} ]] || rm -f -- "${JOB[$job,log]}"
  JOB[$job,log]=""
  SCHED_QUEUE=("$job" "${SCHED_QUEUE[@]}")
  sched::_blocked "$s" "${SCHED_WHY[slot$s]}"
  sched::_waits "$job" "$CORE_NOW_MS" || true
}

# sched::_blocked SLOT WHY — note the first slot found blocked in this pick.
sched::_blocked() {
  SCHED_PICK_WHY="wait"
  [[ -n $SCHED_BLOCKED ]] || SCHED_BLOCKED=$1 SCHED_BLOCK_WHY=$2
}

# sched::_waits JOB NOW_MS — the job at the head of the queue is blocked: count its wait, say so every
# 30 s; 0 once it has waited MAX_WAIT (the caller applies --on-timeout), else 1.
sched::_waits() {
  local job=$1 now=$2 waited
  [[ -n ${JOB[$job,wait_since]} ]] || JOB[$job,wait_since]=$now JOB[$job,next_note]=0
  JOB[$job,reason]=$SCHED_BLOCK_WHY
  waited=$((now - JOB[$job,wait_since]))
  ((waited < MAX_WAIT * 1000)) || return 0
  if ((waited >= JOB[$job,next_note])); then
    ledger::ev wait "${JOB[$job,name]}" "$now" "$SCHED_BLOCK_WHY"
    log::info "${JOB[$job,name]} waits: $SCHED_BLOCK_WHY; waited $((waited / 1000))s of up to ${MAX_WAIT}s (MAX_WAIT)"
    JOB[$job,next_note]=$((waited + 30000))
  fi
  return 1
}

# sched::_started_after_wait JOB NOW_MS — a job that waited records how long and for what (the clock is
# kept in tried_since: should its slot turn out held, the wait goes on from where it was).
sched::_started_after_wait() {
  JOB[$1,tried_since]=""
  [[ -n ${JOB[$1,wait_since]} ]] || return 0
  JOB[$1,waited]=$((($2 - JOB[$1,wait_since]) / 1000))
  JOB[$1,tried_since]=${JOB[$1,wait_since]}
  JOB[$1,reason]="waited ${JOB[$1,waited]}s: ${JOB[$1,reason]}"
  JOB[$1,wait_since]=""
}

# sched::_expired JOB — the job waited MAX_WAIT: --on-timeout run starts it on the first blocked slot
# anyway (0, SCHED_PICK set); skip and fail record it (1).
sched::_expired() {
  local job=$1 waited
  core::now_ms
  waited=$(((CORE_NOW_MS - JOB[$job,wait_since]) / 1000))
  JOB[$job,waited]=$waited JOB[$job,wait_since]=""
  if [[ $ON_TIMEOUT == run ]]; then
    JOB[$job,reason]="started after ${waited}s (MAX_WAIT) although ${SCHED_BLOCK_WHY}"
    log::warn "${JOB[$job,name]}: still blocked after MAX_WAIT ${MAX_WAIT}s ($SCHED_BLOCK_WHY); starting it there anyway (--on-timeout run)"
    SCHED_PICK=$SCHED_BLOCKED LEASE_FD="" SCHED_LEASE_FILE=""
    return 0
  fi
  JOB[$job,status]=$([[ $ON_TIMEOUT == skip ]] && echo skipped || echo failed)
  JOB[$job,reason]="gave up after ${waited}s (MAX_WAIT): $SCHED_BLOCK_WHY"
  ledger::record "$job"
  ledger::ev end "${JOB[$job,name]}" "${JOB[$job,status]}" "" "" "${JOB[$job,reason]}" 0
  ledger::event "${JOB[$job,status]} ${JOB[$job,name]}: ${JOB[$job,reason]} (--on-timeout $ON_TIMEOUT)"
  return 1
}

# ---------------------------------------------------------------- job ends

# sched::_wait_one — block until a job or the timer ends (or a signal arrives), then handle it.
sched::_wait_one() {
  local pid="" rc=0
  wait -n -p pid || rc=$?
  if [[ -z ${pid:-} ]]; then
    # No pid: a trapped signal cut the wait short, or bash had reaped a job already (after printing
    # "Killed") and `wait -n` has nothing left to report. Look at every job instead.
    sched::_reap
  elif [[ $pid == "$SCHED_TIMER" ]]; then
    SCHED_TIMER=""
  elif [[ ${pids[*]} =~ (^| )$pid( |$) ]]; then
    sched::_ended "$pid" "$rc"
  fi
}

# sched::_alive PID — is this job's process still running (not gone, not a zombie, still our child)?
sched::_alive() {
  local stat fields
  [[ -r /proc/$1/stat ]] || { [[ -d /proc/self ]] && return 1; kill -0 "$1" 2>/dev/null; return; }
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  read -r -a fields <<<"${stat##*) }" # state ppid pgrp ...
  [[ ${fields[0]} != Z && ${fields[1]} == "$BASHPID" ]]
}

# sched::_reap — collect every job that is no longer running (`wait PID` gives bash's saved status, or
# 127 when bash lost it: sched::_ended then reads the job's own end record). Never spins: when nothing
# ended, it sleeps a tick.
sched::_reap() {
  local name pid rc found=0
  for name in "${!pids[@]}"; do
    pid=${pids[$name]}
    ! sched::_alive "$pid" || continue
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    sched::_ended "$pid" "$rc"
    found=1
  done
  [[ -z $SCHED_TIMER ]] || sched::_alive "$SCHED_TIMER" || SCHED_TIMER=""
  ((found)) || [[ -n $SCHED_STOP ]] || core::sleep_ms "$MGPU_TICK_MS"
}

# ---------------------------------------------------------------- stopping

# sched::group_alive PGID — does any process of the group still run? Zombies do not count: our own
# un-reaped job leader is one, and orphans wait as zombies until PID 1 reaps them (some never do).
sched::group_alive() {
  local stat fields
  [[ -r /proc/self/stat ]] || { kill -0 -- "-$1" 2>/dev/null; return; }
  for stat in /proc/[0-9]*/stat; do
    read -r fields 2>/dev/null <"$stat" || continue
    read -r -a fields <<<"${fields##*) }" # state ppid pgrp ...
    [[ ${fields[2]} == "$1" && ${fields[0]} != Z ]] && return 0
  done
  return 1
}

# sched::stop_all — TERM every running job's process group, then wait up to GRACE seconds for them to
# save and exit; what is left then (or at once, on a second Ctrl-C/TERM) gets KILL.
sched::stop_all() {
  local name pid deadline alive rc
  ((${#pids[@]})) || return 0
  SCHED_AGAIN=""
  trap 'SCHED_AGAIN=1' INT TERM
  log::warn "stopping ${#pids[@]} running job(s): TERM now, KILL after ${GRACE}s (--grace) unless they end; press Ctrl-C again to KILL them now"
  : >"$SCHED_STATE/term"
  for name in "${!pids[@]}"; do kill -TERM -- "-${pids[$name]}" 2>/dev/null || true; done
  core::now_ms
  deadline=$((CORE_NOW_MS + GRACE * 1000))
  while [[ -z $SCHED_AGAIN ]]; do
    alive=0
    for name in "${!pids[@]}"; do
      if sched::group_alive "${pids[$name]}"; then alive=1 && break; fi
    done
    core::now_ms
    ((alive && CORE_NOW_MS < deadline)) || break
    core::sleep_ms 100
  done
  [[ -z $SCHED_AGAIN ]] || log::warn "second stop signal: killing the running jobs now"
  for name in "${!pids[@]}"; do
    pid=${pids[$name]}
    if sched::group_alive "$pid"; then
      JOB[${SCHED_BY_NAME[$name]},detail]="killed after grace (no checkpoint)"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  done
  for name in "${!pids[@]}"; do
    pid=${pids[$name]} rc=0
    wait "$pid" 2>/dev/null || rc=$?
    sched::_ended "$pid" "$rc"
  done
  sched::_settle
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
