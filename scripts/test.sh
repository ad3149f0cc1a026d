#!/usr/bin/env bash
# Runs every test. On a fresh Debian machine it first installs the peers the
# tests compare against (qemu-img and qemu-io from qemu-utils). A missing
# peer fails the tests; it is never skipped. python3 runs the fixture
# generators.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v qemu-io >/dev/null || missing+=(qemu-utils)
command -v python3 >/dev/null || missing+=(python3)
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
