# shellcheck shell=bash
# json:: — read a user's JSON file through a validating jq program (grid.jq). Needs log.sh and jq.

# json::run SETTING FILE PROGRAM — print what the jq PROGRAM file outputs for FILE, which must hold
# exactly one JSON document (jq reads it slurped: the program gets [document]; json.jq's `one_document`
# checks that). When jq stops, on bad JSON or on the program's error("<JSON path>: <what is wrong>"), log
# "SETTING: FILE: <reason>" and fail.
json::run() {
  local setting=$1 file=$2 program=$3 out
  if ! out=$(jq -r -s -L "$MGPU_LIB" -f "$program" -- "$file" 2>&1); then
    out=${out#jq: error (at *): }
    [[ $out != *"parse error"* ]] || out="not valid JSON: ${out#*parse error: }"
    log::error "$setting: $file: $out"
    return 1
  fi
  [[ -z $out ]] || printf '%s\n' "$out"
}
