#!/usr/bin/env bash
# Installs the system tools that mgpu's make targets need, through apt-get, when they are missing.
#   bash tools/ensure-tools.sh jq bats bats-support bats-assert shellcheck
# Each name is a Debian package; a tool already present is left alone. Without root it uses
# `sudo -n`, and when neither works it says exactly what to install instead of failing later.
# MGPU_EUID overrides the user id it believes it runs as (the tests use it).
set -Eeuo pipefail

# _present PACKAGE: is what PACKAGE provides already here?
_present() {
  case $1 in
    bats-support | bats-assert)
      local dir
      for dir in ${BATS_LIB_PATH:+${BATS_LIB_PATH//:/ }} /usr/lib/bats /usr/local/lib/bats /opt/homebrew/lib; do
        [[ -f $dir/$1/load.bash ]] && return 0
      done
      return 1
      ;;
    slurm-client) command -v sbatch >/dev/null 2>&1 ;;
    munge) command -v munged >/dev/null 2>&1 || [[ -x /usr/sbin/munged ]] ;;
    slurmctld | slurmd) command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

main() {
  local pkg missing=()
  for pkg in "$@"; do
    _present "$pkg" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0

  local sudo=()
  if ((${MGPU_EUID:-$EUID} != 0)); then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "[ERROR] missing tools: ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run make again" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[ERROR] missing tools: ${missing[*]}, and no apt-get here to install them; install them with your package manager and run make again" >&2
    return 1
  fi
  echo "[INFO] installing with apt-get: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Daemons (munge, slurmctld, slurmd) are installed for the tests, which start their own private ones:
  # a policy-rc.d that says no keeps the packages from starting system-wide services meanwhile.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ " ${missing[*]} " == *" slurm"* || " ${missing[*]} " == *" munge "* ]] && [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy" && own_policy=1
  fi
  local rc=0
  "${sudo[@]}" apt-get update -qq || rc=$?
  ((rc)) || "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  ((!own_policy)) || "${sudo[@]}" rm -f "$policy"
  ((rc == 0)) || { echo "[ERROR] apt-get failed (exit $rc) installing: ${missing[*]}" >&2; return 1; }
  for pkg in "${missing[@]}"; do
    _present "$pkg" || { echo "[ERROR] apt-get installed $pkg but it is still not found" >&2; return 1; }
  done
}

main "$@"
