#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031  # each @test is its own subshell: its exports are meant to stay there
# lib/gpu.sh against scenarios and against the fake nvidia-smi.

load test_helper

setup() {
  common_setup
  FAKE_SMI=$ROOT/tests/fakes/nvidia-smi
}

@test "scenario: gpu::query prints one normalized line per GPU, in index order" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json
  gpu_sh gpu::query
  assert_success
  assert_equal "${#lines[@]}" 4
  assert_line --index 0 "0,GPU-5c1e0a7e-3b1d-4f6a-9c2e-0d8b7a6f0000,0,312,24564"
  assert_line --index 2 "2,GPU-5c1e2a7e-3b1d-4f6a-9c2e-0d8b7a6f0002,95,20582,24564"
  gpu_sh gpu::backend
  assert_output scenario
}

@test "scenario: a parsed scenario is cached by its text; the validator runs again only when the text changes" {
  export MGPU_FAKE_GPUS MGPU_CACHE_DIR=$WORK/cache CALLS=$WORK/validator-calls
  MGPU_FAKE_GPUS=$(scenario_copy 4x-rtx4090-idle)
  # a Python that counts its runs, then runs the real one (the scenario validator is python -m mgpu.scenario)
  mkdir -p "$WORK/bin"
  # shellcheck disable=SC2016  # the wrapper expands these itself
  printf '#!/usr/bin/env bash\necho run >>"$CALLS"\nexec %q "$@"\n' "$PYTHON" >"$WORK/bin/python"
  chmod +x "$WORK/bin/python"
  export PYTHON=$WORK/bin/python
  gpu_sh gpu::query
  assert_line --index 3 --partial ",0,312,24564"
  gpu_sh gpu::query
  assert_line --index 3 --partial ",0,312,24564"
  assert_equal "$(wc -l <"$CALLS")" 1
  assert [ "$(stat -c %a "$MGPU_CACHE_DIR")" = 700 ]
  set_util "$MGPU_FAKE_GPUS" 3 88
  : >"$CALLS"
  gpu_sh gpu::query
  assert_line --index 3 --partial ",88,312,24564"
  assert_equal "$(wc -l <"$CALLS")" 1
  # a cache file that lies about the text is never believed; a broken scenario is never cached
  printf '%s\0%s\0' "not this scenario" "gpu,0,GPU-x,0,1,2,NA,x" >"$(echo "$MGPU_CACHE_DIR"/records*)"
  gpu_sh gpu::query
  assert_line --index 3 --partial ",88,312,24564"
  echo '{"gpus": 3}' >"$MGPU_FAKE_GPUS"
  gpu_sh gpu::query
  assert_failure
  gpu_sh gpu::query
  assert_failure
  assert_output --partial ".gpus: must be a list of GPUs"
}

@test "scenario: a null utilization reads as NA" {
  export MGPU_FAKE_GPUS
  MGPU_FAKE_GPUS=$(scenario_copy 4x-rtx4090-idle)
  jq '.gpus[1].utilization_gpu = null' "$MGPU_FAKE_GPUS" >"$WORK/na.json"
  MGPU_FAKE_GPUS=$WORK/na.json
  gpu_sh gpu::query
  assert_success
  assert_line --index 1 --regexp '^1,GPU-[^,]+,NA,312,24564$'
}

@test "scenario: the file is re-read at every query" {
  export MGPU_FAKE_GPUS
  MGPU_FAKE_GPUS=$(scenario_copy 4x-rtx4090-idle)
  gpu_sh gpu::query
  assert_line --index 3 --partial ",0,312,24564"
  set_util "$MGPU_FAKE_GPUS" 3 88
  gpu_sh gpu::query
  assert_line --index 3 --partial ",88,312,24564"
}

