#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154,SC2016,SC2317  # bats: subshell tests, $stderr from run; '$VAR' in job text is meant literally; wait_for calls the small functions
# The launchers against what users' files and machines do: a flag left without its value, files saved
# on Windows, folders that cannot be made, umask 077 in a shared lock folder, a job that asks the
# terminal for a password, a job stopped by hand, processes a job leaves behind. Real bash, real
# processes, the fakes.

load test_helper

setup() {
  common_setup
  cd "$WORK" || return 1
  export MGPU_LOCK_DIR="$WORK/locks" FAKE_TRAIN_RECORD="$WORK/record.tsv"
  export MGPU_FAKE_GPUS=$SCENARIOS/4x-rtx4090-idle.json MGPU_UTIL_SAMPLES=1 MGPU_TICK_MS=50
  TRAIN=(--train-cmd "$ROOT/tests/fakes/fake-trainer")
}

teardown() {
  [[ ! -d $WORK ]] || touch "$WORK/release" # a leftover waiting for the test's word ends, should a test stop early
  local left
  for left in "$WORK"/leftover[23].pid "$WORK"/away*.pid; do [[ ! -s $left ]] || kill "$(cat "$left")" 2>/dev/null || true; done
}

queue() { run --separate-stderr bash "$ROOT/gpu_queue.sh" "$@"; }

@test "a flag whose value is missing never takes the next option for it: --log-dir --dry-run is an error, and nothing runs" {
  echo 'touch ran' >"$WORK/jobs.txt"
  queue --gpus 0 --log-dir --dry-run "$WORK/jobs.txt"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --log-dir needs a value (see --help), got the option '--dry-run'"
  queue --gpus 0 --log-dir=--dry-run "$WORK/jobs.txt"
  assert_failure 2
  run --separate-stderr bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --image-encoders a --text-encoders b --ckpt-dir --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --ckpt-dir needs a value (see --help), got the option '--dry-run'"
  run --separate-stderr bash "$ROOT/train_torchrun.sh" --gpus --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --gpus needs a value (see --help), got the option '--dry-run'"
  assert [ ! -e ran ]
  assert [ ! -e ./--dry-run ]
  # an option of sbatch's own is --sbatch-arg's value; a folder named like an option, written as a path
  queue --backend slurm --dry-run --sbatch-arg --exclusive "$WORK/jobs.txt"
  assert_success
  assert_line "    #SBATCH --exclusive"
  queue --gpus 0 --log-dir ./--odd "$WORK/jobs.txt"
  assert_success
  assert [ -e ran ]
  assert [ -d ./--odd ]
}

@test "a jobs file saved on Windows (a byte-order mark, CRLF line ends) runs its commands as written, and says so" {
  printf '\xef\xbb\xbf# results\r\nmkdir -p out && echo done >out/result.txt\r\n' >"$WORK/jobs.txt"
  queue --gpus 0 "$WORK/jobs.txt"
  assert_success
  assert_equal "$(cat out/result.txt)" "done" # written to result.txt, not "result.txt\r"
  assert_equal "$(ls out)" result.txt
  assert_line --regexp '^job2 +0 +succeeded ' # no job for the comment line: the mark did not make it a command
  refute_line --regexp '^job1 '
  assert_equal "$(grep -c WARN <<<"$stderr")" 1
  [[ $stderr == *"[WARN] jobs file '$WORK/jobs.txt' has Windows line ends (CRLF): its lines are read without their carriage returns"* ]]
}

@test "a command longer than Linux passes as one argument is refused before anything runs, naming its line; a failed long command's log tail is cut" {
  local a
  printf -v a '%*s' 131066 '' && a=${a// /a}
  printf '%s\n' 'touch ran' "echo ${a}b" >"$WORK/jobs.txt" # 131072 bytes: one too many
  queue --gpus 0 "$WORK/jobs.txt"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] jobs file '$WORK/jobs.txt' line 2: its command is 131072 bytes, and Linux passes at most 131071 bytes as one argument (bash -c LINE): put it in a script and run that"
  assert [ ! -e ran ]
  printf '%s\n' "echo ${a:19} >/dev/null; exit 3" >"$WORK/jobs.txt" # 131071 bytes, the limit: it runs (and fails)
  queue --gpus 0 "$WORK/jobs.txt"
  assert_failure 1
  assert_equal "$(jq -r '.configs[0].exit_code' logs/gpu_queue/summary_*.json)" 3
  local header
  header=$(grep -F '| # command: bash -c echo' <<<"$stderr")
  assert_equal "${#header}" $((6 + 500 + 4)) # "    | " and 500 characters of it, then " ..."
  [[ $header == *aaa\ ... ]]
}

