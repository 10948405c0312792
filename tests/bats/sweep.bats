#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154,SC2016,SC2012  # bats: subshell tests, $stderr from run; '$VAR' in job text is meant literally
# run_train_clip.sh and gpu_queue.sh with scenario GPUs and a fake trainer that records what it did.

load test_helper

setup() {
  common_setup
  cd "$WORK" || return 1
  export MGPU_LOCK_DIR="$WORK/locks" FAKE_TRAIN_RECORD="$WORK/record.tsv" MGPU_RETRY_BACKOFF_MS=100
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json MGPU_UTIL_SAMPLES=1 MGPU_TICK_MS=50
  TRAIN=(--train-cmd "$ROOT/tests/fakes/fake-trainer")
}

sweep() { run --separate-stderr bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" "$@"; }
summary() { jq -r "$1" logs/clip_training/summary_*.json; }
# gpus_of NAME — the GPUs a config started on, in order
gpus_of() { awk -F'\t' -v n="$1" '$1 == n && $2 == "start" { print $3 }' "$FAKE_TRAIN_RECORD"; }
# max_overlap [GPU] — the most jobs running at once (on GPU, when given), from the record
max_overlap() {
  awk -F'\t' -v g="${1:-}" 'g == "" || $3 == g { print $4, ($2 == "start" ? 1 : -1) }' "$FAKE_TRAIN_RECORD" |
    sort -k1,1n -k2,2n | awk '{ n += $2; if (n > m) m = n } END { print m + 0 }'
}

@test "seed example 2: four configs on four GPUs run in parallel, one log and one output each" {
  FAKE_TRAIN_SLEEP=1 sweep --gpus 0,1,2,3 --image-encoders starnet_s1,starnet_s2,starnet_s3,starnet_s4 --text-encoders clip:ViT-B/32
  assert_success
  assert_equal "$(summary '.succeeded')" 4
  assert_equal "$(cut -f1,2,3 "$FAKE_TRAIN_RECORD" | awk '$2 == "start" { print $3 }' | sort | tr '\n' ' ')" "0 1 2 3 "
  assert_equal "$(max_overlap)" 4
  run ls logs/clip_training
  assert_line --regexp '^starnet_s1_clip_ViT-B_32_gpu[0-3]_[0-9]{8}_[0-9]{6}\.log$'
  assert [ -f checkpoints/clip_models/starnet_s4_clip_ViT-B_32/metrics.json ]
  assert [ -f checkpoints/clip_models/starnet_s4_clip_ViT-B_32/.mgpu_done ]
  assert_equal "$(summary '.configs[0] | [.name, .image_encoder, .text_encoder, .status, .exit_code] | @tsv')" \
    "$(printf 'starnet_s1_clip_ViT-B_32\tstarnet_s1\tclip:ViT-B/32\tsucceeded\t0')"
  assert_equal "$(summary '.configs[0].metrics.val_r1')" 0.5
  run cat logs/clip_training/summary_*.tsv
  assert_line --index 0 $'config\tgpu\tstatus\texit_code\tfailure\tretries\tseconds\twaited_seconds\tgpu_seconds\tpeak_mem_mib\tmetric_name\tmetric_value\tlog\tdetail\tcause\tcommand'
  assert_line --index 1 --regexp $'^starnet_s1_clip_ViT-B_32\t0\tsucceeded\t0\t\t0\t[0-9.]+\t0\t[0-9.]+\t\tval_r1\t0.5\tlogs/clip_training/starnet_s1_clip_ViT-B_32_gpu0_[0-9_]+\.log\t\t\t$'
}

@test "seed example 1: one GPU (GPU 5 of eight) runs the configs one after another" {
  export MGPU_FAKE_GPUS=$SCENARIOS/8x-a100-80gb.json
  GPUS=5 sweep --image-encoders starnet_s1,starnet_s2 --text-encoders clip:ViT-B/32
  assert_success
  assert_equal "$(gpus_of starnet_s1_clip_ViT-B_32) $(gpus_of starnet_s2_clip_ViT-B_32)" "5 5"
  assert_equal "$(max_overlap)" 1
}

@test "seed example 3: a config file's keys become flags; -- arguments reach every run" {
  cat >"$WORK/train_clip_config.json" <<'JSON'
{"defaults": {"batch_size": 64, "fp16": true, "tensorboard": false},
 "configs": [{"name": "small", "image_encoder": "starnet_s050", "text_encoder": "clip:tiny", "lr": 0.001},
             {"image_encoder": "starnet_s1", "text_encoder": "bert-base-chinese", "batch_size": 32}]}
JSON
  GPUS="0 1" CONFIG_FILE="$WORK/train_clip_config.json" sweep -- --epochs 2
  assert_success
  run cut -f1,2,7 "$FAKE_TRAIN_RECORD"
  assert_line "small	start	--image-encoder starnet_s050 --text-encoder clip:tiny --output-dir checkpoints/clip_models/small --batch-size 64 --fp16 --lr 0.001 --epochs 2"
  assert_line "starnet_s1_bert-base-chinese	start	--image-encoder starnet_s1 --text-encoder bert-base-chinese --output-dir checkpoints/clip_models/starnet_s1_bert-base-chinese --batch-size 32 --fp16 --epochs 2"
}

@test "an unavailable GPU is reported and skipped; none available is an error" {
  sweep --gpus 0,5 --image-encoders starnet_s1 --text-encoders clip:ViT-B/32
  assert_success
  assert_equal "$(grep -c -F '[ERROR] GPU 5 is not available (this machine has GPUs 0-3); skipping it' <<<"$stderr")" 1
  assert_equal "$(gpus_of starnet_s1_clip_ViT-B_32)" 0
  sweep --gpus 7,9 --image-encoders starnet_s1 --text-encoders clip:ViT-B/32
  assert_failure 2
  assert_equal "$(tail -n 1 <<<"$stderr")" "[ERROR] none of the GPUs in GPUS (7 9) is available; this machine has GPUs 0-3"
}

@test "a busy GPU is waited for, then used once the scenario frees it; the wait is in the summary" {
  export MGPU_FAKE_GPUS
  MGPU_FAKE_GPUS=$(scenario_copy 4x-rtx4090-gpu2-busy)
  bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 2 --max-wait 30 --image-encoders starnet_s1 \
    --text-encoders clip:ViT-B/32 >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  waits() { grep -q "starnet_s1_clip_ViT-B_32 waits: GPU 2 is busy: utilization 95% (1 sample) > MAX_UTIL 70%; waited 0s of up to 30s (MAX_WAIT)" "$WORK/err"; }
  wait_for 30 "the job to wait for GPU 2" waits
  sleep 1.2 # a wait of more than a second, to be recorded as such
  set_util "$MGPU_FAKE_GPUS" 2 5
  wait "$launcher" || rc=$?
  assert_equal "$rc" 0
  assert_equal "$(gpus_of starnet_s1_clip_ViT-B_32)" 2
  run summary '.configs[0] | "\(.waited_seconds) \(.reason)"'
  assert_output --regexp '^([1-9]) waited \1s: GPU 2 is busy: utilization 95%'
}

@test "MAX_WAIT expiry: --on-timeout run starts anyway, skip skips, fail fails" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json
  sweep --gpus 2 --max-wait 1 --image-encoders starnet_s1 --text-encoders clip:ViT-B/32
  assert_success
  assert_equal "$(summary '.configs[0] | "\(.status) \(.waited_seconds)"')" "succeeded 1"
  rm -rf logs "$FAKE_TRAIN_RECORD"
  sweep --gpus 2 --max-wait 1 --on-timeout skip --image-encoders starnet_s1 --text-encoders clip:ViT-B/32
  assert_failure 1
  assert_equal "$(summary '.configs[0].status')" skipped
  assert [ ! -e "$FAKE_TRAIN_RECORD" ]
  rm -rf logs
  sweep --gpus 2 --max-wait 1 --on-timeout fail --image-encoders starnet_s1 --text-encoders clip:ViT-B/32
  assert_failure 1
  assert_equal "$(summary '.configs[0] | "\(.status) \(.reason)"')" "failed gave up after 1s (MAX_WAIT): GPU 2 is busy: utilization 95% (1 sample) > MAX_UTIL 70%"
}

