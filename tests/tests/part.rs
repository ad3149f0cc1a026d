//! Partition tables made by sfdisk, sgdisk and fdisk, read by vmshift and
//! compared with what sfdisk reads from them; damaged tables reported.

use std::path::Path;

use vmshift_tests::{gpt_4096_disk, json, sfdisk, sparse_disk, tool_ok, vmshift, vmshift_ok};

fn part_json(dir: &Path, image: &str) -> serde_json::Value {
    json(vmshift_ok(dir, &["part", "--output", "json", image]).as_bytes())
}

/// vmshift's partitions agree with `sfdisk -J`: start, size, type, and for
/// GPT the partition GUID and name.
fn assert_agrees_with_sfdisk(dir: &Path, image: &str) {
    let theirs = json(&tool_ok(dir, "sfdisk", &["-J", image]).stdout);
    let theirs = &theirs["partitiontable"];
    let ours = part_json(dir, image);
    let ss = theirs["sectorsize"].as_u64().unwrap();
    let tp = theirs["partitions"].as_array().unwrap();
    let op = ours["partitions"].as_array().unwrap();
    assert_eq!(op.len(), tp.len(), "{ours}\n{theirs}");
    let gpt = theirs["label"] == "gpt";
    for (o, t) in op.iter().zip(tp) {
        let node = t["node"].as_str().unwrap();
        let number: u64 = node[image.len()..].parse().unwrap();
        assert_eq!(o["number"].as_u64(), Some(number), "{node}");
        assert_eq!(
            o["start"].as_u64(),
            Some(t["start"].as_u64().unwrap() * ss),
            "{node}"
        );
        assert_eq!(
            o["size"].as_u64(),
            Some(t["size"].as_u64().unwrap() * ss),
            "{node}"
        );
        if gpt {
            assert_eq!(o["type-id"], t["type"], "{node}");
            assert_eq!(o["guid"], t["uuid"], "{node}");
            assert_eq!(
                o["label"].as_str().unwrap_or(""),
                t["name"].as_str().unwrap_or(""),
                "{node}"
            );
        } else {
            let ty = u8::from_str_radix(t["type"].as_str().unwrap(), 16).unwrap();
            assert_eq!(o["type-id"], format!("0x{ty:02x}").as_str(), "{node}");
            assert_eq!(
                o["bootable"].as_bool().unwrap_or(false),
                t["bootable"].as_bool().unwrap_or(false)
            );
        }
    }
    assert_eq!(ours["problems"].as_array().unwrap().len(), 0, "{ours}");
}

#[test]
fn gpt_made_by_sgdisk_and_sfdisk_reads_as_sfdisk_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_disk(d, "g.raw", 64 << 20);
    tool_ok(
        d,
        "sgdisk",
        &[
            "-n",
            "1:2048:+8M",
            "-t",
            "1:ef00",
            "-c",
            "1:EFI system",
            "-n",
            "2:0:+20M",
            "-t",
            "2:0700",
            "-c",
            "2:Basic data",
            "-n",
            "3:0:0",
            "-t",
            "3:8300",
            "-c",
            "3:root",
            "g.raw",
        ],
    );
    assert_agrees_with_sfdisk(d, "g.raw");
    let v = part_json(d, "g.raw");
    assert_eq!(v["kind"], "gpt");
    assert_eq!(v["partitions"][0]["type-name"], "EFI System");
    assert_eq!(v["gpt"]["backup-at-end"], true);
    // The same disk inside a qcow2 reads the same.
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "g.qcow2"],
    );
    assert_eq!(part_json(d, "g.qcow2"), v);
    // info lists the partitions too.
    let info = json(vmshift_ok(d, &["info", "--output", "json", "g.qcow2"]).as_bytes());
    assert_eq!(info["partitions"], v);
    assert!(vmshift_ok(d, &["info", "g.qcow2"]).contains("EFI System"));
}

#[test]
fn mbr_with_logical_partitions_reads_as_sfdisk_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_disk(d, "m.raw", 64 << 20);
    sfdisk(
        d,
        "m.raw",
        "label: dos\n,8M,83,*\n,,5\n,4M,82\n,8M,83\n,,8e\n",
    );
    assert_agrees_with_sfdisk(d, "m.raw");
    let v = part_json(d, "m.raw");
    let numbers: Vec<u64> = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 5, 6, 7]);
}

#[test]
fn gpt_with_4096_byte_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_4096_disk(d, "s4.raw");
    let listing =
        String::from_utf8(tool_ok(d, "fdisk", &["-b", "4096", "-l", "s4.raw"]).stdout).unwrap();
    let v = part_json(d, "s4.raw");
    assert_eq!(v["gpt"]["sector-size"], 4096);
    for p in v["partitions"].as_array().unwrap() {
        let (start, end) = (
            p["start"].as_u64().unwrap() / 4096,
            p["end"].as_u64().unwrap() / 4096 - 1,
        );
        let row = format!("s4.raw{}", p["number"]);
        let line = listing.lines().find(|l| l.starts_with(&row)).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            (f[1], f[2]),
            (start.to_string().as_str(), end.to_string().as_str()),
            "{line}"
        );
    }
}

