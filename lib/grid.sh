# shellcheck shell=bash
# grid:: — the configurations of a sweep, from the seed-style arrays or a JSON config file (jq, see
# grid.jq). Fills CFG_NAME[i], CFG_IMAGE[i], CFG_TEXT[i] and CFG_FLAGS[i] (one flag word per line).
# Names and values are data: never evaluated, and names keep only [A-Za-z0-9._-].

# shellcheck source=lib/core.sh
[[ -n ${MGPU_LIB:-} ]] || source "${BASH_SOURCE[0]%/*}/core.sh"
# shellcheck source=lib/json.sh
source "$MGPU_LIB/json.sh"

GRID_NAME_MAX=120 # a config name names its output folder and, with ~30 more characters, its log files

# grid::safe_name TEXT — TEXT with every character outside [A-Za-z0-9._-] made '_' and no leading dot,
# so it can never leave the folder it names a file in ("../x" becomes "_._x"), into GRID_NAME. A name
# longer than GRID_NAME_MAX keeps its start and ends with 8 hex digits of the whole text's SHA-256, so
# it stays unique and the same from run to run (--resume finds it again).
grid::safe_name() {
  local name=${1//[^A-Za-z0-9._-]/_} sum
  while [[ $name == .* ]]; do name=_${name#.}; done
  if ((${#name} > GRID_NAME_MAX)); then
    sum=$(printf '%s' "$1" | sha256sum)
    name=${name:0:GRID_NAME_MAX-9}_${sum:0:8}
  fi
  GRID_NAME=${name:-_}
}

grid::_reset() { CFG_NAME=() CFG_IMAGE=() CFG_TEXT=() CFG_FLAGS=() CFG_WHERE=(); }

# grid::_add NAME IMAGE TEXT FLAGS WHERE — append one configuration; a repeated name is an error.
grid::_add() {
  local name i
  grid::safe_name "$1"
  name=$GRID_NAME
  for i in "${!CFG_NAME[@]}"; do
    if [[ ${CFG_NAME[i]} == "$name" ]]; then
      log::error "two configurations are both named '$name' (${CFG_WHERE[i]} and $5): give them different names"
      return 1
    fi
  done
  CFG_NAME+=("$name") CFG_IMAGE+=("$2") CFG_TEXT+=("$3") CFG_FLAGS+=("$4") CFG_WHERE+=("$5")
}

# grid::from_lists — every image encoder x every text encoder, from IMAGE_ENCODERS and TEXT_ENCODERS.
grid::from_lists() {
  grid::_reset
  local image text
  ((${#IMAGE_ENCODERS[@]})) || { log::error "IMAGE_ENCODERS is empty: name at least one image encoder"; return 1; }
  ((${#TEXT_ENCODERS[@]})) || { log::error "TEXT_ENCODERS is empty: name at least one text encoder"; return 1; }
  for image in "${IMAGE_ENCODERS[@]}"; do
    for text in "${TEXT_ENCODERS[@]}"; do
      grid::_add "${image}_${text}" "$image" "$text" "" "IMAGE_ENCODERS x TEXT_ENCODERS" || return 1
    done
  done
}

# grid::from_file FILE — the configurations of a JSON config file; errors name the file and JSON path.
grid::from_file() {
  local file=$1 out lines=() i=0 n flags
  grid::_reset
  if [[ ! -f $file || ! -r $file ]]; then
    log::error "CONFIG_FILE: $file: no such readable file"
    return 1
  fi
  out=$(json::run CONFIG_FILE "$file" "$MGPU_LIB/grid.jq") || return 1
  mapfile -t lines <<<"$out"
  while ((i + 4 < ${#lines[@]})); do # name, image, text, where, flag count, the flags, "." (grid.jq)
    n=${lines[i + 4]}
    printf -v flags '%s\n' "${lines[@]:i+5:n}"
    grid::_add "${lines[i]}" "${lines[i + 1]}" "${lines[i + 2]}" "${flags%$'\n'}" "$file: ${lines[i + 3]}" || return 1
    i=$((i + 6 + n))
  done
}
