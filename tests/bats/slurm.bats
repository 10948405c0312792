#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154,SC2016  # bats: subshell tests, $stderr from run; '$VAR' in job text is meant literally
# --backend slurm and train_slurm.sbatch against a real one-node Slurm (slurmctld + slurmd + munged
# started by tests/slurm/cluster.sh with four fake GPUs), the fake trainer and the real (DDP) trainer.
# The preemption tests interrupt real training runs and compare their final weights with a run that was
# never interrupted (started in the background by setup_file, shared by the single-process tests).

load test_helper

# A real training run small enough for the preemption tests: 30 steps (5 epochs of 6), a line a step.
TINY_TOWERS=(--image-encoder starnet_s050 --text-encoder clip:tiny)
TINY_TRAIN=(--embed-dim 32 --image-size 32 --train-size 48 --val-size 13 --batch-size 8 --workers 0 --warmup 2
  --lr 1e-3 --max-steps 30 --log-every 1)

setup_file() {
  export BATS_NO_PARALLELIZE_WITHIN_FILE=true # one cluster, shared in order
  CLUSTER=$BATS_FILE_TMPDIR/cluster
  export CLUSTER
  SLURM_CONF=$(bash "$BATS_TEST_DIRNAME/../slurm/cluster.sh" start "$CLUSTER" 4)
  export SLURM_CONF
  # The uninterrupted references of the preemption tests, one process and two DDP ranks, one after the
  # other in the background. Tasks run with OMP_NUM_THREADS = --cpus-per-task = 1: so do they (same sums).
  mkdir -p "$BATS_FILE_TMPDIR/ref"
  (
    cd "$BATS_FILE_TMPDIR/ref" || exit 1
    export OMP_NUM_THREADS=1 PYTHON=$ROOT/.venv/bin/python
    PYTHONPATH=$ROOT/py "$PYTHON" -m mgpu.train_clip "${TINY_TOWERS[@]}" "${TINY_TRAIN[@]}" --output-dir one >one.log 2>&1 &&
      touch one.done
    NPROC_PER_NODE=2 bash "$ROOT/train_torchrun.sh" "${TINY_TOWERS[@]}" "${TINY_TRAIN[@]}" --output-dir two >two.log 2>&1 &&
      touch two.done
  ) 3>&- &
}

teardown_file() {
  bash "$BATS_TEST_DIRNAME/../slurm/cluster.sh" stop "$CLUSTER"
}

setup() {
  common_setup
  cd "$WORK" || return 1
  export FAKE_TRAIN_RECORD="$WORK/record.tsv" MGPU_SLURM_POLL_S=1
  TRAIN=(--train-cmd "$ROOT/tests/fakes/fake-trainer")
}

