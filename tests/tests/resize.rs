//! `vmshift resize` against `qemu-img resize`, sgdisk and sfdisk; killed
//! at many points, an image is always the old one or the new one.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use vmshift_tests::{
    gpt_4096_disk, json, patterned_raw, sfdisk, sparse_disk, tool, tool_ok, vmshift, vmshift_bin,
    vmshift_ok,
};

/// A sparse raw disk of `size` bytes partitioned by `sgdisk args`.
fn gpt_disk(d: &Path, name: &str, size: u64, args: &[&str]) {
    sparse_disk(d, name, size);
    let mut a = args.to_vec();
    a.push(name);
    tool_ok(d, "sgdisk", &a);
}

fn copy(dir: &Path, a: &str, b: &str) {
    std::fs::copy(dir.join(a), dir.join(b)).unwrap();
}

#[test]
fn raw_and_qcow2_grow_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 32 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "a.raw", "a.qcow2"],
    );
    for (img, fmt) in [("a.raw", "raw"), ("a.qcow2", "qcow2")] {
        let theirs = format!("q-{img}");
        copy(d, img, &theirs);
        tool_ok(d, "qemu-img", &["resize", "-f", fmt, &theirs, "+1G"]);
        vmshift_ok(d, &["resize", img, "+1G"]);
        tool_ok(d, "qemu-img", &["compare", img, &theirs]);
        let size = |f: &str| {
            json(&tool_ok(d, "qemu-img", &["info", "--output", "json", f]).stdout)["virtual-size"]
                .clone()
        };
        assert_eq!(size(img), size(&theirs));
        if fmt == "qcow2" {
            tool_ok(d, "qemu-img", &["check", img]);
        }
    }
    // A qcow2 grown by 100 GiB: metadata only.
    vmshift_ok(d, &["resize", "a.qcow2", "+100G"]);
    tool_ok(d, "qemu-img", &["check", "a.qcow2"]);
    assert!(std::fs::metadata(d.join("a.qcow2")).unwrap().len() < 8 << 20);
}

#[test]
fn raw_shrink_needs_shrink_and_refuses_data_beyond_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 16 << 20);
    let out = vmshift(d, &["resize", "a.raw", "-1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shrink"));
    // patterned_raw writes data near the end: refused, nothing changed.
    let before = std::fs::read(d.join("a.raw")).unwrap();
    let out = vmshift(d, &["resize", "--shrink", "a.raw", "8M"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(d.join("a.raw")).unwrap(), before);
    copy(d, "a.raw", "q.raw");
    tool_ok(
        d,
        "qemu-img",
        &["resize", "-f", "raw", "--shrink", "q.raw", "8M"],
    );
    vmshift_ok(d, &["resize", "--shrink", "--force", "a.raw", "8M"]);
    tool_ok(d, "cmp", &["a.raw", "q.raw"]);
}

/// The bytes of `a` and `b` agree outside the first `head` and the last
/// `tail` bytes.
fn agree_outside(d: &Path, a: &str, b: &str, head: usize, tail: usize) {
    let (x, y) = (
        std::fs::read(d.join(a)).unwrap(),
        std::fs::read(d.join(b)).unwrap(),
    );
    assert_eq!(x.len(), y.len());
    assert!(
        x[head..x.len() - tail] == y[head..y.len() - tail],
        "{a} and {b} differ in the middle"
    );
}

#[test]
fn gpt_moves_to_the_new_end_and_the_last_partition_grows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(
        d,
        "g.raw",
        64 << 20,
        &["-n", "1:2048:+8M", "-t", "1:ef00", "-n", "2:0:0"],
    );
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 20M 1M", "g.raw"],
    );
    copy(d, "g.raw", "q.raw");
    copy(d, "g.raw", "n.raw");
    tool_ok(d, "qemu-img", &["resize", "-f", "raw", "q.raw", "+64M"]);
    // Without the fix: exactly what qemu-img does.
    vmshift_ok(d, &["resize", "--no-fix-gpt", "n.raw", "+64M"]);
    tool_ok(d, "cmp", &["n.raw", "q.raw"]);
    // With it: a valid GPT at the new end, every other byte as qemu-img's.
    let out = vmshift_ok(d, &["resize", "g.raw", "+64M"]);
    assert!(out.contains("backup header"), "{out}");
    let v = String::from_utf8(tool_ok(d, "sgdisk", &["-v", "g.raw"]).stdout).unwrap();
    assert!(v.contains("No problems found"), "{v}");
    agree_outside(d, "g.raw", "q.raw", 34 * 512, 33 * 512);
    // And growing the last partition.
    vmshift_ok(d, &["resize", "--grow-partition", "2", "g.raw", "+16M"]);
    let v = String::from_utf8(tool_ok(d, "sgdisk", &["-v", "g.raw"]).stdout).unwrap();
    assert!(v.contains("No problems found"), "{v}");
    let dump = json(&tool_ok(d, "sfdisk", &["-J", "g.raw"]).stdout);
    let p2 = &dump["partitiontable"]["partitions"][1];
    let last_lba = (144u64 << 20) / 512 - 1;
    assert_eq!(
        p2["start"].as_u64().unwrap() + p2["size"].as_u64().unwrap() - 1,
        last_lba - 33
    );
    // Only the partition that ends last may grow.
    let out = vmshift(d, &["resize", "--grow-partition", "1", "g.raw", "+1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("partition 2 ends last"));
}

#[test]
fn gpt_with_4096_byte_sectors_moves_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_4096_disk(d, "s4.raw");
    vmshift_ok(d, &["resize", "--grow-partition", "2", "s4.raw", "+32M"]);
    let out = tool(d, "fdisk", &["-b", "4096", "-l", "s4.raw"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("corrupt") && !text.contains("mismatch"),
        "{text}"
    );
    let v = json(vmshift_ok(d, &["part", "--output", "json", "s4.raw"]).as_bytes());
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["gpt"]["backup-at-end"], true);
    assert_eq!(
        v["partitions"][1]["end"].as_u64().unwrap(),
        (96u64 << 20) - 5 * 4096
    );
}

#[test]
fn mbr_primary_and_logical_partitions_grow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_disk(d, "p.raw", 32 << 20);
    sfdisk(d, "p.raw", "label: dos\n,8M,83\n,,83\n");
    vmshift_ok(d, &["resize", "--grow-partition", "2", "p.raw", "+32M"]);
    let dump = json(&tool_ok(d, "sfdisk", &["-J", "p.raw"]).stdout);
    let p = &dump["partitiontable"]["partitions"][1];
    assert_eq!(
        p["start"].as_u64().unwrap() + p["size"].as_u64().unwrap(),
        (64u64 << 20) / 512
    );
    sparse_disk(d, "l.raw", 32 << 20);
    sfdisk(d, "l.raw", "label: dos\n,8M,83\n,,5\n,4M,83\n,,83\n");
    vmshift_ok(d, &["resize", "--grow-partition", "6", "l.raw", "+32M"]);
    let dump = json(&tool_ok(d, "sfdisk", &["-J", "l.raw"]).stdout);
    let parts = dump["partitiontable"]["partitions"].as_array().unwrap();
    let end = |p: &serde_json::Value| p["start"].as_u64().unwrap() + p["size"].as_u64().unwrap();
    assert_eq!(
        end(&parts[1]),
        (64u64 << 20) / 512,
        "the extended container"
    );
    assert_eq!(
        end(parts.last().unwrap()),
        (64u64 << 20) / 512,
        "partition 6"
    );
    // The first EBR's link entry (relative to the container) spans the
    // second EBR and partition 6, up to the new end.
    let b = std::fs::read(d.join("l.raw")).unwrap();
    let u32_at = |o: usize| u64::from(u32::from_le_bytes(b[o..o + 4].try_into().unwrap()));
    let ext = parts[1]["start"].as_u64().unwrap();
    let link = (ext * 512) as usize + 0x1be + 16;
    let (rel, size) = (u32_at(link + 8), u32_at(link + 12));
    assert_eq!(ext + rel + size, (64u64 << 20) / 512, "the link entry");
}