@test "one config failing never stops the others; its log tail is shown; exit 1" {
  FAKE_TRAIN_FAIL=starnet_s2_clip_ViT-B_32 sweep --gpus 0,1 --image-encoders starnet_s1,starnet_s2,starnet_s3 --text-encoders clip:ViT-B/32
  assert_failure 1
  assert_equal "$(summary '"\(.succeeded) \(.failed)"')" "2 1"
  assert_equal "$(summary '.configs[1] | "\(.status) \(.exit_code) \(.failure)"')" "failed 7 error"
  [[ $stderr == *"    | RuntimeError: configured to fail"* ]]
  # the table on stdout: each column as wide as its widest cell, two spaces between columns
  assert_line --index 0 --regexp '^config {20}gpu  status     exit       retries  seconds  waited  peak  metric {6}log$'
  assert_line --regexp '^starnet_s2_clip_ViT-B_32  [01]    failed     7 \(error\)  0        [0-9]+\.[0-9]      0       - +logs/clip_training/starnet_s2_'
}

@test "--retries: an out-of-memory failure is retried on another GPU" {
  FAKE_TRAIN_OOM_ON_GPU=0 sweep --gpus 0,1 --retries 2 --image-encoders starnet_s1 --text-encoders clip:ViT-B/32
  assert_success
  assert_equal "$(gpus_of starnet_s1_clip_ViT-B_32 | tr '\n' ' ')" "0 1 "
  assert_equal "$(summary '.configs[0] | "\(.status) \(.retries) \(.gpu) \(.failed_attempts)"')" 'succeeded 1 1 ["oom on GPU 0"]'
  [[ $stderr == *"retrying starnet_s1_clip_ViT-B_32 (oom, exit 1 on GPU 0; retry 1 of 2, preferring another GPU)"* ]]
}

