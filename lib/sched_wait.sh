# shellcheck shell=bash disable=SC2034  # part of sched.sh: the same job records and globals
# sched:: (continued) — choosing a slot, waiting for busy GPUs and held slots, and reaping job ends.
# Sourced by sched.sh only.

declare -A JOB pids LEASE_LOCKED # sched.sh's job records and running-job table (declared there), lease.sh's locks
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
  sched::_sample "$now"
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

# sched::_pick JOB NOW_MS — SCHED_PICK becomes the slots ("dev:k", one a device) the job starts on: free of
# our jobs, their GPUs ready (not busy, memory enough for its need, which is reserved now), for a job
# needing several GPUs the best-connected set; their lease files open in LEASE_FDS (the job takes the
# locks; a slot another launcher holds sends it back at once and that slot waits). Or "" with
# SCHED_PICK_WHY: full (fewer devices than it needs have a slot free of our jobs), wait (blocked by a
# busy GPU, missing memory or a held slot; SCHED_BLOCK_WHY says which, SCHED_BLOCKED is where
# --on-timeout run would start it anyway), or broken (no slot has a usable lock file).
sched::_pick() {
  local job=$1 now=$2 pass slot dev usable=0 cand=() devs_free=() need=${JOB[$1,need]:-0} g=${JOB[$1,gpus]:-1}
  local -A seen=() counted=()
  SCHED_PICK="" SCHED_PICK_WHY=full SCHED_BLOCKED="" SCHED_BLOCK_WHY="" SCHED_BLOCK_MEM=0 LEASE_FDS=() LEASE_FILES=() LEASE_SLOTS=()
  for pass in prefer any; do
    cand=() devs_free=() seen=() counted=()
    for slot in "${SCHED_SLOTS[@]}"; do
      dev=${slot%:*}
      [[ -z ${SLOT_BROKEN[$slot]:-} ]] || continue
      usable=1
      [[ -z ${SLOT_JOB[$slot]:-} && -z ${seen[$dev]:-} ]] || continue
      seen[$dev]=1
      [[ -n ${counted[$dev]:-} ]] || counted[$dev]=1 devs_free+=("$slot")
      [[ $pass == any || " ${JOB[$job,avoid]} " != *" $dev "* ]] || continue
      if ! sched::_slot_ready "$slot" "$need" "$now"; then
        ((!SCHED_WHY_HELD)) || unset "seen[$dev]" # held by another launcher's job: the device's next slot may do
        # memory our own jobs hold frees as they end, like a slot: that is queueing, not a wait
        if ((SCHED_WHY_MEM == 0)) || ! sched::_ours_on "$dev"; then
          sched::_blocked "$slot" "$SCHED_WHY_NOW" "${SCHED_WHY_MEM/#0/}"
        fi
        continue
      fi
      if [[ $pass == prefer && -n ${JOB[$job,prefer_mem]:-} && $dev != cpu ]]; then
        lease::free "$dev" # a retry after running out of memory prefers a GPU with room for its peak
        if [[ $LEASE_FREE == NA ]] || ((LEASE_FREE < JOB[$job,prefer_mem])); then continue; fi
      fi
      cand+=("$slot")
    done
    if ((${#cand[@]} >= g)); then
      place::set "$g" "${cand[@]}"
      if sched::_take "$job" "$now" "${PLACE_SET[@]}"; then
        return 0
      fi
      cand=() # the set turned out held, or its memory reserved by another launcher meanwhile
    fi
  done
  ((usable)) || { SCHED_PICK_WHY=broken && return 0; }
  ((${#devs_free[@]} >= g)) || { SCHED_PICK_WHY=full && return 0; }
  [[ $SCHED_PICK_WHY == wait ]] || SCHED_PICK_WHY=full
  SCHED_BLOCKED="${devs_free[*]:0:g}"
}

# sched::_ours_on DEV — does one of our running jobs use this device?
sched::_ours_on() {
  local slot
  for slot in "${!SLOT_JOB[@]}"; do [[ ${slot%:*} != "$1" ]] || return 0; done
  return 1
}

# sched::_slot_ready SLOT NEED NOW_MS — may this slot take a job now? 1 with SCHED_WHY_NOW when its GPU
# is busy, the slot is held by another process (then SCHED_WHY_HELD=1), or the device lacks NEED MiB net
# of reservations (then SCHED_WHY_MEM=1; NEED "all": a job never measured, which runs alone).
sched::_slot_ready() {
  local slot=$1 need=$2 now=$3 dev=${1%:*}
  local gpu=${GPU_PARENT[$dev]:-$dev}
  SCHED_WHY_NOW="" SCHED_WHY_MEM=0 SCHED_WHY_HELD=0
  if ! sched::_gpu_ready "$gpu" "$now"; then
    SCHED_WHY_NOW=${SCHED_WHY[$gpu]}
  elif [[ -n ${SLOT_NEXT_CHECK[$slot]:-} ]] && ((now < SLOT_NEXT_CHECK[$slot])); then
    SCHED_WHY_NOW=${SCHED_WHY[slot$slot]} SCHED_WHY_HELD=1
  elif [[ $need != 0 && $dev != cpu ]]; then
    sched::_sample "$now" # not the reading taken while our last job there ran (it still counts that job)
    lease::free "$dev"
    SCHED_WHY_MEM=1
    if ((SCHED_SAMPLED != 1)); then
      SCHED_WHY_NOW="GPU $dev's memory cannot be read right now"
    elif [[ $LEASE_FREE == NA ]]; then
      SCHED_WHY_NOW="GPU $dev does not report its memory, so its free memory cannot be checked"
    elif [[ $need == all ]]; then
      ! sched::_ours_on "$dev" && ((LEASE_RESERVED == 0)) ||
        SCHED_WHY_NOW="GPU $dev is shared, and this config was never measured (--need-mem auto): it runs alone"
    elif ((LEASE_FREE < need)); then
      SCHED_WHY_NOW="GPU $dev has $LEASE_FREE MiB free (net of ${LEASE_RESERVED} MiB reserved by starting jobs) < $need MiB needed"
    fi
  fi
  [[ -z $SCHED_WHY_NOW ]]
}

# sched::_take JOB NOW_MS SLOT... — open the slots' lease files (a slot found held before is locked here
# first, so the job is not sent to it in vain) and reserve the job's memory need on their devices; 0 with
# SCHED_PICK, LEASE_FDS, LEASE_FILES, LEASE_SLOTS set, 1 (nothing kept): a slot held or broken, no memory.
sched::_take() {
  local job=$1 now=$2 slot dev fd
  shift 2
  for slot in "$@"; do
    dev=${slot%:*}
    if ! lease::keep "$slot"; then
      SLOT_BROKEN[$slot]=1 # a lock file that is no regular file: that slot is never used (logged)
      sched::_release
      return 1
    fi
    LEASE_FDS+=("$LEASE_FD") LEASE_FILES+=("$LEASE_FILE") LEASE_SLOTS+=("$slot")
    if [[ -n ${SCHED_WHY[slot$slot]:-} && -z ${LEASE_LOCKED[$slot]:-} ]] && ! lease::lock "$LEASE_FD" "$LEASE_FILE"; then
      # a holder that ended between the two looks leaves no name: keep the one seen before
      [[ -z $LEASE_HOLDER_PID ]] || SCHED_WHY[slot$slot]="GPU $dev slot ${slot##*:} is held by $LEASE_HOLDER"
      SLOT_NEXT_CHECK[$slot]=$((now + MGPU_POLL_MS))
      sched::_blocked "$slot" "${SCHED_WHY[slot$slot]}"
      sched::_release
      return 1
    fi
    [[ -z ${SCHED_WHY[slot$slot]:-} ]] || LEASE_LOCKED[$slot]=1
  done
  LEASE_RESERVATIONS=() LEASE_RESERVED_MIB=()
  if [[ ${JOB[$job,need]:-0} != 0 && ${1%:*} != cpu ]]; then
    local devs=()
    for slot in "$@"; do devs+=("${slot%:*}"); done
    if ! lease::admit "$job" "${JOB[$job,need]}" "${devs[@]}"; then
      sched::_blocked "$1" "$LEASE_WHY" mem
      sched::_release
      return 1
    fi
  fi
  SCHED_PICK="$*"
}

# sched::_release — close the lease files a pick opened (no job took them).
sched::_release() {
  local slot
  for slot in "${LEASE_SLOTS[@]}"; do [[ -n ${SLOT_JOB[$slot]:-} ]] || lease::drop "$slot"; done
  LEASE_FDS=() LEASE_FILES=() LEASE_SLOTS=()
}

# sched::_held JOB SLOT WHY — the job's process found a slot's lease held by another process: the job
# goes back to the head of the queue, and the slot is tried again after MGPU_POLL_MS.
sched::_held() {
  local job=$1 slot=$2
  core::now_ms
  log::info "${JOB[$job,name]} did not start: GPU ${slot%:*} slot ${slot##*:} is held by $3"
  JOB[$job,wait_since]=${JOB[$job,tried_since]:-$CORE_NOW_MS}
  SCHED_WHY[slot$slot]="GPU ${slot%:*} slot ${slot##*:} is held by $3"
  SLOT_NEXT_CHECK[$slot]=$((CORE_NOW_MS + MGPU_POLL_MS))
  JOB[$job,status]=queued JOB[$job,gpu]="" JOB[$job,ms]=0 JOB[$job,exit]="" # its command never ran
  [[ -z ${JOB[$job,log]} ]] || rm -f -- "${JOB[$job,log]}"
  JOB[$job,log]=""
  SCHED_QUEUE=("$job" "${SCHED_QUEUE[@]}")
  SCHED_BLOCKED="" SCHED_BLOCK_WHY=""
  sched::_blocked "$slot" "${SCHED_WHY[slot$slot]}"
  sched::_waits "$job" "$CORE_NOW_MS" || true
}

# sched::_blocked SLOT WHY [mem] — note the first slot found blocked in this pick (mem: by memory, which
# --on-timeout run never overrides).
sched::_blocked() {
  SCHED_PICK_WHY="wait"
  [[ -n $SCHED_BLOCK_WHY ]] || SCHED_BLOCK_WHY=$2 SCHED_BLOCK_MEM=$((${3:+1}+0))
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

# sched::_expired JOB — the job waited MAX_WAIT: --on-timeout run starts it where it was blocked anyway
# (0, SCHED_PICK set), except where memory blocks it (memory is never overcommitted: 2, it waits on);
# skip and fail record it (1).
sched::_expired() {
  local job=$1 waited
  core::now_ms
  waited=$(((CORE_NOW_MS - JOB[$job,wait_since]) / 1000))
  if [[ $ON_TIMEOUT == run ]] && ((SCHED_BLOCK_MEM)); then
    log::warn "${JOB[$job,name]}: still waiting after MAX_WAIT ${MAX_WAIT}s: $SCHED_BLOCK_WHY; memory is never overcommitted, so it waits on (--on-timeout skip or fail would give up)"
    JOB[$job,next_note]=$((CORE_NOW_MS - JOB[$job,wait_since] + 30000))
    JOB[$job,wait_since]=$((CORE_NOW_MS - MAX_WAIT * 1000 + 30000)) # said again in 30 s, not at every tick
    return 2
  fi
  JOB[$job,waited]=$waited JOB[$job,wait_since]=""
  if [[ $ON_TIMEOUT == run ]]; then
    JOB[$job,reason]="started after ${waited}s (MAX_WAIT) although ${SCHED_BLOCK_WHY}"
    log::warn "${JOB[$job,name]}: still blocked after MAX_WAIT ${MAX_WAIT}s ($SCHED_BLOCK_WHY); starting it there anyway (--on-timeout run)"
    SCHED_PICK=$SCHED_BLOCKED LEASE_FDS=() LEASE_FILES=() LEASE_SLOTS=() LEASE_RESERVATIONS=()
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
    sched::_reap || [[ -n $SCHED_STOP ]] || core::sleep_ms "$MGPU_TICK_MS" # never spin
  elif [[ $pid == "$SCHED_TIMER" ]]; then
    SCHED_TIMER=""
    sched::_reap || true # a job bash reaped while the timer ran would never be reported by `wait -n`
    core::now_ms
    ((!${#pids[@]} || CORE_NOW_MS - ${SCHED_USAGE_MS:-0} < MGPU_POLL_MS)) || [[ ${SCHED_SLOTS[0]} == cpu:* ]] ||
      sched::_sample_usage
  elif [[ ${pids[*]} =~ (^| )$pid( |$) ]]; then
    sched::_ended "$pid" "$rc"
  fi
}

# sched::_alive PID — is this job's process still running (not gone, not a zombie, still our child)?
sched::_alive() {
  [[ -d /proc/self ]] || { kill -0 "$1" 2>/dev/null; return; }
  core::proc_stat "$1" && [[ ${CORE_STAT[0]} != Z && ${CORE_STAT[1]} == "$BASHPID" ]]
}

# sched::_reap — collect every job that is no longer running (`wait PID` gives bash's saved status, or
# 127 when bash lost it: sched::_ended then reads the job's own end record); 1 when none had ended.
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
  ((found))
}
