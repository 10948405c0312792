# shellcheck shell=bash disable=SC2034  # part of sweep.sh: the same settings and job records
# sweep:: (continued) — the plan before a sweep starts: --resume drops what was done, --order puts the
# longest first, --need-mem auto learns each config's memory, and --dry-run shows all of it. Sourced by
# sweep.sh only.

declare -A JOB # sched.sh's job records (declared there)

# sweep::dry_run — the plan, the GPU check right now, and each exact command (with every variable the
# job gets) on the GPUs it would get, and why (for several GPUs, how they are linked); nothing is
# launched and nothing is written.
sweep::dry_run() {
  local job s gpu listed=() where n slot cand=() devs gpus
  local -A used=()
  printf 'Plan: %d job(s) on %d slot(s) [%s]; MAX_UTIL %s%%, MAX_WAIT %ss, --on-timeout %s, --retries %s, --grace %ss\n' \
    "${#SCHED_QUEUE[@]}" "${#SCHED_SLOTS[@]}" "${SCHED_SLOTS[*]}" "$MAX_UTIL" "$MAX_WAIT" "$ON_TIMEOUT" "$RETRIES" "$GRACE"
  [[ ${SCHED_SLOTS[0]} == cpu:* ]] || gpu::sample "${SCHED_GPUS[@]}" || true
  for s in "${SCHED_SLOTS[@]}"; do
    gpu=${s%:*}
    [[ $gpu != cpu && " ${listed[*]} " != *" $gpu "* ]] || continue
    listed+=("$gpu")
    if gpu::judge "${GPU_PARENT[$gpu]:-$gpu}"; then echo "GPU $gpu: free now"; else echo "GPU $gpu: busy now ($GPU_REASON): jobs wait for it"; fi
  done
  for job in "${SCHED_QUEUE[@]}"; do
    n=${JOB[$job,gpus]:-1}
    for _ in 1 2; do # the GPUs free of the plan's earlier jobs; when none are left, those of the next round
      cand=() listed=()
      for slot in "${SCHED_SLOTS[@]}"; do
        gpu=${slot%:*}
        if ((${used[$gpu]:-0} >= JOBS_PER_GPU)) || [[ " ${listed[*]} " == *" $gpu "* ]]; then continue; fi
        listed+=("$gpu") cand+=("$slot")
      done
      ((${#cand[@]} < n)) || break
      used=()
    done
    place::set "$n" "${cand[@]}"
    devs=() gpus=""
    for slot in "${PLACE_SET[@]}"; do devs+=("${slot%:*}") used[${slot%:*}]=$((${used[${slot%:*}]:-0} + 1)); done
    printf -v gpus '%s,' "${devs[@]}"
    gpus=${gpus%,}
    place::worst "${devs[@]}"
    where="GPU $gpus"
    [[ -z $PLACE_LEVEL ]] || where="GPUs $gpus ($PLACE_LEVEL)"
    [[ $gpus != cpu ]] || where=CPU
    [[ ${JOB[$job,need]:-0} == 0 ]] || where+=", needs ${JOB[$job,need]/#all/all free} MiB a GPU"
    sched::argv "$job"
    printf '%s -> %s: ' "${JOB[$job,name]}" "$where"
    printf '%q ' "CUDA_VISIBLE_DEVICES=${gpus/#cpu/}" CUDA_DEVICE_ORDER=PCI_BUS_ID "MGPU_CONFIG_NAME=${JOB[$job,name]}" \
      "MGPU_GPU=$gpus" "OMP_NUM_THREADS=$SCHED_THREADS" "${SCHED_ARGV[@]}"
    echo
  done
}

# sweep::drop_done — with --resume, jobs an earlier run finished are recorded as skipped, not queued.
sweep::drop_done() {
  local job keep=()
  sched::hash_jobs
  for job in "${SCHED_QUEUE[@]}"; do
    if [[ $RESUME == true ]] && ledger::is_done "$job"; then
      # done by an earlier version's marker: the marker of today's name too, so it stays done (a dry run writes nothing)
      [[ -z $LEDGER_DONE_OLD || $DRY_RUN == true ]] || ledger::mark_done "$job" || true
      sched::mark "$job" skipped "done earlier (--resume)"
      log::info "skipping ${JOB[$job,name]}: done earlier with the same configuration (--resume)"
    else
      keep+=("$job")
    fi
  done
  SCHED_QUEUE=("${keep[@]}")
}

# sweep::order — with --order longest-first, queue the jobs that took longest in earlier sweeps (the
# summaries in LOG_DIR, matched by config hash) first; jobs never seen before go first of all.
sweep::order() {
  [[ $ORDER == longest-first ]] || return 0
  local -A took=()
  local hash secs job keyed=()
  local summaries=("$LOG_DIR"/summary_*.json)
  if [[ -e ${summaries[0]} ]]; then
    while IFS=$'\t' read -r hash secs; do took[$hash]=$secs; done < <(jq -rs '
      [.[].configs[]? | select(.status == "succeeded") | [.config_hash, .seconds]] | .[] | @tsv' "${summaries[@]}" 2>/dev/null)
  fi
  log::info "--order longest-first: ${#took[@]} earlier wall time(s) found in $LOG_DIR"
  for job in "${SCHED_QUEUE[@]}"; do
    keyed+=("${took[${JOB[$job,hash]}]:-1e18}"$'\t'"$job")
  done
  SCHED_QUEUE=()
  while IFS=$'\t' read -r _ job; do SCHED_QUEUE+=("$job"); done < <(printf '%s\n' "${keyed[@]}" | sort -s -t $'\t' -k1,1gr)
}

# sweep::learn_needs — --need-mem auto: each job's need is the peak GPU memory an earlier run of the same
# configuration reached (LOG_DIR's summaries, by config hash, else by name unless SWEEP_NAMES_ARE_LINES),
# plus 10% and 256 MiB; a job never measured runs alone on its GPU (need "all": every MiB free when it
# starts), to be measured.
SWEEP_NAMES_ARE_LINES="" # gpu_queue.sh: a name (job<line>) says where a command stood, not what it is
sweep::learn_needs() {
  local job hash name peak line learned=0 unknown=0
  local -A by_hash=() by_name=()
  local summaries=("$LOG_DIR"/summary_*.json)
  if [[ -e ${summaries[0]} ]]; then
    while IFS=$'\t' read -r hash name peak; do
      ((peak > ${by_hash[$hash]:-0})) && by_hash[$hash]=$peak
      ((peak > ${by_name[$name]:-0})) && by_name[$name]=$peak
    done < <(jq -rs '[.[].configs[]? | select(.peak_mem_mib | type == "number") | [.config_hash, .name, .peak_mem_mib]]
      | .[] | @tsv' "${summaries[@]}" 2>/dev/null)
  fi
  for ((job = 0; job < SCHED_N; job++)); do
    [[ ${JOB[$job,need]} == auto ]] || continue
    peak=${by_hash[${JOB[$job,hash]}]:-}
    [[ -n $peak || -n $SWEEP_NAMES_ARE_LINES ]] || peak=${by_name[${JOB[$job,name]}]:-}
    if [[ -n $peak ]]; then
      JOB[$job,need]=$((peak + peak / 10 + 256)) learned=$((learned + 1))
    else
      JOB[$job,need]=all unknown=$((unknown + 1))
    fi
  done
  ((learned + unknown == 0)) ||
    log::info "--need-mem auto: $learned need(s) learned from LOG_DIR's summaries (peak + 10% + 256 MiB); $unknown config(s) never measured run alone on a GPU"
}
