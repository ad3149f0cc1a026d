#!/usr/bin/env bash
# The main job on a bundled sample VM: convert the VMware Workstation VM in
# fixtures/vms/linux-web (a .vmx, two VMDKs) to a libvirt domain with
# qcow2 disks, print the report, and prove each disk is the same disk.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vmshift
vmshift=$PWD/target/release/vmshift
# The output stays for you to look at (and to boot: see vm boot).
out=$(mktemp -d "${TMPDIR:-/tmp}/vmshift-demo.XXXXXX")
vm=fixtures/vms/linux-web
set -x
"$vmshift" vm validate "$vm/linux-web.vmx" || true
"$vmshift" vm convert --to libvirt --out "$out" "$vm/linux-web.vmx"
"$vmshift" compare "$vm/linux-web.vmdk" "$out/linux-web-disk0.qcow2"
"$vmshift" compare "$vm/linux-web-data.vmdk" "$out/linux-web-disk1.qcow2"
"$vmshift" check "$out/linux-web-disk0.qcow2"
cat "$out/linux-web.xml"
set +x
echo
echo "The converted VM is in $out (remove it when done: rm -r $out)."
