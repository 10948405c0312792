# shellcheck shell=bash disable=SC2034  # settings and CORE_* results are read by the other libraries
# core:: — what every entry script and library needs, each in one place: the library folder, the clock,
# a sleep that forks nothing, finding Python, and the shared settings with their defaults and checks.
# Sourcing it sources log.sh. Libraries return a status; only entry scripts exit.

MGPU_LIB=${BASH_SOURCE[0]%/*}
[[ ${BASH_SOURCE[0]} == */* ]] || MGPU_LIB=.
[[ $MGPU_LIB == /* ]] || MGPU_LIB=$PWD/$MGPU_LIB
MGPU_ROOT=${MGPU_ROOT:-${MGPU_LIB%/lib}}
# shellcheck source=lib/log.sh
source "$MGPU_LIB/log.sh"

# core::now_ms — the clock in milliseconds, into CORE_NOW_MS (no subshell).
core::now_ms() {
  local t=${EPOCHREALTIME//[!0-9]/}
  CORE_NOW_MS=$((10#$t / 1000))
}

# core::seconds MS — milliseconds as a decimal number of seconds (for sleep and timeout), into CORE_SECONDS.
core::seconds() { printf -v CORE_SECONDS '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }

# core::sleep_ms MS — sleep without a child process once core::sleep_fd has opened its FIFO: `read -t`
# on a FIFO nobody writes. A trapped signal (Ctrl-C) cuts it short, and no `sleep` shares the caller's
# process group to be killed by a second Ctrl-C. Without the FIFO, sleep(1).
core::sleep_ms() {
  core::seconds "$1"
  if [[ -n ${CORE_SLEEP_FD:-} ]]; then
    read -r -t "$CORE_SECONDS" -u "$CORE_SLEEP_FD" _ 2>/dev/null || true
  else
    sleep "$CORE_SECONDS"
  fi
}

# core::proc_stat PID — the fields of /proc/PID/stat that follow the process name, into CORE_STAT: [0] state,
# [1] ppid, [2] pgrp, [3] session, ... The file is read whole and cut after the last ") ", since a
# process name may hold spaces, ")" or a newline. 1 when the process is gone (or /proc is not there).
core::proc_stat() {
  local line=""
  CORE_STAT=()
  read -r -d '' line 2>/dev/null <"/proc/$1/stat" || [[ -n $line ]] || return 1
  read -r -a CORE_STAT <<<"${line##*) }"
}

# core::sleep_fd DIR — open the FIFO core::sleep_ms reads (DIR/sleep.fifo, made here); 1 if it cannot.
core::sleep_fd() {
  [[ -z ${CORE_SLEEP_FD:-} ]] || return 0
  mkfifo -m 600 -- "$1/sleep.fifo" 2>/dev/null || return 1
  exec {CORE_SLEEP_FD}<>"$1/sleep.fifo" # read-write: opening never blocks, and no writer ever writes
}

# core::need_value FLAG WORDS VALUE — 0 when FLAG has its value (WORDS: the words left, FLAG's own
# included); else 1, logged: nothing follows, or what follows is an option, which would be taken for the
# value (`--log-dir --dry-run` ran the sweep for real, into a folder named --dry-run).
core::need_value() {
  if (($2 < 2)); then
    log::error "$1 needs a value (see --help)"
    return 1
  fi
  [[ $3 == --[A-Za-z]* || $3 == -h ]] || return 0
  log::error "$1 needs a value (see --help), got the option '$3'"
  return 1
}

# core::make_dirs NAME=DIR... — make each folder (and its parents); 1, logged with the system's reason
# and the setting's name, for the first that cannot be made.
core::make_dirs() {
  local pair err
  for pair in "$@"; do
    [[ ! -d ${pair#*=} ]] || continue
    err=$(mkdir -p -- "${pair#*=}" 2>&1) && continue
    log::error "${pair%%=*} '${pair#*=}' cannot be made: ${err##*: }"
    return 1
  done
}

# core::python — the Python with torch, into CORE_PYTHON: $PYTHON, else the project's .venv, else python3.
core::python() {
  CORE_PYTHON=${PYTHON:-}
  [[ -n $CORE_PYTHON ]] && return 0
  if [[ -x $MGPU_ROOT/.venv/bin/python ]]; then CORE_PYTHON=$MGPU_ROOT/.venv/bin/python; else CORE_PYTHON=python3; fi
}

# core::py_env — the argv prefix that runs mgpu's Python modules from this checkout, into CORE_PY:
# env PYTHONPATH=<mgpu>/py... <python>
core::py_env() {
  core::python
  CORE_PY=(env "PYTHONPATH=$MGPU_ROOT/py${PYTHONPATH:+:$PYTHONPATH}" "$CORE_PYTHON")
}

# The tuning variables, "NAME min max default": core::defaults gives each its default, core::check_env
# validates them (a bad one would otherwise crash a sweep half-way).
CORE_TUNING=(
  "MGPU_UTIL_SAMPLES 1 100 5" "MGPU_UTIL_WINDOW_MS 0 600000 1000" "MGPU_UTIL_MARGIN 0 100 20"
  "MGPU_POLL_MS 1 3600000 5000" "MGPU_TICK_MS 1 60000 200" "MGPU_RETRY_BACKOFF_MS 0 3600000 5000"
  "MGPU_SMI_TIMEOUT 1 3600 10" "MGPU_TAIL_LINES 0 10000 15" "MGPU_SLURM_POLL_S 1 3600 10"
  "MGPU_SLURM_WATCH_S 1 3600 5"
)

# core::defaults — every shared setting from the environment, else its default. The one place they live.
core::defaults() {
  MAX_UTIL=${MAX_UTIL:-70} MAX_WAIT=${MAX_WAIT:-300} JOBS_PER_GPU=${JOBS_PER_GPU:-1}
  RETRIES=${RETRIES:-0} GRACE=${GRACE:-60} ON_TIMEOUT=${ON_TIMEOUT:-run} CPU_SLOTS=${CPU_SLOTS:-1}
  DRY_RUN=${DRY_RUN:-false} RESUME=${RESUME:-false} USE_MULTI_CONFIG=${USE_MULTI_CONFIG:-true}
  ORDER=${ORDER:-given}
  local spec name default _
  for spec in "${CORE_TUNING[@]}"; do
    read -r name _ _ default <<<"$spec"
    [[ -n ${!name:-} ]] || printf -v "$name" '%s' "$default"
  done
}

# core::check_env — each tuning variable must be an integer in its range; 2 (logged) if one is not.
core::check_env() {
  local spec name lo hi _
  for spec in "${CORE_TUNING[@]}"; do
    read -r name lo hi _ <<<"$spec"
    log::require_int "$name" "${!name}" "$lo" "$hi" || return 2
  done
}
