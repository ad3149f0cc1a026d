#!/usr/bin/env bash
# Boot benchmarks for vmshift-kvm, side by side with QEMU.
#
# 1. On this host's /dev/kvm (any kind, kvm_pvm too): `vm boot --probe` on a
#    small partitioned raw disk, N runs: launcher start -> first guest exit
#    (vm boot's first-exit-ms), start -> the probe's "done" line, and the
#    process's peak RSS from /usr/bin/time (guest RAM is mapped lazily;
#    what the probe touches is counted too: an upper bound on the VMM's own).
# 2. In nested KVM (scripts/nested-kvm.sh), on the same kernel, initramfs
#    and converted disk (the bootvm fixture, converted by vm convert):
#    `vmshift vm boot` vs `qemu-system-x86_64 -accel kvm` on q35
#    (virtio-scsi, as the converted VM) and microvm (virtio-blk), time from
#    process start to "login:" on the console, measured the same way for
#    all three (the console polled every 0.1 s). QEMU runs with
#    snapshot=on, vmshift with its overlay: neither writes the image.
# 3. On this host, the QEMU engine (software emulation here): `vm boot
#    --engine qemu` (each disk served by vmshift over NBD, the guest's
#    writes in vmshift's overlay) vs `qemu-system-x86_64` reading the same
#    converted qcow2 itself (snapshot=on), same machine (q35, TCG, -cpu
#    max), kernel, initramfs and command line (tsc_early_khz/lpj included),
#    time from process start to "login:", measured the same way for both.
#    What it shows is the cost of vmshift's NBD path.
#
# Usage: scripts/bench-boot.sh [RUNS]     (default 20 probe runs; needs root)
#        SECTIONS="probe nested qemu" (default all three) picks sections.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-20}
bin=$repo/target/release/vmshift
(cd "$repo" && cargo build --release --locked -p vmshift >/dev/null)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sections=${SECTIONS:-probe nested qemu}
on() { [[ " $sections " == *" $1 "* ]]; }

if on probe; then
echo "== probe guest on this host's /dev/kvm ($(test -d /sys/module/kvm_pvm && echo kvm_pvm || echo hardware KVM)), $runs runs"
truncate -s 64M "$work/d.raw"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$work/d.raw"
mkdir -p "$work/tree" && echo hi >"$work/tree/hello"
mke2fs -q -F -t ext4 -d "$work/tree" -E offset=1048576 "$work/d.raw" 64512k
python3 - "$bin" "$work/d.raw" "$runs" <<'PY'
import json, statistics, subprocess, sys, time
bin, disk, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
first, done, wall, rss = [], [], [], []
for _ in range(runs):
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", bin, "vm", "boot", "--probe", "-f", "raw",
                        "--output", "json", disk], capture_output=True, text=True)
    wall.append((time.perf_counter() - t0) * 1000)
    assert p.returncode == 0, p.stdout + p.stderr
    v = json.loads(p.stdout)
    first.append(v["first-exit-ms"]); done.append(v["seconds"] * 1000)
    rss.append(int(p.stderr.strip().splitlines()[-1]) / 1024)
med = statistics.median
print(f"start -> first guest exit: median {med(first):.2f} ms (min {min(first):.2f})")
print(f"start -> probe 'done':     median {med(done):.2f} ms (min {min(done):.2f})")
print(f"process wall (exec to exit, with /usr/bin/time): median {med(wall):.2f} ms")
print(f"peak RSS of a run (/usr/bin/time %M): max {max(rss):.1f} MiB, guest pages it touched included")
PY
fi

