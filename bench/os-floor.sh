#!/usr/bin/env bash
# The floor of a Juice OS boot: QEMU start to the first line of a one-line busybox init,
# booted from a real Juice OS disk (SeaBIOS, GRUB from the MBR, kernel and initrd read
# from the FAT boot partition), next to a direct `-kernel` boot of the same kernel and
# initrd measured in the same run. The real host OS adds its own side later.
#
# usage: bench/os-floor.sh [RUNS]   (default 5; JUICE_ACCEL=kvm|tcg overrides detection)
set -euo pipefail
runs=${1:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mark="JUICE-TEST booted"

# KVM only where the CPU shows vmx/svm: a nested software KVM opens /dev/kvm but hangs a
# stock kernel (the rule of juice-microvm's Accel::detect and of the boot tests).
case "${JUICE_ACCEL:-}" in
  tcg) accel=(-accel tcg) ;;
  kvm) accel=(-accel kvm) ;;
  *) if grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=(-accel kvm -accel tcg); else accel=(-accel tcg); fi ;;
esac

kernel=$(cd "$root" && nice -n 19 cargo run --release -q -p juice-os --example os-floor-disk -- "$work")

# One boot: prints the seconds from QEMU start to the init's first line.
boot() {
  local log=$1; shift
  : >"$log"
  local start end pid
  start=$(date +%s.%N)
  nice -n 19 qemu-system-x86_64 "${accel[@]}" -m 512 -nographic -monitor none \
    -serial "file:$log" "$@" </dev/null >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 12000); do            # 120 s at 10 ms
    if grep -qF "$mark" "$log"; then end=$(date +%s.%N); break; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.01
  done
  # The init powers off at once; stop QEMU by its PID if it lingers.
  for _ in $(seq 1 500); do kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -z "${end:-}" ]; then echo "no '$mark' on the console; tail:" >&2; tail -c 2000 "$log" >&2; exit 1; fi
  awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f\n", b - a}'
}

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", m}'; }
minmax() { sort -n | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.2f..%.2f", lo, hi}'; }

grub=() direct=()
for i in $(seq 1 "$runs"); do
  grub+=("$(boot "$work/grub.log" -drive "file=$work/disk.img,format=raw,if=virtio")")
  direct+=("$(boot "$work/direct.log" -kernel "$kernel" -initrd "$work/initrd.cpio" \
    -append "console=ttyS0 quiet panic=1 juice.os.slot=s1 juice.os.trial=0")")
done

echo "os-floor: QEMU start to the init's first line, $runs runs, ${accel[*]}, kernel $kernel"
printf '  %-34s median %s s  (range %s s)\n' "SeaBIOS + GRUB + Juice OS disk" \
  "$(printf '%s\n' "${grub[@]}" | median)" "$(printf '%s\n' "${grub[@]}" | minmax)"
printf '  %-34s median %s s  (range %s s)\n' "direct -kernel (baseline)" \
  "$(printf '%s\n' "${direct[@]}" | median)" "$(printf '%s\n' "${direct[@]}" | minmax)"
