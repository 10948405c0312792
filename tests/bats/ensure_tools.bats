#!/usr/bin/env bats
# shellcheck disable=SC2030,SC2031  # each @test is its own subshell: its exports are meant to stay there
# tools/ensure-tools.sh: what `make test` / `make demo` do on a fresh machine, with a fake apt-get.

load test_helper

setup() {
  common_setup
  BIN="$WORK/bin"
  mkdir -p "$BIN"
  # A fake apt-get that logs its arguments and "installs" a package by putting a command on PATH.
  cat >"$BIN/apt-get" <<'FAKE'
#!/usr/bin/env bash
echo "apt-get $*" >>"$APT_LOG"
[[ $1 == install ]] || exit 0
for pkg in "$@"; do
  [[ $pkg == -* || $pkg == install ]] && continue
  [[ -n ${APT_BROKEN:-} ]] && continue
  printf '#!/bin/sh\n' >"$(dirname "$0")/$pkg" && chmod +x "$(dirname "$0")/$pkg"
done
FAKE
  chmod +x "$BIN/apt-get"
  export APT_LOG="$WORK/apt.log"
}

# ensure PKG...: run the script with a PATH with the fake apt-get and the basics, but none of the tools being installed.
ensure() {
  run env PATH="$BIN:/usr/bin:/bin" BATS_LIB_PATH="$WORK/no-libs" MGPU_EUID="${AS_UID:-0}" \
    bash "$ROOT/tools/ensure-tools.sh" "$@"
}

@test "nothing missing: apt-get is not called" {
  ensure bash
  assert_success
  assert [ ! -e "$APT_LOG" ]
}

@test "missing tools are installed with one apt-get call" {
  ensure mgpu-fake-tool-a mgpu-fake-tool-b bash
  assert_success
  assert_output --partial "installing with apt-get: mgpu-fake-tool-a mgpu-fake-tool-b"
  run cat "$APT_LOG"
  assert_line --index 0 "apt-get update -qq"
  assert_line --index 1 "apt-get install -y -qq --no-install-recommends mgpu-fake-tool-a mgpu-fake-tool-b"
}

@test "an install that does not provide the tool is an error naming it" {
  APT_BROKEN=1 ensure mgpu-fake-tool-c
  assert_failure
  assert_output --partial "apt-get installed mgpu-fake-tool-c but it is still not found"
}

@test "bats libraries are found by their load.bash under BATS_LIB_PATH" {
  mkdir -p "$WORK/libs/bats-support"
  touch "$WORK/libs/bats-support/load.bash"
  run env PATH="$BIN:/usr/bin:/bin" BATS_LIB_PATH="$WORK/libs" bash "$ROOT/tools/ensure-tools.sh" bats-support
  assert_success
  assert [ ! -e "$APT_LOG" ]
}

@test "without root, sudo -n is used when it works" {
  # shellcheck disable=SC2016  # the fake's own $1 and $*, expanded when it runs
  printf '#!/usr/bin/env bash\necho "sudo $*" >>"$APT_LOG"\n[[ $1 == -n ]] && shift\n[[ $1 == true ]] || "$@"\n' >"$BIN/sudo"
  chmod +x "$BIN/sudo"
  AS_UID=1000 ensure mgpu-fake-tool-d
  assert_success
  run cat "$APT_LOG"
  assert_line --index 0 "sudo -n true"
  assert_line "sudo -n apt-get install -y -qq --no-install-recommends mgpu-fake-tool-d"
}

@test "without root or sudo, it says exactly what to install" {
  printf '#!/bin/sh\nexit 1\n' >"$BIN/sudo"
  chmod +x "$BIN/sudo"
  AS_UID=1000 ensure mgpu-fake-tool-e bash
  assert_failure
  assert_output "[ERROR] missing tools: mgpu-fake-tool-e; install them (Debian/Ubuntu: sudo apt-get install mgpu-fake-tool-e) and run make again"
  assert [ ! -e "$APT_LOG" ]
}