slurm_sweep() { run --separate-stderr timeout 180 bash "$ROOT/run_train_clip.sh" --backend slurm "${TRAIN[@]}" "$@"; }
summary() { jq -r "$1" logs/clip_training/summary_*.json; }
# max_overlap — the most fake-trainer runs at once, from the record
max_overlap() {
  awk -F'\t' '{ print $4, ($2 == "start" ? 1 : -1) }' "$FAKE_TRAIN_RECORD" |
    sort -k1,1n -k2,2n | awk '{ n += $2; if (n > m) m = n } END { print m + 0 }'
}
# same_weights A B — "equal" when the two model.pt files hold torch.equal tensors under the same names
same_weights() {
  "$ROOT/.venv/bin/python" -c 'import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in sys.argv[1:])
bad = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
print("equal" if not bad else "differ: " + " ".join(bad))' "$1" "$2"
}
# reference one|two — the uninterrupted run's model.pt (one process, or two DDP ranks), once setup_file's
# background run has written it
reference() {
  local ref=$BATS_FILE_TMPDIR/ref
  wait_for 300 "the reference training run ($1)" test -e "$ref/$1.done" || { cat "$ref/$1.log" >&2; return 1; }
  echo "$ref/$1/model.pt"
}
# job_procs ID — how many live processes (zombies excluded) still belong to Slurm job ID (its environment)
job_procs() {
  local env pid n=0 state
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/} pid=${pid%/environ}
    tr '\0' '\n' 2>/dev/null <"$env" | grep -qx -e "SLURM_JOB_ID=$1" -e "SLURM_ARRAY_JOB_ID=$1" || continue
    read -r state < <(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null) || continue
    [[ $state == Z ]] || n=$((n + 1))
  done
  echo "$n"
}
# trainer_pids ID — the pids of Slurm job ID's trainer processes (every rank; not torchrun), one a line
trainer_pids() {
  local env pid cmd
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/} pid=${pid%/environ}
    tr '\0' '\n' 2>/dev/null <"$env" | grep -qx -e "SLURM_JOB_ID=$1" -e "SLURM_ARRAY_JOB_ID=$1" || continue
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || continue
    [[ $cmd == *"-m mgpu.train_clip"* && $cmd != *torch.distributed.run* ]] && echo "$pid"
  done
  return 0
}
# runs_started N — the fake trainer has started N times
runs_started() { [[ $(count_lines '	start	' "$FAKE_TRAIN_RECORD") == "$1" ]]; }
# real_sweep ARGS... — run_train_clip.sh --backend slurm with the real trainer on the tiny run
real_sweep() {
  PYTHON=$ROOT/.venv/bin/python run --separate-stderr timeout 180 bash "$ROOT/run_train_clip.sh" --backend slurm \
    --cpus-per-task 1 --image-encoders starnet_s050 --text-encoders clip:tiny "$@" -- "${TINY_TRAIN[@]}"
}
# at_step N FILE — FILE's trainer has logged step N (or later)
at_step() { awk -v n="$1" -F'[ /]' '/^step [0-9]+\// && $2 >= n { f = 1 } END { exit !f }' "$2" 2>/dev/null; }

# wait_job ID — until Slurm no longer lists the job (at most two minutes)
wait_job() {
  local i
  for ((i = 0; i < 1200; i++)); do
    [[ -z $(squeue -h -j "$1" 2>/dev/null) ]] && return 0
    sleep 0.1
  done
  echo "job $1 still queued after 2 minutes" >&2
  return 1
}

@test "a task whose command ends before the task's script first looks at it still records its exit status (the script ended on an unset variable, its record unwritten)" {
  cat >"$WORK/task.sh" <<'TASK'
set -Eeuo pipefail
source "$1/lib/core.sh"
source "$1/lib/slurm_job.sh"
# the first look comes after the command ended (a loaded machine descheduled this shell after the fork)
slurm_job::_alive() {
  local stat="" i
  for ((i = 0; i < 100; i++)); do
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]] || return 1
    sleep 0.05
  done
  echo "the command did not end within 5 s" >&2
  exit 9
}
slurm_job::run "$2" bash -c 'echo hi; exit 3'
echo "rc=$SJ_RC"
TASK
  run --separate-stderr timeout 60 bash "$WORK/task.sh" "$ROOT" "$WORK/task.log"
  assert_success
  assert_output "rc=3"
  assert_equal "$stderr" ""
  grep -qx hi "$WORK/task.log"
}

