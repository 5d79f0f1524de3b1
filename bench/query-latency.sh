#!/usr/bin/env bash
# Query latency while the daemon pulls: `GET /v1/instances` (what `juice get
# instances` asks) on the daemon's socket, p50 and p99, at rest and while an
# apply pulls a large image (hello-web plus SIZE_MB of random bytes, so gzip
# cannot shrink it) from a local docker-registry on loopback.
# The baseline is the same query at rest, in the same run; goal: p99 during the
# pull within 2x of p99 at rest.
#
# Usage: bench/query-latency.sh [SIZE_MB] [REST_SAMPLES]   (root; docker-registry, curl, jq)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. bench/appliance.sh
size_mb=${1:-300}
rest_samples=${2:-300}
command -v docker-registry >/dev/null || apt-get install -y -qq docker-registry >/dev/null

# The registry stands in for a remote one: at the lowest priority, so that its
# own CPU (serving 300 MB) competes as little as a remote host would.
. bench/local-registry.sh
REGISTRY_NICE=19 start_registry
stop_all() { stop_daemon; stop_registry; }

# The large image, built and pushed from a home of its own.
big=$work/big
mkdir -p "$big/blob"
cp -r examples/hello-web/static "$big/static"
head -c "${size_mb}M" /dev/urandom >"$big/blob/data"
appliance_toml "$big" big 1 "$PWD/target/x86_64-unknown-linux-musl/release/hello-web" /usr/bin/hello-web <<TOML
files = [{ from = "static/", to = "/srv/www" }, { from = "blob/", to = "/srv/blob" }]
[run]
command = ["/usr/bin/hello-web", "--port", "8080", "--root", "/srv/www"]
ports = [8080]
[health]
http = "/healthz"
port = 8080
interval = "1s"
TOML
JUICE_HOME=$work/builder "$juice" build -q "$big" >/dev/null
JUICE_HOME=$work/builder "$juice" push -q big:1 "$reg/bench/big:1" --insecure "$reg" >/dev/null

export JUICE_INSECURE_REGISTRIES=$reg
start_daemon
trap stop_all EXIT
write_site "$PWD/examples/hello-web" 2
"$juice" apply -f "$work/site.toml" >/dev/null
until [ "$("$juice" get groups -o json | jq '.[0].ready')" = 2 ]; do sleep 0.1; done

# Two clients: the API alone (curl on the socket) and the CLI as a user runs it.
api() { curl -s -o /dev/null -w '%{time_total}\n' --unix-socket "$JUICE_HOME/juice.sock" http://juice/v1/instances; }
cli() { local t; t=$(date +%s%N); "$juice" get instances >/dev/null; echo "$(( $(date +%s%N) - t ))" | awk '{print $1/1e9}'; }
query() { api >>"$1.api"; cli >>"$1.cli"; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100); if (i<1) i=1; if (i>NR) i=NR; printf "%.1f", a[i]*1000}'; }

for _ in $(seq "$rest_samples"); do query "$work/rest"; done

cat >>"$work/site.toml" <<TOML
[group.big]
image = "$reg/bench/big:1"
size = 1
TOML
t0=$(now_ms)
"$juice" apply -f "$work/site.toml" >"$work/apply.log" 2>&1 &
apply=$!
while kill -0 "$apply" 2>/dev/null; do query "$work/pull"; done
wait "$apply" || { cat "$work/apply.log"; exit 1; }
pull_ms=$(( $(now_ms) - t0 ))

echo "image: hello-web + ${size_mb} MiB of random bytes, pulled by the daemon's apply in ${pull_ms} ms"
for client in cli api; do
  what=$([ $client = cli ] && echo "juice get instances" || echo "GET /v1/instances (curl)")
  r=$work/rest.$client; p=$work/pull.$client
  printf '%-34s %-11s %5s samples  p50 %6s ms  p99 %6s ms  max %6s ms\n' \
    "$what" "at rest" "$(wc -l <"$r")" "$(pct 50 <"$r")" "$(pct 99 <"$r")" "$(pct 100 <"$r")" \
    "$what" "during pull" "$(wc -l <"$p")" "$(pct 50 <"$p")" "$(pct 99 <"$p")" "$(pct 100 <"$p")"
  awk -v a="$(pct 99 <"$p")" -v b="$(pct 99 <"$r")" -v w="$what" 'BEGIN { printf "%s: p99 during / p99 at rest = %.2fx (goal <= 2x)\n", w, a/b }'
done
"$juice" delete big >/dev/null 2>&1 || true
