#!/usr/bin/env bash
# One daemon with COUNT instances in one group: the daemon's memory per instance, and
# the latency of `juice get instances` (p50, p99 over 200 runs), against `juice images`
# (the same CLI start and output, without the daemon) measured in the same run.
#
# Usage: bench/scale.sh [COUNT]   (root; needs cargo build --release, jq, hyperfine)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
count=${1:-500}
write_site "$PWD/examples/hello-web" "$count" "max_unavailable = $count" 'health_gate = "1s"'
start_daemon
rss() { awk '/^VmRSS:/ {print $2}' /proc/$daemon/status; }
idle_kib=$(rss)
t0=$(date +%s%3N)
"$juice" apply -f "$work/site.toml" >/dev/null
until group_ready "$count"; do sleep 0.5; done
up_ms=$(( $(date +%s%3N) - t0 ))
sleep 2
full_kib=$(rss)
hyperfine -N --warmup 5 --runs 200 --export-json "$work/get.json" "$juice get instances -o json" "$juice images -o json" >/dev/null 2>&1
pct() { jq -r --argjson i "$1" --arg p "$2" '.results[$i].times | sort | .[(length * ($p | tonumber) / 100 | floor)] * 1000' "$work/get.json"; }
echo "instances: $count (one group, all healthy after ${up_ms} ms)"
printf '%-52s %8s KiB\n' "daemon RSS idle" "$idle_kib"
printf '%-52s %8s KiB\n' "daemon RSS with $count instances" "$full_kib"
printf '%-52s %8.1f KiB\n' "daemon memory per instance" "$(awk -v a="$full_kib" -v b="$idle_kib" -v n="$count" 'BEGIN{print (a-b)/n}')"
printf '%-52s %8.2f ms   p99 %6.2f ms\n' "juice get instances -o json: p50" "$(pct 0 50)" "$(pct 0 99)"
printf '%-52s %8.2f ms   p99 %6.2f ms\n' "baseline juice images -o json (no daemon): p50" "$(pct 1 50)" "$(pct 1 99)"
echo "goal: get instances p99 under 20 ms"
