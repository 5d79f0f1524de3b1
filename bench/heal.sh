#!/usr/bin/env bash
# Self-heal latency: an instance of a running group is killed with SIGKILL; how long
# until Juice has noticed (the "ended" event), until the replacement's start begins
# (the "started" event, less the start's own time, which it records), and until the
# replacement answers its health check. The baseline
# measured in the same run is the appliance's own start: `juice run` of the same image
# to its first answer, with the same sandbox and network.
#
# Usage: bench/heal.sh [KILLS]   (root; needs cargo build --release, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
kills=${1:-20}
write_site "$PWD/examples/hello-web" 2 'health_gate = "1s"'
start_daemon
"$juice" apply -f "$work/site.toml" >/dev/null
ready() { group_ready 2; }
until ready; do sleep 0.1; done

detect=(); decide=(); spawned=(); healthy=()
for i in $(seq "$kills"); do
  victim=$("$juice" get instances -o json | jq -r '.[0].name')
  pid=$("$juice" get instances -o json | jq -r '.[0].pid')
  t0=$(now_ms)
  kill -9 "$pid"
  until "$juice" get instances -o json | jq -e --arg v "$victim" 'length == 2 and all(.[]; .name != $v and .health == "healthy")' >/dev/null; do sleep 0.01; done
  t3=$(now_ms)
  events=$("$juice" events -o json | jq -s --arg v "$victim" '
    ([.[] | select(.message | startswith("instance " + $v + " ended"))][0]) as $e
    | ([.[] | select(.seq > $e.seq and (.message | startswith("started")))][0]) as $s
    | "\($e.time_ms) \($s.time_ms) \($s.message | capture("in (?<ms>[0-9]+) ms$").ms)"' -r)
  read -r ended started spawn <<<"$events"
  detect+=($((ended - t0))); decide+=($((started - spawn - ended))); spawned+=($spawn); healthy+=($((t3 - t0)))
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
printf '%-58s %6s ms\n' "kill -> Juice has seen and recorded the exit" "$(median "${detect[@]}")"
printf '%-58s %6s ms\n' "exit recorded -> replacement's start begins" "$(median "${decide[@]}")"
printf '%-58s %6s ms\n' "the replacement's start (sandbox, bridge networking)" "$(median "${spawned[@]}")"
printf '%-58s %6s ms\n' "kill -> replacement healthy (health check interval 1s)" "$(median "${healthy[@]}")"
printf '%-58s %6s ms\n' "baseline: juice run of the same image to its first answer" "$(median "${base[@]}")"
overhead=()
for i in "${!detect[@]}"; do overhead+=($((detect[i] + decide[i]))); done
printf '%-58s %6s ms (max %s)\n' "Juice's heal overhead: kill -> replacement's start begins" "$(median "${overhead[@]}")" "$(printf '%s\n' "${overhead[@]}" | sort -n | tail -1)"
echo "goal: overhead under 20 ms; the start itself is the sandbox's (bench/sandbox-start.sh)"
