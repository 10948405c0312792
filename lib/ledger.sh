# shellcheck shell=bash disable=SC2034  # SCHED_EXIT is read by the entry scripts
# ledger:: — what a sweep did: progress lines, one record per job, completion markers for --resume,
# and the summary (a table on stdout; LOG_DIR/summary_<YYYYmmdd_HHMMSS>.json and .tsv). Needs jq.

LEDGER_STARTED="" LEDGER_STARTED_MS=0 LEDGER_TS=""

ledger::begin() {
  printf -v LEDGER_STARTED '%(%Y-%m-%dT%H:%M:%S%z)T' -1
  printf -v LEDGER_TS '%(%Y%m%d_%H%M%S)T' -1
  gpu::_now_ms
  LEDGER_STARTED_MS=$GPU_NOW_MS
  : >"$SCHED_STATE/ledger.jsonl"
}

# ledger::event TEXT — one progress line: counts, elapsed, and an ETA from the jobs finished so far.
ledger::event() {
  local total=${#JOB_NAME[@]} eta=""
  local left=$((total - LEDGER_DONE)) queued=$((total - LEDGER_DONE - ${#PID_JOB[@]}))
  gpu::_now_ms
  if ((LEDGER_RAN && left)); then
    eta=", ETA ~$(((LEDGER_RAN_MS / LEDGER_RAN) * left / ${#SCHED_SLOTS[@]} / 1000 + 1))s"
  fi
  local counts="$LEDGER_DONE/$total done, ${#PID_JOB[@]} running, $queued queued, $(((GPU_NOW_MS - LEDGER_STARTED_MS) / 1000))s$eta"
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

# ledger::record JOB — append the job's final record as one JSON line (built here: no jq per job,
# except to check a metrics.json the job wrote).
ledger::record() {
  local job=$1 metrics=null file=${JOB_OUT[$1]:+${JOB_OUT[$1]}/metrics.json} out=() key fails="" f
  LEDGER_DONE=$((LEDGER_DONE + 1))
  if [[ ${JOB_STATUS[job]} == succeeded || ${JOB_STATUS[job]} == failed ]]; then
    LEDGER_RAN=$((LEDGER_RAN + 1)) LEDGER_RAN_MS=$((LEDGER_RAN_MS + JOB_MS[job]))
  fi
  [[ ${JOB_STATUS[job]} != failed ]] || LEDGER_FAILED=$((LEDGER_FAILED + 1))
  if [[ -n $file && -f $file ]]; then
    metrics=$(jq -c . "$file" 2>/dev/null) || {
      log::warn "${JOB_NAME[job]}: $file is not valid JSON; its metrics are left out"
      metrics=null
    }
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
  local gpu=${JOB_GPU[job]:-null} fields
  printf -v fields '%s, ' "${out[@]}"
  [[ $gpu != cpu ]] || gpu='"cpu"'
  printf '{"job": %d, %s, "gpu": %s, "exit_code": %s, "retries": %d, "seconds": %d.%d, "waited_seconds": %d, "failed_attempts": [%s], "metrics": %s}\n' \
    "$job" "${fields%, }" "$gpu" "${JOB_EXIT[job]:-null}" "${JOB_RETRIES[job]}" \
    $((JOB_MS[job] / 1000)) $((JOB_MS[job] % 1000 / 100)) "${JOB_WAITED[job]}" "$fails" "$metrics" \
    >>"$SCHED_STATE/ledger.jsonl"
}

# ledger::finish — write the summary files, print the table, and set SCHED_EXIT (one jq call).
ledger::finish() {
  local json=$LOG_DIR/summary_$LEDGER_TS.json tsv=$LOG_DIR/summary_$LEDGER_TS.tsv counts bad summary rows
  {
    read -r counts
    read -r bad
    read -r summary
    mapfile -t rows
  } < <(jq -r -s --arg started "$LEDGER_STARTED" --arg finished "$(printf '%(%Y-%m-%dT%H:%M:%S%z)T' -1)" '
    def count($s): map(select(.status == $s)) | length;
    def key_metric: if . == null then "" elif (.key_metric | type) == "string" and has(.key_metric)
      then "\(.key_metric)=\(.[.key_metric])" else (to_entries | map(select(.value | type == "number")) | first
      | if . == null then "" else "\(.key)=\(.value)" end) end;
    sort_by(.job) | map(del(.job)) as $c
    | {started: $started, finished: $finished, succeeded: ($c | count("succeeded")), failed: ($c | count("failed")),
       skipped: ($c | count("skipped")), interrupted: ($c | count("interrupted")), configs: $c} as $s
    | "\($s.succeeded) succeeded, \($s.failed) failed, \($s.skipped) skipped, \($s.interrupted) interrupted",
      ($s.failed + $s.interrupted + ($c | map(select(.status == "skipped" and .reason != "done earlier (--resume)")) | length)),
      ($s | tojson),
      (["config", "gpu", "status", "exit", "retries", "seconds", "waited", "metric", "log"] | @tsv),
      ($c[] | [.name, (.gpu // "-"), .status, (if .failure then "\(.exit_code) (\(.failure))" else (.exit_code // "-") end),
        .retries, .seconds, .waited_seconds, (.metrics | key_metric), (.log // "-")] | map(tostring) | @tsv)
    ' "$SCHED_STATE/ledger.jsonl")
  log::status ""
  printf '%s\n' "$summary" >"$json"
  printf '%s\n' "${rows[@]}" >"$tsv"
  if command -v column >/dev/null 2>&1; then column -t -s $'\t' "$tsv"; else cat "$tsv"; fi
  log::info "summary: $counts; $json"
  case $SCHED_STOP in
    INT) SCHED_EXIT=130 ;;
    TERM) SCHED_EXIT=143 ;;
    *) SCHED_EXIT=$((bad ? 1 : 0)) ;;
  esac
}
