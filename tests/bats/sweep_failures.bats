#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154,SC2016,SC2317  # bats: subshell tests, $stderr from run; '$VAR' in job text is meant literally; wait_for calls the small functions
# The sweep engine against what real servers do: jobs killed by the OOM killer, a launcher killed
# mid-sweep, two launchers on one config, a second Ctrl-C, jobs that cannot start, stale results, bad
# inputs, hostile files in the shared lock folder, held slots. Real bash, real processes, the fakes.

load test_helper

setup() {
  common_setup
  cd "$WORK" || return 1
  export MGPU_LOCK_DIR="$WORK/locks" FAKE_TRAIN_RECORD="$WORK/record.tsv" MGPU_RETRY_BACKOFF_MS=100
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json MGPU_UTIL_SAMPLES=1 MGPU_TICK_MS=50
  TRAIN=(--train-cmd "$ROOT/tests/fakes/fake-trainer")
}

teardown() {
  [[ ! -d $WORK ]] || touch "$WORK/release" "$WORK/go1" "$WORK/go2" # jobs waiting for the test's word end, should a test stop early
  # Jobs a test left running on purpose (orphans of a killed launcher): their groups, from the record.
  local pid group cmd=()
  [[ -f $FAKE_TRAIN_RECORD ]] || return 0
  while read -r pid; do
    mapfile -d '' -t cmd 2>/dev/null <"/proc/$pid/cmdline" || continue
    [[ "${cmd[*]}" == *"$ROOT/tests/fakes/fake-trainer"* ]] || continue # still ours, not a reused pid
    group=$(ps -o pgid= -p "$pid" 2>/dev/null) || continue
    kill -KILL -- "-${group// /}" 2>/dev/null || true
  done < <(cut -f5 "$FAKE_TRAIN_RECORD")
}

