#!/usr/bin/env bash
# Chaos: a group flips between two healthy revisions while the daemon is
# SIGKILLed at random moments and started again at once. A client asks the
# group's published port every 50 ms throughout. Afterwards, left alone, the
# host must hold exactly the declared instances of the last revision: counted
# on the host (processes in the instances' cgroups, cgroup directories,
# addresses, instance directories), not only in the daemon's view.
# Exits non-zero if any of that fails, so the short version is a test
# (crates/cli/tests/chaos.rs runs it in CI).
#
# Usage: bench/chaos.sh [KILLS]   (root; JUICE_CHAOS_SEED=N, or the tests' JUICE_TEST_SEED=N,
# replays a run's kill times)
set -euo pipefail
trap 'echo "chaos.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
cd "$(dirname "$0")/.."
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for t in jq curl; do command -v $t >/dev/null || { echo "chaos.sh needs $t" >&2; exit 1; }; done
kills=${1:-100}
seed=${JUICE_CHAOS_SEED:-${JUICE_TEST_SEED:-$(( $(date +%s%N) % 1000000007 ))}}
RANDOM=$((seed % 32768))
echo "seed: $seed (JUICE_CHAOS_SEED=$seed bash bench/chaos.sh $kills replays the kill times)"
work=$(mktemp -d /tmp/juice-chaos.XXXXXX)
export JUICE_HOME=$work/home
mkdir -p "$JUICE_HOME"
# Unique on the host (cgroups are host-wide), even when a seed is replayed.
group=chaos$(printf %04x $(( ($$ ^ seed) % 65536 )))
# A port nothing listens on (bash's /dev/tcp: no python on a bare machine).
port=$((20000 + seed % 30000))
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
daemon=; client=
start_daemon() {
  "$juice" daemon >>"$work/daemon.log" 2>&1 &
  daemon=$!
  for _ in $(seq 400); do [ -S "$JUICE_HOME/juice.sock" ] && curl -s --unix-socket "$JUICE_HOME/juice.sock" -o /dev/null http://juice/v1/groups && return; sleep 0.025; done
  echo "the daemon did not answer within 10 s" >&2; cat "$work/daemon.log" >&2; exit 1
}
finish() {
  [ -n "$client" ] && kill "$client" 2>/dev/null
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
    "$juice" delete "$group" >/dev/null 2>&1 || true
    for _ in $(seq 300); do [ "$("$juice" get instances -o json 2>/dev/null | jq length)" = 0 ] && break; sleep 0.1; done
    kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null
  fi
  wait 2>/dev/null
  rm -rf "$work"
}
trap finish EXIT

# Two revisions that differ by one file, built from hello-web.
for rev in a b; do
  mkdir -p "$work/$rev"
  cp -r examples/hello-web/static "$work/$rev/static"
  echo "$rev" >"$work/$rev/static/revision.txt"
  sed -e "s|\.\./\.\./target|$PWD/target|" -e '/^\[\[volumes\]\]/,$d' \
    -e 's|, "--data", "/var/lib/hello"||' examples/hello-web/juice.toml >"$work/$rev/juice.toml"
  "$juice" build -q -t "flip:$rev" "$work/$rev" >/dev/null
  cat >"$work/$rev.toml" <<TOML
[group.$group]
image = "flip:$rev"
size = 2
publish = ["127.0.0.1:$port:8080"]
[group.$group.update]
max_unavailable = 1
health_gate = "1s"
on_failure = "rollback"
TOML
done

start_daemon
"$juice" apply -f "$work/a.toml" >/dev/null
ready() { "$juice" get groups -o json 2>/dev/null | jq -e --arg g "$group" '.[] | select(.name == $g) | .ready == 2 and .status == "ok"' >/dev/null; }
until ready; do sleep 0.1; done

# The client: one request every 50 ms; a line per request.
( while :; do
    if curl -sf -m 2 "http://127.0.0.1:$port/healthz" >/dev/null; then echo ok; else echo "fail $(date +%T.%3N)"; fi
    sleep 0.05
  done ) >"$work/client.log" 2>/dev/null &
