# shellcheck shell=bash disable=SC2034  # PLACE_* results are read by sched.sh
# place:: — where a job fits, for sched.sh: the best-connected set of GPUs for a job that needs several
# (NVLink, then the same PCIe switch, ...), from the link records of the scenario or the machine. Memory
# (free, reserved, admitted) is lease.sh's, beside the leases every launcher shares.

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
