# shellcheck shell=bash disable=SC2154  # sourced by bench/gpu_check.sh, whose settings and helpers it uses
# The steps of bench/gpu_check.sh: each a function that runs in a subshell of its own and writes one
# record (record / py_record) with its status, detail and figures.
# ---- step 1: the GPU readers against the driver ---------------------------------------------------------------
step_gpus() {
  local rc=0 smi_rc=0 json figures direct shell
  run_cmd "$DEST/check_gpus.txt" "$PY" "$ROOT/check_gpus.py" || rc=$?
  ((DRY)) || cat "$DEST/check_gpus.txt" >&2
  printf '  $ %s\n' "$PY check_gpus.py --json --torch" >&2 # exit 1 when torch sees no GPU (smoke mode): kept
  ((DRY)) || "$PY" "$ROOT/check_gpus.py" --json --torch >"$DEST/check_gpus_torch.json" 2>&1 || true
  ((DRY)) && { printf '  $ %s\n' "$PY bench/gpu_check.py sources; lib/gpu.sh gpu::query, gpu::is_free 0 against nvidia-smi" >&2; return 0; }
  json=$("$PY" "$ROOT/bench/gpu_check.py" sources) || { record gpus fail "gpu_check.py sources failed (see above)"; return 0; }
  # lib/gpu.sh's reading against nvidia-smi's own lines (the scenario against the fake nvidia-smi in smoke mode)
  shell=$(bash -c 'source "$1/lib/core.sh"; source "$1/lib/gpu.sh"; core::defaults; gpu::query && gpu::is_free 0; echo "free=$? ${GPU_REASON:-}"' _ "$ROOT" 2>&1) || true
  direct=$(MGPU_FAKE_GPUS='' "${NVIDIA_SMI:-nvidia-smi}" --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total \
    --format=csv,noheader,nounits 2>&1) || smi_rc=$?
  figures=$(jq -c --arg shell "$shell" --arg smi "$direct" --argjson rc "$rc" \
    '.figures + {check_gpus_exit: $rc, gpu_sh: ($shell | split("\n")), nvidia_smi: ($smi | split("\n"))}' <<<"$json")
  local same=1 a b
  while IFS=, read -r a b _; do # index, uuid of each nvidia-smi line must be a gpu::query line's
    [[ $shell == *"${a// /},${b// /},"* ]] || same=0
  done <<<"$direct"
  if ((smi_rc != 0 || rc > 1)); then
    record gpus fail "nvidia-smi exit $smi_rc, check_gpus.py exit $rc" "$figures"
  elif ((!same)); then
    record gpus fail "lib/gpu.sh's gpu::query differs from nvidia-smi (figures: gpu_sh, nvidia_smi)" "$figures"
  else
    record gpus "$(jq -r .status <<<"$json")" "$(jq -r .detail <<<"$json"); lib/gpu.sh agrees with nvidia-smi" "$figures"
  fi
}

