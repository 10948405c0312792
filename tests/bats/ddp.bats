#!/usr/bin/env bats
# shellcheck disable=SC2154,SC2012,SC2317,SC2016  # $stderr and $output come from bats' run; ls of names we made; wait_for calls the small functions; inner scripts' own $1
# train_torchrun.sh and train_ddp.sh: real torchrun, real gloo processes on the CPU, the real trainer.

load test_helper

setup() {
  common_setup
  cd "$WORK" || return 1
  export PYTHON=$ROOT/.venv/bin/python
  TINY=(--image-encoder starnet_s050 --text-encoder clip:tiny --embed-dim 32 --image-size 32 --train-size 48
    --val-size 13 --batch-size 8 --workers 0 --warmup 2 --lr 1e-3 --no-tb)
}

# a test that fails while its torchrun trains stops it here (its workers then get SIGTERM from the kernel)
teardown() { [[ -z ${DDP_JOB:-} ]] || kill -KILL "$DDP_JOB" 2>/dev/null || true; }

metric() { jq -r "$2" "$1/metrics.json"; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

@test "bad settings are named with what is allowed" {
  NPROC_PER_NODE=0 run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] NPROC_PER_NODE must be an integer of at least 1, got '0'"
  NNODES=2 run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] NNODES=2 needs MASTER_ADDR: the address of node 0, reachable from every node"
  CUDA_VISIBLE_DEVICES=0,gpu1 run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='0,gpu1': 'gpu1' is neither a GPU index nor a GPU-/MIG- UUID"
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json CUDA_VISIBLE_DEVICES=1,6 run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='1,6': GPU 6 does not exist (this machine has GPUs: 0 1 2 3)"
  NNODES=2 NODE_RANK=2 MASTER_ADDR=h run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] NODE_RANK must be an integer from 0 to 1, got '2'"
  # more ranks than GPUs: every rank needs its own GPU (NCCL refuses two ranks on one)
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json CUDA_VISIBLE_DEVICES=0,1 NPROC_PER_NODE=3 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] NPROC_PER_NODE=3 is more than the 2 visible GPU(s) (0 1): each process needs a GPU of its own (NCCL refuses two ranks on one GPU); lower NPROC_PER_NODE or make more GPUs visible"
  # --ranks naming a rank that does not run would leave the console silent; an empty --log-dir is no folder
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json CUDA_VISIBLE_DEVICES=0,1 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run --ranks 0,02
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --ranks 0,02: local rank 2 does not run here: the local ranks are 0 to 1 (NPROC_PER_NODE=2)"
  run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run --log-dir=
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --log-dir is empty: name a folder for each rank's output (leave the flag out for none)"
  run --separate-stderr bash "$ROOT/train_ddp.sh" --gpus "0,,1" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --gpus must list GPUs like 0,1 or \"0 1\" (indices or GPU-/MIG- UUIDs), got '0,,1'"
  # what CUDA would read otherwise than meant: a space inside an entry, a GPU twice, a UUID start matching
  # no GPU or several, two MIG instances
  local four=$SCENARIOS/4x-rtx4090-idle.json mig=() setting
  MGPU_FAKE_GPUS=$four CUDA_VISIBLE_DEVICES="1 2" run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='1 2': '1 2' holds a space, and CUDA reads a GPU only up to it: separate GPUs with commas (1,2)"
  MGPU_FAKE_GPUS=$four CUDA_VISIBLE_DEVICES="0,GPU-5c1e0a7e" run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='0,GPU-5c1e0a7e': GPU GPU-5c1e0a7e is listed twice, and CUDA then shows no GPU at all: list each GPU once"
  MGPU_FAKE_GPUS=$four run --separate-stderr bash "$ROOT/train_torchrun.sh" --gpus GPU-5c1e --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='GPU-5c1e': 'GPU-5c1e' is the start of 4 GPUs' UUIDs: give more of it"
  MGPU_FAKE_GPUS=$four run --separate-stderr bash "$ROOT/train_ddp.sh" --gpus GPU-deadbeef --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='GPU-deadbeef': 'GPU-deadbeef' matches no GPU's UUID (nvidia-smi -L lists them)"
  mapfile -t mig < <(jq -r '.gpus[].mig_devices[]?.uuid' "$SCENARIOS/2x-a100-40gb-mig.json")
  setting="${mig[0]},${mig[1]}"
  MGPU_FAKE_GPUS=$SCENARIOS/2x-a100-40gb-mig.json run --separate-stderr bash "$ROOT/train_torchrun.sh" --gpus "$setting" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES='$setting': 2 MIG instances, but a CUDA process sees only the first MIG instance it is given, so processes cannot share them out: name one MIG instance, or whole GPUs"
}

