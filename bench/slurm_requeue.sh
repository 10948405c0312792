#!/usr/bin/env bash
# bench/slurm_requeue.sh — how long a preempted Slurm task is away: from `scancel --signal=USR1 --batch`
# to its job's stop, its requeue, and its requeued run's start, on the one-node test cluster
# (tests/slurm/cluster.sh: AuthInfo cred_expire=10, Slurm holds a requeued job that long, 120 s by
# default on a real cluster; a scheduler pass every 2 s, 30-60 s by default). The job is the fake trainer (it saves 0.3 s after SIGTERM). Prints the
# figures of each round and their medians; asserts nothing.
#   bash bench/slurm_requeue.sh [ROUNDS (3)]
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${1:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bench-requeue.XXXXXX")
SLURM_CONF=$(bash "$ROOT/tests/slurm/cluster.sh" start "$work/cluster" 1)
export SLURM_CONF
trap 'bash "$ROOT/tests/slurm/cluster.sh" stop "$work/cluster"; rm -rf "$work"' EXIT

# until SECONDS COMMAND... — retry every 0.05 s; fail loudly after SECONDS
until_ok() {
  local limit=$(($1 * 20)) i
  shift
  for ((i = 0; i < limit; i++)); do "$@" 2>/dev/null && return 0; sleep 0.05; done
  echo "[ERROR] timed out: $*" >&2
  exit 1
}
second_run() { [[ $(sed -n 5p "$1") == 1 ]]; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

rows=()
for ((r = 1; r <= ROUNDS; r++)); do
  dir=$work/round$r
  mkdir -p "$dir"
  cd "$dir"
  export FAKE_TRAIN_RECORD=$dir/record.tsv FAKE_TRAIN_SLEEP=600 FAKE_TRAIN_ON_TERM=save
  bash "$ROOT/run_train_clip.sh" --backend slurm --requeue --train-cmd "$ROOT/tests/fakes/fake-trainer" \
    --image-encoders s1 --text-encoders t1 >/dev/null 2>&1
  sweep=$(echo logs/clip_training/slurm_*)
  job=$(<"$sweep/job_id")
  until_ok 60 grep -q start "$FAKE_TRAIN_RECORD"
  t0=${EPOCHREALTIME/./}
  scancel --signal=USR1 --batch "${job}_0"
  until_ok 60 test -s "$sweep/task0.requeues"
  until_ok 120 second_run "$sweep/task0.started"
  term=$(awk -F'\t' '$2 == "term" { print $4; exit }' "$FAKE_TRAIN_RECORD")
  requeued=$(cut -f5 "$sweep/task0.requeues")
  started=$(sed -n 4p "$sweep/task0.started")
  scancel "$job"
  rows+=("$(awk -v t0="$t0" -v term="$term" -v rq="$requeued" -v st="$started" \
    'BEGIN { printf "%.2f %.2f %.2f", term - t0 / 1e6, rq / 1e3 - t0 / 1e6, st / 1e3 - t0 / 1e6 }')")
  read -r a b c <<<"${rows[-1]}"
  printf 'round %d: trainer got SIGTERM %s s, task requeued %s s, requeued run started %s s after the signal\n' "$r" "$a" "$b" "$c"
done
for k in 1 2 3; do
  med[k]=$(printf '%s\n' "${rows[@]}" | cut -d' ' -f"$k" | median)
done
printf 'median of %d: SIGTERM %s s, requeued %s s, running again %s s (of which cred_expire=10 s is Slurm holding the job)\n' \
  "$ROUNDS" "${med[1]}" "${med[2]}" "${med[3]}"