client=$!

mid=0; applied=a
t0=$(date +%s%3N)
for i in $(seq "$kills"); do
  applied=$([ $((i % 2)) = 1 ] && echo b || echo a)
  "$juice" apply -f "$work/$applied.toml" >/dev/null 2>&1 || true
  sleep "$(printf '0.%03d' $((RANDOM % 1000)))"
  "$juice" get groups -o json 2>/dev/null | grep -q rolling-out && mid=$((mid + 1))
  kill -9 "$daemon"; wait "$daemon" 2>/dev/null || true
  start_daemon
done
chaos_ms=$(( $(date +%s%3N) - t0 ))

# Left alone, it converges: the last applied revision, two healthy instances.
want=$("$juice" inspect "flip:$applied" -o json | jq -r .digest)
converged=
for _ in $(seq 1200); do
  if "$juice" get groups -o json | jq -e --arg g "$group" '.[] | select(.name == $g) | .ready == 2 and .running == 2 and .status == "ok"' >/dev/null \
     && [ "$("$juice" describe group "$group" -o json | jq -r '.group.revisions[] | select(.number == $rev) | .template.digest' --argjson rev "$("$juice" get groups -o json | jq --arg g "$group" '.[] | select(.name == $g) | .revision')")" = "$want" ]; then
    converged=1; break
  fi
  sleep 0.1
done
sleep 1  # one more request round after convergence
kill "$client" 2>/dev/null; wait "$client" 2>/dev/null || true; client=

requests=$(wc -l <"$work/client.log")
failures=$(grep -c '^fail' "$work/client.log" || true)
view=$("$juice" get instances -o json | jq -r --arg g "$group" '[.[] | select(.group == $g) | .name] | sort | join(" ")')
# On the host: instances with a process in their cgroup, cgroup directories, addresses, instance directories.
host=$(grep -ho "/juice/$group-r[0-9]*-[0-9a-f]*" /proc/[0-9]*/cgroup 2>/dev/null | sed 's|.*/||' | sort -u | tr '\n' ' ' | sed 's/ $//')
cgroup_dirs=$(find /sys/fs/cgroup -maxdepth 6 -type d -path "*/juice/$group-*" 2>/dev/null | sed 's|.*/||' | sort -u | wc -l)
addresses=$(jq --arg g "$group" '[.[] | select(.group == $g)] | length' "$JUICE_HOME/network/allocations.json" 2>/dev/null || echo "?")
dirs=$(find "$JUICE_HOME/instances" -mindepth 2 -maxdepth 2 -name state.json 2>/dev/null | wc -l)

echo "kills: $kills in $((chaos_ms / 1000)) s ($mid landed mid-rollout); last revision applied: flip:$applied"
echo "converged afterwards: ${converged:-no}"
echo "daemon's view:  $view"
echo "on the host:    $host (instances with processes), $cgroup_dirs cgroup directories, $addresses addresses, $dirs instance directories"
echo "published port: $requests requests, $failures failed"
ok=1
[ -n "$converged" ] || { echo "FAIL: did not converge within 120 s" >&2; "$juice" get groups >&2; ok=; }
[ "$view" = "$host" ] || { echo "FAIL: the host runs other instances than the daemon shows" >&2; ok=; }
[ "$(echo "$host" | wc -w)" = 2 ] || { echo "FAIL: not exactly 2 instances on the host" >&2; ok=; }
[ "$cgroup_dirs" = 2 ] && [ "$addresses" = 2 ] && [ "$dirs" = 2 ] || { echo "FAIL: leftovers (cgroups, addresses or instance directories)" >&2; ok=; }
[ "$failures" = 0 ] || { echo "FAIL: the published port failed $failures times:" >&2; grep '^fail' "$work/client.log" | head >&2; ok=; }
[ -n "$ok" ] || { tail -40 "$work/daemon.log" >&2; exit 1; }
echo "ok"
