# shellcheck shell=bash
# log:: — messages for people, on stderr (stdout is for data). Colours only when stderr is a terminal
# and NO_COLOR is unset. Sourced by the entry scripts; no `set` lines here.

# A message that cannot be written (stderr closed, full, or a pipe whose reader is gone) is lost, never
# the caller's failure: under `set -e` it would end a launcher before it stopped its jobs.
log::_emit() {
  local level=$1 colour=$2
  shift 2
  if [[ ! -t 2 ]]; then
    printf '[%s] %s\n' "$level" "$*" >&2 || true
    return 0
  fi
  {
    printf '\r\033[K' >&2 # a terminal: clear the status line, print, then draw it again below
    if [[ -z ${NO_COLOR:-} ]]; then
      printf '\033[%sm[%s]\033[0m %s\n' "$colour" "$level" "$*" >&2
    else
      printf '[%s] %s\n' "$level" "$*" >&2
    fi
    [[ -z ${LOG_STATUS:-} ]] || printf '%s' "$LOG_STATUS" >&2
  } || true
}

# log::status TEXT — on a terminal, the one status line kept under the log ("" removes it).
log::status() {
  [[ -t 2 ]] || return 0
  LOG_STATUS=$1
  printf '\r\033[K%s' "$LOG_STATUS" >&2 || true
}

log::info() { log::_emit INFO 32 "$@"; }
log::warn() { log::_emit WARN 33 "$@"; }
log::error() { log::_emit ERROR 31 "$@"; }

# die MESSAGE... — log an error and exit with $DIE_STATUS (default 1).
die() {
  log::error "$@"
  exit "${DIE_STATUS:-1}"
}

# log::require_int NAME VALUE MIN [MAX] — fail with a message naming the setting, the value and the range.
log::require_int() {
  local name=$1 value=$2 min=$3 max=${4:-} allowed
  allowed="an integer of at least $min"
  [[ -z $max ]] || allowed="an integer from $min to $max"
  if [[ $value =~ ^[0-9]{1,15}$ ]] && ((10#$value >= min)) && { [[ -z $max ]] || ((10#$value <= max)); }; then
    return 0
  fi
  log::error "$name must be $allowed, got '$value'"
  return 1
}