# fake_torch DIR CUDA — a torch package in DIR whose version.py says cuda = CUDA (None: a CPU-only build)
fake_torch() {
  mkdir -p "$1/torch"
  : >"$1/torch/__init__.py"
  printf '%s\n' "from typing import Optional" "__version__ = '2.13.0+x'" "cuda: Optional[str] = $2" >"$1/torch/version.py"
}

@test "real GPUs and a CPU-only torch: an error before anything starts, not every rank on the CPU under 'Using 2 GPUs'" {
  export NVIDIA_SMI=$ROOT/tests/fakes/nvidia-smi MGPU_FAKE_SMI_SCENARIO=$SCENARIOS/4x-rtx4090-idle.json
  fake_torch "$WORK/cpu" None
  fake_torch "$WORK/cuda" "'12.4'"
  for script in train_torchrun.sh train_ddp.sh; do
    PYTHONPATH=$WORK/cpu CUDA_VISIBLE_DEVICES=0,1 run --separate-stderr bash "$ROOT/$script" --dry-run
    assert_failure 2
    assert_equal "$stderr" "[ERROR] torch 2.13.0+x is a CPU-only build, so it cannot use the 2 visible GPU(s) (0 1): install a CUDA build (https://pytorch.org/get-started/locally/); python check_gpus.py --torch shows what torch sees"
    assert_equal "$output" ""
    PYTHONPATH=$WORK/cuda CUDA_VISIBLE_DEVICES=0,1 run --separate-stderr bash "$ROOT/$script" --dry-run
    assert_success
    assert_line --index 0 --regexp '^env .*torch\.distributed\.(run|launch) '
    [[ $stderr == *"[INFO] Using 2 GPUs for training (world size 2)" ]]
  done
  # every GPU of the machine (CUDA_VISIBLE_DEVICES unset) as well
  PYTHONPATH=$WORK/cpu run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] torch 2.13.0+x is a CPU-only build, so it cannot use the 4 visible GPU(s) (0 1 2 3): install a CUDA build (https://pytorch.org/get-started/locally/); python check_gpus.py --torch shows what torch sees"
  # a Python without torch is named, with what to do (python3 -S: no site-packages, so no torch)
  printf '%s\n' '#!/usr/bin/env bash' 'exec python3 -S "$@"' >"$WORK/python-without-torch"
  chmod +x "$WORK/python-without-torch"
  PYTHON=$WORK/python-without-torch CUDA_VISIBLE_DEVICES=0 run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] $WORK/python-without-torch cannot import torch: run make deps, or set PYTHON to the Python that has it"
}

@test "a visible GPU another job uses is warned about, naming what it uses; an idle one is not" {
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json CUDA_VISIBLE_DEVICES=2,3 run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_success
  assert_equal "${stderr%%$'\n'*}" "[WARN] GPU 2 is in use by another job (utilization 95% > MAX_UTIL 70%, 20582 of 24564 MiB in use): DDP runs at the pace of its slowest rank, and a GPU short of memory fails with CUDA out of memory; python check_gpus.py shows who uses it, and CUDA_VISIBLE_DEVICES (or --gpus) picks others"
  assert_equal "$(grep -c WARN <<<"$stderr")" 1
  MAX_UTIL=99 MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json run --separate-stderr bash "$ROOT/train_ddp.sh" --gpus 2 --dry-run
  assert_success
  assert_equal "$(grep WARN <<<"$stderr")" "[WARN] GPU 2 is in use by another job (20582 of 24564 MiB in use): DDP runs at the pace of its slowest rank, and a GPU short of memory fails with CUDA out of memory; python check_gpus.py shows who uses it, and CUDA_VISIBLE_DEVICES (or --gpus) picks others"
}