@test "six configs on Slurm: one array, a GPU a task, the local names, logs, outputs and summary" {
  FAKE_TRAIN_SLEEP=2 slurm_sweep --wait --max-parallel 3 --cpus-per-task 1 --image-encoders s1,s2,s3 \
    --text-encoders clip:ViT-B/32,bert-base-chinese -- --epochs 2
  assert_success
  assert_equal "$(summary '"\(.succeeded) \(.failed)"')" "6 0"
  assert_equal "$(summary '[.configs[].name] | join(" ")')" \
    "s1_clip_ViT-B_32 s1_bert-base-chinese s2_clip_ViT-B_32 s2_bert-base-chinese s3_clip_ViT-B_32 s3_bert-base-chinese"
  assert_equal "$(summary '[.configs[] | .reason | test("^Slurm job [0-9]+_[0-5] on ")] | all')" true
  # Slurm gave each task one GPU; --max-parallel 3 held the array to three at a time
  assert_equal "$(cut -f2,3 "$FAKE_TRAIN_RECORD" | awk '$1 == "start" && $2 !~ /^[0-3]$/' | wc -l)" 0
  assert_equal "$(max_overlap)" 3
  assert_equal "$(awk -F'\t' '$2 == "start" { print $6 }' "$FAKE_TRAIN_RECORD" | sort -u)" 1
  run cut -f1,2,7 "$FAKE_TRAIN_RECORD"
  assert_line "s2_clip_ViT-B_32	start	--image-encoder s2 --text-encoder clip:ViT-B/32 --output-dir checkpoints/clip_models/s2_clip_ViT-B_32 --epochs 2"
  run ls logs/clip_training
  assert_line --regexp '^s1_clip_ViT-B_32_gpu[0-3]_[0-9]{8}_[0-9]{6}\.log$'
  assert [ -f checkpoints/clip_models/s3_bert-base-chinese/metrics.json ]
  assert [ -s checkpoints/clip_models/s3_bert-base-chinese/.mgpu_done ]
  assert_equal "$(summary '.configs[5].metrics.val_r1')" 0.5
  run cat logs/clip_training/slurm_*/sweep.sbatch
  assert_line "#SBATCH --array=0-5%3"
  assert_line "#SBATCH --gres=gpu:1"
  assert_line "#SBATCH --cpus-per-task=1"
  assert_line "#SBATCH --chdir=\"$WORK\""
}

@test "--dry-run prints the batch script and each command, from flags and SBATCH_* settings; nothing is submitted" {
  SBATCH_TIMELIMIT=30 SBATCH_PARTITION=debug slurm_sweep --dry-run --mem 2G --sbatch-arg=--constraint=fast \
    --image-encoders s1 --text-encoders t1,t2
  assert_success
  assert_line --index 0 "Plan: 2 job(s) as one Slurm job array (gpu:1 a task); the batch script:"
  assert_line "    #SBATCH --array=0-1"
  assert_line "    #SBATCH --partition=debug"
  assert_line "    #SBATCH --time=30"
  assert_line "    #SBATCH --mem=2G"
  assert_line "    #SBATCH --constraint=fast"
  assert_line --regexp '^task 1 s1_t2: MGPU_CONFIG_NAME=s1_t2 .*fake-trainer --image-encoder s1 --text-encoder t2 --output-dir checkpoints/clip_models/s1_t2 $'
  assert_equal "$(squeue -h | wc -l)" 0
  run ls logs/clip_training
  refute_output --partial slurm_
}

@test "a failed config, --status at any time, and --resume resubmitting only what did not finish" {
  FAKE_TRAIN_FAIL=s2_t1 slurm_sweep --wait --image-encoders s1,s2 --text-encoders t1
  assert_failure 1
  assert_equal "$(summary '[.configs[] | "\(.name):\(.status):\(.exit_code):\(.failure)"] | join(" ")')" \
    "s1_t1:succeeded:0:null s2_t1:failed:7:error"
  [[ $stderr == *"    | RuntimeError: configured to fail"* ]]
  run --separate-stderr bash "$ROOT/run_train_clip.sh" --backend slurm --status
  assert_success
  assert_line --regexp '^s2_t1 +[0-3] +failed +7 \(error\) '
  [[ $stderr == *"Slurm job array "*": 1 succeeded, 1 failed ("* ]]
  rm logs/clip_training/summary_*
  : >"$FAKE_TRAIN_RECORD"
  slurm_sweep --wait --resume --image-encoders s1,s2 --text-encoders t1
  assert_success
  assert_equal "$(cut -f1,2 "$FAKE_TRAIN_RECORD" | grep -c start)" 1
  assert_equal "$(summary '[.configs[] | "\(.name):\(.status)"] | join(" ")')" "s2_t1:succeeded"
  [[ $stderr == *"skipping s1_t1: done earlier"* ]]
}

