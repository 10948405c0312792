#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154  # each @test is its own subshell: its exports are meant to stay there; $stderr comes from bats' run
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

@test "python -m mgpu.scenario: records a shell reads with IFS=, (the names and the path hold spaces)" {
  cp "$SCENARIOS/8x-h100-2-nvlink-quads.json" "$WORK/two quads.json"
  PYTHONPATH=$ROOT/py run --separate-stderr "$PYTHON" -m mgpu.scenario "$WORK/two quads.json"
  assert_success
  assert_equal "$stderr" ""
  local kind c e name gpus=0 nv=0 sys=0
  while IFS=, read -r kind _ _ c _ e _ name; do
    case $kind in
      gpu) gpus=$((gpus + 1)); assert_equal "$name" "NVIDIA H100 80GB HBM3"; assert_equal "$e" 81559 ;;
      link) [[ $c == NV6 ]] && nv=$((nv + 1)); [[ $c == SYS ]] && sys=$((sys + 1)) ;;
      *) fail "unexpected record: $kind" ;;
    esac
  done <<<"$output"
  assert_equal "$gpus $nv $sys" "8 12 16"
}

@test "python -m mgpu.scenario: a faulty scenario is one stderr line and exit 2, nothing on stdout" {
  PYTHONPATH=$ROOT/py run --separate-stderr "$PYTHON" -m mgpu.scenario "$ROOT/tests/fixtures/bad-scenarios/uuid-comma.json"
  assert_failure 2
  assert_equal "$output" ""
  assert_equal "$stderr" '.gpus[0].uuid: must not hold a comma (mgpu'"'"'s GPU records are comma-separated), got "GPU-aaaa,1"'
}

@test "python -m mgpu.scenario --machine: the fake nvidia-smi's GPUs, MIG instances and processes" {
  mkdir "$WORK/no-nvml"
  echo "raise ImportError('nvidia-ml-py is not installed here')" >"$WORK/no-nvml/pynvml.py"
  PYTHONPATH="$WORK/no-nvml:$ROOT/py" NVIDIA_SMI=$ROOT/tests/fakes/nvidia-smi \
    MGPU_FAKE_SMI_SCENARIO=$SCENARIOS/2x-a100-40gb-mig.json run --separate-stderr "$PYTHON" -m mgpu.scenario --machine
  assert_success
  assert_line --index 0 --regexp '^gpu,0,GPU-a1400a7e-[^,]+,NA,9037,40960,00000000:07:00.0,NVIDIA A100-SXM4-40GB$'
  assert_line --index 3 "mig,0,MIG-5c1e0a7e-9b1d-5f6a-8c2e-0d8b7a6f1003,NA,NA,1g.5gb" # nvidia-smi -L has no memory
  assert_line --index 4 "proc,0,5151,8998,NA"
  assert_equal "${#lines[@]}" 6
}
