#!/usr/bin/env bash
# Fuzzes every vmshift parser with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: all of them) for SECONDS (default 60) on its
# corpus in fuzz/corpus/TARGET, seeded first from the repository's fixtures
# and from small images made here by the real tools (qemu-img, mkfs.*,
# hivexsh, cpio and the compressors). The corpus is kept between runs.
# CI runs it with a short time; run it longer by hand.
#
# A crash, a leak, a timeout (10 s per input) or an input that takes more
# than 2 GiB fails the run; libFuzzer leaves the input in
# fuzz/artifacts/TARGET/: make it a fixture with a regression test. The
# last line per target says how many inputs ran (FUZZ-RESULT lines).
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer=address and the
# coverage passes): the stable toolchain runs them with RUSTC_BOOTSTRAP=1.
# cargo-fuzz is installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

secs=${1:-60}
shift || true
all=(image descriptors guest_fs hive initramfs lvm_metadata virtio)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

# The tools that make the seeds (scripts/test.sh installs the others).
missing=()
command -v mkntfs >/dev/null || missing+=(ntfs-3g)
for t in qemu-img mke2fs mkfs.fat mcopy mkfs.xfs hivexsh cpio zstd xz bzip2 lz4 sfdisk; do
    command -v $t >/dev/null || { echo "fuzz.sh: $t is missing: run scripts/test.sh once (it installs the test peers)" >&2; exit 1; }
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# The workspace's own (stable) toolchain, allowed cargo-fuzz's -Z flags:
# the same compiler as the main build, and no nightly to install.
export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)

corpus=$repo/fuzz/corpus
seeds=$(mktemp -d "${TMPDIR:-/tmp}/vmshift-seeds.XXXXXX")
trap 'rm -rf "$seeds"' EXIT

# put TARGET FILE: copies FILE into TARGET's corpus (named by content).
put() {
    mkdir -p "$corpus/$1"
    cp "$2" "$corpus/$1/seed-$(sha1sum "$2" | cut -c1-16)"
}
# trim FILE [MAX]: cuts trailing zeros (the guest_fs target reads zeros
# past its input) and keeps at most MAX bytes (default 1 MiB).
trim() {
    python3 - "$1" "${2:-1048576}" <<'PY'
import sys
p, limit = sys.argv[1], int(sys.argv[2])
b = open(p, "rb").read()[:limit]
open(p, "wb").write(b.rstrip(b"\0"))
PY
}

