#!/usr/bin/env bash
# Runs a busybox sh script inside a VM that has a real /dev/kvm, on machines
# whose own /dev/kvm cannot run stock kernels (kvm_pvm): QEMU TCG emulates an AMD CPU with
# SVM (-cpu max), the Debian cloud kernel in that "outer" VM loads kvm-amd,
# and VMMs started by the script (vmshift, qemu-system-x86_64 -accel kvm) run
# guests on it.
#
# Usage: scripts/nested-kvm.sh --data DIR --script FILE [--bin PATH]...
#                              [--mem MiB] [--timeout S] [--log FILE] [--keep]
#   --data DIR     copied into an ext4 image (at least 4 GiB, sparse; mke2fs
#                  -d, no mount), attached read-write as virtio-blk and
#                  mounted at /data; the script runs with /data as its cwd.
#   --script FILE  busybox sh script, run by the outer VM's init.
#   --bin PATH     a program copied to /bin with its shared libraries (ldd);
#                  may repeat. qemu-system-x86_64 (the installed one, with its
#                  libraries and BIOS files) is always in /bin.
#   --mem MiB      outer VM memory (default 4096); /tmp there is a tmpfs.
#   --timeout S    give up after S seconds (default 1200).
#   --log FILE     console log (default: a new /tmp/nested-kvm.*.log).
#   --keep         keep the work folder (initramfs, data image) and say where.
# The console streams to stdout. Exit status: the script's, read from the
# "NESTED-DONE rc=N" line the outer init prints; 124 if that line never came
# (timeout, crash).
#
# Needs qemu-system-x86 (>= 7.2), e2fsprogs, cpio, lz4, and apt access to a
# Debian mirror for linux-image-cloud-amd64 and busybox-static; their .debs
# and the unpacked kernel are cached in $VMSHIFT_CACHE (/var/cache/vmshift).
set -euo pipefail

usage() { sed -n '/^# Usage/,/^# (timeout/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
data="" script="" bins=() mem=4096 tmo=1200 log="" keep=0
while [ $# -gt 0 ]; do
    case $1 in
    --data) data=$2; shift 2 ;;
    --script) script=$2; shift 2 ;;
    --bin) bins+=("$2"); shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) tmo=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) usage ;;
    *) echo "nested-kvm.sh: unknown argument $1" >&2; usage ;;
    esac
done
if [ ! -d "$data" ] || [ ! -f "$script" ]; then usage; fi
for b in "${bins[@]}"; do [ -f "$b" ] || { echo "nested-kvm.sh: no file $b" >&2; exit 2; }; done
qemu=/usr/bin/qemu-system-x86_64
for tool in "$qemu" mke2fs cpio lz4 dpkg-deb apt-get flock; do
    command -v "$tool" >/dev/null || { echo "nested-kvm.sh: $tool is missing" >&2; exit 2; }
done
t0=$(date +%s)
cache=${VMSHIFT_CACHE:-/var/cache/vmshift}
log=${log:-$(mktemp /tmp/nested-kvm.XXXXXX.log)}
work=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm.XXXXXX")
if [ "$keep" = 1 ]; then trap 'echo "nested-kvm.sh: work folder $work"' EXIT; else trap 'rm -rf "$work"' EXIT; fi
trap 'exit 130' INT TERM HUP

