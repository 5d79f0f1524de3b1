#!/usr/bin/env bash
# Rollout of a 20-instance group to a new revision, and the automatic rollback of a
# revision that never passes its health check, against the time the work itself
# needs, measured in the same run: batches x (one instance's start to healthy +
# the health gate).
#
# Usage: bench/rollout.sh [SIZE] [BATCH]   (root; needs cargo build --release, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
size=${1:-20}
batch=${2:-5}
gate=2
# Three revisions of hello-web: v1, v2 (another static file), and broken (health checks a missing page).
for v in v1 v2 broken; do
  mkdir -p "$work/$v/static"
  echo "$v" >"$work/$v/static/index.html"
  sed -e "s|\"../../target|\"$PWD/target|" -e "s|\"static/\"|\"$work/$v/static/\"|" examples/hello-web/juice.toml >"$work/$v/juice.toml"
done
sed -i 's|http = "/healthz"|http = "/missing"|' "$work/broken/juice.toml"
site() { write_site "$work/$1" "$size" "max_unavailable = $batch" "health_gate = \"${gate}s\"" 'on_failure = "rollback"'; }
start_daemon
status() { "$juice" get groups -o json | jq -r '.[0].status'; }
settled() { "$juice" get groups -o json | jq -e --argjson n "$size" '.[0].ready == $n and .[0].running == $n and .[0].status == "ok"' >/dev/null; }

site v1
t0=$(now_ms); "$juice" apply -f "$work/site.toml" >/dev/null
until settled; do sleep 0.05; done
create=$(( $(now_ms) - t0 ))

# One instance's start to healthy, from the daemon's own start histogram and probe timing:
# measured here as the first creation's time minus the gate (one batch: all at once).
per_instance=$(( create - gate * 1000 ))

site v2
t0=$(now_ms); "$juice" apply -f "$work/site.toml" >/dev/null
until settled && [ "$("$juice" get groups -o json | jq '.[0].revision')" = 2 ]; do sleep 0.05; done
rollout=$(( $(now_ms) - t0 ))

site broken
t0=$(now_ms); "$juice" apply -f "$work/site.toml" >/dev/null
until status | grep -q rolled-back; do sleep 0.05; done
rolled_back=$(( $(now_ms) - t0 ))
until "$juice" get groups -o json | jq -e --argjson n "$size" '.[0].ready == $n and .[0].running == $n' >/dev/null; do sleep 0.05; done
recovered=$(( $(now_ms) - t0 ))

batches=$(( (size + batch - 1) / batch ))
floor=$(( batches * (per_instance + gate * 1000) ))
echo "group of $size, batches of $batch, health gate ${gate}s"
printf '%-60s %7s ms\n' "create ($size at once, until all passed the gate)" "$create"
printf '%-60s %7s ms\n' "one batch's own work: start to healthy (create - gate)" "$per_instance"
printf '%-60s %7s ms\n' "rollout v1 -> v2 (all $size replaced, gated)" "$rollout"
printf '%-60s %7s ms\n' "baseline: $batches batches x (start to healthy + gate)" "$floor"
printf '%-60s %7.2f\n' "ratio rollout / baseline" "$(awk -v a="$rollout" -v b="$floor" 'BEGIN{print a/b}')"
printf '%-60s %7s ms\n' "broken revision applied -> rolled back by itself" "$rolled_back"
printf '%-60s %7s ms\n' "broken revision applied -> $size healthy again" "$recovered"
