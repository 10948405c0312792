#!/usr/bin/env bash
# How fast check_gpus.py, python -m mgpu.scenario and lib/gpu.sh answer: check_gpus.py must answer "well
# under a second" on a machine without a driver, and without importing torch; the scenario records CLI
# replaces a jq run in lib/gpu.sh, so its start-up is compared with the interpreter's own and with jq's.
# Prints median wall times; asserts nothing.
#   bash bench/check_gpus.sh [RUNS]
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
RUNS=${1:-11}
# shellcheck source=lib/log.sh
source "$ROOT/lib/log.sh"
# shellcheck source=lib/gpu.sh
source "$ROOT/lib/gpu.sh"
log::require_int RUNS "$RUNS" 1 1000 || exit 2

# median_ms COMMAND... — run RUNS times, print the median wall time in milliseconds.
median_ms() {
  local i start times=()
  for ((i = 0; i < RUNS; i++)); do
    start=${EPOCHREALTIME//[!0-9]/}
    "$@" >/dev/null 2>&1 || true
    times+=($(((${EPOCHREALTIME//[!0-9]/} - start) / 1000)))
  done
  printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((RUNS + 1) / 2))p"
}

scenario=$ROOT/examples/scenarios/8x-a100-80gb.json
quads=$ROOT/examples/scenarios/8x-h100-2-nvlink-quads.json
printf '%-62s %8s\n' "what (median of $RUNS runs)" "ms"
printf '%-62s %8s\n' "check_gpus.py, no driver on this machine (real NVML path)" \
  "$(median_ms env -u MGPU_FAKE_GPUS "$PYTHON" "$ROOT/check_gpus.py")"
printf '%-62s %8s\n' "check_gpus.py --json, 8-GPU scenario" \
  "$(median_ms env MGPU_FAKE_GPUS="$scenario" "$PYTHON" "$ROOT/check_gpus.py" --json)"
printf '%-62s %8s\n' "check_gpus.py --torch (imports torch)" \
  "$(median_ms env MGPU_FAKE_GPUS="$scenario" "$PYTHON" "$ROOT/check_gpus.py" --torch)"
printf '%-62s %8s\n' "python -m mgpu.scenario FILE, 8-GPU scenario (records)" \
  "$(PYTHONPATH=$ROOT/py median_ms "$PYTHON" -m mgpu.scenario "$scenario")"
printf '%-62s %8s\n' "python -m mgpu.scenario FILE, 8 GPUs + topology (28 links)" \
  "$(PYTHONPATH=$ROOT/py median_ms "$PYTHON" -m mgpu.scenario "$quads")"
printf '%-62s %8s\n' "python -m mgpu.scenario --machine, no driver on this machine" \
  "$(PYTHONPATH=$ROOT/py median_ms env -u MGPU_FAKE_GPUS "$PYTHON" -m mgpu.scenario --machine)"
printf '%-62s %8s\n' "python -c pass (the interpreter alone)" "$(median_ms "$PYTHON" -c pass)"
printf '%-62s %8s\n' "gpu::query, 8-GPU scenario (jq)" "$(MGPU_FAKE_GPUS=$scenario median_ms gpu::query)"
printf '%-62s %8s\n' "gpu::query, fake nvidia-smi on PATH" \
  "$(NVIDIA_SMI=$ROOT/tests/fakes/nvidia-smi MGPU_FAKE_SMI_SCENARIO=$scenario median_ms gpu::query)"
printf '%-62s %8s\n' "gpu::is_free, 1 sample (MGPU_UTIL_SAMPLES=1)" \
  "$(MGPU_FAKE_GPUS=$scenario MGPU_UTIL_SAMPLES=1 median_ms gpu::is_free 0)"