@test "--resume runs only what did not finish, and re-runs a config whose arguments changed" {
  FAKE_TRAIN_FAIL=starnet_s2_clip_ViT-B_32 sweep --gpus 0,1 --image-encoders starnet_s1,starnet_s2 --text-encoders clip:ViT-B/32
  assert_failure 1
  rm -rf logs "$FAKE_TRAIN_RECORD"
  sweep --resume --gpus 0,1 --image-encoders starnet_s1,starnet_s2 --text-encoders clip:ViT-B/32
  assert_success
  assert_equal "$(cut -f1,2 "$FAKE_TRAIN_RECORD" | grep start)" "starnet_s2_clip_ViT-B_32	start"
  assert_equal "$(summary '[.configs[] | "\(.name)=\(.status)"] | join(" ")')" \
    "starnet_s1_clip_ViT-B_32=skipped starnet_s2_clip_ViT-B_32=succeeded"
  rm -rf logs "$FAKE_TRAIN_RECORD"
  sweep --resume --gpus 0,1 --image-encoders starnet_s1,starnet_s2 --text-encoders clip:ViT-B/32 -- --epochs 9
  assert_success
  assert_equal "$(grep -c start "$FAKE_TRAIN_RECORD")" 2
}

@test "JOBS_PER_GPU=2 runs two jobs at a time on one GPU, never three" {
  FAKE_TRAIN_SLEEP=1 JOBS_PER_GPU=2 sweep --gpus 1 --image-encoders a,b,c,d --text-encoders t
  assert_success
  assert_equal "$(max_overlap 1)" 2
}

@test "two launchers on the same two GPUs never put two jobs on one GPU" {
  printf 'FAKE_TRAIN_SLEEP=0.4 MGPU_CONFIG_NAME=%s %s\n' a1 "$ROOT/tests/fakes/fake-trainer" a2 "$ROOT/tests/fakes/fake-trainer" \
    a3 "$ROOT/tests/fakes/fake-trainer" a4 "$ROOT/tests/fakes/fake-trainer" >"$WORK/a.txt"
  sed 's/MGPU_CONFIG_NAME=a/MGPU_CONFIG_NAME=b/' "$WORK/a.txt" >"$WORK/b.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0,1 --log-dir "$WORK/la" "$WORK/a.txt" 2>/dev/null >/dev/null &
  bash "$ROOT/gpu_queue.sh" --gpus 0,1 --log-dir "$WORK/lb" "$WORK/b.txt" 2>/dev/null >/dev/null &
  wait
  assert_equal "$(grep -c start "$FAKE_TRAIN_RECORD")" 8
  assert_equal "$(max_overlap 0)" 1
  assert_equal "$(max_overlap 1)" 1
}