@test "scancel: the running task's processes get TERM and it is recorded as interrupted" {
  FAKE_TRAIN_SLEEP=120 slurm_sweep --image-encoders s1 --text-encoders t1
  assert_success
  local dir job_id i
  dir=$(echo logs/clip_training/slurm_*)
  job_id=$(<"$dir/job_id")
  for ((i = 0; i < 600; i++)); do grep -q start "$FAKE_TRAIN_RECORD" 2>/dev/null && break; sleep 0.1; done
  local pid
  pid=$(cut -f5 "$FAKE_TRAIN_RECORD")
  run bash "$ROOT/run_train_clip.sh" --backend slurm --status
  assert_line --regexp '^s1_t1 +[0-3] +running '
  scancel "$job_id"
  wait_job "$job_id"
  slurm_sweep --status
  assert_line --regexp '^s1_t1 +[0-3] +interrupted +143 \(signal TERM\) '
  run live_in_group "$pid"
  assert_output 0
  assert [ ! -e checkpoints/clip_models/s1_t1/.mgpu_done ]
}

@test "gpu_queue.sh --backend slurm runs a jobs file as one array" {
  printf 'echo "gpu=$CUDA_VISIBLE_DEVICES name=$MGPU_CONFIG_NAME"\nexit 3\n' >jobs.txt
  run --separate-stderr timeout 120 bash "$ROOT/gpu_queue.sh" --backend slurm --wait jobs.txt
  assert_failure 1
  assert_equal "$(jq -r '[.configs[] | "\(.name):\(.status):\(.exit_code)"] | join(" ")' logs/gpu_queue/summary_*.json)" \
    "job1:succeeded:0 job2:failed:3"
  run cat logs/gpu_queue/job1_gpu*.log
  assert_output --regexp '^gpu=[0-3] name=job1$'
  assert [ -s "$(queue_marker logs/gpu_queue 'echo "gpu=$CUDA_VISIBLE_DEVICES name=$MGPU_CONFIG_NAME"')" ]
}

@test "bad Slurm settings exit 2 naming the setting, the value and what is allowed" {
  slurm_sweep --time soon
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --time must be a Slurm time limit like 90, 4:00:00 or 2-00:00:00, got 'soon'"
  slurm_sweep --signal-lead 0
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --signal-lead must be an integer from 1 to 65535, got '0'"
  MGPU_SLURM_WATCH_S=0 slurm_sweep
  assert_failure 2
  assert_equal "$stderr" "[ERROR] MGPU_SLURM_WATCH_S must be an integer from 1 to 3600, got '0'"
  slurm_sweep --gpus-per-job 2 --gres gpu:a100:1
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --gpus-per-job 2 asks for 2 GPUs a task, but --gres (or SBATCH_GRES) is 'gpu:a100:1': give one of them, or a --gres with gpu:2"
  slurm_sweep --partition 'a b'
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --partition must be a Slurm name like gpu or gpu:a100:1 (letters, digits, _.:,=-), got 'a b'"
  slurm_sweep --sbatch-arg 'x'
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --sbatch-arg must be one sbatch option like --constraint=a100 (no quotes or newlines), got 'x'"
  run --separate-stderr bash "$ROOT/run_train_clip.sh" --wait
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --wait and --requeue are for Slurm sweeps: add --backend slurm"
  run --separate-stderr bash "$ROOT/run_train_clip.sh" --requeue
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --wait and --requeue are for Slurm sweeps: add --backend slurm"
  slurm_sweep --status
  assert_failure 1
  assert_equal "$stderr" "[ERROR] no submitted Slurm sweep in logs/clip_training (--status reads LOG_DIR/slurm_*/)"
  run --separate-stderr bash "$ROOT/train_torchrun.sh" --slurm --dry-run
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --slurm runs inside a Slurm allocation (sbatch train_slurm.sbatch, or salloc); SLURM_JOB_ID is not set here"
}

