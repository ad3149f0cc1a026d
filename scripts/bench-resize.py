#!/usr/bin/env python3
"""Times `vmshift resize` against `qemu-img resize` growing 100 GiB images
by 100 GiB (metadata only, then qcow2 with metadata preallocation), median
of 15 runs each (5 for preallocation), in a scratch folder.

    cargo build --release -p vmshift && scripts/bench-resize.py [DIR]
"""
import os, statistics, subprocess, sys, tempfile, time

V = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../target/release/vmshift")
work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
os.chdir(work)


def run(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def fresh(f):
    if os.path.exists(f):
        os.remove(f)


def qcow2(f):
    fresh(f)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f, "100G"], check=True)


def raw(f):
    fresh(f)
    open(f, "wb").truncate(100 << 30)


def raw_gpt(f):
    raw(f)
    subprocess.run(["sgdisk", "-n", "1:2048:0", f], check=True, stdout=subprocess.DEVNULL)


def qcow2_gpt(f):
    if not os.path.exists("gpt.qcow2"):
        raw_gpt("gpt.raw")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", "gpt.raw", "gpt.qcow2"], check=True)
        fresh("gpt.raw")
    fresh(f)
    subprocess.run(["cp", "gpt.qcow2", f], check=True)


def bench(label, prep, fmt, n=15, extra=()):
    ours, theirs = [], []
    for _ in range(n):
        prep("v.img")
        ours.append(run([V, "resize", *extra, "-f", fmt, "v.img", "+100G"]))
        prep("q.img")
        theirs.append(run(["qemu-img", "resize", "-q", *extra, "-f", fmt, "q.img", "+100G"]))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"| {label} | {a * 1000:.1f} | {b * 1000:.1f} | {b / a:.2f} |")


print("| grow by 100 GiB | vmshift ms | qemu-img ms | ratio |")
print("|---|---|---|---|")
bench("qcow2 100 GiB", qcow2, "qcow2")
bench("raw 100 GiB", raw, "raw")
bench("raw 100 GiB with a GPT (vmshift also moves the GPT)", raw_gpt, "raw")
bench("qcow2 100 GiB with a GPT (vmshift also moves the GPT)", qcow2_gpt, "qcow2")
bench("qcow2 100 GiB, --preallocation=metadata", qcow2, "qcow2", 5, ["--preallocation=metadata"])


def bench_vmdk(label, n=15):
    """qemu-img cannot resize a VMDK ("Image format driver does not support
    resize"), so only vmshift is timed; qemu-img's answer is checked."""
    ours = []
    for _ in range(n):
        fresh("v.vmdk")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "v.vmdk", "100G"], check=True)
        ours.append(run([V, "resize", "v.vmdk", "+100G"]))
    refused = subprocess.run(["qemu-img", "resize", "-q", "-f", "vmdk", "v.vmdk", "+100G"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0
    a = statistics.median(ours)
    print(f"| {label} | {a * 1000:.1f} | {'not supported' if refused else '?'} | – |")
    fresh("v.vmdk")


bench_vmdk("monolithicSparse VMDK 100 GiB")
for f in ("v.img", "q.img", "gpt.qcow2"):
    fresh(f)