@test "scenario: every malformed file is an error naming the file and the JSON path" {
  local file fragment checked=0
  while IFS=$'\t' read -r file fragment; do
    [[ $file == \#* ]] && continue
    MGPU_FAKE_GPUS=$ROOT/tests/fixtures/bad-scenarios/$file gpu_sh gpu::query
    assert_failure
    assert_output --partial "MGPU_FAKE_GPUS: $ROOT/tests/fixtures/bad-scenarios/$file: "
    assert_output --partial "$fragment"
    checked=$((checked + 1))
  done <"$ROOT/tests/fixtures/bad-scenarios/expected.tsv"
  assert_equal "$checked" 30
}

@test "scenario: a missing file is an error, not CPU mode" {
  MGPU_FAKE_GPUS="$WORK/no such.json" gpu_sh gpu::query
  assert_failure
  assert_output --partial "$WORK/no such.json: cannot read the scenario file"
}

@test "nvidia-smi: the fake is called with the one CSV query and its output is normalized" {
  export NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_SCENARIO=$SCENARIOS/8x-a100-80gb.json MGPU_FAKE_SMI_LOG=$WORK/smi.log
  gpu_sh gpu::query
  assert_success
  assert_equal "${#lines[@]}" 8
  assert_line --index 7 --regexp '^7,GPU-a1007a7e-[^,]+,0,4,81920$'
  run cat "$WORK/smi.log"
  assert_output "--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits"
}

@test "nvidia-smi: found first on PATH when NVIDIA_SMI is unset" {
  mkdir -p "$WORK/bin"
  ln -s "$FAKE_SMI" "$WORK/bin/nvidia-smi"
  PATH="$WORK/bin:$PATH" MGPU_FAKE_SMI_SCENARIO=$SCENARIOS/4x-rtx4090-idle.json gpu_sh gpu::indices
  assert_success
  assert_output "0 1 2 3"
}

@test "nvidia-smi: a hang is stopped at MGPU_SMI_TIMEOUT and said clearly, with what it started" {
  export NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_HANG=1 MGPU_SMI_TIMEOUT=1 MGPU_FAKE_SMI_PIDS=$WORK/smi.pids
  local start=$SECONDS pid
  gpu_sh gpu::query
  assert_failure
  assert_output --partial "did not answer within 1s and was stopped"
  assert [ $((SECONDS - start)) -lt 5 ]
  pid=$(cat "$WORK/smi.pids")
  gone() { [[ ! -e /proc/$pid || $(cut -d' ' -f3 "/proc/$pid/stat") == Z ]]; } # (an orphan's zombie may stay)
  wait_for 10 "the hanging nvidia-smi's child to be stopped" gone
}

@test "nvidia-smi: a failing driver is an error that quotes nvidia-smi" {
  NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_FAIL="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." \
    gpu_sh gpu::query
  assert_failure
  assert_output --partial "failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate"
}

@test "nvidia-smi: malformed CSV is an error that shows the line" {
  mkdir -p "$WORK/seq"
  printf '0, GPU-a, 3, 100, 200\n1, GPU-b, lots, 100, 200\n' >"$WORK/seq/1.csv"
  NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_SEQ_DIR=$WORK/seq gpu_sh gpu::query
  assert_failure
  assert_output --partial "printed a line mgpu cannot read: '1, GPU-b, lots, 100, 200'"
}

@test "nvidia-smi: [N/A] utilization (MIG, some GPUs) reads as NA and never counts as busy" {
  mkdir -p "$WORK/seq"
  printf '0, MIG-GPU-a, [N/A], 100, 20000\n' >"$WORK/seq/1.csv"
  NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_SEQ_DIR=$WORK/seq gpu_sh gpu::query
  assert_success
  assert_output "0,MIG-GPU-a,NA,100,20000"
  NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_SEQ_DIR=$WORK/seq MAX_UTIL=0 gpu_sh gpu::is_free 0
  assert_success
}

@test "nvidia-smi: any bracketed value is NA ([Not Supported] on GeForce, [N/A] memory on unified-memory GB10)" {
  mkdir -p "$WORK/seq"
  printf '0, GPU-a, [Not Supported], 100, 20000\n1, GPU-b, 3, [N/A], [N/A]\n2, GPU-c, [Unknown Error], [Not Supported], 8000\n' >"$WORK/seq/1.csv"
  export NVIDIA_SMI=$FAKE_SMI MGPU_FAKE_SMI_SEQ_DIR=$WORK/seq
  gpu_sh gpu::query
  assert_success
  assert_output $'0,GPU-a,NA,100,20000\n1,GPU-b,3,NA,NA\n2,GPU-c,NA,NA,8000'
  # free by utilization; a memory need cannot be checked without the memory figures, so it is not met
  run bash -c 'source "$1/lib/gpu.sh"; core::defaults
    gpu::is_free 1; echo "1:$?:$GPU_REASON"; gpu::is_free 1 500; echo "1need:$?:$GPU_REASON"
    gpu::is_free 0 500; echo "0need:$?:$GPU_REASON"' _ "$ROOT"
  assert_line "1:0:"
  assert_line "1need:1:its memory use is not reported (the driver says N/A), so 500 MiB free cannot be checked"
  assert_line "0need:0:"
}

@test "NVIDIA_SMI naming no program is an error naming it, not CPU mode" {
  NVIDIA_SMI=/nonexistent/nvidia-smi gpu_sh gpu::backend
  assert_failure 2
  assert_output "[ERROR] NVIDIA_SMI=/nonexistent/nvidia-smi: no such program (unset it to use nvidia-smi from PATH, or NVIDIA_SMI=none for no GPU)"
  NVIDIA_SMI=/nonexistent/nvidia-smi gpu_sh gpu::query
  assert_failure
}

@test "CPU mode: no scenario and no nvidia-smi (NVIDIA_SMI=none) is reported as such, not an error" {
  export NVIDIA_SMI=none
  gpu_sh gpu::backend
  assert_output cpu
  gpu_sh gpu::query
  assert_success
  assert_output ""
  gpu_sh gpu::exists 0
  assert_failure 1
}

@test "gpu::exists: by index and by UUID; a missing GPU is 1, a broken query 2" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json
  gpu_sh gpu::exists 3
  assert_success
  gpu_sh gpu::exists GPU-5c1e1a7e-3b1d-4f6a-9c2e-0d8b7a6f0001
  assert_success
  gpu_sh gpu::exists 5
  assert_failure 1
  MGPU_FAKE_GPUS=$ROOT/tests/fixtures/bad-scenarios/truncated.json gpu_sh gpu::exists 0
  assert_failure 2
}

@test "gpu::is_free: busy by utilization, busy by memory, free, and no such GPU" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json MGPU_UTIL_SAMPLES=2
  run bash -c 'source "$1/lib/gpu.sh"; core::defaults
    gpu::is_free 2; echo "2:$?:$GPU_REASON"
    gpu::is_free 3 30000; echo "3big:$?:$GPU_REASON"
    gpu::is_free 3 20000; echo "3:$?:$GPU_REASON"
    MAX_UTIL=96 gpu::is_free 2; echo "2lenient:$?:$GPU_REASON"
    gpu::is_free 9; echo "9:$?:$GPU_REASON"' _ "$ROOT"
  assert_line "2:1:utilization 95% (1 sample) > MAX_UTIL 70%"
  assert_line "3big:1:24252 MiB free < 30000 MiB needed"
  assert_line "3:0:"
  assert_line "2lenient:0:"
  assert_line "9:2:GPU 9 does not exist"
}

