# shellcheck shell=bash disable=SC2034  # GPU_* results are read by the callers
# gpu:: — which GPUs exist and how busy they are; one query of all GPUs per call.
# Source of truth: the scenario named by MGPU_FAKE_GPUS (re-read at every query; validated by Python),
# else ${NVIDIA_SMI:-nvidia-smi} (wrapped in `timeout`; "none": no NVIDIA driver), else CPU mode. Queries
# fill globals rather than print, so the hot paths of a sweep fork nothing they can avoid. Settings
# (MAX_UTIL, MAX_WAIT, MGPU_UTIL_*, MGPU_POLL_MS, MGPU_SMI_TIMEOUT): their defaults and checks are core.sh's.

# shellcheck source=lib/core.sh
[[ -n ${MGPU_LIB:-} ]] || source "${BASH_SOURCE[0]%/*}/core.sh"
declare -gA GPU_PARENT=() # MIG instance UUID -> its GPU's index (gpu::_extras)

# gpu::backend — prints where GPUs come from: scenario | nvidia-smi | cpu
gpu::backend() {
  gpu::_backend || return
  echo "$GPU_BACKEND"
}

# gpu::_backend — gpu::backend's answer into the global GPU_BACKEND (no subshell). An NVIDIA_SMI that
# names no program is an error (2, logged), not CPU mode: the user asked for that program.
gpu::_backend() {
  if [[ -n ${MGPU_FAKE_GPUS:-} ]]; then
    GPU_BACKEND=scenario
  elif [[ ${NVIDIA_SMI:-} == none ]]; then
    GPU_BACKEND=cpu
  elif command -v "${NVIDIA_SMI:-nvidia-smi}" >/dev/null 2>&1; then
    GPU_BACKEND=nvidia-smi
  elif [[ -n ${NVIDIA_SMI:-} ]]; then
    GPU_BACKEND=error
    log::error "NVIDIA_SMI=$NVIDIA_SMI: no such program (unset it to use nvidia-smi from PATH, or NVIDIA_SMI=none for no GPU)"
    return 2
  else
    GPU_BACKEND=cpu
  fi
}

# gpu::query — one line per GPU, in index order: index,uuid,utilization,memory_used_mib,memory_total_mib
# (utilization NA when the GPU does not report it). CPU mode prints nothing and succeeds.
# Returns 1, with the reason logged, when the scenario is unusable or nvidia-smi fails or hangs.
gpu::query() {
  gpu::_read || return 1
  [[ -z $GPU_LINES ]] || printf '%s\n' "$GPU_LINES"
}

# gpu::_read — gpu::query's lines into the global GPU_LINES (newline-separated, no trailing newline).
gpu::_read() {
  GPU_LINES="" GPU_RECORDS=""
  gpu::_backend || return 1
  case $GPU_BACKEND in
    scenario) gpu::_from_scenario "$MGPU_FAKE_GPUS" ;;
    nvidia-smi) gpu::_from_smi "${NVIDIA_SMI:-nvidia-smi}" && GPU_RECORDS=${GPU_MACHINE_RECORDS:-} ;;
    cpu) return 0 ;;
  esac
}

