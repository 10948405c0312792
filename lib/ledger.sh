# shellcheck shell=bash disable=SC2034  # LEDGER_* results are read by sched.sh and slurm.sh
# ledger:: — formats what sched.sh decided: each job's log file (name and header) and failure kind,
# progress lines, one record per job, completion markers for --resume, and the summary (a table on
# stdout; LOG_DIR/summary_<ts>.json and .tsv). It reads the job records (JOB[<i>,<field>]) and never
# changes them. Needs core.sh, log.sh and jq (only to read a trainer's metrics.json).

declare -A JOB pids # the job records and the running-job table belong to sched.sh; named here for readers
LEDGER_STARTED="" LEDGER_STARTED_MS=0 LEDGER_TS="" LEDGER_FINISHED=""
LEDGER_DONE=0 LEDGER_RAN=0 LEDGER_RAN_MS=0 LEDGER_FAILED=0
declare -a LEDGER_JSON=() LEDGER_ROW=() LEDGER_TSV=()
# The summary's columns: the table people read, and the .tsv with numbers and words in separate columns.
LEDGER_HEADER=$'config\tgpu\tstatus\texit\tretries\tseconds\twaited\tpeak\tmetric\tlog'
LEDGER_TSV_HEADER=$'config\tgpu\tstatus\texit_code\tfailure\tretries\tseconds\twaited_seconds\tgpu_seconds\tpeak_mem_mib\tmetric_name\tmetric_value\tlog\tdetail\tcause\tcommand'
LEDGER_COMMANDS="" # gpu_queue.sh: the table shows each job's command too (job2 says nothing)

ledger::begin() {
  printf -v LEDGER_STARTED '%(%Y-%m-%dT%H:%M:%S%z)T' -1
  printf -v LEDGER_TS '%(%Y%m%d_%H%M%S)T' -1
  core::now_ms
  LEDGER_STARTED_MS=$CORE_NOW_MS
}

# ledger::ev KIND FIELD... — one line of the sweep's event file (tab-separated; tabs and newlines in a
# field become spaces), read by `--status` from another terminal (python -m mgpu.status). An append, no
# child process; a write that fails (LOG_DIR gone) is not the sweep's failure.
ledger::ev() {
  [[ -n $LEDGER_EVENTS ]] || return 0
  local fields=("${@//[$'\t\n\r']/ }") IFS=$'\t'
  printf '%s\n' "${fields[*]}" 2>/dev/null >>"$LEDGER_EVENTS" || [[ -n $LEDGER_EV_LOST ]] || {
    LEDGER_EV_LOST=1 && ledger::why_not "$LEDGER_EVENTS" # said once: `--status` now shows an old picture
    log::warn "cannot write the event file $LEDGER_EVENTS ($LEDGER_WHY): --status from another terminal will not show this sweep's progress; the sweep goes on"
  }
}
LEDGER_EVENTS="" LEDGER_EV_LOST=""