#[test]
fn damaged_tables_are_reported_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_disk(d, "g.raw", 32 << 20);
    tool_ok(d, "sgdisk", &["-n", "1:2048:+8M", "-n", "2:0:0", "g.raw"]);
    let pristine = std::fs::read(d.join("g.raw")).unwrap();
    let patched = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = pristine.clone();
        f(&mut b);
        std::fs::write(d.join(name), b).unwrap();
    };
    // A wrong primary header CRC: read from the backup, reported, exit 2.
    patched("crc.raw", &|b| b[512 + 16] ^= 0xff);
    let out = vmshift(d, &["part", "crc.raw"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("primary GPT") && text.contains("CRC32"),
        "{text}"
    );
    assert!(
        text.contains("Linux filesystem") || text.contains("0FC63DAF"),
        "{text}"
    );
    // Both copies gone: an error naming the header.
    patched("both.raw", &|b| {
        b[512 + 16] ^= 0xff;
        let end = b.len() - 512;
        b[end + 16] ^= 0xff;
    });
    let out = vmshift(d, &["part", "both.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("both GPT copies are damaged"));
    // A grown disk: the backup header is no longer at the end.
    std::fs::write(d.join("grown.raw"), &pristine).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("grown.raw"))
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let out = vmshift(d, &["part", "grown.raw"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not at the end of the disk"));
    // An MBR whose extended chain loops.
    sparse_disk(d, "loop.raw", 16 << 20);
    sfdisk(d, "loop.raw", "label: dos\n,4M,83\n,,5\n,2M,83\n,2M,83\n");
    let mut b = std::fs::read(d.join("loop.raw")).unwrap();
    // The first EBR (at the extended partition's start) points back at itself.
    let ext_lba =
        u32::from_le_bytes(b[0x1be + 16 + 8..0x1be + 16 + 12].try_into().unwrap()) as usize;
    let ebr = ext_lba * 512;
    b[ebr + 0x1be + 16 + 8..ebr + 0x1be + 16 + 12].copy_from_slice(&0u32.to_le_bytes());
    b[ebr + 0x1be + 16 + 4] = 0x05;
    b[ebr + 0x1be + 16 + 12..ebr + 0x1be + 16 + 16].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(d.join("loop.raw"), b).unwrap();
    let out = vmshift(d, &["part", "loop.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loops"),
        "{out:?}"
    );
    // Overlapping MBR partitions.
    sparse_disk(d, "ov.raw", 16 << 20);
    sfdisk(d, "ov.raw", "label: dos\n2048,8192,83\n10240,8192,83\n");
    // sfdisk refuses overlaps; move the second partition's start by hand.
    let mut b = std::fs::read(d.join("ov.raw")).unwrap();
    b[0x1be + 16 + 8..0x1be + 16 + 12].copy_from_slice(&4096u32.to_le_bytes());
    std::fs::write(d.join("ov.raw"), b).unwrap();
    let out = vmshift(d, &["part", "ov.raw"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("overlap"));
    // No table at all.
    sparse_disk(d, "blank.raw", 1 << 20);
    assert!(vmshift_ok(d, &["part", "blank.raw"]).contains("no partition table"));
}

/// An MBR disk whose extended partition holds `n` logical partitions of
/// 2047 sectors, one extended boot record every 2048 sectors (built here:
/// sfdisk makes at most 60).
fn mbr_with_logicals(path: &Path, n: u32) {
    const STEP: u32 = 2048;
    const EXT: u32 = 2048;
    let mut b = vec![0u8; ((EXT + n * STEP) * 512) as usize];
    let entry = |b: &mut [u8], at: usize, kind: u8, start: u32, count: u32| {
        b[at + 4] = kind;
        b[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        b[at + 12..at + 16].copy_from_slice(&count.to_le_bytes());
    };
    entry(&mut b, 446, 0x05, EXT, n * STEP);
    b[510..512].copy_from_slice(&[0x55, 0xaa]);
    for k in 0..n {
        let ebr = ((EXT + k * STEP) * 512) as usize;
        entry(&mut b, ebr + 446, 0x83, 1, STEP - 1);
        if k + 1 < n {
            // The next record, relative to the extended partition.
            entry(&mut b, ebr + 462, 0x05, (k + 1) * STEP, STEP);
        }
        b[ebr + 510..ebr + 512].copy_from_slice(&[0x55, 0xaa]);
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn mbr_of_128_logical_partitions_reads_as_partx_and_129_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mbr_with_logicals(&d.join("at.raw"), 128);
    // partx (libblkid) reads every logical partition (sfdisk stops at 60).
    let theirs = tool_ok(
        d,
        "partx",
        &["-s", "-g", "-b", "-o", "NR,START,SECTORS", "at.raw"],
    );
    let theirs: Vec<(u64, u64, u64)> = String::from_utf8_lossy(&theirs.stdout)
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (f[0], f[1] * 512, f[2] * 512)
        })
        .filter(|(n, _, _)| *n >= 5)
        .collect();
    let ours: Vec<(u64, u64, u64)> = part_json(d, "at.raw")["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let n = |k: &str| p[k].as_u64().unwrap();
            (n("number"), n("start"), n("size"))
        })
        .filter(|(n, _, _)| *n >= 5)
        .collect();
    assert_eq!(ours.len(), 128);
    assert_eq!(ours, theirs);
    mbr_with_logicals(&d.join("past.raw"), 129);
    let out = vmshift(d, &["part", "past.raw"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("more than 128 logical partitions"), "{e}");
}