/// Runs a resize slowed down between its steps and kills it after `ms`.
fn killed_resize(d: &Path, args: &[&str], ms: u64) {
    let mut child = std::process::Command::new(vmshift_bin())
        .args(args)
        .current_dir(d)
        .env("VMSHIFT_RESIZE_STEP_DELAY_MS", "60")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn killed_anywhere_a_resize_leaves_the_old_or_the_new_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g0.raw", 32 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    patterned_raw(&d.join("q0.raw"), 8 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "q0.raw", "q0.qcow2"],
    );
    let old_parts = json(vmshift_ok(d, &["part", "--output", "json", "g0.raw"]).as_bytes())
        ["partitions"]
        .clone();
    copy(d, "g0.raw", "new.raw");
    vmshift_ok(d, &["resize", "--grow-partition", "2", "new.raw", "+32M"]);
    let new_parts = json(vmshift_ok(d, &["part", "--output", "json", "new.raw"]).as_bytes())
        ["partitions"]
        .clone();
    for ms in [0, 20, 40, 70, 100, 130, 160, 200, 260, 400] {
        copy(d, "g0.raw", "g.raw");
        killed_resize(d, &["resize", "--grow-partition", "2", "g.raw", "+32M"], ms);
        let len = std::fs::metadata(d.join("g.raw")).unwrap().len();
        assert!(len == 32 << 20 || len == 64 << 20, "{ms} ms: {len} bytes");
        // The table reads, as the old one or the new one.
        let out = vmshift(d, &["part", "--output", "json", "g.raw"]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(2)),
            "{ms} ms: {out:?}"
        );
        let v = json(&out.stdout);
        let parts = &v["partitions"];
        assert!(*parts == old_parts || *parts == new_parts, "{ms} ms: {v}");

        copy(d, "q0.qcow2", "q.qcow2");
        killed_resize(d, &["resize", "q.qcow2", "+50G"], ms);
        tool_ok(d, "qemu-img", &["check", "q.qcow2"]);
        tool_ok(d, "qemu-img", &["compare", "q0.raw", "q.qcow2"]);
    }
}

#[test]
fn vmdk_subformats_grow_with_their_data_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 20 << 20);
    for (sub, by) in [
        ("monolithicSparse", "+3G"),
        ("monolithicSparse", "+100G"), // the grain directory moves
        ("streamOptimized", "+3G"),
        ("monolithicFlat", "+3G"),
        ("twoGbMaxExtentSparse", "+5G"), // new extents after the old ones
        ("twoGbMaxExtentFlat", "+5G"),
    ] {
        let img = format!("{sub}{by}.vmdk");
        let opt = format!("subformat={sub}");
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "vmdk", "-o", &opt, "a.raw", &img],
        );
        vmshift_ok(d, &["resize", &img, by]);
        copy(d, "a.raw", "want.raw");
        tool_ok(d, "qemu-img", &["resize", "-f", "raw", "want.raw", by]);
        // qemu-img reads the old data and zeros beyond, at the new size.
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "want.raw", &img]);
        tool_ok(d, "qemu-img", &["check", &img]);
        assert_eq!(vmshift(d, &["check", &img]).status.code(), Some(0), "{img}");
        let info = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", &img]).stdout);
        let want = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "want.raw"]).stdout);
        assert_eq!(info["virtual-size"], want["virtual-size"], "{img}");
    }
    // An ESXi pair: the flat file grows, the descriptor follows.
    let esxi = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vms/esxi-db");
    for f in ["esxi-db.vmdk", "esxi-db-flat.vmdk"] {
        std::fs::copy(esxi.join(f), d.join(f)).unwrap();
    }
    vmshift_ok(d, &["resize", "esxi-db.vmdk", "+16M"]);
    let text = std::fs::read_to_string(d.join("esxi-db.vmdk")).unwrap();
    assert!(
        text.contains("RW 65536 VMFS \"esxi-db-flat.vmdk\""),
        "{text}"
    );
    tool_ok(d, "qemu-img", &["check", "esxi-db.vmdk"]);
    assert_eq!(
        std::fs::metadata(d.join("esxi-db-flat.vmdk"))
            .unwrap()
            .len(),
        32 << 20
    );
}

#[test]
fn killed_sparse_vmdk_resize_is_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 8 << 20);
    tool_ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            "a.raw",
            "v0.vmdk",
        ],
    );
    for ms in [0, 20, 50, 80, 110, 150, 300] {
        copy(d, "v0.vmdk", "v.vmdk");
        killed_resize(d, &["resize", "v.vmdk", "+100G"], ms);
        tool_ok(d, "qemu-img", &["check", "v.vmdk"]);
        let size = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "v.vmdk"]).stdout)
            ["virtual-size"]
            .as_u64()
            .unwrap();
        assert!(
            size == 8 << 20 || size == (8 << 20) + (100 << 30),
            "{ms} ms: {size}"
        );
        copy(d, "a.raw", "w.raw");
        tool_ok(
            d,
            "qemu-img",
            &["resize", "-f", "raw", "w.raw", &size.to_string()],
        );
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "w.raw", "v.vmdk"]);
    }
}

#[test]
fn grown_sparse_vmdk_takes_writes_in_its_new_space() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 16 << 20);
    for by in ["+3G", "+100G"] {
        let img = format!("w{by}.vmdk");
        tool_ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=monolithicSparse",
                "a.raw",
                &img,
            ],
        );
        vmshift_ok(d, &["resize", &img, by]);
        // QEMU writes into the new range (it needs a grain table there).
        tool_ok(
            d,
            "qemu-io",
            &["-f", "vmdk", "-c", "write -P 0x44 40M 64k", &img],
        );
        tool_ok(d, "qemu-img", &["check", &img]);
        copy(d, "a.raw", "want.raw");
        tool_ok(d, "qemu-img", &["resize", "-f", "raw", "want.raw", by]);
        tool_ok(
            d,
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x44 40M 64k", "want.raw"],
        );
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "want.raw", &img]);
        assert_eq!(vmshift(d, &["check", &img]).status.code(), Some(0));
    }
}

