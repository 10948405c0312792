# shellcheck shell=bash disable=SC2034  # LEASE_* results are read by sched.sh
# lease:: — exclusive locks that outlive the launcher but never a crash: flock on a file, inherited by
# the job it guards, so the kernel drops it when the last process holding it ends.
#   GPU slots: at most one job per slot across every mgpu launcher on the machine (two users, or one user
#   twice): MGPU_LOCK_DIR/gpu<N>.slot<K>.lock (default /tmp/mgpu-locks, a sticky world-writable folder).
#   Job folders: one run of a config at a time, whichever launcher started it (<output dir>/.mgpu.lock).
# The launcher opens the lock files (no process is started for that); the job's own process takes the
# locks (lease::lock), off the launcher's path from one job's end to the next start.
# A lock file must be a regular file: a symbolic link could make mgpu write elsewhere, and a FIFO or a
# device would block the open forever, so both are refused before opening. Our own files are opened
# read-write (a FIFO swapped in at the last moment then still opens at once), other users' read-only.

# lease::_open FILE SETTING — open FILE (made if missing) into LEASE_OPEN_FD, without a child process;
# 2 (logged) when it is no regular file or cannot be made.
lease::_open() {
  local file=$1 setting=$2
  if [[ -L $file || (-e $file && ! -f $file) ]]; then
    log::error "$setting: refusing the lock file $file: it is a symbolic link or not a regular file"
    return 2
  fi
  if [[ ! -e $file || -O $file ]]; then
    { exec {LEASE_OPEN_FD}<>"$file"; } 2>/dev/null && return 0
  else
    { exec {LEASE_OPEN_FD}<"$file"; } 2>/dev/null && return 0
  fi
  log::error "$setting: cannot open the lock file $file (set MGPU_LOCK_DIR to a writable folder)"
  return 2
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
  local path pattern="" c pid cmdline=() i
  LEASE_HOLDER="a process that just ended, or another user's (not readable here)" LEASE_HOLDER_PID=""
  path=$(readlink -f -- "$1" 2>/dev/null) || return 0
  for ((i = 0; i < ${#path}; i++)); do # find's -lname takes a pattern: quote its special characters
    c=${path:i:1}
    [[ $c != [][*?\\] ]] || c="\\$c"
    pattern+=$c
  done
  pid=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$pattern" -not -path "/proc/$BASHPID/*" \
    -not -path "/proc/$$/*" -print -quit 2>/dev/null) || true
  pid=${pid#/proc/} pid=${pid%%/*}
  [[ -n $pid ]] || return 0
  mapfile -d '' -t cmdline 2>/dev/null <"/proc/$pid/cmdline" || true
  LEASE_HOLDER_PID=$pid LEASE_HOLDER="pid $pid"
  ((${#cmdline[@]} == 0)) || LEASE_HOLDER+=": ${cmdline[*]}"
  ((${#LEASE_HOLDER} <= 160)) || LEASE_HOLDER="${LEASE_HOLDER:0:157}..."
}
