# shellcheck shell=bash disable=SC2034  # settings and state shared with sched.sh and the entry scripts
# sweep:: — what run_train_clip.sh and gpu_queue.sh share: settings and their flags, the argument
# loop, validation, the GPU check that builds the slots, --dry-run, --resume, --order, and the launch.
# Sourcing it sources the libraries it builds on.

_SWEEP_LIB_DIR=${BASH_SOURCE[0]%/*}
[[ ${BASH_SOURCE[0]} == */* ]] || _SWEEP_LIB_DIR=.
[[ $_SWEEP_LIB_DIR == /* ]] || _SWEEP_LIB_DIR=$PWD/$_SWEEP_LIB_DIR
# shellcheck source=lib/log.sh
source "$_SWEEP_LIB_DIR/log.sh"
# shellcheck source=lib/gpu.sh
source "$_SWEEP_LIB_DIR/gpu.sh"
# shellcheck source=lib/grid.sh
source "$_SWEEP_LIB_DIR/grid.sh"
# shellcheck source=lib/lease.sh
source "$_SWEEP_LIB_DIR/lease.sh"
# shellcheck source=lib/sched.sh
source "$_SWEEP_LIB_DIR/sched.sh"
# shellcheck source=lib/ledger.sh
source "$_SWEEP_LIB_DIR/ledger.sh"
# shellcheck source=lib/slurm.sh
source "$_SWEEP_LIB_DIR/slurm.sh"

# sweep::parse ARGS... — the argument loop of both launchers: --name=value, the shared flags, -h/--help
# (the script's `usage`), and `--` (the rest into SWEEP_REST). Every other word goes to the script's
# `own_arg`, which sets SWEEP_SHIFT to the words it took (0: unknown, an error).
sweep::parse() {
  SWEEP_REST=()
  while (($#)); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"
    sweep::flag "$@"
    if ((!SWEEP_SHIFT)); then
      case $1 in
        -h | --help) usage; exit 0 ;;
        --) shift; SWEEP_REST=("$@"); return 0 ;;
      esac
      own_arg "$@"
      ((SWEEP_SHIFT)) || DIE_STATUS=2 die "unknown option '$1' (see --help)"
    fi
    shift "$SWEEP_SHIFT"
  done
}

# sweep::launch — the GPU check, --resume, --order, then --dry-run's plan or the sweep itself (exits).
# With --backend slurm, Slurm gets the jobs instead (slurm::launch).
sweep::launch() {
  [[ $MGPU_BACKEND != slurm ]] || slurm::launch
  sweep::slots
  sweep::drop_done
  sweep::order
  if [[ $DRY_RUN == true ]]; then
    sweep::dry_run
    exit 0
  fi
  log::info "${#JOB_NAME[@]} job(s), ${#SCHED_SLOTS[@]} slot(s); logs in $LOG_DIR"
  sched::run
  exit "$SCHED_EXIT"
}

# sweep::defaults — the shared settings, each from the environment or its default.
sweep::defaults() {
  MAX_UTIL=${MAX_UTIL:-70} MAX_WAIT=${MAX_WAIT:-300} JOBS_PER_GPU=${JOBS_PER_GPU:-1}
  RETRIES=${RETRIES:-0} GRACE=${GRACE:-10} ON_TIMEOUT=${ON_TIMEOUT:-run} CPU_SLOTS=${CPU_SLOTS:-1}
  DRY_RUN=${DRY_RUN:-false} RESUME=${RESUME:-false} USE_MULTI_CONFIG=${USE_MULTI_CONFIG:-true}
  ORDER=${ORDER:-given}
  slurm::defaults
}

# sweep::flag ARGS... — take one shared flag; SWEEP_SHIFT is the words it used (0: not a shared flag).
sweep::flag() {
  SWEEP_SHIFT=2
  case $1 in
    --resume) RESUME=true SWEEP_SHIFT=1 ;;
    --dry-run) DRY_RUN=true SWEEP_SHIFT=1 ;;
    --gpus | --max-util | --max-wait | --jobs-per-gpu | --log-dir | --retries | --on-timeout | --cpu-slots | \
      --grace | --use-multi-config | --order)
      (($# >= 2)) || DIE_STATUS=2 die "$1 needs a value (see --help)"
      case $1 in
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

# sweep::split_list NAME — an array given as one string ("0,1" from the environment or a flag) split
# at commas and spaces into its items.
sweep::split_list() {
  local -n _items=$1
  local joined="${_items[*]}"
  read -ra _items <<<"${joined//,/ }"
}

# sweep::validate — every shared setting checked once, up front; a bad one exits 2 naming it.
sweep::validate() {
  local DIE_STATUS=2
  log::require_int MAX_UTIL "$MAX_UTIL" 0 100 || exit 2
  log::require_int MAX_WAIT "$MAX_WAIT" 0 || exit 2
  log::require_int JOBS_PER_GPU "$JOBS_PER_GPU" 1 64 || exit 2
  log::require_int "--retries" "$RETRIES" 0 100 || exit 2
  log::require_int "--grace" "$GRACE" 0 3600 || exit 2
  log::require_int "--cpu-slots" "$CPU_SLOTS" 1 1024 || exit 2
  [[ $ON_TIMEOUT =~ ^(run|skip|fail)$ ]] || die "--on-timeout must be run, skip or fail, got '$ON_TIMEOUT'"
  [[ $ORDER =~ ^(given|longest-first)$ ]] || die "--order must be given or longest-first, got '$ORDER'"
  [[ $USE_MULTI_CONFIG =~ ^(true|false)$ ]] || die "USE_MULTI_CONFIG must be true or false, got '$USE_MULTI_CONFIG'"
  [[ -n $LOG_DIR ]] || die "LOG_DIR must not be empty"
  sweep::split_list GPUS
  local gpu
  for gpu in "${GPUS[@]}"; do
    [[ $gpu =~ ^[0-9]+$ ]] || die "GPUS must list GPU indices like 0,1,2,3; got '$gpu' in '${GPUS[*]}'"
  done
  slurm::validate
}

# sweep::_ranges 0 1 2 3 5 — "0-3, 5"
sweep::_ranges() {
  local ranges="" start=$1 prev=$1 n
  shift
  for n in "$@" ""; do
    if [[ -n $n ]] && ((n == prev + 1)); then
      prev=$n
      continue
    fi
    ranges+="${ranges:+, }$start"
    [[ $start == "$prev" ]] || ranges+="-$prev"
    start=$n prev=$n
  done
  echo "$ranges"
}

# sweep::slots — check every GPU in GPUS, skip the missing ones, and fill SCHED_SLOTS (GPU:slot,
# round-robin over GPUs) and SCHED_THREADS. No GPU at all: CPU mode with CPU_SLOTS slots.
sweep::slots() {
  local gpu k have=() kept=() cores _
  gpu::_backend
  SCHED_SLOTS=()
  if [[ $GPU_BACKEND == cpu ]]; then
    log::warn "no GPU found (no nvidia-smi, no MGPU_FAKE_GPUS): CPU mode, $CPU_SLOTS job(s) at a time"
    for ((k = 0; k < CPU_SLOTS; k++)); do SCHED_SLOTS+=("cpu:$k"); done
  else
    gpu::sample || DIE_STATUS=1 die "the GPU query failed (see above); nothing can run"
    while IFS=, read -r gpu _; do [[ -z $gpu ]] || have+=("$gpu"); done <<<"$GPU_LINES" # in index order
    ((${#have[@]})) || DIE_STATUS=1 die "the GPU query found no GPU; nothing can run"
    gpu::_now_ms
    SCHED_SAMPLE_MS=$GPU_NOW_MS # the first launch decisions use this sample
    for gpu in "${GPUS[@]}"; do
      if [[ " ${have[*]} " == *" $gpu "* ]]; then
        [[ " ${kept[*]} " == *" $gpu "* ]] || kept+=("$gpu")
      else
        log::error "GPU $gpu is not available (this machine has GPUs $(sweep::_ranges "${have[@]}")); skipping it"
      fi
    done
    ((${#kept[@]})) || die "none of the GPUs in GPUS (${GPUS[*]}) is available; this machine has GPUs $(sweep::_ranges "${have[@]}")"
    for ((k = 0; k < JOBS_PER_GPU; k++)); do
      for gpu in "${kept[@]}"; do SCHED_SLOTS+=("$gpu:$k"); done
    done
  fi
  [[ $USE_MULTI_CONFIG == true ]] || SCHED_SLOTS=("${SCHED_SLOTS[0]}")
  if [[ -n ${OMP_NUM_THREADS:-} ]]; then
    SCHED_THREADS=$OMP_NUM_THREADS
  else
    cores=$(nproc 2>/dev/null || echo 1)
    SCHED_THREADS=$((cores / ${#SCHED_SLOTS[@]} > 0 ? cores / ${#SCHED_SLOTS[@]} : 1))
  fi
}

# sweep::dry_run — the plan, the GPU check right now, and each exact command; nothing is launched.
sweep::dry_run() {
  local job s gpu seen=()
  printf 'Plan: %d job(s) on %d slot(s) [%s]; MAX_UTIL %s%%, MAX_WAIT %ss, --on-timeout %s, --retries %s\n' \
    "${#SCHED_QUEUE[@]}" "${#SCHED_SLOTS[@]}" "${SCHED_SLOTS[*]}" "$MAX_UTIL" "$MAX_WAIT" "$ON_TIMEOUT" "$RETRIES"
  [[ ${SCHED_SLOTS[0]} == cpu:* ]] || gpu::sample || true
  for s in "${SCHED_SLOTS[@]}"; do
    gpu=${s%%:*}
    [[ $gpu != cpu && " ${seen[*]} " != *" $gpu "* ]] || continue
    seen+=("$gpu")
    if gpu::judge "$gpu"; then echo "GPU $gpu: free now"; else echo "GPU $gpu: busy now ($GPU_REASON): jobs wait for it"; fi
  done
  for s in "${!SCHED_QUEUE[@]}"; do
    job=${SCHED_QUEUE[s]}
    gpu=${SCHED_SLOTS[s % ${#SCHED_SLOTS[@]}]%%:*}
    sched::argv "$job"
    printf '%s -> %s: ' "${JOB_NAME[job]}" "$([[ $gpu == cpu ]] && echo CPU || echo "GPU $gpu")"
    printf '%q ' "CUDA_VISIBLE_DEVICES=${gpu/#cpu/}" CUDA_DEVICE_ORDER=PCI_BUS_ID "MGPU_CONFIG_NAME=${JOB_NAME[job]}" \
      "${SCHED_ARGV[@]}"
    echo
  done
}

# sweep::drop_done — with --resume, jobs an earlier run finished are recorded as skipped, not queued.
sweep::drop_done() {
  local job keep=()
  sched::hash_jobs
  for job in "${SCHED_QUEUE[@]}"; do
    if [[ $RESUME == true ]] && ledger::is_done "$job"; then
      JOB_STATUS[job]=skipped JOB_REASON[job]="done earlier (--resume)"
      ledger::record "$job"
      log::info "skipping ${JOB_NAME[job]}: done earlier with the same configuration (--resume)"
    else
      keep+=("$job")
    fi
  done
  SCHED_QUEUE=("${keep[@]}")
}

# sweep::order — with --order longest-first, queue the jobs that took longest in earlier sweeps (the
# summaries in LOG_DIR, matched by config hash) first; jobs never seen before go first of all.
sweep::order() {
  [[ $ORDER == longest-first ]] || return 0
  local -A took=()
  local hash secs job line keyed=()
  local summaries=("$LOG_DIR"/summary_*.json)
  if [[ -e ${summaries[0]} ]]; then
    while IFS=$'\t' read -r hash secs; do took[$hash]=$secs; done < <(jq -rs '
      [.[].configs[]? | select(.status == "succeeded") | [.config_hash, .seconds]] | .[] | @tsv' "${summaries[@]}")
  fi
  log::info "--order longest-first: ${#took[@]} earlier wall time(s) found in $LOG_DIR"
  for job in "${SCHED_QUEUE[@]}"; do
    keyed+=("${took[${JOB_HASH[job]}]:-1e18}"$'\t'"$job")
  done
  SCHED_QUEUE=()
  while IFS=$'\t' read -r _ job; do SCHED_QUEUE+=("$job"); done < <(printf '%s\n' "${keyed[@]}" | sort -s -t $'\t' -k1,1gr)
}