#[test]
fn refused_resizes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g.raw", 64 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    let before = std::fs::read(d.join("g.raw")).unwrap();
    for args in [
        vec!["resize", "--grow-partition", "1", "g.raw", "+1M"],
        vec!["resize", "--shrink", "g.raw", "-1M"],
        vec!["resize", "--preallocation", "metadata", "g.raw", "+1M"],
        vec!["resize", "g.raw", "+100"],
    ] {
        let out = vmshift(d, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            std::fs::read(d.join("g.raw")).unwrap() == before,
            "{args:?} changed the image"
        );
    }
    // A damaged primary header (a crafted header size) is never trusted.
    let mut b = before.clone();
    b[512 + 12..512 + 16].copy_from_slice(&600u32.to_le_bytes());
    std::fs::write(d.join("h.raw"), &b).unwrap();
    let out = vmshift(d, &["resize", "h.raw", "+1M"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
    // qcow2 with a persistent bitmap: refused, untouched.
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "bm.qcow2", "64M"]);
    tool_ok(d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    let q = std::fs::read(d.join("bm.qcow2")).unwrap();
    let out = vmshift(d, &["resize", "bm.qcow2", "+1G"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bitmap"));
    assert!(std::fs::read(d.join("bm.qcow2")).unwrap() == q);
    tool_ok(d, "qemu-img", &["check", "bm.qcow2"]);
    // An MBR primary partition before an extended container cannot grow.
    sparse_disk(d, "e.raw", 32 << 20);
    sfdisk(d, "e.raw", "label: dos\n,8M,83\n,8M,5\n");
    let out = vmshift(d, &["resize", "--grow-partition", "1", "e.raw", "+32M"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::metadata(d.join("e.raw")).unwrap().len(), 32 << 20);
}

#[test]
fn leftover_and_hybrid_tables_are_respected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A DOS table written over an old GPT: the MBR is the table.
    gpt_disk(d, "l.raw", 32 << 20, &["-n", "1:2048:+8M"]);
    sparse_disk(d, "dos.raw", 32 << 20);
    sfdisk(d, "dos.raw", "label: dos\n,4M,83\n");
    let dos = std::fs::read(d.join("dos.raw")).unwrap();
    let mut b = std::fs::read(d.join("l.raw")).unwrap();
    b[..512].copy_from_slice(&dos[..512]);
    std::fs::write(d.join("l.raw"), b).unwrap();
    let out = vmshift(d, &["part", "--output", "json", "l.raw"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the leftover GPT is a problem worth knowing"
    );
    let v = json(&out.stdout);
    assert_eq!(v["kind"], "mbr", "{v}");
    assert!(
        v["problems"][0].as_str().unwrap().contains("leftover GPT"),
        "{v}"
    );
    // A hybrid MBR keeps its own entries when the GPT moves.
    gpt_disk(d, "hy.raw", 32 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    tool_ok(d, "sgdisk", &["-h", "1", "hy.raw"]);
    let mbr_before = std::fs::read(d.join("hy.raw")).unwrap()[..512].to_vec();
    vmshift_ok(d, &["resize", "hy.raw", "+32M"]);
    let v = String::from_utf8(tool_ok(d, "sgdisk", &["-v", "hy.raw"]).stdout).unwrap();
    assert!(v.contains("No problems found"), "{v}");
    assert_eq!(
        std::fs::read(d.join("hy.raw")).unwrap()[..512],
        mbr_before[..]
    );
}

#[test]
fn an_interrupted_gpt_move_is_finished_by_running_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g0.raw", 32 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    for ms in [30, 90, 150, 210] {
        copy(d, "g0.raw", "g.raw");
        killed_resize(d, &["resize", "--grow-partition", "2", "g.raw", "64M"], ms);
        vmshift_ok(d, &["resize", "--grow-partition", "2", "g.raw", "64M"]);
        let v = String::from_utf8(tool_ok(d, "sgdisk", &["-v", "g.raw"]).stdout).unwrap();
        assert!(v.contains("No problems found"), "{ms} ms: {v}");
        assert_eq!(std::fs::metadata(d.join("g.raw")).unwrap().len(), 64 << 20);
    }
}

#[test]
fn a_gpt_inside_a_qcow2_moves_like_the_raw_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(
        d,
        "g.raw",
        64 << 20,
        &["-n", "1:2048:+8M", "-t", "1:ef00", "-n", "2:0:0"],
    );
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 20M 1M", "g.raw"],
    );
    copy(d, "g.raw", "r.raw");
    vmshift_ok(d, &["resize", "r.raw", "+64M"]);
    for cluster in ["65536", "2097152"] {
        let img = format!("g{cluster}.qcow2");
        let opt = format!("cluster_size={cluster}");
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "qcow2", "-o", &opt, "g.raw", &img],
        );
        let out = vmshift_ok(d, &["resize", &img, "+64M"]);
        assert!(out.contains("backup header"), "{out}");
        tool_ok(d, "qemu-img", &["check", &img]);
        // The same guest bytes as the raw disk resized by vmshift.
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "r.raw", &img]);
    }
    // Growing the last partition too: the same bytes as on raw.
    copy(d, "g.raw", "rp.raw");
    vmshift_ok(d, &["resize", "--grow-partition", "2", "rp.raw", "+64M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "gp.qcow2"],
    );
    vmshift_ok(d, &["resize", "--grow-partition", "2", "gp.qcow2", "+64M"]);
    tool_ok(d, "qemu-img", &["check", "gp.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "rp.raw", "gp.qcow2"],
    );
    // Clusters an internal snapshot shares (the whole L2 table, or only
    // the data after a later write made the table the image's own) and
    // compressed clusters are copied on write: the snapshot keeps the old
    // table, and applied afterwards gives the disk back as it was.
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "s.qcow2"],
    );
    tool_ok(d, "qemu-img", &["snapshot", "-c", "s1", "s.qcow2"]);
    copy(d, "s.qcow2", "sw.qcow2");
    tool_ok(d, "qemu-io", &["-c", "write -P 0x5a 20M 64k", "sw.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "g.raw", "c.qcow2"],
    );
    for img in ["s.qcow2", "sw.qcow2", "c.qcow2"] {
        vmshift_ok(d, &["resize", "--grow-partition", "2", img, "+64M"]);
        tool_ok(d, "qemu-img", &["check", img]);
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "rp.raw", img]);
        if img != "c.qcow2" {
            tool_ok(d, "qemu-img", &["snapshot", "-a", "s1", img]);
            tool_ok(d, "qemu-img", &["check", img]);
            tool_ok(d, "qemu-img", &["compare", "-f", "raw", "g.raw", img]);
        }
    }
}

#[test]
fn killed_qcow2_gpt_move_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g.raw", 32 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "q0.qcow2"],
    );
    // With a snapshot sharing everything, the GPT's clusters and table are
    // copied on write, and the shared ones released last.
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "s0.qcow2"],
    );
    tool_ok(d, "qemu-img", &["snapshot", "-c", "s1", "s0.qcow2"]);
    for (base, ms) in [0, 30, 70, 100, 140, 200, 300]
        .into_iter()
        .flat_map(|ms| [("q0.qcow2", ms), ("s0.qcow2", ms)])
    {
        copy(d, base, "q.qcow2");
        killed_resize(d, &["resize", "q.qcow2", "+32M"], ms);
        // Clean at any point: new structures are switched to in one header
        // write, so not even a leak (qemu-img check exit 0).
        let code = tool(d, "qemu-img", &["check", "q.qcow2"]).status.code();
        assert!(code == Some(0), "{ms} ms: check exit {code:?}");
        // One header write switches the size and the table together: the
        // old disk with its old GPT or the new one with the new GPT, whole.
        let out = vmshift(d, &["part", "--output", "json", "q.qcow2"]);
        assert_eq!(out.status.code(), Some(0), "{ms} ms: {out:?}");
        let v = json(&out.stdout);
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{ms} ms: {v}");
        vmshift_ok(d, &["resize", "q.qcow2", "64M"]);
        let v = json(vmshift_ok(d, &["part", "--output", "json", "q.qcow2"]).as_bytes());
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{ms} ms: {v}");
    }
}

#[test]
fn a_gpt_inside_a_sparse_or_stream_vmdk_moves_like_the_raw_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g.raw", 64 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 20M 1M", "g.raw"],
    );
    copy(d, "g.raw", "r.raw");
    vmshift_ok(d, &["resize", "--grow-partition", "2", "r.raw", "+64M"]);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let img = format!("{sub}.vmdk");
        let opt = format!("subformat={sub}");
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "vmdk", "-o", &opt, "g.raw", &img],
        );
        vmshift_ok(d, &["resize", "--grow-partition", "2", &img, "+64M"]);
        tool_ok(d, "qemu-img", &["check", &img]);
        assert_eq!(vmshift(d, &["check", &img]).status.code(), Some(0), "{img}");
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "r.raw", &img]);
    }
    // Killed anywhere, a sparse VMDK reads and a re-run finishes the move.
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "vmdk", "g.raw", "v0.vmdk"],
    );
    for ms in [0, 30, 70, 100, 140, 200] {
        copy(d, "v0.vmdk", "v.vmdk");
        killed_resize(d, &["resize", "v.vmdk", "+64M"], ms);
        tool_ok(d, "qemu-img", &["check", "v.vmdk"]);
        let out = vmshift(d, &["part", "v.vmdk"]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(2)),
            "{ms} ms: {out:?}"
        );
    }
}

