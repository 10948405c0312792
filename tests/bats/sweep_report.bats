#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154,SC2016,SC2317  # bats: subshell tests, $stderr from run; wait_for calls the small functions
# A running sweep seen from another terminal (--status, --watch), one table across sweeps (--compare),
# and what the summaries say (--json, gpu_queue.sh's commands).

load test_helper

setup() {
  common_setup
  cd "$WORK" || return 1
  export MGPU_LOCK_DIR="$WORK/locks" FAKE_TRAIN_RECORD="$WORK/record.tsv" MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json
  export MGPU_UTIL_SAMPLES=1 MGPU_TICK_MS=50
  # a trainer that prints the real trainer's progress lines, one step a tick, until its release file exists
  # (--train-cmd splits at spaces: it lives outside the work folder, whose name has spaces)
  cat >"$BATS_TEST_TMPDIR/stepper" <<'SH'
#!/usr/bin/env bash
for ((i = 1; i <= 100; i++)); do
  echo "step $i/100 ($i%) loss 0.$((100 - i)) samples/s 50 ETA $((100 - i))s"
  [[ -e $STEP_RELEASE ]] && exit 0
  sleep 0.05
done
SH
  chmod +x "$BATS_TEST_TMPDIR/stepper"
  export STEP_RELEASE=$WORK/release
}

report() { run --separate-stderr bash "$ROOT/run_train_clip.sh" "$@"; }

@test "--status from another terminal: running (GPU, step/total, loss, ETA), queued, waiting, then done" {
  local scenario
  scenario=$(scenario_copy 4x-rtx4090-gpu2-busy)
  MGPU_FAKE_GPUS=$scenario bash "$ROOT/run_train_clip.sh" --train-cmd "$BATS_TEST_TMPDIR/stepper" --gpus 0,2 \
    --image-encoders a,b,c --text-encoders t >"$WORK/out" 2>"$WORK/err" &
  local launcher=$!
  stepping() { grep -q '^step [1-9][0-9]*/100' logs/clip_training/a_t_gpu0_*.log 2>/dev/null; }
  wait_for 30 "a_t to print progress" stepping
  waiting() { grep -q $'^wait\tb_t\t' logs/clip_training/sweep_*.events 2>/dev/null; }
  wait_for 30 "b_t to wait for the busy GPU 2" waiting
  report --status
  assert_success
  assert_line --index 1 --regexp "^running for [0-9]+s, launcher pid $launcher on "
  assert_line --regexp '^a_t +running +0 +[0-9]+s +[0-9]+/100 +0\.[0-9]+ +[0-9]+s +-$'
  assert_line --regexp '^b_t +waiting +- +- +- +- +- +GPU 2 is busy: utilization 95% .* > MAX_UTIL 70%$'
  assert_line --regexp '^c_t +queued '
  report --status --json
  assert_success
  assert_equal "$(jq -r '[.launcher_alive, (.jobs[0] | .state, .gpu, .total)] | map(tostring) | join(" ")' <<<"$output")" "true running 0 100"
  : >"$STEP_RELEASE"
  set_util "$scenario" 2 0
  wait "$launcher"
  report --status logs/clip_training
  assert_success
  assert_line --index 1 --regexp '^finished after [0-9]+s \(exit 0\)$'
  assert_line --regexp '^c_t +succeeded \(0\) +(0|2) '
}

