#!/usr/bin/env python3
"""Writes an empty Windows registry hive (regf), from the format
description: a base block with its checksum and one 4096-byte hive bin
holding the root key and the security cell hivex copies to the keys it
adds. hivexsh -w then fills it (tests/guests/windows.sh).

Usage: mkhive.py FILE
"""
import struct
import sys

NK_FIXED = 0x4C


def cell(payload):
    size = (len(payload) + 4 + 7) // 8 * 8
    return struct.pack("<i", -size) + payload + b"\0" * (size - 4 - len(payload))


def main(path):
    name = b"ROOT"
    nk_cell = (NK_FIXED + len(name) + 4 + 7) // 8 * 8
    sk_off = 0x20 + nk_cell
    nk = bytearray(NK_FIXED)
    nk[0:2] = b"nk"
    struct.pack_into("<H", nk, 0x02, 0x2C)  # hive entry, no delete, compressed name
    for field in (0x1C, 0x20, 0x28, 0x30):  # no subkey lists, no values, no class
        struct.pack_into("<I", nk, field, 0xFFFFFFFF)
    struct.pack_into("<I", nk, 0x2C, sk_off)
    struct.pack_into("<H", nk, 0x48, len(name))
    nk += name
    # A self-relative security descriptor without owner, group or ACLs.
    sd = bytes([1, 0, 0x00, 0x80]) + bytes(16)
    sk = b"sk\0\0" + struct.pack("<IIII", sk_off, sk_off, 1, len(sd)) + sd
    hbin = bytearray(b"hbin" + struct.pack("<II", 0, 4096) + bytes(20))
    hbin += cell(bytes(nk))
    hbin += cell(sk)
    free = 4096 - len(hbin)
    hbin += struct.pack("<i", free) + bytes(free - 4)
    base = bytearray(4096)
    base[0:4] = b"regf"
    for at, v in ((0x04, 1), (0x08, 1), (0x14, 1), (0x18, 5), (0x1C, 0),
                  (0x20, 1), (0x24, 0x20), (0x28, len(hbin)), (0x2C, 1)):
        struct.pack_into("<I", base, at, v)
    csum = 0
    for i in range(127):
        csum ^= struct.unpack_from("<I", base, i * 4)[0]
    struct.pack_into("<I", base, 0x1FC, csum)
    with open(path, "wb") as f:
        f.write(bytes(base) + bytes(hbin))


if __name__ == "__main__":
    main(sys.argv[1])