@test "train_slurm.sbatch: srun starts a torchrun per task, which meet at the first node (real DDP, world size 2)" {
  local job_id
  job_id=$(PYTHON=$ROOT/.venv/bin/python NPROC_PER_NODE=1 MGPU_ROOT=$ROOT sbatch --parsable --nodes=1 --ntasks=2 \
    --ntasks-per-node=2 --gres=gpu:0 --cpus-per-task=1 --time=10 --output="$WORK/ddp_%j.out" "$ROOT/train_slurm.sbatch" \
    --image-encoder starnet_s050 --text-encoder clip:tiny --embed-dim 32 --image-size 32 --train-size 48 \
    --val-size 13 --batch-size 8 --workers 0 --warmup 2 --no-tb --max-steps 2 --output-dir out)
  wait_job "$job_id"
  run cat "$WORK/ddp_$job_id.out"
  assert_line --regexp "^\[INFO\] Using 2 CPU processes for training .*\(Slurm job $job_id: 2 torchrun agent\(s\) x 1 processes; rendezvous at [^:]+:[0-9]+\)$"
  assert_line "parameters identical on all 2 ranks"
  assert_equal "$(jq -r '"\(.world_size) \(.completed)"' out/metrics.json)" "2 true"
}

@test "--dry-run with --requeue, --retries and --gpus-per-job: requeue, signal and gres lines; torchrun over each task's GPUs" {
  # the real trainer: its parser checks the arguments first (so real encoder names)
  run --separate-stderr bash "$ROOT/run_train_clip.sh" --backend slurm --dry-run --requeue \
    --signal-lead 300 --retries 2 --gpus-per-job 2 --image-encoders starnet_s050 --text-encoders clip:tiny -- --epochs 1
  assert_success
  assert_line --index 0 "Plan: 1 job(s) as one Slurm job array (gpu:2 a task); the batch script:"
  assert_line "    #SBATCH --gres=gpu:2"
  assert_line "    #SBATCH --requeue"
  assert_line "    #SBATCH --signal=B:USR1@300"
  assert_line "    #SBATCH --open-mode=append"
  assert_line "task 0 starnet_s050_clip_tiny: MGPU_CONFIG_NAME=starnet_s050_clip_tiny env PYTHON=$(printf %q "$PYTHON") NPROC_PER_NODE=2 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 bash $(printf %q "$ROOT/train_torchrun.sh") --image-encoder starnet_s050 --text-encoder clip:tiny --output-dir checkpoints/clip_models/starnet_s050_clip_tiny --epochs 1 "
  # --retries alone makes the tasks requeue-able, without the warning signal
  slurm_sweep --dry-run --retries 1 --image-encoders s1 --text-encoders t1
  assert_line "    #SBATCH --requeue"
  refute_line --partial "--signal="
}