@test "train_ddp.sh on several nodes: node 0 with MASTER_PORT taken on this host is an error naming it (the others would wait for their timeout); node 1 is not checked" {
  python3 -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1])); __import__("os").rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)' "$WORK/port" >/dev/null 2>&1 3>&- &
  DDP_JOB=$! # (teardown ends it, should the test stop early)
  local port
  listening() { [[ -s $WORK/port ]]; }
  wait_for 30 "the test's listener to take a port" listening
  port=$(cat "$WORK/port")
  # (not train_torchrun.sh: its c10d rendezvous port may be held by another agent of the same job, on one host)
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=$port run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] MASTER_PORT=$port is in use on this host (node 0, where every node meets): set another MASTER_PORT, the same on every node"
  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=0$port run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run
  assert_success
  assert_output --regexp "--master_port $port "
  { kill "$DDP_JOB" && wait "$DDP_JOB"; } 2>/dev/null || true
  DDP_JOB=""
}

@test "OMP_NUM_THREADS is checked; --slurm names a missing or failing scontrol with its own message" {
  OMP_NUM_THREADS=auto run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] OMP_NUM_THREADS must be an integer of at least 1, got 'auto'"
  OMP_NUM_THREADS=04 run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run
  assert_success
  assert_output --partial " OMP_NUM_THREADS=4 "
  # an allocation whose controller does not answer: scontrol's own words, not a silent exit
  mkdir -p bin
  printf '#!/bin/sh\nexit 0\n' >bin/srun
  printf '#!/bin/sh\necho "scontrol: error: Unable to contact slurm controller (connect failure)" >&2\nexit 1\n' >bin/scontrol
  chmod +x bin/srun bin/scontrol
  PATH=$PWD/bin:$PATH SLURM_JOB_ID=9 SLURM_JOB_NODELIST='n[1-2]' run --separate-stderr bash "$ROOT/train_torchrun.sh" --slurm --dry-run
  assert_failure 1
  assert_equal "$stderr" "[ERROR] scontrol show hostnames 'n[1-2]' failed: scontrol: error: Unable to contact slurm controller (connect failure)"
  rm bin/scontrol
  local dirs=() dir path=$PWD/bin # PATH without any scontrol (CI installs a real one, in /usr/bin)
  IFS=: read -ra dirs <<<"$PATH"
  for dir in "${dirs[@]}"; do
    if [[ -x $dir/scontrol ]]; then # that folder again, as links to all but scontrol
      mkdir -p "without$dir"
      find "$dir/" -mindepth 1 -maxdepth 1 ! -name scontrol -exec ln -sf -t "without$dir/" {} +
      dir=$PWD/without$dir
    fi
    path+=:$dir
  done
  PATH=$path SLURM_JOB_ID=9 SLURM_JOB_NODELIST='n[1-2]' run --separate-stderr bash "$ROOT/train_torchrun.sh" --slurm --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --slurm needs srun and scontrol on PATH; scontrol not found"
}

@test "--gpus \"1 2\", --gpus=1,2: the GPUs nvidia-smi numbers 1 and 2, written into the printed command, on a server of mixed models" {
  export MGPU_FAKE_GPUS=$SCENARIOS/2x-rtx3090-2x-rtx4090.json # CUDA's own order (fastest first) would put 0,1 on the 4090s
  local script form
  for script in train_torchrun.sh train_ddp.sh; do
    for form in --gpus=1,2 "--gpus=1 2"; do
      run --separate-stderr bash "$ROOT/$script" --dry-run "$form" --max-steps 3
      assert_success
      assert_equal "$stderr" "[INFO] Using 2 GPUs for training (world size 2)"
      assert_output --regexp '^env CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1\\,2 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60 OMP_NUM_THREADS=[0-9]+ PYTHONPATH=.* -m mgpu.train_clip --max-steps 3$'
    done
  done
  run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run --gpus "1 2"
  assert_output --regexp '^env CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1\\,2 '
  # pasted as printed, the command sees the same GPUs
  local printed=${output%% -m torch.distributed.run*} probe
  probe=$(printf %q 'import os; print(os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"])')
  run bash -c "$printed -c $probe"
  assert_output "1,2 PCI_BUS_ID"
  CUDA_DEVICE_ORDER=FASTEST_FIRST run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run --gpus 0
  assert_success
  [[ $stderr == *"[WARN] CUDA_DEVICE_ORDER=FASTEST_FIRST: CUDA then numbers the GPUs its own way, not as nvidia-smi does"* ]]
  assert_output --regexp '^env CUDA_DEVICE_ORDER=FASTEST_FIRST CUDA_VISIBLE_DEVICES=0 '
}

