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
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
qemu-img --version | head -n1

# The end-to-end tests run the vmshift binary: build it first.
cargo build --workspace --locked
cargo test --workspace --locked "$@"
