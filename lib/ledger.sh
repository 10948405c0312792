# shellcheck shell=bash disable=SC2034  # SCHED_EXIT is read by the entry scripts
# ledger:: — what a sweep did: progress lines, one record per job, completion markers for --resume,
# and the summary (a table on stdout; LOG_DIR/summary_<YYYYmmdd_HHMMSS>.json and .tsv). Needs jq.

LEDGER_STARTED="" LEDGER_STARTED_MS=0 LEDGER_TS=""

ledger::begin() {
  LEDGER_STARTED=$(date -Iseconds) LEDGER_TS=$(date +%Y%m%d_%H%M%S)
  gpu::_now_ms
  LEDGER_STARTED_MS=$GPU_NOW_MS
  : >"$SCHED_STATE/ledger.jsonl"
}

# ledger::event TEXT — one progress line: counts, elapsed, and an ETA from the jobs finished so far.
ledger::event() {
  local done=0 queued=0 ms=0 n=0 job eta="" total=${#JOB_NAME[@]}
  for job in "${!JOB_STATUS[@]}"; do
    case ${JOB_STATUS[job]} in
      queued) queued=$((queued + 1)) ;;
      succeeded | failed) done=$((done + 1)) ms=$((ms + JOB_MS[job])) n=$((n + 1)) ;;
      skipped | interrupted) done=$((done + 1)) ;;
    esac
  done
  gpu::_now_ms
  local elapsed=$(((GPU_NOW_MS - LEDGER_STARTED_MS) / 1000)) left=$((total - done))
  if ((n && left)); then
    eta=", ETA ~$(((ms / n) * left / ${#SCHED_SLOTS[@]} / 1000 + 1))s"
  fi
  log::info "[$done/$total done, ${#PID_JOB[@]} running, $queued queued, ${elapsed}s$eta] $*"
}

# ledger::is_done JOB — did an earlier run finish this exact job (same hash) with exit 0?
ledger::is_done() {
  [[ -f ${JOB_MARKER[$1]} && $(<"${JOB_MARKER[$1]}") == "${JOB_HASH[$1]}" ]]
}

ledger::mark_done() {
  local marker=${JOB_MARKER[$1]}
  mkdir -p "$(dirname "$marker")"
  printf '%s\n' "${JOB_HASH[$1]}" >"$marker.tmp.$$" && mv -f "$marker.tmp.$$" "$marker"
}

# ledger::show_tail JOB — the last lines of a failed job's log, so nobody has to go looking.
ledger::show_tail() {
  local log=${JOB_LOG[$1]}
  [[ -s $log ]] || return 0
  log::error "${JOB_NAME[$1]} failed; the last lines of $log:"
  tail -n "${MGPU_TAIL_LINES:-15}" "$log" | sed 's/^/    | /' >&2
}

# ledger::record JOB — append the job's final record.
ledger::record() {
  local job=$1 metrics=null file=${JOB_OUT[$1]:+${JOB_OUT[$1]}/metrics.json}
  if [[ -n $file && -f $file ]]; then
    metrics=$(jq -c . "$file" 2>/dev/null) || {
      log::warn "${JOB_NAME[job]}: $file is not valid JSON; its metrics are left out"
      metrics=null
    }
  fi
  jq -nc --argjson job "$job" --arg name "${JOB_NAME[job]}" --arg image "${JOB_IMAGE[job]}" \
    --arg text "${JOB_TEXT[job]}" --arg gpu "${JOB_GPU[job]}" --arg status "${JOB_STATUS[job]}" \
    --arg exit "${JOB_EXIT[job]}" --arg kind "${JOB_KIND[job]}" --argjson retries "${JOB_RETRIES[job]}" \
    --argjson ms "${JOB_MS[job]}" --argjson waited "${JOB_WAITED[job]}" --arg log "${JOB_LOG[job]}" \
    --arg out "${JOB_OUT[job]}" --arg reason "${JOB_REASON[job]}" --arg hash "${JOB_HASH[job]}" --arg fails "${JOB_FAILS[job]}" \
    --argjson metrics "$metrics" \
    '{job: $job, name: $name, image_encoder: $image, text_encoder: $text,
      gpu: (if $gpu == "" then null elif $gpu == "cpu" then "cpu" else ($gpu | tonumber) end),
      status: $status, exit_code: (if $exit == "" then null else ($exit | tonumber) end),
      failure: (if $kind == "" then null else $kind end), retries: $retries, seconds: ($ms / 100 | round / 10),
      waited_seconds: $waited, log: (if $log == "" then null else $log end),
      output_dir: (if $out == "" then null else $out end), reason: (if $reason == "" then null else $reason end),
      failed_attempts: ($fails | split("\n") | map(select(. != ""))), config_hash: $hash, metrics: $metrics}' >>"$SCHED_STATE/ledger.jsonl"
}

# ledger::finish — write the summary files, print the table, and set SCHED_EXIT.
ledger::finish() {
  local json=$LOG_DIR/summary_$LEDGER_TS.json tsv=$LOG_DIR/summary_$LEDGER_TS.tsv
  jq -s --arg started "$LEDGER_STARTED" --arg finished "$(date -Iseconds)" '
    sort_by(.job) | map(del(.job)) as $c
    | {started: $started, finished: $finished,
       succeeded: ($c | map(select(.status == "succeeded")) | length),
       failed: ($c | map(select(.status == "failed")) | length),
       skipped: ($c | map(select(.status == "skipped")) | length),
       interrupted: ($c | map(select(.status == "interrupted")) | length),
       configs: $c}' "$SCHED_STATE/ledger.jsonl" >"$json.tmp" && mv "$json.tmp" "$json"
  jq -r '
    def key_metric: if . == null then "" elif (.key_metric | type) == "string" and has(.key_metric)
      then "\(.key_metric)=\(.[.key_metric])" else (to_entries | map(select(.value | type == "number")) | first
      | if . == null then "" else "\(.key)=\(.value)" end) end;
    ["config", "gpu", "status", "exit", "retries", "seconds", "waited", "metric", "log"],
    (.configs[] | [.name, (.gpu // "-"), .status, (if .failure then "\(.exit_code) (\(.failure))" else (.exit_code // "-") end),
      .retries, .seconds, .waited_seconds, (.metrics | key_metric), (.log // "-")] | map(tostring))
    | @tsv' "$json" >"$tsv"
  if command -v column >/dev/null 2>&1; then column -t -s $'\t' "$tsv"; else cat "$tsv"; fi
  local counts
  counts=$(jq -r '"\(.succeeded) succeeded, \(.failed) failed, \(.skipped) skipped, \(.interrupted) interrupted"' "$json")
  log::info "summary: $counts; $json"
  SCHED_EXIT=0
  case $SCHED_STOP in
    INT) SCHED_EXIT=130 ;;
    TERM) SCHED_EXIT=143 ;;
    *) jq -e '.failed + .interrupted + ([.configs[] | select(.status == "skipped" and .reason != "done earlier (--resume)")] | length) == 0' \
      "$json" >/dev/null || SCHED_EXIT=1 ;;
  esac
}