@test "Ctrl-C: no new job starts, running jobs get TERM, the summary says interrupted, exit 130, no process left" {
  FAKE_TRAIN_SLEEP=60 env --default-signal=INT bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0,1 --grace 2 \
    --image-encoders s1,s2,s3 --text-encoders t >"$WORK/out" 2>"$WORK/err" &
  local launcher=$!
  started() { [[ $(count_lines start "$FAKE_TRAIN_RECORD") == 2 ]]; }
  wait_for 20 "two jobs started" started
  kill -INT "$launcher"
  local rc=0
  wait "$launcher" || rc=$?
  assert_equal "$rc" 130
  assert_equal "$(summary '[.configs[] | .status + "/" + (.detail // .reason)] | join(" ")')" \
    "interrupted/stopped within the grace period (exit 143) interrupted/stopped within the grace period (exit 143) interrupted/never started"
  assert_equal "$(grep -c start "$FAKE_TRAIN_RECORD")" 2
  local pid
  while read -r pid; do
    run live_in_group "$pid"
    assert_output 0
  done < <(cut -f5 "$FAKE_TRAIN_RECORD")
}

@test "SIGTERM stops everything too and exits 143" {
  FAKE_TRAIN_SLEEP=60 bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0 --grace 1 --image-encoders s1 --text-encoders t \
    >/dev/null 2>&1 &
  local launcher=$! rc=0
  wait_for 20 "the job to start" test -s "$FAKE_TRAIN_RECORD"
  kill -TERM "$launcher"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 143
  run live_in_group "$(cut -f5 "$FAKE_TRAIN_RECORD")"
  assert_output 0
}

@test "names with spaces, quotes, \$(...) and ../ are made safe and never run" {
  cat >"$WORK/evil.json" <<'JSON'
{"configs": [{"name": "../../escape", "image_encoder": "a", "text_encoder": "b"},
             {"name": "it's $(touch pwned) `touch pwned2`", "image_encoder": "a b", "text_encoder": "c;d"}]}
JSON
  sweep --gpus 0,1 --config-file "$WORK/evil.json"
  assert_success
  assert [ ! -e pwned ]
  assert [ ! -e pwned2 ]
  assert_equal "$(ls checkpoints/clip_models | sort | tr '\n' ' ')" '_._.._escape it_s___touch_pwned___touch_pwned2_ '
  run cut -f7 "$FAKE_TRAIN_RECORD"
  assert_line --partial "--image-encoder a b --text-encoder c;d"
}

