#!/usr/bin/env bash
# The fleet at scale with hollow hosts (bench/fleet-hollow: the real host-side fleet code,
# registration, assignment watch and reports, over an in-memory backend, as kubemark and
# nomad-nodesim do), against a real etcd and a real controller (`juice daemon --fleet ...
# --fleet-controller`, in a network namespace of its own, reaching etcd through a veth).
# Each figure beside a baseline measured in the same run, and the anchors' published ones:
#   1. HOSTS hosts x 10 groups: etcd's database size, its steady writes/s, the controller's
#      CPU and memory, `juice fleet get hosts` p50/p99 (baseline: etcdctl get of hosts/);
#   2. 100 hosts killed at once (no revoke): kill to record deleted, per host (baseline:
#      bare etcd leases with the same TTL and renewal, no Juice code, stopped at once);
#   3. a new revision across 100 hosts until all report it ready, in waves 1, 5%, 25%, 100%
#      with a 10 s gate (baseline: the same change in one wave, all at once), and a bad
#      revision that fails from the second wave on: its first failure report to every
#      touched host back on the old revision.
#
# Usage: bench/fleet.sh [HOSTS]   (root; default 10000, 200 for a quick check;
#        needs cargo build --release -p juice -p juice-bench-fleet-hollow, etcd, etcdctl,
#        jq, ip, nsenter. READY_AFTER_MS: hollow groups' time to ready, default 0;
#        RATE: hosts started per second, default 100: each costs etcd two Raft writes, and
#        at 500/s this 2-core machine's etcd fell behind and the hosts' retries stormed;
#        NO_SPEC=1: no fleet file is applied (hosts only: steady state, get hosts, dead hosts).)
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=${1:-10000}
ttl=10
kill_n=$(( hosts / 10 < 100 ? hosts / 10 : 100 ))
roll_n=$(( hosts / 2 < 100 ? hosts / 2 : 100 ))
bin=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-musl/release
juice=$bin/juice
hollow=$bin/fleet-hollow
for b in "$juice" "$hollow"; do
  [ -x "$b" ] || { echo "build first: cargo build --release -p juice -p juice-bench-fleet-hollow ($b is missing)" >&2; exit 1; }
done
for t in etcd etcdctl jq ip nsenter curl; do
  command -v $t >/dev/null || { echo "$t is needed (etcd-server, etcd-client, jq, iproute2, util-linux, curl)" >&2; exit 1; }
