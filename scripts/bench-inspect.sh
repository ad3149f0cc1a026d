#!/usr/bin/env bash
# `vmshift guest inspect` against `virt-inspector` on the same guest, side
# by side in one run: the Debian bookworm disk tests/nested builds
# (target/bootvm/debian/debian.vmdk, a debootstrap'd system with a kernel
# and initramfs), RUNS times each; wall time and peak RSS from
# /usr/bin/time, and the ratio of the medians. virt-inspector boots its
# appliance under TCG here (LIBGUESTFS_BACKEND_SETTINGS=force_tcg: this
# machine's /dev/kvm cannot run it), which is most of its time; vmshift
# reads only the metadata and the few files it needs.
#
# Usage: scripts/bench-inspect.sh [RUNS] [DISK]     (default 3, the bootvm disk)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3}
disk=${2:-$repo/target/bootvm/debian/debian.vmdk}
[ -f "$disk" ] || { echo "bench-inspect.sh: $disk is missing: run tests/nested/boot-check.sh once (it builds it)" >&2; exit 1; }
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
read -r v_t v_m < <(measure vmshift "$bin" guest inspect --output json "$disk")
read -r g_t g_m < <(LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg measure virt-inspector virt-inspector --format=vmdk -a "$disk")
echo "disk: $disk ($runs runs each, medians)"
printf '%-16s %10s %12s\n' tool seconds "peak RSS KiB"
printf '%-16s %10s %12s\n' vmshift "$v_t" "$v_m" virt-inspector "$g_t" "$g_m"
awk -v a="$g_t" -v b="$v_t" 'BEGIN { printf "ratio: vmshift is %.0fx faster\n", a / b }'
