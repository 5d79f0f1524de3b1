#!/usr/bin/env bash
# Self-heal latency: an instance of a running group is killed with SIGKILL; how long
# until Juice has noticed (the "ended" event) and started the replacement (the
# "started" event), and until the replacement answers its health check. The baseline
# measured in the same run is the appliance's own start: `juice run` of the same image
# to its first answer, with the same sandbox and network.
#
# Usage: bench/heal.sh [KILLS]   (root; needs cargo build --release, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
kills=${1:-20}
cat >"$work/site.toml" <<TOML
[group.web]
image = "$PWD/examples/hello-web"
size = 2
[group.web.update]
health_gate = "1s"
TOML
start_daemon
"$juice" apply -f "$work/site.toml" >/dev/null
ready() { [ "$("$juice" get groups -o json | jq '.[0].ready')" = 2 ] && [ "$("$juice" get groups -o json | jq -r '.[0].status')" = ok ]; }
until ready; do sleep 0.1; done

detect=(); restart=(); healthy=()
for i in $(seq "$kills"); do
  victim=$("$juice" get instances -o json | jq -r '.[0].name')
  pid=$("$juice" get instances -o json | jq -r '.[0].pid')
  t0=$(now_ms)
  kill -9 "$pid"
  until "$juice" get instances -o json | jq -e --arg v "$victim" 'length == 2 and all(.[]; .name != $v and .health == "healthy")' >/dev/null; do sleep 0.01; done
  t3=$(now_ms)
  ended=$("$juice" events -o json | jq -s --arg v "$victim" '[.[] | select(.message | startswith("instance " + $v + " ended"))][0].time_ms')
  started=$("$juice" events -o json | jq -s --arg v "$victim" '[.[] | select(.message | startswith("instance " + $v + " ended"))][0].seq as $s | [.[] | select(.seq > $s and (.message | startswith("started")))][0].time_ms')
  detect+=($((ended - t0))); restart+=($((started - ended))); healthy+=($((t3 - t0)))
  until ready; do sleep 0.05; done
  # Steady state before the next kill: two exits in quick succession are a crash loop, which backs off.
  sleep 1.5
done

# Baseline: the appliance's own start to its first answer, in a sandbox with networking.
base=()
for i in $(seq 10); do
  t0=$(now_ms)
  "$juice" run -q hello-web:0.1.0 --name heal-base -p 127.0.0.1:18999:8080 >/dev/null &
  run=$!
  until curl -sf -m 1 127.0.0.1:18999/healthz >/dev/null; do sleep 0.005; done
  base+=($(( $(now_ms) - t0 )))
  kill -INT $run; wait $run || true
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "kills: $kills (instance init SIGKILLed; the group heals it)"
printf '%-58s %6s ms\n' "kill -> Juice sees the exit (pidfd)" "$(median "${detect[@]}")"
printf '%-58s %6s ms\n' "exit seen -> replacement started (Juice's restart)" "$(median "${restart[@]}")"
printf '%-58s %6s ms\n' "kill -> replacement healthy (health check interval 1s)" "$(median "${healthy[@]}")"
printf '%-58s %6s ms\n' "baseline: juice run of the same image to its first answer" "$(median "${base[@]}")"
echo "Juice's own overhead = detection + restart; goal under 20 ms"