@test "under nohup (SIGHUP ignored) torchrun is told to leave SIGHUP alone, so a closed terminal does not stop the run" {
  local script
  for script in train_torchrun.sh train_ddp.sh; do
    run --separate-stderr bash -c 'trap "" HUP && exec bash "$1" --dry-run' _ "$ROOT/$script"
    assert_success
    assert_output --regexp ' --signals-to-handle SIGTERM\\,SIGINT\\,SIGQUIT '
    run --separate-stderr env --default-signal=HUP bash "$ROOT/$script" --dry-run # (this runner may be under nohup)
    assert_success
    refute_output --partial "--signals-to-handle"
  done
}

@test "--dry-run: one process per visible GPU, --standalone, threads per process, elastic restarts resume" {
  # (SIGHUP at its default: under nohup torchrun gets --signals-to-handle too, as a test below shows)
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json CUDA_VISIBLE_DEVICES=2,5,7 MAX_RESTARTS=3 \
    run --separate-stderr env --default-signal=HUP bash "$ROOT/train_torchrun.sh" --dry-run --ranks 0 --epochs 2
  assert_success
  assert_equal "$stderr" "[INFO] Using 3 GPUs for training (world size 3)"
  assert_output --regexp "^env CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=2\\\\,5\\\\,7 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=60 OMP_NUM_THREADS=1 PYTHONPATH=.*/py .*python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 3 --max-restarts 3 --local-ranks-filter 0 -m mgpu.train_clip --epochs 2 --resume auto$"
  local same=$output # --gpus is the same as CUDA_VISIBLE_DEVICES
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json MAX_RESTARTS=3 \
    run --separate-stderr env --default-signal=HUP bash "$ROOT/train_torchrun.sh" --gpus 2,5,7 --dry-run --ranks 0 --epochs 2
  assert_success
  assert_equal "$output" "$same"
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 RDZV_ID=job7 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_success
  # several nodes: torchrun prints nothing until every node has joined, so the wait is said
  assert_equal "$stderr" "[INFO] Using 16 GPUs for training (world size 16) (2 nodes x 8 processes; this is node 1)
[INFO] node 1 of 2: training starts once all 2 nodes have started this command and met at 10.0.0.1:29500; nothing more is printed until then"
  assert_output --partial "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500 --rdzv-id job7 --nproc-per-node 8"
  run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run -- --epochs 2 --lr 0.1
  assert_success
  assert_output --regexp " -m mgpu.train_clip --epochs 2 --lr 0.1$"
  # numbers with leading zeros are decimal, as written (bash arithmetic would take 08 for octal and fail)
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json NPROC_PER_NODE=08 MAX_RESTARTS=010 NNODES=02 NODE_RANK=01 MASTER_ADDR=h \
    MASTER_PORT=029500 run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_success
  [[ ${stderr_lines[0]} == "[INFO] Using 16 GPUs for training (world size 16) (2 nodes x 8 processes; this is node 1)" ]]
  assert_output --partial "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint h:29500 --rdzv-id mgpu --nproc-per-node 8 --max-restarts 10 "
}

