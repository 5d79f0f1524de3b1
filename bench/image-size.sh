#!/usr/bin/env bash
# "Just enough": the nginx appliance against what Debian's package manager
# installs for nginx, measured in the same run on the same machine.
#
# Baselines, each resolved by apt itself (simulated against an empty dpkg
# status, i.e. a system with nothing installed) and summed from the package
# index as Installed-Size (unpacked) and Size (.deb download):
#   A. `apt-get install nginx`: the issue's baseline (apt installs Recommends by default);
#   B. A without the packages every Debian already has (Essential, Priority required/important);
#   C. `apt-get install --no-install-recommends nginx`: the leanest answer apt gives.
#
# Usage: bench/image-size.sh   (needs: nginx installed, cargo build --release, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
juice=target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export JUICE_HOME=$work/home
: >"$work/empty-status"

$juice build examples/nginx -t nginx:bench -q >/dev/null
json=$($juice inspect nginx:bench -o json)
img_unpacked=$(jq '.appliance.sizes | .binaries + .libraries + .files + .generated' <<<"$json")
img_layer=$(jq '.layer_size' <<<"$json")

# closure [apt options...] -> "count unpacked_bytes deb_bytes" (skip_base=1 drops base packages)
closure() {
  local skip_base=$1; shift
  local n=0 inst_sum=0 deb_sum=0 p fields inst deb
  for p in $(apt-get -s -o Dir::State::status="$work/empty-status" install "$@" nginx 2>/dev/null | awk '/^Inst/ {print $2}'); do
    fields=$(apt-cache show --no-all-versions "$p" 2>/dev/null) || continue
    if [ "$skip_base" = 1 ] && grep -Eq '^(Essential: yes|Priority: (required|important))' <<<"$fields"; then
      continue
    fi
    inst=$(awk '/^Installed-Size:/ {print $2; exit}' <<<"$fields")
    deb=$(awk '/^Size:/ {print $2; exit}' <<<"$fields")
    n=$((n + 1)); inst_sum=$((inst_sum + inst * 1024)); deb_sum=$((deb_sum + deb))
  done
  echo "$n $inst_sum $deb_sum"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
printf '%-58s %11s %11s %9s %9s\n' "" unpacked download "ratio u." "ratio d."
printf '%-58s %11s %11s\n' "juice nginx appliance (files / gzip layer)" "$(mib "$img_unpacked")" "$(mib "$img_layer")"
row() {
  local label=$1 n inst deb; read -r n inst deb <<<"$2"
  printf '%-58s %11s %11s %9s %9s\n' "$label ($n packages)" "$(mib "$inst")" "$(mib "$deb")" \
    "$(ratio "$img_unpacked" "$inst")" "$(ratio "$img_layer" "$deb")"
}
row "A. apt-get install nginx" "$(closure 0)"
row "B. A minus base packages a fresh Debian has" "$(closure 1)"
row "C. apt-get install --no-install-recommends nginx" "$(closure 0 --no-install-recommends)"
echo "ratio = appliance / baseline; goal: at most 0.25"
