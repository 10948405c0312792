#!/usr/bin/env bats
# shellcheck disable=SC2154  # $stderr and $output come from bats' run
# infer_parallel.sh with the real trainer's checkpoint, real processes, scenario GPUs.

load test_helper

setup_file() {
  export PYTHON=$ROOT/.venv/bin/python CKPT="$BATS_FILE_TMPDIR/ckpt"
  PYTHONPATH=$ROOT/py "$PYTHON" -m mgpu.train_clip --image-encoder starnet_s050 --text-encoder clip:tiny \
    --embed-dim 32 --image-size 32 --train-size 32 --val-size 40 --batch-size 8 --workers 0 --max-steps 2 --no-tb \
    --output-dir "$CKPT" >/dev/null 2>&1
}

setup() {
  common_setup
  cd "$WORK" || return 1
  export MGPU_LOCK_DIR="$WORK/locks" MGPU_UTIL_SAMPLES=1
}

rows() { "$PYTHON" -c 'import numpy, sys; print(numpy.load(sys.argv[1]).shape[0])' "$1"; }

@test "no GPU: --cpu-procs 3 shards, merges every row once, in order" {
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 3 --batch-size 4
  assert_success
  [[ $stderr =~ "memory plan: each process needs about "[0-9]+" MiB (weights "[0-9]+", activations "[0-9]+" at batch 4, CUDA context 500)" ]]
  assert_line --regexp "^merged 40 samples from 3 shard\(s\): image->text R@1 [0-9.]+"
  assert_equal "$(rows res/image_embeddings.npy) $(rows res/text_embeddings.npy)" "40 40"
  assert_equal "$(jq -r '[.shards[].samples] | map(tostring) | join(" ")' res/metrics.json)" "13 13 14"
}

@test "a GPU without room for the model is skipped by the plan, with the numbers" {
  local scenario
  scenario=$(scenario_copy 4x-rtx4090-idle)
  jq '(.gpus[] | select(.index == 1) | .memory_used_mib) = 24300' "$scenario" >"$scenario.tmp" && mv "$scenario.tmp" "$scenario"
  MGPU_FAKE_GPUS=$scenario run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" \
    --out res --gpus 0,1,2 --batch-size 4
  assert_success
  [[ $stderr == *"[ERROR] GPU 1: 264 MiB free of 24564, the model needs "*" MiB; skipping it"* ]]
  assert_equal "$(jq -r '[.shards[].gpu] | join(" ")' res/metrics.json)" "0 2"
  MGPU_FAKE_GPUS=$scenario run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" \
    --out res2 --gpus 1 --batch-size 4
  assert_failure 1
  [[ $stderr == *"no GPU in GPUS (1) has "*" MiB free; lower --batch-size or free a GPU"* ]]
}

@test "a shard killed mid-way is the only one redone by --resume" {
  bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 2 --batch-size 1 >run1.log 2>&1 &
  local job=$! victim="" waited=0 rc=0
  until [[ -n $victim ]]; do
    victim=$(pgrep -f -- '--shard 1/2' | head -1 || true)
    sleep 0.1
    ((++waited < 300)) || { cat run1.log; false; }
  done
  sleep 2 # let it load and start encoding
  kill -KILL "$victim"
  wait "$job" || rc=$?
  assert_equal "$rc" 1
  run cat run1.log
  assert_line --partial "only the unfinished shards run again"
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 2 \
    --batch-size 1 --resume
  assert_success
  [[ $stderr == *"skipping shard0_of_2: done earlier with the same configuration (--resume)"* ]]
  [[ $stderr == *"started shard1_of_2"* && $stderr != *"started shard0_of_2"* ]]
  assert_equal "$(rows res/image_embeddings.npy)" 40
}

@test "bad input: missing and corrupt checkpoints, mismatched encoders, missing flags" {
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --out res
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --checkpoint PATH is required (see --help)"
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint nope.pt --out res
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --checkpoint nope.pt: no such file"
  echo garbage >bad.pt
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint bad.pt --out res
  assert_failure 2
  [[ $stderr == *"mgpu.infer: error: --checkpoint bad.pt: not a readable checkpoint"* ]]
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --batch-size 0
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --batch-size must be an integer of at least 1, got '0'"
}

@test "--dry-run shows the plan, each shard's command and the merge; nothing runs" {
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json run --separate-stderr bash "$ROOT/infer_parallel.sh" \
    --checkpoint "$CKPT/model.pt" --out res --dry-run
  assert_success
  assert_line --regexp "^shard3_of_4 -> GPU 3: CUDA_VISIBLE_DEVICES=3 .* -m mgpu.infer --checkpoint .*model.pt --out res --shard 3/4 --batch-size 256"
  assert_line --regexp "^then: .* -m mgpu.infer --checkpoint .*model.pt --out res --merge 4"
  assert [ ! -e res/image_embeddings.npy ]
}