@test "duplicate names and malformed config files are errors naming the file and the JSON path" {
  echo '{"configs": [{"name": "x", "image_encoder": "a", "text_encoder": "b"}, {"name": "x", "image_encoder": "c", "text_encoder": "d"}]}' >"$WORK/dup.json"
  sweep --config-file "$WORK/dup.json"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CONFIG_FILE: $WORK/dup.json: two configurations are both named 'x' (.configs[0] and .configs[1]): give them different names"
  echo '{"configs": [{"image_encoder": "a", "text_encoder": "b", "lr": {"fast": 1}}]}' >"$WORK/bad.json"
  sweep --config-file "$WORK/bad.json"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CONFIG_FILE: $WORK/bad.json: .configs[0].lr: must be a value, a list of values, or a range like {\"log_uniform\": [1e-5, 1e-3]} (one of log_uniform, uniform, int_uniform), got {\"fast\": 1}"
  echo '{"image_encoders": ["a"],' >"$WORK/broken.json"
  sweep --config-file "$WORK/broken.json"
  assert_failure 2
  [[ $stderr == *"CONFIG_FILE: $WORK/broken.json: not valid JSON"* ]]
}

@test "CPU mode: no GPU at all runs --cpu-slots jobs with OMP_NUM_THREADS set" {
  unset MGPU_FAKE_GPUS
  export NVIDIA_SMI=none
  FAKE_TRAIN_SLEEP=1 sweep --cpu-slots 2 --image-encoders a,b --text-encoders t
  assert_success
  [[ $stderr == *"no GPU found (no nvidia-smi, no MGPU_FAKE_GPUS): CPU mode, 2 job(s) at a time"* ]]
  assert_equal "$(max_overlap)" 2
  run awk -F'\t' '$2 == "start" { print "[" $3 "]", ($6 >= 1) }' "$FAKE_TRAIN_RECORD"
  assert_output $'[] 1\n[] 1'
  assert_equal "$(summary '.configs[0].gpu')" cpu
  run ls logs/clip_training # logs say where they ran: the CPU, not a "GPU cpu"
  assert_line --regexp '^a_t_cpu_[0-9]{8}_[0-9]{6}\.log$'
}

@test "gpu_queue.sh runs a jobs file and standard input with the same engine" {
  printf '# warm-up\necho "gpu=$CUDA_VISIBLE_DEVICES name=$MGPU_CONFIG_NAME"\n\nexit 4\n' >"$WORK/jobs file.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 3 "$WORK/jobs file.txt"
  assert_failure 1
  assert_equal "$(jq -r '[.configs[] | "\(.name):\(.status):\(.exit_code)"] | join(" ")' logs/gpu_queue/summary_*.json)" \
    "job2:succeeded:0 job4:failed:4"
  run grep -v '^# ' logs/gpu_queue/job2_gpu3_*.log
  assert_output "gpu=3 name=job2"
  run head -n 2 logs/gpu_queue/job2_gpu3_*.log # the header: what ran, where, when, which mgpu
  assert_line --index 0 --regexp '^# mgpu: job2 on GPU 3 \(CUDA_VISIBLE_DEVICES=3\), host .+, started [0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} [+-][0-9]{4}, mgpu (commit [0-9a-f]+|\(not a git checkout\))'
  assert_line --index 1 '# command: bash -c echo\ \"gpu=\$CUDA_VISIBLE_DEVICES\ name=\$MGPU_CONFIG_NAME\"'
  rm -rf logs
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0,1 - <<<$'true\ntrue\ntrue'
  assert_success
  assert_equal "$(jq -r .succeeded logs/gpu_queue/summary_*.json)" 3
}

@test "gpu_queue.sh runs a plain command line without starting a bash first, and any other line as bash -c does" {
  local cmds=('printenv FOO' 'printenv FOO # through bash' 'echo --version' 'FOO=1 printenv FOO' 'no-such-program-mgpu x'
    './tool.sh a,b=c' './tool.sh $FOO' 'greet' './notexec' './crlf.sh' '-x foo')
  printf '%s\n' "${cmds[@]}" >jobs.txt
  printf '#!/bin/sh\necho "tool $1"\n' >tool.sh
  printf '#!/bin/sh\r\necho crlf\r\n' >crlf.sh # saved with CRLF line ends: its interpreter is "/bin/sh\r"
  printf '#!/bin/sh\necho never\n' >notexec
  mkdir bin
  printf '#!%s\nprintf "%%s\\n" "$*" >>"%s"\nexec %s "$@"\n' "$BASH" "$WORK/bash-runs" "$BASH" >bin/bash # records each bash
  printf '#!/bin/sh\necho program\n' >bin/greet
  chmod +x tool.sh crlf.sh bin/bash bin/greet
  greet() { echo function; }
  export -f greet
  FOO=0 PATH=$WORK/bin:$PATH run --separate-stderr "$BASH" "$ROOT/gpu_queue.sh" --gpus 0 jobs.txt
  assert_failure 1
  assert_equal "$(jq -r '[.configs[] | "\(.name):\(.status):\(.exit_code)"] | join(" ")' logs/gpu_queue/summary_*.json)" \
    "job1:succeeded:0 job2:succeeded:0 job3:succeeded:0 job4:succeeded:0 job5:failed:127 job6:succeeded:0 job7:succeeded:0 job8:succeeded:0 job9:failed:126 job10:failed:127 job11:failed:127"
  run cat bash-runs # only the plain lines (1 and 6) started no bash
  assert_output "$(printf -- '-c %s\n' "${cmds[@]:1:4}" "${cmds[@]:6:4}"; printf -- '-c -- %s\n' "${cmds[10]}")"
  out() { grep -v '^# ' logs/gpu_queue/"$1"_gpu0_*.log; }
  assert_equal "$(out job1) $(out job2)" "0 0"
  assert_equal "$(out job3)" --version # bash's own echo, not /usr/bin/echo
  assert_equal "$(out job4)" 1
  assert_equal "$(out job6) / $(out job7) / $(out job8)" "tool a,b=c / tool 0 / function"
  run out job5
  assert_output --partial "bash: line 1: no-such-program-mgpu: command not found"
  run out job9
  assert_output --partial "bash: line 1: ./notexec: Permission denied"
  run out job10 # bash's words for a program that cannot start, not mgpu's file and line
  assert_output --partial "bash: line 1: ./crlf.sh: "
  run out job11 # a line that starts like an option of bash is still a command
  assert_output --partial "bash: line 1: -x: command not found"
  run head -n 2 logs/gpu_queue/job1_gpu0_*.log # the log still says what the line was
  assert_line --index 1 '# command: bash -c printenv\ FOO'
  rm -rf logs bash-runs # with BASH_ENV set, bash -c would read it first: every line goes through bash
  printf '[[ -z ${MGPU_CONFIG_NAME:-} ]] || export FOO=2\n' >env.sh # a job's bash, not the launcher
  BASH_ENV=$WORK/env.sh run --separate-stderr "$BASH" "$ROOT/gpu_queue.sh" --gpus 0 - <<<'printenv FOO'
  assert_success
  assert_equal "$(out job1)" 2
  rm -rf logs # and with SHELLOPTS exported, bash -c would take its options (here: trace the command)
  run --separate-stderr env FOO=3 SHELLOPTS=xtrace "$BASH" "$ROOT/gpu_queue.sh" --gpus 0 - <<<'printenv FOO'
  assert_success
  assert_equal "$(out job1)" $'+ printenv FOO\n3'
}

@test "each job has its own process group, led by its recording process, with Ctrl-C (SIGINT) not ignored" {
  local line='read -r -a f </proc/$$/stat; read -r -a l </proc/$PPID/stat; m=$(awk "/^SigIgn/ { print \$2 }" /proc/$$/status); echo "parent=$PPID group=${f[4]} parent_group=${l[4]} launcher_group=${l[3]} int_ignored=$(( (0x$m >> 1) & 1 ))"'
  run --separate-stderr sigint_default bash "$ROOT/gpu_queue.sh" --gpus 0,1 - <<<"$line"$'\n'"$line"
  assert_success
  local log
  for log in logs/gpu_queue/job*.log; do
    run grep -v '^# ' "$log"
    # the command runs in the group its parent (the job's recording process) leads, not the launcher's
    assert_output --regexp '^parent=([0-9]+) group=\1 parent_group=\1 launcher_group=[0-9]+ int_ignored=0$'
    [[ $output != *"launcher_group=${output#*group=}"* ]]
  done
}

@test "--dry-run prints the plan, the GPU check and each exact command, and launches nothing" {
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-gpu2-busy.json
  sweep --dry-run --gpus 1,2 --image-encoders starnet_s1,starnet_s2,starnet_s3 --text-encoders "clip:ViT-B/32" -- --note "two words"
  assert_success
  assert_equal "$output" "Plan: 3 job(s) on 2 slot(s) [1:0 2:0]; MAX_UTIL 70%, MAX_WAIT 300s, --on-timeout run, --retries 0, --grace 60s
GPU 1: free now
GPU 2: busy now (utilization 95% (1 sample) > MAX_UTIL 70%): jobs wait for it
starnet_s1_clip_ViT-B_32 -> GPU 1: CUDA_VISIBLE_DEVICES=1 CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=starnet_s1_clip_ViT-B_32 MGPU_GPU=1 OMP_NUM_THREADS=1 $ROOT/tests/fakes/fake-trainer --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --output-dir checkpoints/clip_models/starnet_s1_clip_ViT-B_32 --note two\\ words 
starnet_s2_clip_ViT-B_32 -> GPU 2: CUDA_VISIBLE_DEVICES=2 CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=starnet_s2_clip_ViT-B_32 MGPU_GPU=2 OMP_NUM_THREADS=1 $ROOT/tests/fakes/fake-trainer --image-encoder starnet_s2 --text-encoder clip:ViT-B/32 --output-dir checkpoints/clip_models/starnet_s2_clip_ViT-B_32 --note two\\ words 
starnet_s3_clip_ViT-B_32 -> GPU 1: CUDA_VISIBLE_DEVICES=1 CUDA_DEVICE_ORDER=PCI_BUS_ID MGPU_CONFIG_NAME=starnet_s3_clip_ViT-B_32 MGPU_GPU=1 OMP_NUM_THREADS=1 $ROOT/tests/fakes/fake-trainer --image-encoder starnet_s3 --text-encoder clip:ViT-B/32 --output-dir checkpoints/clip_models/starnet_s3_clip_ViT-B_32 --note two\\ words "
  assert [ ! -e "$FAKE_TRAIN_RECORD" ]
  assert [ ! -e logs ]
  assert [ ! -e checkpoints ]
}

@test "bad settings exit 2 naming the setting, the value and what is allowed" {
  sweep --max-util 150
  assert_failure 2
  assert_equal "$stderr" "[ERROR] MAX_UTIL must be an integer from 0 to 100, got '150'"
  sweep --on-timeout later
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --on-timeout must be run, skip or fail, got 'later'"
  sweep --gpus 0,x
  assert_failure 2
  assert_equal "$stderr" "[ERROR] GPUS must list GPUs like 0,1,2,3 (indices, GPU- or MIG- UUIDs); got 'x' in '0 x'"
  sweep --frobnicate
  assert_failure 2
  run --separate-stderr bash "$ROOT/run_train_clip.sh" --preset large
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --preset large: allowed: demo"
}

@test "--preset demo runs the real trainer: two small configs, real metrics in the summary" {
  PYTHON=$ROOT/.venv/bin/python run --separate-stderr bash "$ROOT/run_train_clip.sh" --preset demo --gpus 0,1 \
    -- --max-steps 3 --train-size 32 --val-size 8 --batch-size 8 --no-tb
  assert_success
  assert_equal "$(summary '[.configs[] | .name + " " + .status] | join(", ")')" \
    "starnet_s050_clip_tiny succeeded, starnet_s050_bert_tiny-chinese succeeded"
  assert_equal "$(summary '[.configs[].metrics | .steps, .val_samples, (.["image_to_text_R@1"] | type)] | map(tostring) | join(" ")')" \
    "3 8 number 3 8 number"
  run cat logs/clip_training/summary_*.tsv
  assert_line --index 1 --regexp $'\timage_to_text_R@1\t(0|1|0\.[0-9]{1,4})\t' # rounded to 4 decimals
  run cat logs/clip_training/starnet_s050_bert_tiny-chinese_gpu*.log
  assert_line "Using CPU for training (1 threads)"
  assert_line --partial "starnet_s050 x bert:tiny-chinese: 3 steps"
  assert [ -f checkpoints/clip_models/starnet_s050_clip_tiny/model.pt ]
}

@test "--order longest-first starts what took longest last time first, and never-seen jobs before all" {
  printf 'sleep 0.1\nsleep 0.6\nsleep 0.3\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt"
  assert_success
  printf 'sleep 0.1\nsleep 0.6\nsleep 0.3\nsleep 0.2\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 --order longest-first "$WORK/jobs.txt"
  assert_success
  assert_equal "$(grep -o 'started job[0-9]' <<<"$stderr" | tr '\n' ' ')" "started job4 started job2 started job3 started job1 "
  [[ $stderr == *"--order longest-first: 3 earlier wall time(s) found in logs/gpu_queue"* ]]
}

@test "on a terminal a status line stays under the log; elsewhere only plain lines" {
  printf 'true\nexit 3\n' >"$WORK/jobs.txt"
  run script -qec "$(printf '%q ' bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt")" /dev/null
  assert_output --partial $'\r\033[Kmgpu: 2/2 done, 0 running, 0 queued'
  assert_output --partial "(failed so far: 1)"
  rm -rf logs
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt"
  [[ $stderr != *$'\033'* && $stderr != *$'\r'* ]]
  [[ $stderr == *"[INFO] [2/2 done, 0 running, 0 queued, "* ]]
}