seed_image() {
    local d=$seeds/image
    mkdir -p "$d"
    for f in fixtures/bad/*.qcow2 fixtures/vmdk/* fixtures/sample/*; do
        [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 1048576 ] && put image "$f"
    done
    qemu-img create -q -f raw "$d/mbr.raw" 4M
    printf 'label: dos\n2048,2048,83\n4096,,5\n4200,1000,83\n' | sfdisk -q "$d/mbr.raw" >/dev/null
    qemu-img create -q -f raw "$d/gpt.raw" 4M
    printf 'label: gpt\n2048,2048\n4096,\n' | sfdisk -q "$d/gpt.raw" >/dev/null
    put image "$d/mbr.raw"
    put image "$d/gpt.raw"
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$d/data.qcow2" 8M
    qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' -c 'write -z 1M 64k' -c 'write -P 7 7M 4k' "$d/data.qcow2" >/dev/null
    put image "$d/data.qcow2"
    qemu-img create -q -f qcow2 -b data.qcow2 -F qcow2 "$d/overlay.qcow2"
    put image "$d/overlay.qcow2"
    qemu-img convert -c -O qcow2 -o cluster_size=4096 "$d/data.qcow2" "$d/zlib.qcow2"
    put image "$d/zlib.qcow2"
    qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd "$d/data.qcow2" "$d/zstd.qcow2"
    put image "$d/zstd.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=32768,extended_l2=on "$d/subcluster.qcow2" 8M
    qemu-io -f qcow2 -c 'write -P 1 0 2k' "$d/subcluster.qcow2" >/dev/null
    put image "$d/subcluster.qcow2"
    for sub in monolithicSparse streamOptimized; do
        qemu-img convert -O vmdk -o subformat=$sub "$d/data.qcow2" "$d/$sub.vmdk"
        put image "$d/$sub.vmdk"
    done
    # A flat and a split descriptor (their extents are missing: the
    # descriptor parser and extent checks are what runs).
    qemu-img create -q -f vmdk -o subformat=monolithicFlat "$d/flat.vmdk" 1M
    put image "$d/flat.vmdk"
    qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$d/split.vmdk" 1M
    put image "$d/split.vmdk"
}

seed_descriptors() {
    find fixtures/vms -type f \( -name '*.vmx' -o -name '*.vmsd' -o -name '*.xml' \
        -o -name '*.conf' -o -name '*.ovf' -o -name '*.mf' \) | while read -r f; do
        put descriptors "$f"
    done
    # The descriptors inside the sample OVA (a tar).
    find fixtures -name '*.ova' | while read -r ova; do
        local d=$seeds/ova
        mkdir -p "$d"
        tar -xf "$ova" -C "$d" --wildcards '*.ovf' '*.mf' 2>/dev/null || true
        find "$d" -type f \( -name '*.ovf' -o -name '*.mf' \) | while read -r f; do put descriptors "$f"; done
    done
}

seed_guest_fs() {
    local d=$seeds/fs
    mkdir -p "$d/tree/etc" "$d/tree/boot/grub" "$d/tree/a/b/c"
    echo 'UUID=1234 / ext4 defaults 0 1' >"$d/tree/etc/fstab"
    echo 'menuentry "L" { linux /vmlinuz root=/dev/sda1 }' >"$d/tree/boot/grub/grub.cfg"
    head -c 70000 /dev/urandom >"$d/tree/a/b/c/big"
    for i in $(seq 1 40); do echo "$i" >"$d/tree/a/file-with-a-long-name-$i.txt"; done
    ln -s ../etc/fstab "$d/tree/a/link"
    ln -s "$(printf 'x%.0s' $(seq 1 100))" "$d/tree/a/longlink"
    local kind
    for kind in ext2 ext4; do
        rm -f "$d/$kind.img"
        mke2fs -q -t $kind -b 1024 -d "$d/tree" "$d/$kind.img" 4M 2>/dev/null
        trim "$d/$kind.img"
        put guest_fs "$d/$kind.img"
    done
    local bits
    for bits in 12 16 32; do
        local size=4M
        [ $bits = 16 ] && size=20M
        [ $bits = 32 ] && size=40M
        rm -f "$d/fat$bits.img"
        truncate -s $size "$d/fat$bits.img"
        mkfs.fat -F $bits -n FUZZ "$d/fat$bits.img" >/dev/null
        # (mcopy follows symlinks and stops at the dangling one: what it
        # copied before is enough)
        MTOOLS_SKIP_CHECK=1 mcopy -s -i "$d/fat$bits.img" "$d/tree/etc" "$d/tree/a" ::/ 2>/dev/null || true
        trim "$d/fat$bits.img"
        put guest_fs "$d/fat$bits.img"
    done
    # XFS: the first MiB of a two-AG file system (superblock, AG headers,
    # B+tree roots, the first inodes and directory blocks).
    {
        echo "/dev/null"
        echo "0 0"
        echo "d--755 0 0"
        echo "etc d--755 0 0"
        echo "fstab ---644 0 0 $d/tree/etc/fstab"
        echo "\$"
        echo "many d--755 0 0"
        for i in $(seq 1 200); do echo "name-of-entry-$i ---644 0 0 $d/tree/etc/fstab"; done
        echo "\$"
        echo "link l--777 0 0 etc/fstab"
        echo "\$"
    } >"$d/xfs.proto"
    rm -f "$d/xfs.img"
    truncate -s 320M "$d/xfs.img"
    mkfs.xfs -q -d agcount=2 -p "$d/xfs.proto" "$d/xfs.img"
    trim "$d/xfs.img"
    put guest_fs "$d/xfs.img"
    rm -f "$d/ntfs.img"
    truncate -s 4M "$d/ntfs.img"
    mkntfs -q -F -Q -c 4096 "$d/ntfs.img" >/dev/null 2>&1
    trim "$d/ntfs.img"
    put guest_fs "$d/ntfs.img"
}

seed_hive() {
    local d=$seeds/hive
    mkdir -p "$d"
    python3 tests/guests/mkhive.py "$d/SYSTEM"
    {
        echo "add ControlSet001"
        echo "cd ControlSet001"
        echo "add Services"
        echo "cd Services"
        for i in $(seq 1 100); do echo "add svc$i"; done
        echo "add viostor"
        echo "cd viostor"
        echo "setval 4"
        echo "Start"
        echo "dword:0"
        echo "ImagePath"
        echo "expandstring:System32\\drivers\\viostor.sys"
        echo "DependOnService"
        echo "hex:7:610062000000630000000000"
        echo "Blob"
        echo "hex:3:00112233445566778899"
        echo "commit"
    } | hivexsh -w "$d/SYSTEM" >/dev/null
    put hive "$d/SYSTEM"
    python3 tests/guests/mkhive.py "$d/EMPTY"
    put hive "$d/EMPTY"
}

seed_initramfs() {
    local d=$seeds/initramfs
    mkdir -p "$d/root/lib/modules/6.1.0-1-amd64/kernel/drivers/block" "$d/root/etc" "$d/early/kernel/x86/microcode"
    echo x >"$d/root/lib/modules/6.1.0-1-amd64/kernel/drivers/block/virtio_blk.ko"
    echo 'kernel/drivers/virtio/virtio_pci.ko' >"$d/root/lib/modules/6.1.0-1-amd64/modules.builtin"
    echo 'hostonly=yes' >"$d/root/etc/dracut.conf"
    echo ucode >"$d/early/kernel/x86/microcode/GenuineIntel.bin"
    (cd "$d/root" && find . | cpio -o -H newc --quiet) >"$d/main.cpio"
    (cd "$d/early" && find . | cpio -o -H newc --quiet) >"$d/early.cpio"
    put initramfs "$d/main.cpio"
    gzip -9c "$d/main.cpio" >"$d/main.gz" && put initramfs "$d/main.gz"
    zstd -q -c "$d/main.cpio" >"$d/main.zst" && put initramfs "$d/main.zst"
    xz -c --check=crc32 "$d/main.cpio" >"$d/main.xz" && put initramfs "$d/main.xz"
    xz -c --format=lzma "$d/main.cpio" >"$d/main.lzma" && put initramfs "$d/main.lzma"
    bzip2 -c "$d/main.cpio" >"$d/main.bz2" && put initramfs "$d/main.bz2"
    lz4 -q -l -c "$d/main.cpio" >"$d/main.lz4l" && put initramfs "$d/main.lz4l"
    lz4 -q -c "$d/main.cpio" >"$d/main.lz4" && put initramfs "$d/main.lz4"
    cat "$d/early.cpio" "$d/main.gz" >"$d/early+main" && put initramfs "$d/early+main"
}

seed_lvm_metadata() {
    local d=$seeds/lvm
    mkdir -p "$d"
    cat >"$d/vg.txt" <<'META'
vg0 {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-000000"
seqno = 7
format = "lvm2"
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
max_lv = 0
max_pv = 0
metadata_copies = 0

physical_volumes {

pv0 {
id = "pv0000-0000-0000-0000-0000-0000-000000"
device = "/dev/sda2"
status = ["ALLOCATABLE"]
flags = []
dev_size = 20969472
pe_start = 2048
pe_count = 2559
}

pv1 {
id = "pv1111-1111-1111-1111-1111-1111-111111"
device = "/dev/sdb"
status = ["ALLOCATABLE"]
flags = []
dev_size = 20971520
pe_start = 2048
pe_count = 2559
}
}

logical_volumes {

root {
id = "lv0000-0000-0000-0000-0000-0000-000000"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
creation_time = 1700000000
creation_host = "localhost"
segment_count = 2

segment1 {
start_extent = 0
extent_count = 1000
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
segment2 {
start_extent = 1000
extent_count = 200
type = "striped"
stripe_count = 2
stripe_size = 128
stripes = [
"pv0", 1000,
"pv1", 0
]
}
}

pool {
id = "lv1111-1111-1111-1111-1111-1111-111111"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 10
type = "thin-pool"
metadata = "pool_tmeta"
pool = "pool_tdata"
}
}
}

}
# Generated by LVM2 version 2.03.16(2) (2022-05-18): Fri Dec  4 10:00:00 2026

contents = "Text Format Volume Group"
version = 1

description = ""

creation_host = "localhost"	# Linux localhost 6.1.0 #1 SMP x86_64
creation_time = 1700000000	# Tue Nov 14 22:13:20 2023
META
    put lvm_metadata "$d/vg.txt"
}

seed_virtio() {
    local d=$seeds/virtio
    mkdir -p "$d"
    python3 - "$d" <<'PY'
import struct, sys
out = sys.argv[1]

def layout(head, descs, extra):
    """head: the 6 control bytes; descs: (addr, len, flags, next); extra:
    (addr, bytes) to place in guest memory."""
    mem = bytearray(0x7000)
    for i, (a, l, f, n) in enumerate(descs):
        struct.pack_into("<QIHH", mem, 16 * i, a, l, f, n)
    struct.pack_into("<HHH", mem, 0x1000, 0, 1, 0)  # avail: flags, idx 1, ring[0] = 0
    for a, b in extra:
        mem[a:a + len(b)] = b
    return bytes(head) + bytes(mem)

NEXT, WRITE = 1, 2
blk = [0, 8, 32, 0, 96, 0]
for name, kind, sector, length in [("blk-in", 0, 1, 512), ("blk-out", 1, 2, 1024),
                                   ("blk-flush", 4, 0, 0), ("blk-getid", 8, 0, 20)]:
    hdr = struct.pack("<IIQ", kind, 0, sector)
    if length:
        descs = [(0x4000, 16, NEXT, 1), (0x5000, length, NEXT | (WRITE if kind != 1 else 0), 2),
                 (0x6000, 1, WRITE, 0)]
    else:
        descs = [(0x4000, 16, NEXT, 1), (0x6000, 1, WRITE, 0)]
    open(f"{out}/{name}", "wb").write(layout(blk, descs, [(0x4000, hdr)]))

def scsi_req(cdb):
    lun = bytes([1, 0, 0x40, 0, 0, 0, 0, 0])
    return lun + struct.pack("<QBBB", 1, 0, 0, 0) + cdb.ljust(32, b"\0")

scsi = [1, 8, 32, 0, 96, 0]
cdbs = {
    "scsi-read10": (bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]), True),
    "scsi-write10": (bytes([0x2a, 0, 0, 0, 0, 2, 0, 0, 1, 0]), False),
    "scsi-read16": (bytes([0x88, 0] + [0] * 7 + [3] + [0, 0, 0, 1, 0, 0]), True),
    "scsi-inquiry": (bytes([0x12, 0, 0, 0, 96, 0]), True),
    "scsi-vpd83": (bytes([0x12, 1, 0x83, 0, 96, 0]), True),
    "scsi-capacity16": (bytes([0x9e, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), True),
    "scsi-report-luns": (bytes([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), True),
    "scsi-mode-sense": (bytes([0x1a, 0, 0x3f, 0, 96, 0]), True),
}
for name, (cdb, read) in cdbs.items():
    descs = [(0x4000, 51, NEXT, 1), (0x5000, 108, NEXT | WRITE, 2),
             (0x6000, 512, WRITE if read else 0, 0)]
    if not read:
        descs = [(0x4000, 51, NEXT, 1), (0x6000, 512, NEXT, 2), (0x5000, 108, WRITE, 0)]
    open(f"{out}/{name}", "wb").write(layout(scsi, descs, [(0x4000, scsi_req(cdb))]))
# A task management function on the control queue.
tmf = struct.pack("<II", 0, 0) + bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + struct.pack("<Q", 1)
open(f"{out}/scsi-tmf", "wb").write(layout([3, 8, 32, 0, 96, 0],
    [(0x4000, len(tmf), NEXT, 1), (0x5000, 4, WRITE, 0)], [(0x4000, tmf)]))
PY
    for f in "$d"/*; do put virtio "$f"; done
}

# The longest input per target (libFuzzer's -max_len).
max_len() {
    case $1 in
        image | guest_fs | hive) echo 1048576 ;;
        virtio) echo 262150 ;;
        *) echo 262144 ;;
    esac
}

(cd fuzz && "${fuzz[@]}" build -O)

status=0
for t in "${targets[@]}"; do
    case " ${all[*]} " in *" $t "*) ;; *) echo "fuzz.sh: no target $t (targets: ${all[*]})" >&2; exit 2 ;; esac
    "seed_$t"
    mkdir -p "fuzz/artifacts/$t"
    log=$(mktemp "${TMPDIR:-/tmp}/fuzz-$t.XXXXXX.log")
    rc=0
    (cd fuzz && "${fuzz[@]}" run -O "$t" "$corpus/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1) >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2 || true)
    files=$(find "$corpus/$t" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        echo "FUZZ-RESULT $t ok runs=${runs:-0} seconds=$secs coverage=${cov:-0} corpus=$files"
    else
        status=1
        echo "FUZZ-RESULT $t FAILED rc=$rc runs=${runs:-0} (log: $log; inputs in fuzz/artifacts/$t)"
        grep -E 'ERROR: |panicked at|SUMMARY|Test unit written|error' "$log" | head -n 20 || true
    fi
done
exit $status
