#!/usr/bin/env bash
# "Prune to just enough" on a real container image: nginx assembled from Debian's
# package set (see nginx-layout.sh), imported whole and pruned, in the same run.
#
#   bash bench/import-prune.sh        (needs nginx, umoci, jq, cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d /tmp/juice-bench-import.XXXXXX)
trap 'rm -rf "$work"' EXIT
export JUICE_HOME=$work/home
. bench/nginx-layout.sh
nginx_layout

whole=$("$juice" import "$work/layout:nginx" -t nginx-whole:1 -o json)
keep=(--keep /etc/passwd --keep /etc/group --keep /etc/nginx --keep /usr/share/nginx --keep /var/lib/nginx --keep /var/log/nginx)
t0=$(date +%s%N)
pruned=$("$juice" import "$work/layout:nginx" -t nginx-pruned:1 --prune "${keep[@]}" -o json)
t1=$(date +%s%N)
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
layer() { "$juice" inspect "$1" -o json | jq .layer_size; }
printf '%-34s %8s %12s %12s\n' "" files unpacked "gzip layer"
printf '%-34s %8s %12s %12s\n' "container image (whole import)" "$(jq .kept_files <<<"$whole")" "$(mib "$(jq .kept_bytes <<<"$whole")")" "$(mib "$(layer nginx-whole:1)")"
printf '%-34s %8s %12s %12s\n' "pruned to the closure + --keep" "$(jq .kept_files <<<"$pruned")" "$(mib "$(jq .kept_bytes <<<"$pruned")")" "$(mib "$(layer nginx-pruned:1)")"
awk -v a="$(jq .kept_bytes <<<"$pruned")" -v b="$(jq .kept_bytes <<<"$whole")" 'BEGIN { printf "pruned / whole: %.3f (unpacked)\n", a / b }'
echo "pruned import took $(( (t1 - t0) / 1000000 )) ms; largest dropped directories:"
jq -r '.dropped[] | "  \(.[1]) \(.[0])"' <<<"$pruned" | head -6
echo "the pruned nginx runs (its version, from inside the appliance):"
"$juice" run -q --network none --no-cgroup nginx-pruned:1 -- -v 2>&1 | tail -1 || true