@test "bytes that are not UTF-8 in a command (a Latin-1 or GBK file) leave the summary valid JSON, a LOG_DIR with a newline one table row a job; --compare names a summary it cannot read" {
  printf 'echo caf\xe9 \xd6\xd0\xce\xc4\necho \xe4\xb8\xad\xe6\x96\x87 \xe4\xb8\n' >"$WORK/jobs.txt"
  queue --gpus 0 "$WORK/jobs.txt"
  assert_success
  local summary=(logs/gpu_queue/summary_*.json)
  # strict: Python's json refuses a whole file over one byte that is not UTF-8
  run "$PYTHON" -c 'import json, sys; print(*(c["command"] for c in json.loads(open(sys.argv[1], "rb").read().decode())["configs"]), sep="\n")' "${summary[0]}"
  assert_success
  assert_line --index 0 $'echo caf\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd' # each stray byte one U+FFFD
  assert_line --index 1 $'echo \xe4\xb8\xad\xe6\x96\x87 \xef\xbf\xbd'                     # valid UTF-8 kept; a cut-off character replaced
  head -c 100 "${summary[0]}" >logs/gpu_queue/summary_20000101_000000.json # cut short by a full disk
  queue --compare logs/gpu_queue
  assert_success
  assert_line --regexp '^job1 +succeeded '
  assert_regex "$stderr" '^mgpu.status: left out logs/gpu_queue/summary_20000101_000000.json: Unterminated string starting at: line 1 column [0-9]+ \(char [0-9]+\)$'
  rm "${summary[0]}"
  queue --compare logs/gpu_queue
  assert_failure 1
  assert_equal "$output" ""
  assert_equal "${stderr##*$'\n'}" "mgpu.status: no readable summary_*.json in logs/gpu_queue: 1 left out (see above)"
  queue --gpus 0 --log-dir $'odd\nlogs' "$WORK/jobs.txt"
  assert_success
  run awk -F '\t' '{ print NF }' $'odd\nlogs'/summary_*.tsv
  assert_output $'16\n16\n16' # the header and two rows, each of 16 fields
}

@test "--resume knows a gpu_queue.sh job by its command, not its line: lines added, removed or listed twice, and markers an earlier version named by line" {
  printf '%s\n' 'echo a >>ran.txt' 'echo b >>ran.txt' 'echo b >>ran.txt' >"$WORK/jobs.txt"
  queue --gpus 0 "$WORK/jobs.txt"
  assert_success
  assert_equal "$(tr '\n' ' ' <ran.txt)" "a b b " # a command listed twice runs twice
  # a line added on top, the first removed, one `echo b` gone: only the new command runs
  printf '%s\n' 'echo new >>ran.txt' '# a comment' 'echo b >>ran.txt' >"$WORK/jobs.txt"
  queue --gpus 0 --resume "$WORK/jobs.txt"
  assert_success
  assert_equal "$(tr '\n' ' ' <ran.txt)" "a b b new "
  assert_equal "$(jq -r '[.configs[] | "\(.name) \(.status)"] | join(", ")' "$(find logs/gpu_queue -name 'summary_*.json' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d ' ' -f 2-)")" \
    "job1 succeeded, job3 skipped"
  # the third `echo b` is a job of its own (the second with that command: done earlier as well)
  echo 'echo b >>ran.txt' >>"$WORK/jobs.txt"
  queue --gpus 0 --resume "$WORK/jobs.txt"
  assert_success
  assert_equal "$(tr '\n' ' ' <ran.txt)" "a b b new "
  # markers named job<line> by an earlier version: one holding its line's hash counts, one of another command does not
  rm -r logs/gpu_queue/.mgpu_done ran.txt
  mkdir logs/gpu_queue/.mgpu_done
  printf '%s\n' 'echo a >>ran.txt' 'echo c >>ran.txt' >"$WORK/jobs.txt"
  local sum
  sum=$(printf '%s\0' bash -c 'echo a >>ran.txt' | sha256sum)
  echo "${sum%% *}" >logs/gpu_queue/.mgpu_done/job1
  echo "${sum%% *}" >logs/gpu_queue/.mgpu_done/job2 # job2's line is another command now
  queue --gpus 0 --resume "$WORK/jobs.txt"
  assert_success
  assert_equal "$(cat ran.txt)" "c"
  assert [ -s "$(queue_marker logs/gpu_queue 'echo c >>ran.txt')" ]
  assert [ -s "$(queue_marker logs/gpu_queue 'echo a >>ran.txt')" ] # the old marker's job: today's marker too
  printf '%s\n' 'echo new >>ran.txt' 'echo a >>ran.txt' 'echo c >>ran.txt' >"$WORK/jobs.txt" # so it stays done
  queue --gpus 0 --resume "$WORK/jobs.txt"
  assert_success
  assert_equal "$(tr '\n' ' ' <ran.txt)" "c new "
}

