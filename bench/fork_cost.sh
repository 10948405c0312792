#!/usr/bin/env bash
# What forking each job from the launcher costs, and what forking it from a small process (a spawner)
# would save, in figures that do not move with the machine's load (minor page faults) beside CPU times
# that do. Prints figures; asserts nothing.
#   bash bench/fork_cost.sh [N]        # N forks a case (default 300)
# 1. A parent as big as gpu_queue.sh's launcher (its libraries and 6,000 job-record entries) does the same
#    work between forks in three cases: no fork; a fork whose child ends and is reaped before the work; a
#    fork whose child lives until the work is done (as a job's process does). If the parent's faults come
#    from the fork itself (it write-protects every page of the parent) and not from sharing pages with a
#    living child, the last two cases fault alike.
# 2. A job's process doing what mgpu's does at the least (its folder's flock, the command with its output
#    appended to a log, a completion marker, an end record), forked from a small bash and from a big one:
#    what the children and the parent pay a job in each case.
set -Eeuo pipefail
ROOT=$(readlink -f "${BASH_SOURCE[0]}") ROOT=${ROOT%/bench/*}
N=${1:-300}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "fork_cost.sh: N must be a whole number of forks, got '$N'" >&2 && exit 2; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkfifo "$TMP/fifo"
command -v flock >/dev/null || { echo "fork_cost.sh: needs flock (util-linux)" >&2 && exit 2; }

# Run in a bash of its own: SIZE big (the libraries and 6,000 entries) or small; CASE as above. Prints one
# line from the process's own counters (/proc/self/stat fields from 0: 9 minflt, 10 cminflt, 13-16 CPU).
# shellcheck disable=SC2016  # expanded by the inner bash
inner='
  size=$1 case=$2 n=$3 tmp=$4 root=$5 tick=$6
  if [[ $size == big ]]; then
    for f in "$root"/lib/*.sh; do source "$f" 2>/dev/null || true; done
    declare -A J && for ((i = 0; i < 6000; i++)); do J[$i,x]=$RANDOM$RANDOM; done
  fi
  # the work between forks: 60 records rewritten at random (cases none, gone, alive run the big bash)
  work() { local k s=""; for ((k = 0; k < 60; k++)); do J[$((RANDOM % 6000)),x]=$RANDOM$k; s+=${J[$k,x]}; done; printf -v out "%s" "$s"; }
  job() { trap : INT TERM; flock -n 9 || exit 3; { /bin/true; } </dev/null >>"$tmp/log" 2>&1; rc=$?
    printf "%s\n" x >"$tmp/marker"; printf "%s\t%s\n" "$rc" "$EPOCHREALTIME" >"$tmp/end"; exit "$rc"; }
  exec 3<>"$tmp/fifo" 9>"$tmp/lock"
  read -r -a a </proc/$$/stat
  for ((i = 0; i < n; i++)); do
    case $case in
      none) work ;;
      gone) (exit 0) & p=$!; wait "$p"; work ;;
      alive) { read -r _ <&3; } & p=$!; work; echo >&3; wait "$p" ;;
      job) set -m; job & p=$!; set +m; wait "$p" ;;
    esac
  done
  read -r -a b </proc/$$/stat
  printf "| %s | %s | %d | %d | %d.%02d | %d | %d.%02d |\n" "$case" "$size" $((b[23] * 4096 / 1000000)) \
    $(((b[9] - a[9]) / n)) $(((b[13] + b[14] - a[13] - a[14]) * 1000 / tick / n)) \
    $(((b[13] + b[14] - a[13] - a[14]) * 100000 / tick / n % 100)) $(((b[10] - a[10]) / n)) \
    $(((b[15] + b[16] - a[15] - a[16]) * 1000 / tick / n)) $(((b[15] + b[16] - a[15] - a[16]) * 100000 / tick / n % 100))
'
TICK=$(getconf CLK_TCK)
echo "$N forks a case, TMPDIR on $(stat -f -c %T "$TMP")"
echo "| case | bash | resident MB | parent: faults a fork | parent: CPU ms a fork | children: faults a fork | children: CPU ms a fork |"
echo "|---|---|---|---|---|---|---|"
for c in none gone alive; do bash -c "$inner" _ big "$c" "$N" "$TMP" "$ROOT" "$TICK"; done
for s in small big; do bash -c "$inner" _ "$s" job "$N" "$TMP" "$ROOT" "$TICK"; done
