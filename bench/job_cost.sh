#!/usr/bin/env bash
# Where a job's CPU goes, in figures that do not depend on the machine's load: the minor page faults and
# CPU times /proc/PID/stat keeps for gpu_queue.sh's launcher and for its children (the jobs' processes),
# read just before the launcher exits, over N jobs on 4 scenario GPUs.
#   bash bench/job_cost.sh [N]        # default 200; TMPDIR picks the file system (tmpfs: TMPDIR=/dev/shm)
set -Eeuo pipefail
ROOT=$(readlink -f "${BASH_SOURCE[0]}") ROOT=${ROOT%/bench/*}
N=${1:-200}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "job_cost.sh: N must be a whole number of jobs, got '$N'" >&2 && exit 2; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export MGPU_FAKE_GPUS=$ROOT/examples/scenarios/4x-rtx4090-idle.json MGPU_LOCK_DIR=$TMP/locks TMPDIR=$TMP
TICK=$(getconf CLK_TCK)

# measure ID LINE — run N copies of LINE (files named by ID); print one table row
measure() {
  local id=$1 line=$2 kind="\`$2\`" pid start end last=() stat=() i
  for ((i = 0; i < N; i++)); do printf '%s\n' "$line"; done >"$TMP/$id.txt"
  start=$EPOCHREALTIME
  bash "$ROOT/gpu_queue.sh" --gpus 0,1,2,3 --log-dir "$TMP/logs-$id" "$TMP/$id.txt" >/dev/null 2>&1 &
  pid=$!
  # (split at spaces: the launcher's name, bash, holds none). Its last counts: from its zombie, which keeps
  # them until the wait below, else from the last look
  while read -r -a stat 2>/dev/null <"/proc/$pid/stat"; do
    last=("${stat[@]}")
    [[ ${stat[2]} != Z ]] || break
    sleep 0.01
  done
  wait "$pid" || { echo "job_cost.sh: gpu_queue.sh failed on the $kind jobs (exit $?)" >&2 && return 1; }
  end=$EPOCHREALTIME
  # fields (from 0): 9 minflt, 10 cminflt, 13 utime, 14 stime, 15 cutime, 16 cstime, in clock ticks
  awk -v k="$kind" -v n="$N" -v t="$TICK" -v w="$(((${end/./} - ${start/./}) / 1000))" \
    -v mf="${last[9]}" -v cmf="${last[10]}" -v u="${last[13]}" -v s="${last[14]}" -v cu="${last[15]}" -v cs="${last[16]}" \
    'BEGIN { printf "| %s | %.1f | %d | %.1f (%.1f + %.1f) | %d | %.1f |\n", k, w / n, mf / n, (u + s) * 1000 / t / n,
      u * 1000 / t / n, s * 1000 / t / n, cmf / n, (cu + cs) * 1000 / t / n }'
}

echo "$N jobs, 4 scenario GPUs, TMPDIR on $(stat -f -c %T "$TMP")"
echo "| jobs | wall ms a job (start-up included) | launcher: faults a job | launcher: CPU ms a job (user + system) | children: faults a job | children: CPU ms a job |"
echo "|---|---|---|---|---|---|"
measure builtin true    # bash -c true
measure program /bin/true # run without a bash in between

# A fork alone, by a bash as big as the launcher (its libraries and 6,000 job-record entries), 400 times:
# what its parent pays for the fork itself, against the launcher's faults a job above.
bash -c '
  for f in "$1"/lib/*.sh; do source "$f" 2>/dev/null; done
  declare -A J && for ((i = 0; i < 6000; i++)); do J[$i,x]=$RANDOM$RANDOM; done
  read -r -a a </proc/$$/stat
  for ((i = 0; i < 400; i++)); do { sleep 0.001; } & wait $!; done
  read -r -a b </proc/$$/stat
  printf "a fork alone (a bash of %d MB resident, 400 forks): %d faults and %.2f ms of CPU in the parent a fork\n" \
    $((b[23] * $(getconf PAGESIZE) / 1000000)) $(((b[9] - a[9]) / 400)) "$(((b[13] + b[14] - a[13] - a[14]) * 1000000 / $2 / 400))e-3"
' _ "$ROOT" "$TICK"