@test "a lock file that is a symbolic link is refused, its target left untouched, and its slot never used" {
  mkdir -p "$MGPU_LOCK_DIR"
  ln -s "$WORK/precious" "$MGPU_LOCK_DIR/gpu0.slot0.lock"
  sweep --gpus 0 --image-encoders a --text-encoders b
  assert_failure 1
  [[ $stderr == *"MGPU_LOCK_DIR: refusing the lock file $MGPU_LOCK_DIR/gpu0.slot0.lock: it is a symbolic link or not a regular file"* ]]
  assert [ ! -e "$WORK/precious" ]
  assert [ ! -e "$FAKE_TRAIN_RECORD" ]
  assert_equal "$(summary '.configs[0] | "\(.status) \(.failure): \(.reason)"')" "failed could not start: no usable GPU slot (see the errors above)"
  rm -rf logs
  sweep --gpus 0,1 --image-encoders a --text-encoders b # another GPU's slot takes the job
  assert_success
  assert_equal "$(gpus_of a_b)" 1
}

@test "USE_MULTI_CONFIG=false runs one config at a time on the first GPU" {
  USE_MULTI_CONFIG=false sweep --gpus 2,3 --image-encoders a,b,c --text-encoders t
  assert_success
  assert_equal "$(awk -F'\t' '$2 == "start" { print $3 }' "$FAKE_TRAIN_RECORD" | tr '\n' ' ')" "2 2 2 "
  assert_equal "$(max_overlap)" 1
}

