#!/usr/bin/env bats
# shellcheck disable=SC2154,SC2012  # $stderr and $output come from bats' run; ls of names we made
# train_torchrun.sh and train_ddp.sh: real torchrun, real gloo processes on the CPU, the real trainer.

load test_helper

setup() {
  common_setup
  cd "$WORK" || return 1
  export PYTHON=$ROOT/.venv/bin/python
  TINY=(--image-encoder starnet_s050 --text-encoder clip:tiny --embed-dim 32 --image-size 32 --train-size 48
    --val-size 13 --batch-size 8 --workers 0 --warmup 2 --lr 1e-3 --no-tb)
}

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
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES=0,gpu1: 'gpu1' is neither a GPU index nor a GPU-/MIG- UUID"
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json CUDA_VISIBLE_DEVICES=1,6 run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CUDA_VISIBLE_DEVICES=1,6: GPU 6 does not exist (this machine has GPUs: 0 1 2 3)"
  NNODES=2 NODE_RANK=2 MASTER_ADDR=h run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] NODE_RANK must be an integer from 0 to 1, got '2'"
  # more ranks than GPUs: every rank needs its own GPU (NCCL refuses two ranks on one)
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json CUDA_VISIBLE_DEVICES=0,1 NPROC_PER_NODE=3 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] NPROC_PER_NODE=3 is more than the 2 visible GPU(s) (0 1): each process needs a GPU of its own (NCCL refuses two ranks on one GPU); lower NPROC_PER_NODE or make more GPUs visible"
  run --separate-stderr bash "$ROOT/train_ddp.sh" --gpus "0,,1" --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --gpus must list GPUs like 0,1 (indices or GPU-/MIG- UUIDs), got '0,,1'"
}

@test "--dry-run: one process per visible GPU, --standalone, threads per process, elastic restarts resume" {
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json CUDA_VISIBLE_DEVICES=2,5,7 MAX_RESTARTS=3 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run --ranks 0 --epochs 2
  assert_success
  assert_equal "$stderr" "[INFO] Using 3 GPUs for training (world size 3)"
  assert_output --regexp "^env OMP_NUM_THREADS=1 PYTHONPATH=.*/py .*python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 3 --max-restarts 3 --local-ranks-filter 0 -m mgpu.train_clip --epochs 2 --resume auto$"
  local same=$output # --gpus is the same as CUDA_VISIBLE_DEVICES
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json MAX_RESTARTS=3 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --gpus 2,5,7 --dry-run --ranks 0 --epochs 2
  assert_success
  assert_equal "$output" "$same"
  MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 RDZV_ID=job7 \
    run --separate-stderr bash "$ROOT/train_torchrun.sh" --dry-run
  assert_success
  assert_equal "$stderr" "[INFO] Using 16 GPUs for training (world size 16) (2 nodes x 8 processes; this is node 1)"
  assert_output --partial "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500 --rdzv-id job7 --nproc-per-node 8"
  run --separate-stderr bash "$ROOT/train_ddp.sh" --dry-run -- --epochs 2 --lr 0.1
  assert_success
  assert_output --regexp " -m mgpu.train_clip --epochs 2 --lr 0.1$"
}

@test "train_torchrun.sh: 2 gloo processes run the demo preset; only rank 0 writes; world size 2 in metrics.json" {
  run --separate-stderr bash "$ROOT/train_torchrun.sh" --log-dir ranks --preset demo --max-steps 4 --batch-size 8 \
    --train-size 48 --val-size 13 --no-tb --lr 1e-3 --lr-scale linear --sync-bn --output-dir out
  assert_success
  assert_line --partial "--sync-bn: SyncBatchNorm needs CUDA; on the CPU (gloo) BatchNorm statistics stay per rank"
  # --log-dir: each rank's output in its own file as well (torchrun's <dir>/<run>/attempt_0/<rank>/)
  assert_equal "$(find ranks -name stdout.log | wc -l)" 2
  assert_equal "$(find ranks -name stdout.log -exec grep -l "parameters identical" {} + | wc -l)" 1
  assert_equal "$(head -1 <<<"$stderr")" "[INFO] Using 2 CPU processes for training (no GPU: gloo, OMP_NUM_THREADS=1 each)"
  assert_line "[default0]:Using 2 CPU processes for training (DDP, one process each, backend gloo)" # --tee prefixes
  assert_line --partial "global batch 16 (8 x 2 processes), lr 0.002 (0.001 x 2, --lr-scale linear)"
  assert_line "[default0]:parameters identical on all 2 ranks"
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

@test "MAX_RESTARTS: a killed worker is restarted and the job resumes from its last checkpoint" {
  # a restarted gloo group can stall on a dead peer's address (torch 2.13): --dist-timeout bounds each
  # try, MAX_RESTARTS=3 gives more, and timeout bounds the test
  MAX_RESTARTS=3 timeout 240 bash "$ROOT/train_torchrun.sh" "${TINY[@]}" --max-steps 12 --save-every 3 --log-every 1 \
    --dist-timeout 20 --output-dir r >r.log 2>&1 &
  local job=$! victim
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
