#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests: munged, slurmctld and slurmd with
# their own configuration, sockets, state and logs in one folder, and NGPUS (1-5) fake GPUs: gres
# files that are links to harmless character devices (slurmd wants devices; /dev/null and friends need
# no root to link to). Nothing under /etc is touched; the daemons run as the current user.
#   export SLURM_CONF=$(bash tests/slurm/cluster.sh start DIR [NGPUS])   # prints the clients' SLURM_CONF
#   bash tests/slurm/cluster.sh stop DIR                      # stops every daemon it started
# Needs Debian's slurmctld, slurmd, slurm-client and munge (tools/ensure-tools.sh installs them).
set -Eeuo pipefail
PATH=$PATH:/usr/sbin:/sbin # the daemons live there; not every user has it on PATH

# free_port — a TCP port nothing listens on
free_port() {
  local port
  for port in $(shuf -i 20000-60000 -n 50); do
    (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null || { echo "$port"; return 0; }
  done
  return 1
}

# wait_for WHAT SECONDS COMMAND... — retry COMMAND until it succeeds, or fail naming WHAT
wait_for() {
  local what=$1 limit=$2 i
  shift 2
  for ((i = 0; i < limit * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "[ERROR] $what did not come up within ${limit}s; its log:" >&2
  return 1
}

start() {
  local dir=$1 ngpus=${2:-4} host user cpus mem i
  mkdir -p "$dir"/{state,spool,munge,gpus}
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir/munge"
  host=$(hostname -s) user=$(id -un) cpus=$(nproc)
  ((cpus >= 2 * ngpus)) || cpus=$((2 * ngpus)) # room for every fake GPU's task on a small machine
  mem=$(awk '/^MemTotal/ { print int($2 / 1024 * 0.8) }' /proc/meminfo)
  # munge: a fresh key; the socket, pid, seed and log files all in the folder
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" --log-file="$dir/munge/munged.log"
  wait_for munged 10 munge -S "$dir/munge/munge.socket" -n || { cat "$dir/munge/munged.log" >&2; return 1; }
  local devices=(/dev/null /dev/zero /dev/full /dev/urandom /dev/random)
  ((ngpus >= 1 && ngpus <= ${#devices[@]})) || { echo "[ERROR] NGPUS must be 1 to ${#devices[@]}, got $ngpus" >&2; return 2; }
  for ((i = 0; i < ngpus; i++)); do ln -sfn "${devices[i]}" "$dir/gpus/gpu$i"; done
  cat >"$dir/slurm.conf" <<CONF
ClusterName=mgpu-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$ngpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
CONF
  cat >"$dir/gres.conf" <<CONF
NodeName=$host Name=gpu File=$dir/gpus/gpu[0-$((ngpus - 1))]
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -i
  slurmd
  # shellcheck disable=SC2016  # expanded by that bash, at each try
  wait_for slurmd 60 bash -c '[[ $(sinfo -h -N -o %T) == idle* ]]' || {
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2
    return 1
  }
  printf '%s\n' "$SLURM_CONF"
}

stop() {
  local dir=$1 pidfile pid i env
  export SLURM_CONF=$dir/slurm.conf
  if [[ -s $dir/slurmctld.pid ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null; then
    scancel --user="$(id -un)" 2>/dev/null || true # jobs a failed test left behind
    for ((i = 0; i < 150; i++)); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.1; done
  fi
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [[ -s $pidfile ]] || continue
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || continue
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # slurmstepd outlives slurmd by design: any of this cluster's (its SLURM_CONF) goes, with every
  # process under it and every process group one of those leads (a job's own group, as mgpu makes)
  local doomed=" " stat fields grew=1
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/} pid=${pid%%/*}
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurmstepd ]] || continue
    if tr '\0' '\n' <"$env" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then doomed+="$pid "; fi
  done
  [[ -n ${doomed// /} ]] || return 0
  while ((grew)); do # add children, and members of the groups they lead, until nothing new turns up
    grew=0
    for stat in /proc/[0-9]*/stat; do # fields after the name: state ppid pgrp ...
      read -r fields <"$stat" 2>/dev/null || continue
      pid=${stat//[!0-9]/}
      read -r -a fields <<<"${fields##*) }"
      [[ $doomed != *" $pid "* ]] || continue
      if [[ $doomed == *" ${fields[1]} "* || $doomed == *" ${fields[2]} "* ]]; then doomed+="$pid " grew=1; fi
    done
  done
  # shellcheck disable=SC2086  # the list splits into pids
  kill -KILL $doomed 2>/dev/null || true
}

case ${1:-} in
  start) start "${@:2}" ;;
  stop) stop "${@:2}" ;;
  *) echo "usage: $0 start DIR [NGPUS] | stop DIR" >&2; exit 2 ;;
esac