#[test]
fn qcow2_l1_table_moves_when_it_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 512-byte clusters: +64M needs a larger L1 table, and the GPT moves too.
    gpt_disk(d, "g.raw", 64 << 20, &["-n", "1:2048:+8M", "-n", "2:0:0"]);
    copy(d, "g.raw", "r.raw");
    vmshift_ok(d, &["resize", "r.raw", "+64M"]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "g.raw",
            "m.qcow2",
        ],
    );
    vmshift_ok(d, &["resize", "m.qcow2", "+64M"]);
    tool_ok(d, "qemu-img", &["check", "m.qcow2"]);
    tool_ok(d, "qemu-img", &["compare", "-f", "raw", "r.raw", "m.qcow2"]);
    // 64 KiB clusters past 4 TiB; old data reads, new space takes writes.
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "b.qcow2", "100G"]);
    tool_ok(d, "qemu-io", &["-c", "write -P 1 50G 1M", "b.qcow2"]);
    vmshift_ok(d, &["resize", "b.qcow2", "+8T"]);
    tool_ok(d, "qemu-img", &["check", "b.qcow2"]);
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "read -P 1 50G 1M",
            "-c",
            "write -P 2 8T 1M",
            "b.qcow2",
        ],
    );
    tool_ok(d, "qemu-img", &["check", "b.qcow2"]);
    // Killed anywhere: clean (no leak either), old or new size.
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "k0.qcow2",
            "1M",
        ],
    );
    for ms in [0, 30, 70, 100, 150, 250] {
        copy(d, "k0.qcow2", "k.qcow2");
        killed_resize(d, &["resize", "k.qcow2", "+64M"], ms);
        let code = tool(d, "qemu-img", &["check", "k.qcow2"]).status.code();
        assert!(code == Some(0), "{ms} ms: check exit {code:?}");
        let size = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "k.qcow2"]).stdout)
            ["virtual-size"]
            .as_u64()
            .unwrap();
        assert!(
            size == 1 << 20 || size == (1 << 20) + (64 << 20),
            "{ms} ms: {size}"
        );
    }
}

#[test]
fn a_rewritten_stream_keeps_its_disk_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 8 << 20);
    tool_ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized,adapter_type=lsilogic,hwversion=6",
            "a.raw",
            "s.vmdk",
        ],
    );
    vmshift_ok(d, &["resize", "s.vmdk", "+1G"]);
    let info = json(vmshift_ok(d, &["info", "--output", "json", "s.vmdk"]).as_bytes());
    let fs = &info["format-specific"]["data"];
    assert_eq!(fs["adapter-type"], "lsilogic", "{info}");
    assert_eq!(fs["hw-version"], "6", "{info}");
    assert_eq!(fs["create-type"], "streamOptimized");
}

#[test]
fn qcow2_shrinks_like_qemu_img_and_keeps_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "a.qcow2", "64M"]);
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 40M 2M",
            "-c",
            "write -P 3 63M 1M",
            "a.qcow2",
        ],
    );
    copy(d, "a.qcow2", "q.qcow2");
    tool_ok(d, "qemu-img", &["resize", "--shrink", "q.qcow2", "32M"]);
    // Data past the new end needs --force.
    copy(d, "a.qcow2", "b.qcow2");
    let before = std::fs::read(d.join("b.qcow2")).unwrap();
    let out = vmshift(d, &["resize", "--shrink", "b.qcow2", "32M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(std::fs::read(d.join("b.qcow2")).unwrap() == before);
    for (name, prep) in [("plain", ""), ("compressed", "c"), ("snapshot", "s")] {
        let img = format!("{name}.qcow2");
        match prep {
            "c" => {
                tool_ok(
                    d,
                    "qemu-img",
                    &["convert", "-c", "-O", "qcow2", "a.qcow2", &img],
                );
            }
            _ => copy(d, "a.qcow2", &img),
        }
        if prep == "s" {
            tool_ok(d, "qemu-img", &["snapshot", "-c", "before", &img]);
        }
        vmshift_ok(d, &["resize", "--shrink", "--force", &img, "32M"]);
        tool_ok(d, "qemu-img", &["check", &img]);
        tool_ok(d, "qemu-img", &["compare", &img, "q.qcow2"]);
        if prep == "s" {
            // The snapshot still holds everything it held.
            tool_ok(d, "qemu-img", &["snapshot", "-a", "before", &img]);
            tool_ok(d, "qemu-img", &["compare", &img, "a.qcow2"]);
            tool_ok(d, "qemu-img", &["check", &img]);
        }
    }
    // A GPT moves inside the new end.
    gpt_disk(d, "g.raw", 64 << 20, &["-n", "1:2048:+8M", "-n", "2:0:+8M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "g.qcow2"],
    );
    vmshift_ok(d, &["resize", "--shrink", "g.qcow2", "32M"]);
    tool_ok(d, "qemu-img", &["check", "g.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "g.qcow2", "back.raw"],
    );
    let v = String::from_utf8(tool_ok(d, "sgdisk", &["-v", "back.raw"]).stdout).unwrap();
    assert!(v.contains("No problems found"), "{v}");
    // Killed anywhere: never corrupt, old or new size.
    for ms in [0, 30, 70, 110, 160] {
        copy(d, "a.qcow2", "k.qcow2");
        killed_resize(d, &["resize", "--shrink", "--force", "k.qcow2", "32M"], ms);
        let code = tool(d, "qemu-img", &["check", "k.qcow2"]).status.code();
        assert!(code == Some(0), "{ms} ms: check exit {code:?}");
    }
}

#[test]
fn sparse_and_stream_vmdk_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g.raw", 64 << 20, &["-n", "1:2048:+8M", "-n", "2:0:+8M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 3M 1M", "g.raw"],
    );
    copy(d, "g.raw", "r.raw");
    vmshift_ok(d, &["resize", "--shrink", "r.raw", "32M"]);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let img = format!("{sub}.vmdk");
        let opt = format!("subformat={sub}");
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "vmdk", "-o", &opt, "g.raw", &img],
        );
        vmshift_ok(d, &["resize", "--shrink", &img, "32M"]);
        tool_ok(d, "qemu-img", &["check", &img]);
        assert_eq!(vmshift(d, &["check", &img]).status.code(), Some(0), "{img}");
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "r.raw", &img]);
    }
    // Data past the new end needs --force; nothing changes without it.
    patterned_raw(&d.join("p.raw"), 16 << 20);
    tool_ok(d, "qemu-img", &["convert", "-O", "vmdk", "p.raw", "p.vmdk"]);
    let before = std::fs::read(d.join("p.vmdk")).unwrap();
    let out = vmshift(d, &["resize", "--shrink", "p.vmdk", "8M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(std::fs::read(d.join("p.vmdk")).unwrap() == before);
    vmshift_ok(d, &["resize", "--shrink", "--force", "p.vmdk", "8M"]);
    tool_ok(d, "qemu-img", &["check", "p.vmdk"]);
    assert_eq!(vmshift(d, &["check", "p.vmdk"]).status.code(), Some(0));
    tool_ok(
        d,
        "qemu-img",
        &["resize", "-f", "raw", "--shrink", "p.raw", "8M"],
    );
    tool_ok(d, "qemu-img", &["compare", "-f", "raw", "p.raw", "p.vmdk"]);
}

#[test]
fn an_image_qemu_holds_is_not_resized() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "lk.qcow2", "64M"]);
    let mut qemu = qemu_io_holding(d, "qcow2", "lk.qcow2");
    let out = vmshift(d, &["resize", "lk.qcow2", "+1G"]);
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // qemu-img's words: Failed to get "write" lock.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{out:?}"
    );
    vmshift_ok(d, &["resize", "lk.qcow2", "+1G"]);
}

