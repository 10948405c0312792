#!/usr/bin/env bash
# How well gpu_queue.sh keeps GPUs busy, against GNU parallel's {%} trick and simple-gpu-scheduler,
# in one run on 4 scenario GPUs. Prints figures; asserts nothing.
#   bash bench/scheduler.sh
# For each tool, with its default settings: 24 sleep jobs of mixed durations (0.5-3 s): the whole
# command's wall time and the makespan (first job start to last job end) against the ideal (a
# zero-overhead scheduler starting the jobs in the given order on the first free GPU) and against the
# lower bound max(longest, total / GPUs); the median delay between a job's end and the next start on its
# GPU; then the overhead per job over 200 `true` jobs (wall time / 200), and over 200 `/bin/true` jobs (a
# program, which mgpu starts without a shell when the line is that plain). mgpu runs twice more with
# --order longest-first: the first of those learns the wall times, the second uses them.
# Targets (issue "Sweep engine v2"): wall <= 1.04 x ideal, makespan <= 1.01 x ideal, <= 5 ms a job.
# Peers: GNU parallel (apt-get install parallel) and simple-gpu-scheduler (pip, installed into
# .bench-venv on first use); a missing peer is reported and left out.
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
DURATIONS=(2.1 0.7 3.0 1.2 0.5 2.6 1.8 0.9 2.9 1.1 0.6 2.2 1.5 0.8 2.7 1.3 0.5 1.9 2.4 1.0 0.7 2.8 1.6 1.4)
export MGPU_FAKE_GPUS=$ROOT/examples/scenarios/4x-rtx4090-idle.json MGPU_LOCK_DIR=$TMP/locks

cat >"$TMP/job.sh" <<'JOB'
#!/usr/bin/env bash
echo "s $CUDA_VISIBLE_DEVICES $EPOCHREALTIME" >>"$1"
sleep "$2"
echo "e $CUDA_VISIBLE_DEVICES $EPOCHREALTIME" >>"$1"
JOB

# jobs REC — the 24 job lines, each recording its start and end with its GPU into REC
jobs() { local d; for d in "${DURATIONS[@]}"; do echo "bash $TMP/job.sh $1 $d"; done; }

# run_tool NAME KIND — run one tool on the sleep jobs (KIND sleep), on 200 `true` jobs (KIND true) or on 200
# `/bin/true` jobs (KIND program)
run_tool() {
  # Every run records into the same file (moved aside after), so its job lines, and their hashes, match.
  local name=$1 kind=$2 rec=$TMP/$2.rec lines=$TMP/$1.$2.txt start
  case $kind in
    sleep) jobs "$rec" >"$lines" ;;
    true) printf 'true\n%.0s' {1..200} >"$lines" ;;       # a shell builtin: every tool starts a shell
    program) printf '/bin/true\n%.0s' {1..200} >"$lines" ;; # a program: a tool may start it without one
  esac
  start=${EPOCHREALTIME//[!0-9]/}
  local order=()
  [[ $name == mgpu ]] || order=(--order longest-first)
  # shellcheck disable=SC2016  # parallel itself expands {%} and the arithmetic, once per job
  case $name in
    mgpu*) bash "$ROOT/gpu_queue.sh" --gpus 0,1,2,3 --log-dir "$TMP/logs-$kind" "${order[@]}" "$lines" >/dev/null 2>&1 ;;
    parallel) parallel -j4 'CUDA_VISIBLE_DEVICES=$(({%}-1)) {=uq=}' :::: "$lines" ;;
    simple-gpu-scheduler) "$SGS" --gpus 0 1 2 3 <"$lines" >/dev/null 2>&1 ;;
  esac
  echo $(((${EPOCHREALTIME//[!0-9]/} - start) / 1000)) >"$TMP/$name.$kind.ms"
  echo "$start ${EPOCHREALTIME//[!0-9]/}" >"$TMP/$name.$kind.span"
  [[ ! -e $rec ]] || mv "$rec" "$TMP/$name.$kind.rec"
}

find_sgs() {
  SGS=$(command -v simple_gpu_scheduler || true)
  [[ -n $SGS ]] && return 0
  local venv=$ROOT/.bench-venv
  [[ -x $venv/bin/simple_gpu_scheduler ]] ||
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q simple_gpu_scheduler; } >/dev/null 2>&1 || return 1
  SGS=$venv/bin/simple_gpu_scheduler
}

tools=(mgpu)
if command -v parallel >/dev/null; then tools+=(parallel); else echo "GNU parallel not found (apt-get install parallel): left out"; fi
if find_sgs; then tools+=(simple-gpu-scheduler); else echo "simple-gpu-scheduler could not be installed: left out"; fi
for tool in "${tools[@]}"; do
  run_tool "$tool" sleep
  run_tool "$tool" true
  run_tool "$tool" program
done
run_tool mgpu-longest-learn sleep
run_tool mgpu-longest-first sleep
tools+=(mgpu-longest-first)

"$PYTHON" - "$TMP" "${DURATIONS[@]}" -- "${tools[@]}" <<'PY'
import heapq, os, statistics, sys
tmp, rest = sys.argv[1], sys.argv[2:]
cut = rest.index("--")
durations, tools = [float(d) for d in rest[:cut]], rest[cut + 1:]
free = [0.0] * 4
for d in durations:  # greedy in the given order on the first free GPU
    heapq.heappush(free, heapq.heappop(free) + d)
ideal, bound = max(free), max(max(durations), sum(durations) / 4)
print(f"24 sleep jobs, {sum(durations):.1f} s of work on 4 GPUs: greedy ideal {ideal:.2f} s, lower bound {bound:.2f} s")
print(f"{'tool':<22}{'wall s':>8}{'x ideal':>9}{'makespan s':>11}{'x ideal':>9}{'x bound':>9}{'reuse ms':>10}"
      f"{'ms/job: true':>13}{'/bin/true':>10}{'start ms':>10}{'end ms':>8}")
for tool in tools:
    ms = int(open(f"{tmp}/{tool}.sleep.ms").read()) / 1000
    events = {}
    for line in open(f"{tmp}/{tool}.sleep.rec"):
        kind, gpu, t = line.split()
        events.setdefault(gpu, []).append((float(t.replace(",", ".")), kind))
    gaps = []
    for evs in events.values():
        evs.sort()
        gaps += [(b[0] - a[0]) * 1000 for a, b in zip(evs, evs[1:]) if a[1] == "e" and b[1] == "s"]
    per_job, per_program = (f"{int(open(f'{tmp}/{tool}.{k}.ms').read()) / 200:.1f}" if os.path.exists(f"{tmp}/{tool}.{k}.ms")
                            else "-" for k in ("true", "program"))
    t0, t1 = (int(x) / 1e6 for x in open(f"{tmp}/{tool}.sleep.span").read().split())
    first = min(t for evs in events.values() for t, k in evs if k == "s")
    last = max(t for evs in events.values() for t, k in evs if k == "e")
    span = last - first
    print(f"{tool:<22}{ms:>8.2f}{ms / ideal:>9.3f}{span:>11.2f}{span / ideal:>9.3f}{span / bound:>9.3f}"
          f"{statistics.median(gaps):>10.1f}{per_job:>13}{per_program:>10}{(first - t0) * 1000:>10.0f}{(t1 - last) * 1000:>8.0f}")
PY