@test "hyper-parameter grids: any key may hold a list; names come from the keys that vary; params in the summary" {
  cat >"$WORK/grid.json" <<'JSON'
{"image_encoders": ["starnet_s1"], "text_encoders": ["clip:ViT-B/32"],
 "args": {"lr": [1e-3, 3e-4], "batch_size": [32, 64], "epochs": 2}}
JSON
  sweep --gpus 0,1 --config-file "$WORK/grid.json"
  assert_success
  assert_equal "$(summary '[.configs[].name] | join(" ")')" \
    "starnet_s1_clip_ViT-B_32_lr1e-3_bs32 starnet_s1_clip_ViT-B_32_lr1e-3_bs64 starnet_s1_clip_ViT-B_32_lr3e-4_bs32 starnet_s1_clip_ViT-B_32_lr3e-4_bs64"
  assert_equal "$(summary '.configs[3].params | tojson')" '{"lr":0.0003,"batch_size":64}'
  run cut -f1,7 "$FAKE_TRAIN_RECORD"
  assert_line --partial "starnet_s1_clip_ViT-B_32_lr3e-4_bs64	--image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --output-dir checkpoints/clip_models/starnet_s1_clip_ViT-B_32_lr3e-4_bs64 --lr 0.0003 --batch-size 64 --epochs 2"
  # a list of configurations may vary too, and so may the encoders
  echo '{"defaults": {"lr": [0.1, 0.2]}, "configs": [{"name": "small", "image_encoder": ["a", "b"], "text_encoder": "t"}]}' >"$WORK/list.json"
  sweep --dry-run --gpus 0 --config-file "$WORK/list.json"
  assert_success
  assert_equal "$(grep -o '^[^ ]* ->' <<<"$output" | tr '\n' ' ')" "small_lr0.1_a -> small_lr0.1_b -> small_lr0.2_a -> small_lr0.2_b -> "
}

