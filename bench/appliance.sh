# Writes an appliance's manifest for the benchmarks; sourced, defines functions only.
# shellcheck shell=bash

# appliance_toml DIR NAME VERSION FROM TO: DIR/juice.toml for appliance NAME:VERSION
# with one binary FROM installed at TO; the rest of the manifest (more [build] keys,
# then [run] and so on) comes on stdin.
appliance_toml() {
  mkdir -p "$1"
  {
    printf '[appliance]\nname = "%s"\nversion = "%s"\n[build]\nbinaries = [{ from = "%s", to = "%s" }]\n' "$2" "$3" "$4" "$5"
    cat
  } >"$1/juice.toml"
}