# ---- step 2: a sweep on GPU 0, two jobs at once, after a busy-GPU wait ----------------------------------------------
step_sweep() {
  local rc=0 burner figures summary waited
  local sweep=(bash "$ROOT/run_train_clip.sh" --preset demo --gpus 0 --jobs-per-gpu 2 --max-util 70 --max-wait 120
    --grace 10 --log-dir "$WORK/logs" --ckpt-dir "$WORK/ckpt" "${SWEEP_ARGS[@]}")
  if ((DRY)); then
    printf '  $ %s\n' "$PY bench/gpu_check.py burn 60 STOP_FILE &  # GPU 0 busy until the sweep waits, then $BURN_S s" >&2
    run_cmd /dev/null "${sweep[@]}"
    return 0
  fi
  # GPU 0 busy until the sweep has said it waits for it, then BURN_S seconds more (60 s at most)
  timeout -k 5 120 "$PY" "$ROOT/bench/gpu_check.py" burn 60 "$WORK/stop_burn" >"$DEST/burn.json" 2>"$DEST/burn.log" &
  burner=$!
  wait_for_line busy "$DEST/burn.log" "$burner" 600 || say "the burner never got GPU 0 busy: $(cat "$DEST/burn.log")"
  ((SMOKE)) || sleep 2 # nvidia-smi's utilization is the busy fraction of the last ~1 s
  printf '  $ %s\n' "${sweep[*]}" >&2
  local seconds
  seconds=$(limit)
  ((seconds > 0)) || seconds=1 # timeout 0 would mean none
  timeout -k 30 "$seconds" "${sweep[@]}" >"$DEST/sweep.log" 2>&1 &
  local pid=$!
  wait_for_line " waits: GPU 0 is busy" "$DEST/sweep.log" "$pid" 1200 && sleep "$BURN_S"
  touch "$WORK/stop_burn"
  wait "$burner" || true
  wait "$pid" || rc=$?
  ((rc == 0)) || { say "exit $rc: ${sweep[*]}"; tail -n 25 "$DEST/sweep.log" | sed 's/^/    | /' >&2; }
  summary=$(find "$WORK/logs" -name 'summary_*.json' 2>/dev/null | head -n 1) || true
  waited=$(grep -c " waits: GPU 0 is busy" "$DEST/sweep.log" || true)
  if [[ -z $summary ]]; then
    record sweep fail "exit $rc and no summary (see $DEST/sweep.log)"
    return 0
  fi
  cp "$summary" "$DEST/sweep_summary.json"
  figures=$(jq -c --argjson rc "$rc" --argjson waited "$waited" '{exit: $rc, busy_lines: $waited,
      jobs: [.configs[] | {name, status, seconds, waited_seconds, gpu, peak_mem_mib,
      r1: .metrics["image_to_text_R@1"]}]}' "$summary" 2>/dev/null) ||
    figures=$(jq -c --argjson rc "$rc" '{exit: $rc, summary: .}' "$summary")
  if ((rc != 0)); then
    record sweep fail "run_train_clip.sh exit $rc (see $DEST/sweep.log)" "$figures"
  elif ((!SMOKE)) && [[ $(jq -r '[.jobs[].peak_mem_mib] | map(. != null) | all' <<<"$figures") != true ]]; then
    record sweep fail "a job's peak GPU memory was not measured (peak_mem_mib null: nvidia-smi's process list)" "$figures"
  elif ((waited == 0)); then
    record sweep fail "the sweep never waited for the busy GPU 0 (burner: $(cat "$DEST/burn.log"))" "$figures"
  else
    record sweep ok "2 demo configs on GPU 0, 2 at a time, after waiting for the busy GPU" "$figures"
  fi
}

