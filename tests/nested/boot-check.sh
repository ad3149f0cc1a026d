#!/usr/bin/env bash
# The launcher's real test: fixture VMware VMs (a Debian with its own kernel
# and initramfs, and a variant whose initramfs lacks the virtio drivers) are
# converted by `vmshift vm convert` (VMware -> libvirt, qcow2, virtio-scsi),
# then booted by `vmshift vm boot` on vmshift-kvm inside a VM with a real
# /dev/kvm (scripts/nested-kvm.sh: QEMU TCG with nested SVM). Every check
# runs in one outer VM to keep CI time down.
#
# Then the QEMU engine on this machine itself (software emulation here):
# the same two converted VMs, and the VMware VM as it is (pvscsi,
# monolithicSparse VMDK), each disk served to QEMU by vmshift over NBD.
#
# Usage: tests/nested/boot-check.sh [VMSHIFT_BINARY]   (default target/debug/vmshift)
# Prints one "BOOT-CHECK name: ok|FAILED …" line per check and a closing
# "N passed, N failed" line; exits non-zero when any check failed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-$repo/target/debug/vmshift}
[ -x "$bin" ] || { echo "boot-check: no vmshift binary at $bin (cargo build first)" >&2; exit 2; }

"$repo/fixtures/bootvm/build.sh" "$repo/target/bootvm"
fx=$repo/target/bootvm
data=$(mktemp -d "${TMPDIR:-/tmp}/boot-check.XXXXXX")
trap 'rm -rf "$data"' EXIT

# The converted VMs name their disks where the outer VM mounts the data
# disk (/data).
for vm in debian debian-novirtio; do
    "$bin" vm convert "$fx/$vm/$vm.vmx" --to libvirt --out "$data/$vm" --target-dir "/data/$vm" >/dev/null
done
mkdir -p "$data/kernel"
cp "$fx"/kernel/* "$data/kernel/"
for f in "$data"/debian*/*.qcow2; do sha256sum "$f" | sed "s|$data|/data|" >>"$data/sums"; done

