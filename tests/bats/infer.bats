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

# caption_csv DIR N [ROW=text|missing|fifo]... — DIR/data.csv of N small JPEGs; the named rows (0-based) get a
# text file named .jpg, no file, or a named pipe (reading it blocks until someone writes: a shard stopped mid-way)
caption_csv() {
  "$PYTHON" - "$@" <<'PY'
import os, sys
from pathlib import Path
from PIL import Image
out, n = Path(sys.argv[1]), int(sys.argv[2])
bad = dict(a.split("=") for a in sys.argv[3:])
(out / "images").mkdir(parents=True, exist_ok=True)
rows = ["filepath,title"]
for i in range(n):
    path, kind = out / "images" / f"{i:02d}.jpg", bad.get(str(i))
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind != "missing":
        Image.new("RGB", (48, 40), (i * 9 % 256, 255 - i * 5 % 256, 90)).save(path)
    rows.append(f'images/{i:02d}.jpg,"picture number {i}"')
(out / "data.csv").write_text("\n".join(rows) + "\n")
PY
}

# descendants PID — every process below PID, each before its own children (pgrep -P: ours only)
descendants() {
  local pid
  for pid in $(pgrep -P "$1"); do
    echo "$pid"
    descendants "$pid"
  done
}

# wait_for_line FILE_GLOB REGEX SECONDS — until a file matching the glob has a line matching REGEX; fails
# loudly (with what the files hold) after SECONDS
wait_for_line() {
  local deadline=$((SECONDS + $3)) file
  while ((SECONDS < deadline)); do
    for file in $1; do
      [[ -f $file ]] && grep -qE -- "$2" "$file" && return 0
    done
    sleep 0.1
  done
  echo "timed out after $3 s waiting for /$2/ in $1:" >&2
  for file in $1; do [[ -f $file ]] && cat "$file" >&2; done
  return 1
}

@test "no GPU: --cpu-procs 3 shards, merges every row once, in order" {
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 3 --batch-size 4
  assert_success
  [[ $stderr =~ "memory plan: each process needs about "[0-9]+" MiB (weights "[0-9]+", activations "[0-9]+" at batch 4, CUDA context 500)" ]]
  assert_line --regexp "^merged 40 samples from 3 shard\(s\): image->text R@1 [0-9.]+"
  assert_equal "$(rows res/image_embeddings.npy) $(rows res/text_embeddings.npy)" "40 40"
  assert_equal "$(jq -r '[.shards[].samples] | map(tostring) | join(" ")' res/metrics.json)" "13 13 14"
}

@test "an open-file limit (ulimit -n) too low for the processes is refused before any shard runs, naming the option for fewer" {
  # shellcheck disable=SC2016  # the inner script's own $1 and $2
  run --separate-stderr bash -c 'ulimit -Sn 16 && exec bash "$1/infer_parallel.sh" --checkpoint "$2" --out res --cpu-procs 3' _ "$ROOT" "$CKPT/model.pt"
  assert_failure 2
  assert_regex "$stderr" '\[ERROR\] the open-file limit \(ulimit -n\) is 16, and 3 job slot\(s\) need [0-9]+ open files \(two a slot, [0-9]+ for the launcher\): raise it \(ulimit -n [0-9]+\) or run fewer slots \(--cpu-procs\)$'
  assert [ ! -e res/shards/.mgpu_done_0_of_3 ]
  assert [ ! -e res/logs ]
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
  caption_csv data 40 30=fifo # shard 1 of 2 (rows 20-39) stops at row 30 until killed
  bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 2 --batch-size 1 \
    --workers 0 --data data/data.csv >run1.log 2>&1 &
  local job=$! victim="" pid rc=0
  wait_for_line "res/logs/shard1_of_2_*.log" "^step 10/20 " 120 || { cat run1.log; false; }
  for pid in $(descendants "$job"); do # the process whose command line is shard 1's
    if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--shard 1/2 "; then victim=$pid && break; fi
  done
  [[ -n $victim ]] || { ps -o pid,ppid,args --forest >&2; false; }
  kill -KILL "$victim"
  wait "$job" || rc=$?
  assert_equal "$rc" 1
  run cat run1.log
  assert_line --partial "only the unfinished shards run again"
  rm data/images/30.jpg && cp data/images/29.jpg data/images/30.jpg
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 2 \
    --batch-size 1 --workers 0 --data data/data.csv --resume
  assert_success
  [[ $stderr == *"skipping shard0_of_2: done earlier with the same configuration (--resume)"* ]]
  [[ $stderr == *"started shard1_of_2"* && $stderr != *"started shard0_of_2"* ]]
  assert_equal "$(rows res/image_embeddings.npy)" 40
}

@test "unreadable rows: never another image's result, left out of the metrics, named; too many fail the merge" {
  caption_csv data 27 5=text 9=missing
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 2 \
    --batch-size 4 --data data/data.csv
  assert_failure 2
  [[ $stderr == *"2 of 27 rows have an image that cannot be read (7.4%), more than --max-bad-images 0.01: row 5 images/05.jpg (unreadable: UnidentifiedImageError), row 9 images/09.jpg (missing)"* ]]
  assert [ ! -e res/metrics.json ]
  local invalid
  invalid=$(awk -F, 'NR > 1 && $4 == 0' res/rows.csv | wc -l)
  assert_equal "$invalid" 2
  run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res --cpu-procs 2 \
    --batch-size 4 --data data/data.csv --max-bad-images 0.1 --resume
  assert_success
  [[ $stderr == *"skipping shard0_of_2"* && $stderr == *"skipping shard1_of_2"* ]] # only the merge ran again
  assert_line --regexp "^merged 27 samples from 2 shard\(s\) \(2 left out: image unreadable\): image->text R@1"
  assert_equal "$(jq -c '[.samples, .valid_samples, .bad_samples]' res/metrics.json)" "[27,25,2]"
  run "$PYTHON" -c 'import numpy as np, sys; e, v = np.load("res/image_embeddings.npy"), np.load("res/valid.npy")
print(e.shape[0], np.flatnonzero(~v).tolist(), np.isnan(e[~v]).all(), np.isfinite(e[v]).all())'
  assert_output "27 [5, 9] True True"
  assert_equal "$(sed -n 7p res/rows.csv)" "5,5,images/05.jpg,0,unreadable: UnidentifiedImageError"
}

@test "--workers, --amp and --max-bad-images reach mgpu.infer; bad values are named" {
  MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json run --separate-stderr bash "$ROOT/infer_parallel.sh" \
    --checkpoint "$CKPT/model.pt" --out res --workers 3 --amp bf16 --max-bad-images 0.2 --dry-run
  assert_success
  assert_line --regexp "^shard0_of_4 -> GPU 0: .* LOCAL_WORLD_SIZE=4 .* --shard 0/4 --batch-size 256 --workers 3 --amp bf16 ?$"
  assert_line --regexp "^then: .* --merge 4 --max-bad-images 0.2 ?$"
  local flag value message
  while IFS='|' read -r flag value message; do
    run --separate-stderr bash "$ROOT/infer_parallel.sh" --checkpoint "$CKPT/model.pt" --out res "$flag" "$value"
    assert_failure 2
    assert_equal "$stderr" "[ERROR] $message"
  done <<'CASES'
--workers|-1|--workers must be an integer of at least 0, got '-1'
--amp|fp8|--amp must be off or bf16, got 'fp8'
--max-bad-images|1.5|--max-bad-images must be a fraction from 0 to 1, got '1.5'
CASES
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
