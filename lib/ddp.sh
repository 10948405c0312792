# shellcheck shell=bash disable=SC2034  # DDP_* globals are results for the sourcing script
# ddp:: — what train_torchrun.sh and train_ddp.sh share: how many processes, threads per process, a
# free port, and the "Using N GPUs for training" line. Every function returns a status (2: a bad setting,
# logged); the entry scripts exit. Needs core.sh and gpu.sh.

# shellcheck source=lib/core.sh
[[ -n ${MGPU_LIB:-} ]] || source "${BASH_SOURCE[0]%/*}/core.sh"
# shellcheck source=lib/gpu.sh
source "$MGPU_LIB/gpu.sh"

DDP_NOTES=() # lines for the user that ddp::launch prints after "Using N GPUs" (an entry script adds them)

# ddp::python — the Python with torch (core::python) into DDP_PYTHON.
ddp::python() {
  core::python
  DDP_PYTHON=$CORE_PYTHON
}

# ddp::gpus LIST — --gpus 0,1 (or "0 1") of the DDP scripts: the same as CUDA_VISIBLE_DEVICES=0,1 (which
# it sets); commas and spaces both separate GPUs.
ddp::gpus() {
  local fields field words=() some list
  IFS=, read -ra fields <<<"$1"
  for field in "${fields[@]}"; do
    read -ra some <<<"$field"
    ((${#some[@]})) || { words=() && break; } # an empty item: "0,,1"
    words+=("${some[@]}")
  done
  ((${#words[@]})) || { log::error "--gpus must list GPUs like 0,1 or \"0 1\" (indices or GPU-/MIG- UUIDs), got '$1'"; return 2; }
  printf -v list '%s,' "${words[@]}"
  export CUDA_VISIBLE_DEVICES=${list%,}
}

# ddp::visible — the entries of CUDA_VISIBLE_DEVICES into DDP_VISIBLE (unset: every GPU of the machine),
# checked as CUDA reads them: an entry that is neither an index nor a GPU-/MIG- UUID, one holding a space
# ("1 2": CUDA reads up to the space), an index the machine lacks, a UUID start that matches no GPU or
# several, a GPU listed twice (CUDA then shows none) or several MIG instances (CUDA shows only the
# first) is an error. On a machine without GPU the variable is checked, then ignored with a warning.
ddp::visible() {
  DDP_VISIBLE=()
  local machine
  machine=$(gpu::indices) || return 2
  if [[ ! -v CUDA_VISIBLE_DEVICES ]]; then
    read -ra DDP_VISIBLE <<<"$machine"
    return 0
  fi
  local setting="CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
  [[ -n $CUDA_VISIBLE_DEVICES ]] ||
    { log::error "CUDA_VISIBLE_DEVICES is set but empty: no GPU is visible (unset it, or list GPUs like 0,1)"; return 2; }
  local entry entries
  IFS=, read -ra entries <<<"$CUDA_VISIBLE_DEVICES"
  for entry in "${entries[@]}"; do
    entry=${entry#"${entry%%[![:space:]]*}"} entry=${entry%"${entry##*[![:space:]]}"} # around an entry: as CUDA
    [[ $entry != *[[:space:]]* ]] ||
      { log::error "$setting: '$entry' holds a space, and CUDA reads a GPU only up to it: separate GPUs with commas (${entry//[[:space:]]/,})"; return 2; }
    [[ $entry =~ ^[0-9]+$ || $entry =~ ^(GPU|MIG)-[0-9A-Fa-f-]+$ ]] ||
      { log::error "$setting: '$entry' is neither a GPU index nor a GPU-/MIG- UUID"; return 2; }
    DDP_VISIBLE+=("$entry")
  done
  if [[ -z $machine ]]; then
    log::warn "$setting, but this machine has no GPU: running on the CPU"
    DDP_VISIBLE=()
    return 0
  fi
  ddp::_check_visible "$setting" "$machine"
}

# ddp::_check_visible SETTING MACHINE — DDP_VISIBLE against the machine's GPUs (see ddp::visible).
ddp::_check_visible() {
  local setting=$1 machine=$2 entry index uuid i _ n migs=0
  local -A seen=()
  gpu::_read || return 2
  for entry in "${DDP_VISIBLE[@]}"; do
    if [[ $entry =~ ^[0-9]+$ ]]; then
      index=$((10#$entry)) # 01 is GPU 1, for CUDA as here
      gpu::exists "$index" ||
        { log::error "$setting: GPU $entry does not exist (this machine has GPUs: $machine)"; return 2; }
    elif [[ $entry == MIG-* ]]; then
      migs=$((migs + 1)) index=$entry
    else # a GPU- UUID or the start of one, as CUDA takes it
      n=0 index=""
      while IFS=, read -r i uuid _; do [[ ${uuid,,} != "${entry,,}"* ]] || { n=$((n + 1)) && index=$i; }; done <<<"$GPU_LINES"
      ((n)) || { log::error "$setting: '$entry' matches no GPU's UUID (nvidia-smi -L lists them)"; return 2; }
      ((n == 1)) || { log::error "$setting: '$entry' is the start of $n GPUs' UUIDs: give more of it"; return 2; }
    fi
    [[ -z ${seen[$index]:-} ]] ||
      { log::error "$setting: GPU $entry is listed twice, and CUDA then shows no GPU at all: list each GPU once"; return 2; }
    seen[$index]=1
  done
  ((migs <= 1)) || {
    log::error "$setting: $migs MIG instances, but a CUDA process sees only the first MIG instance it is given, so processes cannot share them out: name one MIG instance, or whole GPUs"
    return 2
  }
}

# ddp::nproc — processes on this node into DDP_NPROC and the device kind into DDP_KIND (gpu|cpu):
# NPROC_PER_NODE, else one per visible GPU, else 2 CPU processes (gloo). More processes than visible
# GPUs is an error: each rank takes cuda:<local rank>, and NCCL refuses two ranks on one GPU.
ddp::nproc() {
  ddp::visible || return
  DDP_KIND=gpu
  ((${#DDP_VISIBLE[@]})) || DDP_KIND=cpu
  if [[ -n ${NPROC_PER_NODE:-} ]]; then
    log::require_int NPROC_PER_NODE "$NPROC_PER_NODE" 1 || return 2
    DDP_NPROC=$((10#$NPROC_PER_NODE)) # 08 is 8 (bash arithmetic would read it as octal)
    if [[ $DDP_KIND == gpu ]] && ((DDP_NPROC > ${#DDP_VISIBLE[@]})); then
      log::error "NPROC_PER_NODE=$DDP_NPROC is more than the ${#DDP_VISIBLE[@]} visible GPU(s) (${DDP_VISIBLE[*]}): each process needs a GPU of its own (NCCL refuses two ranks on one GPU); lower NPROC_PER_NODE or make more GPUs visible"
      return 2
    fi
  elif [[ $DDP_KIND == gpu ]]; then
    DDP_NPROC=${#DDP_VISIBLE[@]}
  else
    DDP_NPROC=2
  fi
  [[ $DDP_KIND == cpu ]] || { ddp::_torch_cuda && ddp::_busy; }
}

# ddp::_torch_cuda — the real machine's GPUs are visible (a scenario's are not torch's to see): a torch
# that cannot use them is an error, as every rank would train on the CPU under "Using N GPUs". Read from
# torch/version.py, without importing torch (a second or more): a CPU-only build says `cuda ... = None`.
ddp::_torch_cuda() {
  gpu::_backend 2>/dev/null || return 0 # (ddp::visible read the GPUs in a subshell)
  [[ $GPU_BACKEND != scenario ]] || return 0
  local origin version="" cuda=""
  origin=$("$DDP_PYTHON" -c 'import importlib.util as u; s = u.find_spec("torch"); print(s.origin if s else "")' 2>/dev/null) ||
    return 0 # a Python that fails here says why when it runs
  if [[ -z $origin ]]; then
    log::error "$DDP_PYTHON cannot import torch: run make deps, or set PYTHON to the Python that has it"
    return 2
  fi
  local line
  while IFS= read -r line; do
    [[ $line != __version__* ]] || version=${line#*= }
    [[ $line != cuda[:\ =]* ]] || cuda=${line##*= }
  done <"${origin%/*}/version.py" 2>/dev/null || return 0
  [[ $cuda == None ]] || return 0
  log::error "torch ${version//\'/} is a CPU-only build, so it cannot use the ${#DDP_VISIBLE[@]} visible GPU(s) (${DDP_VISIBLE[*]}): install a CUDA build (https://pytorch.org/get-started/locally/); python check_gpus.py --torch shows what torch sees"
  return 2
}

# ddp::_busy — a warning for each visible GPU that another job uses (utilization above MAX_UTIL, or half
# its memory taken), from one reading: DDP runs at the pace of its slowest rank, and a GPU short of memory
# fails with CUDA out of memory. Nothing when the GPUs cannot be read.
ddp::_busy() {
  local max=${MAX_UTIL:-70} entry id why
  log::require_int MAX_UTIL "$max" 0 100 || return 2
  MGPU_UTIL_SAMPLES=1 gpu::sample 2>/dev/null || return 0
  for entry in "${DDP_VISIBLE[@]}"; do
    [[ ! $entry =~ ^[0-9]+$ ]] || entry=$((10#$entry)) # 02 is GPU 2, for CUDA as here
    gpu::resolve "$entry" || continue
    id=$GPU_ID why=""
    [[ ${GPU_UTIL[$id]:-NA} == NA ]] || ((GPU_UTIL[$id] <= max)) || why="utilization ${GPU_UTIL[$id]}% > MAX_UTIL $max%"
    if [[ ${GPU_MEM_USED[$id]:-NA} != NA && ${GPU_MEM_TOTAL[$id]:-NA} != NA ]] && ((GPU_MEM_USED[$id] * 2 >= GPU_MEM_TOTAL[$id])); then
      why+="${why:+, }${GPU_MEM_USED[$id]} of ${GPU_MEM_TOTAL[$id]} MiB in use"
    fi
    [[ -z $why ]] || log::warn "GPU $entry is in use by another job ($why): DDP runs at the pace of its slowest rank, and a GPU short of memory fails with CUDA out of memory; python check_gpus.py shows who uses it, and CUDA_VISIBLE_DEVICES (or --gpus) picks others"
  done
}

# ddp::threads — OMP_NUM_THREADS for each process (cores / processes, at least 1) unless already set;
# the cores are DDP_CORES where set (a Slurm task's CPUs), else nproc.
ddp::threads() {
  if [[ -n ${OMP_NUM_THREADS:-} ]]; then # each process's torch threads: a typo would fail in every rank
    log::require_int OMP_NUM_THREADS "$OMP_NUM_THREADS" 1 || return 2
    OMP_NUM_THREADS=$((10#$OMP_NUM_THREADS))
    return 0
  fi
  local cores=${DDP_CORES:-}
  [[ -n $cores ]] || cores=$(nproc 2>/dev/null || echo 1)
  OMP_NUM_THREADS=$((cores / DDP_NPROC))
  ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
}

# ddp::nodes — NNODES / NODE_RANK checked; several nodes need MASTER_ADDR.
ddp::nodes() {
  NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0}
  log::require_int NNODES "$NNODES" 1 || return 2
  NNODES=$((10#$NNODES))
  log::require_int NODE_RANK "$NODE_RANK" 0 $((NNODES - 1)) || return 2
  NODE_RANK=$((10#$NODE_RANK))
  if ((NNODES > 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
    log::error "NNODES=$NNODES needs MASTER_ADDR: the address of node 0, reachable from every node"
    return 2
  fi
  MASTER_PORT=${MASTER_PORT:-29500}
  log::require_int MASTER_PORT "$MASTER_PORT" 1 65535 || return 2
  MASTER_PORT=$((10#$MASTER_PORT))
  ((NNODES == 1)) || DDP_NOTES+=("node $NODE_RANK of $NNODES: training starts once all $NNODES nodes have started this command and met at $MASTER_ADDR:$MASTER_PORT; nothing more is printed until then")
}

# ddp::slurm — inside a Slurm allocation: one torchrun agent per Slurm task (one task per node is the
# usual layout), meeting at a c10d rendezvous on the allocation's first node. Sets NNODES (the agents),
# MASTER_ADDR, MASTER_PORT (a free port on this node, the first), RDZV_ID, DDP_SRUN (the srun prefix)
# and DDP_CORES.
ddp::slurm() {
  [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
    { log::error "--slurm runs inside a Slurm allocation (sbatch train_slurm.sbatch, or salloc); SLURM_JOB_ID is not set here"; return 2; }
  local tool
  for tool in srun scontrol; do
    command -v "$tool" >/dev/null 2>&1 || { log::error "--slurm needs srun and scontrol on PATH; $tool not found"; return 2; }
  done
  local nodes=${SLURM_NNODES:-1} first
  NNODES=${SLURM_NTASKS:-$nodes} NODE_RANK=0
  local errors rc=0
  errors=$(mktemp) || return 1
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>"$errors") || rc=$?
  ((rc == 0)) || log::error "scontrol show hostnames '$SLURM_JOB_NODELIST' failed: $(tail -n 1 "$errors")"
  rm -f "$errors"
  ((rc == 0)) || return 1
  first=${first%%$'\n'*}
  [[ -n $first ]] || { log::error "scontrol could not expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"; return 1; }
  ((NNODES == nodes)) ||
    log::warn "$NNODES Slurm tasks on $nodes node(s): $NNODES torchrun agents (--ntasks-per-node=1 gives one a node)"
  MASTER_ADDR=${MASTER_ADDR:-$first}
  ddp::free_port
  MASTER_PORT=$DDP_PORT RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
  DDP_SRUN=(srun --ntasks "$NNODES" --kill-on-bad-exit=1)
  DDP_CORES=${SLURM_CPUS_PER_TASK:-} # the task's CPUs, shared by its processes (ddp::threads)
}

# ddp::announce — "Using N GPUs for training", with the world size.
ddp::announce() {
  local world=$((DDP_NPROC * NNODES)) where=""
  if [[ -n ${DDP_SRUN:-} ]]; then
    where=" (Slurm job $SLURM_JOB_ID: $NNODES torchrun agent(s) x $DDP_NPROC processes; rendezvous at $MASTER_ADDR:$MASTER_PORT)"
  elif ((NNODES > 1)); then
    where=" ($NNODES nodes x $DDP_NPROC processes; this is node $NODE_RANK)"
  fi
  if [[ $DDP_KIND == gpu ]]; then
    if ((world == 1)); then
      log::info "Using single GPU for training$where"
    else
      log::info "Using $world GPUs for training (world size $world)$where"
    fi
  else
    log::info "Using $world CPU processes for training (no GPU: gloo, OMP_NUM_THREADS=$OMP_NUM_THREADS each)$where"
  fi
}

# ddp::port_free PORT — 0 when nothing listens on PORT on this host.
ddp::port_free() {
  ! (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null
}

# ddp::free_port — MASTER_PORT when set and free, else a free port the kernel picks; into DDP_PORT.
ddp::free_port() {
  if [[ -n ${MASTER_PORT:-} ]] && ddp::port_free "$MASTER_PORT"; then
    DDP_PORT=$MASTER_PORT
    return 0
  fi
  [[ -z ${MASTER_PORT:-} ]] || log::warn "MASTER_PORT=$MASTER_PORT is in use; choosing a free port"
  DDP_PORT=$("$DDP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
}

# ddp::signals — into DDP_SIGNALS: torchrun's --signals-to-handle without SIGHUP when this process was
# started with SIGHUP ignored (nohup): torchrun would otherwise catch it anyway, and a closed terminal would
# stop a run started to outlive it. Nothing for a torch whose torchrun lacks that option (it says so).
ddp::signals() {
  local line="" dir
  DDP_SIGNALS=()
  [[ -z ${DDP_SRUN[*]:-} ]] || return 0 # under srun torchrun runs on each node, not under this shell
  while read -r line; do [[ $line != SigIgn:* ]] || break; done 2>/dev/null </proc/$$/status
  line=${line#SigIgn:} line=${line//[[:space:]]/}
  [[ $line =~ ^[0-9a-fA-F]+$ ]] && (((16#$line) & 1)) || return 0
  dir=$("$DDP_PYTHON" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' 2>/dev/null) || dir=""
  if [[ -n $dir ]] && grep -q -- '--signals-to-handle' "$dir/distributed/run.py" 2>/dev/null; then
    DDP_SIGNALS=(--signals-to-handle "SIGTERM,SIGINT,SIGQUIT")
  else
    log::warn "SIGHUP is ignored here (nohup), but this torch's torchrun catches it anyway: a closed terminal would stop the run (use setsid or tmux)"
  fi
}

# ddp::print_command ARGV... — the exact command, shell-quoted, on stdout (for --dry-run).
ddp::print_command() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf '%s\n' "${quoted% }"
}

# ddp::launch DRY ARGV... — "Using N GPUs for training", the entry script's DDP_NOTES (one [INFO] line each),
# then the command: printed (DRY=1, --dry-run; returns 0) or exec'd, so signals reach the launcher directly
# and no shell is left waiting.
ddp::launch() {
  local dry=$1 note
  shift
  ddp::announce
  for note in "${DDP_NOTES[@]}"; do log::info "$note"; done
  if ((dry)); then
    ddp::print_command "$@"
    return 0
  fi
  exec "$@"
}

# ddp::python_cmd — into DDP_CMD: env with the GPUs, the threads and mgpu on PYTHONPATH, then the Python.
# GPUs are numbered as nvidia-smi numbers them (CUDA_DEVICE_ORDER=PCI_BUS_ID, as the sweep's jobs get):
# CUDA's own order, fastest first, would put "0,1" on other GPUs of a server with mixed models, perhaps
# another user's. CUDA_VISIBLE_DEVICES is written out, so the printed command (--dry-run) is the whole one.
ddp::python_cmd() {
  [[ -z ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-} ]] ||
    log::require_int TORCH_ELASTIC_SHUTDOWN_TIMEOUT "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" 0 || return 2
  DDP_CMD=(env)
  if [[ $DDP_KIND == gpu ]]; then
    if [[ ${CUDA_DEVICE_ORDER:-PCI_BUS_ID} != PCI_BUS_ID ]]; then
      log::warn "CUDA_DEVICE_ORDER=$CUDA_DEVICE_ORDER: CUDA then numbers the GPUs its own way, not as nvidia-smi does (the GPUs named were checked against nvidia-smi's numbers)"
    fi
    DDP_CMD+=("CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}")
    # (under srun each node's task gets its own GPUs from Slurm: this node's list would override them)
    [[ ! -v CUDA_VISIBLE_DEVICES || -n ${DDP_SRUN[*]:-} ]] || DDP_CMD+=("CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
  fi
  # after passing on a stop, torchrun waits this long for its processes to save before it KILLs them (its
  # own default, 30 s, is less than a step plus a checkpoint save of a real model; the sweep's --grace is 60)
  DDP_CMD+=("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-60}")
  DDP_CMD+=("OMP_NUM_THREADS=$OMP_NUM_THREADS" "PYTHONPATH=$MGPU_ROOT/py${PYTHONPATH:+:$PYTHONPATH}" "$DDP_PYTHON")
}
