# shellcheck shell=bash disable=SC2034  # PLACE_* results are read by sched.sh
# place:: — where a job fits, for sched.sh: the best-connected set of GPUs for a job that needs several
# (NVLink, then the same PCIe switch, ...), and memory: what a GPU has free once the reservations of jobs
# still starting are counted (theirs and other launchers'), a job's own use from the per-process list,
# and the admission that writes a reservation under a per-GPU lock, so two launchers never both count
# the same free memory (the start-up race that made task-spooler drop its free-memory check).
# Reservations are files MGPU_LOCK_DIR/gpu<dev>.need.<launcher pid>.<job>: "<MiB> <job pid or ->".

declare -A PLACE_LINK=() # "i,j" (i < j) -> rank of the link: 0 NVLink ... 5 SYS, 6 unknown

# place::links — PLACE_LINK from the GPU records' link lines (scenario, or the machine's topology).
place::links() {
  local kind a b level
  PLACE_LINK=()
  while IFS=, read -r kind a b level; do
    [[ $kind == link ]] || continue
    place::rank "$level"
    PLACE_LINK[$a,$b]=$PLACE_RANK PLACE_LINK[$b,$a]=$PLACE_RANK
  done <<<"${GPU_RECORDS:-}"
}

# place::rank LEVEL — PLACE_RANK: how close two GPUs are (nvidia-smi topo -m's words): NV<k> 0, PIX 1,
# PXB 2, PHB 3, NODE 4, SYS 5 (SOC, older drivers' word, too), anything else 6.
place::rank() {
  case $1 in
    NV*) PLACE_RANK=0 ;;
    PIX) PLACE_RANK=1 ;;
    PXB) PLACE_RANK=2 ;;
    PHB) PLACE_RANK=3 ;;
    NODE) PLACE_RANK=4 ;;
    SYS | SOC) PLACE_RANK=5 ;;
    *) PLACE_RANK=6 ;;
  esac
}

# place::level RANK — the words for a rank, into PLACE_LEVEL.
place::level() {
  local words=(NVLink "one PCIe switch" "PCIe switches" "one host bridge" "one NUMA node" "across NUMA nodes" "unknown links")
  PLACE_LEVEL=${words[$1]}
}