@test "--requeue: a trainer told to stop (scancel --signal=USR1 --batch) saves on every rank, requeues and resumes to the weights of an uninterrupted run" {
  # two GPUs a task: torchrun runs both ranks, each in a session of its own (the stop must reach them)
  real_sweep --requeue --gpus-per-job 2
  assert_success
  local dir job_id log pids
  dir=$(echo logs/clip_training/slurm_*)
  job_id=$(<"$dir/job_id")
  wait_for 120 "the task's log" compgen -G 'logs/clip_training/starnet_s050_clip_tiny_gpu*.log'
  log=$(echo logs/clip_training/starnet_s050_clip_tiny_gpu*.log)
  wait_for 120 "step 3 in $log" at_step 3 "$log"
  mapfile -t pids < <(trainer_pids "$job_id")
  assert_equal "${#pids[@]}" 2
  kill -STOP "${pids[@]}" # held at a known step while the stop request travels
  scancel --signal=USR1 --batch "${job_id}_0"
  wait_for 30 "the task's stop request" grep -q "got SIGUSR1 (preemption notice" "$log"
  kill -CONT "${pids[@]}"
  wait_for 60 "the requeue record" test -s "$dir/task0.requeues"
  run bash "$ROOT/run_train_clip.sh" --backend slurm --status
  assert_line --regexp '^starnet_s050_clip_tiny +[0-9,]+ +(running|completing|pending|requeued) \(preempted \(requeued\)\) +- +1 '
  wait_job "$job_id"
  run bash "$ROOT/run_train_clip.sh" --backend slurm --status
  assert_line --regexp '^starnet_s050_clip_tiny +[0-9,]+ +succeeded \(preempted \(requeued\)\) +0 +1 '
  assert_equal "$(cut -f1,2 "$dir/task0.requeues")" "preempted	preempted (requeued)" # exit 1: torchrun's, after its workers saved
  run cat logs/clip_training/starnet_s050_clip_tiny_gpu*.log
  assert_line --regexp '^\[WARNING\] stopped by signal [0-9]+ at step [0-9]+ of 30; checkpoint saved'
  assert_line --regexp '^resumed from checkpoints/clip_models/starnet_s050_clip_tiny/checkpoint_[0-9]+\.pt at step [0-9]+ of 30$'
  assert_line "parameters identical on all 2 ranks"
  assert_equal "$(same_weights checkpoints/clip_models/starnet_s050_clip_tiny/model.pt "$(reference two)")" equal
  assert_equal "$(compgen -G 'checkpoints/clip_models/starnet_s050_clip_tiny/tb/events.*' | wc -l)" 2 # one run, two files
  assert_equal "$(job_procs "$job_id")" 0
}

@test "--requeue and a short --time: the time limit stops the trainer before the end; it saves, requeues and resumes to the same weights" {
  real_sweep --requeue --time 1 --signal-lead 55
  assert_success
  local dir job_id
  dir=$(echo logs/clip_training/slurm_*)
  job_id=$(<"$dir/job_id")
  # the one-minute limit, Slurm's kill wait, and a trainer that may still be importing torch on a loaded machine
  wait_for 150 "the requeue record" test -s "$dir/task0.requeues"
  scontrol update JobId="${job_id}_0" TimeLimit=10 # the next run has the time to finish
  wait_job "$job_id"
  run bash "$ROOT/run_train_clip.sh" --backend slurm --status
  assert_line --regexp '^starnet_s050_clip_tiny +[0-3] +succeeded \(time limit \(requeued\)\) +0 +1 '
  run cat logs/clip_training/starnet_s050_clip_tiny_gpu*.log
  # whichever comes first within the one-minute limit: the time-limit watch, or Slurm's own warning (sent
  # up to a minute early: Slurm checks signals at its own pace), both asking for a checkpoint
  assert_line --regexp '^mgpu: ([0-9]+s left before the time limit \(--signal-lead 55\)|got SIGUSR1 \(time limit, [0-9]+s left\)): asking the job to checkpoint and stop$'
  assert_line --regexp '^resumed from .*/checkpoint_[0-9]+\.pt at step [0-9]+ of 30$'
  assert_equal "$(same_weights checkpoints/clip_models/starnet_s050_clip_tiny/model.pt "$(reference one)")" equal
  assert_equal "$(job_procs "$job_id")" 0
}

