#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031  # each @test is its own subshell: its exports are meant to stay there
# check_gpus.py from the shell, as the README shows it.

load test_helper

setup() { common_setup; }

@test "the busy server with CUDA_VISIBLE_DEVICES=2,3: what the user needs to know, exit 1" {
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json CUDA_VISIBLE_DEVICES=2,3 run "$PYTHON" "$ROOT/check_gpus.py"
  assert_failure 1
  assert_line --partial "PyTorch will see 2 GPU(s): cuda:0 = GPU 2, cuda:1 = GPU 3"
  assert_line --partial "gpu_busy: GPU 2 (cuda:0) is 95% busy"
  assert_output --partial "pid 4242 python (user alice, 19.8 GiB)"
  assert_output --partial "try CUDA_VISIBLE_DEVICES=0,3"
}

@test "--json is data on stdout that jq can read; the scenario path may hold spaces" {
  cp "$SCENARIOS/8x-a100-80gb.json" "$WORK/a100 server.json"
  MGPU_FAKE_GPUS="$WORK/a100 server.json" CUDA_VISIBLE_DEVICES=7,6 run --separate-stderr "$PYTHON" "$ROOT/check_gpus.py" --json --plan 30
  assert_success
  run jq -r '([.gpus[] | select(.cuda_index != null) | "\(.index)=cuda:\(.cuda_index)"] | join(" ")), .plan.replicas' <<<"$output"
  assert_line --index 0 "6=cuda:1 7=cuda:0"
  assert_line --index 1 4
}

@test "a usage error exits 2 and names the value" {
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json run "$PYTHON" "$ROOT/check_gpus.py" --max-util=-5
  assert_failure 2
  assert_output --partial "MAX_UTIL must be an integer from 0 to 100, got '-5'"
}

@test "works from any directory, through a symlink" {
  ln -s "$ROOT/check_gpus.py" "$WORK/check_gpus.py"
  cd "$WORK"
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json run "$PYTHON" check_gpus.py
  assert_success
  assert_output --partial "No problems found."
}