#[test]
fn a_killed_stream_rewrite_leaves_no_temp_file_behind_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 64 << 20);
    tool_ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "a.raw",
            "s.vmdk",
        ],
    );
    // A temp file of a vmshift that no longer runs (PIDs are below 2^22).
    std::fs::write(d.join(".s.vmdk.vmshift-4194305-0.tmp"), b"partial").unwrap();
    vmshift_ok(d, &["resize", "s.vmdk", "+1G"]);
    assert_eq!(vmshift_tests::names_in(d), ["a.raw", "s.vmdk"]);
}

#[test]
fn split_sets_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_disk(d, "a.raw", 5 << 30);
    tool_ok(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 1M 1M",
            "-c",
            "write -P 8 2600M 1M",
            "a.raw",
        ],
    );
    for (sub, to) in [("twoGbMaxExtentFlat", "3G"), ("twoGbMaxExtentSparse", "4G")] {
        let img = format!("{sub}.vmdk");
        let opt = format!("subformat={sub}");
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "vmdk", "-o", &opt, "a.raw", &img],
        );
        vmshift_ok(d, &["resize", "--shrink", &img, to]);
        tool_ok(d, "qemu-img", &["check", &img]);
        copy(d, "a.raw", "want.raw");
        tool_ok(
            d,
            "qemu-img",
            &["resize", "-f", "raw", "--shrink", "want.raw", to],
        );
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "want.raw", &img]);
        std::fs::remove_file(d.join("want.raw")).unwrap();
    }
    // A sparse extent cut in the middle is copied up to the cut into a new
    // extent file, which the descriptor lists instead.
    let before = vmshift_tests::names_in(d);
    vmshift_ok(
        d,
        &["resize", "--shrink", "twoGbMaxExtentSparse.vmdk", "3G"],
    );
    tool_ok(d, "qemu-img", &["check", "twoGbMaxExtentSparse.vmdk"]);
    copy(d, "a.raw", "want.raw");
    tool_ok(
        d,
        "qemu-img",
        &["resize", "-f", "raw", "--shrink", "want.raw", "3G"],
    );
    tool_ok(
        d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "want.raw",
            "twoGbMaxExtentSparse.vmdk",
        ],
    );
    let text = std::fs::read_to_string(d.join("twoGbMaxExtentSparse.vmdk")).unwrap();
    assert!(
        text.contains("RW 2097152 SPARSE \"twoGbMaxExtentSparse-s002-cut1.vmdk\""),
        "{text}"
    );
    let after = vmshift_tests::names_in(d);
    assert!(
        !after.contains(&"twoGbMaxExtentSparse-s002.vmdk".to_string()),
        "{after:?}"
    );
    assert!(
        before.contains(&"twoGbMaxExtentSparse-s002.vmdk".to_string()),
        "{before:?}"
    );
    // Data is not cut without --force.
    let out = vmshift(d, &["resize", "--shrink", "twoGbMaxExtentFlat.vmdk", "2G"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{out:?}"
    );
}

/// "1000K", "3M" in bytes.
fn size_of(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    n.parse::<u64>().unwrap() << if unit == "K" { 10 } else { 20 }
}

/// The virtual size qemu-img reports.
fn virtual_size(d: &Path, img: &str) -> u64 {
    json(&tool_ok(d, "qemu-img", &["info", "--output", "json", img]).stdout)["virtual-size"]
        .as_u64()
        .unwrap()
}

#[test]
fn qcow2_preallocation_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 64 KiB clusters with an end inside a cluster; version 2; and 512-byte
    // clusters, where +40M needs new refcount blocks, a larger refcount
    // table and a larger L1 table.
    for (opts, old, grow, cs) in [
        ("cluster_size=65536", "1000K", "3M", 65536u64),
        ("compat=0.10", "1M", "3M", 65536),
        ("cluster_size=512", "1M", "41M", 512),
    ] {
        for mode in ["metadata", "falloc", "full"] {
            for f in ["ours.qcow2", "theirs.qcow2"] {
                tool_ok(
                    d,
                    "qemu-img",
                    &["create", "-f", "qcow2", "-o", opts, f, old],
                );
                tool_ok(d, "qemu-io", &["-c", "write -P 0x5a 0 512k", f]);
            }
            let pre = format!("--preallocation={mode}");
            vmshift_ok(d, &["resize", &pre, "ours.qcow2", grow]);
            tool_ok(d, "qemu-img", &["resize", &pre, "theirs.qcow2", grow]);
            let what = format!("{opts} {mode}");
            tool_ok(d, "qemu-img", &["check", "ours.qcow2"]);
            tool_ok(d, "qemu-img", &["compare", "ours.qcow2", "theirs.qcow2"]);
            assert_eq!(
                virtual_size(d, "ours.qcow2"),
                virtual_size(d, "theirs.qcow2"),
                "{what}"
            );
            // Every cluster past the old end is allocated in the image.
            let old_bytes = size_of(old);
            let from = old_bytes.div_ceil(cs) * cs;
            let map =
                json(&tool_ok(d, "qemu-img", &["map", "--output", "json", "ours.qcow2"]).stdout);
            for e in map.as_array().unwrap() {
                let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                if start + len > from {
                    assert_eq!(e["data"], true, "{what}: {e}");
                    assert_eq!(e["depth"], 0, "{what}: {e}");
                }
            }
            // falloc and full take the space on disk.
            use std::os::unix::fs::MetadataExt;
            let used = std::fs::metadata(d.join("ours.qcow2")).unwrap().blocks() * 512;
            let grown = size_of(grow) - old_bytes;
            if mode != "metadata" {
                assert!(used >= grown, "{what}: {used} bytes on disk");
            }
        }
    }
}

#[test]
fn new_space_reads_as_zeros_over_a_longer_backing_file_or_a_shrunk_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "4M"],
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 0xcd 0 4M", "base.qcow2"]);
    for old in ["1M", "1000K"] {
        for f in ["ours.qcow2", "theirs.qcow2"] {
            tool_ok(
                d,
                "qemu-img",
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    f,
                    old,
                ],
            );
        }
        vmshift_ok(d, &["resize", "ours.qcow2", "3M"]);
        tool_ok(d, "qemu-img", &["resize", "theirs.qcow2", "3M"]);
        tool_ok(d, "qemu-img", &["check", "ours.qcow2"]);
        tool_ok(d, "qemu-img", &["compare", "ours.qcow2", "theirs.qcow2"]);
        let read = format!("read -P 0 {old} {}", (3 << 20) - size_of(old));
        tool_ok(d, "qemu-io", &["-r", "-c", &read, "ours.qcow2"]);
    }
    // Version 2 cannot mark clusters zero: refused, nothing changed; with
    // preallocation the new clusters are allocated and read as zeros.
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "v2.qcow2",
            "1M",
        ],
    );
    let before = std::fs::read(d.join("v2.qcow2")).unwrap();
    let out = vmshift(d, &["resize", "v2.qcow2", "3M"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("backing file"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(d.join("v2.qcow2")).unwrap(), before);
    vmshift_ok(d, &["resize", "--preallocation=metadata", "v2.qcow2", "3M"]);
    tool_ok(d, "qemu-img", &["check", "v2.qcow2"]);
    tool_ok(d, "qemu-io", &["-r", "-c", "read -P 0 1M 2M", "v2.qcow2"]);

    // A shrink to inside a cluster (or grain) leaves bytes after the end;
    // growing again shows zeros there (qemu-img resize shows the old bytes).
    patterned_raw(&d.join("p.raw"), 1 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "p.raw", "q.qcow2"],
    );
    tool_ok(d, "qemu-img", &["resize", "--shrink", "q.qcow2", "1000K"]);
    vmshift_ok(d, &["resize", "q.qcow2", "1M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-r", "-c", "read -P 0 1000K 24K", "q.qcow2"],
    );
    tool_ok(d, "qemu-img", &["check", "q.qcow2"]);
    for (fmt, img) in [("qcow2", "s.qcow2"), ("vmdk", "s.vmdk")] {
        tool_ok(d, "qemu-img", &["convert", "-O", fmt, "p.raw", img]);
        vmshift_ok(d, &["resize", "--shrink", "--force", img, "1000K"]);
        vmshift_ok(d, &["resize", img, "1M"]);
        tool_ok(
            d,
            "qemu-io",
            &["-r", "-f", fmt, "-c", "read -P 0 1000K 24K", img],
        );
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-f", fmt, "-O", "raw", img, "back.raw"],
        );
        let (was, now) = (
            std::fs::read(d.join("p.raw")).unwrap(),
            std::fs::read(d.join("back.raw")).unwrap(),
        );
        assert!(
            was[..1000 << 10] == now[..1000 << 10],
            "{img}: the data before the end changed"
        );
    }
    // A sparse VMDK whose header was cut inside a grain by another tool.
    tool_ok(d, "qemu-img", &["convert", "-O", "vmdk", "p.raw", "c.vmdk"]);
    let mut bytes = std::fs::read(d.join("c.vmdk")).unwrap();
    bytes[12..20].copy_from_slice(&2000u64.to_le_bytes());
    std::fs::write(d.join("c.vmdk"), bytes).unwrap();
    vmshift_ok(d, &["resize", "c.vmdk", "1M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-r", "-f", "vmdk", "-c", "read -P 0 1000K 24K", "c.vmdk"],
    );
}