# --- kernel, modules and busybox from Debian, unpacked once into the cache --
# The newest linux-image-<ver>-cloud-amd64 the cloud-amd64 metapackage pulls.
kpkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
pkg=$(kpkg)
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(kpkg); fi
kver=${pkg#linux-image-}
kdir=$cache/nested-$kver
# Modules the outer VM loads: KVM, and virtio-mmio + virtio-blk for the data
# disk (QEMU microvm describes its virtio-mmio devices in ACPI). ext4 is built in.
modules=(irqbypass kvm kvm_amd virtio_mmio virtio_blk)
mkdir -p "$cache"
exec 9>"$cache/nested.lock"
flock 9 # one unpacker at a time
if [ ! -f "$kdir/.complete" ]; then
    mkdir -p "$cache/debs" "$work/x"
    # fetch_deb PACKAGE: the path of its .deb, downloaded unless cached.
    fetch_deb() {
        local debs=("$cache/debs/$1"_*.deb)
        if [ ! -e "${debs[-1]}" ]; then
            (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2)
            debs=("$cache/debs/$1"_*.deb)
        fi
        echo "${debs[-1]}"
    }
    dpkg-deb -x "$(fetch_deb "$pkg")" "$work/x/k"
    dpkg-deb -x "$(fetch_deb busybox-static)" "$work/x/bb"
    rm -rf "$kdir" && mkdir -p "$kdir/modules"
    cp "$work/x/bb/bin/busybox" "$kdir/busybox"
    # Copy the modules with their dependencies (the depends= field of each
    # .ko's modinfo), dependencies first; list the load order.
    mdir=$work/x/k/lib/modules/$kver
    declare -A ko_of=() seen=()
    while read -r f; do
        n=$(basename "$f" .ko)
        ko_of[${n//-/_}]=$f
    done < <(find "$mdir/kernel" -name '*.ko')
    add_mod() {
        local n=${1//-/_} d
        [ -z "${seen[$n]:-}" ] || return 0
        seen[$n]=1
        if [ -z "${ko_of[$n]:-}" ]; then # built into the kernel, or an error
            grep -q "/${n}.ko\$" "$mdir/modules.builtin" || grep -q "/${1}.ko\$" "$mdir/modules.builtin" ||
                { echo "nested-kvm.sh: no module $1 in $pkg" >&2; exit 1; }
            return 0
        fi
        for d in $(tr '\0' '\n' <"${ko_of[$n]}" | sed -n 's/^depends=//p' | tr ',' ' '); do add_mod "$d"; done
        cp "${ko_of[$n]}" "$kdir/modules/"
        basename "${ko_of[$n]}" .ko >>"$kdir/modules/load-order"
    }
    for m in "${modules[@]}"; do add_mod "$m"; done
    # The uncompressed vmlinux (ELF, PVH entry) from the LZ4 bzImage payload.
    bz=$work/x/k/boot/vmlinuz-$kver
    off=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -n1 | cut -d: -f1)
    tail -c "+$((off + 1))" "$bz" | lz4 -dc >"$kdir/vmlinux" 2>/dev/null || true
    [ "$(head -c 4 "$kdir/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] ||
        { echo "nested-kvm.sh: no LZ4 vmlinux in $bz" >&2; exit 1; }
    touch "$kdir/.complete"
    rm -rf "$work/x"
    # Kernels unpacked for older package versions are not needed any more.
    find "$cache" -maxdepth 1 -name 'nested-*' ! -path "$kdir" -exec rm -rf {} +
fi
flock -u 9

# --- outer initramfs --------------------------------------------------------
ir=$work/initramfs
mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,data,root,var,lib/modules,etc}
ln -s /tmp "$ir/var/tmp"                    # qemu snapshot=on writes there
cp "$kdir/busybox" "$ir/bin/busybox"
cp "$kdir"/modules/* "$ir/lib/modules/"
cp "$script" "$ir/nested-script"

# add_bin FILE DEST: a program and the shared libraries ldd lists, at their paths.
add_bin() {
    cp -L "$1" "$ir$2"
    local lib
    for lib in $(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        [ -e "$ir$lib" ] && continue
        mkdir -p "$ir$(dirname "$lib")"
        cp -L "$lib" "$ir$lib"
    done
}
# qemu at its own path (it finds /usr/share/qemu relative to itself), with the
# x86 BIOS/option ROMs; no loadable modules (not needed with -accel kvm
# -nodefaults -nographic).
add_bin "$qemu" /usr/bin/qemu-system-x86_64
ln -s /usr/bin/qemu-system-x86_64 "$ir/bin/qemu-system-x86_64"
mkdir -p "$ir/usr/share/qemu" "$ir/usr/share/seabios"
for f in /usr/share/qemu/*.bin /usr/share/qemu/*.rom /usr/share/seabios/*; do
    case $f in */openbios-* | */hppa-* | */s390-* | */skiboot* | */slof* | */u-boot*) continue ;; esac
    [ -e "$f" ] && cp -L "$f" "$ir$f"
done
for b in "${bins[@]}"; do add_bin "$b" "/bin/$(basename "$b")"; done

cat >"$ir/init" <<'EOF'
#!/bin/busybox sh
# Outer VM init, written by nested-kvm.sh.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "NESTED-BOOT at $(cut -d' ' -f1 /proc/uptime) s"
while read -r m; do insmod "/lib/modules/$m.ko" || echo "NESTED: insmod $m failed"; done </lib/modules/load-order
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda /data || echo "NESTED: cannot mount the data disk"
echo "NESTED-UP at $(cut -d' ' -f1 /proc/uptime) s; $(ls /dev/kvm 2>&1)"
cd /data
sh /nested-script
rc=$?
cd /
sync
umount /data || echo "NESTED: cannot unmount /data"
echo "NESTED-DONE rc=$rc at $(cut -d' ' -f1 /proc/uptime) s"
reboot -f
EOF
chmod +x "$ir/init" "$ir/nested-script"
# Uncompressed: unpacking gzip under TCG costs more than reading the bytes.
# Padded to 4 KiB: QEMU places the initrd at the top of low memory, and an
# unaligned size overlaps the ACPI tables in the last page (the outer kernel
# then hangs checksumming a garbage table after "ACPI: Core revision").
(cd "$ir" && find . | cpio -o -H newc --quiet) >"$work/initramfs.cpio"
truncate -s %4096 "$work/initramfs.cpio"

# --- data disk --------------------------------------------------------------
need_kib=$(du -sk "$data" | cut -f1)
size_kib=$((need_kib + need_kib / 4 + 1024 * 1024))
[ "$size_kib" -ge $((4 * 1024 * 1024)) ] || size_kib=$((4 * 1024 * 1024))
mke2fs -q -F -t ext4 -d "$data" -L nested-data "$work/data.img" "${size_kib}k" >/dev/null

# --- run --------------------------------------------------------------------
# TCG misboots without tsc_early_khz/lpj (hangs at "Marking TSC unstable").
khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
append="console=ttyS0 reboot=t panic=-1 pci=off quiet"
[ -z "$khz" ] || append="$append tsc_early_khz=$khz lpj=$((khz * 4))"
echo "nested-kvm.sh: kernel $kver, initramfs $(du -h "$work/initramfs.cpio" | cut -f1), data $((size_kib / 1024)) MiB, prep $(($(date +%s) - t0)) s; log $log"
for attempt in 1 2 3; do
    # pic=off: with microvm's default 8259 PIC, 7 of 8 TCG boots here died
    # in early boot (a spurious vector-0 interrupt, then a triple fault);
    # 0 of 8 without it.
    timeout -k 10 "$tmo" "$qemu" -M microvm,pic=off -accel tcg -cpu max -m "$mem" \
        -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
        -kernel "$kdir/vmlinux" -initrd "$work/initramfs.cpio" -append "$append" \
        -drive "file=$work/data.img,format=raw,if=none,id=data,cache=unsafe" \
        -device virtio-blk-device,drive=data </dev/null 2>&1 | tee "$log" || true
    # Retry only a boot that died before init ran (never a timeout).
    grep -aq NESTED-BOOT "$log" || [ $(($(date +%s) - t0)) -ge "$tmo" ] || {
        echo "nested-kvm.sh: outer VM died before init (attempt $attempt), retrying"
        continue
    }
    break
done
rc=$(grep -ao 'NESTED-DONE rc=[0-9]*' "$log" | tail -n1 | cut -d= -f2 || true)
echo "nested-kvm.sh: wall $(($(date +%s) - t0)) s; log $log"
if [ -z "$rc" ]; then
    echo "nested-kvm.sh: no NESTED-DONE line (timeout after ${tmo} s or crash)" >&2
    exit 124
fi
exit "$rc"
