#!/usr/bin/env bash
# infer_parallel.sh — data-parallel inference: one full model per GPU, the data cut into one
# contiguous shard per GPU, the results merged back in dataset order. Runs on the sweep engine, so GPU
# leases, busy-GPU waits, retries, logs, --resume and Ctrl-C work as in run_train_clip.sh.
#   bash infer_parallel.sh --checkpoint checkpoints/clip_models/X/model.pt --out results/X
#   GPUS="0 1" bash infer_parallel.sh --checkpoint C --out D --data test.csv --batch-size 512
#   bash infer_parallel.sh --checkpoint C --out D --resume      # redo only the shards that did not finish
set -Eeuo pipefail
set +o posix # POSIXLY_CORRECT in the environment starts bash in POSIX mode, which refuses names such as log::info
[[ -z ${MGPU_DEBUG:-} ]] || { PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '; set -x; }

[[ -v GPUS ]] || GPUS=(0 1 2 3)
MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/*}
# shellcheck source=lib/sweep.sh
source "$MGPU_ROOT/lib/sweep.sh" # and, through it, core log gpu grid lease sched ledger slurm

usage() {
  cat <<'USAGE'
Usage: bash infer_parallel.sh --checkpoint PATH --out DIR [options]

Encodes a dataset with a checkpoint of mgpu.train_clip, one process per GPU (python -m mgpu.infer
--shard I/N), each loading the whole model on its own GPU, then merges: DIR/image_embeddings.npy,
DIR/text_embeddings.npy (float32, one row per data row, in order), DIR/valid.npy and DIR/rows.csv
(which rows' images could be read, to join back to the data), DIR/metrics.json (retrieval R@1/5/10
over the valid rows, per-shard throughput). A row whose image cannot be read is never given another
image's result: its image embedding is NaN and it is left out of the metrics.
  --checkpoint PATH     checkpoint_<step>.pt or model.pt (required)
  --out DIR             results folder (required); shards in DIR/shards, logs in DIR/logs
  --data D              default: the validation split the checkpoint was trained on; 'synthetic'; a
                        .csv/.tsv/.jsonl file or .tar shards (every row)
  --batch-size N        per process (default 256)
  --workers N           DataLoader workers per process (default: auto, the usable cores / processes, at most 8)
  --amp off|bf16        bf16 autocast (default off)
  --max-bad-images F    the merge fails when more than this fraction of the rows has an unreadable image
                        (default 0.01); rows.csv names them. To accept them, run again with --resume and
                        a higher value: only the merge runs again
  --gpus 0,1,2,3        GPUS; a GPU without room for the model (see the plan) is skipped
  --cpu-procs N         processes when the machine has no GPU (default 1)
  --max-util PCT  --max-wait SEC  --on-timeout run|skip|fail  --retries N  --grace SEC
                        as for run_train_clip.sh: busy GPUs are waited for, then the policy applies
  --resume              keep the shards an earlier run finished; run the rest
  --dry-run             the memory plan, the shards and each exact command; nothing runs
Exit status: 0 merged; 1 a shard failed (its log is shown; --resume redoes only it); 2 bad input (too
many unreadable images included).
USAGE
}

own_arg() {
  SWEEP_SHIFT=0
  case $1 in
    --checkpoint | --out | --data | --batch-size | --cpu-procs | --workers | --amp | --max-bad-images)
      core::need_value "$1" $# "${2:-}" || return 2
      case $1 in
        --checkpoint) CHECKPOINT=$2 ;;
        --out) OUT=$2 ;;
        --data) DATA=$2 ;;
        --batch-size) BATCH=$2 ;;
        --cpu-procs) CPU_SLOTS=$2 ;;
        --workers) WORKERS=$2 ;;
        --amp) AMP=$2 ;;
        --max-bad-images) MAX_BAD=$2 ;;
      esac
      SWEEP_SHIFT=2
      ;;
    *) ;;
  esac
}

# plan — MiB one process needs (mgpu.infer --plan), then drop from GPUS each GPU with less free memory.
plan() {
  local line parts=() gpu kept=() free
  line=$("${PY[@]}" --checkpoint "$CHECKPOINT" --plan --batch-size "$BATCH") || exit 2
  read -ra parts <<<"$line"
  local -A need=()
  local part
  for part in "${parts[@]}"; do need[${part%%=*}]=${part#*=}; done
  log::info "memory plan: each process needs about ${need[total]} MiB (weights ${need[weights]}, activations" \
    "${need[activations]} at batch $BATCH, CUDA context ${need[context]})"
  gpu::_backend || exit 2
  [[ $GPU_BACKEND != cpu ]] || return 0
  gpu::sample || DIE_STATUS=1 die "the GPU query failed (see above)"
  for gpu in "${GPUS[@]}"; do
    [[ -n ${GPU_MEM_TOTAL[$gpu]:-} ]] || { kept+=("$gpu"); continue; } # sweep::slots reports missing GPUs
    free=$((GPU_MEM_TOTAL[$gpu] - GPU_MEM_USED[$gpu]))
    if ((free < need[total])); then
      log::error "GPU $gpu: ${free} MiB free of ${GPU_MEM_TOTAL[$gpu]}, the model needs ${need[total]} MiB; skipping it"
    else
      kept+=("$gpu")
    fi
  done
  ((${#kept[@]})) || DIE_STATUS=1 die "no GPU in GPUS (${GPUS[*]}) has ${need[total]} MiB free; lower --batch-size or free a GPU"
  GPUS=("${kept[@]}")
}

# validate_own — the settings only this script has; exit 2 naming the bad one.
validate_own() {
  log::require_int --batch-size "$BATCH" 1 || exit 2
  [[ -z $WORKERS ]] || log::require_int --workers "$WORKERS" 0 || exit 2
  [[ -z $AMP || $AMP == off || $AMP == bf16 ]] || DIE_STATUS=2 die "--amp must be off or bf16, got '$AMP'"
  [[ -z $MAX_BAD || $MAX_BAD =~ ^(0|1|0?\.[0-9]+|1\.0*)$ ]] ||
    DIE_STATUS=2 die "--max-bad-images must be a fraction from 0 to 1, got '$MAX_BAD'"
}

main() {
  CHECKPOINT="" OUT="" DATA="" BATCH=256 WORKERS="" AMP="" MAX_BAD=""
  sweep::parse "$@"
  if [[ -n $SWEEP_HELP ]]; then usage && exit 0; fi
  ((${#SWEEP_REST[@]} == 0)) || DIE_STATUS=2 die "infer_parallel.sh takes no arguments after --"
  [[ -n $CHECKPOINT ]] || DIE_STATUS=2 die "--checkpoint PATH is required (see --help)"
  [[ -f $CHECKPOINT ]] || DIE_STATUS=2 die "--checkpoint $CHECKPOINT: no such file"
  [[ -n $OUT ]] || DIE_STATUS=2 die "--out DIR is required (see --help)"
  validate_own
  LOG_DIR=${LOG_DIR:-$OUT/logs}
  sweep::defaults
  sweep::validate
  ((GPUS_PER_JOB == 1)) || DIE_STATUS=2 die "--gpus-per-job: infer_parallel.sh runs one shard a GPU (a whole model on each), got $GPUS_PER_JOB"
  [[ $MGPU_BACKEND == local ]] ||
    DIE_STATUS=2 die "infer_parallel.sh runs on this machine's GPUs only (--backend $MGPU_BACKEND): inside a Slurm allocation, run it there"
  core::py_env
  PY=("${CORE_PY[@]}" -m mgpu.infer)
  plan
  sweep::slots
  sweep::fd_room --cpu-procs || exit 2
  local n=${#SCHED_SLOTS[@]} i opts=() merge=()
  [[ -z $DATA ]] || opts+=(--data "$DATA")
  [[ -z $WORKERS ]] || opts+=(--workers "$WORKERS")
  [[ -z $AMP ]] || opts+=(--amp "$AMP")
  merge=("${PY[@]}" --checkpoint "$CHECKPOINT" --out "$OUT" --merge "$n")
  [[ -z $MAX_BAD ]] || merge+=(--max-bad-images "$MAX_BAD")
  [[ $DRY_RUN == true ]] || core::make_dirs "--out=$OUT/shards" "LOG_DIR=$LOG_DIR" || exit 2
  sched::init
  for ((i = 0; i < n; i++)); do # LOCAL_WORLD_SIZE: --workers auto shares the cores among the n processes
    sched::add "shard${i}_of_$n" "" "" "" "$OUT/shards/.mgpu_done_${i}_of_$n" -- env "LOCAL_WORLD_SIZE=$n" \
      "${PY[@]}" --checkpoint "$CHECKPOINT" --out "$OUT" --shard "$i/$n" --batch-size "$BATCH" "${opts[@]}"
  done
  sweep::drop_done
  if [[ $DRY_RUN == true ]]; then
    sweep::dry_run
    printf 'then:'
    printf ' %q' "${merge[@]}"
    echo
    exit 0
  fi
  log::info "$n shard(s) on $n slot(s); logs in $LOG_DIR"
  sched::run
  if ((SCHED_EXIT != 0)); then
    log::error "not every shard finished; fix the cause shown above, then run the same command with --resume:" \
      "only the unfinished shards run again"
    exit "$SCHED_EXIT"
  fi
  "${merge[@]}"
}

main "$@"