#[test]
fn killed_qcow2_preallocation_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 512-byte clusters: new refcount blocks, a new refcount table and a
    // new L1 table, each switched to at its own step.
    patterned_raw(&d.join("k.raw"), 1 << 20);
    tool_ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "k.raw",
            "k0.qcow2",
        ],
    );
    for ms in [0, 30, 70, 100, 140, 190, 250, 330, 500] {
        copy(d, "k0.qcow2", "k.qcow2");
        killed_resize(
            d,
            &["resize", "--preallocation=metadata", "k.qcow2", "+24M"],
            ms,
        );
        let code = tool(d, "qemu-img", &["check", "k.qcow2"]).status.code();
        assert!(code == Some(0), "{ms} ms: check exit {code:?}");
        let size = virtual_size(d, "k.qcow2");
        assert!(size == 1 << 20 || size == 25 << 20, "{ms} ms: {size}");
        // The old data, and zeros after it.
        tool_ok(d, "qemu-img", &["compare", "-f", "raw", "k.raw", "k.qcow2"]);
    }
}

#[test]
fn a_gpt_inside_a_flat_vmdk_moves_and_never_points_past_the_described_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gpt_disk(d, "g.raw", 32 << 20, &["-n", "1:2048:+8M", "-n", "2:0:+8M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 2M 1M", "g.raw"],
    );
    let flat = |name: &str| {
        tool_ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
                "g.raw",
                name,
            ],
        );
    };
    // Grown (with the last partition) and shrunk: the guest bytes are the
    // raw disk's resized the same way; sgdisk finds the extent file clean.
    for (args, size) in [
        (&["--grow-partition", "2"][..], "+32M"),
        (&["--shrink"][..], "24M"),
    ] {
        copy(d, "g.raw", "r.raw");
        flat("f.vmdk");
        let mut a = vec!["resize"];
        a.extend_from_slice(args);
        vmshift_ok(d, &[&a[..], &["r.raw", size]].concat());
        vmshift_ok(d, &[&a[..], &["f.vmdk", size]].concat());
        tool_ok(
            d,
            "qemu-img",
            &["compare", "-f", "raw", "-F", "vmdk", "r.raw", "f.vmdk"],
        );
        assert_eq!(virtual_size(d, "f.vmdk"), virtual_size(d, "r.raw"));
        let v = tool_ok(d, "sgdisk", &["-v", "f-flat.vmdk"]);
        assert!(
            String::from_utf8_lossy(&v.stdout).contains("No problems found"),
            "{v:?}"
        );
    }
    // Killed anywhere: the table read through the descriptor is the old
    // one or the new one, and never points past the described disk. (Between
    // the primary entries and the primary header the primary's CRC is off;
    // the new backup is whole then, as the GPT's own recovery expects.)
    flat("n.vmdk");
    vmshift_ok(d, &["resize", "--grow-partition", "2", "n.vmdk", "+32M"]);
    let parts =
        |f: &str| json(&vmshift(d, &["part", "--output", "json", f]).stdout)["partitions"].clone();
    let (old_parts, new_parts) = (parts("g.raw"), parts("n.vmdk"));
    for ms in [0, 30, 70, 100, 140, 190, 250, 330] {
        flat("k.vmdk");
        killed_resize(
            d,
            &["resize", "--grow-partition", "2", "k.vmdk", "+32M"],
            ms,
        );
        // Exit 2: a backup header not at the end yet (a re-run moves it).
        let out = vmshift(d, &["part", "--output", "json", "k.vmdk"]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(2)),
            "{ms} ms: {out:?}"
        );
        let v = json(&out.stdout);
        assert!(
            v["gpt"]["primary-ok"] == true || v["gpt"]["backup-ok"] == true,
            "{ms} ms: {v}"
        );
        assert!(
            v["partitions"] == old_parts || v["partitions"] == new_parts,
            "{ms} ms: {v}"
        );
        let size = virtual_size(d, "k.vmdk");
        assert!(size == 32 << 20 || size == 64 << 20, "{ms} ms: {size}");
        assert!(
            v["gpt"]["backup-lba"].as_u64().unwrap() < size / 512,
            "{ms} ms: {v}"
        );
    }
}

#[test]
fn a_gpt_inside_a_split_set_moves_like_the_raw_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 3 GiB: two extents, the second one short.
    gpt_disk(
        d,
        "g.raw",
        3 << 30,
        &["-n", "1:2048:+100M", "-n", "2:0:+1G"],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 2M 1M",
            "-c",
            "write -P 8 1100M 1M",
            "g.raw",
        ],
    );
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let opt = format!("subformat={sub}");
        for (args, size) in [
            (&["--grow-partition", "2"][..], "+3G"),
            (&["--shrink"][..], "2560M"),
        ] {
            copy(d, "g.raw", "r.raw");
            tool_ok(
                d,
                "qemu-img",
                &["convert", "-O", "vmdk", "-o", &opt, "g.raw", "s.vmdk"],
            );
            let mut a = vec!["resize"];
            a.extend_from_slice(args);
            vmshift_ok(d, &[&a[..], &["r.raw", size]].concat());
            let out = vmshift_ok(d, &[&a[..], &["s.vmdk", size]].concat());
            assert!(out.contains("GPT"), "{sub} {size}: {out}");
            let what = format!("{sub} {size}");
            tool_ok(d, "qemu-img", &["check", "s.vmdk"]);
            tool_ok(
                d,
                "qemu-img",
                &["compare", "-f", "raw", "-F", "vmdk", "r.raw", "s.vmdk"],
            );
            assert_eq!(
                virtual_size(d, "s.vmdk"),
                virtual_size(d, "r.raw"),
                "{what}"
            );
            let v = json(vmshift_ok(d, &["part", "--output", "json", "s.vmdk"]).as_bytes());
            assert_eq!(v["gpt"]["backup-at-end"], true, "{what}: {v}");
            for f in vmshift_tests::names_in(d) {
                if f.starts_with("s-") || f == "s.vmdk" {
                    std::fs::remove_file(d.join(f)).unwrap();
                }
            }
        }
    }
    // Killed anywhere while growing a sparse set: the table read through
    // the descriptor is the old one or the new one; a re-run finishes.
    tool_ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "g.raw",
            "n.vmdk",
        ],
    );
    vmshift_ok(d, &["resize", "--grow-partition", "2", "n.vmdk", "+3G"]);
    let parts =
        |f: &str| json(&vmshift(d, &["part", "--output", "json", f]).stdout)["partitions"].clone();
    let (old_parts, new_parts) = (parts("g.raw"), parts("n.vmdk"));
    for ms in [0, 40, 80, 120, 170, 230, 300] {
        tool_ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=twoGbMaxExtentSparse",
                "g.raw",
                "k.vmdk",
            ],
        );
        killed_resize(d, &["resize", "--grow-partition", "2", "k.vmdk", "+3G"], ms);
        tool_ok(d, "qemu-img", &["check", "k.vmdk"]);
        let out = vmshift(d, &["part", "--output", "json", "k.vmdk"]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(2)),
            "{ms} ms: {out:?}"
        );
        let v = json(&out.stdout);
        assert!(
            v["partitions"] == old_parts || v["partitions"] == new_parts,
            "{ms} ms: {v}"
        );
        let size = virtual_size(d, "k.vmdk");
        assert!(size == 3 << 30 || size == 6 << 30, "{ms} ms: {size}");
        // Run again at the size it has now: the move finishes.
        vmshift_ok(d, &["resize", "--grow-partition", "2", "k.vmdk", "6G"]);
        let v = json(vmshift_ok(d, &["part", "--output", "json", "k.vmdk"]).as_bytes());
        assert!(v["partitions"] == new_parts, "{ms} ms, run again: {v}");
        for f in vmshift_tests::names_in(d) {
            if f.starts_with("k") && f.ends_with(".vmdk") {
                std::fs::remove_file(d.join(f)).unwrap();
            }
        }
    }
}

