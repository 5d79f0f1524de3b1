#!/usr/bin/env bash
# MicroVM boot, artefact size and host memory (issue 5).
#
#   bash bench/microvm-boot.sh [RUNS]
#
# - boot: `juice run --isolation microvm hello-web` until the appliance answers
#   HTTP through its published port, against bare QEMU booting the same kernel
#   with the same machine, accelerator and memory and an initramfs whose /init
#   only prints a line (juice-bench-bootline), until that line appears. Both
#   in this run, medians of RUNS (default 10).
# - size: kernel + initramfs + root disk for hello-web.
# - memory: host memory of one idle hello-web microVM (QEMU's PSS), split into
#   the guest RAM it has touched and everything else (QEMU itself).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
rel=$PWD/target/x86_64-unknown-linux-musl/release
juice=$rel/juice
[ -x "$juice" ] && [ -x "$rel/juice-bench-bootline" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d /tmp/juice-bench-vm.XXXXXX)
export JUICE_HOME=$work/home
mkdir -p "$JUICE_HOME"
run_pid=
cleanup() { [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

kernel=${JUICE_KERNEL:-$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)}
accel=tcg; cpu=max; extra="tsc_early_khz=1000000"
if [ "${JUICE_ACCEL:-}" = kvm ]; then accel=kvm; cpu=host; extra=; fi
mem=128   # what juice gives hello-web: its 64 MiB limit + 64 MiB for the guest kernel

# The bare initramfs: just the line printer.
mkdir -p "$work/bare"
cp "$rel/juice-bench-bootline" "$work/bare/init"
(cd "$work/bare" && echo init | cpio -o -H newc --quiet > "$work/bare.cpio")

now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

bare_once() {
  local t0 t1
  t0=$(now_ns)
  qemu-system-x86_64 -M microvm,isa-serial=on,pit=on,pic=on,rtc=on -accel $accel -cpu $cpu \
    -m ${mem}M -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
    -kernel "$kernel" -initrd "$work/bare.cpio" \
    -append "console=ttyS0 quiet panic=-1 reboot=t $extra" | grep -q -m1 juice-boot-line
  t1=$(now_ns)
  echo $(( (t1 - t0) / 1000000 ))
}

"$juice" build examples/hello-web -t hello-web:bench >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
juice_once() {
  local t0 t1
  t0=$(now_ns)
  "$juice" run -q --isolation microvm --grace 5 -p 127.0.0.1:$port:8080 hello-web:bench >/dev/null 2>&1 &
  run_pid=$!
  until curl -sf -m 1 "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.01; done
  t1=$(now_ns)
  last_ms=$(( (t1 - t0) / 1000000 ))
}
stop_run() { kill "$run_pid"; wait "$run_pid" 2>/dev/null || true; run_pid=; }

# Warm-up: artefacts made once (and page caches filled for both).
juice_once; stop_run
bare_once >/dev/null

bare=(); jt=()
for _ in $(seq "$runs"); do
  bare+=("$(bare_once)")
  juice_once; jt+=("$last_ms"); stop_run
done
bare_med=$(printf '%s\n' "${bare[@]}" | median)
juice_med=$(printf '%s\n' "${jt[@]}" | median)
echo "== boot ($accel, ${mem} MiB, $runs runs, medians) =="
echo "bare QEMU, kernel + initramfs printing a line:      ${bare_med} ms"
echo "juice run --isolation microvm to an HTTP answer:    ${juice_med} ms"
awk -v b="$bare_med" -v j="$juice_med" 'BEGIN { printf "juice overhead: %.0f ms = %.1f%% of the bare boot (ratio %.2f)\n", j-b, 100*(j-b)/b, j/b }'

echo "== guest artefacts for hello-web =="
initrd=$(ls "$JUICE_HOME"/vm-artefacts/initramfs-*.cpio)
root=$(ls "$JUICE_HOME"/vm-artefacts/*/root.erofs)
k=$(stat -c %s "$kernel"); i=$(stat -c %s "$initrd"); r=$(stat -c %s "$root")
awk -v k="$k" -v i="$i" -v r="$r" 'BEGIN { m=1048576; printf "kernel %.2f MiB + initramfs %.2f MiB + root %.2f MiB = %.2f MiB\n", k/m, i/m, r/m, (k+i+r)/m }'

echo "== host memory of one idle microVM =="
"$juice" run -q --isolation microvm -p 127.0.0.1:$port:8080 hello-web:bench >/dev/null 2>&1 &
run_pid=$!
until curl -sf -m 1 "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.05; done
sleep 3
qpid=$(jq -r .pid "$JUICE_HOME"/vms/*/state.json)
pss=$(awk '/^Pss:/ {print $2}' /proc/"$qpid"/smaps_rollup)
# The guest's RAM is the one anonymous mapping of exactly its size.
guest=$(awk -v want=$((mem * 1024)) '
  /^[0-9a-f]+-[0-9a-f]+ / { inmap=0 }
  /^Size:/ { inmap = ($2 == want) }
  /^Rss:/ && inmap { print $2; exit }' /proc/"$qpid"/smaps)
echo "QEMU PSS ${pss} KiB, of which guest RAM touched ${guest:-?} KiB (of $((mem * 1024)) KiB)"
echo "beyond the guest's RAM: $(( pss - ${guest:-0} )) KiB"
stop_run
