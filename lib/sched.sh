# shellcheck shell=bash disable=SC2034  # state shared with ledger.sh, sweep.sh and the entry scripts
# sched:: — run queued jobs on GPU slots, at most JOBS_PER_GPU a GPU across every launcher on the
# machine: flock leases, each job in its own process group, `wait -n` (no polling for job ends),
# waits for busy GPUs, retries, and clean stops. Records go through ledger.sh. Needs log.sh, gpu.sh,
# lease.sh.
#
# The entry script sets, then calls sched::init, sched::add for each job, and sched::run:
#   SCHED_SLOTS=(0:0 1:0 0:1 1:1)  GPU:slot pairs in launch-preference order (cpu:N in CPU mode)
#   MAX_UTIL MAX_WAIT ON_TIMEOUT(run|skip|fail) RETRIES GRACE MGPU_LOCK_DIR MGPU_RETRY_BACKOFF_MS

declare -A pids=()                  # config name -> pid of its running job (the seed's `declare -A pids`)
declare -a SCHED_SLOTS=() SCHED_QUEUE=()
declare -A GPU_WAITED_MS=() GPU_OURS_UNTIL=() SLOT_PID=() PID_JOB=() PID_SLOT=() GPU_BUSY_SINCE=() GPU_NEXT_CHECK=() GPU_NEXT_NOTE=()
declare -a JOB_NAME=() JOB_IMAGE=() JOB_TEXT=() JOB_OUT=() JOB_MARKER=() JOB_HASH=()
declare -a JOB_STATUS=() JOB_EXIT=() JOB_KIND=() JOB_RETRIES=() JOB_GPU=() JOB_LOG=() JOB_REASON=()
declare -a JOB_START_MS=() JOB_MS=() JOB_WAITED=() JOB_READY_AT=() JOB_AVOID=() JOB_FAILS=()
SCHED_STATE="" SCHED_STOP="" SCHED_TIMER="" SCHED_SAMPLE_MS=0

sched::init() {
  SCHED_STATE=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-sched.XXXXXX")
  ledger::begin
}