@test "random search: --sample N --seed S draws the same points for the same seed; ranges need --sample" {
  echo '{"image_encoders": ["a"], "text_encoders": ["t"], "args": {"lr": {"log_uniform": [1e-5, 1e-3]}, "batch_size": [32, 64, 128]}}' >"$WORK/search.json"
  sweep --dry-run --gpus 0 --config-file "$WORK/search.json"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CONFIG_FILE: $WORK/search.json: .args.lr: is a range: give --sample N (random search) to draw values from it"
  sweep --dry-run --gpus 0 --config-file "$WORK/search.json" --sample 5 --seed 3
  assert_success
  local first=$output
  assert_equal "$(grep -c ' -> GPU 0: ' <<<"$output")" 5
  assert_regex "$output" 'a_t_lr[0-9.]+e-[3-5]_bs(32|64|128) -> GPU 0: .* --lr [0-9.e-]+ --batch-size (32|64|128) '
  sweep --dry-run --gpus 0 --config-file "$WORK/search.json" --sample 5 --seed 3
  assert_equal "$output" "$first"
  sweep --dry-run --gpus 0 --config-file "$WORK/search.json" --sample 5 --seed 4
  assert_not_equal "$output" "$first"
  sweep --dry-run --gpus 0 --sample 2
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --sample draws from a config file's lists and ranges: give --config-file"
}

@test "the trainer's arguments are checked before anything launches: a typo, an unknown encoder, a bad value" {
  TRAIN=() # the real trainer's parser checks; nothing runs
  echo '{"image_encoders": ["starnet_s050"], "text_encoders": ["clip:tiny"], "args": {"lr": [1e-3, 3e-4], "batch_sise": 64}}' >"$WORK/typo.json"
  sweep --dry-run --gpus 0 --config-file "$WORK/typo.json"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CONFIG_FILE: $WORK/typo.json: starnet_s050_clip_tiny_lr1e-3 (.args.batch_sise): the trainer refuses it: unrecognized arguments: --batch-sise 64 (did you mean --batch-size?)"
  echo '{"configs": [{"image_encoder": "starnet_s050", "text_encoder": "clip:huge"}]}' >"$WORK/enc.json"
  sweep --config-file "$WORK/enc.json"
  assert_failure 2
  assert_regex "$stderr" "^\[ERROR\] CONFIG_FILE: $WORK/enc.json: starnet_s050_clip_huge \(\.configs\[0\]\.text_encoder\): the trainer refuses it: argument --text-encoder: unknown text encoder 'clip:huge'"
  sweep --gpus 0 --image-encoders starnet_s050 --text-encoders clip:tiny -- --lr fast
  assert_failure 2
  assert_regex "$stderr" "starnet_s050_clip_tiny \(trainer arguments after --\): the trainer refuses it: argument --lr(/--learning-rate)?: 'fast' is not a number"
  assert [ ! -e logs ]
}
