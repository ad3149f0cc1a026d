#!/usr/bin/env bash
# Times vmshift and qemu-img side by side on the same files and prints a
# Markdown table for BENCHMARKS.md: median wall time of $RUNS runs (page
# cache warm: every input is read once before timing), peak RSS, and the
# ratio vmshift / qemu-img (below 1.0: vmshift is faster). qemu-img convert
# does not sync its output by default (cache mode unsafe); vmshift always
# does (its output is atomic and durable), so qemu-img also runs with
# -t writeback, which syncs at the end, for a like-for-like column.
#
#   scripts/bench.sh [WORKDIR]     (default WORKDIR: /tmp/vmshift-bench, ~8 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
work=${1:-/tmp/vmshift-bench}
mkdir -p "$work"
cargo build --quiet --release -p vmshift
vmshift=$PWD/target/release/vmshift

# Inputs: 1 GiB of real file data (binaries, libraries, text from /usr),
# and a 2 GiB sparse disk holding 8 x 64 MiB of that data.
if [ ! -f "$work/dense.raw" ]; then
    find /usr/lib /usr/share /usr/bin -type f -size +4k 2>/dev/null | sort | head -n 200000 |
        xargs cat 2>/dev/null | head -c 1073741824 > "$work/dense.raw" || true
    truncate -s 1G "$work/dense.raw"
fi
if [ ! -f "$work/sparse.raw" ]; then
    truncate -s 2G "$work/sparse.raw"
    for i in 0 1 2 3 4 5 6 7; do
        dd if="$work/dense.raw" of="$work/sparse.raw" bs=64M count=1 skip="$i" seek=$((i * 4)) conv=notrunc,sparse status=none
    done
fi
for set in dense sparse; do
    [ -f "$work/$set.so.vmdk" ] || qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$work/$set.raw" "$work/$set.so.vmdk"
    [ -f "$work/$set.ms.vmdk" ] || qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$work/$set.raw" "$work/$set.ms.vmdk"
    [ -f "$work/$set.qcow2" ] || qemu-img convert -f raw -O qcow2 "$work/$set.raw" "$work/$set.qcow2"
    [ -f "$work/$set.zlib.qcow2" ] || qemu-img convert -f raw -O qcow2 -c "$work/$set.raw" "$work/$set.zlib.qcow2"
    [ -f "$work/$set.zstd.qcow2" ] || qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$work/$set.raw" "$work/$set.zstd.qcow2"
done

# median wall seconds and max peak RSS (KiB) of RUNS runs of a command; the
# last run's output is left in place. Dirty pages of earlier runs are
# flushed first (sync) so they do not slow the run being timed.
measure() {
    local out=$1; shift
    local times=() rss=0
    for _ in $(seq "$RUNS"); do
        rm -f "$out"
        sync
        /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" >/dev/null 2>&1
        local r
        r=$(tail -n1 "$work/time.txt")
        times+=("${r% *}")
        [ "${r#* }" -gt "$rss" ] && rss=${r#* }
    done
    local med
    med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
    echo "$med $rss"
}

row() { # name src srcfmt dstfmt [extra args...]
    local name=$1 src=$2 sf=$3 df=$4; shift 4
    cat "$work/$src" >/dev/null # warm the cache
    local q w v
    q=$(measure "$work/out.q" qemu-img convert -f "$sf" -O "$df" "$@" "$work/$src" "$work/out.q")
    w=$(measure "$work/out.q" qemu-img convert -t writeback -f "$sf" -O "$df" "$@" "$work/$src" "$work/out.q")
    v=$(measure "$work/out.v" "$vmshift" convert -f "$sf" -O "$df" "$@" "$work/$src" "$work/out.v")
    qemu-img compare -q "$work/out.q" "$work/out.v"
    local qs vs
    qs=$(du -k "$work/out.q" | cut -f1)
    vs=$(du -k "$work/out.v" | cut -f1)
    rm -f "$work/out.q" "$work/out.v"
    awk -v n="$name" -v qt="${q% *}" -v wt="${w% *}" -v qm="${q#* }" -v vt="${v% *}" -v vm="${v#* }" -v qs="$qs" -v vs="$vs" \
        'BEGIN { printf "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f | %.0f | %.0f |\n", n, qt, wt, vt, (qt > 0 ? vt / qt : 0), (wt > 0 ? vt / wt : 0), qm / 1024, vm / 1024, qs / 1024, vs / 1024 }'
}

echo "qemu-img: $(qemu-img --version | head -n1); vmshift: $($vmshift --version); $(nproc) cores; page cache warm; median of $RUNS runs"
echo
echo "| conversion | qemu-img s | qemu-img -t writeback s | vmshift s | ratio | ratio vs writeback | qemu-img MiB RSS | vmshift MiB RSS | qemu-img out MiB | vmshift out MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
SECTIONS=${SECTIONS:-qcow2 vmdk}
for set in dense sparse; do
    if [[ " $SECTIONS " == *" qcow2 "* ]]; then
        row "$set raw → qcow2" "$set.raw" raw qcow2
        row "$set qcow2 → raw" "$set.qcow2" qcow2 raw
        row "$set zlib-qcow2 → raw" "$set.zlib.qcow2" qcow2 raw
        row "$set zstd-qcow2 → raw" "$set.zstd.qcow2" qcow2 raw
        row "$set raw → zlib-qcow2 (-c)" "$set.raw" raw qcow2 -c
        row "$set raw → zstd-qcow2 (-c)" "$set.raw" raw qcow2 -c -o compression_type=zstd
    fi
    if [[ " $SECTIONS " == *" vmdk "* ]]; then
        row "$set streamOptimized → raw" "$set.so.vmdk" vmdk raw
        row "$set streamOptimized → qcow2" "$set.so.vmdk" vmdk qcow2
        row "$set monolithicSparse → qcow2" "$set.ms.vmdk" vmdk qcow2
        row "$set raw → streamOptimized" "$set.raw" raw vmdk -o subformat=streamOptimized
    fi
done
