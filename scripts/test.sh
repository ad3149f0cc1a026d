#!/usr/bin/env bash
# Runs every test. On a fresh Debian machine it first installs the peers the
# tests compare against (qemu-img and qemu-io from qemu-utils). A missing
# peer fails the tests; it is never skipped. python3 runs the fixture
# generators; libvirt-clients and libxml2-utils validate the libvirt XML
# vmshift writes; ovmf provides the UEFI variable store template; fdisk and
# gdisk make and read the partition tables the part tests compare against.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v qemu-io >/dev/null || missing+=(qemu-utils)
command -v python3 >/dev/null || missing+=(python3)
# libvirt's schema checker (virt-xml-validate runs xmllint) and OVMF for
# the VM conversion tests.
command -v virt-xml-validate >/dev/null || missing+=(libvirt-clients)
command -v xmllint >/dev/null || missing+=(libxml2-utils)
[ -f /usr/share/OVMF/OVMF_VARS_4M.ms.fd ] || missing+=(ovmf)
# Partition tables to compare with: sfdisk/fdisk (fdisk) and sgdisk (gdisk).
command -v sfdisk >/dev/null || missing+=(fdisk)
command -v sgdisk >/dev/null || missing+=(gdisk)
command -v mke2fs >/dev/null || missing+=(e2fsprogs)
# strace counts the flushes convert's cache modes make.
command -v strace >/dev/null || missing+=(strace)
# FAT file systems for the guest tests: mkfs.fat, and mtools to fill and
# list them.
command -v mkfs.fat >/dev/null || missing+=(dosfstools)
command -v mdir >/dev/null || missing+=(mtools)
# XFS for the guest tests: mkfs.xfs makes file systems from proto files,
# xfs_db lists them. hivexsh/hivexget/hivexregedit write and read the
# registry hives the hive reader is compared with.
command -v mkfs.xfs >/dev/null || missing+=(xfsprogs)
command -v xfs_db >/dev/null || missing+=(xfsprogs)
command -v hivexsh >/dev/null || missing+=(libhivex-bin)
# cryptsetup makes the encrypted volume the guest tests name.
command -v cryptsetup >/dev/null || missing+=(cryptsetup-bin)
# zstd, xz and bzip2 pack the guest tests' initramfs (lz4 too, below).
command -v xz >/dev/null || missing+=(xz-utils)
command -v bzip2 >/dev/null || missing+=(bzip2)
command -v zstd >/dev/null || missing+=(zstd)
# The boot check (tests/nested/boot-check.sh): debootstrap for the fixture
# VMs, cpio and lz4 for the initramfs and kernel it assembles.
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v cpio >/dev/null || missing+=(cpio)
command -v lz4 >/dev/null || missing+=(lz4)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
# QEMU's system emulator for the boot check's outer VM. The release's own
# qemu-system-x86 would replace qemu-utils 10.x with an older qemu-img, so
# both come from the backports suite together.
if ! command -v qemu-system-x86_64 >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    # The same mirror apt already uses for the release.
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    mirror=${mirror%% *}
    if ! grep -rqs "$codename-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        [ -n "$mirror" ] || { echo "test.sh: no Debian mirror in /etc/apt/sources.list.d/debian.sources; add $codename-backports to apt's sources" >&2; exit 1; }
        printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" "$codename" |
            $sudo tee /etc/apt/sources.list.d/vmshift-backports.sources >/dev/null
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -t "$codename-backports" qemu-system-x86 qemu-utils
fi
# virt-inspector, the peer of `guest inspect` (libguestfs boots an
# appliance VM; the tests run it under TCG). After the backports QEMU, so
# that apt keeps QEMU 10 rather than pulling the release's.
# guestfish builds the LVM/XFS guest (tests/guests/rhel-lvm.sh) in the same
# appliance; libguestfs-xfs puts XFS in it.
if ! command -v virt-inspector >/dev/null || ! dpkg -s libguestfs-xfs >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y libguestfs-tools libguestfs-xfs
fi
qemu-img --version | head -n1

# The end-to-end tests run the vmshift binary: build it first.
cargo build --workspace --locked
cargo test --workspace --locked "$@"
# vm boot on real kernels, in nested KVM (see the script).
tests/nested/boot-check.sh target/debug/vmshift
