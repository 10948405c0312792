# shellcheck shell=bash disable=SC2034  # settings and state shared with sched.sh and the entry scripts
# sweep:: — what the launchers share (run_train_clip.sh, gpu_queue.sh, infer_parallel.sh): settings and
# their flags, the argument loop, validation, the GPU check that builds the slots, --dry-run, --resume,
# --order, and the hand-off to a backend: this machine (sched.sh) or Slurm (slurm.sh). Sourcing it
# sources the libraries it builds on. Every function returns a status (2: a usage error, logged).

# shellcheck source=lib/core.sh
[[ -n ${MGPU_LIB:-} ]] || source "${BASH_SOURCE[0]%/*}/core.sh"
# shellcheck source=lib/gpu.sh
source "$MGPU_LIB/gpu.sh"
# shellcheck source=lib/grid.sh
source "$MGPU_LIB/grid.sh"
# shellcheck source=lib/sched.sh
source "$MGPU_LIB/sched.sh" # and through it lease.sh and ledger.sh
# shellcheck source=lib/slurm.sh
source "$MGPU_LIB/slurm.sh"
# shellcheck source=lib/sweep_plan.sh
source "$MGPU_LIB/sweep_plan.sh"

# sweep::parse ARGS... — the argument loop of the launchers: --name=value, the shared flags, -h/--help
# (SWEEP_HELP=1: the script prints its usage), and `--` (the rest into SWEEP_REST). Every other word
# goes to the script's `own_arg`, which sets SWEEP_SHIFT to the words it took (0: unknown, an error).
sweep::parse() {
  SWEEP_REST=() SWEEP_HELP=""
  while (($#)); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"
    sweep::flag "$@" || return
    if ((!SWEEP_SHIFT)); then
      case $1 in
        -h | --help) SWEEP_HELP=1 && return 0 ;;
        --) shift && SWEEP_REST=("$@") && return 0 ;;
      esac
      own_arg "$@" || return
      ((SWEEP_SHIFT)) || { log::error "unknown option '$1' (see --help)"; return 2; }
    fi
    shift "$SWEEP_SHIFT"
  done
}

# sweep::flag ARGS... — take one shared flag; SWEEP_SHIFT is the words it used (0: not a shared flag).
sweep::flag() {
  SWEEP_SHIFT=2
  case $1 in
    --resume) RESUME=true SWEEP_SHIFT=1 ;;
    --dry-run) DRY_RUN=true SWEEP_SHIFT=1 ;;
    --json) SWEEP_JSON=true SWEEP_SHIFT=1 ;;
    --status | --compare | --watch) # each takes an optional value: LOG_DIR, or the seconds between redraws
      SWEEP_SHIFT=1
      [[ $1 == --watch ]] && SWEEP_WATCH=2 || SWEEP_REPORT=${1#--}
      [[ $1 != --status ]] || SB_STATUS=true # a Slurm sweep's status, with --backend slurm
      if (($# >= 2)) && [[ $2 != -* ]]; then
        [[ $1 == --watch ]] && SWEEP_WATCH=$2 || LOG_DIR=$2
        SWEEP_SHIFT=2
      fi
      ;;
    --gpus | --max-util | --max-wait | --jobs-per-gpu | --log-dir | --retries | --on-timeout | --cpu-slots | \
      --grace | --use-multi-config | --order | --gpus-per-job | --need-mem | --on-oom)
      core::need_value "$1" $# "${2:-}" || return 2
      case $1 in
        --gpus-per-job) GPUS_PER_JOB=$2 ;;
        --need-mem) NEED_MEM=$2 ;;
        --on-oom) ON_OOM=$2 ;;
        --gpus) GPUS=("$2") ;;
        --max-util) MAX_UTIL=$2 ;;
        --max-wait) MAX_WAIT=$2 ;;
        --jobs-per-gpu) JOBS_PER_GPU=$2 ;;
        --log-dir) LOG_DIR=$2 ;;
        --retries) RETRIES=$2 ;;
        --on-timeout) ON_TIMEOUT=$2 ;;
        --cpu-slots) CPU_SLOTS=$2 ;;
        --grace) GRACE=$2 ;;
        --use-multi-config) USE_MULTI_CONFIG=$2 ;;
        --order) ORDER=$2 ;;
      esac
      ;;
    *) slurm::flag "$@" ;;
  esac
}

