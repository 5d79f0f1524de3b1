#!/usr/bin/env bash
# Juice OS: the size of a version against Talos and LinuxKit, the time from QEMU start
# to the daemon's API answering and to the first appliance serving (SeaBIOS + GRUB, TCG),
# and the time from a failed trial's first boot to the old version serving again. The
# floor (the same kernel booting a one-line init from a Juice OS disk, and directly) is
# measured in the same run by bench/os-floor.sh.
#
#   bash bench/os.sh [RUNS]     (default 3; needs a release build, docker-registry, jq, curl)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
juice=$PWD/target/x86_64-unknown-linux-musl/release/juice
[ -x "$juice" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d /tmp/juice-bench-os.XXXXXX)
. bench/local-registry.sh
qemu_pid=
stop_qemu() {
  [ -n "$qemu_pid" ] || return 0
  kill "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
}
cleanup() { stop_qemu; stop_registry; rm -rf "$work"; }
trap cleanup EXIT
export JUICE_HOME=$work/home
now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_registry
guest_reg=10.0.2.2:${reg#127.0.0.1:}
base="console=tty0 console=ttyS0,115200 panic=10"
"$juice" -o json os build --version 1 >"$work/v1.json"
"$juice" -o json os build --version 3 --cmdline "$base rdinit=/no-such-init panic=1" >/dev/null
"$juice" -o json os build --version 4 --cmdline "$base module_blacklist=veth" >/dev/null
"$juice" keygen "$work/os" >/dev/null
for v in 3 4; do
  "$juice" sign "juice-os:$v" --key "$work/os.key" --identity "$guest_reg/juice-os" >/dev/null
  JUICE_INSECURE_REGISTRIES=$reg "$juice" push -q "juice-os:$v" "$reg/juice-os:$v" >/dev/null
done

# The data partition: hello-web as a critical group, the API's certificates, the policy.
data=$work/data
mkdir -p "$data"
JUICE_HOME=$data "$juice" build examples/hello-web -t hello-web:os -q >/dev/null
JUICE_HOME=$data "$juice" certs "$data/tls" --host 127.0.0.1 >/dev/null
cp "$work/os.pub" "$data/os.pub"
printf 'unsigned = "allow"\n\n[keys]\nos = "os.pub"\n\n[[trust]]\nimages = "%s/juice-os"\nkeys = ["os"]\n' "$guest_reg" >"$data/policy.toml"
printf '[group.web]\nimage = "hello-web:os"\ncritical = true\npublish = ["8080:8080"]\n' >"$data/site.toml"
cat >"$data/host.toml" <<EOF
version = 2
hostname = "bench"

[network]
addresses = ["10.0.2.15/24"]
gateway = "10.0.2.2"

[daemon]
listen = "0.0.0.0:7443"
tls = "tls"

[registries]
insecure = ["$guest_reg"]

[site]
file = "site.toml"

[os]
stability = "5s"
trial_deadline = "60s"
EOF
"$juice" os disk juice-os:1 "$work/disk.img" --data "$data" >/dev/null

boot() {
  web=$(free_port); api=$(free_port)
  : >"$work/serial.log"
  qemu-system-x86_64 -accel tcg -m 1024 -smp 1 -nographic -monitor none \
    -serial "file:$work/serial.log" -drive "file=$1,format=raw,if=virtio" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$web-10.0.2.15:8080,hostfwd=tcp:127.0.0.1:$api-10.0.2.15:7443" \
    -device virtio-net-pci,netdev=n0 </dev/null >/dev/null 2>&1 &
  qemu_pid=$!
}
remote() { JUICE_REMOTE=127.0.0.1:$api JUICE_TLS=$data/tls "$juice" "$@"; }
serving() { curl -sf -m 2 "http://127.0.0.1:$web/" | grep -q hello; }
# until_ms CMD...: waits up to 300 s for CMD to succeed.
until_ok() { for _ in $(seq 1500); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "timed out: $*" >&2; tail -c 3000 "$work/serial.log" >&2; exit 1; }
booted_is() { remote -o json os status | jq -e --arg v "$1" '[.versions[] | select(.booted)][0].version == $v' >/dev/null; }
bad() { remote -o json os status | jq -e --arg v "$1" '[.versions[] | select(.version == $v)][0].ok == false' >/dev/null; }

api_ms=(); web_ms=()
for i in $(seq "$runs"); do
  cp --sparse=always "$work/disk.img" "$work/run.img"
  t=$(now_ms); boot "$work/run.img"
  until_ok remote os status; api_ms+=($(( $(now_ms) - t )))
  until_ok serving; web_ms+=($(( $(now_ms) - t )))
  stop_qemu
done

# Failed trials, from the reboot into the trial to version 1 serving again.
cp --sparse=always "$work/disk.img" "$work/run.img"
boot "$work/run.img"
until_ok serving
remote os update "$guest_reg/juice-os:3" >/dev/null
t=$(now_ms); remote os reboot >/dev/null
sleep 2; until_ok serving; until_ok booted_is 1; until_ok bad 3
panic_ms=$(( $(now_ms) - t ))
remote os update "$guest_reg/juice-os:4" >/dev/null
t=$(now_ms); remote os reboot >/dev/null
sleep 2; until_ok bad 4; until_ok booted_is 1; until_ok serving
unhealthy_ms=$(( $(now_ms) - t ))
stop_qemu

kernel=$(jq .kernel_bytes "$work/v1.json"); initrd=$(jq .initrd_bytes "$work/v1.json")
echo "Juice OS version: kernel $(awk -v b="$kernel" 'BEGIN{printf "%.1f", b/1048576}') MiB + initramfs $(awk -v b="$initrd" 'BEGIN{printf "%.1f", b/1048576}') MiB = $(awk -v b="$((kernel + initrd))" 'BEGIN{printf "%.1f", b/1048576}') MiB (goal < 30 MB; Talos < 100 MB, LinuxKit 35-50 MB, Flatcar ~59 MB per slot)"
echo "boot, SeaBIOS + GRUB, TCG, $runs runs, median: API answering $(printf '%s\n' "${api_ms[@]}" | median) ms, hello-web serving $(printf '%s\n' "${web_ms[@]}" | median) ms"
echo "failed trial to version 1 serving again: panicking kernel $panic_ms ms (panic=1); unhealthy userspace $unhealthy_ms ms (trial_deadline 60 s, the daemon decides 15 s before it)"
echo "the floor, same run:"
bash bench/os-floor.sh "$runs" | sed 's/^/  /'