# place::set N SLOT... — the best-connected N slots (on N GPUs) of the candidates, given in preference
# order, into PLACE_SET; PLACE_SET_RANK is its worst link. Greedy from each candidate: add the GPU whose
# worst link to the set is best (then the earlier one); keep the set with the best worst link, then the
# smallest sum of links, then the earliest start.
place::set() {
  local n=$1 i j best_rank=99 best_sum=0 set=() rank sum
  shift
  local cand=("$@")
  PLACE_SET=() PLACE_SET_RANK=6
  ((n > 1)) || { PLACE_SET=("${cand[0]}") PLACE_SET_RANK=0; return 0; }
  for ((i = 0; i < ${#cand[@]}; i++)); do
    set=("${cand[i]}") rank=0 sum=0
    while ((${#set[@]} < n)); do
      place::_closest set "${cand[@]}"
      [[ -n $PLACE_NEXT ]] || break
      set+=("$PLACE_NEXT")
      ((PLACE_NEXT_RANK <= rank)) || rank=$PLACE_NEXT_RANK
      sum=$((sum + PLACE_NEXT_SUM))
    done
    ((${#set[@]} == n)) || continue
    if ((rank < best_rank || (rank == best_rank && sum < best_sum))); then
      best_rank=$rank best_sum=$sum PLACE_SET=("${set[@]}")
    fi
  done
  PLACE_SET_RANK=$best_rank
}

# place::_closest SETNAME SLOT... — the candidate not in the set with the best worst link to it.
place::_closest() {
  local -n _set=$1
  shift
  local c m worst sum r dev best=99 best_sum=0
  PLACE_NEXT=""
  for c in "$@"; do
    [[ " ${_set[*]} " != *" $c "* ]] || continue
    worst=0 sum=0
    for m in "${_set[@]}"; do
      dev=${c%:*}
      r=${PLACE_LINK[$dev,${m%:*}]:-6}
      ((r <= worst)) || worst=$r
      sum=$((sum + r))
    done
    if ((worst < best || (worst == best && sum < best_sum))); then
      best=$worst best_sum=$sum PLACE_NEXT=$c
    fi
  done
  PLACE_NEXT_RANK=$best PLACE_NEXT_SUM=$best_sum
}

# place::worst DEV... — the worst link among the devices, as words, into PLACE_LEVEL ("" for one device).
place::worst() {
  local a b worst=0 r
  PLACE_LEVEL=""
  (($# > 1)) || return 0
  for a in "$@"; do
    for b in "$@"; do
      [[ $a != "$b" ]] || continue
      r=${PLACE_LINK[$a,$b]:-6}
      ((r <= worst)) || worst=$r
    done
  done
  place::level "$worst"
}

# place::usage PGID DEV — MiB the processes of a job (its process group) use on a device, from the last
# sample's process list (GPU_PROCS: "dev,pid,MiB" lines), into PLACE_USAGE.
place::usage() {
  local dev pid used stat fields
  PLACE_USAGE=0
  while IFS=, read -r dev pid used; do
    [[ $dev == "$2" && $used =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || continue
    read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
    read -r -a fields <<<"${stat##*) }" # state ppid pgrp
    [[ ${fields[2]} != "$1" ]] || PLACE_USAGE=$((PLACE_USAGE + used))
  done <<<"${GPU_PROCS:-}"
}

# place::reserved DEV [SKIP] — MiB still reserved on a device by jobs that are starting: each live
# reservation counts what its job has not yet allocated (its need minus its use now). SKIP: one
# reservation file to leave out (the caller's own). Files of ended jobs are removed when ours.
place::reserved() {
  local file need pid owner _
  PLACE_RESERVED=0
  for file in "${MGPU_LOCK_DIR:-/tmp/mgpu-locks}/gpu$1".need.*; do
    [[ -f $file && $file != "${2:-}" ]] || continue
    read -r need pid _ 2>/dev/null <"$file" || continue
    owner=${file##*.need.} owner=${owner%%.*}
    if [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]]; then
      place::usage "$pid" "$1"
      ((need <= PLACE_USAGE)) || PLACE_RESERVED=$((PLACE_RESERVED + need - PLACE_USAGE))
    elif [[ $pid == - && $owner =~ ^[0-9]+$ && -d /proc/$owner ]]; then
      PLACE_RESERVED=$((PLACE_RESERVED + need)) # its job is being forked right now
    elif [[ -O $file ]]; then
      rm -f -- "$file" # a reservation whose job ended (killed before it could remove it)
    fi
  done
}

# place::free DEV [SKIP] — MiB free on the device for a new job (total - used - reserved), into
# PLACE_FREE; NA when the driver does not report its memory (unified memory): then nothing fits.
place::free() {
  PLACE_FREE=NA
  [[ ${GPU_MEM_TOTAL[$1]:-NA} != NA && ${GPU_MEM_USED[$1]:-NA} != NA ]] || return 0
  place::reserved "$1" "${2:-}"
  PLACE_FREE=$((GPU_MEM_TOTAL[$1] - GPU_MEM_USED[$1] - PLACE_RESERVED))
}

# place::admit JOB NEED DEV... — reserve NEED MiB (all: every MiB free, for a job never measured, which
# runs alone) on each device for the job, each under that device's admission lock (free memory is
# counted again inside it, other launchers' reservations included); 0 admitted (PLACE_RESERVATIONS lists
# the files, PLACE_RESERVED_MIB what each holds), 1 not (PLACE_WHY says why; nothing is left reserved).
place::admit() {
  local job=$1 need=$2 dev fd file mib dir=${MGPU_LOCK_DIR:-/tmp/mgpu-locks}
  shift 2
  PLACE_RESERVATIONS=() PLACE_RESERVED_MIB=() PLACE_WHY=""
  for dev in "$@"; do
    file=$dir/gpu$dev.need.$$.$job
    lease::_open "$dir/gpu$dev.admit.lock" MGPU_LOCK_DIR || { PLACE_WHY="GPU $dev: its admission lock is unusable"; break; }
    fd=$LEASE_OPEN_FD
    if ! flock -w 10 "$fd"; then
      exec {fd}<&-
      PLACE_WHY="GPU $dev: its admission lock stayed taken for 10 s"
      break
    fi
    place::free "$dev" "$file"
    mib=$need
    [[ $need != all ]] || mib=$PLACE_FREE
    if [[ $PLACE_FREE == NA ]]; then
      PLACE_WHY="GPU $dev does not report its memory, so its free memory cannot be checked"
    elif [[ $need == all ]] && ((PLACE_RESERVED > 0 || mib <= 0)); then
      PLACE_WHY="GPU $dev is shared right now, and a config never measured runs alone"
    elif ((PLACE_FREE < mib)); then
      PLACE_WHY="GPU $dev has $PLACE_FREE MiB free (after ${PLACE_RESERVED} MiB reserved by starting jobs) < $need MiB needed"
    else
      printf '%s -\n' "$mib" 2>/dev/null >"$file" && PLACE_RESERVATIONS+=("$file") PLACE_RESERVED_MIB+=("$mib")
    fi
    exec {fd}<&- # the lock goes with its last descriptor
    [[ -z $PLACE_WHY ]] || break
  done
  [[ -n $PLACE_WHY ]] || return 0
  ((${#PLACE_RESERVATIONS[@]} == 0)) || rm -f -- "${PLACE_RESERVATIONS[@]}"
  PLACE_RESERVATIONS=() PLACE_RESERVED_MIB=()
  return 1
}
