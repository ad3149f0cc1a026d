#!/usr/bin/env bash
# `vmshift guest inspect` against `virt-inspector` on the same guest, side
# by side in one run, RUNS times each: wall time and peak RSS from
# /usr/bin/time, and the ratio of the medians. virt-inspector boots its
# appliance under TCG here (LIBGUESTFS_BACKEND_SETTINGS=force_tcg: this
# machine's /dev/kvm cannot run it), which is most of its time; vmshift
# reads only the metadata and the few files it needs.
#
# Then vmshift alone on the same guest with its first disk grown to
# 100 GiB (a qcow2 copy, `qemu-img resize`): the time follows the metadata
# read, not the disk's size.
#
# Usage: scripts/bench-inspect.sh [RUNS] [DISK[,DISK…]]
#   default: 3 runs, the Debian disk tests/nested/boot-check.sh builds
#   (target/bootvm/debian/debian.vmdk); several disks of one guest are
#   separated by commas (an LVM volume group over two disks).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3}
IFS=, read -r -a disks <<< "${2:-$repo/target/bootvm/debian/debian.vmdk}"
for d in "${disks[@]}"; do
    [ -f "$d" ] || { echo "bench-inspect.sh: $d is missing (the default is built by tests/nested/boot-check.sh)" >&2; exit 1; }
done
(cd "$repo" && cargo build --release --locked -p vmshift >/dev/null)
bin=$repo/target/release/vmshift
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
measure() { # name, command...: median wall seconds (microsecond clock) and peak RSS
    local name=$1; shift
    for i in $(seq 1 "$runs"); do
        local t0=$EPOCHREALTIME
        /usr/bin/time -f "%M" -o "$out/$name.rss.$i" "$@" >/dev/null 2>&1
        local t1=$EPOCHREALTIME
        echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }') $(cat "$out/$name.rss.$i")" > "$out/$name.$i"
    done
    sort -n "$out"/"$name".[0-9]* | awk -v n="$runs" '{t[NR]=$1; m[NR]=$2} END {print t[int((n+1)/2)], m[int((n+1)/2)]}'
}
vi_args=()
for d in "${disks[@]}"; do
    vi_args+=("--format=$(qemu-img info --output json "$d" | python3 -c 'import json, sys; print(json.load(sys.stdin)["format"])')" -a "$d")
done
read -r v_t v_m < <(measure vmshift "$bin" guest inspect --output json "${disks[@]}")
read -r g_t g_m < <(LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg measure virt-inspector virt-inspector --no-applications "${vi_args[@]}")
# The same guest, its first disk 100 GiB.
qemu-img convert -O qcow2 "${disks[0]}" "$out/big.qcow2"
qemu-img resize -q "$out/big.qcow2" 100G
read -r b_t b_m < <(measure vmshift-100g "$bin" guest inspect --output json "$out/big.qcow2" "${disks[@]:1}")
echo "disks: ${disks[*]} ($runs runs each, medians)"
printf '%-24s %10s %12s\n' tool seconds "peak RSS KiB"
printf '%-24s %10s %12s\n' vmshift "$v_t" "$v_m" virt-inspector "$g_t" "$g_m" "vmshift (first disk 100G)" "$b_t" "$b_m"
awk -v a="$g_t" -v b="$v_t" 'BEGIN { printf "ratio: vmshift is %.0fx faster\n", a / b }'