@test "a short --time without --requeue: the task stops its job before the end (it saves); the summary says time limit (no requeue)" {
  FAKE_TRAIN_SLEEP=300 FAKE_TRAIN_ON_TERM=save slurm_sweep --wait --time 1 --signal-lead 55 --image-encoders s1 --text-encoders t1
  assert_failure 1
  assert_equal "$(summary '.configs[0] | "\(.status) \(.exit_code) \(.failure) \(.detail) \(.retries)"')" \
    "failed 143 time limit time limit (no requeue) 0"
  assert_line --regexp '^s1_t1 +[0-3] +failed \(time limit \(no requeue\)\) +143 \(time limit\) +0 '
  assert [ -e checkpoints/clip_models/s1_t1/checkpoint_1.pt ]
  assert_equal "$(cut -f2 "$FAKE_TRAIN_RECORD")" "start"$'\n'"term"
  run grep -c -e --requeue -e --signal logs/clip_training/slurm_*/sweep.sbatch
  assert_output 0
}

@test "a task Slurm requeues itself (a preemption's TERM) runs again with --resume auto and is counted as preempted (requeued)" {
  FAKE_TRAIN_SLEEP=300 FAKE_TRAIN_ON_TERM=save slurm_sweep --image-encoders s1 --text-encoders t1
  assert_success
  local dir job_id
  dir=$(echo logs/clip_training/slurm_*)
  job_id=$(<"$dir/job_id")
  wait_for 60 "the first run" grep -q start "$FAKE_TRAIN_RECORD"
  scontrol requeue "${job_id}_0"
  wait_for 60 "the second run" runs_started 2
  run tail -n 1 "$FAKE_TRAIN_RECORD"
  assert_output --regexp '	--image-encoder s1 --text-encoder t1 --output-dir checkpoints/clip_models/s1_t1 --resume auto$'
  run bash "$ROOT/run_train_clip.sh" --backend slurm --status
  assert_line --regexp '^s1_t1 +[0-3] +running \(preempted \(requeued\)\) +- +1 '
  scancel "$job_id"
  wait_job "$job_id"
  assert_equal "$(awk -F'\t' '$2 == "term" { print $5 }' "$FAKE_TRAIN_RECORD" | sort -u | wc -l)" 2 # each run's trainer
  assert_equal "$(job_procs "$job_id")" 0
}

@test "--retries 1 on Slurm: a task that fails once is requeued and succeeds; the summary counts the requeue" {
  printf '%s\n' '[[ -e ran_once ]] || { touch ran_once; echo "first run fails"; exit 3; }; echo "run after $MGPU_RESTART requeue(s)"' >jobs.txt
  run --separate-stderr timeout 120 bash "$ROOT/gpu_queue.sh" --backend slurm --wait --retries 1 jobs.txt
  assert_success
  assert_equal "$(jq -r '.configs[0] | "\(.status) \(.retries) \(.detail)"' logs/gpu_queue/summary_*.json)" \
    "succeeded 1 error (requeued)"
  assert_equal "$(jq -r '.configs[0].failed_attempts[0] | test("^error \\(requeued\\) \\(exit 3 on GPU [0-3]\\)$")' logs/gpu_queue/summary_*.json)" true
  run cat logs/gpu_queue/job1_gpu*.log
  assert_line "first run fails"
  assert_line "run after 1 requeue(s)"
}