@test "two jobs files sharing a LOG_DIR run side by side: neither's job is 'running elsewhere' for the other's different command" {
  echo ': >a-started; until [[ -e release ]]; do sleep 0.05; done; echo a >>ran.txt' >"$WORK/a.txt"
  echo 'echo b >>ran.txt' >"$WORK/b.txt" # job1 as well: the same line number, another command
  bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/a.txt" >"$WORK/a.out" 2>&1 &
  local launcher=$! rc=0
  a_started() { [[ -e a-started ]]; }
  wait_for 20 "the first jobs file's job to start" a_started
  queue --gpus 1 "$WORK/b.txt"
  assert_success
  assert_line --regexp '^job1 +1 +succeeded '
  : >release
  wait_child 120 "$launcher"
  rc=$CHILD_RC
  assert_equal "$rc" 0
  assert_equal "$(sort ran.txt | tr '\n' ' ')" "a b "
}

@test "a folder for a jobs file, a LOG_DIR, CKPT_DIR or TMPDIR that cannot be made: errors naming it and why, exit 2" {
  echo true >"$WORK/jobs.txt"
  : >"$WORK/a-file"
  queue --gpus 0 "$WORK"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] jobs file '$WORK' is a folder: name a file of commands, one a line"
  queue --gpus 0 --log-dir "$WORK/a-file/logs" "$WORK/jobs.txt"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] LOG_DIR '$WORK/a-file/logs' cannot be made: Not a directory"
  run --separate-stderr bash "$ROOT/run_train_clip.sh" "${TRAIN[@]}" --image-encoders a --text-encoders b --ckpt-dir "$WORK/a-file/ckpt"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] CKPT_DIR '$WORK/a-file/ckpt' cannot be made: Not a directory"
  TMPDIR=$WORK/missing queue --gpus 0 "$WORK/jobs.txt"
  assert_failure 2
  assert_equal "$stderr" "[ERROR] TMPDIR '$WORK/missing': cannot make the launcher's private folder there: No such file or directory (set TMPDIR to a writable folder)"
}

