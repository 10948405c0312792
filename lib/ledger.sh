# shellcheck shell=bash disable=SC2034  # SCHED_EXIT is read by the entry scripts
# ledger:: — what a sweep did: each job's log file and failure kind, progress lines, one record per job,
# completion markers for --resume, and the summary (a table on stdout; LOG_DIR/summary_<ts>.json and
# .tsv). Needs log.sh, gpu.sh (the clock) and jq. Shared by the local engine and the Slurm tasks.

LEDGER_STARTED="" LEDGER_STARTED_MS=0 LEDGER_TS="" LEDGER_FINISHED=""
LEDGER_HEADER=$'config\tgpu\tstatus\texit\tretries\tseconds\twaited\tmetric\tlog' # the summary's columns (table and .tsv)

ledger::begin() {
  printf -v LEDGER_STARTED '%(%Y-%m-%dT%H:%M:%S%z)T' -1
  printf -v LEDGER_TS '%(%Y%m%d_%H%M%S)T' -1
  gpu::_now_ms
  LEDGER_STARTED_MS=$GPU_NOW_MS
}

# ledger::event TEXT — one progress line: counts, elapsed, and an ETA from the jobs finished so far.
ledger::event() {
  local total=${#JOB_NAME[@]} eta="" ended=$((LEDGER_DONE + ${#SCHED_ENDED[@]}))
  local left=$((total - ended)) queued=$((total - ended - ${#PID_JOB[@]}))
  gpu::_now_ms
  if ((LEDGER_RAN && left)); then
    eta=", ETA ~$(((LEDGER_RAN_MS / LEDGER_RAN) * left / ${#SCHED_SLOTS[@]} / 1000 + 1))s"
  fi
  local counts="$ended/$total done, ${#PID_JOB[@]} running, $queued queued, $(((GPU_NOW_MS - LEDGER_STARTED_MS) / 1000))s$eta"
  log::info "[$counts] $*"
  log::status "mgpu: $counts (failed so far: $LEDGER_FAILED)"
}
LEDGER_DONE=0 LEDGER_RAN=0 LEDGER_RAN_MS=0 LEDGER_FAILED=0

# ledger::is_done JOB — did an earlier run finish this exact job (same hash) with exit 0?
ledger::is_done() {
  [[ -f ${JOB_MARKER[$1]} && $(<"${JOB_MARKER[$1]}") == "${JOB_HASH[$1]}" ]]
}

# A marker cut short by a crash holds no whole hash, so it only makes --resume run the job again.
ledger::mark_done() {
  local marker=${JOB_MARKER[$1]}
  [[ -d ${marker%/*} ]] || mkdir -p "${marker%/*}"
  printf '%s\n' "${JOB_HASH[$1]}" >"$marker"
}

# ledger::log_path NAME GPU — LEDGER_LOG: a new log file LOG_DIR/<name>_gpu<id>_<YYYYmmdd_HHMMSS>.log, never reused.
ledger::log_path() {
  local base n=1 path ts made=0
  printf -v ts '%(%Y%m%d_%H%M%S)T' -1
  base=$LOG_DIR/$1_gpu$2_$ts
  path=$base.log
  set -C # noclobber: creating the file fails if it exists, so no two jobs ever share a log
  until ((made)); do
    if { : >"$path"; } 2>/dev/null; then
      made=1
    elif [[ -e $path || -L $path ]]; then
      n=$((n + 1)) path=${base}_$n.log
    else
      set +C
      die "cannot create the log file $path (LOG_DIR $LOG_DIR: removed, or not writable?)"
    fi
  done
  set +C
  LEDGER_LOG=$path
}

# ledger::failure_kind LOG STATUS — why a job failed: oom (CUDA out of memory in its log), signal, or error.
ledger::failure_kind() {
  if grep -q -E 'CUDA out of memory|OutOfMemoryError' "$1" 2>/dev/null; then
    echo oom
  elif (($2 > 128)); then
    echo "signal $(kill -l $(($2 - 128)) 2>/dev/null || echo $(($2 - 128)))"
  else
    echo error
  fi
}

# ledger::show_tail JOB — the last lines of a failed job's log, so nobody has to go looking.
ledger::show_tail() {
  local log=${JOB_LOG[$1]}
  [[ -s $log ]] || return 0
  log::error "${JOB_NAME[$1]} failed; the last lines of $log:"
  tail -n "${MGPU_TAIL_LINES:-15}" "$log" | sed 's/^/    | /' >&2
}

# ledger::_str TEXT — TEXT as a JSON string (or null when empty) into LEDGER_STR, without a fork.
ledger::_str() {
  local s=$1
  [[ -n $s ]] || { LEDGER_STR=null; return 0; }
  s=${s//\\/\\\\} s=${s//\"/\\\"} s=${s//$'\n'/\\n} s=${s//$'\t'/\\t} s=${s//$'\r'/\\r}
  LEDGER_STR="\"${s//[$'\001'-$'\037']/?}\""
}

# ledger::record JOB — the job's final record, one JSON line built here (jq runs only to read a
# metrics.json the job wrote), kept by job index for the summary.
ledger::record() {
  local job=$1 metrics=null metric="" file=${JOB_OUT[$1]:+${JOB_OUT[$1]}/metrics.json} out=() key fails="" f
  LEDGER_DONE=$((LEDGER_DONE + 1))
  if [[ ${JOB_STATUS[job]} == succeeded || ${JOB_STATUS[job]} == failed ]]; then
    LEDGER_RAN=$((LEDGER_RAN + 1)) LEDGER_RAN_MS=$((LEDGER_RAN_MS + JOB_MS[job]))
  fi
  [[ ${JOB_STATUS[job]} != failed ]] || LEDGER_FAILED=$((LEDGER_FAILED + 1))
  if [[ -n $file && -f $file ]]; then
    ledger::_metrics "$file" || log::warn "${JOB_NAME[job]}: $file is not a JSON object; its metrics are left out"
    metrics=$LEDGER_METRICS metric=$LEDGER_METRIC
  fi
  for key in name:JOB_NAME image_encoder:JOB_IMAGE text_encoder:JOB_TEXT status:JOB_STATUS failure:JOB_KIND \
    log:JOB_LOG output_dir:JOB_OUT reason:JOB_REASON config_hash:JOB_HASH; do
    local -n _field=${key#*:}
    ledger::_str "${_field[job]}"
    out+=("\"${key%%:*}\": $LEDGER_STR")
  done
  while IFS= read -r f; do
    [[ -z $f ]] || { ledger::_str "$f" && fails+="${fails:+, }$LEDGER_STR"; }
  done <<<"${JOB_FAILS[job]}"
  local gpu=${JOB_GPU[job]:-null} fields seconds
  [[ $gpu != cpu ]] || gpu='"cpu"'
  printf -v fields '%s, ' "${out[@]}"
  printf -v seconds '%d.%d' $((JOB_MS[job] / 1000)) $((JOB_MS[job] % 1000 / 100))
  printf -v 'LEDGER_JSON[job]' '{%s, "gpu": %s, "exit_code": %s, "retries": %d, "seconds": %s, "waited_seconds": %d, "failed_attempts": [%s], "metrics": %s}' \
    "${fields%, }" "$gpu" "${JOB_EXIT[job]:-null}" "${JOB_RETRIES[job]}" "$seconds" "${JOB_WAITED[job]}" "$fails" "$metrics"
  local exit=${JOB_EXIT[job]:--}
  [[ -z ${JOB_KIND[job]} ]] || exit="$exit (${JOB_KIND[job]})"
  printf -v 'LEDGER_ROW[job]' '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "${JOB_NAME[job]}" "${JOB_GPU[job]:--}" \
    "${JOB_STATUS[job]}" "$exit" "${JOB_RETRIES[job]}" "$seconds" "${JOB_WAITED[job]}" "$metric" "${JOB_LOG[job]:--}"
}
declare -a LEDGER_JSON=() LEDGER_ROW=()

# ledger::_metrics FILE — LEDGER_METRICS (compact JSON) and LEDGER_METRIC ("name=value": the object's
# "key_metric" entry, else its first number, to 4 decimals) from a trainer's metrics.json; 1 if it is no JSON object.
ledger::_metrics() {
  LEDGER_METRICS=null LEDGER_METRIC=""
  local lines=()
  mapfile -t lines < <(jq -c 'def short: if type == "number" then (. * 10000 + 0.5 | floor) / 10000 else . end;
    if type == "object" then ., (
      if (.key_metric | type) == "string" and has(.key_metric) then "\(.key_metric)=\(.[.key_metric] | short)"
      else (to_entries | map(select(.value | type == "number")) | first | if . then "\(.key)=\(.value | short)" else "" end)
      end) else error("not an object") end' "$1" 2>/dev/null)
  ((${#lines[@]} == 2)) || return 1
  LEDGER_METRICS=${lines[0]} LEDGER_METRIC=${lines[1]//\"/}
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
    printf "$fmt" "${cells[@]}"
  done
}

# ledger::finish — write LOG_DIR/summary_<ts>.json and .tsv, print the table, and set SCHED_EXIT.
ledger::finish() {
  local json=$LOG_DIR/summary_$LEDGER_TS.json tsv=$LOG_DIR/summary_$LEDGER_TS.tsv job finished configs
  local -A n=([succeeded]=0 [failed]=0 [skipped]=0 [interrupted]=0)
  local bad=0
  LEDGER_FINISHED=1
  for job in "${!JOB_NAME[@]}"; do
    [[ -n ${LEDGER_JSON[job]:-} ]] || continue
    n[${JOB_STATUS[job]}]=$((n[${JOB_STATUS[job]}] + 1))
    [[ ${JOB_STATUS[job]} == succeeded || ${JOB_REASON[job]} == "done earlier (--resume)" ]] || bad=1
  done
  printf -v finished '%(%Y-%m-%dT%H:%M:%S%z)T' -1
  configs=""
  ((${#LEDGER_JSON[@]} == 0)) || printf -v configs '  %s,\n' "${LEDGER_JSON[@]}"
  printf '{"started": "%s", "finished": "%s", "succeeded": %d, "failed": %d, "skipped": %d, "interrupted": %d,\n "configs": [\n%s\n]}\n' \
    "$LEDGER_STARTED" "$finished" "${n[succeeded]}" "${n[failed]}" "${n[skipped]}" "${n[interrupted]}" \
    "${configs%,$'\n'}" >"$json"
  printf '%s\n' "$LEDGER_HEADER" "${LEDGER_ROW[@]}" >"$tsv"
  log::status ""
  ledger::_table "$LEDGER_HEADER" "${LEDGER_ROW[@]}"
  log::info "summary: ${n[succeeded]} succeeded, ${n[failed]} failed, ${n[skipped]} skipped, ${n[interrupted]} interrupted; $json"
  case $SCHED_STOP in
    INT) SCHED_EXIT=130 ;;
    TERM) SCHED_EXIT=143 ;;
    *) SCHED_EXIT=$bad ;;
  esac
}