sweep() { run --separate-stderr bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" "$@"; }
summary() { jq -r "$1" logs/clip_training/summary_*.json; }
starts() { count_lines $'\tstart\t' "$FAKE_TRAIN_RECORD"; }
ends() { count_lines $'\tend\t' "$FAKE_TRAIN_RECORD"; }

@test "jobs killed with their whole process group (SIGKILL, SIGSEGV) while the launcher samples GPUs: 50 ends, all seen, no hang" {
  local scenario
  scenario=$(scenario_copy 4x-rtx4090-idle)
  set_util "$scenario" 2 65 # near MAX_UTIL: every fill samples it over the whole window
  local i
  for ((i = 0; i < 50; i++)); do
    if ((i % 2)); then echo 'sleep 0.$((RANDOM % 3)); kill -SEGV 0'; else echo 'sleep 0.$((RANDOM % 3)); kill -KILL 0'; fi
  done >"$WORK/jobs.txt"
  MGPU_FAKE_GPUS=$scenario MGPU_UTIL_SAMPLES=5 MGPU_UTIL_WINDOW_MS=400 MGPU_POLL_MS=50 \
    run --separate-stderr timeout 240 bash "$ROOT/gpu_queue.sh" --gpus 0,1,2 "$WORK/jobs.txt"
  assert_failure 1 # not 124: the launcher never hung
  assert_equal "$(jq -r '[.configs[] | "\(.status) \(.failure)"] | group_by(.) | map("\(length) \(.[0])") | join(", ")' logs/gpu_queue/summary_*.json)" \
    "25 failed signal KILL, 25 failed signal SEGV"
}

@test "CPU mode: a job killed while the launcher shows another's failure is seen at the next timer, and its slot runs the next job" {
  # bash marks a killed background job as reported once it has printed "Killed" (after a foreground command
  # of the launcher, here the tail of a failed job's log), and `wait -n` then waits on the other jobs only.
  # A fake tail holds the launcher there until job 2's process is killed and reaped. Job 3 runs until job 4
  # starts, which needs job 2's slot: without the timer, not before job 3 gives up (exit 9, after 30 s).
  unset MGPU_FAKE_GPUS
  export NVIDIA_SMI=none KN=$WORK REAL_TAIL
  REAL_TAIL=$(command -v tail)
  mkdir -p "$WORK/fakes"
  cat >"$WORK/fakes/tail" <<'FAKE'
#!/usr/bin/env bash
touch "$KN/in-tail"
for ((i = 0; i < 200; i++)); do
  [[ -e /proc/$(<"$KN/b.pid") ]] || exec "$REAL_TAIL" "$@"
  sleep 0.05
done
echo "fake tail: job 2's process was not reaped within 10 s" >&2
exit 1
FAKE
  chmod +x "$WORK/fakes/tail"
  cat >"$WORK/jobs.txt" <<'JOBS'
until [ -e "$KN/b.pid" ]; do sleep 0.05; done; exit 3
echo $PPID >"$KN/b.tmp" && mv "$KN/b.tmp" "$KN/b.pid" && until [ -e "$KN/in-tail" ]; do sleep 0.05; done && kill -KILL 0
for i in $(seq 300); do [ -e "$KN/d.started" ] && exit 0; sleep 0.1; done; exit 9
touch "$KN/d.started"
JOBS
  PATH="$WORK/fakes:$PATH" run --separate-stderr timeout 120 bash "$ROOT/gpu_queue.sh" --cpu-slots 2 "$WORK/jobs.txt"
  assert_failure 1
  [[ $stderr != *"fake tail:"* ]] || fail "the test's premise failed: $stderr"
  assert_equal "$(jq -r '[.configs[] | "\(.name) \(.status) \(.exit_code)"] | join(", ")' logs/gpu_queue/summary_*.json)" \
    "job1 failed 3, job2 failed 137, job3 succeeded 0, job4 succeeded 0"
}

@test "a job whose command is killed (the OOM killer's SIGKILL) is recorded by its own process, and retried" {
  printf 'kill -KILL $$\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0,1 --retries 1 "$WORK/jobs.txt"
  assert_failure 1
  assert_equal "$(jq -r '.configs[0] | "\(.status) \(.exit_code) \(.failure) \(.retries) \(.failed_attempts | join("; "))"' logs/gpu_queue/summary_*.json)" \
    "failed 137 signal KILL 1 signal KILL on GPU 0; signal KILL on GPU 1"
}

@test "a command a signal killed: the job's log says which signal, and none of mgpu's code reaches the terminal" {
  printf 'kill -KILL $$\nkill -SEGV $$\nexit 170\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0,1 "$WORK/jobs.txt"
  assert_failure 1
  assert_equal "$(tail -n 1 logs/gpu_queue/job1_*.log)" "# mgpu: the command ended by signal KILL (exit 137)"
  assert_equal "$(tail -n 1 logs/gpu_queue/job2_*.log)" "# mgpu: the command ended by signal SEGV (exit 139)"
  # 128 + a real-time signal's number, as the summary reads it too: an exit status, not a signal
  refute grep -q 'ended by signal' logs/gpu_queue/job3_*.log
  assert_equal "$(jq -r '[.configs[].failure] | join(" ")' logs/gpu_queue/summary_*.json)" "signal KILL signal SEGV error"
  # bash's own line on it went to the terminal: "lib/sched_job.sh: line 88: 4242 Killed  CUDA_VISIBLE_DEVICES=$2 ..."
  # (the launcher's own lines quote a failed job's log indented, after "|")
  refute grep -E '^[^ ].*(Killed|Segmentation fault)' <<<"$stderr"
  assert_equal "$(grep -c -E '^/.*/lib/sched_job\.sh: line [0-9]+: +[0-9]+ Killed ' logs/gpu_queue/job1_*.log)" 1 # in the log now
}

@test "the launcher SIGKILLed mid-sweep: its jobs finish and mark themselves done, so --resume redoes nothing" {
  FAKE_TRAIN_SLEEP=1.5 bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0,1 --image-encoders a,b --text-encoders t \
    >"$WORK/out" 2>"$WORK/err" &
  local launcher=$!
  two_started() { [[ $(starts) == 2 ]]; }
  wait_for 30 "both jobs to start" two_started
  kill -KILL "$launcher"
  wait "$launcher" || true
  two_ended() { [[ $(ends) == 2 ]]; }
  wait_for 30 "the orphaned jobs to finish" two_ended
  done_markers() { [[ -f checkpoints/clip_models/a_t/.mgpu_done && -f checkpoints/clip_models/b_t/.mgpu_done ]]; }
  wait_for 10 "the orphans' completion markers" done_markers
  sweep --resume --gpus 0,1 --image-encoders a,b --text-encoders t
  assert_success
  assert_equal "$(starts)" 2 # nothing ran again
  assert_equal "$(summary '[.configs[] | "\(.name)=\(.status):\(.reason)"] | join(" ")')" \
    "a_t=skipped:done earlier (--resume) b_t=skipped:done earlier (--resume)"
}

@test "--resume while a killed launcher's job still runs: it waits for the slot, then finds the job done, and runs nothing again" {
  export KN=$WORK
  printf '%s\n' 'touch "$KN/started"; until [ -e "$KN/go" ]; do sleep 0.05; done; echo ran >>"$KN/ran.txt"' >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt" >"$WORK/out1" 2>&1 &
  local first=$!
  wait_for 30 "the job to start" test -e "$WORK/started"
  kill -KILL "$first"
  wait "$first" || true
  bash "$ROOT/gpu_queue.sh" --gpus 0 --resume "$WORK/jobs.txt" >"$WORK/out2" 2>"$WORK/err2" &
  local second=$!
  waits() { grep -q "job1 waits: GPU 0 slot 0 is held by pid" "$WORK/err2"; }
  wait_for 30 "the second launcher to wait for the slot the orphaned job holds" waits
  : >"$WORK/go" # the orphaned job finishes and marks itself done
  local rc=0
  wait "$second" || rc=$?
  assert_equal "$rc" 0
  assert_equal "$(cat "$WORK/ran.txt")" ran # once
  assert_equal "$(jq -r '.configs[0] | "\(.status) \(.reason) \(.exit_code)"' logs/gpu_queue/summary_*.json)" \
    "skipped done earlier (--resume) null"
  grep -q "skipping job1: done with the same configuration while it waited" "$WORK/err2"
}

@test "a config still running from a killed launcher is reported as running elsewhere, never started twice" {
  FAKE_TRAIN_SLEEP=60 bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0 --image-encoders a --text-encoders t \
    >"$WORK/out" 2>"$WORK/err" &
  local launcher=$!
  wait_for 30 "the job to start" test -s "$FAKE_TRAIN_RECORD"
  kill -KILL "$launcher"
  wait "$launcher" || true
  # another launcher with a free slot on the same GPU, and with other GPUs
  sweep --resume --jobs-per-gpu 2 --gpus 0,1 --image-encoders a,b --text-encoders t
  assert_failure 1
  assert_equal "$(starts)" 2 # a once (still running), b once
  assert_equal "$(summary '.configs[] | select(.name == "a_t") | .status')" skipped
  assert_regex "$(summary '.configs[] | select(.name == "a_t") | .reason')" '^running elsewhere \(pid [0-9]+: .*\)$'
  assert_equal "$(summary '.configs[] | select(.name == "b_t") | .status')" succeeded
}

@test "a job that cannot start fails alone with the true cause; the others run and every config is in the summary" {
  mkdir -p checkpoints/clip_models
  echo "not a folder" >checkpoints/clip_models/b_t # b's output folder cannot be made
  FAKE_TRAIN_SLEEP=0.5 sweep --gpus 0 --image-encoders a,b,c --text-encoders t
  assert_failure 1
  assert_equal "$(summary '[.configs[] | "\(.name)=\(.status)"] | join(" ")')" "a_t=succeeded b_t=failed c_t=succeeded"
  assert_equal "$(summary '.configs[1] | "\(.failure): \(.reason)"')" "could not start: cannot make its output folder: File exists"
  [[ $stderr == *"[ERROR] b_t could not start: cannot make its output folder: File exists"* ]]
}

@test "names too long for a file name are shortened with a stable hash; they run, and --resume finds them" {
  local long
  long=$(printf 'x%.0s' {1..300})
  printf '{"configs": [{"name": "%s1", "image_encoder": "a", "text_encoder": "b"}, {"name": "%s2", "image_encoder": "a", "text_encoder": "b"}]}\n' \
    "$long" "$long" >"$WORK/long.json"
  sweep --gpus 0,1 --config-file "$WORK/long.json"
  assert_success
  run ls checkpoints/clip_models
  assert_equal "${#lines[@]}" 2
  assert_regex "${lines[0]}" '^x{111}_[0-9a-f]{8}$'
  assert_not_equal "${lines[0]}" "${lines[1]}"
  sweep --resume --gpus 0,1 --config-file "$WORK/long.json"
  assert_success
  assert_equal "$(starts)" 2
}

@test "LOG_DIR removed mid-sweep: it is made again, the next jobs run, and the summary is written" {
  printf 'rm -rf logs/gpu_queue\ntrue\ntrue\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt"
  assert_success
  [[ $stderr == *"LOG_DIR logs/gpu_queue was gone; made it again"* ]]
  assert_equal "$(jq -r '.succeeded' logs/gpu_queue/summary_*.json)" 3
}

@test "Ctrl-C while a job's process is still taking its locks: the TERM it got is kept, and its command never starts" {
  # A fake flock holds the job's process at its folder lock, deaf to TERM, until the launcher's stop has
  # sent its TERMs; the job's process then goes on. Its command must not start: nothing would stop it.
  export KN=$WORK REAL_FLOCK TMPDIR=$WORK/tmp
  REAL_FLOCK=$(command -v flock)
  mkdir -p "$WORK/fakes" "$TMPDIR"
  cat >"$WORK/fakes/flock" <<'FAKE'
#!/usr/bin/env bash
if [[ $(readlink "/proc/self/fd/${*: -1}") == "$KN/logs/"* ]]; then # the job's folder lock, not a slot's
  trap '' TERM
  touch "$KN/in-flock"
  for ((i = 0; i < 400; i++)); do
    [[ ! -e $KN/go ]] || exec "$REAL_FLOCK" "$@"
    sleep 0.05
  done
  echo "fake flock: no word from the test within 20 s" >&2
  exit 3
fi
exec "$REAL_FLOCK" "$@"
FAKE
  chmod +x "$WORK/fakes/flock"
  printf '%s\n' 'touch "$KN/ran"' >"$WORK/jobs.txt"
  PATH="$WORK/fakes:$PATH" env --default-signal=INT bash "$ROOT/gpu_queue.sh" --gpus 0 --log-dir "$WORK/logs" "$WORK/jobs.txt" \
    >"$WORK/out" 2>"$WORK/err" &
  local launcher=$!
  wait_for 30 "the job's process to reach its folder lock" test -e "$WORK/in-flock"
  kill -INT "$launcher"
  stop_sent() { compgen -G "$TMPDIR/mgpu-sched.*/term" >/dev/null; }
  wait_for 30 "the launcher's stop to send its TERMs" stop_sent
  : >"$WORK/go"
  local rc=0
  wait "$launcher" || rc=$?
  assert_equal "$rc" 130
  [[ ! -e $WORK/ran ]] || fail "the command started after the stop"
  assert_equal "$(jq -r '.configs[0] | "\(.status) \(.detail)"' "$WORK"/logs/summary_*.json)" "interrupted stopped before it started"
}

@test "the launcher's traps act in the launcher only: a fork of it that ends, or gets TERM, leaves its stop and its exit to it" {
  # What a Ctrl-C in the instant after a job's fork did: the fork ran the launcher's EXIT trap (a second
  # summary, the jobs stopped, the launcher's private folder removed under it) or its stop.
  export TMPDIR=$WORK/tmp
  mkdir -p "$TMPDIR"
  run --separate-stderr bash -c '
    set -Eeuo pipefail
    source "$1/lib/sweep.sh"
    sched::init
    { exit 0; } &
    wait "$!" || true
    [[ -d $SCHED_STATE ]] && echo "private folder kept"
    sched::_traps
    { kill -TERM "$BASHPID"; exit 0; } &
    wait "$!" || true
    [[ ! -e $SCHED_STATE/term ]] && echo "no stop: [$SCHED_STOP]"
    kill -TERM "$BASHPID"
    echo "the launcher itself: [$SCHED_STOP]"
  ' _ "$ROOT"
  assert_success
  assert_output $'private folder kept\nno stop: []\nthe launcher itself: [TERM]'
}

@test "a second Ctrl-C during the grace period kills at once; every config is still in the summary, exit 130" {
  local i
  for i in 1 2 3 4; do echo 'trap "" TERM; echo up; sleep 60'; done >"$WORK/jobs.txt"
  env --default-signal=INT bash "$ROOT/gpu_queue.sh" --gpus 0 --grace 100 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0 start=$SECONDS
  job_up() { grep -q '^up$' logs/gpu_queue/job1_gpu0_*.log 2>/dev/null; }
  wait_for 30 "the first job to start" job_up
  kill -INT "$launcher"
  stopping() { grep -q 'stopping 1 running job' "$WORK/err"; }
  wait_for 30 "the launcher to start stopping" stopping
  kill -INT "$launcher"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 130
  assert [ $((SECONDS - start)) -lt 60 ] # the second Ctrl-C did not wait out --grace 100
  run cat "$WORK/err"
  assert_line --partial "second stop signal: killing the running jobs now"
  refute_line --regexp '(^|: )Killed'
  assert_equal "$(jq -r '[.configs[] | "\(.status):\(.detail // .reason)"] | join(" ")' logs/gpu_queue/summary_*.json)" \
    "interrupted:killed after grace (no checkpoint) interrupted:never started interrupted:never started interrupted:never started"
}

@test "Ctrl-C gives a trainer time to save (default --grace 60): the summary says checkpoint saved" {
  FAKE_TRAIN_SLEEP=60 FAKE_TRAIN_ON_TERM=save bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0 \
    --image-encoders a --text-encoders t >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  wait_for 30 "the job to start" test -s "$FAKE_TRAIN_RECORD"
  kill -TERM "$launcher"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 143
  assert [ -f checkpoints/clip_models/a_t/checkpoint_1.pt ]
  assert_equal "$(summary '.configs[0] | "\(.status) (\(.detail))"')" "interrupted (checkpoint saved)"
  run cat logs/clip_training/summary_*.tsv
  assert_line --index 1 --partial $'\tinterrupted\t143\t'
}

@test "a job that ignores TERM is killed after --grace, and the summary says so" {
  echo 'trap "" TERM; echo ready; sleep 60' >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0 --grace 1 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  ready() { grep -q '^ready$' logs/gpu_queue/job1_gpu0_*.log 2>/dev/null; }
  wait_for 30 "the job to ignore TERM" ready
  kill -TERM "$launcher"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 143
  assert_equal "$(jq -r '.configs[0] | "\(.status) (\(.detail))"' logs/gpu_queue/summary_*.json)" "interrupted (killed after grace (no checkpoint))"
}

@test "the reader of the launcher's output gone (\`2>&1 | tee\` ended by the same Ctrl-C), then Ctrl-C or a hangup: jobs stopped, summary written, nothing left running" {
  local sig launcher reader rc pid groups group
  local -A code=([INT]=130 [HUP]=129)
  two_started() { [[ $(starts) == 2 ]]; }
  for sig in INT HUP; do
    rm -rf logs checkpoints "$FAKE_TRAIN_RECORD" "$WORK/out.fifo"
    mkfifo "$WORK/out.fifo"
    cat "$WORK/out.fifo" >/dev/null &
    reader=$!
    FAKE_TRAIN_SLEEP=60 env --default-signal=INT,HUP bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0,1 \
      --image-encoders a,b,c --text-encoders t >"$WORK/out.fifo" 2>&1 &
    launcher=$! rc=0
    wait_for 30 "both jobs to start" two_started
    groups=()
    while read -r pid; do groups+=("$(ps -o pgid= -p "$pid" | tr -d ' ')"); done < <(cut -f5 "$FAKE_TRAIN_RECORD")
    kill "$reader"
    wait "$reader" || true
    kill -"$sig" "$launcher" # its next line meets a pipe without a reader: SIGPIPE, EPIPE
    wait "$launcher" || rc=$?
    assert_equal "$sig $rc" "$sig ${code[$sig]}"
    for group in "${groups[@]}"; do assert_equal "$sig job group $group: $(live_in_group "$group")" "$sig job group $group: 0"; done
    assert_equal "$(summary '[.configs[] | "\(.status):\(.detail // .reason)"] | join(" ")')" \
      "interrupted:stopped within the grace period (exit 143) interrupted:stopped within the grace period (exit 143) interrupted:never started"
    assert_equal "$(tail -n 1 logs/clip_training/sweep_*.events | cut -f1,3)" "finish	$rc"
  done
}

@test "output that cannot be written (stderr closed or full, stdout a closed pipe) never stops a sweep: it runs to the end, exit 0" {
  printf 'true\ntrue\n' >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0,1 --log-dir closed "$WORK/jobs.txt" 2>&- | head -c 0
  assert_equal "${PIPESTATUS[0]}" 0
  bash "$ROOT/gpu_queue.sh" --gpus 0,1 --log-dir full "$WORK/jobs.txt" >/dev/full 2>/dev/full
  local dir
  for dir in closed full; do
    assert_equal "$(jq -r '"\(.succeeded) \(.failed)"' "$dir"/summary_*.json)" "2 0"
    assert_equal "$(tail -n 1 "$dir"/sweep_*.events | cut -f1,3)" "finish	0"
  done
}

@test "a failed config never shows the metric of an earlier run's metrics.json" {
  sweep --gpus 0 --image-encoders a --text-encoders t
  assert_success
  assert_equal "$(summary '.configs[0].metrics.val_r1')" 0.5
  rm -rf logs
  FAKE_TRAIN_FAIL=a_t sweep --gpus 0 --image-encoders a --text-encoders t
  assert_failure 1
  assert_equal "$(summary '.configs[0] | "\(.status) \(.metrics)"')" "failed null"
  run cat logs/clip_training/summary_*.tsv
  assert_line --index 1 --regexp $'^a_t\t0\tfailed\t7\terror\t0\t[0-9.]+\t0\t[0-9.]+\t\t\t\tlogs/clip_training/a_t_gpu0_[0-9_]+\.log\t\texited with status 7 \\(see its log\\)\t$'
}

@test "bad inputs that used to pass silently are errors naming the input, the value and what is allowed" {
  IMAGE_ENCODERS=$'a\nb' sweep --dry-run --gpus 0 --text-encoders t # a newline separates like a comma
  assert_success
  assert_line --partial "Plan: 2 job(s)"
  : >"$WORK/empty.json"
  sweep --config-file "$WORK/empty.json"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CONFIG_FILE: $WORK/empty.json: .: the file is empty: it must hold one JSON object"
  printf '{"image_encoders": ["a"], "text_encoders": ["b"]}\n{"image_encoders": ["c"], "text_encoders": ["d"]}\n' >"$WORK/two.json"
  sweep --config-file "$WORK/two.json"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CONFIG_FILE: $WORK/two.json: .: the file holds 2 JSON documents one after another; it must hold one"
  local where
  for where in '"defaults": {"output_dir": "/tmp/x"}, "configs": [{"image_encoder": "a", "text_encoder": "b"}]' \
    '"configs": [{"image_encoder": "a", "text_encoder": "b", "output-dir": "/tmp/x"}]' \
    '"image_encoders": ["a"], "text_encoders": ["b"], "args": {"output_dir": "/tmp/x"}'; do
    echo "{$where}" >"$WORK/out.json"
    sweep --config-file "$WORK/out.json"
    assert_failure 2
    assert_regex "$stderr" '^\[ERROR\] CONFIG_FILE: .*out\.json: \.(defaults|configs\[0\]|args)\.output[-_]dir: is reserved: the launcher sets each configuration.s output folder'
  done
  sweep --gpus 0 --image-encoders a --text-encoders b -- --output-dir /tmp/elsewhere
  assert_failure 2
  [[ $stderr == *"trainer argument '--output-dir' after --: the launcher sets --output-dir for each configuration"* ]]
  sweep --gpus ""
  assert_failure 2
  assert_equal "$stderr" "[ERROR] GPUS is empty (''): list GPU indices like 0,1,2,3"
  local name
  for name in MGPU_POLL_MS MGPU_TICK_MS MGPU_RETRY_BACKOFF_MS MGPU_UTIL_SAMPLES MGPU_UTIL_WINDOW_MS MGPU_SMI_TIMEOUT MGPU_TAIL_LINES; do
    run --separate-stderr env "$name=soon" bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0 --image-encoders a --text-encoders b
    assert_failure 2
    assert_regex "$stderr" "^\[ERROR\] $name must be an integer from [0-9]+ to [0-9]+, got 'soon'$"
  done
  unset MGPU_FAKE_GPUS
  NVIDIA_SMI=/nonexistent sweep --gpus 0 --image-encoders a --text-encoders b
  assert_failure 2
  [[ $stderr == *"NVIDIA_SMI=/nonexistent: no such program"* ]]
  assert [ ! -e "$FAKE_TRAIN_RECORD" ]
}

@test "standard input closed: a clear error before anything starts; bash started in POSIX mode (POSIXLY_CORRECT): it runs" {
  run --separate-stderr bash -c 'exec <&- && exec bash "$1/gpu_queue.sh" --gpus 0 -' _ "$ROOT"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] jobs file '-' (standard input): standard input is closed; give the jobs through a pipe or < FILE, or name a jobs file"
  [[ ! -e logs ]] || fail "it made its log folder"
  printf 'true\n' >"$WORK/jobs.txt"
  POSIXLY_CORRECT=1 run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt"
  assert_success
  assert_equal "$(jq -r '.configs[0].status' logs/gpu_queue/summary_*.json)" succeeded
  POSIXLY_CORRECT=1 sweep --dry-run --gpus 0 --image-encoders a --text-encoders t
  assert_success
  assert_output --partial "a_t"
}

@test "a scenario uuid holding a comma is refused, naming the JSON path" {
  jq '.gpus[1].uuid = "GPU-a,b"' "$SCENARIOS/4x-rtx4090-idle.json" >"$WORK/comma.json"
  MGPU_FAKE_GPUS=$WORK/comma.json sweep --gpus 0 --image-encoders a --text-encoders b
  assert_failure
  [[ $stderr == *"MGPU_FAKE_GPUS: $WORK/comma.json: .gpus[1].uuid: must not hold a comma"* ]]
}

@test "a FIFO planted as a lock file never blocks: the slot is refused, the job runs elsewhere, TERM still works" {
  mkdir -p "$MGPU_LOCK_DIR"
  mkfifo "$MGPU_LOCK_DIR/gpu0.slot0.lock"
  run --separate-stderr timeout 60 bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0,1 --image-encoders a --text-encoders t
  assert_success
  [[ $stderr == *"refusing the lock file $MGPU_LOCK_DIR/gpu0.slot0.lock: it is a symbolic link or not a regular file"* ]]
  assert_equal "$(awk -F'\t' '$2 == "start" { print $3 }' "$FAKE_TRAIN_RECORD")" 1
  rm -rf logs
  mkdir -p checkpoints/clip_models/b_t
  mkfifo checkpoints/clip_models/b_t/.mgpu.lock
  run --separate-stderr timeout 60 bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 1 --image-encoders a,b --text-encoders t
  assert_failure 1
  assert_equal "$(summary '[.configs[] | "\(.name)=\(.status)"] | join(" ")')" "a_t=succeeded b_t=failed"
  [[ $stderr == *"b_t could not start: its lock file checkpoints/clip_models/b_t/.mgpu.lock: it is a symbolic link or not a regular file"* ]]
}

@test "a slot held by another process: the wait names the holder, counts, and obeys --max-wait/--on-timeout" {
  hold_lock "$MGPU_LOCK_DIR/gpu0.slot0.lock" # the holder ends when the test says so, leaving nothing behind
  MGPU_POLL_MS=200 sweep --gpus 0 --max-wait 1 --on-timeout skip --image-encoders a --text-encoders t
  : >"$WORK/release"
  wait
  assert_failure 1
  assert [ ! -e "$FAKE_TRAIN_RECORD" ]
  [[ $stderr == *"a_t waits: GPU 0 slot 0 is held by pid "*"until [[ -e"* ]]
  assert_equal "$(summary '.configs[0] | "\(.status) \(.waited_seconds) \(.exit_code)"')" "skipped 1 null" # its command never ran
  assert_regex "$(summary '.configs[0].reason')" '^gave up after 1s \(MAX_WAIT\): GPU 0 slot 0 is held by pid [0-9]+: (flock|bash)'
}

@test "a held lock names the process that took it, not the children that inherited the file" {
  # flock takes the lock and starts bash, whose three sleeps (and its loop's) have the file open too
  hold_lock "$MGPU_LOCK_DIR/gpu0.slot0.lock" 'for i in 1 2 3; do sleep 30 & done; trap "kill \$(jobs -p)" EXIT'
  run bash -c 'source "$1/lib/core.sh" && source "$1/lib/lease.sh" && lease::holder "$2" && echo "$LEASE_HOLDER_PID $LEASE_HOLDER"' \
    _ "$ROOT" "$MGPU_LOCK_DIR/gpu0.slot0.lock"
  : >"$WORK/release"
  wait
  assert_output --regexp "^$HOLDER_PID pid $HOLDER_PID: flock -w 10 .+ bash -c for i in 1 2 3"
}

@test "a held slot freed mid-wait is taken, and the wait is recorded" {
  hold_lock "$MGPU_LOCK_DIR/gpu0.slot0.lock"
  MGPU_POLL_MS=200 bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --gpus 0 --max-wait 60 --image-encoders a --text-encoders t \
    >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  waits() { grep -q "a_t waits: GPU 0 slot 0 is held by pid" "$WORK/err"; }
  wait_for 30 "the sweep to wait for the held slot" waits
  sleep 1 # a wait of at least a second, to be recorded as such
  : >"$WORK/release"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 0
  assert_regex "$(summary '.configs[0] | "\(.waited_seconds) \(.reason)"')" '^([1-9][0-9]*) waited \1s: GPU 0 slot 0 is held by pid'
}

@test "back-to-back jobs on a slot take its lock once and keep it; a slot without a job is free for others" {
  # flock on PATH records which file each lock call was for, then is the real flock
  mkdir -p "$WORK/bin"
  printf '%s\n' '#!/usr/bin/env bash' 'fd=${*: -1}' \
    '[[ $fd =~ ^[0-9]+$ ]] && echo "$1 $(readlink "/proc/$$/fd/$fd")" >>"$FLOCK_CALLS"' \
    "exec $(command -v flock) \"\$@\"" >"$WORK/bin/flock"
  chmod +x "$WORK/bin/flock"
  export FLOCK_CALLS=$WORK/flock.calls PATH="$WORK/bin:$PATH"
  # one job runs on one GPU until the test has looked; five short ones run one after another on the other
  { echo 'until [[ -e release ]]; do sleep 0.05; done'; printf 'true\n%.0s' 1 2 3 4 5; } >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0,1 --log-dir "$WORK/logs" "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0 long short
  five_done() { (($(count_lines 'succeeded job' "$WORK/err") == 5)); }
  wait_for 30 "the five short jobs to end" five_done
  long=$(cd "$WORK/logs" && echo job1_gpu*.log) long=${long#job1_gpu} long=${long%%_*} short=$((1 - long))
  free() { flock -n "$MGPU_LOCK_DIR/gpu$short.slot0.lock" true; }
  wait_for 10 "GPU $short's slot to be free once it has no job" free
  run flock -n "$MGPU_LOCK_DIR/gpu$long.slot0.lock" true
  assert_failure # GPU $long's slot: its job still runs
  : >"$WORK/release"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 0
  assert_equal "$(grep -c "^-n .*/gpu$short.slot0.lock$" "$FLOCK_CALLS")" 1 # locked by its first job, kept for the rest
  assert_equal "$(grep -cE "^-n .*/.mgpu_done/[0-9a-f]{64}-[0-9]+.lock$" "$FLOCK_CALLS")" 6 # each job's own lock, every time
}

@test "a lock folder removed between two jobs (a cleaner of /tmp): the next job locks the new file, not the removed one" {
  local n
  for n in 1 2; do echo ": >started$n; until [[ -e go$n ]]; do sleep 0.05; done"; done >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0 --log-dir "$WORK/logs" "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  started() { [[ -e $WORK/started$1 ]]; }
  wait_for 30 "the first job to start (its lease taken)" started 1
  rm -rf "$MGPU_LOCK_DIR"
  : >"$WORK/go1"
  wait_for 30 "the second job to start" started 2
  mkdir -p "$MGPU_LOCK_DIR"
  run flock -n -E 75 "$MGPU_LOCK_DIR/gpu0.slot0.lock" true
  : >"$WORK/go2"
  assert_failure 75 # held: the second job holds the lease file that exists now
  wait "$launcher" || rc=$?
  assert_equal "$rc" 0
}

@test "once its jobs are done a launcher holds no slot lease: what its entry script runs next leaves the GPUs to others" {
  # an entry script of the library's own kind (infer_parallel.sh merges its shards at this point)
  cat >"$WORK/entry.sh" <<'ENTRY'
set -Eeuo pipefail
source "$1/lib/sweep.sh"
sweep::parse --gpus 0,1 --log-dir "$2"
sweep::defaults
sweep::validate
sched::init
mkdir -p "$2"
for n in 1 2 3 4; do sched::add "job$n" "" "" "" "$2/.mgpu_done/job$n" -- true && sweep::resources "$SCHED_NEW"; done
sweep::launch
for slot in 0 1; do flock -n "$MGPU_LOCK_DIR/gpu$slot.slot0.lock" true || echo "GPU $slot's lease is still held"; done
echo done
ENTRY
  run --separate-stderr bash "$WORK/entry.sh" "$ROOT" "$WORK/logs"
  assert_success
  assert_line "done" # the summary table is printed above it
  refute_output --partial "lease is still held"
  assert_equal "$(jq -r '[.configs[] | select(.status == "succeeded")] | length' "$WORK"/logs/summary_*.json)" 4
}

@test "a job that leaves a process running keeps its slot: the next job there waits for that process, naming it" {
  printf '%s\n' '(until [[ -e release ]]; do sleep 0.05; done) & echo $! >leftover.pid' 'true' >"$WORK/jobs.txt"
  MGPU_POLL_MS=100 bash "$ROOT/gpu_queue.sh" --gpus 0 --log-dir "$WORK/logs" "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  waits() { grep -q "job2 waits: GPU 0 slot 0 is held by pid" "$WORK/err"; }
  wait_for 30 "the second job to wait for the first one's leftover" waits
  grep -q "job2 waits: GPU 0 slot 0 is held by pid $(cat "$WORK/leftover.pid")" "$WORK/err"
  : >"$WORK/release"
  wait "$launcher" || rc=$?
  assert_equal "$rc" 0
  grep -q "succeeded job2" "$WORK/err"
}

@test "no temporary folder is left behind: a run, --dry-run, an early error, a Slurm dry run" {
  export TMPDIR=$WORK/tmp
  mkdir -p "$TMPDIR"
  sweep --gpus 0 --image-encoders a --text-encoders t
  assert_success
  sweep --dry-run --gpus 0 --image-encoders a --text-encoders t
  assert_success
  echo '{"configs": []}' >"$WORK/none.json"
  sweep --config-file "$WORK/none.json"
  assert_failure 2
  printf 'sleep 5\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 --max-util 150 "$WORK/jobs.txt"
  assert_failure 2
  sweep --backend slurm --dry-run --image-encoders a --text-encoders t # make test installs Slurm's client
  assert_success
  run ls -A "$TMPDIR"
  assert_output ""
}

@test "a full log disk: each job fails alone with the true cause, nothing runs without a log, no stray write errors, no summary cut short" {
  unshare --mount true 2>/dev/null || skip "needs a mount namespace (root, or CAP_SYS_ADMIN) to make a small file system"
  unset MGPU_FAKE_GPUS
  export NVIDIA_SMI=none
  # job1 fills the disk through its own log; the 40 after it cannot write theirs; the event file, past its
  # first block, cannot be written either.
  { echo 'head -c 1000000 /dev/zero'; for i in {1..40}; do echo "touch $WORK/ran$i"; done; } >"$WORK/jobs.txt"
  mkdir -p "$WORK/disk"
  # (the mount ends with its namespace: what the launcher left in LOG_DIR is listed before that)
  run --separate-stderr unshare --mount bash -c 'disk=$1 && shift && mount -t tmpfs -o size=64k mgpu-test "$disk" &&
    { "$@"; echo "rc=$?"; ls -A "$disk/logs" >"$disk.left"; }' _ "$WORK/disk" bash "$ROOT/gpu_queue.sh" --log-dir "$WORK/disk/logs" "$WORK/jobs.txt"
  assert_success
  assert_line "rc=1"
  refute_output --partial "write error"
  [[ $stderr != *"write error"* ]] || fail "a raw write error reached the terminal: $stderr"
  assert_equal "$(grep -c '^    | # command: bash -c head' <<<"$stderr")" 1 # job1's log, NUL bytes and all: its tail is shown
  assert_equal "$(grep -c 'failed job1 (exit 1, disk full' <<<"$stderr")" 1
  assert_equal "$(grep -c 'could not start, ' <<<"$stderr")" 40
  assert_equal "$(grep -c 'failed: cannot write its log .*/disk/logs/job[0-9]*_cpu_[0-9_]*\.log: No space left on device$' <<<"$stderr")" 40
  assert_equal "$(grep -c 'cannot write the event file .*(No space left on device): --status' <<<"$stderr")" 1
  assert_equal "$(grep -c 'cannot write the summary in LOG_DIR .*/disk/logs (No space left on device)' <<<"$stderr")" 1
  assert_equal "$(compgen -G "$WORK/ran*" | wc -l)" 0 # no command ran blind
  assert_equal "$(grep -c '^summary_' "$WORK/disk.left")" 0                    # nothing cut short is left behind
  assert_equal "$(grep -c '^job[0-9]*_cpu_.*\.log$' "$WORK/disk.left")" 41       # each job's (empty) log is there
  assert_equal "$(grep -c '^sweep_.*\.events$' "$WORK/disk.left")" 1
}

@test "a job whose log says its disk is full (ENOSPC, EDQUOT) or shared memory ran out fails as such and is not retried" {
  printf '%s\n' 'echo "OSError: [Errno 28] No space left on device" >&2; exit 1' \
    'echo "cannot write checkpoint: Disk quota exceeded"; exit 3' 'exit 2' \
    'echo "RuntimeError: unable to write to file </torch_4242_1234567_0>: No space left on device (28)" >&2; exit 1' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 --retries 2 "$WORK/jobs.txt"
  assert_failure 1
  assert_equal "$(jq -r '[.configs[] | "\(.failure) \(.retries)"] | join(", ")' logs/gpu_queue/summary_*.json)" \
    "disk full 0, disk full 0, error 2, shm full 0"
  assert_equal "$(jq -r '.configs[0].cause' logs/gpu_queue/summary_*.json)" \
    "a disk it writes to is full or over its quota (its log's or its output's): free some space, then run again with --resume"
  assert_equal "$(jq -r '.configs[3].cause' logs/gpu_queue/summary_*.json)" \
    "shared memory (/dev/shm) ran out: DataLoader workers pass batches through it; lower --workers, or give the container more (docker --shm-size)"
}

@test "a full TMPDIR (where the launcher keeps its records) never turns a job's success into a failure" {
  unshare --mount true 2>/dev/null || skip "needs a mount namespace (root, or CAP_SYS_ADMIN) to make a small file system"
  # job1 fills TMPDIR, so neither its end record nor job2's can be written; both exit 0
  printf '%s\n' 'head -c 1000000 /dev/zero >"$TMPDIR/fill"; exit 0' 'true' >"$WORK/jobs.txt"
  mkdir -p "$WORK/tmp"
  run --separate-stderr unshare --mount bash -c 'disk=$1 && shift && mount -t tmpfs -o size=64k mgpu-test "$disk" && TMPDIR=$disk "$@"' \
    _ "$WORK/tmp" bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt"
  assert_success
  assert_equal "$(jq -r '[.configs[] | "\(.status) \(.exit_code) \(.retries)"] | join(", ")' logs/gpu_queue/summary_*.json)" \
    "succeeded 0 0, succeeded 0 0"
}
