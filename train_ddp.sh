#!/usr/bin/env bash
# train_ddp.sh — the second way to start DDP: python -m torch.distributed.launch --use_env, with a
# free --master_port. Same trainer, settings and checks as train_torchrun.sh (prefer that one).
#   CUDA_VISIBLE_DEVICES=0,1 bash train_ddp.sh --epochs 10
#   bash train_ddp.sh --dry-run --preset demo
# The trainer accepts --local_rank=N and --local-rank=N alike, whichever this torch passes.
set -Eeuo pipefail
set +o posix # POSIXLY_CORRECT in the environment starts bash in POSIX mode, which refuses names such as log::info
[[ -z ${MGPU_DEBUG:-} ]] || { PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '; set -x; }

MGPU_ROOT=$(readlink -f "${BASH_SOURCE[0]}") MGPU_ROOT=${MGPU_ROOT%/*}
# shellcheck source=lib/ddp.sh
source "$MGPU_ROOT/lib/ddp.sh" # and, through it, core log gpu

usage() {
  cat <<'USAGE'
Usage: [CUDA_VISIBLE_DEVICES=0,1] bash train_ddp.sh [--gpus 0,1] [--dry-run] [trainer arguments]

Starts python -m mgpu.train_clip with torch.distributed.launch --use_env, one process per visible GPU
(NPROC_PER_NODE overrides; 2 CPU processes without GPU). MASTER_PORT is used when free, else a free
port is chosen; NNODES, NODE_RANK, MASTER_ADDR as for train_torchrun.sh. Where this torch has no
torch.distributed.launch, torchrun is used instead (and it says so). Signals and the exit status as for
train_torchrun.sh (see its --help); MAX_RESTARTS is train_torchrun.sh's only.
USAGE
}

main() {
  local dry=0 args=()
  while (($#)); do
    [[ $1 != --gpus=* ]] || set -- --gpus "${1#*=}" "${@:2}" # this script's own, not the trainer's
    case $1 in
      --dry-run) dry=1 ;;
      --gpus)
        core::need_value "$1" $# "${2:-}" || exit 2
        ddp::gpus "$2"
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
  local port_given=${MASTER_PORT:-}
  ddp::nodes
  [[ -z $port_given ]] || port_given=$MASTER_PORT # as checked (029500 is 29500)
  ddp::threads
  if ((NNODES == 1)); then
    MASTER_PORT=$port_given
    ddp::free_port
  else
    DDP_PORT=$MASTER_PORT # every node must use the same port: no choosing here
    # node 0 alone listens there (a static rendezvous; torchrun's c10d one may be another agent's, on one
    # host): taken, the other nodes would wait until their timeout
    if ((NODE_RANK == 0)) && ! ddp::port_free "$DDP_PORT"; then
      log::error "MASTER_PORT=$DDP_PORT is in use on this host (node 0, where every node meets): set another MASTER_PORT, the same on every node"
      exit 2
    fi
  fi
  local launcher=torch.distributed.launch env_flag=(--use_env)
  if ! "$DDP_PYTHON" -c 'import torch.distributed.launch' 2>/dev/null; then
    log::warn "this torch has no torch.distributed.launch (removed in newer releases): using torchrun instead"
    launcher=torch.distributed.run env_flag=()
  fi
  ddp::python_cmd
  ddp::signals
  local cmd=("${DDP_CMD[@]}" -W ignore::FutureWarning
    -m "$launcher" "${env_flag[@]}" "${DDP_SIGNALS[@]}" --nproc_per_node "$DDP_NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK"
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$DDP_PORT" -m mgpu.train_clip "${args[@]}")
  ddp::launch "$dry" "${cmd[@]}"
}

main "$@"