@test "an open-file limit (ulimit -n) too low for the slots is refused before anything runs, naming it; a lock that cannot be opened at run time says why" {
  local line='>"started.$MGPU_CONFIG_NAME"; for i in {1..400}; do s=(started.*); ((${#s[@]} < 4)) || exit 0; sleep 0.05; done; exit 1'
  printf '%s\n' "$line" "$line" "$line" "$line" >"$WORK/jobs.txt" # each ends once all four run at once
  run --separate-stderr bash -c 'ulimit -n 18 && exec bash "$1/gpu_queue.sh" --gpus 0,1 --jobs-per-gpu 2 "$2"' _ "$ROOT" "$WORK/jobs.txt"
  assert_failure 2
  [[ $stderr =~ ^'[ERROR] the open-file limit (ulimit -n) is 18, and 4 job slot(s) need '([0-9]+)' open files (two a slot, '[0-9]+' for the launcher): its hard limit is 18: run fewer slots (--gpus, --jobs-per-gpu), or ask for a higher limit'$ ]]
  local need=${BASH_REMATCH[1]}
  assert [ ! -e started.job1 ]
  # the need it names is enough: four slots busy at once under exactly that limit
  run --separate-stderr bash -c 'ulimit -n "$3" && exec bash "$1/gpu_queue.sh" --gpus 0,1 --jobs-per-gpu 2 "$2"' _ "$ROOT" "$WORK/jobs.txt" "$need"
  assert_success
  [[ $stderr == *"summary: 4 succeeded, 0 failed"* ]]
  # a soft limit under a higher hard one: how far to raise it
  run --separate-stderr bash -c 'ulimit -Sn "$3" && exec bash "$1/gpu_queue.sh" --gpus 0,1,2,3 --jobs-per-gpu 2 --dry-run "$2"' _ "$ROOT" "$WORK/jobs.txt" "$need"
  assert_failure 2
  [[ $stderr == "[ERROR] the open-file limit (ulimit -n) is $need, and 8 job slot(s) need $((need + 8)) open files (two a slot, $((need - 8)) for the launcher): raise it (ulimit -n $((need + 8))) or run fewer slots (--gpus, --jobs-per-gpu)" ]]
  # no descriptor from 10 up left at run time: the cause is the limit, not "cannot be made"
  run bash -c 'source "$1/lib/core.sh" && source "$1/lib/lease.sh" && ulimit -n 32 || exit
    for i in {1..32}; do { exec {fd}</dev/null; } 2>/dev/null || break; done
    lease::_open "$2/x.lock" "the lock of job1" 2>&1; echo "rc=$? why=$LEASE_OPEN_WHY"' _ "$ROOT" "$WORK"
  assert_line "[ERROR] the lock of job1: cannot open the lock file $WORK/x.lock: too many open files (this launcher has reached its open-file limit, ulimit -n) (raise it, or run fewer slots)"
  assert_line "rc=2 why=too many open files (this launcher has reached its open-file limit, ulimit -n)"
}

@test "under umask 077 the lock files of a shared lock folder are still readable by all: other users can take those GPU slots" {
  echo true >"$WORK/jobs.txt"
  (umask 077 && bash "$ROOT/gpu_queue.sh" --gpus 0,1 "$WORK/jobs.txt" >/dev/null 2>&1)
  assert_equal "$(stat -c %A locks/gpu0.slot0.lock)" "-rw-r--r--"
  local marker
  marker=$(queue_marker logs/gpu_queue true)
  assert_equal "$(stat -c %A "$marker.lock")" "-rw-r--r--"
  assert_equal "$(stat -c %A "$marker")" "-rw-------" # the rest keeps the user's umask
}

@test "a job that asks the terminal for a password fails at once (its read fails) instead of hanging, stopped, shown as running" {
  printf '%s\n' 'read -r -p "Password: " pw </dev/tty || { echo "no terminal for us"; exit 3; }' 'echo other' >"$WORK/jobs.txt"
  # a terminal of its own for the launcher (util-linux script), as when a user runs it
  # (stdin not the developer's terminal: script under timeout is in the background there, and would stop)
  run timeout 60 script -qec "bash $(printf %q "$ROOT/gpu_queue.sh") --gpus 0 $(printf %q "$WORK/jobs.txt")" /dev/null </dev/null
  assert_equal "$status" 1 # not 124: nothing hung
  assert_equal "$(jq -r '[.configs[] | "\(.status) \(.exit_code)"] | join(", ")' logs/gpu_queue/summary_*.json)" "failed 3, succeeded 0"
  run cat logs/gpu_queue/job1_*.log
  assert_line --partial "read error: 0: Input/output error"
  assert_line "no terminal for us"
}

@test "Ctrl-C with a job stopped by hand (SIGSTOP): it gets CONT with its TERM, so it ends at once, not after --grace" {
  echo 'echo $$ >job.pid; echo up; exec sleep 60' >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0 --grace 100 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0 start
  up() { grep -q '^up$' logs/gpu_queue/job1_gpu0_*.log 2>/dev/null; }
  wait_for 30 "the job to start" up
  kill -STOP "$(cat job.pid)"
  start=$SECONDS
  kill -TERM "$launcher"
  wait_child 120 "$launcher"
  rc=$CHILD_RC
  assert_equal "$rc" 143
  assert [ $((SECONDS - start)) -lt 50 ] # well within --grace 100
  assert_equal "$(jq -r '.configs[0] | "\(.status) (\(.detail))"' logs/gpu_queue/summary_*.json)" \
    "interrupted (stopped within the grace period (exit 143))"
}

