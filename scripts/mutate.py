#!/usr/bin/env python3
"""Black-box mutation run: the vmshift binary on mutated inputs, as a user
would run it, counting panics, crashes, hangs and out-of-memory aborts.

    scripts/mutate.py [--bin target/release/vmshift] [--per-family 20000]
                      [--jobs 2] [--families qcow2,vmdk,raw,descriptors,guest]

Seeds are the `seed-*` inputs scripts/fuzz.sh puts in fuzz/corpus (run it
once first, e.g. `scripts/fuzz.sh 1`). Each input gets 1 to 16 mutations
(bytes flipped or set to edge values, 32/64-bit fields set to edge values,
blocks copied over others, truncation), most of them in its first 64 KiB
where the headers and tables are. Each run has 10 s and 4 GiB of address
space; a panic (exit 101 or "panicked" on stderr), a signal, a timeout or
an allocation failure is a failure, and its input is kept in --keep. The
last lines say the counts per family (MUTATE-RESULT lines).
"""
import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
EDGE8 = [0, 1, 0x7F, 0x80, 0xFF]
EDGE32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x200, 0x10000]
EDGE64 = [0, 1, 1 << 63, (1 << 64) - 1, 1 << 40, 0x200]


def seeds(target):
    d = os.path.join(CORPUS, target)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.startswith("seed-"):
            with open(os.path.join(d, name), "rb") as f:
                out.append(f.read())
    return out


def family_seeds():
    fams = {"qcow2": [], "vmdk": [], "raw": [], "descriptors": [], "guest": []}
    for b in seeds("image"):
        if b[:4] == b"QFI\xfb":
            fams["qcow2"].append((b, ".qcow2"))
        elif b[:4] in (b"KDMV", b"COWD") or b[:21] == b"# Disk DescriptorFile":
            fams["vmdk"].append((b, ".vmdk"))
        else:
            fams["raw"].append((b, ".raw"))
    for b in seeds("descriptors"):
        head = b[:4096]
        if b"SHA256(" in head or b"SHA1(" in head:
            continue  # an OVA manifest: vm commands read it with its OVF
        if b"<domain" in head:
            ext = ".xml"
        elif b"Envelope" in head:
            ext = ".ovf"
        elif b'= "' in head:
            ext = ".vmx"
        else:
            ext = ".conf"
        fams["descriptors"].append((b, ext))
    for b in seeds("guest_fs"):
        fams["guest"].append((b, ".img"))
    return fams


def mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        if not b:
            b = bytearray(rng.randbytes(rng.randint(1, 512)))
            continue
        hot = min(len(b), 65536)
        at = rng.randrange(hot) if rng.random() < 0.8 else rng.randrange(len(b))
        op = rng.randrange(6)
        if op == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[at] = rng.choice(EDGE8)
        elif op == 2 and at + 4 <= len(b):
            v = rng.choice(EDGE32).to_bytes(4, rng.choice(["little", "big"]))
            b[at:at + 4] = v
        elif op == 3 and at + 8 <= len(b):
            v = rng.choice(EDGE64).to_bytes(8, rng.choice(["little", "big"]))
            b[at:at + 8] = v
        elif op == 4:
            src = rng.randrange(len(b))
            n = rng.randint(1, 512)
            chunk = b[src:src + n]
            b[at:at + len(chunk)] = chunk
        else:
            if rng.random() < 0.3:
                del b[rng.randrange(len(b)):]
            else:
                b[at] = rng.randrange(256)
    return bytes(b)


def commands(fam, path):
    if fam in ("qcow2", "vmdk", "raw"):
        return [["info", "--output", "json", path], ["map", "--output", "json", path],
                ["check", path], ["part", path]]
    if fam == "descriptors":
        return [["vm", "inspect", path], ["vm", "validate", path]]
    return [["guest", "filesystems", path], ["guest", "inspect", path], ["guest", "ls", path, "/"]]


def limit():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run_one(binary, fam, i, data, ext, keep):
    with tempfile.TemporaryDirectory(prefix="vmshift-mut-") as d:
        path = os.path.join(d, "input" + ext)
        with open(path, "wb") as f:
            f.write(data)
        cmds = commands(fam, path)
        cmd = cmds[i % len(cmds)]
        try:
            p = subprocess.run([binary] + cmd, cwd=d, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=10, preexec_fn=limit)
            err = p.stderr.decode("utf-8", "replace")
            if p.returncode == 101 or "panicked" in err:
                kind = "panic"
            elif "memory allocation" in err:
                kind = "oom"
            elif p.returncode < 0:
                kind = "crash"
            else:
                return None
        except subprocess.TimeoutExpired:
            kind = "hang"
            err = ""
        name = os.path.join(keep, f"{fam}-{kind}-{i}{ext}")
        with open(name, "wb") as f:
            f.write(data)
        shown = " ".join(os.path.basename(c) if c == path else c for c in cmd)
        return (kind, shown, name, err[-500:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "vmshift"))
    ap.add_argument("--per-family", type=int, default=20000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--families", default="qcow2,vmdk,raw,descriptors,guest")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", default=os.path.join(ROOT, "fuzz", "artifacts", "mutate"))
    a = ap.parse_args()
    a.bin = os.path.abspath(a.bin)
    os.makedirs(a.keep, exist_ok=True)
    fams = family_seeds()
    status = 0
    for fam in a.families.split(","):
        pool = fams.get(fam) or []
        if not pool:
            print(f"mutate.py: no seeds for {fam}: run scripts/fuzz.sh 1 first", file=sys.stderr)
            return 2
        rng = random.Random(f"{a.seed}-{fam}")
        counts = {"panic": 0, "crash": 0, "hang": 0, "oom": 0}
        # In batches: a guest seed is a megabyte, 20,000 of them at once
        # would not fit in memory.
        batch = 64
        with ThreadPoolExecutor(a.jobs) as ex:
            for first in range(0, a.per_family, batch):
                inputs = []
                for i in range(first, min(first + batch, a.per_family)):
                    data, ext = rng.choice(pool)
                    inputs.append((i, mutate(rng, data), ext))
                for r in ex.map(lambda t: run_one(a.bin, fam, t[0], t[1], t[2], a.keep), inputs):
                    if r:
                        counts[r[0]] += 1
                        print(f"MUTATE-FAILURE {fam} {r[0]}: vmshift {r[1]} (kept as {r[2]})\n{r[3]}", flush=True)
        bad = sum(counts.values())
        status |= bad > 0
        print(f"MUTATE-RESULT {fam} inputs={a.per_family} seeds={len(pool)} "
              + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
