# Shared by the daemon benchmarks: a private JUICE_HOME and a daemon started and stopped by PID.
# shellcheck shell=bash
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for t in jq hyperfine; do command -v $t >/dev/null || apt-get install -y -qq $t >/dev/null; done
work=$(mktemp -d /tmp/juice-bench.XXXXXX)
export JUICE_HOME=$work/home
mkdir -p "$JUICE_HOME"

now_ms() { date +%s%3N; }

# write_site IMAGE SIZE [UPDATE_LINE...]: $work/site.toml with one group, web, of SIZE
# instances of IMAGE; the further arguments are its [group.web.update] lines.
write_site() {
  local image=$1 size=$2
  shift 2
  {
    printf '[group.web]\nimage = "%s"\nsize = %s\n' "$image" "$size"
    if [ $# -gt 0 ]; then
      echo '[group.web.update]'
      printf '%s\n' "$@"
    fi
  } >"$work/site.toml"
}

# group_ready N: the group web has N ready instances and its status is ok.
group_ready() {
  "$juice" get groups -o json | jq -e --argjson n "$1" '.[0].ready == $n and .[0].status == "ok"' >/dev/null
}

start_daemon() {
  "$juice" daemon >"$work/daemon.log" 2>&1 &
  daemon=$!
  trap stop_daemon EXIT
  until [ -S "$JUICE_HOME/juice.sock" ]; do sleep 0.05; done
}

# Deletes the benchmark's group, waits for its instances to stop, stops the daemon.
stop_daemon() {
  "$juice" delete web >/dev/null 2>&1 || true
  for _ in $(seq 600); do [ "$("$juice" get instances -o json 2>/dev/null | jq length)" = 0 ] && break; sleep 0.2; done
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] && echo "kept $work" || rm -rf "$work"
}
