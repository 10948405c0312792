# shellcheck shell=bash
# lease:: — at most one job per GPU slot across every mgpu launcher on the machine (two users, or one
# user twice). A lease is a flock on MGPU_LOCK_DIR/gpu<N>.slot<K>.lock (default /tmp/mgpu-locks, a
# sticky world-writable folder): the kernel drops it when the last process holding it ends, so a
# crashed launcher or job never leaves a stale lease. Lock files are only ever opened for reading and
# symbolic links are refused, so no lock file can make mgpu write elsewhere.

LEASE_FD=""

# lease::take GPU SLOT — take the lease of this GPU slot into the open descriptor LEASE_FD; 1 when
# another launcher holds it. The job started next inherits the descriptor and so holds the lease for as
# long as any of its processes lives; the launcher then closes its own copy.
lease::take() {
  local dir=${MGPU_LOCK_DIR:-/tmp/mgpu-locks} file
  file=$dir/gpu$1.slot$2.lock
  [[ -d $dir ]] || mkdir -m 1777 "$dir" 2>/dev/null || mkdir -p "$dir" 2>/dev/null || true
  if [[ -L $dir || -L $file ]]; then
    die "MGPU_LOCK_DIR: refusing the lock file $file: it or its folder is a symbolic link"
  fi
  [[ -e $file ]] || (set -C; : >"$file") 2>/dev/null || [[ -e $file ]] ||
    die "MGPU_LOCK_DIR: cannot create the lock file $file (set MGPU_LOCK_DIR to a writable folder)"
  if [[ -L $file ]]; then
    die "MGPU_LOCK_DIR: refusing the lock file $file: it is a symbolic link"
  fi
  exec {LEASE_FD}<"$file"
  if flock -n "$LEASE_FD"; then
    return 0
  fi
  exec {LEASE_FD}<&-
  return 1
}