@test "gpu::is_free: a reading near MAX_UTIL takes every sample, and the median decides" {
  mkdir -p "$WORK/spike" "$WORK/busy"
  local i
  for i in 1 2 3 4 5; do printf '0, GPU-a, 10, 100, 20000\n' >"$WORK/spike/$i.csv"; done
  printf '0, GPU-a, 60, 100, 20000\n' >"$WORK/spike/1.csv" # near 70: sample on; the others are idle
  printf '0, GPU-a, 100, 100, 20000\n' >"$WORK/spike/3.csv"
  for i in 1 2 3 4 5; do printf '0, GPU-a, 90, 100, 20000\n' >"$WORK/busy/$i.csv"; done
  printf '0, GPU-a, 75, 100, 20000\n' >"$WORK/busy/1.csv"
  printf '0, GPU-a, 0, 100, 20000\n' >"$WORK/busy/4.csv"
  export NVIDIA_SMI=$FAKE_SMI MGPU_UTIL_SAMPLES=5
  MGPU_FAKE_SMI_SEQ_DIR=$WORK/spike gpu_sh gpu::is_free 0
  assert_success
  assert_equal "$(cat "$WORK/spike/.calls")" 5
  MGPU_FAKE_SMI_SEQ_DIR=$WORK/busy gpu_sh gpu::is_free 0
  assert_failure 1
  assert_equal "$(cat "$WORK/busy/.calls")" 5
}