@test "a job's command that ends but leaves a process running: the next job's wait names the job it came from; one still running at the end is said, and in the summary" {
  printf '%s\n' '(until [[ -e release ]]; do sleep 0.05; done) & echo $! >leftover.pid' 'true' >"$WORK/jobs.txt"
  MGPU_POLL_MS=100 bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0
  waits() { grep -q "job2 waits: GPU 0 slot 0 is held by pid" "$WORK/err"; }
  wait_for 30 "the second job to wait for the first one's leftover" waits
  grep -q "job2 waits: GPU 0 slot 0 is held by pid $(cat leftover.pid): bash .* (of mgpu job job1);" "$WORK/err"
  : >release
  wait_child 120 "$launcher"
  rc=$CHILD_RC
  assert_equal "$rc" 0
  refute grep -q "run on, holding" "$WORK/err" # it ended before the sweep did: nothing to say at the end
  echo 'sleep 300 & echo $! >leftover2.pid' >"$WORK/one.txt"
  queue --gpus 0 --log-dir one "$WORK/one.txt"
  assert_success
  assert_equal "$(grep WARN <<<"$stderr")" \
    "[WARN] job1: its command ended, but 1 process(es) it started run on, holding its slot and lock until they end: $(cat leftover2.pid) sleep 300"
  assert_equal "$(jq -r '.configs[0] | "\(.status) (\(.detail))"' one/summary_*.json)" "succeeded (left running: $(cat leftover2.pid) sleep 300)"
  assert_equal "$(grep $'^end\tjob1\t' one/sweep_*.events | tail -1 | cut -f6)" "left running: $(cat leftover2.pid) sleep 300" # --status's source
  # one started with an empty environment (no MGPU_CONFIG_NAME to name its job) is its job's all the same
  echo 'env -i sleep 301 & echo $! >leftover3.pid' >"$WORK/bare.txt"
  MGPU_LOCK_DIR=$WORK/locks-bare queue --gpus 0 --log-dir bare "$WORK/bare.txt" # (the sleep 300 holds GPU 0 in locks/)
  assert_success
  assert_equal "$(jq -r '.configs[0] | "\(.status) (\(.detail))"' bare/summary_*.json)" "succeeded (left running: $(cat leftover3.pid) sleep 301)"
}

@test "a process a job starts in a session of its own (setsid) holds its slot: the next job waits for it, naming it, and one still running at the end is said" {
  # The escaped process is in no group of the job's; it holds the slot's lease all the same. Before, the
  # launcher saw the job's group end and gave the slot to job2 at once: two jobs on one slot.
  printf '%s\n' "setsid -f sh -c 'echo \$\$ >away.pid; exec sleep 302'" 'touch ran2' >"$WORK/jobs.txt"
  MGPU_POLL_MS=100 bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! away
  waits() { grep -q "job2 waits: GPU 0 slot 0 is held by pid" "$WORK/err"; }
  wait_for 30 "the second job to wait for what the first one left in a session of its own" waits
  assert [ ! -e ran2 ]
  away=$(cat away.pid)
  grep -q "job2 waits: GPU 0 slot 0 is held by pid $away: sleep 302 (of mgpu job job1);" "$WORK/err"
  kill "$away"
  wait_child 120 "$launcher"
  assert_equal "$CHILD_RC" 0
  assert [ -e ran2 ]
  # still running when the sweep ends: said, and in the summary, like a process left in the job's group
  printf '%s\n' "setsid -f sh -c 'echo \$\$ >away2.pid; exec sleep 303'" >"$WORK/one.txt"
  queue --gpus 0 --log-dir one "$WORK/one.txt"
  assert_success
  away=$(cat away2.pid)
  assert_equal "$(grep WARN <<<"$stderr")" \
    "[WARN] job1: its command ended, but 1 process(es) it started run on, holding its slot and lock until they end: $away sleep 303"
  assert_equal "$(jq -r '.configs[0] | "\(.status) (\(.detail))"' one/summary_*.json)" "succeeded (left running: $away sleep 303)"
}

