#!/usr/bin/env bash
# train_torchrun.sh — DDP training of mgpu.train_clip through torchrun: one process per visible GPU.
#   CUDA_VISIBLE_DEVICES=0,1 bash train_torchrun.sh --epochs 10 --batch-size 64
#   bash train_torchrun.sh --preset demo                        # no GPU: 2 gloo processes on the CPU
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash train_torchrun.sh ...   # the same on every node
#   sbatch train_slurm.sbatch ...    # Slurm: srun starts one torchrun a node (train_torchrun.sh --slurm)
#   bash train_torchrun.sh --dry-run ...                        # the exact torchrun command only
# Arguments other than this script's own (--help) go to the trainer: python -m mgpu.train_clip --help.
set -Eeuo pipefail
set +o posix # POSIXLY_CORRECT in the environment starts bash in POSIX mode, which refuses names such as log::info
[[ -z ${MGPU_DEBUG:-} ]] || { PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '; set -x; }

MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/*}
# shellcheck source=lib/ddp.sh
source "$MGPU_ROOT/lib/ddp.sh" # and, through it, core log gpu

usage() {
  cat <<'USAGE'
Usage: [CUDA_VISIBLE_DEVICES=0,1] bash train_torchrun.sh [options] [trainer arguments]

Starts python -m mgpu.train_clip under torchrun, one process per visible GPU (CUDA_VISIBLE_DEVICES,
else every GPU); with no GPU, NPROC_PER_NODE CPU processes (default 2) talking gloo.
Options of this script:
  --gpus 0,1           the GPUs to use (the same as CUDA_VISIBLE_DEVICES=0,1; indices or GPU-/MIG- UUIDs;
                       "0 1" too), numbered as nvidia-smi numbers them (CUDA_DEVICE_ORDER=PCI_BUS_ID)
  --dry-run            print the exact command and exit
  --log-dir DIR        also write each rank's output to DIR (torchrun --log-dir, --tee 3)
  --ranks 0[,1...]     show only these local ranks' output on the console (torchrun --local-ranks-filter)
  --slurm              inside a Slurm allocation: srun starts one torchrun per Slurm task (one task per
                       node), meeting at a c10d rendezvous on the first node (see train_slurm.sbatch)
  -h, --help           this help
Environment:
  NPROC_PER_NODE       processes on this node (default: the visible GPUs, or 2 without GPU)
  NNODES, NODE_RANK    several nodes (default 1, 0); one node uses --standalone (no port to choose)
  MASTER_ADDR, MASTER_PORT, RDZV_ID
                       several nodes: the c10d rendezvous at MASTER_ADDR:MASTER_PORT (default port 29500),
                       job id RDZV_ID (default $SLURM_JOB_ID, else mgpu)
  MAX_RESTARTS         elastic restarts after a failure (default 0); the trainer then gets --resume auto
  OMP_NUM_THREADS      threads per process (default: cores / processes)
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT
                       seconds torchrun waits for its processes to save after a stop, before it KILLs
                       them (default 60)
  PYTHON               the Python with torch (default: the project's .venv, else python3)
Ctrl-C, SIGTERM or SIGHUP reach torchrun, which passes them to every process: each saves a checkpoint at
its next step and ends (a second Ctrl-C ends them at once). If torchrun itself is killed (SIGKILL, the
OOM killer), the kernel sends its processes SIGTERM, so none trains on alone.
Under nohup, torchrun is told to leave SIGHUP alone (--signals-to-handle), so a closed terminal does not
stop the run.
Exit status: 0 done; 2 a bad setting here; else torchrun's, 1: when a process failed, its summary names the
rank and its exit code (2 bad input, 1 failure); when the run was stopped, each process's log says where it
saved (torchrun prints a traceback of the signal it got).
USAGE
}

main() {
  local dry=0 logs="" ranks="" slurm=0 args=()
  while (($#)); do
    case $1 in # --gpus=0,1: this script's own, not the trainer's
      --log-dir=* | --ranks=* | --gpus=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    esac
    case $1 in
      --dry-run) dry=1 ;;
      --slurm) slurm=1 ;;
      --log-dir | --ranks | --gpus)
        core::need_value "$1" $# "${2:-}" || exit 2
        if [[ $1 == --log-dir ]]; then
          [[ -n $2 ]] || DIE_STATUS=2 die "--log-dir is empty: name a folder for each rank's output (leave the flag out for none)"
          logs=$2
        elif [[ $1 == --gpus ]]; then
          ddp::gpus "$2"
        else
          [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || DIE_STATUS=2 die "--ranks must list local ranks like 0 or 0,1; got '$2'"
          ranks=$2
        fi
        shift
        ;;
      -h | --help)
        usage
        return 0
        ;;
      --)
        args+=("${@:2}") # like run_train_clip.sh: what follows -- goes to the trainer as is
        break
        ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  ddp::python
  ddp::nproc
  DDP_SRUN=()
  if ((slurm)); then ddp::slurm; else ddp::nodes; fi
  ddp::threads
  MAX_RESTARTS=${MAX_RESTARTS:-0}
  log::require_int MAX_RESTARTS "$MAX_RESTARTS" 0 || exit 2
  MAX_RESTARTS=$((10#$MAX_RESTARTS))

  ddp::python_cmd
  local cmd=("${DDP_SRUN[@]}" "${DDP_CMD[@]}" -m torch.distributed.run)
  if ((slurm)); then # the rendezvous numbers the agents: no --node-rank
    cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
  elif ((NNODES == 1)); then
    cmd+=(--standalone --nnodes 1)
  else
    cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
      --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-mgpu}}")
  fi
  ddp::signals
  cmd+=(--nproc-per-node "$DDP_NPROC" --max-restarts "$MAX_RESTARTS" "${DDP_SIGNALS[@]}")
  if [[ -n $logs ]]; then
    cmd+=(--log-dir "$logs" --tee 3)
    DDP_NOTES+=("each rank's output also goes to $logs/<run>/attempt_<n>/<local rank>/stdout.log and stderr.log")
  fi
  if [[ -n $ranks ]]; then # a rank that does not run would leave the console silent
    local rank
    for rank in ${ranks//,/ }; do
      ((10#$rank < DDP_NPROC)) || DIE_STATUS=2 die "--ranks $ranks: local rank $((10#$rank)) does not run here: the local ranks are 0 to $((DDP_NPROC - 1)) (NPROC_PER_NODE=$DDP_NPROC)"
    done
    cmd+=(--local-ranks-filter "$ranks")
  fi
  if ((MAX_RESTARTS > 0)) && [[ " ${args[*]} " != *" --resume "* && " ${args[*]} " != *" --resume="* ]]; then
    args+=(--resume auto) # a restarted job continues from its newest checkpoint
  fi
  cmd+=(-m mgpu.train_clip "${args[@]}")
  ddp::launch "$dry" "${cmd[@]}"
}

main "$@"