@test "gpu::is_free: one reading decides when a GPU is clearly idle or clearly busy (no sampling window)" {
  mkdir -p "$WORK/idle" "$WORK/busy"
  printf '0, GPU-a, 3, 100, 20000\n1, GPU-b, 40, 100, 20000\n' >"$WORK/idle/1.csv"
  printf '0, GPU-a, 97, 100, 20000\n1, GPU-b, 95, 100, 20000\n' >"$WORK/busy/1.csv"
  export NVIDIA_SMI=$FAKE_SMI MGPU_UTIL_SAMPLES=5 MGPU_UTIL_WINDOW_MS=5000
  MGPU_FAKE_SMI_SEQ_DIR=$WORK/idle gpu_sh gpu::is_free 0
  assert_success
  MGPU_FAKE_SMI_SEQ_DIR=$WORK/busy run bash -c 'source "$1/lib/gpu.sh"; core::defaults; gpu::is_free 1; echo "$?:$GPU_REASON"' _ "$ROOT"
  assert_output "1:utilization 95% (1 sample) > MAX_UTIL 70%"
  assert_equal "$(cat "$WORK/idle/.calls") $(cat "$WORK/busy/.calls")" "1 1"
}

@test "gpu::is_free: samples are spread over MGPU_UTIL_WINDOW_MS" {
  export MGPU_FAKE_GPUS MGPU_UTIL_SAMPLES=3 MGPU_UTIL_WINDOW_MS=600
  MGPU_FAKE_GPUS=$(scenario_copy 4x-rtx4090-idle)
  set_util "$MGPU_FAKE_GPUS" 0 60 # near MAX_UTIL 70: one reading is not enough
  local start=${EPOCHREALTIME/./}
  gpu_sh gpu::is_free 0
  assert_success
  local took_ms=$(((${EPOCHREALTIME/./} - start) / 1000))
  assert [ "$took_ms" -ge 600 ]
}

@test "gpu::wait_free: waits while busy and returns once the scenario frees the GPU" {
  export MGPU_FAKE_GPUS MAX_WAIT=20 MGPU_UTIL_SAMPLES=1
  MGPU_FAKE_GPUS=$(scenario_copy 4x-rtx4090-gpu2-busy)
  (sleep 1 && set_util "$MGPU_FAKE_GPUS" 2 10) &
  run bash -c 'source "$1/lib/gpu.sh"; core::defaults; gpu::wait_free 2; echo "rc=$? waited=$GPU_WAITED_S"' _ "$ROOT"
  wait
  assert_line --partial "[INFO] GPU 2 is busy (utilization 95%"
  assert_line --regexp '^rc=0 waited=[1-4]$'
}

@test "gpu::wait_free: gives up after MAX_WAIT with the reason" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json MAX_WAIT=1 MGPU_UTIL_SAMPLES=1
  run bash -c 'source "$1/lib/gpu.sh"; core::defaults; gpu::wait_free 2; echo "rc=$? waited=$GPU_WAITED_S"' _ "$ROOT"
  assert_line "[WARN] GPU 2 still busy after waiting 1s (MAX_WAIT): utilization 95% (1 sample) > MAX_UTIL 70%"
  assert_line "rc=1 waited=1"
}

@test "settings are validated with the name, the value and what is allowed" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json
  MAX_UTIL=150 gpu_sh gpu::is_free 0
  assert_failure 2
  assert_output "[ERROR] MAX_UTIL must be an integer from 0 to 100, got '150'"
  MAX_WAIT=soon gpu_sh gpu::wait_free 0
  assert_failure 2
  assert_output "[ERROR] MAX_WAIT must be an integer of at least 0, got 'soon'"
  MGPU_UTIL_SAMPLES=0 gpu_sh gpu::sample
  assert_failure
  assert_output --partial "MGPU_UTIL_SAMPLES must be an integer from 1 to 100, got '0'"
}