cat >"$data/checks.sh" <<'EOF'
# Runs inside the outer VM, in /data.
k=/data/kernel
# boot NAME VM [ARGS...]: vm boot's JSON report goes to /tmp/NAME.json.
boot() {
    name=$1 vm=$2
    shift 2
    vmshift vm boot --output json --timeout 300 --console-log "/tmp/$name.console" "$@" "$vm" >"/tmp/$name.json"
    echo "BOOT-RESULT $name rc=$? $(tr -d '\n ' <"/tmp/$name.json" | grep -o '"verdict":"[a-z]*","cause":[a-z"-]*') $(grep -o '"seconds": [0-9.]*' "/tmp/$name.json") $(grep -o '"first-exit-ms": [0-9.]*' "/tmp/$name.json") $(grep -o '"kernel-entry": "[^"]*"' "/tmp/$name.json")"
    grep -o '"kernel": "[^"]*"' "/tmp/$name.json" | sed "s/^/BOOT-CONSOLE $name: /"
    grep -a 'login:\|Gave up\|ALERT\|Reached target' "/tmp/$name.console" | tail -n 3 | sed "s/^/BOOT-CONSOLE $name: /"
}
# The guest's own kernel, initramfs and command line, read from its /boot.
boot debian /data/debian/*.xml
boot debian-novirtio /data/debian-novirtio/*.xml
# The uncompressed ELF kernel given explicitly, with the same initramfs, on
# two vCPUs: entered at its PVH entry point; the guest's writes kept in a
# temporary file (--overlay-dir) rather than memory.
boot debian-vmlinux /data/debian/*.xml --cpus 2 --overlay-dir /tmp --kernel $k/vmlinux --initrd $k/initrd.img --append "$(cat $k/cmdline)"
# The guest wrote to its disks: the images must be unchanged.
sha256sum -c /data/sums >/dev/null && echo "BOOT-RESULT images-unchanged rc=0" || echo "BOOT-RESULT images-unchanged rc=1"
EOF

log=$(mktemp "${TMPDIR:-/tmp}/boot-check.XXXXXX.log")
"$repo/scripts/nested-kvm.sh" --data "$data" --script "$data/checks.sh" --bin "$bin" --timeout 1500 --log "$log" >/dev/null || true

# The QEMU engine, here (TCG). The converted VMs name their disks in $host.
host=$data/host
mkdir -p "$host"
for vm in debian debian-novirtio; do
    "$bin" vm convert "$fx/$vm/$vm.vmx" --to libvirt --out "$host/$vm" >/dev/null
done
sha256sum "$host"/*/*.qcow2 "$fx"/*/*.vmdk >"$host/sums"
qboot() {
    local name=$1 vm=$2 rc=0
    "$bin" vm boot --engine qemu --output json --timeout 300 --console-log "$host/$name.console" "$vm" >"$host/$name.json" || rc=$?
    echo "BOOT-RESULT $name rc=$rc $(tr -d '\n ' <"$host/$name.json" | grep -o '"verdict":"[a-z]*","cause":[a-z"-]*') $(grep -o '"seconds": [0-9.]*' "$host/$name.json") $(grep -o '"engine": "[^"]*"' "$host/$name.json")"
    grep -a 'login:\|Gave up\|ALERT' "$host/$name.console" | tail -n 2 | sed "s/^/BOOT-CONSOLE $name: /" || true
}
{
    qboot qemu-debian "$host"/debian/*.xml
    qboot qemu-debian-novirtio "$host"/debian-novirtio/*.xml
    qboot qemu-vmware-pvscsi "$fx/debian/debian.vmx"
    sha256sum -c "$host/sums" >/dev/null && echo "BOOT-RESULT qemu-images-unchanged rc=0" || echo "BOOT-RESULT qemu-images-unchanged rc=1"
    # The offline prediction: guest inspect reads each VMware disk's
    # initramfs and says which guest will not find its root on virtio —
    # the one that fails to boot above.
    for vm in debian debian-novirtio; do
        irc=0
        "$bin" guest inspect --output json "$fx/$vm/$vm.vmx" >"$host/inspect-$vm.json" || irc=$?
        if grep -q '"guest-initramfs-no-virtio"' "$host/inspect-$vm.json"; then
            echo "BOOT-RESULT inspect-$vm rc=1 no-virtio"
        else
            echo "BOOT-RESULT inspect-$vm rc=0 virtio (guest inspect exit $irc)"
            # What it could not read, if anything.
            grep -A3 '"unknown"' "$host/inspect-$vm.json" | sed "s/^/BOOT-CONSOLE inspect-$vm: /" || true
        fi
    done
} >>"$log" 2>&1

pass=0 fail=0
# expect NAME RC PATTERN: the result line of NAME has rc=RC and matches PATTERN.
expect() {
    local line
    line=$(grep -a "^BOOT-RESULT $1 " "$log" | tail -n1 | tr -d '\r')
    if [ -n "$line" ] && [[ $line == *"rc=$2"* ]] && [[ $line =~ $3 ]]; then
        echo "BOOT-CHECK $1: ok ($line)"
        pass=$((pass + 1))
    else
        echo "BOOT-CHECK $1: FAILED (expected rc=$2 and /$3/; got: ${line:-no result})"
        grep -a "BOOT-CONSOLE $1" "$log" || true
        fail=$((fail + 1))
    fi
}
expect debian 0 '"verdict":"booted".*"kernel-entry": "64-bit boot protocol"'
expect debian-novirtio 1 '"verdict":"failed","cause":"root-not-found"'
expect debian-vmlinux 0 '"verdict":"booted".*"kernel-entry": "PVH"'
expect images-unchanged 0 ''
expect qemu-debian 0 '"verdict":"booted"'
expect qemu-debian-novirtio 1 '"verdict":"failed","cause":"root-not-found"'
expect qemu-vmware-pvscsi 0 '"verdict":"booted"'
expect qemu-images-unchanged 0 ''
expect inspect-debian 0 'virtio'
expect inspect-debian-novirtio 1 'no-virtio'
grep -a "BOOT-CONSOLE" "$log" || true
if [ "$fail" -gt 0 ]; then
    echo "boot-check: the outer VM's console and the QEMU checks are in $log"
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