# ledger::why_not FILE — why appending to FILE fails, in the system's words (No space left on device),
# into LEDGER_WHY; only after a write failed (it appends an empty line to find out).
ledger::why_not() {
  local err
  err=$({ printf '\n' >>"$1"; } 2>&1) || true
  err=${err##*: } LEDGER_WHY=${err:-write error}
}

# ledger::events_begin — start LOG_DIR/sweep_<ts>_<pid>.events: the launcher, then every job as it stands.
ledger::events_begin() {
  local job
  LEDGER_EVENTS=$LOG_DIR/sweep_${LEDGER_TS}_$$.events
  ledger::ev sweep "$LEDGER_STARTED_MS" "$$" "${HOSTNAME:-}"
  for ((job = 0; job < SCHED_N; job++)); do
    ledger::ev job "${JOB[$job,name]}" "${JOB[$job,status]}" "${JOB[$job,params]}" "${JOB[$job,out]}" "${JOB[$job,reason]}"
  done
}

# ledger::event TEXT — one progress line: counts, elapsed, and an ETA from the jobs finished so far.
ledger::event() {
  local total=$SCHED_N eta="" ended=$((LEDGER_DONE + ${#SCHED_ENDED[@]}))
  local left=$((total - ended)) running=${#pids[@]}
  core::now_ms
  if ((LEDGER_RAN && left)); then
    eta=", ETA ~$(((LEDGER_RAN_MS / LEDGER_RAN) * left / ${#SCHED_SLOTS[@]} / 1000 + 1))s"
  fi
  local counts="$ended/$total done, $running running, $((left - running)) queued, $(((CORE_NOW_MS - LEDGER_STARTED_MS) / 1000))s$eta"
  log::info "[$counts] $*"
  log::status "mgpu: $counts (failed so far: $LEDGER_FAILED)"
}

# ledger::is_done JOB — did an earlier run finish this exact job (same hash) with exit 0?
# (JOB[<i>,marker_old]: where an earlier version wrote it, read too; LEDGER_DONE_OLD set when it said so.)
ledger::is_done() {
  local marker line
  LEDGER_DONE_OLD=""
  for marker in "${JOB[$1,marker]}" ${JOB[$1,marker_old]:+"${JOB[$1,marker_old]}"}; do
    line=""
    [[ -f $marker ]] && read -r line <"$marker" 2>/dev/null
    [[ -z $line || $line != "${JOB[$1,hash]}" ]] || { [[ $marker == "${JOB[$1,marker]}" ]] || LEDGER_DONE_OLD=1; return 0; }
  done
  return 1
}

# ledger::mark_done JOB — write the completion marker (a marker cut short by a crash holds no whole hash,
# so it only makes --resume run the job again).
ledger::mark_done() {
  local marker=${JOB[$1,marker]}
  { [[ -d ${marker%/*} ]] || mkdir -p "${marker%/*}"; } 2>/dev/null && printf '%s\n' "${JOB[$1,hash]}" 2>/dev/null >"$marker"
}

# ledger::log_path NAME GPU — LEDGER_LOG: a new log file LOG_DIR/<name>_gpu<id>_<YYYYmmdd_HHMMSS>.log
# (<name>_cpu_<...>.log without a GPU), never reused. A removed LOG_DIR is made again. 1 with LEDGER_ERROR (the system's words) when the file
# cannot be made.
ledger::log_path() {
  local - base n=1 path ts err # `local -`: the noclobber set below ends with this function
  printf -v ts '%(%Y%m%d_%H%M%S)T' -1
  [[ -d $LOG_DIR ]] || { mkdir -p -- "$LOG_DIR" 2>/dev/null && log::warn "LOG_DIR $LOG_DIR was gone; made it again"; }
  base=$LOG_DIR/$1_gpu${2//,/+}_$ts # several GPUs: <name>_gpu0+1_<time>.log
  [[ $2 != cpu ]] || base=$LOG_DIR/$1_cpu_$ts
  path=$base.log
  set -C # noclobber: creating the file fails if it exists, so no two jobs ever share a log
  while :; do
    if { : >"$path"; } 2>/dev/null; then
      LEDGER_LOG=$path
      return 0
    elif [[ -e $path || -L $path ]]; then
      n=$((n + 1)) path=${base}_$n.log
    else
      err=$({ : >"$path"; } 2>&1) || true
      LEDGER_ERROR="cannot create its log file $path: ${err##*: }"
      return 1
    fi
  done
}

# ledger::header JOB GPU VISIBLE ARGV... — the first lines of a job's log: what ran, where, when, and from
# which mgpu. One write, so its status says whether the log can be written at all (a full disk: 1).
ledger::header() {
  local started where="GPU $2" text argv
  [[ $2 != cpu ]] || where="the CPU"
  printf -v started '%(%Y-%m-%d %H:%M:%S %z)T' -1
  printf -v text '# mgpu: %s on %s (CUDA_VISIBLE_DEVICES=%s), host %s, started %s, mgpu %s\n# command:' \
    "${JOB[$1,name]}" "$where" "$3" "${HOSTNAME:-?}" "$started" "${LEDGER_VERSION:-unknown}"
  printf -v argv ' %q' "${@:4}"
  printf '%s%s\n' "$text" "$argv"
}

# ledger::version — the mgpu commit and whether the checkout was dirty, into LEDGER_VERSION (once).
ledger::version() {
  local commit dirty=""
  commit=$(git -C "$MGPU_ROOT" rev-parse --short HEAD 2>/dev/null) || { LEDGER_VERSION="(not a git checkout)"; return 0; }
  [[ -z $(git -C "$MGPU_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] || dirty=" (uncommitted changes)"
  LEDGER_VERSION="commit $commit$dirty"
}

# ledger::failure_kind LOG STATUS — why a job failed: oom (CUDA out of memory in its log), nccl (a
# collective or NCCL failure in its log), shm full (DataLoader workers out of shared memory, /dev/shm),
# disk full (ENOSPC or EDQUOT in its log, or the log's own disk full, which leaves nothing in it), signal
# <NAME>, or error.
ledger::failure_kind() {
  local free # the log's file system: its free blocks for this user (root may use those kept for root)
  if grep -q -E 'CUDA out of memory|OutOfMemoryError' "$1" 2>/dev/null; then
    echo oom
  elif grep -q -E 'NCCL (error|WARN)|ncclUnhandledCudaError|ncclSystemError|ncclInternalError|ncclRemoteError|ProcessGroupNCCL.*(timed out|Timeout|error)|Watchdog caught collective operation timeout|DistBackendError' "$1" 2>/dev/null; then
    echo nccl
  elif grep -q -E 'unable to write to file </torch_|unable to allocate shared memory|DataLoader worker .*Bus error' "$1" 2>/dev/null; then
    echo "shm full"
  elif grep -q -E 'No space left on device|Disk quota exceeded|\[Errno (28|122)\]' "$1" 2>/dev/null; then
    echo "disk full"
  elif (($2 > 128 && $2 < 160)); then
    echo "signal $(kill -l $(($2 - 128)) 2>/dev/null || echo $(($2 - 128)))"
  elif free=$(stat -f -c "$( ((EUID)) && echo %a || echo %f)" -- "${1%/*}" 2>/dev/null) && ((free == 0)); then
    echo "disk full"
  else
    echo error
  fi
}

# ledger::cause KIND STATUS — a failure kind in words, into LEDGER_CAUSE.
ledger::cause() {
  case $1 in
    "") LEDGER_CAUSE="" ;;
    oom) LEDGER_CAUSE="CUDA out of memory on the GPU" ;;
    "host oom") LEDGER_CAUSE="the host ran out of memory: the kernel's OOM killer ended it" ;;
    nccl) LEDGER_CAUSE="an NCCL/collective failure (a rank died or timed out)" ;;
    "signal KILL") LEDGER_CAUSE="killed (SIGKILL) by something outside mgpu" ;;
    "signal SEGV") LEDGER_CAUSE="crashed (segmentation fault)" ;;
    signal\ *) LEDGER_CAUSE="ended by SIG${1#signal }" ;;
    "shm full") LEDGER_CAUSE="shared memory (/dev/shm) ran out: DataLoader workers pass batches through it; lower --workers, or give the container more (docker --shm-size)" ;;
    "disk full") LEDGER_CAUSE="a disk it writes to is full or over its quota (its log's or its output's): free some space, then run again with --resume" ;;
    error) LEDGER_CAUSE="exited with status $2 (see its log)" ;;
    *) LEDGER_CAUSE=$1 ;;
  esac
}

# ledger::show_tail JOB — the last lines of a failed job's log, so nobody has to go looking.
ledger::show_tail() {
  local log=${JOB[$1,log]}
  if [[ -z $log || ! -s $log || ${JOB[$1,kind]} == "could not start" ]]; then # (a header cut short says less)
    [[ -z ${JOB[$1,reason]} ]] || log::error "${JOB[$1,name]} failed: ${JOB[$1,reason]}"
    return 0
  fi
  log::error "${JOB[$1,name]} failed; the last lines of $log:"
  # a line over 500 characters (a long command in the header, a progress bar redrawn with \r) is cut
  # (then at 2,000 bytes, for a line holding bytes that are not characters, which `.` does not match);
  # NUL bytes (binary output) are dropped: a terminal shows nothing for them, and they end shell strings
  tail -n "$MGPU_TAIL_LINES" "$log" | tr -d '\000' | sed -E 's/^(.{500}).{4,}$/\1 .../' | LC_ALL=C sed -E 's/^(.{2000}).{4,}$/\1 .../; s/^/    | /' >&2 ||
    true # stderr gone: lost, never fatal
}

# ledger::_str TEXT — TEXT as a JSON string (or null when empty) into LEDGER_STR, without a fork.
ledger::_str() {
  local s=$1
  [[ -n $s ]] || { LEDGER_STR=null; return 0; }
  [[ $s == *[\\\"[:cntrl:]]* || $s == *[![:ascii:]]* ]] || { LEDGER_STR="\"$s\""; return 0; } # nothing to escape
  [[ $s != *[![:ascii:]]* ]] || { ledger::_utf8 "$s" && s=$LEDGER_UTF8; }
  s=${s//\\/\\\\} s=${s//\"/\\\"} s=${s//$'\n'/\\n} s=${s//$'\t'/\\t} s=${s//$'\r'/\\r}
  LEDGER_STR="\"${s//[$'\001'-$'\037']/?}\""
}

# ledger::_utf8 TEXT — TEXT as valid UTF-8 into LEDGER_UTF8: each byte that starts no valid sequence (a name
# or command in Latin-1 or GBK), and each cut-off character, becomes one U+FFFD, by Python's own decoder
# (errors="replace"; a bash loop was quadratic on long strings). JSON must be UTF-8: Python's json refuses
# a whole summary over one such byte. Without Python, each byte that is not ASCII becomes "?".
ledger::_utf8() {
  local LC_ALL=C # bytes, whatever the user's locale
  if ledger::is_utf8 "$1"; then
    LEDGER_UTF8=$1 # valid already (Chinese, say): the common case, without a process
    return 0
  fi
  core::python
  if LEDGER_UTF8=$("$CORE_PYTHON" -c 'import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[:-1].decode("utf-8", "replace").encode() + b".")' 2>/dev/null <<<"$1"); then
    LEDGER_UTF8=${LEDGER_UTF8%.} # (the dot keeps the newlines a command substitution would drop)
  else
    LEDGER_UTF8=${1//[$'\x80'-$'\xff']/?}
  fi
}

# ledger::is_utf8 TEXT — 0 when TEXT is valid UTF-8 (as Python's strict decoder holds it: no overlong forms,
# no surrogates, nothing above U+10FFFF), 1 otherwise.
ledger::is_utf8() {
  local LC_ALL=C # bytes, whatever the user's locale
  [[ $1 =~ $LEDGER_UTF8_RE ]]
}
LEDGER_UTF8_RE=$'^([\x01-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf][\x80-\xbf]|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf][\x80-\xbf]|[\xf1-\xf3][\x80-\xbf][\x80-\xbf][\x80-\xbf]|\xf4[\x80-\x8f][\x80-\xbf][\x80-\xbf])*$'

# ledger::record JOB — the job's final record, one JSON line and one table row, kept by job index for
# the summary. Only a metrics.json this run wrote counts (newer than the file JOB[<i>,since] whose time
# is the job's start), or, for a config done earlier, the one that run left.
ledger::record() {
  local job=$1 metrics=null file=${JOB[$1,out]:+${JOB[$1,out]}/metrics.json} fails="" f status=${JOB[$1,status]}
  LEDGER_METRIC_NAME="" LEDGER_METRIC_VALUE=""
  if [[ -z ${LEDGER_JSON[job]:-} ]]; then # counted once: a second record (a detail added later) replaces it
    LEDGER_DONE=$((LEDGER_DONE + 1))
    if [[ $status == succeeded || $status == failed ]]; then
      LEDGER_RAN=$((LEDGER_RAN + 1)) LEDGER_RAN_MS=$((LEDGER_RAN_MS + JOB[$job,ms]))
    fi
    [[ $status != failed ]] || LEDGER_FAILED=$((LEDGER_FAILED + 1))
  fi
  if [[ -n $file && -f $file ]] && { [[ ${JOB[$job,reason]} == "done earlier (--resume)" ]] ||
    [[ -f ${JOB[$job,since]} && $file -nt ${JOB[$job,since]} ]]; }; then
    ledger::_metrics "$file" || log::warn "${JOB[$job,name]}: $file is not a JSON object; its metrics are left out"
    metrics=$LEDGER_METRICS
  fi
  local fields values=("${JOB[$job,name]}" "${JOB[$job,image]}" "${JOB[$job,text]}" "$status" "${JOB[$job,kind]}"
    "${JOB[$job,detail]}" "${JOB[$job,log]}" "${JOB[$job,out]}" "${JOB[$job,reason]}" "${JOB[$job,hash]}" "${JOB[$job,command]}")
  printf -v f '%s' "${values[@]}"
  if [[ $f == *[\\\"[:cntrl:]]* || $f == *[![:ascii:]]* ]]; then # to escape, or to check as UTF-8
    for f in "${!values[@]}"; do ledger::_str "${values[f]}" && values[f]=$LEDGER_STR; done
  else # none: quoted as they are, empty ones null
    values=("${values[@]/#/\"}") && values=("${values[@]/%/\"}") && values=("${values[@]/#\"\"/null}")
  fi
  printf -v fields '"name": %s, "image_encoder": %s, "text_encoder": %s, "status": %s, "failure": %s, "detail": %s, "log": %s, "output_dir": %s, "reason": %s, "config_hash": %s, "command": %s' "${values[@]}"
  [[ -z ${JOB[$job,fails]} ]] || while IFS= read -r f; do
    [[ -z $f ]] || { ledger::_str "$f" && fails+="${fails:+, }$LEDGER_STR"; }
  done <<<"${JOB[$job,fails]}"
  local gpu=${JOB[$job,gpu]:-null} seconds exit=${JOB[$job,exit]}
  [[ $gpu =~ ^[0-9]+$|^null$ ]] || { ledger::_str "$gpu" && gpu=$LEDGER_STR; } # "0,1", "cpu", "MIG-..."
  printf -v seconds '%d.%d' $((JOB[$job,ms] / 1000)) $((JOB[$job,ms] % 1000 / 100))
  local peak=${JOB[$job,peak]:-} gpu_s=null
  ledger::cause "${JOB[$job,kind]}" "$exit"
  ledger::_str "$LEDGER_CAUSE"
  local cause=$LEDGER_STR
  [[ -z ${JOB[$job,gpu_ms]:-} || $gpu == '"cpu"' ]] || printf -v gpu_s '%d.%d' $((JOB[$job,gpu_ms] / 1000)) $((JOB[$job,gpu_ms] % 1000 / 100))
  printf -v 'LEDGER_JSON[job]' '{%s, "gpu": %s, "exit_code": %s, "retries": %d, "seconds": %s, "waited_seconds": %d, "gpu_seconds": %s, "peak_mem_mib": %s, "cause": %s, "failed_attempts": [%s], "params": %s, "metrics": %s}' \
    "$fields" "$gpu" "${exit:-null}" "${JOB[$job,retries]}" "$seconds" "${JOB[$job,waited]}" "$gpu_s" \
    "${peak:-null}" "$cause" "$fails" "${JOB[$job,params]:-"{}"}" "$metrics"
  local shown=${exit:--} metric=""
  [[ -z ${JOB[$job,kind]} ]] || shown="$shown (${JOB[$job,kind]})"
  [[ -z $LEDGER_METRIC_NAME ]] || metric="$LEDGER_METRIC_NAME=$LEDGER_METRIC_VALUE"
  [[ -z ${JOB[$job,detail]} ]] || status="$status (${JOB[$job,detail]})"
  local command=${JOB[$job,command]//[$'\t\n\r']/ }
  local peak_shown=-
  [[ -z $peak ]] || printf -v peak_shown '%d.%dG' $((peak / 1024)) $((peak % 1024 * 10 / 1024))
  printf -v 'LEDGER_ROW[job]' '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "${JOB[$job,name]}" "${JOB[$job,gpu]:--}" \
    "$status" "$shown" "${JOB[$job,retries]}" "$seconds" "${JOB[$job,waited]}" "$peak_shown" "$metric" "${JOB[$job,log]:--}"
  [[ -z $LEDGER_COMMANDS ]] || LEDGER_ROW[job]+=$'\t'${command:0:60}
  [[ $gpu_s != null ]] || gpu_s=""
  local tsv=("${JOB[$job,name]}" "${JOB[$job,gpu]}" "${JOB[$job,status]}" "$exit" "${JOB[$job,kind]}" "${JOB[$job,retries]}"
    "$seconds" "${JOB[$job,waited]}" "$gpu_s" "$peak" "$LEDGER_METRIC_NAME" "$LEDGER_METRIC_VALUE" "${JOB[$job,log]}"
    "${JOB[$job,detail]}" "$LEDGER_CAUSE" "$command")
  tsv=("${tsv[@]//[$'\t\n\r']/ }") # one row a job, whatever a field holds (a LOG_DIR with a newline in its name)
  printf -v 'LEDGER_TSV[job]' '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "${tsv[@]}"
}

# ledger::_metrics FILE — LEDGER_METRICS (compact JSON), LEDGER_METRIC_NAME and LEDGER_METRIC_VALUE (the
# object's "key_metric" entry, else its first number, to 4 decimals) from a trainer's metrics.json; 1 if
# it is no JSON object.
ledger::_metrics() {
  LEDGER_METRICS=null LEDGER_METRIC_NAME="" LEDGER_METRIC_VALUE=""
  local lines=()
  mapfile -t lines < <(jq -c 'def short: if type == "number" then (. * 10000 + 0.5 | floor) / 10000 else . end;
    if type == "object" then ., (
      if (.key_metric | type) == "string" and has(.key_metric) then .key_metric, (.[.key_metric] | short)
      else (to_entries | map(select(.value | type == "number")) | first | if . then .key, (.value | short) else "", "" end)
      end) else error("not an object") end' "$1" 2>/dev/null)
  ((${#lines[@]} == 3)) || return 1
  LEDGER_METRICS=${lines[0]} LEDGER_METRIC_NAME=${lines[1]//\"/} LEDGER_METRIC_VALUE=${lines[2]//\"/}
}

# ledger::_table ROW... — tab-separated rows as a table, each column as wide as its widest cell. Rows
# are split by IFS=\x1f (tabs as IFS would merge around an empty cell), with globbing off.
# shellcheck disable=SC2206  # the unquoted splits are meant: IFS and set -f are set for them
ledger::_table() {
  local - row cells=() widths=() i fmt="" IFS=$'\x1f'
  set -f
  for row in "$@"; do
    cells=(${row//$'\t'/$'\x1f'})
    for i in "${!cells[@]}"; do ((${#cells[i]} <= ${widths[i]:-0})) || widths[i]=${#cells[i]}; done
  done
  for i in "${!widths[@]}"; do fmt+="%-${widths[i]}s  "; done
  fmt="${fmt%"%-${widths[-1]}s  "}%s\n" # the last column is not padded
  for row in "$@"; do
    cells=(${row//$'\t'/$'\x1f'})
    # shellcheck disable=SC2059  # the format is built above from the column widths alone
    printf "$fmt" "${cells[@]}" 2>/dev/null || return 0 # stdout gone (`| head`): the files have it all
  done
}

# ledger::finish — write LOG_DIR/summary_<ts>.json and .tsv and print the table. Every job of the sweep
# is in it: those that never started say so.
ledger::finish() {
  local - base=$LOG_DIR/summary_$LEDGER_TS k=1 json tsv job finished configs
  local -A n=([succeeded]=0 [failed]=0 [skipped]=0 [interrupted]=0)
  LEDGER_FINISHED=1
  for ((job = 0; job < SCHED_N; job++)); do
    [[ -n ${LEDGER_JSON[job]:-} ]] || ledger::record "$job"
    n[${JOB[$job,status]}]=$((${n[${JOB[$job,status]}]:-0} + 1))
  done
  printf -v finished '%(%Y-%m-%dT%H:%M:%S%z)T' -1
  configs=""
  ((${#LEDGER_JSON[@]} == 0)) || printf -v configs '  %s,\n' "${LEDGER_JSON[@]}"
  [[ -d $LOG_DIR ]] || mkdir -p -- "$LOG_DIR" 2>/dev/null || true
  json=$base.json
  set -C # two sweeps of one LOG_DIR ending in the same second: the second gets summary_<time>_2
  while [[ -d $LOG_DIR ]] && ! { : >"$json"; } 2>/dev/null && [[ -e $json ]]; do
    k=$((k + 1)) json=${base}_$k.json
  done
  set +C
  tsv=${json%.json}.tsv
  if ! { printf '{"started": "%s", "finished": "%s", "succeeded": %d, "failed": %d, "skipped": %d, "interrupted": %d,\n "configs": [\n%s\n]}\n' \
    "$LEDGER_STARTED" "$finished" "${n[succeeded]}" "${n[failed]}" "${n[skipped]}" "${n[interrupted]}" \
    "${configs%,$'\n'}" >"$json" && printf '%s\n' "$LEDGER_TSV_HEADER" "${LEDGER_TSV[@]}" >"$tsv"; } 2>/dev/null; then
    ledger::why_not "$json"
    rm -f -- "$json" "$tsv" 2>/dev/null # what was cut short would only mislead
    log::error "cannot write the summary in LOG_DIR $LOG_DIR ($LEDGER_WHY); the table below is all there is"
    json="(not written)"
  fi
  log::status ""
  ledger::_table "$LEDGER_HEADER${LEDGER_COMMANDS:+$'\t'command}" "${LEDGER_ROW[@]}"
  log::info "summary: ${n[succeeded]} succeeded, ${n[failed]} failed, ${n[skipped]} skipped, ${n[interrupted]} interrupted; $json"
}
