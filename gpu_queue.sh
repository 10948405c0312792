#!/usr/bin/env bash
# gpu_queue.sh — run any list of shell commands across GPUs with the engine of run_train_clip.sh: one
# job per free GPU slot (CUDA_VISIBLE_DEVICES set for it), leases shared with every other mgpu launcher,
# waits for busy GPUs, retries, one log per job, a summary, and clean Ctrl-C.
#   bash gpu_queue.sh --gpus 0,1 jobs.txt        # one command a line; blank lines and # comments skipped
#   generate_jobs | bash gpu_queue.sh -          # commands from standard input
set -Eeuo pipefail
set +o posix # POSIXLY_CORRECT in the environment starts bash in POSIX mode, which refuses names such as log::info
[[ -z ${MGPU_DEBUG:-} ]] || { PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '; set -x; }

[[ -v GPUS ]] || GPUS=(0 1 2 3)
LOG_DIR=${LOG_DIR:-logs/gpu_queue}

MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/*}
# shellcheck source=lib/sweep.sh
source "$MGPU_ROOT/lib/sweep.sh" # and, through it, core log gpu grid lease sched ledger slurm

usage() {
  cat <<'USAGE'
Usage: bash gpu_queue.sh [options] JOBS_FILE|-

Runs each line of JOBS_FILE (or standard input for -) as a shell command (bash -c), with
CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER=PCI_BUS_ID, MGPU_GPU and MGPU_CONFIG_NAME (job<line>) set.
  --gpus 0,1,2,3  --jobs-per-gpu N  --max-util PCT  --max-wait SEC  --on-timeout run|skip|fail
  --gpus-per-job N (CUDA_VISIBLE_DEVICES lists the job's set)  --need-mem SIZE|auto  --on-oom POLICY
  --cpu-slots N  --retries N  --resume  --order given|longest-first  --grace SEC
  --log-dir DIR (default logs/gpu_queue)  --dry-run
  --status [LOG_DIR] [--watch [SEC]] [--json]  --compare [LOG_DIR] [--json]
  --backend local|slurm  --wait  --requeue  --signal-lead SEC
  --max-parallel N  --partition P  --time T  --cpus-per-task N  --mem M  --account A  --qos Q  --gres G
  --sbatch-arg --OPT=VALUE  (a requeued job gets MGPU_RESTART, its requeue count: it resumes itself)
The options mean what they mean for run_train_clip.sh (see its --help).
Exit status: 0 all jobs succeeded; 1 some failed or were skipped; 2 usage error; 130/143/129 interrupted.
USAGE
}

# own_arg ARGS... — the jobs file (or - for standard input); anything else starting with - is unknown.
own_arg() {
  SWEEP_SHIFT=0
  [[ $1 == - || $1 != -* ]] || return 0
  [[ -z $source ]] || { log::error "one jobs file only, got '$source' and '$1'"; return 2; }
  source=$1 SWEEP_SHIFT=1
}

# markers — each job's completion marker (and, beside it, its lock) is named by its command, not its line:
# LOG_DIR/.mgpu_done/<sha256 of its argv>-<K> for the K-th line with that command. Lines added, removed or
# moved leave every other job's marker as it was (--resume runs only what is new), and two jobs files
# sharing a LOG_DIR meet only in the commands they share. A marker named by line (job<N>), as earlier
# versions wrote them, counts too when it holds the same hash.
markers() {
  local job hash k
  local -A seen=()
  sched::hash_jobs
  for ((job = 0; job < SCHED_N; job++)); do
    hash=${JOB[$job,hash]}
    k=$((${seen[$hash]:-0} + 1)) && seen[$hash]=$k
    sched::set "$job" "marker=$LOG_DIR/.mgpu_done/$hash-$k" "marker_old=$LOG_DIR/.mgpu_done/${JOB[$job,name]}"
  done
}

# too_long LINE N — refuse a command longer than Linux passes as one argument (bash -c LINE; MAX_ARG_STRLEN,
# 32 pages: 131071 bytes with 4 KiB pages), before anything runs: its job could only fail with "Argument
# list too long".
too_long() {
  local LC_ALL=C max # bytes, not characters
  max=$(($(getconf PAGESIZE 2>/dev/null || echo 4096) * 32 - 1))
  ((${#1} > max)) || return 0
  DIE_STATUS=2 die "jobs file '$source' line $2: its command is ${#1} bytes, and Linux passes at most $max bytes as one argument (bash -c LINE): put it in a script and run that"
}

main() {
  local source="" line n=0 input crlf=0
  sweep::parse "$@"
  if [[ -n $SWEEP_HELP ]]; then usage && exit 0; fi
  ((${#SWEEP_REST[@]} == 0)) || DIE_STATUS=2 die "gpu_queue.sh takes no arguments after --"
  sweep::defaults
  sweep::validate
  if [[ -n $SWEEP_REPORT ]]; then # --status / --compare read what sweeps wrote
    sweep::report
    exit
  fi
  [[ -n $source ]] || DIE_STATUS=2 die "name a jobs file, or - for standard input (see --help)"
  [[ $source == - || -r $source ]] || DIE_STATUS=2 die "jobs file '$source': no such readable file"
  [[ $source != - || -e /dev/stdin ]] || DIE_STATUS=2 die "jobs file '-' (standard input): standard input is closed; give the jobs through a pipe or < FILE, or name a jobs file"
  [[ $source == - || ! -d $source ]] || DIE_STATUS=2 die "jobs file '$source' is a folder: name a file of commands, one a line"
  [[ $DRY_RUN == true ]] || core::make_dirs "LOG_DIR=$LOG_DIR" || exit 2
  sched::init
  input=$source
  [[ $source != - ]] || input=/dev/stdin
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    ((n > 1)) || line=${line#$'\xef\xbb\xbf'} # a byte-order mark (Windows Notepad) is no part of a command
    [[ $line != *$'\r' ]] || { line=${line%$'\r'} && crlf=1; }
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    ((${#line} < 32768)) || too_long "$line" "$n" # (characters: a line this short is short enough in bytes too)
    if [[ $line == -* ]]; then # bash would take it for its own option; other lines keep their argv (--resume)
      sched::add "job$n" "" "" "" "" -- bash -c -- "$line"
    else
      sched::add "job$n" "" "" "" "" -- bash -c "$line"
    fi
    sched::set "$SCHED_NEW" "command=$line"
    sweep::resources "$SCHED_NEW" || exit 2
  done <"$input"
  LEDGER_COMMANDS=1
  SWEEP_NAMES_ARE_LINES=1 # --need-mem auto learns a job's peak by its command only
  markers
  ((!crlf)) || log::warn "jobs file '$source' has Windows line ends (CRLF): its lines are read without their carriage returns"
  ((SCHED_N)) || DIE_STATUS=2 die "no commands in '$source' (blank lines and # comments are skipped)"
  sweep::launch
}

main "$@"
