#!/usr/bin/env bash
# The main job on the bundled sample: convert a qcow2 to raw and back,
# prove the round trip is exact, and show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vmshift
vmshift=$PWD/target/release/vmshift
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
set -x
"$vmshift" info fixtures/sample/sample.qcow2
"$vmshift" convert -f qcow2 -O raw fixtures/sample/sample.qcow2 "$out/disk.raw"
"$vmshift" convert -f raw -O qcow2 -c -o compression_type=zstd "$out/disk.raw" "$out/disk.qcow2"
"$vmshift" compare fixtures/sample/sample.qcow2 "$out/disk.qcow2"
"$vmshift" check "$out/disk.qcow2"
"$vmshift" map "$out/disk.raw"
"$vmshift" info "$out/disk.qcow2"
