# shellcheck shell=bash
# Shared set-up for the bats suite: bats-support/bats-assert, the project root, a temp dir whose
# name has spaces, and fakes first on PATH.

bats_require_minimum_version 1.5.0
bats_load_library bats-support
bats_load_library bats-assert

ROOT=$(cd "$BATS_TEST_DIRNAME/../.." && pwd)
SCENARIOS=$ROOT/examples/scenarios
PYTHON=${PYTHON:-python3}

common_setup() {
  WORK="$BATS_TEST_TMPDIR/work dir with spaces"
  mkdir -p "$WORK"
  # Parsed scenarios are cached for the whole run, not in the home folder.
  export MGPU_UTIL_WINDOW_MS=0 MGPU_POLL_MS=100 NO_COLOR=1 MGPU_CACHE_DIR=$BATS_RUN_TMPDIR/mgpu-cache
  # GPU slots are leased in a folder of the test file's own, not the machine's /tmp/mgpu-locks: a test never
  # waits for a real sweep on this machine, or for a test file running beside it (tools/test-bats.sh)
  export MGPU_LOCK_DIR=$BATS_FILE_TMPDIR/locks
  unset MGPU_FAKE_GPUS CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER MAX_UTIL MAX_WAIT NVIDIA_SMI
}

# gpu_sh FUNCTION ARGS... — run a lib/gpu.sh function in a fresh bash under the entry scripts' strict mode,
# with the settings checked first as the entry scripts do.
gpu_sh() {
  run bash -c 'set -Eeuo pipefail; source "$1/lib/gpu.sh"; core::defaults; core::check_env || exit 2; shift; "$@"' _ "$ROOT" "$@"
}

# scenario_copy NAME — a private, writable copy of a shipped scenario; prints its path.
scenario_copy() {
  cp "$SCENARIOS/$1.json" "$WORK/$1.json"
  echo "$WORK/$1.json"
}

# live_in_group PGID — how many processes of the group still run (zombies excluded: they hold nothing)
live_in_group() {
  # cat, not awk, opens the files: a process may vanish between the glob and the open
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v g="$1" '{ sub(/^.*\) /, ""); if ($3 == g && $1 != "Z") n++ } END { print n + 0 }'
}

# set_util FILE INDEX PERCENT — change one GPU's utilization in a scenario, atomically.
set_util() {
  jq --argjson i "$2" --argjson u "$3" '(.gpus[] | select(.index == $i) | .utilization_gpu) = $u' "$1" >"$1.tmp"
  mv "$1.tmp" "$1"
}

# wait_for SECONDS WHAT COMMAND... — run COMMAND every 0.05 s until it succeeds; after SECONDS, fail the
# test loudly, saying what it waited for.
wait_for() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      echo "timed out after ${limit}s waiting for: $what" >&2
      return 1
    fi
    sleep 0.05
  done
}

# hold_lock FILE [SCRIPT] — a process of this test takes FILE's lock and keeps it until $WORK/release
# exists: flock, running bash with SCRIPT, a newline, then its wait (its children inherit the file too; its
# command line holds a newline, as many do). Returns once the lock is held; HOLDER_PID is flock's pid.
hold_lock() {
  mkdir -p "${1%/*}" && : >"$1"
  # shellcheck disable=SC2016  # the holder's bash expands its own $1
  flock -w 10 "$1" bash -c "${2:-}"$'\n''until [[ -e "$1" ]]; do sleep 0.05; done' _ "$WORK/release" &
  # shellcheck disable=SC2034  # read by the tests
  HOLDER_PID=$!
  wait_for 10 "the test's holder to take the lock of $1" lock_held "$1"
}
lock_held() { ! flock -n "$1" true; }

# count_lines PATTERN FILE — how many lines of FILE match PATTERN (0 for a missing file)
count_lines() { grep -c -e "$1" "$2" 2>/dev/null || true; }

# children_of PID PATTERN — the pids of PID's own children whose command line matches PATTERN (a bash
# glob), one a line: this test's processes, never another checkout's (nothing searches the whole machine by command line).
children_of() {
  local stat fields pid cmdline=()
  for stat in /proc/[0-9]*/stat; do
    read -r fields 2>/dev/null <"$stat" || continue
    pid=${stat#/proc/} pid=${pid%/stat}
    read -r -a fields <<<"${fields##*) }" # state ppid pgrp ...
    [[ ${fields[1]} == "$1" ]] || continue
    mapfile -d '' -t cmdline 2>/dev/null <"/proc/$pid/cmdline" || continue
    # shellcheck disable=SC2053  # the pattern is meant as a glob
    [[ "${cmdline[*]}" == $2 ]] && echo "$pid"
  done
  return 0
}

# sigint_default CMD... — run CMD with SIGINT at its default disposition. A suite started in the background
# (`make test &`, nohup, a CI runner) inherits SIGINT ignored, and a shell cannot un-ignore a signal it
# started with; this puts the disposition a terminal gives back before CMD starts.
sigint_default() {
  "$PYTHON" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

# queue_marker LOG_DIR LINE [K] — where gpu_queue.sh keeps the completion marker of the K-th job (default
# 1) whose line is LINE: named by the sha256 of its argv (bash -c LINE), so by its command, not its line.
queue_marker() {
  local sum
  sum=$(printf '%s\0' bash -c "$2" | sha256sum)
  echo "$1/.mgpu_done/${sum%% *}-${3:-1}"
}

# wait_child SECONDS PID — wait for a child of the test to end; its exit status into CHILD_RC. After
# SECONDS it is killed and the test fails, saying so: a hang fails the test instead of holding the suite.
wait_child() {
  if ! wait_for "$1" "process $2 to end" child_ended "$2"; then
    kill -KILL "$2" 2>/dev/null || true
    return 1
  fi
  # shellcheck disable=SC2034  # read by the tests
  CHILD_RC=0 && wait "$2" || CHILD_RC=$?
}

# child_ended PID — has the process ended (gone, or a zombie not yet waited for)?
child_ended() {
  local state=""
  [[ -e /proc/$1 ]] || return 0
  read -r state 2>/dev/null </proc/"$1"/stat || return 0
  state=${state##*) }
  [[ ${state%% *} == Z ]]
}