# ---- step 3: the trainer at a real size -------------------------------------------------------------------------
step_throughput() {
  local rc=0 figures out=$WORK/short detail
  run_cmd "$DEST/throughput.log" "$PY" "$ROOT/bench/train_throughput.py" "${THROUGHPUT[@]}" --json "$WORK/throughput.json" || rc=$?
  run_cmd "$DEST/memory.log" "$PY" "$ROOT/bench/train_memory.py" "${MEMORY[@]}" --json "$WORK/memory.json" || rc=$?
  local -A extra=([amp]="${AMP[*]}" [grad_checkpointing]=--grad-checkpointing [compile]=--compile)
  local name results="{}" seconds
  for name in amp grad_checkpointing compile; do
    if ((SMOKE)) && [[ $name == compile ]]; then # inductor builds C++ for 15-40 s on the CPU; tests/py check the wrapping
      printf '  (smoke: --compile not run)\n' >&2
      results=$(jq -c '. + {compile: "not run in smoke mode"}' <<<"$results")
      continue
    fi
    rm -rf "$out"
    # shellcheck disable=SC2086 # the flags of each variant, split at spaces
    if run_cmd "$DEST/train_$name.log" "$PY" -m mgpu.train_clip "${SHORT[@]}" ${extra[$name]} --no-tb \
      --output-dir "$out"; then
      ((DRY)) && continue
      seconds=$(jq -c '{samples_per_second, train_loss, wall_seconds, finite: (.train_loss | type == "number" and (isinfinite or isnan | not))}' \
        "$out/metrics.json")
      results=$(jq -c --arg n "$name" --argjson v "$seconds" '. + {($n): $v}' <<<"$results")
    else
      rc=1
      results=$(jq -c --arg n "$name" '. + {($n): "failed"}' <<<"$results")
    fi
  done
  ((DRY)) && return 0
  figures=$(jq -c -n --slurpfile t "$WORK/throughput.json" --slurpfile m "$WORK/memory.json" --argjson v "$results" \
    '{throughput: $t[0], memory: $m[0], variants: $v}' 2>/dev/null) || figures=$(jq -c -n --argjson v "$results" '{variants: $v}')
  detail=$(jq -r '.throughput as $t | def n: . // 0 | . * 1000 | floor / 1000;
    "trainer \($t.trainer_samples_per_second["data in memory"] | n | floor) samples/s in the steady state, efficiency "
    + "\($t.efficiency["data in memory"] | n) against the bare loop (target >= 0.9); \($t.efficiency["one epoch"] | n) "
    + "with every sample drawn by the loader; peak \($t.trainer_peak_mib // "n/a" | if type == "number" then floor else . end) MiB"' \
    <<<"$figures")
  if ((rc != 0)); then
    record throughput fail "a run failed (see $DEST/throughput.log, memory.log, train_*.log); $detail" "$figures"
  elif [[ $(jq -r '[.variants[] | objects | .finite] | all' <<<"$figures") != true ]]; then
    record throughput fail "a loss was not finite ($AMP_NAME, --grad-checkpointing, --compile); $detail" "$figures"
  else
    record throughput ok "$detail; $AMP_NAME, --grad-checkpointing$( ((SMOKE)) || echo " and --compile") trained with finite losses" "$figures"
  fi
}

# ---- step 4: inference on GPU 0 against a CPU run ---------------------------------------------------------------
step_infer() {
  local ckpt rc=0 json
  ckpt=$(find "$WORK/ckpt" -name model.pt 2>/dev/null | sort | head -n 1) || true
  if ((DRY)); then
    ckpt=${ckpt:-$WORK/ckpt/<config>/model.pt}
  elif [[ -z $ckpt ]]; then
    record infer skip "no checkpoint: the sweep step made none (run it first)"
    return 0
  fi
  run_cmd "$DEST/infer_gpu.log" bash "$ROOT/infer_parallel.sh" --checkpoint "$ckpt" --out "$WORK/infer_gpu" --gpus 0 \
    --batch-size 128 || rc=$?
  run_cmd "$DEST/infer_cpu.log" env CUDA_VISIBLE_DEVICES= MGPU_FAKE_GPUS= NVIDIA_SMI=none bash "$ROOT/infer_parallel.sh" \
    --checkpoint "$ckpt" --out "$WORK/infer_cpu" --batch-size 128 || rc=$?
  ((DRY)) && return 0
  if ((rc != 0)); then
    record infer fail "infer_parallel.sh failed (see $DEST/infer_gpu.log, infer_cpu.log)"
    return 0
  fi
  json=$("$PY" "$ROOT/bench/gpu_check.py" embeddings "$WORK/infer_gpu" "$WORK/infer_cpu" "$INFER_TOL")
  json=$(jq -c --slurpfile g "$WORK/infer_gpu/metrics.json" '.figures.gpu_metrics = $g[0]' <<<"$json")
  py_record infer "$json"
}

# ---- step 5: stop and resume: the weights of a straight run (per-rank CUDA RNG, --deterministic) ---------------------
step_resume() {
  local rc=0 json
  run_cmd "$DEST/resume_straight.log" "$PY" -m mgpu.train_clip "${RESUME[@]}" --output-dir "$WORK/straight" || rc=$?
  run_cmd "$DEST/resume_first.log" "$PY" -m mgpu.train_clip "${RESUME[@]}" --stop-after "$RESUME_AT" \
    --output-dir "$WORK/resumed" || rc=$?
  run_cmd "$DEST/resume_second.log" "$PY" -m mgpu.train_clip "${RESUME[@]}" --resume auto --output-dir "$WORK/resumed" || rc=$?
  ((DRY)) && return 0
  if ((rc != 0)); then
    record resume fail "a run failed (see $DEST/resume_straight.log, resume_first.log, resume_second.log)"
    return 0
  fi
  json=$("$PY" "$ROOT/bench/gpu_check.py" weights "$WORK/resumed/model.pt" "$WORK/straight/model.pt" 0 \
    "stopped after $RESUME_AT steps and resumed ($RESUME_WHAT) against a straight run")
  py_record resume "$json"
}

# ---- step 6: several GPUs ---------------------------------------------------------------------------------------
step_multi_gpu() {
  local n rc=0 json
  if ((DRY)); then n=2; else n=$(gpu_count); fi
  if ((n < 2)); then
    record multi_gpu skip "$n GPU: DDP over NCCL, --dp and bench/ddp.sh need 2 or more"
    return 0
  fi
  local one=(--batch-size 16 --train-size 256 --val-size 32 --max-steps 3 --warmup 1 --image-encoder starnet_s050
    --text-encoder clip:tiny --image-size 32 --embed-dim 64 --no-tb --lr-scale none --freeze-bn --seed 0)
  ((!SMOKE)) || one+=(--device cpu)
  local half=("${one[@]}")
  half[1]=8
  run_cmd "$DEST/ddp.log" env CUDA_VISIBLE_DEVICES=0,1 NPROC_PER_NODE=2 bash "$ROOT/train_torchrun.sh" "${half[@]}" \
    --output-dir "$WORK/ddp" || rc=$?
  run_cmd "$DEST/single.log" env CUDA_VISIBLE_DEVICES=0 "$PY" -m mgpu.train_clip "${one[@]}" --output-dir "$WORK/single" || rc=$?
  if ((SMOKE)); then
    printf '  (smoke: --dp needs CUDA; not run)\n' >&2
  else
    run_cmd "$DEST/dp.log" env CUDA_VISIBLE_DEVICES=0,1 "$PY" -m mgpu.train_clip "${one[@]}" --dp --amp bf16 \
      --output-dir "$WORK/dp" || rc=$? # the replicas' threads get bf16 too: autocast is entered inside forward
  fi
  if ((SMOKE)); then # tests/bats/ddp.bats runs train_torchrun.sh on gloo; the scaling figures need GPUs
    printf '  (smoke: bench/ddp.sh not run)\n' >&2
    ((DRY)) || echo "smoke mode: bench/ddp.sh not run" >"$DEST/ddp_bench.log"
  else
    run_cmd "$DEST/ddp_bench.log" bash "$ROOT/bench/ddp.sh" "${DDP_BENCH[@]}" || rc=$?
  fi
  ((DRY)) && return 0
  if ((rc != 0)); then
    record multi_gpu fail "a multi-GPU run failed (see $DEST/ddp.log, single.log, dp.log, ddp_bench.log)"
    return 0
  fi
  json=$("$PY" "$ROOT/bench/gpu_check.py" weights "$WORK/ddp/model.pt" "$WORK/single/model.pt" \
    "$( ((SMOKE)) && echo 1e-4 || echo 1e-3)")
  json=$(jq -c --arg bench "$(tail -n 4 "$DEST/ddp_bench.log")" \
    --arg dp "$( ((SMOKE)) || grep -m1 -o 'Using [0-9]* GPUs[^"]*' "$DEST/dp.log")" \
    '.figures += {ddp_bench: ($bench | split("\n")), dp: $dp}' <<<"$json")
  py_record multi_gpu "$json"
}