@test "train_torchrun.sh: 2 gloo processes run the demo preset; only rank 0 writes; world size 2 in metrics.json" {
  run --separate-stderr bash "$ROOT/train_torchrun.sh" --log-dir ranks --preset demo --max-steps 4 --batch-size 8 \
    --train-size 48 --val-size 13 --no-tb --lr 1e-3 --lr-scale linear --sync-bn --output-dir out
  assert_success
  assert_line --partial "--sync-bn: SyncBatchNorm needs CUDA; on the CPU (gloo) BatchNorm statistics stay per rank"
  # --log-dir: each rank's output in its own file as well (torchrun's <dir>/<run>/attempt_0/<rank>/)
  assert_equal "$(find ranks -name stdout.log | wc -l)" 2
  assert_equal "$(find ranks -name stdout.log -exec grep -l "parameters identical" {} + | wc -l)" 1
  assert_equal "$(head -2 <<<"$stderr")" "[INFO] Using 2 CPU processes for training (no GPU: gloo, OMP_NUM_THREADS=1 each)
[INFO] each rank's output also goes to ranks/<run>/attempt_<n>/<local rank>/stdout.log and stderr.log"
  assert_line "[default0]:Using 2 CPU processes for training (DDP, one process each, backend gloo)" # --tee prefixes
  assert_line --partial "global batch 16 (8 x 2 processes), lr 0.002 (0.001 x 2, --lr-scale linear)"
  assert_line "[default0]:parameters identical on all 2 ranks"
  # the loss gathers features with an autograd-aware all_gather of mgpu's own: no deprecation warning a run
  [[ $stderr != *Warning* ]] || { grep -m 3 Warning <<<"$stderr"; false; }
  assert_equal "$(metric out '[.world_size, .steps, .val_samples, .completed] | map(tostring) | join(" ")')" "2 4 13 true"
  assert_equal "$(ls out | tr '\n' ' ')" "checkpoint_4.pt metrics.json model.pt "
}

@test "train_ddp.sh runs the same job through torch.distributed.launch on a free port" {
  "$PYTHON" -c 'import socket, time, sys; s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)' >port &
  local holder=$!
  wait_for 30 "the port holder" test -s port
  MASTER_PORT=$(<port) run --separate-stderr bash "$ROOT/train_ddp.sh" "${TINY[@]}" --max-steps 2 --output-dir out
  kill "$holder"
  assert_success
  [[ $stderr == *"[WARN] MASTER_PORT=$(<port) is in use; choosing a free port"* ]]
  assert_equal "$(metric out '.world_size')" 2
}

@test "two --standalone runs at once both finish" {
  bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 3 --output-dir a >a.log 2>&1 &
  local first=$!
  bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 3 --output-dir b >b.log 2>&1 || { cat b.log; false; }
  wait "$first" || { cat a.log; false; }
  assert_equal "$(metric a '.completed') $(metric b '.completed')" "true true"
}

@test "two nodes on one host (c10d rendezvous) finish together" {
  export NNODES=2 MASTER_ADDR=127.0.0.1 MASTER_PORT NPROC_PER_NODE=1 RDZV_ID=two-nodes
  MASTER_PORT=$(free_port)
  NODE_RANK=1 bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 2 --output-dir n1 >n1.log 2>&1 &
  local other=$!
  NODE_RANK=0 run --separate-stderr timeout 240 bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 2 --output-dir n0
  wait "$other" || { cat n1.log; false; }
  assert_success
  # one of the two agents became node 0 of the rendezvous: its rank 0 wrote the outputs
  assert_equal "$(cat n*/metrics.json | jq -s 'map(.world_size) | join(" ")' -r)" "2"
}

@test "a stopped run continues with --resume auto to the weights of a straight run" {
  bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 6 --output-dir straight >/dev/null 2>&1
  run --separate-stderr bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 6 --stop-after 2 --output-dir split
  assert_success
  assert_equal "$(metric split '.completed')" false
  run --separate-stderr bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 6 --resume auto --output-dir split
  assert_success
  assert_line --partial "at step 2 of 6"
  "$PYTHON" - <<'PY'
import torch
a = torch.load("straight/checkpoint_6.pt", weights_only=True)["model"]
b = torch.load("split/checkpoint_6.pt", weights_only=True)["model"]
bad = [k for k in a if not torch.equal(a[k], b[k])]
assert not bad, bad
PY
}