done
work=$(mktemp -d /tmp/juice-bench-fleet.XXXXXX)
ns=juice-bench-$$
n=$(( $$ % 250 + 1 ))
outside=10.202.$n.1 inside=10.202.$n.2
etcd_pid='' daemon_pid='' hollow_pid=''
cleanup() {
  for p in $hollow_pid $daemon_pid $etcd_pid; do kill "$p" 2>/dev/null || true; done
  for p in $hollow_pid $daemon_pid $etcd_pid; do wait "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT
now_ms() { date +%s%3N; }

# The controller's namespace and the veth etcd is reached through.
ip netns add "$ns"
ip link add "jbh$n" type veth peer name "jbn$n" netns "$ns"
ip addr add "$outside/30" dev "jbh$n"
ip link set "jbh$n" up
ip -n "$ns" addr add "$inside/30" dev "jbn$n"
ip -n "$ns" link set "jbn$n" up
ip -n "$ns" link set lo up

# etcd on loopback (and the veth's outside end), free ports, a temp data dir.
free_port() { local p; while :; do p=$(( 20000 + RANDOM % 20000 )); ss -Htln "sport = :$p" | grep -q . || { echo $p; return; }; done; }
cport=$(free_port) pport=$(free_port)
ep=http://127.0.0.1:$cport
etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls "$ep,http://$outside:$cport" --advertise-client-urls "$ep" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "bench=http://127.0.0.1:$pport" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
export ETCDCTL_API=3
ctl() { etcdctl --endpoints "$ep" "$@"; }
for _ in $(seq 100); do ctl endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
ctl endpoint health >/dev/null

# The controller: a real daemon, in its namespace, with a home of its own.
mkdir -p "$work/controller"
JUICE_HOME=$work/controller nsenter --net="/run/netns/$ns" "$juice" daemon \
  --fleet "http://$outside:$cport" --fleet-controller --label role=controller >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do "$juice" fleet get controller --endpoints "$ep" -o json 2>/dev/null | jq -e .host >/dev/null && break; sleep 0.1; done
"$juice" fleet get controller --endpoints "$ep" -o json | jq -e .host >/dev/null

# The fleet: 9 groups on every hollow host (8 per host, 1 counted and spread over the
# zones) and one group on the 100 rollout hosts; the controller's own host has none.
waved='"1", "5%", "25%", "100%"'
fleet() { # fleet FILE ROLL_IMAGE [WAVES]
  {
    for g in 0 1 2 3 4 5 6 7; do
      printf '[group.g%s]\nimage = "hollow/g%s:1"\nper_host = true\nconstraints = { hollow = "yes" }\nresources = { cpus = 0.1, memory = "64MiB" }\n\n' $g $g
    done
    printf '[group.spread]\nimage = "hollow/spread:1"\ncount = %s\nspread = "zone"\nconstraints = { hollow = "yes" }\nresources = { cpus = 0.1, memory = "64MiB" }\n\n' "$hosts"
    printf '[group.roll]\nimage = "%s"\nper_host = true\nconstraints = { rollout = "yes" }\nrollout = { waves = [%s], health_gate = "10s" }\n' "$2" "${3:-$waved}"
  } >"$1"
}
fleet "$work/v1.toml" hollow/roll:1
fleet "$work/once.toml" hollow/roll:2 '"100%"'
fleet "$work/v3.toml" hollow/roll:3
fleet "$work/bad.toml" hollow/roll:bad

declare -A fig
# ask COMMAND...: sends a command to fleet-hollow and keeps its NAME VALUE answers in fig.
ask() {
  local verb=$1 k v
  [ "$verb" = start ] || echo "$*" >&"${HOLLOW[1]}"
  while read -r -u "${HOLLOW[0]}" k v; do
    case $k in
      done) [ "$v" = "$verb" ] && return 0 ;;
      error) echo "fleet-hollow: $v" >&2; exit 1 ;;
      *) fig[$k]=$v; echo "$k $v" >>"$work/figures" ;;
    esac
  done
  echo "fleet-hollow stopped; its log:" >&2; tail -20 "$work/hollow.log" >&2; exit 1
}
coproc HOLLOW { exec "$hollow" --endpoints "$ep" --hosts "$hosts" --ttl "$ttl" \
  --rollout-hosts "$roll_n" --rate "${RATE:-100}" --ready-after-ms "${READY_AFTER_MS:-0}" ${SEED:+--seed "$SEED"} 2>"$work/hollow.log"; }
hollow_pid=$HOLLOW_PID
ask start

placed_ms=skipped
if [ -z "${NO_SPEC:-}" ]; then
  t0=$(now_ms)
  ask apply "$work/v1.toml"
  ask settle 900
  placed_ms=$(( $(now_ms) - t0 ))
fi

