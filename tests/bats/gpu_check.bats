#!/usr/bin/env bats
# shellcheck disable=SC2154  # $stderr comes from bats' run
# bench/gpu_check.sh, the GPU proof script, in its CPU smoke mode: the same steps with tiny sizes against a
# 2-GPU scenario file, so the script that runs on a lent GPU cannot rot.

load test_helper

setup() { common_setup; }

@test "gpu_check.sh --smoke: every step holds, figures in JSON and a table, the sweep waited for the busy GPU" {
  cd "$WORK"
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --smoke --out "$WORK/out"
  assert_success
  assert_line --regexp '^gpus +ok '
  assert_line --regexp '^sweep +ok +[0-9.]+ +2 demo configs on GPU 0, 2 at a time, after waiting for the busy GPU$'
  assert_line --regexp '^throughput +ok '
  assert_line --regexp '^infer +ok +[0-9.]+ +largest difference 0.00e\+00 \(tolerance 0\)$'
  assert_line --regexp '^resume +ok +[0-9.]+ +stopped after 2 steps and resumed .*: largest weight difference 0.00e\+00 \(tolerance 0\)$'
  assert_line --regexp '^multi_gpu +ok +[0-9.]+ +DDP over 2 processes'
  assert_line --partial "6 steps: 6 held or skipped, 0 failed"
  local json=$WORK/out/gpu_check.json
  assert_equal "$(jq -r '[.steps[].step] | join(" ")' "$json")" "gpus sweep throughput infer resume multi_gpu"
  assert_equal "$(jq -r '.mode, .ok' "$json" | paste -sd' ')" "smoke true"
  # the readers: the scenario and the fake nvidia-smi agree, and lib/gpu.sh read both GPUs
  assert_equal "$(jq -r '.steps[0].figures | "\(.gpus) \(.sources | join("+")) \(.gpu_sh | length)"' "$json")" \
    "2 scenario+fake nvidia-smi 3"
  # the sweep: both configs succeeded on GPU 0; one waited for the burner, as its log says
  assert_equal "$(jq -r '.steps[1].figures | "\(.exit) \(.busy_lines >= 1) \([.jobs[] | "\(.status)@\(.gpu)"] | join(","))"' "$json")" \
    "0 true succeeded@0,succeeded@0"
  run grep -c " waits: GPU 0 is busy: utilization 100%" "$WORK/out/sweep.log"
  assert_output 1
  # the trainer's figures came back from the benches, and each variant trained with a finite loss
  assert_equal "$(jq -r '.steps[2].figures | [(.throughput.bare_samples_per_second > 0), (.memory.configurations | keys | length),
    ([.variants[] | objects | .finite] | all), .variants.compile] | map(tostring) | join(" ")' "$json")" "true 4 true not run in smoke mode"
}

@test "gpu_check.sh: --only picks steps; an unknown step or option is exit 2 naming it; --dry-run runs nothing" {
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --only gpus,bogus
  assert_failure 2
  assert_equal "$stderr" "gpu_check: --only: unknown step 'bogus'; known: gpus sweep throughput infer resume multi_gpu"
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --frobnicate
  assert_failure 2
  assert_equal "$stderr" "gpu_check: unknown option '--frobnicate' (see --help)"
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --smoke --dry-run --out "$WORK/never"
  assert_success
  [[ ! -e $WORK/never ]]
  [[ $stderr == *'run_train_clip.sh --preset demo --gpus 0 --jobs-per-gpu 2'* ]]
  [[ $stderr == *'train_torchrun.sh --batch-size 8'* ]]
  [[ $stderr == *'infer_parallel.sh --checkpoint'* ]]
  cd "$WORK"
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --smoke --only gpus --out "$WORK/one"
  assert_success
  assert_equal "$(jq -r '[.steps[].step] | join(" ")' "$WORK/one/gpu_check.json")" "gpus"
}

@test "gpu_check.sh --budget: a command running at its end is stopped, later steps are skipped, the table is still written" {
  cd "$WORK"
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --smoke --only resume,infer --budget 1 --out "$WORK/b"
  assert_failure 1
  assert_line --regexp '^resume +fail +[0-9.]+ +a run failed'
  assert_line --regexp '^infer +skip +[0-9.]+ +not run: the --budget of 1s was spent before this step$'
  assert_equal "$(jq -r '[.steps[] | .step] | join(" ")' "$WORK/b/gpu_check.json")" "resume infer"
  # the first trainer run is stopped at the end of the budget; the two after it do not start
  [[ $stderr == *'stopped after 1s (the end of --budget 1s): '*'mgpu.train_clip'*'/straight'* ]]
  [[ $stderr == *'gpu_check: not run: the --budget of 1s is spent: '*'--stop-after 2'* ]]
  [[ $stderr == *'gpu_check: not run: the --budget of 1s is spent: '*'--resume auto'* ]]
  run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --smoke --budget 0
  assert_failure 2
  assert_equal "$stderr" "gpu_check: --budget '0': allowed: whole seconds from 1 to 999999"
  GPU_CHECK_LIMIT=5m run --separate-stderr bash "$ROOT/bench/gpu_check.sh" --smoke
  assert_failure 2
  assert_equal "$stderr" "gpu_check: GPU_CHECK_LIMIT='5m': allowed: whole seconds from 1 to 999999"
}
