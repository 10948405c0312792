# shellcheck shell=bash disable=SC2034  # CFG_* are read by the entry script
# grid:: — the configurations of a sweep, from the IMAGE_ENCODERS x TEXT_ENCODERS arrays or a JSON config
# file with hyper-parameter grids and random search. The logic is Python's (`python -m mgpu.grid`: lists,
# ranges, names, reserved keys, and the trainer's own check of every argument); this file reads its lines.
# Fills CFG_NAME[i], CFG_IMAGE[i], CFG_TEXT[i], CFG_WHERE[i] (JSON path), CFG_PARAMS[i] (the varying
# hyper-parameters, compact JSON), CFG_LAUNCH[i] ("gpus_per_job=2 need_mem=12G") and CFG_FLAGS[i] (one
# flag word per line). Names and values are data: never evaluated, and names keep only [A-Za-z0-9._-].

# shellcheck source=lib/core.sh
[[ -n ${MGPU_LIB:-} ]] || source "${BASH_SOURCE[0]%/*}/core.sh"

# grid::load SETTING [mgpu.grid options...] [-- trainer args] — run `python -m mgpu.grid` and read its
# configurations; 2 (logged as "SETTING: <what is wrong>") on a fault.
grid::load() {
  local setting=$1 out lines=() i=0 n flags
  shift
  CFG_NAME=() CFG_IMAGE=() CFG_TEXT=() CFG_WHERE=() CFG_PARAMS=() CFG_LAUNCH=() CFG_FLAGS=()
  core::py_env
  if ! out=$("${CORE_PY[@]}" -m mgpu.grid "$@" 2>&1); then
    log::error "$setting: ${out##*$'\n'}"
    return 2
  fi
  mapfile -t lines <<<"$out"
  while ((i + 6 < ${#lines[@]})); do # name image text where params launcher count flags... "."
    n=${lines[i + 6]}
    printf -v flags '%s\n' "${lines[@]:i+7:n}"
    CFG_NAME+=("${lines[i]}") CFG_IMAGE+=("${lines[i + 1]}") CFG_TEXT+=("${lines[i + 2]}") CFG_WHERE+=("${lines[i + 3]}")
    CFG_PARAMS+=("${lines[i + 4]}") CFG_LAUNCH+=("${lines[i + 5]}") CFG_FLAGS+=("${flags%$'\n'}")
    i=$((i + 8 + n))
  done
}

# grid::from_lists [CHECK...] — every image encoder x every text encoder (IMAGE_ENCODERS, TEXT_ENCODERS).
grid::from_lists() {
  local IFS=,
  grid::load "IMAGE_ENCODERS x TEXT_ENCODERS" --image-encoders "${IMAGE_ENCODERS[*]}" \
    --text-encoders "${TEXT_ENCODERS[*]}" "$@"
}

# grid::from_file FILE [CHECK...] — the configurations of a JSON config file; errors name the file and
# the JSON path.
grid::from_file() {
  local file=$1
  shift
  if [[ ! -f $file || ! -r $file ]]; then
    log::error "CONFIG_FILE: $file: no such readable file"
    return 2
  fi
  grid::load "CONFIG_FILE: $file" --config-file "$file" "$@"
}