# gpu::_from_scenario FILE — GPU_LINES and GPU_RECORDS from a scenario. The one validator of scenarios is
# Python's (`python -m mgpu.scenario`, shared with check_gpus.py); it prints records (gpu, mig, proc, link
# lines). A scenario's records depend on its text alone, so the text and its records are kept, in this
# process and in MGPU_CACHE_DIR (default ~/.cache/mgpu), and Python runs only when the text is new. A
# scenario edited between queries (as the tests do to free a GPU) is therefore still re-read.
gpu::_from_scenario() {
  local file=$1 text="" cache cached="" records="" err
  if [[ ! -f $file || ! -r $file ]]; then
    log::error "MGPU_FAKE_GPUS: $file: cannot read the scenario file (no such readable file)"
    return 1
  fi
  IFS= read -r -d '' text <"$file" || true
  if [[ ${GPU_SCENARIO_TEXT-x} == "$text" ]]; then
    GPU_LINES=$GPU_SCENARIO_LINES GPU_RECORDS=$GPU_SCENARIO_RECORDS
    return 0
  fi
  gpu::_cache_file "$file"
  cache=$GPU_CACHE_FILE
  if [[ -n $cache && -f $cache && ! -L $cache ]]; then
    { IFS= read -r -d '' cached && IFS= read -r -d '' records; } <"$cache" || cached=""
  fi
  if [[ -z $cache || $cached != "$text" || -z $cached ]]; then
    core::py_env
    if ! records=$("${CORE_PY[@]}" -m mgpu.scenario "$file" 2>&1); then # on failure: one line, the fault
      err=${records%%$'\n'*}
      log::error "MGPU_FAKE_GPUS: $file: ${err:-the scenario check failed (python -m mgpu.scenario; is Python 3 there?)}"
      return 1
    fi
    [[ -z $cache ]] || gpu::_cache_write "$cache" "$text" "$records"
  fi
  gpu::_lines "$records"
  GPU_SCENARIO_TEXT=$text GPU_SCENARIO_RECORDS=$records GPU_SCENARIO_LINES=$GPU_LINES GPU_RECORDS=$records
}
# gpu::_lines RECORDS — GPU_LINES ("index,uuid,util,used,total" a GPU) from mgpu.scenario's records.
gpu::_lines() {
  local kind index uuid util used total _
  GPU_LINES=""
  while IFS=, read -r kind index uuid util used total _; do
    [[ $kind == gpu ]] || continue
    GPU_LINES+=${GPU_LINES:+$'\n'}$index,$uuid,$util,$used,$total
  done <<<"$1"
}

