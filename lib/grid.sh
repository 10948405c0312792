# shellcheck shell=bash
# grid:: — the configurations of a sweep, from the seed-style arrays or a JSON config file (jq, see
# grid.jq). Fills CFG_NAME[i], CFG_IMAGE[i], CFG_TEXT[i] and CFG_FLAGS[i] (one flag word per line).
# Names and values are data: never evaluated, and names keep only [A-Za-z0-9._-].

_GRID_LIB_DIR=${BASH_SOURCE[0]%/*}
[[ ${BASH_SOURCE[0]} == */* ]] || _GRID_LIB_DIR=.
[[ $_GRID_LIB_DIR == /* ]] || _GRID_LIB_DIR=$PWD/$_GRID_LIB_DIR
# shellcheck source=lib/json.sh
source "$_GRID_LIB_DIR/json.sh"

# grid::safe_name TEXT — TEXT with every character outside [A-Za-z0-9._-] made '_' and no leading dot,
# so it can never leave the folder it names a file in: "../x" becomes "_._x".
grid::safe_name() {
  local name=${1//[^A-Za-z0-9._-]/_}
  while [[ $name == .* ]]; do name=_${name#.}; done
  printf '%s\n' "${name:-_}"
}

grid::_reset() { CFG_NAME=() CFG_IMAGE=() CFG_TEXT=() CFG_FLAGS=() CFG_WHERE=(); }

# grid::_add NAME IMAGE TEXT FLAGS WHERE — append one configuration; a repeated name is an error.
grid::_add() {
  local name i
  name=$(grid::safe_name "$1")
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
  out=$(json::run CONFIG_FILE "$file" "$_GRID_LIB_DIR/grid.jq") || return 1
  mapfile -t lines <<<"$out"
  while ((i + 4 < ${#lines[@]})); do # name, image, text, where, flag count, the flags, "." (grid.jq)
    n=${lines[i + 4]}
    printf -v flags '%s\n' "${lines[@]:i+5:n}"
    grid::_add "${lines[i]}" "${lines[i + 1]}" "${lines[i + 2]}" "${flags%$'\n'}" "$file: ${lines[i + 3]}" || return 1
    i=$((i + 6 + n))
  done
}