# sched::add NAME IMAGE TEXT OUTPUT_DIR MARKER -- ARGV... — queue one job. The job's hash (its exact
# argv) decides --resume.
sched::add() {
  local i=${#JOB_NAME[@]}
  JOB_NAME[i]=$1 JOB_IMAGE[i]=$2 JOB_TEXT[i]=$3 JOB_OUT[i]=$4 JOB_MARKER[i]=$5
  shift 6
  printf '%s\0' "$@" >"$SCHED_STATE/job$i.argv"
  JOB_HASH[i]=""
  JOB_STATUS[i]=queued JOB_RETRIES[i]=0 JOB_WAITED[i]=0 JOB_READY_AT[i]=0 JOB_AVOID[i]="" JOB_EXIT[i]="" JOB_FAILS[i]=""
  JOB_KIND[i]="" JOB_GPU[i]="" JOB_LOG[i]="" JOB_MS[i]=0 JOB_REASON[i]=""
  SCHED_QUEUE+=("$i")
}

# sched::hash_jobs — every job's hash (of its exact argv), in one sha256sum call.
sched::hash_jobs() {
  local sum file job
  ((${#JOB_NAME[@]})) && [[ -z ${JOB_HASH[0]} ]] || return 0
  while read -r sum file; do
    job=${file#job}
    JOB_HASH[${job%.argv}]=$sum
  done < <(cd "$SCHED_STATE" && sha256sum -- job*.argv)
}

# sched::argv JOB — the job's argv into the global array SCHED_ARGV.
sched::argv() { mapfile -d '' -t SCHED_ARGV <"$SCHED_STATE/job$1.argv"; }

# ---------------------------------------------------------------- GPU load

# sched::_gpu_state GPU NOW_MS — SCHED_GPU_STATE becomes ready, wait or expired (busy past MAX_WAIT).
sched::_gpu_state() {
  local gpu=$1 now=$2 rc=0
  SCHED_GPU_STATE=ready
  [[ $gpu == cpu || ${MAX_UTIL:-70} == 100 ]] && return 0
  # Load on a GPU that runs, or ran 2 s ago, one of our jobs is ours: other slots may use it.
  [[ -n ${GPU_OURS_UNTIL[$gpu]:-} ]] && ((GPU_OURS_UNTIL[$gpu] > now)) && return 0
  if [[ -n ${GPU_BUSY_SINCE[$gpu]:-} ]] && ((now < GPU_NEXT_CHECK[$gpu])); then
    SCHED_GPU_STATE="wait"
  else
    if ((!SCHED_SAMPLED)); then
      gpu::sample 2>/dev/null && SCHED_SAMPLED=1 || SCHED_SAMPLED=-1
      SCHED_SAMPLE_MS=$now
    fi
    if ((SCHED_SAMPLED == 1)); then gpu::judge "$gpu" || rc=$?; else rc=2; fi
    gpu::_now_ms
    now=$GPU_NOW_MS
    if ((rc == 0)); then
      [[ -z ${GPU_BUSY_SINCE[$gpu]:-} ]] || GPU_WAITED_MS[$gpu]=$((now - GPU_BUSY_SINCE[$gpu]))
      unset "GPU_BUSY_SINCE[$gpu]"
      return 0
    fi
    ((rc == 1)) || GPU_REASON="its load cannot be read right now"
    if [[ -z ${GPU_BUSY_SINCE[$gpu]:-} ]]; then
      GPU_BUSY_SINCE[$gpu]=$now GPU_NEXT_NOTE[$gpu]=0
      SCHED_WHY[$gpu]=$GPU_REASON
    fi
    GPU_NEXT_CHECK[$gpu]=$((now + ${MGPU_POLL_MS:-5000}))
    SCHED_GPU_STATE="wait"
  fi
  local waited=$((now - GPU_BUSY_SINCE[$gpu]))
  if ((waited >= ${MAX_WAIT:-300} * 1000)); then
    SCHED_GPU_STATE=expired
  elif ((waited >= GPU_NEXT_NOTE[$gpu])); then
    log::info "GPU $gpu is busy (${SCHED_WHY[$gpu]}); waited $((waited / 1000))s of up to ${MAX_WAIT:-300}s"
    GPU_NEXT_NOTE[$gpu]=$((waited + 30000))
  fi
}
declare -A SCHED_WHY=()

# ---------------------------------------------------------------- choosing a slot

# sched::_pick JOB NOW_MS — SCHED_PICK becomes a free, leased, ready slot index (lease in LEASE_FD),
# or "" with SCHED_PICK_WHY = full | wait. A slot on an expired GPU is taken with SCHED_PICK_EXPIRED=1.
sched::_pick() {
  local job=$1 now=$2 pass s gpu slot
  SCHED_PICK="" SCHED_PICK_WHY=full SCHED_PICK_EXPIRED=0
  for pass in prefer any; do
    for s in "${!SCHED_SLOTS[@]}"; do
      [[ -z ${SLOT_PID[$s]:-} ]] || continue
      gpu=${SCHED_SLOTS[s]%%:*} slot=${SCHED_SLOTS[s]#*:}
      [[ $pass == any || $gpu != "${JOB_AVOID[job]}" ]] || continue
      sched::_gpu_state "$gpu" "$now"
      if [[ $SCHED_GPU_STATE == wait ]]; then
        SCHED_PICK_WHY="wait"
        continue
      fi
      lease::take "$gpu" "$slot" || { SCHED_PICK_WHY="wait"; continue; }
      SCHED_PICK=$s
      [[ $SCHED_GPU_STATE == expired ]] && SCHED_PICK_EXPIRED=1
      return 0
    done
  done
}

# ---------------------------------------------------------------- launching

sched::_launch() {
  local job=$1 s=$2 gpu=${SCHED_SLOTS[$2]%%:*} pid visible
  visible=$gpu
  [[ $gpu == cpu ]] && visible=""
  ledger::log_path "${JOB_NAME[job]}" "$gpu"
  sched::argv "$job"
  [[ -z ${JOB_OUT[job]} || -d ${JOB_OUT[job]} ]] || mkdir -p -- "${JOB_OUT[job]}"
  # Job control on for this one fork: the job leads its own process group (its pid is the group id), so
  # stopping it reaches every process it started; and, unlike `setsid`, no program is run to do it.
  set -m
  CUDA_VISIBLE_DEVICES=$visible CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=${JOB_NAME[job]} MGPU_GPU=$gpu \
    OMP_NUM_THREADS=$SCHED_THREADS "${SCHED_ARGV[@]}" </dev/null >"$LEDGER_LOG" 2>&1 &
  pid=$!
  set +m
  exec {LEASE_FD}<&-
  SLOT_PID[$s]=$pid PID_JOB[$pid]=$job PID_SLOT[$pid]=$s pids[${JOB_NAME[job]}]=$pid
  JOB_STATUS[job]=running JOB_GPU[job]=$gpu JOB_LOG[job]=$LEDGER_LOG
  gpu::_now_ms
  JOB_START_MS[job]=$GPU_NOW_MS
  GPU_OURS_UNTIL[$gpu]=9999999999999
  local where="GPU $gpu"
  [[ $gpu != cpu ]] || where="the CPU"
  ledger::event "started ${JOB_NAME[job]} on $where (log $LEDGER_LOG)"
}

# sched::_fill — start every queued job that can start now; arm a timer when some must wait.
sched::_fill() {
  local i job rest=() need_timer=0 waited
  gpu::_now_ms
  local now=$GPU_NOW_MS
  # One sample of all GPUs serves every decision of this fill, and of later fills for 500 ms.
  SCHED_SAMPLED=$((now - SCHED_SAMPLE_MS < 500 ? 1 : 0))
  for i in "${!SCHED_QUEUE[@]}"; do
    job=${SCHED_QUEUE[i]}
    if ((JOB_READY_AT[job] > now)); then
      rest+=("$job") need_timer=1
      continue
    fi
    sched::_pick "$job" "$now"
    if [[ -z $SCHED_PICK ]]; then
      rest+=("${SCHED_QUEUE[@]:i}")
      [[ $SCHED_PICK_WHY == wait ]] && need_timer=1
      break
    fi
    local gpu=${SCHED_SLOTS[SCHED_PICK]%%:*}
    if [[ -n ${GPU_WAITED_MS[$gpu]:-} ]]; then
      JOB_WAITED[job]=$((GPU_WAITED_MS[$gpu] / 1000)) JOB_REASON[job]="waited for GPU $gpu: ${SCHED_WHY[$gpu]}"
      unset "GPU_WAITED_MS[$gpu]"
    fi
    if ((SCHED_PICK_EXPIRED)); then
      gpu::_now_ms
      waited=$(((GPU_NOW_MS - GPU_BUSY_SINCE[$gpu]) / 1000))
      JOB_WAITED[job]=$waited JOB_REASON[job]="GPU $gpu busy after ${waited}s: ${SCHED_WHY[$gpu]}"
      unset "GPU_BUSY_SINCE[$gpu]"
      if [[ $ON_TIMEOUT != run ]]; then
        exec {LEASE_FD}<&-
        JOB_STATUS[job]=$([[ $ON_TIMEOUT == skip ]] && echo skipped || echo failed)
        ledger::record "$job"
        ledger::event "${JOB_STATUS[job]} ${JOB_NAME[job]}: ${JOB_REASON[job]} (--on-timeout $ON_TIMEOUT)"
        continue
      fi
      log::warn "GPU $gpu still busy after MAX_WAIT ${MAX_WAIT}s; starting ${JOB_NAME[job]} there anyway (--on-timeout run)"
    fi
    sched::_launch "$job" "$SCHED_PICK"
  done
  SCHED_QUEUE=("${rest[@]}")
  if ((need_timer)) && [[ -z $SCHED_TIMER ]]; then
    sleep "$(gpu::_seconds "${MGPU_TICK_MS:-200}")" &
    SCHED_TIMER=$!
  fi
}

# ---------------------------------------------------------------- finishing

# sched::_finish PID STATUS — a job ended: free its slot, and queue it again (retry) or leave it to
# sched::_settle, which records it once the freed slot has its next job.
sched::_finish() {
  local pid=$1 rc=$2 job=${PID_JOB[$1]} s=${PID_SLOT[$1]}
  local gpu=${SCHED_SLOTS[s]%%:*} still=0 other
  unset "PID_JOB[$pid]" "PID_SLOT[$pid]" "SLOT_PID[$s]" "pids[${JOB_NAME[job]}]"
  for other in "${!SLOT_PID[@]}"; do [[ ${SCHED_SLOTS[other]%%:*} == "$gpu" ]] && still=1; done
  gpu::_now_ms
  ((still)) || GPU_OURS_UNTIL[$gpu]=$((GPU_NOW_MS + 2000))
  JOB_EXIT[job]=$rc JOB_MS[job]=$((GPU_NOW_MS - JOB_START_MS[job]))
  if [[ -n $SCHED_STOP ]]; then
    JOB_STATUS[job]=interrupted
  elif ((rc == 0)); then
    JOB_STATUS[job]=succeeded JOB_KIND[job]=""
  else
    JOB_KIND[job]=$(ledger::failure_kind "${JOB_LOG[job]}" "$rc")
    JOB_FAILS[job]+="${JOB_KIND[job]} on GPU $gpu"$'\n'
    if ((JOB_RETRIES[job] < RETRIES)); then
      JOB_RETRIES[job]=$((JOB_RETRIES[job] + 1))
      JOB_AVOID[job]=$gpu JOB_STATUS[job]=queued
      JOB_READY_AT[job]=$((GPU_NOW_MS + ${MGPU_RETRY_BACKOFF_MS:-5000} * (1 << (JOB_RETRIES[job] - 1))))
      SCHED_QUEUE=("$job" "${SCHED_QUEUE[@]}")
      ledger::event "retrying ${JOB_NAME[job]} (${JOB_KIND[job]}, exit $rc on GPU $gpu; retry ${JOB_RETRIES[job]} of $RETRIES, preferring another GPU)"
      return 0
    fi
    JOB_STATUS[job]=failed
  fi
  SCHED_ENDED+=("$job")
}
declare -a SCHED_ENDED=() # jobs ended and not yet recorded

# sched::_settle — the records of ended jobs: completion marker, summary record, progress line, and a
# failed job's last log lines. Kept off the path from a job's end to the next start on its GPU.
sched::_settle() {
  local job rc took
  for job in "${SCHED_ENDED[@]}"; do
    rc=${JOB_EXIT[job]}
    [[ ${JOB_STATUS[job]} != succeeded ]] || ledger::mark_done "$job"
    printf -v took '%d.%03d' $((JOB_MS[job] / 1000)) $((JOB_MS[job] % 1000))
    SCHED_ENDED=("${SCHED_ENDED[@]:1}")
    ledger::record "$job"
    ledger::event "${JOB_STATUS[job]} ${JOB_NAME[job]} (exit $rc${JOB_KIND[job]:+, ${JOB_KIND[job]}}, ${took}s)"
    [[ ${JOB_STATUS[job]} != failed ]] || ledger::show_tail "$job"
  done
}

# sched::_wait_one — block until a job or the timer ends (or a signal arrives), then handle it.
sched::_wait_one() {
  local pid="" rc=0
  wait -n -p pid || rc=$?
  [[ -n ${pid:-} ]] || return 0 # a trapped signal interrupted the wait (and unset pid)
  if [[ $pid == "$SCHED_TIMER" ]]; then
    SCHED_TIMER=""
  elif [[ -n ${PID_JOB[$pid]:-} ]]; then
    sched::_finish "$pid" "$rc"
  fi
}

# ---------------------------------------------------------------- stopping

# sched::group_alive PGID — does any process of the group still run? Zombies do not count: our own
# un-reaped job leader is one, and orphans wait as zombies until PID 1 reaps them (some never do).
sched::group_alive() {
  local stat fields
  [[ -r /proc/self/stat ]] || { kill -0 -- "-$1" 2>/dev/null; return; }
  for stat in /proc/[0-9]*/stat; do
    read -r fields <"$stat" 2>/dev/null || continue
    read -r -a fields <<<"${fields##*) }" # state ppid pgrp ...
    [[ ${fields[2]} == "$1" && ${fields[0]} != Z ]] && return 0
  done
  return 1
}

# sched::stop_all — TERM every job's process group, KILL what is left after GRACE seconds.
sched::stop_all() {
  local pid deadline alive
  ((${#PID_JOB[@]})) || return 0
  log::warn "stopping ${#PID_JOB[@]} running job(s): TERM now, KILL after ${GRACE}s"
  for pid in "${!PID_JOB[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  gpu::_now_ms
  deadline=$((GPU_NOW_MS + GRACE * 1000))
  while :; do
    alive=0
    for pid in "${!PID_JOB[@]}"; do
      if sched::group_alive "$pid"; then alive=1; fi
    done
    gpu::_now_ms
    ((alive && GPU_NOW_MS < deadline)) || break
    sleep 0.1
  done
  for pid in "${!PID_JOB[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for pid in "${!PID_JOB[@]}"; do
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    sched::_finish "$pid" "$rc"
  done
  sched::_settle
}

# sched::run — run the queue to the end (or to a signal); the summary is written either way.
sched::run() {
  SCHED_THREADS=${SCHED_THREADS:-1}
  sched::hash_jobs
  trap 'SCHED_STOP=INT' INT
  trap 'SCHED_STOP=TERM' TERM
  trap 'sched::_on_exit' EXIT
  while ((${#SCHED_QUEUE[@]} || ${#PID_JOB[@]})) && [[ -z $SCHED_STOP ]]; do
    sched::_fill
    sched::_settle
    [[ -z $SCHED_STOP ]] || break
    ((${#SCHED_QUEUE[@]} || ${#PID_JOB[@]})) || break
    sched::_wait_one
  done
  sched::_settle
  if [[ -n $SCHED_STOP ]]; then
    log::warn "got SIG$SCHED_STOP: no new jobs start"
    sched::stop_all
    local job
    for job in "${SCHED_QUEUE[@]}"; do
      JOB_STATUS[job]=interrupted
      ledger::record "$job"
    done
    SCHED_QUEUE=()
  fi
  [[ -z $SCHED_TIMER ]] || kill "$SCHED_TIMER" 2>/dev/null || true
  ledger::finish
}

# An unexpected exit (an error in the launcher itself) still stops every job and writes the summary.
sched::_on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if ((${#PID_JOB[@]})); then
    SCHED_STOP=${SCHED_STOP:-EXIT}
    sched::stop_all
  fi
  if [[ -n $LEDGER_TS && -z $LEDGER_FINISHED ]]; then
    sched::_settle
    ledger::finish
  fi
  [[ -z $SCHED_STATE ]] || rm -rf "$SCHED_STATE"
  exit "$rc"
}
