#!/usr/bin/env bash
# run_train_clip.sh — train many CLIP configurations (image encoder x text encoder, or a JSON config
# file) in parallel across a GPU list: one job per free GPU slot, one log per configuration, a summary.
#   bash run_train_clip.sh                                   # the settings below
#   bash run_train_clip.sh --gpus 0,1 --config-file train_clip_config.json -- --epochs 5
#   bash run_train_clip.sh --dry-run                          # the plan and exact commands only
# Run with --help for every flag. MGPU_DEBUG=1 traces every line.
set -Eeuo pipefail
set +o posix # POSIXLY_CORRECT in the environment starts bash in POSIX mode, which refuses names such as log::info
[[ -z ${MGPU_DEBUG:-} ]] || { PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '; set -x; }

# ---- Settings: edit them here, or override with an environment variable (GPUS="0,1") or a flag -------
[[ -v GPUS ]] || GPUS=(0 1 2 3)                          # GPU list; GPUS=(5) for one GPU
[[ -v IMAGE_ENCODERS ]] || IMAGE_ENCODERS=("starnet_s1" "starnet_s2" "starnet_s3")
[[ -v TEXT_ENCODERS ]] || TEXT_ENCODERS=("clip:ViT-B/32" "bert-base-chinese")
CONFIG_FILE=${CONFIG_FILE:-}                             # a JSON config file instead of the two lists
USE_MULTI_CONFIG=${USE_MULTI_CONFIG:-true}               # false: one config at a time on the first GPU
MAX_UTIL=${MAX_UTIL:-70}                                 # wait while a GPU is busier than this (%)
MAX_WAIT=${MAX_WAIT:-300}                                # ...at most this many seconds
JOBS_PER_GPU=${JOBS_PER_GPU:-}                           # jobs at a time on one GPU (default 1; with --need-mem, 8 at most)
LOG_DIR=${LOG_DIR:-logs/clip_training}
CKPT_DIR=${CKPT_DIR:-checkpoints/clip_models}
# -------------------------------------------------------------------------------------------------------

MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/*}
# shellcheck source=lib/sweep.sh
source "$MGPU_ROOT/lib/sweep.sh" # and, through it, core log gpu grid lease sched ledger slurm

usage() {
  cat <<'USAGE'
Usage: bash run_train_clip.sh [options] [-- trainer arguments for every run]

Configurations (image encoder x text encoder, or a config file):
  --image-encoders A,B        IMAGE_ENCODERS (default: starnet_s1,starnet_s2,starnet_s3)
  --text-encoders A,B         TEXT_ENCODERS (default: clip:ViT-B/32,bert-base-chinese)
  --config-file FILE          CONFIG_FILE: {"image_encoders": [...], "text_encoders": [...], "args": {...}}
                              or {"defaults": {...}, "configs": [{"name"?, "image_encoder", "text_encoder", ...}]}.
                              Any key may hold a list (the configs are the cross product, named by the keys
                              that vary: starnet_s1_clip_ViT-B_32_lr3e-4_bs64) or a range such as
                              {"log_uniform": [1e-5, 1e-3]} (random search: --sample)
  --sample N --seed S         N random points of the config file's grid or ranges, the same for the same seed
                              (default seed 0)
  --train-cmd CMD             the trainer (default: $PYTHON -m mgpu.train_clip); words split at spaces
  --preset demo               starnet_s050 x (clip:tiny, bert:tiny-chinese), the trainer's --preset demo:
                              about a minute a config on a CPU
Every configuration's trainer arguments are checked by the trainer's own parser before anything starts
(a typo, an unknown encoder or a bad value stops --dry-run and the run, naming the config and JSON path).
GPUs:
  --gpus 0,1,2,3              GPUS
  --jobs-per-gpu N            JOBS_PER_GPU (default 1; with --need-mem an upper bound, default 8)
  --gpus-per-job N            GPUS_PER_JOB (default 1): each config gets a set of N GPUs, leased together,
                              the best-connected free set (NVLink, then one PCIe switch, ...); the trainer
                              runs as DDP over them (torchrun --standalone: a rendezvous port of its own).
                              A config file may set gpus_per_job per config
  --need-mem SIZE|auto        NEED_MEM: a GPU takes jobs while its free memory (minus what starting jobs of
                              every launcher have reserved) covers SIZE (12G, 11500M); several jobs share a
                              GPU by memory. auto: each config's peak from earlier summaries + 10% + 256 MiB
                              (a config never measured runs alone). A config file may set need_mem
  --use-multi-config BOOL     USE_MULTI_CONFIG: false runs one config at a time on the first GPU
  --max-util PCT              MAX_UTIL (default 70): wait while a GPU is busier than this
  --max-wait SEC              MAX_WAIT (default 300), then --on-timeout run|skip|fail (default run)
  --cpu-slots N               jobs at a time when the machine has no GPU (default 1)
Runs:
  --retries N                 re-queue a failed job up to N times (out-of-memory and signals included),
                              after a backoff, preferring another GPU
  --on-oom retry-elsewhere|halve-batch|fail
                              ON_OOM (default retry-elsewhere): after CUDA (or the host) ran out of memory,
                              retry on a GPU with room for the job's peak; or rerun with half --batch-size and
                              twice --accum-steps (the same global batch) from the last checkpoint (at least 2
                              halvings); or fail
  --resume                    skip configs an earlier run finished with the same settings
  --order given|longest-first ORDER: longest-first starts the configs that took longest in earlier
                              sweeps (LOG_DIR's summaries) first; configs never seen go first of all
  --grace SEC                 on Ctrl-C/TERM: seconds running jobs get to save a checkpoint and exit before
                              KILL (default 60: one training step plus a checkpoint save of a real model);
                              a second Ctrl-C kills at once
  --log-dir DIR               LOG_DIR (default logs/clip_training)
  --ckpt-dir DIR              CKPT_DIR (default checkpoints/clip_models)
  --dry-run                   print the plan and the exact commands; launch nothing
From another terminal:
  --status [LOG_DIR]          the live table of the newest sweep in LOG_DIR: queued, waiting (for what),
                              running (GPU, elapsed, step/total, loss, ETA from the job's log), done, failed
  --watch [SEC]               with --status: redraw every SEC seconds (default 2) until the sweep ends
  --compare [LOG_DIR]         one table across every summary in LOG_DIR: config, the hyper-parameters that
                              vary, status, seconds, key metric; best first
  --json                      with --status or --compare: JSON on stdout, for scripts
Slurm (docs/scale-out.md):
  --backend local|slurm       MGPU_BACKEND (default local); slurm submits the configs as one job array,
                              one GPU a task, with the same names, logs, output folders and summary
  --wait                      follow the array to its end, then write the summary (exit as a local run)
  --status                    with --backend slurm: the newest Slurm sweep's table (pending/running included)
  --requeue                   preemption-safe: warned before the time limit (--signal=B:USR1@LEAD) or
                              preempted, a task checkpoints, requeues itself and resumes (--resume auto)
  --signal-lead SEC           seconds one step plus a save need (default 60): the warning and the
                              time-limit watch come that long before the end
  --retries N                 on Slurm: a failed task is requeued up to N times
  --gpus-per-job N            on Slurm: --gres=gpu:N, the trainer under torchrun in each task
  --max-parallel N            at most N tasks at once (--array=0-K%N)
  --partition P  --time T  --cpus-per-task N  --mem M  --account A  --qos Q
                              the sbatch settings (default: SBATCH_PARTITION, SBATCH_TIMELIMIT,
                              SBATCH_CPUS_PER_TASK, SBATCH_MEM_PER_NODE, SBATCH_ACCOUNT, SBATCH_QOS)
  --gres G                    each task's resources (default SBATCH_GRES, else gpu:GPUS_PER_JOB)
  --sbatch-arg --OPT=VALUE    any other sbatch option (repeatable)
  -h, --help                  this help
Exit status: 0 all configs succeeded (or were done earlier, with --resume); 1 some failed, were skipped
or could not start; 2 usage error; 130/143/129 interrupted (Ctrl-C / TERM / a closed terminal).
USAGE
}

# own_arg ARGS... — this launcher's own flags (the shared ones are sweep::flag's).
own_arg() {
  SWEEP_SHIFT=0
  case $1 in
    --image-encoders | --text-encoders | --config-file | --train-cmd | --ckpt-dir | --preset | --sample | --seed)
      core::need_value "$1" $# "${2:-}" || return 2
      case $1 in
        --sample) SAMPLE=$2 ;;
        --seed) SAMPLE_SEED=$2 ;;
        --image-encoders) IMAGE_ENCODERS=("$2") ENCODERS_GIVEN+=image ;;
        --text-encoders) TEXT_ENCODERS=("$2") ENCODERS_GIVEN+=text ;;
        --preset) PRESET=$2 ;;
        --config-file) CONFIG_FILE=$2 ;;
        --train-cmd) TRAIN_CMD=$2 ;;
        --ckpt-dir) CKPT_DIR=$2 ;;
      esac
      SWEEP_SHIFT=2
      ;;
    -*) ;;
    *) log::error "unexpected argument '$1' (trainer arguments go after --)" && return 2 ;;
  esac
}

# trainer — the trainer's argv into TRAINER: --train-cmd, else mgpu's CLIP trainer in the project's
# .venv (or $PYTHON, or python3).
trainer() {
  if [[ -n $TRAIN_CMD ]]; then
    read -ra TRAINER <<<"$TRAIN_CMD"
    ((${#TRAINER[@]})) || DIE_STATUS=2 die "--train-cmd must not be empty"
  else
    core::py_env
    TRAINER=("${CORE_PY[@]}" -m mgpu.train_clip)
  fi
  TRAINER_TAIL=()
  # --preset demo: small towers on the embedded data, about a minute a config on a CPU (--encoders win)
  case $PRESET in
    "") ;;
    demo)
      [[ $ENCODERS_GIVEN == *image* ]] || IMAGE_ENCODERS=(starnet_s050)
      [[ $ENCODERS_GIVEN == *text* ]] || TEXT_ENCODERS=(clip:tiny bert:tiny-chinese)
      TRAINER_TAIL=(--preset demo)
      PRESET_ARGS=(--preset demo)
      ;;
    *) DIE_STATUS=2 die "--preset $PRESET: allowed: demo" ;;
  esac
}

# configs — CFG_* from the config file or the two lists (lib/grid.sh), with --sample; the trainer's own
# parser checks every configuration's arguments when the trainer is mgpu's.
configs() {
  local opts=()
  [[ -z $SAMPLE ]] || opts+=(--sample "$SAMPLE" --seed "${SAMPLE_SEED:-0}")
  [[ -z $SAMPLE_SEED || -n $SAMPLE ]] || DIE_STATUS=2 die "--seed chooses the random points of --sample N; give --sample too"
  [[ -n $TRAIN_CMD ]] || opts+=(--check-trainer)
  opts+=(-- "${SWEEP_REST[@]}" "${PRESET_ARGS[@]}")
  if [[ -n $CONFIG_FILE ]]; then
    grid::from_file "$CONFIG_FILE" "${opts[@]}" || exit 2
  else
    [[ -z $SAMPLE ]] || DIE_STATUS=2 die "--sample draws from a config file's lists and ranges: give --config-file"
    grid::from_lists "${opts[@]}" || exit 2
  fi
}

# check_rest — arguments after -- reach every run, so they must not set what the launcher sets per config.
check_rest() {
  local arg
  for arg in "${SWEEP_REST[@]}"; do
    case ${arg%%=*} in
      --output-dir | --output_dir | --image-encoder | --image_encoder | --text-encoder | --text_encoder)
        DIE_STATUS=2 die "trainer argument '$arg' after --: the launcher sets ${arg%%=*} for each configuration (use --ckpt-dir, --image-encoders/--text-encoders or a config file)"
        ;;
    esac
  done
}

main() {
  TRAIN_CMD=${TRAIN_CMD:-} PRESET="" ENCODERS_GIVEN="" SAMPLE="" SAMPLE_SEED="" PRESET_ARGS=()
  sweep::parse "$@"
  if [[ -n $SWEEP_HELP ]]; then usage && exit 0; fi
  sweep::defaults
  sweep::validate
  sweep::split_list IMAGE_ENCODERS
  sweep::split_list TEXT_ENCODERS
  [[ -n $CKPT_DIR ]] || DIE_STATUS=2 die "CKPT_DIR must not be empty"
  check_rest
  trainer
  if [[ -n $SWEEP_REPORT ]]; then # --status / --compare read what sweeps wrote
    sweep::report
    exit
  fi
  configs
  [[ $DRY_RUN == true ]] || core::make_dirs "LOG_DIR=$LOG_DIR" "CKPT_DIR=$CKPT_DIR" || exit 2
  sched::init
  local i flags out n trainer
  for i in "${!CFG_NAME[@]}"; do
    flags=() n=$GPUS_PER_JOB trainer=("${TRAINER[@]}")
    [[ -z ${CFG_FLAGS[i]} ]] || mapfile -t flags <<<"${CFG_FLAGS[i]}"
    [[ ! ${CFG_LAUNCH[i]} =~ gpus_per_job=([0-9]+) ]] || n=${BASH_REMATCH[1]}
    # DDP over the job's GPUs; --standalone: a rendezvous port of its own (on Slurm, slurm.sh runs it per task)
    if ((n > 1)) && [[ -z $TRAIN_CMD && $MGPU_BACKEND == local ]]; then
      trainer=("${CORE_PY[@]}" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$n" -m mgpu.train_clip)
    fi
    out=$CKPT_DIR/${CFG_NAME[i]}
    sched::add "${CFG_NAME[i]}" "${CFG_IMAGE[i]}" "${CFG_TEXT[i]}" "$out" "$out/.mgpu_done" -- \
      "${trainer[@]}" "${TRAINER_TAIL[@]}" --image-encoder "${CFG_IMAGE[i]}" --text-encoder "${CFG_TEXT[i]}" \
      --output-dir "$out" "${flags[@]}" "${SWEEP_REST[@]}"
    sched::set "$SCHED_NEW" "params=${CFG_PARAMS[i]}"
    sweep::resources "$SCHED_NEW" "${CFG_LAUNCH[i]}" || exit 2
  done
  [[ $DRY_RUN == true ]] || log::info "outputs in $CKPT_DIR"
  sweep::launch
}

main "$@"
