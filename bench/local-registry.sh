# A docker-registry on loopback for the registry benchmarks, with fresh storage
# and a fresh port each time (skopeo remembers where it has seen a blob and would
# mount it across repositories instead of uploading it). Needs $work.
# REGISTRY_NICE lowers its priority (standing in for a remote registry's CPU).
# shellcheck shell=bash
reg_pid=
start_registry() {
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry-$port
http:
  addr: 127.0.0.1:$port
YAML
  nice -n "${REGISTRY_NICE:-0}" docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
  reg_pid=$!
  reg=127.0.0.1:$port
  until curl -sf "http://$reg/v2/" >/dev/null; do sleep 0.05; done
}
stop_registry() {
  [ -n "$reg_pid" ] || return 0
  kill "$reg_pid" 2>/dev/null || true
  wait "$reg_pid" 2>/dev/null || true
  reg_pid=
  rm -rf "$work/registry-$port"
}