#[test]
fn shrink_refuses_data_from_a_backing_file_or_past_a_gpt_not_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Data the overlay shows from its backing file is data too.
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "b.qcow2", "64M"]);
    tool_ok(d, "qemu-io", &["-c", "write -P 0xaa 50M 1M", "b.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2",
        ],
    );
    let before = std::fs::read(d.join("o.qcow2")).unwrap();
    let out = vmshift(d, &["resize", "--shrink", "o.qcow2", "32M"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("52428800"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(d.join("o.qcow2")).unwrap(), before);
    // A GPT whose backup is not at the old end (grown by qemu-img): only
    // the backup's own sectors are exempt, data past them still counts.
    gpt_disk(d, "g.raw", 64 << 20, &["-n", "1:2048:+30M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "g.qcow2"],
    );
    for (img, fmt) in [("g.raw", "raw"), ("g.qcow2", "qcow2")] {
        tool_ok(d, "qemu-img", &["resize", "-f", fmt, img, "128M"]);
        tool_ok(
            d,
            "qemu-io",
            &["-f", fmt, "-c", "write -P 0xaa 100M 1M", img],
        );
        let before = std::fs::read(d.join(img)).unwrap();
        let out = vmshift(d, &["resize", "--shrink", img, "80M"]);
        assert_eq!(out.status.code(), Some(1), "{img}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("104857600"),
            "{out:?}"
        );
        assert_eq!(std::fs::read(d.join(img)).unwrap(), before, "{img}");
        // Without that data the shrink goes through and the table is whole.
        tool_ok(d, "qemu-io", &["-f", fmt, "-c", "write -z 100M 1M", img]);
        vmshift_ok(d, &["resize", "--shrink", img, "80M"]);
        let v = json(vmshift_ok(d, &["part", "--output", "json", img]).as_bytes());
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{img}: {v}");
    }
}

#[test]
fn qcow2_zero_clusters_compressed_tails_v2_snapshots_and_dirty_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The GPT backup lands in clusters zeroed without unmapping: written,
    // not lost behind the zero flag (shrink and grow).
    gpt_disk(d, "z.raw", 64 << 20, &["-n", "1:2048:+30M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "z.raw", "z.qcow2"],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x55 46M 2M",
            "-c",
            "write -z 46M 2M",
            "z.qcow2",
        ],
    );
    vmshift_ok(d, &["resize", "--shrink", "z.qcow2", "48M"]);
    tool_ok(d, "qemu-img", &["check", "z.qcow2"]);
    let v = json(vmshift_ok(d, &["part", "--output", "json", "z.qcow2"]).as_bytes());
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["gpt"]["backup-at-end"], true, "{v}");
    // A shrink ending inside a compressed cluster, then growth: zeros.
    patterned_raw(&d.join("p.raw"), 1 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "p.raw", "c.qcow2"],
    );
    vmshift_ok(d, &["resize", "--shrink", "--force", "c.qcow2", "1015808"]);
    vmshift_ok(d, &["resize", "c.qcow2", "1M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-r", "-c", "read -P 0 1015808 32768", "c.qcow2"],
    );
    tool_ok(d, "qemu-img", &["check", "c.qcow2"]);
    // Same size, a partition to grow: it grows (like raw).
    gpt_disk(d, "s.raw", 64 << 20, &["-n", "1:2048:+8M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "s.raw", "s.qcow2"],
    );
    vmshift_ok(d, &["resize", "--grow-partition", "1", "s.qcow2", "64M"]);
    let v = json(vmshift_ok(d, &["part", "--output", "json", "s.qcow2"]).as_bytes());
    assert!(
        v["partitions"][0]["end"].as_u64().unwrap() > 60 << 20,
        "{v}"
    );
    // A protective MBR left short by a kill is finished by a re-run.
    vmshift_ok(d, &["resize", "s.qcow2", "+16M"]);
    tool_ok(d, "qemu-io", &["-c", "write -P 0xff 458 4", "s.qcow2"]);
    let out = vmshift_ok(d, &["resize", "s.qcow2", "80M"]);
    assert!(out.contains("GPT"), "{out}");
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "s.qcow2", "back.raw"],
    );
    let v = tool_ok(d, "sgdisk", &["-v", "back.raw"]);
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{v:?}"
    );
    // Refused, nothing changed: a version 2 image with snapshots (QEMU could
    // not apply them at another size), a dirty or a corrupt image.
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "16M",
        ],
    );
    tool_ok(d, "qemu-img", &["snapshot", "-c", "s", "v2.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "dirty.qcow2", "16M"],
    );
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "corrupt.qcow2", "16M"],
    );
    for (img, bit) in [("dirty.qcow2", 1u8), ("corrupt.qcow2", 2)] {
        let mut b = std::fs::read(d.join(img)).unwrap();
        b[79] |= bit;
        std::fs::write(d.join(img), b).unwrap();
    }
    for (img, says) in [
        ("v2.qcow2", "snapshots"),
        ("dirty.qcow2", "dirty"),
        ("corrupt.qcow2", "corrupt"),
    ] {
        let before = std::fs::read(d.join(img)).unwrap();
        let out = vmshift(d, &["resize", img, "32M"]);
        assert_ne!(out.status.code(), Some(0), "{img}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{img}: {out:?}"
        );
        assert_eq!(std::fs::read(d.join(img)).unwrap(), before, "{img}");
    }
}