@test "Ctrl-C also stops what a job left running in a session of its own (setsid), ended or still running, and its record says so" {
  # job1 ends at once, leaving its process; job2 starts one and runs on until the stop, which ends job2
  # itself (its group) but reaches that process only through job2's tie, once job2 has ended
  printf '%s\n' "setsid -f sh -c 'trap \"echo saved >saved1.txt; exit 0\" TERM; echo \$\$ >away1.pid; while :; do sleep 0.05; done'" \
    "setsid -f sh -c 'trap \"echo saved >saved2.txt; exit 0\" TERM; echo \$\$ >away2.pid; while :; do sleep 0.05; done'; : >started2; until [[ -e release ]]; do sleep 0.05; done" >"$WORK/jobs.txt"
  env --default-signal=INT bash "$ROOT/gpu_queue.sh" --gpus 0,1 --grace 5 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! away1 away2
  ended() { [[ -s away1.pid && -s away2.pid && -e started2 ]] && grep -q $'^end\tjob1\tsucceeded' logs/gpu_queue/sweep_*.events; }
  wait_for 30 "job 1 to end, leaving its process, and job 2 to start its own" ended
  away1=$(cat away1.pid) away2=$(cat away2.pid)
  kill -INT "$launcher"
  wait_child 120 "$launcher"
  assert_equal "$CHILD_RC" 130
  assert_equal "$(cat saved1.txt) $(cat saved2.txt)" "saved saved" # both got the TERM
  local pid
  for pid in "$away1" "$away2"; do assert [ ! -e "/proc/$pid" -o "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" == Z ]; done
  grep -qE "stopping (1 running job\(s\) and )?the processes 1 ended job\(s\) left running: TERM now" "$WORK/err"
  grep -q "stopping the processes 1 stopped job(s) left running in a session of their own: TERM now" "$WORK/err"
  run jq -r '.configs[] | "\(.status): \(.detail)"' logs/gpu_queue/summary_*.json
  assert_line --index 0 --regexp "^succeeded: left running, ended on the stop's TERM: $away1 sh -c trap \"echo saved "
  assert_line --index 1 --regexp "^interrupted: .*; left running, ended on the stop's TERM: $away2 sh -c trap \"echo saved "
}

@test "Ctrl-C also stops what finished jobs left running (TERM, then KILL after --grace), and their records say so" {
  # job1 ends at once, leaving a process that saves on TERM; job2 ends, leaving one that ignores TERM;
  # job3 runs until the stop
  printf '%s\n' "bash -c 'trap \"echo saved >saved.txt; exit 0\" TERM; echo \$\$ >left1.pid; while :; do sleep 0.05; done' &" \
    "bash -c 'trap \"\" TERM; echo \$\$ >left2.pid; while :; do sleep 0.05; done' &" \
    ': >started3; until [[ -e release ]]; do sleep 0.05; done' >"$WORK/jobs.txt"
  env --default-signal=INT bash "$ROOT/gpu_queue.sh" --gpus 0,1,2 --grace 2 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  local launcher=$! rc=0 pid1 pid2
  ended() { [[ -s left1.pid && -s left2.pid && -e started3 ]] && (($(grep -c $'^end\tjob[12]\tsucceeded' logs/gpu_queue/sweep_*.events) == 2)); }
  wait_for 30 "jobs 1 and 2 to end, leaving their processes, and job 3 to start" ended
  pid1=$(cat left1.pid) pid2=$(cat left2.pid)
  kill -INT "$launcher"
  wait_child 120 "$launcher"
  rc=$CHILD_RC
  assert_equal "$rc" 130
  assert_equal "$(cat saved.txt)" saved # it got the TERM
  gone() { [[ ! -e /proc/$1 || $(cut -d' ' -f3 "/proc/$1/stat") == Z ]]; } # (an orphan's zombie may stay: PID 1 here may not reap)
  gone "$pid1"
  gone "$pid2" # killed after the grace period
  # (job3 may have ended on its TERM, and been collected, before the stop's message)
  grep -qE "stopping (1 running job\(s\) and )?the processes 2 ended job\(s\) left running: TERM now, KILL after 2s" "$WORK/err"
  run jq -r '.configs[] | "\(.name) \(.status): \(.detail)"' logs/gpu_queue/summary_*.json
  # (in the order of the process table: its `sleep 0.05` may come first)
  assert_line --index 0 --regexp "^job1 succeeded: left running, ended on the stop's TERM: (.*; )?$pid1 bash -c trap "
  assert_line --index 1 --regexp "^job2 succeeded: left running, killed after grace: (.*; )?$pid2 bash -c trap "
  assert_line --index 2 --regexp "^job3 interrupted: "
  # --status tells the same: the end events carry the detail too
  local detail
  detail=$(jq -r '.configs[1].detail' logs/gpu_queue/summary_*.json)
  run bash "$ROOT/gpu_queue.sh" --status --json
  assert_success
  assert_equal "$(jq -r '.jobs[1].detail' <<<"$output")" "$detail"
}

