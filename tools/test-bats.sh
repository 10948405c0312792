#!/usr/bin/env bash
# Runs the bats suite as two bats processes side by side (`make test-bats`): most of its time is spent
# waiting (on a one-node Slurm cluster, on launchers and their jobs), so the tests that wait on Slurm and
# on the sweep engine run beside the ones that start PyTorch. Each test file runs whole in one of them, its
# tests in order; every file not named below joins the second group, so a new file is never left out.
# Each group's TAP output is printed as it ends, then one line: "bats: P passed, F failed".
#   bash tools/test-bats.sh [FILE.bats ...]     (files: run just those, as one group)
# PYTHON: the Python with torch, passed on to the tests.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WAITING=(slurm.bats sweep.bats sweep_edges.bats sweep_failures.bats sweep_gpus.bats sweep_report.bats)

groups=()
if (($#)); then
  groups=("$*")
else
  first="" second="" file=""
  for file in tests/bats/*.bats; do
    if [[ " ${WAITING[*]} " == *" ${file##*/} "* ]]; then first+=" $file"; else second+=" $file"; fi
  done
  groups=("${first# }" "${second# }")
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bats.XXXXXX")
declare -A running=() # pid -> group number; each group leads its own process group
# On Ctrl-C or an error: stop the groups still running, with everything they started.
# shellcheck disable=SC2317  # called from the EXIT trap
stop() {
  local pid
  for pid in "${!running[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  [[ -z $ticker ]] || kill "$ticker" 2>/dev/null || true
}
ticker=""
trap 'stop; rm -rf "$out"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

set -m # job control for the forks below: each leads a process group, which stop() ends as one
for i in "${!groups[@]}"; do
  # shellcheck disable=SC2086  # the group's files, split at the spaces (test file names hold none)
  bats --formatter tap --print-output-on-failure ${groups[i]} >"$out/$i.tap" 2>&1 </dev/null &
  running[$!]=$i
done
set +m
echo "== bats: ${#groups[@]} group(s) side by side: ${groups[*]//tests\/bats\//}"

# progress: a line a minute while the groups run ("bats: 57 of 169 tests done, 0 failed")
total=0
# shellcheck disable=SC2048  # each group is a list of files, split at the spaces
for file in ${groups[*]}; do total=$((total + $(grep -c '^@test' "$file"))); done
progress() {
  local n=0 bad=0 f
  for f in "$out"/*.tap; do
    [[ -e $f ]] || continue
    n=$((n + $(grep -c '^\(not \)\?ok ' "$f" || true))) bad=$((bad + $(grep -c '^not ok ' "$f" || true)))
  done
  echo "bats: $n of $total tests done, $bad failed"
}
sleep 60 &
ticker=$!

status=0 passed=0 failed=0
while ((${#running[@]})); do
  pid="" rc=0
  wait -n -p pid || rc=$?
  [[ -n $pid ]] || continue
  if [[ $pid == "$ticker" ]]; then
    progress
    sleep 60 &
    ticker=$!
    continue
  fi
  i=${running[$pid]}
  unset "running[$pid]"
  ((rc == 0)) || status=1
  echo "== bats group $((i + 1)) (${groups[i]//tests\/bats\//}): exit $rc"
  cat "$out/$i.tap"
  passed=$((passed + $(grep -c '^ok ' "$out/$i.tap" || true)))
  failed=$((failed + $(grep -c '^not ok ' "$out/$i.tap" || true)))
done
echo "bats: $passed passed, $failed failed"
exit "$status"
