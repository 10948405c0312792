# shellcheck shell=bash disable=SC2034  # LEASE_* results are read by sched.sh
# lease:: — exclusive locks that outlive the launcher but never a crash: flock on a file, inherited by
# the job it guards, so the kernel drops it when the last process holding it ends.
#   GPU slots: at most one job per slot across every mgpu launcher on the machine (two users, or one user
#   twice): MGPU_LOCK_DIR/gpu<N>.slot<K>.lock (default /tmp/mgpu-locks, a sticky world-writable folder).
#   Job folders: one run of a config at a time, whichever launcher started it (<output dir>/.mgpu.lock).
#   Memory reservations: what a GPU has free once the jobs still starting are counted (ours and other
#   launchers'), a job's own use from the per-process list, and the admission that writes a reservation
#   under a per-GPU lock, so two launchers never both count the same free memory (the start-up race that
#   made task-spooler drop its free-memory check). A reservation is a file
#   MGPU_LOCK_DIR/gpu<dev>.need.<launcher pid>.<job>: "<MiB> <job pid, or - while it is being forked>".
# The launcher opens the lock files (no process is started for that); the job's own process takes the
# locks (lease::lock), off the launcher's path from one job's end to the next start.
# A lock file must be a regular file: a symbolic link could make mgpu write elsewhere, and a FIFO or a
# device would block the open forever, so both are refused before opening. Our own files are opened
# read-write (a FIFO swapped in at the last moment then still opens at once), other users' read-only.

