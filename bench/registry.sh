#!/usr/bin/env bash
# Push and pull throughput against a local registry (Debian's docker-registry on
# loopback), beside `skopeo copy` of the same image in the same run.
# The image: nginx assembled from Debian's package set (nginx-layout.sh), imported whole.
#
#   bash bench/registry.sh [RUNS]     (needs docker-registry, skopeo, umoci, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d /tmp/juice-bench-registry.XXXXXX)
. bench/local-registry.sh
cleanup() { stop_registry; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export JUICE_HOME=$work/home
. bench/nginx-layout.sh
nginx_layout
"$juice" import "$work/layout:nginx" -t nginx:bench -q >/dev/null 2>&1 || "$juice" import "$work/layout:nginx" -t nginx:bench >/dev/null
bytes=$("$juice" inspect nginx:bench -o json | jq '.layer_size')


now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
jp=(); sp=(); jl=(); sl=()
for i in $(seq "$runs"); do
  start_registry
  t=$(now_ms); "$juice" push -q nginx:bench "$reg/j$i/nginx:1" --insecure "$reg" >/dev/null; jp+=($(( $(now_ms) - t )))
  t=$(now_ms); skopeo copy -q --dest-tls-verify=false "oci:$JUICE_HOME/images:nginx:bench" "docker://$reg/s$i/nginx:1"; sp+=($(( $(now_ms) - t )))
  t=$(now_ms); JUICE_HOME=$work/pull-$i "$juice" pull -q "$reg/j$i/nginx:1" --insecure "$reg" >/dev/null; jl+=($(( $(now_ms) - t )))
  t=$(now_ms); skopeo copy -q --src-tls-verify=false "docker://$reg/s$i/nginx:1" "oci:$work/skopeo-$i:nginx"; sl+=($(( $(now_ms) - t )))
  stop_registry; rm -rf "$work/pull-$i" "$work/skopeo-$i"
done
row() {
  local what=$1 j s
  j=$(printf '%s\n' "${@:2:$runs}" | median); shift $((runs + 1)); s=$(printf '%s\n' "$@" | median)
  awk -v w="$what" -v j="$j" -v s="$s" -v b="$bytes" 'BEGIN { printf "%-6s juice %7.0f ms (%6.1f MiB/s)   skopeo copy %7.0f ms (%6.1f MiB/s)   juice/skopeo %.2f\n", w, j, b/1048576/(j/1000), s, b/1048576/(s/1000), j/s }'
}
echo "image: nginx from Debian packages, $(awk -v b="$bytes" 'BEGIN { printf "%.2f MiB", b/1048576 }') gzip layer; $runs runs, medians, each to a fresh repository / store"
row push "${jp[@]}" "${sp[@]}"
row pull "${jl[@]}" "${sl[@]}"