# sweep::defaults — the shared settings (core.sh) and the Slurm ones, from the environment or defaults.
# When jobs share GPUs by memory (--need-mem, or a config's need_mem), JOBS_PER_GPU, unless given, is an
# upper bound of 8 (sweep::slots).
sweep::defaults() {
  SWEEP_JPG_GIVEN=${JOBS_PER_GPU:+1}
  core::defaults
  GPUS_PER_JOB=${GPUS_PER_JOB:-1} NEED_MEM=${NEED_MEM:-} ON_OOM=${ON_OOM:-retry-elsewhere}
  slurm::defaults
}

# sweep::mib SIZE — a memory size (12G, 12GiB, 11500M, 11500 = MiB; auto) as MiB into SWEEP_MIB; 2 when
# it is none of those.
sweep::mib() {
  local size=${1^^}
  SWEEP_MIB=""
  [[ $size != AUTO ]] || { SWEEP_MIB=auto && return 0; }
  [[ $size =~ ^([0-9]+)(\.[0-9]+)?(K|M|G|T)?(I?B)?$ ]] || return 2
  local whole=${BASH_REMATCH[1]} frac=${BASH_REMATCH[2]#.} unit=${BASH_REMATCH[3]:-M} scale
  case $unit in K) scale=1 ;; M) scale=1024 ;; G) scale=1048576 ;; T) scale=1073741824 ;; esac
  frac=${frac:0:3}
  SWEEP_MIB=$(((10#$whole * 1000 + 10#${frac:-0} * 10 ** (3 - ${#frac})) * scale / 1024 / 1000))
}

# sweep::report — --status (the live table of the newest local sweep in LOG_DIR; --watch redraws it) or
# --compare (one table across LOG_DIR's summaries), through python -m mgpu.status; --json for scripts.
# A Slurm sweep's status is slurm.sh's. Returns the exit status.
sweep::report() {
  local opts=()
  if [[ $SWEEP_REPORT == status && $MGPU_BACKEND == slurm ]]; then
    slurm::launch
    return
  fi
  [[ $SWEEP_REPORT != compare ]] || opts+=(--compare)
  [[ -z $SWEEP_WATCH ]] || opts+=(--watch "$SWEEP_WATCH")
  [[ $SWEEP_JSON != true ]] || opts+=(--json)
  core::py_env
  "${CORE_PY[@]}" -m mgpu.status "$LOG_DIR" "${opts[@]}"
}
SWEEP_REPORT="" SWEEP_WATCH="" SWEEP_JSON=false

# sweep::split_list NAME [WHAT] — an array given as one string ("0,1" from the environment or a flag)
# split at commas, spaces, tabs and newlines into its items.
sweep::split_list() {
  local -n _items=$1
  local joined="${_items[*]}"
  joined=${joined//[$'\n\t\r,']/ }
  read -ra _items <<<"$joined"
}

# sweep::validate — every shared setting checked once, up front; 2 (logged) names a bad one.
sweep::validate() {
  core::check_env || return 2
  log::require_int MAX_UTIL "$MAX_UTIL" 0 100 || return 2
  log::require_int MAX_WAIT "$MAX_WAIT" 0 || return 2
  log::require_int JOBS_PER_GPU "$JOBS_PER_GPU" 1 64 || return 2
  log::require_int "--retries" "$RETRIES" 0 100 || return 2
  log::require_int "--grace" "$GRACE" 0 3600 || return 2
  log::require_int "--cpu-slots" "$CPU_SLOTS" 1 1024 || return 2
  local problem=""
  [[ $ON_TIMEOUT =~ ^(run|skip|fail)$ ]] || problem="--on-timeout must be run, skip or fail, got '$ON_TIMEOUT'"
  [[ $ORDER =~ ^(given|longest-first)$ ]] || problem="--order must be given or longest-first, got '$ORDER'"
  [[ $USE_MULTI_CONFIG =~ ^(true|false)$ ]] || problem="USE_MULTI_CONFIG must be true or false, got '$USE_MULTI_CONFIG'"
  [[ -n $LOG_DIR ]] || problem="LOG_DIR must not be empty"
  [[ -z $SWEEP_WATCH || $SWEEP_WATCH =~ ^[0-9]+(\.[0-9]+)?$ ]] || problem="--watch takes the seconds between redraws, like 2 or 0.5, got '$SWEEP_WATCH'"
  [[ -z $SWEEP_WATCH || -n $SWEEP_REPORT ]] || problem="--watch redraws --status: give --status too"
  [[ -z $problem ]] || { log::error "$problem"; return 2; }
  log::require_int "--gpus-per-job" "$GPUS_PER_JOB" 1 64 || return 2
  [[ $ON_OOM =~ ^(retry-elsewhere|halve-batch|fail)$ ]] || { log::error "--on-oom must be retry-elsewhere, halve-batch or fail, got '$ON_OOM'"; return 2; }
  if [[ -n $NEED_MEM ]] && ! sweep::mib "$NEED_MEM"; then
    log::error "--need-mem must be a size like 12G, 11500M or 11500 (MiB), or auto, got '$NEED_MEM'"
    return 2
  fi
  local given="${GPUS[*]}" gpu
  sweep::split_list GPUS
  ((${#GPUS[@]})) || { log::error "GPUS is empty ('$given'): list GPU indices like 0,1,2,3"; return 2; }
  for gpu in "${GPUS[@]}"; do
    [[ $gpu =~ ^[0-9]+$|^(GPU|MIG)-[0-9A-Za-z-]+$ ]] || {
      log::error "GPUS must list GPUs like 0,1,2,3 (indices, GPU- or MIG- UUIDs); got '$gpu' in '${GPUS[*]}'"
      return 2
    }
  done
  slurm::validate
}

# sweep::_ranges 0 1 2 3 5 — "0-3, 5" into SWEEP_RANGES
sweep::_ranges() {
  local start=$1 prev=$1 n
  SWEEP_RANGES=""
  shift
  for n in "$@" ""; do
    if [[ -n $n ]] && ((n == prev + 1)); then
      prev=$n
      continue
    fi
    SWEEP_RANGES+="${SWEEP_RANGES:+, }$start"
    [[ $start == "$prev" ]] || SWEEP_RANGES+="-$prev"
    start=$n prev=$n
  done
}

# sweep::slots — check every GPU in GPUS (an index, a GPU- UUID or its unique start, a MIG- UUID: each a
# device for jobs), skip the missing ones, and fill SCHED_SLOTS ("<device>:<slot>", JOBS_PER_GPU a device,
# round-robin over devices), SCHED_GPUS, the topology (for jobs of several GPUs) and SCHED_THREADS. No GPU
# at all: CPU mode, CPU_SLOTS slots.
sweep::slots() {
  local gpu k kept=() cores rc
  gpu::_backend || return 2
  SCHED_SLOTS=() SCHED_GPUS=()
  [[ -z $SWEEP_SHARED || -n ${SWEEP_JPG_GIVEN:-} ]] || JOBS_PER_GPU=8
  if [[ $GPU_BACKEND == cpu ]]; then
    log::warn "no GPU found (no nvidia-smi, no MGPU_FAKE_GPUS): CPU mode, $CPU_SLOTS job(s) at a time"
    for ((k = 0; k < CPU_SLOTS; k++)); do SCHED_SLOTS+=("cpu:$k"); done
  else
    if ((GPUS_PER_JOB > 1 || SWEEP_MAX_GPUS > 1)) || [[ " ${GPUS[*]}" == *" "[GM][PI]* ]]; then
      gpu::machine || log::warn "the GPUs' topology and MIG instances cannot be read (python -m mgpu.scenario --machine failed): sets of GPUs are chosen without it"
    fi
    gpu::sample || { log::error "the GPU query failed (see above); nothing can run"; return 1; }
    core::now_ms
    SCHED_SAMPLE_MS=$CORE_NOW_MS # the first launch decisions use this sample
    local have=() index _
    while IFS=, read -r index _; do [[ -z $index ]] || have+=("$index"); done <<<"$GPU_LINES" # in index order
    ((${#have[@]})) || { log::error "the GPU query found no GPU; nothing can run"; return 1; }
    sweep::_ranges "${have[@]}"
    for gpu in "${GPUS[@]}"; do
      rc=0
      gpu::resolve "$gpu" || rc=$?
      if ((rc == 0)); then
        [[ " ${kept[*]} " == *" $GPU_ID "* ]] || kept+=("$GPU_ID")
      elif ((rc == 2)); then
        log::error "GPU $gpu: that UUID start matches several GPUs; give more of it"
        return 2
      else
        log::error "GPU $gpu is not available (this machine has GPUs $SWEEP_RANGES); skipping it"
      fi
    done
    ((${#kept[@]})) || { log::error "none of the GPUs in GPUS (${GPUS[*]}) is available; this machine has GPUs $SWEEP_RANGES"; return 2; }
    ((${#kept[@]} >= SWEEP_MAX_GPUS)) || {
      log::error "a job needs $SWEEP_MAX_GPUS GPUs (--gpus-per-job or a config's gpus_per_job), but GPUS gives ${#kept[@]} (${kept[*]})"
      return 2
    }
    for ((k = 0; k < JOBS_PER_GPU; k++)); do
      for gpu in "${kept[@]}"; do SCHED_SLOTS+=("$gpu:$k"); done
    done
    SCHED_GPUS=("${kept[@]}")
    place::links
  fi
  [[ $USE_MULTI_CONFIG == true ]] || SCHED_SLOTS=("${SCHED_SLOTS[0]}")
  if [[ -n ${OMP_NUM_THREADS:-} ]]; then
    SCHED_THREADS=$OMP_NUM_THREADS
  else
    cores=$(nproc 2>/dev/null || echo 1)
    SCHED_THREADS=$((cores / ${#SCHED_SLOTS[@]} > 0 ? cores / ${#SCHED_SLOTS[@]} : 1))
  fi
}
SWEEP_MAX_GPUS=1 SWEEP_SHARED="" # the most GPUs a job needs; does any job share GPUs by memory (sweep::resources)

# sweep::resources JOB [LAUNCH] — the job's GPUs and memory need: its config's "gpus_per_job=N
# need_mem=S" words (LAUNCH), else --gpus-per-job and --need-mem; 2 (logged) for a bad value.
sweep::resources() {
  local job=$1 word gpus=$GPUS_PER_JOB need=$NEED_MEM
  SWEEP_MIB=""
  for word in ${2:-}; do
    case $word in
      gpus_per_job=*) gpus=${word#*=} ;;
      need_mem=*) need=${word#*=} ;;
    esac
  done
  log::require_int "${JOB[$job,name]}: gpus_per_job" "$gpus" 1 64 || return 2
  if [[ -n $need ]] && ! sweep::mib "$need"; then
    log::error "${JOB[$job,name]}: need_mem must be a size like 12G, 11500M or 11500 (MiB), or auto, got '$need'"
    return 2
  fi
  sched::set "$job" "gpus=$gpus" "need=${SWEEP_MIB:-0}"
  [[ ${SWEEP_MIB:-0} == 0 ]] || SWEEP_SHARED=1
  ((gpus <= SWEEP_MAX_GPUS)) || SWEEP_MAX_GPUS=$gpus
}

# sweep::fd_room CPU_FLAG — the launcher keeps two files open for each slot, its lease and its tie's read
# end (bash numbers them from 10 up, below the open-file limit), and a few more for a moment; descriptors it was given from 10 up (open
# when it started) count against the same room. Under an open-file limit (ulimit -n) too low for that
# every job would fail as "could not start": it is said before anything runs, with what to do (CPU_FLAG:
# the entry script's option for the slots of CPU mode, such as --cpu-slots). 2 then. (13 + open + 2 a
# slot, 17 + 2 a slot from a plain shell, is the least that ran 16 jobs in every mode tried; 2 more are
# kept spare.)
sweep::fd_room() {
  local limit hard need fd open=0 fds=("/proc/$BASHPID/fd/"*) fewer="--gpus, --jobs-per-gpu" advice
  for fd in "${fds[@]##*/}"; do [[ $fd != [0-9]* ]] || ((fd < 10)) || open=$((open + 1)); done
  need=$((15 + open + 2 * ${#SCHED_SLOTS[@]}))
  limit=$(ulimit -Sn)
  [[ $limit != unlimited ]] && ((limit < need)) || return 0
  [[ $GPU_BACKEND != cpu ]] || fewer=$1
  hard=$(ulimit -Hn)
  if [[ $hard == unlimited ]] || ((hard >= need)); then
    advice="raise it (ulimit -n $need) or run fewer slots ($fewer)"
  else
    advice="its hard limit is $hard: run fewer slots ($fewer), or ask for a higher limit"
  fi
  log::error "the open-file limit (ulimit -n) is $limit, and ${#SCHED_SLOTS[@]} job slot(s) need $need open files (two a slot, $((need - 2 * ${#SCHED_SLOTS[@]})) for the launcher): $advice"
  return 2
}

# sweep::launch — --resume, --order, then the backend: Slurm, --dry-run's plan, or the sweep on this
# machine. Returns the exit status for the entry script (0 all done, 1 some not, 2 usage, 130/143).
sweep::launch() {
  sweep::drop_done
  sweep::order
  if [[ $MGPU_BACKEND == slurm ]]; then
    slurm::launch
    return
  fi
  sweep::slots || return
  sweep::fd_room --cpu-slots || return
  sweep::learn_needs
  if [[ $DRY_RUN == true ]]; then
    sweep::dry_run
    return 0
  fi
  log::info "${#SCHED_QUEUE[@]} job(s), ${#SCHED_SLOTS[@]} slot(s); logs in $LOG_DIR"
  sched::run
  return "$SCHED_EXIT"
}