# lease::shared — the files made from here to lease::private are readable by all, whatever the umask (077
# locked other users out of the shared lock folder). The umask is read once a launcher; then builtins only,
# so no program runs on the job-start path.
lease::shared() {
  [[ -n $LEASE_UMASK ]] || LEASE_UMASK=$(umask)
  printf -v LEASE_SHARED_UMASK '%04o' $((8#$LEASE_UMASK & 8#0133))
  umask "$LEASE_SHARED_UMASK"
}
lease::private() { umask "$LEASE_UMASK"; }

# lease::_open FILE SETTING — open FILE (made if missing) into LEASE_OPEN_FD, without a child process;
# 2 (logged, and the cause in LEASE_OPEN_WHY) when it is no regular file or cannot be made (only then is a
# process started, to learn why).
lease::_open() {
  local file=$1 setting=$2
  LEASE_OPEN_WHY=""
  if [[ -L $file || (-e $file && ! -f $file) ]]; then
    LEASE_OPEN_WHY="it is a symbolic link or not a regular file"
    log::error "$setting: refusing the lock file $file: $LEASE_OPEN_WHY"
    return 2
  fi
  if [[ ! -e $file ]]; then
    local rc=0
    lease::shared
    { exec {LEASE_OPEN_FD}<>"$file"; } 2>/dev/null || rc=$?
    lease::private
    ((rc)) || return 0
  elif [[ -O $file ]]; then
    { exec {LEASE_OPEN_FD}<>"$file"; } 2>/dev/null && return 0
  else
    { exec {LEASE_OPEN_FD}<"$file"; } 2>/dev/null && return 0
    LEASE_OPEN_WHY="it is another user's, made under a umask that keeps others from reading it"
    log::error "$setting: cannot read the lock file $file, made by another user whose umask kept it from others: they can run chmod a+r on it (another MGPU_LOCK_DIR would stop sharing GPUs with them)"
    return 2
  fi
  local what="set MGPU_LOCK_DIR to a writable folder"
  lease::_why "$file" || what="raise it, or run fewer slots"
  log::error "$setting: cannot open the lock file $file: $LEASE_OPEN_WHY ($what)"
  return 2
}

# lease::_why FILE — why FILE could not be opened, into LEASE_OPEN_WHY: the system's words (No space left
# on device, Permission denied), or, 1, the open-file limit when no descriptor from 10 up is left (the
# open above needs one, as does this probe of /dev/null; a retry in $(...) would use a lower one and
# succeed).
lease::_why() {
  local probe
  if ! { exec {probe}</dev/null; } 2>/dev/null; then
    LEASE_OPEN_WHY="too many open files (this launcher has reached its open-file limit, ulimit -n)"
    return 1
  fi
  exec {probe}<&-
  lease::shared # as the open that failed (a file made now is made as lease files are)
  LEASE_OPEN_WHY=$({ : <>"$1"; } 2>&1) LEASE_OPEN_WHY=${LEASE_OPEN_WHY##*: }
  lease::private
  LEASE_OPEN_WHY=${LEASE_OPEN_WHY:-it cannot be made or opened}
}

# lease::open GPU SLOT — open the lease file of this GPU slot into LEASE_FD (not locked yet: the job
# takes it with lease::lock); 2 (logged) when the file or its folder is unusable.
lease::open() {
  local dir=${MGPU_LOCK_DIR:-/tmp/mgpu-locks}
  [[ -d $dir ]] || mkdir -m 1777 "$dir" 2>/dev/null || mkdir -p "$dir" 2>/dev/null || true
  if [[ -L $dir ]]; then
    log::error "MGPU_LOCK_DIR: refusing the lock folder $dir: it is a symbolic link"
    return 2
  fi
  LEASE_FILE=$dir/gpu$1.slot$2.lock
  lease::_open "$LEASE_FILE" MGPU_LOCK_DIR || return 2
  LEASE_FD=$LEASE_OPEN_FD
}

# Kept leases. The launcher keeps a slot's lease file open from one job to the next (LEASE_KEPT[slot], its
# descriptor), so the lock a job took on that open file stays taken, and the next job on the slot, which
# inherits it, starts without a `flock` process (LEASE_LOCKED[slot] set: a job held the lock and ended
# leaving nothing of its process group behind, and nothing holding its tie, sched::_tie; that is all the
# reuse trusts). A slot left without
# a job has its file closed at once (never `flock -u`: a process that left the job's group while holding
# the file keeps the lock), and every kept file is closed when the jobs are done, so what the entry script
# runs next holds none. A job that left processes running hands them its lease: the file is closed here
# (they keep the lock), and the next job locks a new open file and so finds them. Each job's process and
# the timer close the kept files of other slots, so a job holds only its own slots' leases.
declare -A LEASE_KEPT=() LEASE_LOCKED=()
LEASE_SLOTS=() LEASE_UMASK="" LEASE_SHARED_UMASK="" # the launcher's umask, read when it first makes a shared file

# lease::keep SLOT — LEASE_FD and LEASE_FILE of the slot ("dev:k"), the kept file or one opened now (then
# kept); 2 as lease::open.
lease::keep() {
  LEASE_FILE=${MGPU_LOCK_DIR:-/tmp/mgpu-locks}/gpu${1%:*}.slot${1##*:}.lock
  if [[ -n ${LEASE_KEPT[$1]:-} ]]; then
    # still the file of that name (one removed or made anew, by a cleaner of /tmp say, is let go)
    [[ /proc/$BASHPID/fd/${LEASE_KEPT[$1]} -ef $LEASE_FILE ]] && { LEASE_FD=${LEASE_KEPT[$1]} && return 0; }
    lease::drop "$1"
  fi
  lease::open "${1%:*}" "${1##*:}" || return 2
  LEASE_KEPT[$1]=$LEASE_FD
}

# lease::drop SLOT — stop keeping the slot's lease file: closed, so its lock ends with its last holder.
lease::drop() {
  local fd=${LEASE_KEPT[$1]:-}
  [[ -n $fd ]] || return 0
  exec {fd}<&-
  unset "LEASE_KEPT[$1]" "LEASE_LOCKED[$1]"
}

# lease::drop_all — every kept lease file closed (the jobs are done).
lease::drop_all() {
  local slot
  for slot in "${!LEASE_KEPT[@]}"; do lease::drop "$slot"; done
}

# lease::close_others [SLOT...] — in a child of the launcher: close the kept lease files of every slot
# but these.
lease::close_others() {
  local slot fd keep=" $* "
  for slot in "${!LEASE_KEPT[@]}"; do
    [[ $keep != *" $slot "* ]] || continue
    fd=${LEASE_KEPT[$slot]}
    exec {fd}<&-
  done
}

# lease::lock FD FILE — take the flock on the open FD of FILE: 0 taken; 1 another process holds it
# (LEASE_HOLDER says which); above 128 when a signal stopped it (a stop that came before the job began).
lease::lock() {
  local rc=0
  flock -n "$1" || rc=$?
  ((rc == 1)) || return "$rc"
  lease::holder "$2"
  return 1
}

# lease::holder FILE — who holds FILE open (so holds its lock: mgpu never waits on a lock), into
# LEASE_HOLDER ("pid 123: python -m mgpu.train_clip ...") and LEASE_HOLDER_PID. Found through
# /proc/*/fd (the pid in /proc/locks is the `flock` program's, gone at once); processes of other users
# cannot be read, so then it says so. Only called when a lock is found held, never on the launch path.
lease::holder() {
  local c pid cmdline=() holders=()
  LEASE_HOLDER="a process that just ended, or another user's (not readable here)" LEASE_HOLDER_PID=""
  lease::holders "$1" || return 0
  holders=("${LEASE_HOLDERS[@]}")
  local -A has=()
  for pid in "${holders[@]}"; do has[$pid]=1; done
  # Every process that has it open shares the lock; name the one whose parent does not (the training
  # script, not a worker or a `sleep` it started, which inherit the file).
  pid=""
  for c in "${holders[@]}"; do
    core::proc_stat "$c" || continue
    [[ -n ${has[${CORE_STAT[1]}]:-} ]] || { pid=$c && break; } # its parent is no holder
  done
  [[ -n $pid ]] || pid=${holders[0]:-}
  [[ -n $pid ]] || return 0
  mapfile -d '' -t cmdline 2>/dev/null <"/proc/$pid/cmdline" || true
  LEASE_HOLDER_PID=$pid LEASE_HOLDER="pid $pid"
  ((${#cmdline[@]} == 0)) || LEASE_HOLDER+=": ${cmdline[*]//[[:cntrl:]]/ }" # one line (bash -c scripts hold newlines)
  ((${#LEASE_HOLDER} <= 160)) || LEASE_HOLDER="${LEASE_HOLDER:0:157}..."
  # a process of an mgpu job (one a job left running, even in a session of its own): say which job
  cmdline=()
  mapfile -d '' -t cmdline 2>/dev/null <"/proc/$pid/environ" || true
  for c in "${cmdline[@]}"; do [[ $c != MGPU_CONFIG_NAME=* ]] || { LEASE_HOLDER+=" (of mgpu job ${c#*=})" && break; }; done
}

# lease::holders FILE — the pids of the processes (this launcher aside) that have FILE open, into
# LEASE_HOLDERS, each once; 1 when FILE has no path. A scan of /proc/*/fd: never on the launch path.
lease::holders() {
  local path pattern="" c i pid found
  local -A has=()
  LEASE_HOLDERS=()
  path=$(readlink -f -- "$1" 2>/dev/null) || return 1
  for ((i = 0; i < ${#path}; i++)); do # find's -lname takes a pattern: quote its special characters
    c=${path:i:1}
    [[ $c != [][*?\\] ]] || c="\\$c"
    pattern+=$c
  done
  found=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$pattern" -not -path "/proc/$BASHPID/*" \
    -not -path "/proc/$$/*" -print 2>/dev/null) || true
  for pid in $found; do
    pid=${pid#/proc/} pid=${pid%%/*}
    [[ -n ${has[$pid]:-} ]] || LEASE_HOLDERS+=("$pid") has[$pid]=1
  done
}

# lease::usage PGID DEV — MiB the processes of a job (its process group) use on a device, from the last
# sample's process list (GPU_PROCS: "dev,pid,MiB" lines), into LEASE_USAGE.
lease::usage() {
  local dev pid used
  LEASE_USAGE=0
  while IFS=, read -r dev pid used; do
    [[ $dev == "$2" && $used =~ ^[0-9]+$ && $pid =~ ^[0-9]+$ ]] || continue
    core::proc_stat "$pid" || continue
    [[ ${CORE_STAT[2]} != "$1" ]] || LEASE_USAGE=$((LEASE_USAGE + used))
  done <<<"${GPU_PROCS:-}"
}

# lease::reserved DEV [SKIP] — MiB still reserved on a device by jobs that are starting: each live
# reservation counts what its job has not yet allocated (its need minus its use now). SKIP: one
# reservation file to leave out (the caller's own). Files of ended jobs are removed when ours.
lease::reserved() {
  local file need pid owner _
  LEASE_RESERVED=0
  for file in "${MGPU_LOCK_DIR:-/tmp/mgpu-locks}/gpu$1".need.*; do
    [[ -f $file && $file != "${2:-}" ]] || continue
    read -r need pid _ 2>/dev/null <"$file" || continue
    owner=${file##*.need.} owner=${owner%%.*}
    if [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]]; then
      lease::usage "$pid" "$1"
      ((need <= LEASE_USAGE)) || LEASE_RESERVED=$((LEASE_RESERVED + need - LEASE_USAGE))
    elif [[ $pid == - && $owner =~ ^[0-9]+$ && -d /proc/$owner ]]; then
      LEASE_RESERVED=$((LEASE_RESERVED + need)) # its job is being forked right now
    elif [[ -O $file ]]; then
      rm -f -- "$file" # a reservation whose job ended (killed before it could remove it)
    fi
  done
}

# lease::free DEV [SKIP] — MiB free on the device for a new job (total - used - reserved), into
# LEASE_FREE; NA when the driver does not report its memory (unified memory): then nothing fits.
lease::free() {
  LEASE_FREE=NA
  [[ ${GPU_MEM_TOTAL[$1]:-NA} != NA && ${GPU_MEM_USED[$1]:-NA} != NA ]] || return 0
  lease::reserved "$1" "${2:-}"
  LEASE_FREE=$((GPU_MEM_TOTAL[$1] - GPU_MEM_USED[$1] - LEASE_RESERVED))
}

# lease::admit JOB NEED DEV... — reserve NEED MiB (all: every MiB free, for a job never measured, which
# runs alone) on each device for the job, each under that device's admission lock (free memory is
# counted again inside it, other launchers' reservations included); 0 admitted (LEASE_RESERVATIONS lists
# the files, LEASE_RESERVED_MIB what each holds), 1 not (LEASE_WHY says why; nothing is left reserved).
lease::admit() {
  local job=$1 need=$2 dev fd file mib dir=${MGPU_LOCK_DIR:-/tmp/mgpu-locks}
  shift 2
  LEASE_RESERVATIONS=() LEASE_RESERVED_MIB=() LEASE_WHY=""
  for dev in "$@"; do
    file=$dir/gpu$dev.need.$$.$job
    lease::_open "$dir/gpu$dev.admit.lock" MGPU_LOCK_DIR || { LEASE_WHY="GPU $dev: its admission lock is unusable"; break; }
    fd=$LEASE_OPEN_FD
    if ! flock -w 10 "$fd"; then
      exec {fd}<&-
      LEASE_WHY="GPU $dev: its admission lock stayed taken for 10 s"
      break
    fi
    lease::free "$dev" "$file"
    mib=$need
    [[ $need != all ]] || mib=$LEASE_FREE
    if [[ $LEASE_FREE == NA ]]; then
      LEASE_WHY="GPU $dev does not report its memory, so its free memory cannot be checked"
    elif [[ $need == all ]] && ((LEASE_RESERVED > 0 || mib <= 0)); then
      LEASE_WHY="GPU $dev is shared right now, and a config never measured runs alone"
    elif ((LEASE_FREE < mib)); then
      LEASE_WHY="GPU $dev has $LEASE_FREE MiB free (after ${LEASE_RESERVED} MiB reserved by starting jobs) < $need MiB needed"
    else
      lease::shared # other users' launchers read it
      ! printf '%s -\n' "$mib" 2>/dev/null >"$file" || LEASE_RESERVATIONS+=("$file") LEASE_RESERVED_MIB+=("$mib")
      lease::private
    fi
    exec {fd}<&- # the lock goes with its last descriptor
    [[ -z $LEASE_WHY ]] || break
  done
  [[ -n $LEASE_WHY ]] || return 0
  ((${#LEASE_RESERVATIONS[@]} == 0)) || rm -f -- "${LEASE_RESERVATIONS[@]}"
  LEASE_RESERVATIONS=() LEASE_RESERVED_MIB=()
  return 1
}