@test "train_slurm.sbatch --requeue: USR1 to the batch shell reaches both ranks (srun + torchrun) as TERM; they save, the job requeues and resumes to the same weights; neither run leaves a file of mgpu in TMPDIR" {
  local job_id pids out
  mkdir "$WORK/tmp"
  job_id=$(TMPDIR=$WORK/tmp PYTHON=$ROOT/.venv/bin/python NPROC_PER_NODE=1 MGPU_ROOT=$ROOT sbatch --parsable --nodes=1 --ntasks=2 \
    --ntasks-per-node=2 --gres=gpu:0 --cpus-per-task=1 --time=10 --output="$WORK/ddp_%j.out" "$ROOT/train_slurm.sbatch" \
    --requeue "${TINY_TOWERS[@]}" "${TINY_TRAIN[@]}" --output-dir out)
  out=$WORK/ddp_$job_id.out
  wait_for 120 "step 3 in $out" at_step 3 "$out"
  mapfile -t pids < <(trainer_pids "$job_id")
  assert_equal "${#pids[@]}" 2
  kill -STOP "${pids[@]}"
  scancel --signal=USR1 --batch "$job_id"
  wait_for 30 "the batch shell's stop request" grep -q "got SIGUSR1" "$out"
  kill -CONT "${pids[@]}"
  wait_job "$job_id"
  run cat "$out"
  assert_line --regexp '^\[WARNING\] stopped by signal [0-9]+ at step [0-9]+ of 30; checkpoint saved'
  assert_line --regexp '^\[INFO\] mgpu: the ranks stopped \(exit [0-9]+\): preempted \(requeued, run 2 continues with --resume auto\)$'
  assert_line --regexp '^resumed from out/checkpoint_[0-9]+\.pt at step [0-9]+ of 30$'
  assert_line "parameters identical on all 2 ranks"
  assert_equal "$(jq -r '"\(.world_size) \(.completed)"' out/metrics.json)" "2 true"
  assert_equal "$(same_weights out/model.pt "$(reference two)")" equal
  assert_equal "$(job_procs "$job_id")" 0
  # the file whose time is a run's start: the requeued run's and the last run's are both gone
  assert_equal "$(find "$WORK/tmp" -maxdepth 1 -name 'mgpu-*')" ""
}

@test "train_torchrun.sh --slurm --dry-run: the srun + torchrun command from the allocation's node list" {
  SLURM_JOB_ID=77 SLURM_JOB_NODELIST='node[3-4]' SLURM_NNODES=2 SLURM_NTASKS=2 SLURM_CPUS_PER_TASK=8 NPROC_PER_NODE=4 \
    MASTER_PORT=29611 run --separate-stderr bash "$ROOT/train_torchrun.sh" --slurm --dry-run --epochs 1
  assert_success
  assert_equal "$stderr" "[INFO] Using 8 CPU processes for training (no GPU: gloo, OMP_NUM_THREADS=2 each) (Slurm job 77: 2 torchrun agent(s) x 4 processes; rendezvous at node3:29611)"
  assert_output --regexp '^srun --ntasks 2 --kill-on-bad-exit=1 env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=[0-9]+ OMP_NUM_THREADS=2 .* -m torch.distributed.run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node3:29611 --rdzv-id 77 --nproc-per-node 4 --max-restarts 0 -m mgpu.train_clip --epochs 1$'
  # GPUs: each node's task gets its own from Slurm, so this node's CUDA_VISIBLE_DEVICES is not written over them
  # (and whatever SIGHUP is here, torchrun on each node handles its default signals: no --signals-to-handle)
  SLURM_JOB_ID=77 SLURM_JOB_NODELIST='node[3-4]' SLURM_NNODES=2 SLURM_NTASKS=2 MASTER_PORT=29611 CUDA_VISIBLE_DEVICES=0,1 \
    MGPU_FAKE_GPUS=$ROOT/examples/scenarios/4x-rtx4090-idle.json run --separate-stderr bash "$ROOT/train_torchrun.sh" --slurm --dry-run
  assert_success
  assert_output --regexp '^srun --ntasks 2 --kill-on-bad-exit=1 env CUDA_DEVICE_ORDER=PCI_BUS_ID TORCH_ELASTIC_SHUTDOWN_TIMEOUT=[0-9]+ OMP_NUM_THREADS=[0-9]+ '
}

@test "the test cluster stops and leaves no daemon behind" {
  local pidfile pids=() pid
  for pidfile in "$CLUSTER/slurmd.pid" "$CLUSTER/slurmctld.pid" "$CLUSTER/munge/munged.pid"; do pids+=("$(<"$pidfile")"); done
  for pid in "${pids[@]}"; do kill -0 "$pid"; done # all three run now
  bash "$ROOT/tests/slurm/cluster.sh" stop "$CLUSTER"
  for pid in "${pids[@]}"; do
    run kill -0 "$pid"
    assert_failure
  done
}