#[test]
fn qcow2_resizes_reuse_free_clusters_and_a_shrink_cuts_the_free_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Grown and shrunk again and again (the GPT moving each time): the
    // file does not creep, since new tables go into clusters freed before.
    gpt_disk(d, "g.raw", 32 << 20, &["-n", "1:2048:+8M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "g.raw", "g.qcow2"],
    );
    let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    let start = len("g.qcow2");
    for _ in 0..20 {
        vmshift_ok(d, &["resize", "g.qcow2", "+16M"]);
        vmshift_ok(d, &["resize", "--shrink", "g.qcow2", "32M"]);
    }
    assert!(
        len("g.qcow2") <= start + (64 << 10),
        "{} → {}",
        start,
        len("g.qcow2")
    );
    tool_ok(d, "qemu-img", &["check", "g.qcow2"]);
    tool_ok(d, "qemu-img", &["compare", "-f", "raw", "g.raw", "g.qcow2"]);
    // A shrink of a fully preallocated image gives the space back.
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "p.qcow2", "64M"]);
    tool_ok(d, "qemu-io", &["-c", "write -P 3 0 1M", "p.qcow2"]);
    vmshift_ok(d, &["resize", "--preallocation=full", "p.qcow2", "300M"]);
    assert!(len("p.qcow2") > 236 << 20);
    vmshift_ok(d, &["resize", "--shrink", "--force", "p.qcow2", "10M"]);
    assert!(len("p.qcow2") < 2 << 20, "{}", len("p.qcow2"));
    tool_ok(d, "qemu-img", &["check", "p.qcow2"]);
    tool_ok(
        d,
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 3 0 1M",
            "-c",
            "read -P 0 1M 9M",
            "p.qcow2",
        ],
    );
    // Shrinks that drop nothing do not make the file longer either (the
    // tables at its end move only where there is room before them).
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "t.qcow2",
            "64M",
        ],
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 1 0 8M", "t.qcow2"]);
    vmshift_ok(d, &["resize", "t.qcow2", "20G"]);
    let grown = len("t.qcow2");
    for size in ["19G", "18G", "17G"] {
        vmshift_ok(d, &["resize", "--shrink", "t.qcow2", size]);
        assert!(
            len("t.qcow2") <= grown,
            "{size}: {} > {grown}",
            len("t.qcow2")
        );
        tool_ok(d, "qemu-img", &["check", "t.qcow2"]);
    }
}

/// Spawns qemu-io holding `file` (opened as `fmt`) and waits for its lock.
fn qemu_io_holding(d: &Path, fmt: &str, file: &str) -> std::process::Child {
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", fmt, "-c", "sleep 20000", file])
        .current_dir(d)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(d.join(file)).unwrap().ino();
    for _ in 0..100 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks.lines().any(|l| l.contains(&format!(":{ino} "))) {
            return child;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-io did not take its lock on {file}");
}

#[test]
fn vmdk_resizes_after_interrupted_runs_and_odd_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let convert = |sub: &str, from: &str, to: &str| {
        let o = format!("subformat={sub}");
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "vmdk", "-o", &o, from, to],
        );
    };
    // Extent bytes past the described disk (a killed shrink's, or a killed
    // grow's) never come back: a flat file and a flat set's last extent.
    sparse_disk(d, "z.raw", 100 << 20);
    convert("monolithicFlat", "z.raw", "f.vmdk");
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("f-flat.vmdk"))
        .unwrap()
        .set_len(150 << 20)
        .unwrap();
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 120M 1M", "f-flat.vmdk"],
    );
    vmshift_ok(d, &["resize", "f.vmdk", "150M"]);
    assert_eq!(virtual_size(d, "f.vmdk"), 150 << 20);
    tool_ok(
        d,
        "qemu-io",
        &["-r", "-f", "vmdk", "-c", "read -P 0 100M 50M", "f.vmdk"],
    );
    sparse_disk(d, "s.raw", 3000 << 20);
    convert("twoGbMaxExtentFlat", "s.raw", "set.vmdk");
    let last = "set-f002.vmdk";
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join(last))
        .unwrap()
        .set_len(1500 << 20)
        .unwrap();
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 1000M 1M", last],
    );
    vmshift_ok(d, &["resize", "set.vmdk", "3600M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-r", "-f", "vmdk", "-c", "read -P 0 3000M 600M", "set.vmdk"],
    );
    // A set extent qemu-io holds is not touched.
    let mut q = qemu_io_holding(d, "raw", last);
    let out = vmshift(d, &["resize", "--shrink", "set.vmdk", "2100M"]);
    let _ = q.kill();
    let _ = q.wait();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    assert_eq!(virtual_size(d, "set.vmdk"), 3600 << 20);
    // A sparse VMDK left with its GPT backup mid-disk is finished by a
    // run at the size it has.
    gpt_disk(d, "g.raw", 100 << 20, &["-n", "1:2048:+20M"]);
    convert("monolithicSparse", "g.raw", "g.vmdk");
    vmshift_ok(d, &["resize", "--no-fix-gpt", "g.vmdk", "150M"]);
    vmshift_ok(d, &["resize", "g.vmdk", "150M"]);
    let v = json(vmshift_ok(d, &["part", "--output", "json", "g.vmdk"]).as_bytes());
    assert_eq!(v["gpt"]["backup-at-end"], true, "{v}");
    // A stale backup an earlier growth left inside the disk is not data.
    copy(d, "g.raw", "r.raw");
    vmshift_ok(d, &["resize", "r.raw", "200M"]);
    vmshift_ok(d, &["resize", "r.raw", "300M"]);
    vmshift_ok(d, &["resize", "--shrink", "r.raw", "150M"]);
    let v = tool_ok(d, "sgdisk", &["-v", "r.raw"]);
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{v:?}"
    );
    // A hybrid MBR's entry for the grown partition follows it.
    copy(d, "g.raw", "h.raw");
    tool_ok(d, "sgdisk", &["-h", "1", "h.raw"]);
    vmshift_ok(d, &["resize", "--grow-partition", "1", "h.raw", "150M"]);
    let v = tool_ok(d, "sgdisk", &["-v", "h.raw"]);
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{v:?}"
    );
    // A sparse VMDK cut with --force and grown again shows zeros where the
    // cut data was.
    copy(d, "z.raw", "c.raw");
    tool_ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 50M 1M", "c.raw"],
    );
    convert("monolithicSparse", "c.raw", "c.vmdk");
    vmshift_ok(d, &["resize", "--shrink", "--force", "c.vmdk", "32M"]);
    vmshift_ok(d, &["resize", "c.vmdk", "64M"]);
    tool_ok(
        d,
        "qemu-io",
        &["-r", "-f", "vmdk", "-c", "read -P 0 32M 32M", "c.vmdk"],
    );
    // A descriptor named with a quote gets extents named without one.
    convert("twoGbMaxExtentSparse", "z.raw", "q.vmdk");
    std::fs::rename(d.join("q.vmdk"), d.join("a\"b.vmdk")).unwrap();
    vmshift_ok(d, &["resize", "a\"b.vmdk", "3000M"]);
    tool_ok(d, "qemu-img", &["check", "a\"b.vmdk"]);
    assert_eq!(virtual_size(d, "a\"b.vmdk"), 3000 << 20);
    // Past VMware's 62 TiB: refused before any file is written.
    let before = vmshift_tests::names_in(d);
    let out = vmshift(d, &["resize", "set.vmdk", "63T"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(vmshift_tests::names_in(d), before);
    // A windows-1252 descriptor stays windows-1252.
    convert("monolithicFlat", "z.raw", "w.vmdk");
    let text = std::fs::read(d.join("w.vmdk")).unwrap();
    let mut text = String::from_utf8(text).unwrap().replace(
        "# Disk DescriptorFile",
        "# Disk DescriptorFile\n# caf\u{e9}",
    );
    text = text.replace("encoding=\"UTF-8\"", "encoding=\"windows-1252\"");
    let bytes: Vec<u8> = text.chars().map(|c| c as u32 as u8).collect();
    std::fs::write(d.join("w.vmdk"), &bytes).unwrap();
    vmshift_ok(d, &["resize", "w.vmdk", "120M"]);
    let after = std::fs::read(d.join("w.vmdk")).unwrap();
    assert!(after.windows(5).any(|w| w == b"caf\xe9\n"), "{after:?}");
    assert_eq!(virtual_size(d, "w.vmdk"), 120 << 20);
}