@test "--status --watch redraws until the sweep ends; --status says when the launcher died without a summary" {
  bash "$ROOT/run_train_clip.sh" --train-cmd "$BATS_TEST_TMPDIR/stepper" --gpus 0 --image-encoders a --text-encoders t >/dev/null 2>&1 &
  local launcher=$!
  stepping() { grep -q '^step [1-9]' logs/clip_training/a_t_gpu0_*.log 2>/dev/null; }
  wait_for 30 "a_t to print progress" stepping
  # the job ends only once the watch has drawn it running: the watch draws at least twice, whatever the load
  bash "$ROOT/run_train_clip.sh" --status --watch 0.2 >"$WORK/watch" 2>"$WORK/watch.err" &
  local watch=$!
  drawn() { grep -q '^a_t  *running' "$WORK/watch"; }
  wait_for 60 "the watch to draw a_t running" drawn
  : >"$STEP_RELEASE"
  local rc=0
  wait "$watch" || rc=$?
  wait "$launcher"
  assert_equal "$rc" 0
  run cat "$WORK/watch"
  assert [ "$(grep -c '^config  *state' <<<"$output")" -ge 2 ] # drawn more than once
  assert_line --regexp '^finished after [0-9]+s \(exit 0\)$'
  rm -f "$STEP_RELEASE"
  rm -rf logs
  bash "$ROOT/run_train_clip.sh" --train-cmd "$BATS_TEST_TMPDIR/stepper" --gpus 0 --image-encoders a --text-encoders t >/dev/null 2>&1 &
  launcher=$!
  wait_for 30 "a_t to print progress" stepping
  kill -KILL "$launcher"
  wait "$launcher" || true
  report --status
  assert_success
  assert_line --index 1 --partial "the launcher (pid $launcher) is gone without a summary"
  : >"$STEP_RELEASE" # the orphaned job ends on its own
  report --status --watch 5 # a dead launcher ends the watch at once
  assert_success
}

@test "--compare: every config of every sweep in LOG_DIR, with the hyper-parameters that vary, best first" {
  cat >"$WORK/grid.json" <<'JSON'
{"image_encoders": ["a"], "text_encoders": ["t"], "args": {"lr": [0.1, 0.2, 0.3]}}
JSON
  cat >"$BATS_TEST_TMPDIR/metric-trainer" <<'SH'
#!/usr/bin/env bash
while (($#)); do [[ $1 == --output-dir ]] && out=$2; [[ $1 == --lr ]] && lr=$2; shift; done
echo "{\"key_metric\": \"image_to_text_R@1\", \"image_to_text_R@1\": $lr, \"val_loss\": 1.5}" >"$out/metrics.json"
SH
  chmod +x "$BATS_TEST_TMPDIR/metric-trainer"
  report --train-cmd "$BATS_TEST_TMPDIR/metric-trainer" --gpus 0 --config-file "$WORK/grid.json"
  assert_success
  report --train-cmd "$BATS_TEST_TMPDIR/metric-trainer" --gpus 0 --image-encoders b --text-encoders t
  assert_success
  assert_equal "$(find logs/clip_training -name "summary_*.json" | wc -l)" 2 # two sweeps in one second: two summaries
  report --compare
  assert_success
  assert_line --index 0 --regexp '^config +lr +status +seconds +image_to_text_R@1$'
  assert_equal "$(awk 'NR > 1 { print $1 }' <<<"$output" | tr '\n' ' ')" "a_t_lr0.3 a_t_lr0.2 a_t_lr0.1 b_t "
  assert_line --regexp '^a_t_lr0.3 +0.3 +succeeded +[0-9.]+ +0.3000$'
  assert_line --regexp '^b_t +- +succeeded +[0-9.]+ +-$'
  report --compare logs/clip_training --json
  assert_success
  assert_equal "$(jq -r '.[0] | [.config, .params.lr, .value, .metrics.val_loss] | map(tostring) | join(" ")' <<<"$output")" \
    "a_t_lr0.3 0.3 0.3 1.5"
}

@test "--status and --compare with nothing to read say so, exit 1; --watch needs --status" {
  report --status
  assert_failure 1
  assert_regex "$stderr" '^mgpu.status: no sweep in logs/clip_training '
  report --compare "$WORK/empty"
  assert_failure 1
  assert_regex "$stderr" "no summary_\*.json in $WORK/empty"
  report --watch 2
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --watch redraws --status: give --status too"
  report --status --watch soon
  assert_failure 2
}

@test "gpu_queue.sh: the summary shows each job's command" {
  printf 'echo one\n# a comment\nexit 3\n' >"$WORK/jobs.txt"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt"
  assert_failure 1
  assert_line --index 0 --regexp '^config +gpu +status .* +log +command$'
  assert_line --regexp '^job1 +0 +succeeded .* +echo one$'
  assert_line --regexp '^job3 +0 +failed .* +exit 3$'
  assert_equal "$(jq -r '[.configs[].command] | join("|")' logs/gpu_queue/summary_*.json)" "echo one|exit 3"
  run --separate-stderr bash "$ROOT/gpu_queue.sh" --status
  assert_success
  assert_line --regexp '^job3 +failed \(3\) '
}