# Steady state: 20 s to calm down, then 30 s sampled.
sleep 20
# A counter's value from etcd's /metrics (summed over its labels); a missing one stops the run.
metric() {
  curl -s "$ep/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $2; n++} END {if (!n) exit 1; printf "%.0f\n", s}' ||
    { echo "etcd's /metrics has no $1" >&2; exit 1; }
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
names=(etcd_server_proposals_committed_total etcd_mvcc_put_total etcd_mvcc_txn_total etcd_mvcc_delete_total etcd_debugging_lease_renewed_total etcd_mvcc_range_total)
declare -A m0 m1
for m in "${names[@]}"; do m0[$m]=$(metric "$m"); done
c0=$(cpu_ticks "$daemon_pid") e0=$(cpu_ticks "$etcd_pid") h0=$(cpu_ticks "$hollow_pid")
s0=$(now_ms)
sleep 30
for m in "${names[@]}"; do m1[$m]=$(metric "$m"); done
c1=$(cpu_ticks "$daemon_pid") e1=$(cpu_ticks "$etcd_pid") h1=$(cpu_ticks "$hollow_pid")
span=$(( $(now_ms) - s0 ))
hz=$(getconf CLK_TCK)
rate() { awk -v a="${m0[$1]}" -v b="${m1[$1]}" -v t="$span" 'BEGIN{printf "%.1f", (b - a) * 1000 / t}'; }
cpu() { awk -v a="$1" -v b="$2" -v hz="$hz" -v t="$span" 'BEGIN{printf "%.1f", (b - a) / hz * 100000 / t}'; }
load=$(cut -d' ' -f1-3 /proc/loadavg)
db_bytes=$(ctl endpoint status -w json | jq '.[0].Status.dbSize')
keys=$(ctl get / --prefix --keys-only | grep -c . || true)

# juice fleet get hosts, 20 runs, against etcdctl's get of the same prefix.
timed() { local t; t=$(date +%s%N); "$@" >/dev/null; echo $(( ($(date +%s%N) - t) / 1000000 )); }
for i in $(seq 20); do timed "$juice" fleet get hosts --endpoints "$ep"; done | sort -n >"$work/get.ms"
for i in $(seq 20); do timed etcdctl --endpoints "$ep" get --prefix /juice/v1/hosts/; done | sort -n >"$work/etcdctl.ms"
pct() { awk -v p="$2" '{a[NR] = $1} END {i = int((p / 100) * NR + 0.999999); if (i < 1) i = 1; print a[i]}' "$1"; }

# Dead hosts, then the bare-lease baseline.
ask kill "$kill_n" 60
ask bare "$kill_n" 60

# A new revision across the rollout hosts, then a bad one.
if [ -z "${NO_SPEC:-}" ]; then
  # Baseline: the new revision written to every rollout host at once (one wave).
  ask rollout "$work/once.toml" roll 300
  # A rollout is done only after its last wave's gate (10 s); a revision applied before
  # that starts from (and a rollback returns to) the revision before it.
  sleep 12
  for k in end_to_end_ms host.p50_ms host.max_ms; do fig[once.$k]=${fig[rollout.$k]:-none}; done
  # The same size of change in waves 1, 5%, 25%, 100% with a 10 s gate.
  ask rollout "$work/v3.toml" roll 300
  sleep 12
  # A bad revision that the first wave's host runs well and every later host fails.
  ask fail "$work/bad.toml" roll "$work/v3.toml" 120 later
fi
ask status
echo quit >&"${HOLLOW[1]}"

# The database as the records alone take it: history compacted and defragmented.
rev=$(ctl endpoint status -w json | jq '.[0].Status.header.revision')
ctl compact "$rev" >/dev/null
ctl defrag --command-timeout=60s >/dev/null
db_live=$(ctl endpoint status -w json | jq '.[0].Status.dbSize')
ctl_rss=$(rss_kib "$daemon_pid") ctl_hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$daemon_pid/status")

r() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0 || a == "none") print "-"; else printf "%.2f", a / b}'; }
f="%-62s %10s %s\n"
echo "hollow hosts: $hosts (lease ${ttl} s)${NO_SPEC:+, no fleet file applied}, 10 groups: 8 per host, 1 of $hosts spread over 3 zones, 1 on $roll_n hosts; seed ${fig[seed]:-?}"
echo "machine: $(nproc) cores, load average $load (during the steady state)"
printf "$f" "hosts registered (from the first start)" "${fig[start.registered_ms]:-skipped}" ms
printf "$f" "spec applied -> every assignment reported ready" "$placed_ms" "ms (${fig[settle.assignments]:-skipped} assignments)"
printf "$f" "etcd keys" "$keys" ""
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b / 1048576}'; }
printf "$f" "etcd database size (as it stood)" "$(mib "$db_bytes")" MiB
printf "$f" "etcd database size (compacted, defragmented)" "$(mib "$db_live")" "MiB   design note's estimate (90 MiB per 10,000 hosts x 10 groups): ratio $(r "$db_live" $((90 * 1048576 * hosts / 10000)))"
printf "$f" "steady: Raft entries committed/s (etcd writes)" "$(rate etcd_server_proposals_committed_total)" "/s   ratio to etcd's measured 995 writes/s: $(r "$(rate etcd_server_proposals_committed_total)" 995)"
printf "$f" "steady: puts/s, txns/s, deletes/s" "$(rate etcd_mvcc_put_total)" "/s, $(rate etcd_mvcc_txn_total)/s, $(rate etcd_mvcc_delete_total)/s"
printf "$f" "steady: lease renewals/s (not Raft writes)" "$(rate etcd_debugging_lease_renewed_total)" "/s   (hosts / (ttl/3) = $(awk -v n="$hosts" -v t="$ttl" 'BEGIN{printf "%.0f", n * 3 / t}')/s expected)"
printf "$f" "steady: ranges/s" "$(rate etcd_mvcc_range_total)" /s
printf "$f" "controller CPU (steady, % of one core)" "$(cpu "$c0" "$c1")" "%"
printf "$f" "controller RSS now / peak" "$(( ctl_rss / 1024 ))" "MiB / $(( ctl_hwm / 1024 )) MiB"
printf "$f" "etcd CPU (steady, % of one core) / RSS" "$(cpu "$e0" "$e1")" "% / $(( $(rss_kib "$etcd_pid") / 1024 )) MiB"
printf "$f" "fleet-hollow CPU ($hosts hosts, % of one core)" "$(cpu "$h0" "$h1")" "%"
printf "$f" "juice fleet get hosts: p50 / p99 (20 runs)" "$(pct "$work/get.ms" 50)" "ms / $(pct "$work/get.ms" 99) ms"
printf "$f" "baseline etcdctl get --prefix hosts/: p50 / p99" "$(pct "$work/etcdctl.ms" 50)" "ms / $(pct "$work/etcdctl.ms" 99) ms"
printf "$f" "ratio get hosts p99 / baseline p99" "$(r "$(pct "$work/get.ms" 99)" "$(pct "$work/etcdctl.ms" 99)")" "  to the 1 s goal: $(r "$(pct "$work/get.ms" 99)" 1000); to Kubernetes' 30 s list SLO: $(r "$(pct "$work/get.ms" 99)" 30000)"
printf "$f" "$kill_n hosts killed: kill -> record gone, p50 / p99 / max" "${fig[kill.p50_ms]:-skipped}" "ms / ${fig[kill.p99_ms]:-skipped} ms / ${fig[kill.max_ms]:-skipped} ms (${fig[kill.missing]:-skipped} never gone)"
printf "$f" "baseline: $kill_n bare ${ttl} s leases stopped, p50 / p99 / max" "${fig[bare.p50_ms]:-skipped}" "ms / ${fig[bare.p99_ms]:-skipped} ms / ${fig[bare.max_ms]:-skipped} ms (${fig[bare.missing]:-skipped} never gone)"
printf "$f" "ratio dead p99 / baseline p99" "$(r "${fig[kill.p99_ms]:-skipped}" "${fig[bare.p99_ms]:-skipped}")" "  to the 12 s goal: $(r "${fig[kill.p99_ms]:-skipped}" 12000); to Kubernetes 40 s: $(r "${fig[kill.p99_ms]:-skipped}" 40000); to Nomad 200 s: $(r "${fig[kill.p99_ms]:-skipped}" 200000)"
printf "$f" "baseline: new revision on $roll_n hosts at once: apply -> all ready" "${fig[once.end_to_end_ms]:-skipped}" "ms   per host p50 ${fig[once.host.p50_ms]:-skipped} ms, max ${fig[once.host.max_ms]:-skipped} ms"
printf "$f" "new revision in waves 1, 5%, 25%, 100%, 10 s gate: apply -> all ready" "${fig[rollout.end_to_end_ms]:-skipped}" "ms   per host p50 ${fig[rollout.host.p50_ms]:-skipped} ms; goal 90 s: ratio $(r "${fig[rollout.end_to_end_ms]:-none}" 90000); floor 3 gates + baseline: $(awk -v b="${fig[once.end_to_end_ms]:-0}" 'BEGIN{print 30000 + b}') ms"
printf "$f" "bad revision failing in wave 2: apply -> first failure report" "${fig[fail.first_failure_ms]:-skipped}" "ms (${fig[fail.touched]:-skipped} hosts touched)"
printf "$f" "bad revision: first failure -> every touched host on the old one" "${fig[fail.back_ms]:-skipped}" "ms   goal gate + 15 s = 25000 ms: ratio $(r "${fig[fail.back_ms]:-none}" 25000)"
echo "hollow hosts' events: registered ${fig[events.registered]:-skipped}, lost registrations ${fig[events.registration_lost]:-skipped}, lost watches ${fig[events.watch_lost]:-skipped}"