@test "killing one worker ends the whole job, non-zero, within the timeout" {
  bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 100000 --log-every 1 --dist-timeout 30 --output-dir k \
    >k.log 2>&1 &
  local job=$! workers=() # the script execs torchrun: $job is torchrun, and the workers are its children
  DDP_JOB=$job
  at_step_2() { grep -q '^step 2/' k.log; }
  wait_for 120 "step 2 in k.log" at_step_2 || { cat k.log; false; }
  mapfile -t workers < <(children_of "$job" '*-m mgpu.train_clip *')
  assert_equal "${#workers[@]}" 2
  local start=$SECONDS rc=0
  kill -KILL "${workers[1]}"
  wait "$job" || rc=$?
  ((rc != 0))
  ((SECONDS - start < 60))
  # torchrun's summary names the rank that died and how
  run grep -E "rank +: [01] \(local_rank: [01]\)" k.log
  assert_success
  run grep -E "exitcode +: -9 \(pid: ${workers[1]}\)" k.log
  assert_success
}

@test "Ctrl-C on a DDP run: torchrun passes it on, every rank stops at its next step with one checkpoint, and --resume auto continues" {
  # as a terminal does: SIGINT to torchrun (the foreground process); its workers lead sessions of their own
  env --default-signal=INT bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 100000 --log-every 1 --output-dir c \
    >c.log 2>&1 &
  local job=$!
  DDP_JOB=$job
  at_step_2() { grep -q '^step 2/' c.log; }
  wait_for 120 "step 2 in c.log" at_step_2 || { cat c.log; false; }
  kill -INT "$job"
  wait_child 120 "$job" || { cat c.log; false; }
  assert_equal "$(grep -c 'stopped by signal 2 at step [0-9]* of 100000; checkpoint saved: resume with --resume auto' c.log)" 1
  run grep -c 'KeyboardInterrupt' c.log
  assert_output 0
  local saved=(c/checkpoint_*.pt)
  assert_equal "${#saved[@]}" 1
  run --separate-stderr bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 6 --resume auto --output-dir c
  assert_success
  assert_line --regexp "^resumed from c/checkpoint_[0-9]+\.pt at step [0-9]+ of 6$"
}

@test "torchrun killed (SIGKILL, as the OOM killer does): the kernel TERMs its workers, which stop with a checkpoint; none trains on" {
  bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 100000 --log-every 1 --output-dir o >o.log 2>&1 &
  local job=$! workers=() w # the script execs torchrun: $job is torchrun, and the workers are its children
  DDP_JOB=$job
  at_step_2() { grep -q '^step 2/' o.log; }
  wait_for 120 "step 2 in o.log" at_step_2 || { cat o.log; false; }
  mapfile -t workers < <(children_of "$job" '*-m mgpu.train_clip *')
  assert_equal "${#workers[@]}" 2
  kill -KILL "$job"
  wait "$job" || true
  for w in "${workers[@]}"; do
    wait_for 60 "worker $w to end after its agent was killed" child_ended "$w" || { kill -KILL "${workers[@]}"; cat o.log; false; }
  done
  assert_equal "$(grep -c 'stopped by signal 15 at step [0-9]* of 100000; checkpoint saved' o.log)" 1
  local saved=(o/checkpoint_*.pt)
  assert_equal "${#saved[@]}" 1
}

@test "MAX_RESTARTS: a killed worker is restarted and the job resumes from its last checkpoint" {
  # a restarted gloo group can stall on a dead peer's address (torch 2.13): --dist-timeout bounds each
  # try, MAX_RESTARTS=3 gives more, and timeout bounds the test
  MAX_RESTARTS=3 timeout 240 bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 12 --save-every 3 --log-every 1 \
    --dist-timeout 20 --output-dir r >r.log 2>&1 &
  local job=$! victim
  DDP_JOB=$job
  saved() { [[ -f r/checkpoint_3.pt ]] && grep -q '^step 4/' r.log; }
  wait_for 120 "checkpoint_3.pt and step 4 in r.log" saved || { cat r.log; false; }
  victim=$(children_of "$(children_of "$job" '*torch.distributed.run*')" '*-m mgpu.train_clip *' | tail -1)
  [[ -n $victim ]]
  kill -KILL "$victim"
  wait "$job" || { cat r.log; false; }
  run grep -E "resumed from r/checkpoint_[0-9]+\.pt at step [0-9]+ of 12" r.log
  assert_success
  assert_equal "$(metric r '[.steps, .completed] | map(tostring) | join(" ")')" "12 true"
}