@test "a stop that comes while the launcher sleeps, with a finished job's process left running, never hangs it (nothing in a trap reads)" {
  # bash 5.2: a `read` inside a trap cancels the timeout of the `read -t` it interrupted (core::sleep_ms),
  # which then waits for good; the stop's trap must not read (the scan of what jobs left runs after it)
  cat >"$WORK/entry.sh" <<'ENTRY'
set -Eeuo pipefail
source "$1/lib/sweep.sh"
GRACE=5 LOG_DIR=$2
sched::init
sched::new job1 "" "" "" "$2/.mgpu_done/job1"
set -m # what job1 left running: a sleep in the group of a job's process that has ended, and was reaped
{ set +m; MGPU_CONFIG_NAME=job1 sleep 300 & } &
leader=$!
set +m
wait "$leader"
pgrep -g "$leader" -x sleep >/dev/null # the sleep runs in that group
SCHED_LEFT=("0:$leader")
trap 'SCHED_STOP=${SCHED_STOP:-INT} && sched::term_all' INT # as sched::run sets it
: >"$2/sleeping"
core::sleep_ms 3000
echo "slept; stop: $SCHED_STOP"
sched::stop_all
sched::group_alive "${SCHED_LEFT[0]#*:}" || echo "what it left is gone"
ENTRY
  mkdir -p "$WORK/logs"
  env --default-signal=INT timeout 60 bash "$WORK/entry.sh" "$ROOT" "$WORK/logs" >"$WORK/out" 2>"$WORK/err" &
  local entry=$! script
  sleeping() {
    [[ -e $WORK/logs/sleeping ]] || return 1
    # in `read -t`: poll_schedule_timeout (do_select on older kernels)
    script=$(pgrep -P "$entry" bash) && [[ $(cat "/proc/$script/wchan" 2>/dev/null) == *@(poll|select)* ]]
  }
  wait_for 30 "the script to sleep in core::sleep_ms" sleeping
  kill -INT "$script"
  wait_child 90 "$entry"
  assert_equal "$CHILD_RC" 0 # not 124: the sleep ended
  run cat "$WORK/out"
  assert_line "slept; stop: INT"
  assert_line "what it left is gone"
}

@test "a process anywhere whose name holds a newline and a parenthesis never breaks a stop's scan of the process table" {
  local odd launcher rc=0 name=$'x) 1 2\nZ' # a process name (comm) of "x) 1 2<newline>Z": a script's is its file's
  printf '#!/bin/sh\nuntil [ -e "%s/release" ]; do sleep 0.05; done\n' "$WORK" >"$WORK/$name" # ends at teardown
  chmod +x "$WORK/$name"
  "$WORK/$name" 3>&- &
  odd=$!
  named() { [[ $(cat "/proc/$odd/comm" 2>/dev/null) == "$name" ]]; }
  wait_for 10 "the oddly named process to run" named
  # the one reader of /proc/PID/stat agrees with procps' on its parent, group and session
  run bash -c 'source "$1/lib/core.sh" && core::proc_stat "$2" && echo "${CORE_STAT[*]:1:3}"' _ "$ROOT" "$odd"
  assert_success
  assert_output "$(ps -o ppid=,pgid=,sid= -p "$odd" | xargs)"
  run bash -c 'source "$1/lib/core.sh" && core::proc_stat 999999999' _ "$ROOT"
  assert_failure
  echo 'echo up; exec sleep 60' >"$WORK/jobs.txt"
  bash "$ROOT/gpu_queue.sh" --gpus 0 "$WORK/jobs.txt" >"$WORK/out" 2>"$WORK/err" &
  launcher=$!
  up() { grep -q '^up$' logs/gpu_queue/job1_gpu0_*.log 2>/dev/null; }
  wait_for 30 "the job to start" up
  kill -TERM "$launcher"
  wait_child 120 "$launcher"
  rc=$CHILD_RC
  : >release
  assert_equal "$rc" 143 # not 1: "fields[2]: unbound variable" in the scan
  assert_equal "$(jq -r '.configs[0] | "\(.status) (\(.detail))"' logs/gpu_queue/summary_*.json)" \
    "interrupted (stopped within the grace period (exit 143))"
}