"$repo/fixtures/bootvm/build.sh" "$repo/target/bootvm" >/dev/null
fx=$repo/target/bootvm
if on nested; then
echo "== nested KVM: vmshift-kvm vs QEMU, same kernel, initramfs and disk"
mkdir -p "$work/data/kernel"
"$bin" vm convert "$fx/debian/debian.vmx" --to libvirt --out "$work/data/debian" --target-dir /data/debian >/dev/null
cp "$fx"/kernel/* "$work/data/kernel/"
cat >"$work/data/bench.sh" <<'EOF'
K=/data/kernel
CMD="$(cat $K/cmdline) console=ttyS0"
Q=$(ls /data/debian/*.qcow2); X=$(ls /data/debian/*.xml)
now() { cut -d' ' -f1 /proc/uptime; }
# run NAME COMMAND...: seconds from start to "login:" on its output.
run() {
    name=$1; shift
    out=/tmp/$name.out; : >$out
    t0=$(now)
    "$@" </dev/null >$out 2>&1 &
    pid=$!
    while ! grep -q 'login:' $out; do
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    t=$(awk -v a=$t0 -v b=$(now) 'BEGIN{printf "%.2f", b-a}')
    grep -q 'login:' $out && echo "BENCH $name $t" || echo "BENCH $name failed"
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
}
for round in 1 2; do
run vmshift-kvm vmshift vm boot --console --timeout 300 --kernel $K/vmlinuz --initrd $K/initrd.img --append "$CMD" $X
run qemu-q35 qemu-system-x86_64 -M q35 -accel kvm -cpu host -m 1024 -nodefaults -nographic -serial stdio -no-reboot \
    -kernel $K/vmlinuz -initrd $K/initrd.img -append "$CMD" \
    -device virtio-scsi-pci,id=scsi0 -drive file=$Q,format=qcow2,if=none,id=d0,snapshot=on -device scsi-hd,drive=d0,bus=scsi0.0
run qemu-microvm qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 1024 -nodefaults -nographic -serial stdio -no-reboot \
    -kernel $K/vmlinuz -initrd $K/initrd.img -append "$CMD" \
    -drive file=$Q,format=qcow2,if=none,id=d0,snapshot=on -device virtio-blk-device,drive=d0
done
EOF
log=$work/nested.log
"$repo/scripts/nested-kvm.sh" --data "$work/data" --script "$work/data/bench.sh" --bin "$bin" --log "$log" >/dev/null || true
grep -a '^BENCH' "$log" | tr -d '\r' | awk '
    { n[$2]++; if ($3 != "failed") { s[$2] += $3; c[$2]++ } print }
    END {
        for (k in s) m[k] = s[k] / c[k]
        printf "mean to login: vmshift-kvm %.2f s, qemu q35 %.2f s, qemu microvm %.2f s\n", m["vmshift-kvm"], m["qemu-q35"], m["qemu-microvm"]
        if (m["qemu-q35"] > 0) printf "ratio vmshift-kvm / qemu q35: %.2f; / qemu microvm: %.2f\n", m["vmshift-kvm"] / m["qemu-q35"], m["vmshift-kvm"] / m["qemu-microvm"]
    }'
fi

if on qemu; then
echo "== this host, QEMU under TCG: vm boot --engine qemu (disks over vmshift's NBD) vs qemu-system-x86_64 on the qcow2"
"$bin" vm convert "$fx/debian/debian.vmx" --to libvirt --out "$work/host" >/dev/null
K=$fx/kernel
khz=$(awk -F: '/cpu MHz/{printf "%d", $2*1000; exit}' /proc/cpuinfo)
CMD="$(cat "$K/cmdline") console=ttyS0 tsc_early_khz=$khz lpj=$((khz * 4))"
Q=$(ls "$work"/host/*.qcow2)
X=$(ls "$work"/host/*.xml)
# run NAME COMMAND...: seconds from start to "login:" on its output.
run() {
    local name=$1 out=$work/$1.out t0 pid
    shift
    : >"$out"
    t0=$(date +%s.%N)
    "$@" </dev/null >"$out" 2>&1 &
    pid=$!
    while ! grep -q 'login:' "$out"; do
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    if grep -q 'login:' "$out"; then
        echo "BENCH $name $(echo "$(date +%s.%N) - $t0" | bc)"
    else
        echo "BENCH $name failed"
    fi
    kill $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
}
for round in 1 2 3; do
    run vmshift-qemu "$bin" vm boot --engine qemu --memory 1024 --console --timeout 300 \
        --kernel "$K/vmlinuz" --initrd "$K/initrd.img" --append "$CMD" "$X"
    run qemu-direct qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 1 -m 1024 \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio \
        -kernel "$K/vmlinuz" -initrd "$K/initrd.img" -append "$CMD" \
        -device virtio-scsi-pci,id=scsi0 -drive "file=$Q,format=qcow2,if=none,id=d0,snapshot=on" \
        -device scsi-hd,drive=d0,bus=scsi0.0
done | tee "$work/qemu.bench" | awk '{ printf "%s %s %.2f s\n", $1, $2, $3 }'
awk '$3 != "failed" { s[$2] += $3; c[$2]++ }
    END { a = s["vmshift-qemu"] / c["vmshift-qemu"]; b = s["qemu-direct"] / c["qemu-direct"]
          printf "mean to login: vm boot --engine qemu %.2f s, qemu-system-x86_64 on the qcow2 %.2f s; ratio %.2f\n", a, b, a / b }' "$work/qemu.bench"
fi