# gpu::_cache_file FILE — GPU_CACHE_FILE: where the parsed copy of this scenario is kept; empty (no
# caching) when the cache folder cannot be made, is not writable or is a symbolic link.
gpu::_cache_file() {
  local dir=${MGPU_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/mgpu} name=$1
  GPU_CACHE_FILE=""
  [[ $name == /* ]] || name=$PWD/$name
  [[ -d $dir ]] || { mkdir -p -- "${dir%/*}" && mkdir -m 700 -- "$dir"; } 2>/dev/null || [[ -d $dir ]] || return 0
  [[ ! -L $dir && -w $dir ]] || return 0
  GPU_CACHE_FILE=$dir/records${name//[!A-Za-z0-9._-]/_}
}

# gpu::_cache_write CACHE TEXT LINES — replace the cache file whole (a reader never sees half of one).
gpu::_cache_write() {
  local tmp=$1.$$.$RANDOM
  { printf '%s\0%s\0' "$2" "$3" >"$tmp" && mv -f -- "$tmp" "$1"; } 2>/dev/null || rm -f -- "$tmp"
}

gpu::_from_smi() {
  local smi=$1 limit=${MGPU_SMI_TIMEOUT:-10} out rc=0 line
  out=$(timeout -k 2 "$limit" "$smi" --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total \
    --format=csv,noheader,nounits 2>&1) || rc=$?
  if ((rc == 124 || rc == 137)); then
    log::error "$smi did not answer within ${limit}s and was stopped: a stuck driver or a GPU fallen off" \
      "the bus can hang it (see dmesg; MGPU_SMI_TIMEOUT sets the limit)"
    return 1
  elif ((rc != 0)); then
    log::error "$smi failed (exit $rc): ${out%%$'\n'*}"
    return 1
  fi
  while IFS= read -r line; do
    [[ -n ${line//[[:space:]]/} ]] || continue
    gpu::_smi_line "$line" || {
      log::error "$smi printed a line mgpu cannot read: '$line'" \
        "(expected: index, uuid, utilization.gpu, memory.used, memory.total)"
      return 1
    }
    GPU_LINES+=${GPU_LINES:+$'\n'}$GPU_LINE
  done <<<"$out"
}

# gpu::_smi_line LINE — one normalized CSV line from nvidia-smi's into GPU_LINE, or fail. Drivers print
# any value they cannot give in brackets ([N/A], [Not Supported], [Unknown Error]; unified-memory systems
# such as GB10 do so for memory): all of them read as NA.
gpu::_smi_line() {
  local index uuid util used total extra field
  IFS=, read -r index uuid util used total extra <<<"${1//[[:space:]]/}"
  [[ -z $extra && $index =~ ^[0-9]+$ && -n $uuid ]] || return 1
  for field in util used total; do
    [[ ${!field} != \[*\] && ${!field} != N/A ]] || printf -v "$field" NA
    [[ ${!field} =~ ^[0-9]+$ || ${!field} == NA ]] || return 1
  done
  printf -v GPU_LINE '%s,%s,%s,%s,%s' "$index" "$uuid" "$util" "$used" "$total"
}

# gpu::exists ID — is there a GPU with this index or UUID? 0 yes, 1 no, 2 the query failed.
gpu::exists() {
  local id=$1 index uuid _
  gpu::_read || return 2
  while IFS=, read -r index uuid _; do
    [[ $id == "$index" || $id == "$uuid" ]] && return 0
  done <<<"$GPU_LINES"
  return 1
}

# gpu::indices — print the GPU indices, space-separated (empty in CPU mode).
gpu::indices() {
  local index _ out=()
  gpu::_read || return 1
  while IFS=, read -r index _; do
    [[ -n $index ]] && out+=("$index")
  done <<<"$GPU_LINES"
  echo "${out[*]}"
}

# gpu::sample [INDEX...] — read every GPU's utilization and memory into GPU_UTIL[index] (median of the
# readings, NA if never reported), GPU_MEM_USED[index] and GPU_MEM_TOTAL[index] (NA when not reported).
# One reading decides when each GPU of interest (INDEX..., default all) is clearly idle or clearly busy:
# at least MGPU_UTIL_MARGIN points from MAX_UTIL. A reading near MAX_UTIL is noise-prone (NVML averages
# over 1/6-1 s), so then MGPU_UTIL_SAMPLES readings are taken over MGPU_UTIL_WINDOW_MS. GPU_SAMPLES is
# how many were taken.
gpu::sample() {
  local n=${MGPU_UTIL_SAMPLES:-5} window=${MGPU_UTIL_WINDOW_MS:-1000} margin=${MGPU_UTIL_MARGIN:-20}
  local max=${MAX_UTIL:-70} i index uuid util used total near
  declare -gA GPU_UTIL=() GPU_MEM_USED=() GPU_MEM_TOTAL=()
  local -A readings=()
  for ((i = 0; i < n; i++)); do
    ((i == 0)) || core::sleep_ms $((window / (n - 1)))
    gpu::_read || return 1
    near=0
    while IFS=, read -r index uuid util used total; do
      [[ -n $index ]] || continue
      [[ $util == NA ]] || readings[$index]+="$util "
      GPU_MEM_USED[$index]=$used GPU_MEM_TOTAL[$index]=$total
      if ((i == 0)) && [[ $util != NA ]] && ((util > max - margin && util < max + margin)) &&
        { (($# == 0)) || [[ " $* " == *" $index "* ]]; }; then
        near=1
      fi
    done <<<"$GPU_LINES"
    ((i > 0 || near)) || break
  done
  GPU_SAMPLES=$((i < n ? i + 1 : n))
  local values=()
  for index in "${!GPU_MEM_TOTAL[@]}"; do
    read -ra values <<<"${readings[$index]:-}"
    gpu::_median "${values[@]}"
    GPU_UTIL[$index]=$GPU_MEDIAN
  done
  gpu::_extras
}

# gpu::_extras — from the records of the last read (a scenario's, or the machine's once fetched with
# gpu::machine): MIG instances as devices of their own (GPU_UTIL NA, their memory, GPU_PARENT[uuid]), and
# the per-process list GPU_PROCS ("<device>,<pid>,<MiB>" lines; from nvidia-smi when GPU_WANT_PROCS=1).
gpu::_extras() {
  local kind a b c d _
  declare -gA GPU_PARENT=()
  GPU_PROCS=""
  while IFS=, read -r kind a b c d _; do
    case $kind in
      mig) GPU_UTIL[$b]=NA GPU_MEM_USED[$b]=$c GPU_MEM_TOTAL[$b]=$d GPU_PARENT[$b]=$a ;;
      proc) [[ $GPU_BACKEND != scenario ]] || GPU_PROCS+=$a,$b,$c$'\n' ;;
    esac
  done <<<"${GPU_RECORDS:-}"
  [[ $GPU_BACKEND != nvidia-smi || -z ${GPU_WANT_PROCS:-} ]] || gpu::_smi_procs
}

# gpu::_smi_procs — GPU_PROCS from nvidia-smi's list of compute processes (one query for all GPUs).
gpu::_smi_procs() {
  local smi=${NVIDIA_SMI:-nvidia-smi} out uuid pid used index uid
  local -A by_uuid=()
  while IFS=, read -r index uid _; do [[ -z $uid ]] || by_uuid[$uid]=$index; done <<<"$GPU_LINES"
  out=$(timeout -k 2 "${MGPU_SMI_TIMEOUT:-10}" "$smi" --query-compute-apps=gpu_uuid,pid,used_memory \
    --format=csv,noheader,nounits 2>/dev/null) || return 0
  while IFS=, read -r uuid pid used; do
    uuid=${uuid//[[:space:]]/} pid=${pid//[[:space:]]/} used=${used//[[:space:]]/}
    [[ -n $uuid && -n ${by_uuid[$uuid]:-} && $pid =~ ^[0-9]+$ ]] || continue # no process: one empty line
    [[ $used =~ ^[0-9]+$ ]] || used=NA
    GPU_PROCS+=${by_uuid[$uuid]},$pid,$used$'\n'
  done <<<"$out"
}

# gpu::machine — the real server's records (MIG instances, topology) once, from `python -m mgpu.scenario
# --machine` (NVML, else nvidia-smi): kept in GPU_MACHINE_RECORDS and used by every later read. A
# scenario has them already. 1 when they cannot be had (the shell then knows no topology or MIG).
gpu::machine() {
  [[ $GPU_BACKEND == nvidia-smi && -z ${GPU_MACHINE_RECORDS:-} ]] || return 0
  core::py_env
  GPU_MACHINE_RECORDS=$("${CORE_PY[@]}" -m mgpu.scenario --machine 2>/dev/null) || { GPU_MACHINE_RECORDS=""; return 1; }
}

# gpu::resolve ID — a GPU named by index, GPU- UUID (or a unique start of one) or MIG- UUID, as the device
# id the launchers use (the index; a MIG instance's UUID) into GPU_ID; 1 when no device matches, 2 when a
# UUID start matches several.
gpu::resolve() {
  local id=$1 kind index uuid _ found=()
  GPU_ID=""
  if [[ $id =~ ^[0-9]+$ ]]; then
    [[ -n ${GPU_MEM_TOTAL[$id]:-} ]] && GPU_ID=$id && return 0
    return 1
  fi
  while IFS=, read -r kind index uuid _; do
    case $kind in
      gpu) [[ $uuid != "$id"* || $id != GPU-* ]] || found+=("$index") ;;
      mig) [[ $uuid != "$id" ]] || found+=("$uuid") ;;
    esac
  done <<<"${GPU_RECORDS:-}"
  if [[ -z ${GPU_RECORDS:-} ]]; then # nvidia-smi lines: index,uuid,...
    while IFS=, read -r index uuid _; do [[ $uuid != "$id"* || $id != GPU-* ]] || found+=("$index"); done <<<"$GPU_LINES"
  fi
  ((${#found[@]} == 1)) && GPU_ID=${found[0]} && return 0
  ((${#found[@]} == 0)) && return 1
  return 2
}

# gpu::_median N... — the median of integers (the lower middle for an even count), NA for none, into
# GPU_MEDIAN: an insertion sort in bash, as there are only a few samples.
gpu::_median() {
  local sorted=() v i
  for v in "$@"; do
    for ((i = ${#sorted[@]}; i > 0 && sorted[i - 1] > v; i--)); do sorted[i]=${sorted[i - 1]}; done
    sorted[i]=$v
  done
  GPU_MEDIAN=NA
  (($#)) && GPU_MEDIAN=${sorted[($# - 1) / 2]}
  return 0
}

# gpu::is_free INDEX [NEED_MIB] — median utilization <= MAX_UTIL and at least NEED_MIB memory free.
# 0 free; 1 busy (GPU_REASON says why); 2 no such GPU or the query failed (logged).
gpu::is_free() {
  GPU_REASON=""
  log::require_int MAX_UTIL "${MAX_UTIL:-70}" 0 100 || return 2
  log::require_int "memory need (MiB)" "${2:-0}" 0 || return 2
  gpu::sample "$1" || return 2
  gpu::judge "$@"
}

# gpu::judge INDEX [NEED_MIB] — gpu::is_free's verdict from the last gpu::sample (no new query), so a
# caller deciding for several GPUs samples once.
gpu::judge() {
  local index=$1 need=${2:-0} max=${MAX_UTIL:-70} free
  GPU_REASON=""
  if [[ -z ${GPU_MEM_TOTAL[$index]:-} ]]; then
    GPU_REASON="GPU $index does not exist"
    return 2
  fi
  if [[ ${GPU_UTIL[$index]} != NA ]] && ((GPU_UTIL[$index] > max)); then
    GPU_REASON="utilization ${GPU_UTIL[$index]}% ($(gpu::_samples_text)) > MAX_UTIL ${max}%"
  elif ((need > 0)) && [[ ${GPU_MEM_USED[$index]} == NA || ${GPU_MEM_TOTAL[$index]} == NA ]]; then
    GPU_REASON="its memory use is not reported (the driver says N/A), so ${need} MiB free cannot be checked"
  elif ((need > 0)) && free=$((GPU_MEM_TOTAL[$index] - GPU_MEM_USED[$index])) && ((free < need)); then
    GPU_REASON="${free} MiB free < ${need} MiB needed"
  fi
  [[ -z $GPU_REASON ]]
}

# gpu::_samples_text — "median of 5 samples" or "1 sample" (how the last gpu::sample read utilization).
gpu::_samples_text() {
  if ((${GPU_SAMPLES:-1} == 1)); then echo "1 sample"; else echo "median of $GPU_SAMPLES samples"; fi
}

# gpu::wait_free INDEX [NEED_MIB] — wait until the GPU is free, at most MAX_WAIT seconds, logging
# progress. 0 free (GPU_WAITED_S: seconds waited); 1 still busy at MAX_WAIT (GPU_REASON); 2 error.
gpu::wait_free() {
  local index=$1 need=${2:-0} max=${MAX_WAIT:-300} poll=${MGPU_POLL_MS:-5000} rc start next_note=0 waited
  log::require_int MAX_WAIT "$max" 0 || return 2
  log::require_int MGPU_POLL_MS "$poll" 1 || return 2
  core::now_ms
  start=$CORE_NOW_MS
  while :; do
    rc=0
    gpu::is_free "$index" "$need" || rc=$?
    core::now_ms
    waited=$((CORE_NOW_MS - start))
    GPU_WAITED_S=$((waited / 1000))
    ((rc == 0 || rc == 2)) && return "$rc"
    if ((waited >= max * 1000)); then
      log::warn "GPU $index still busy after waiting ${max}s (MAX_WAIT): $GPU_REASON"
      return 1
    fi
    if ((waited >= next_note)); then
      log::info "GPU $index is busy ($GPU_REASON); waited ${GPU_WAITED_S}s of up to ${max}s"
      next_note=$((waited + 30000))
    fi
    core::sleep_ms $((poll < max * 1000 - waited ? poll : max * 1000 - waited))
  done
}
