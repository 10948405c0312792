#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031,SC2154,SC2016  # bats: subshell tests, $stderr from run; '$VAR' in job text is meant literally
# --backend slurm and train_slurm.sbatch against a real one-node Slurm (slurmctld + slurmd + munged
# started by tests/slurm/cluster.sh with four fake GPUs), the fake trainer and the real DDP trainer.

load test_helper

setup_file() {
  export BATS_NO_PARALLELIZE_WITHIN_FILE=true # one cluster, shared in order
  CLUSTER=$BATS_FILE_TMPDIR/cluster
  export CLUSTER
  SLURM_CONF=$(bash "$BATS_TEST_DIRNAME/../slurm/cluster.sh" start "$CLUSTER" 4)
  export SLURM_CONF
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
  assert [ -s logs/gpu_queue/.mgpu_done/job1 ]
}

@test "bad Slurm settings exit 2 naming the setting, the value and what is allowed" {
  slurm_sweep --time soon
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --time must be a Slurm time limit like 90, 4:00:00 or 2-00:00:00, got 'soon'"
  slurm_sweep --retries 1
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --retries is for local runs; on Slurm, run the sweep again with --resume to resubmit what failed"
  slurm_sweep --partition 'a b'
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --partition must be a Slurm name like gpu or gpu:a100:1 (letters, digits, _.:,=-), got 'a b'"
  slurm_sweep --sbatch-arg 'x'
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --sbatch-arg must be one sbatch option like --constraint=a100 (no quotes or newlines), got 'x'"
  run --separate-stderr bash "$ROOT/run_train_clip.sh" --wait
  assert_failure 2
  assert_equal "$stderr" "[ERROR] --wait and --status follow a Slurm sweep: add --backend slurm"
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

@test "train_torchrun.sh --slurm --dry-run: the srun + torchrun command from the allocation's node list" {
  SLURM_JOB_ID=77 SLURM_JOB_NODELIST='node[3-4]' SLURM_NNODES=2 SLURM_NTASKS=2 SLURM_CPUS_PER_TASK=8 NPROC_PER_NODE=4 \
    MASTER_PORT=29611 run --separate-stderr bash "$ROOT/train_torchrun.sh" --slurm --dry-run --epochs 1
  assert_success
  assert_equal "$stderr" "[INFO] Using 8 CPU processes for training (no GPU: gloo, OMP_NUM_THREADS=2 each) (Slurm job 77: 2 torchrun agent(s) x 4 processes; rendezvous at node3:29611)"
  assert_output --regexp '^srun --ntasks 2 --kill-on-bad-exit=1 env OMP_NUM_THREADS=2 .* -m torch.distributed.run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node3:29611 --rdzv-id 77 --nproc-per-node 4 --max-restarts 0 -m mgpu.train_clip --epochs 1$'
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
