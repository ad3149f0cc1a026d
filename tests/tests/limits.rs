//! Each limit of `vmshift_model::limits` on an input just past it (refused,
//! naming the limit) and at it (not refused for that limit), and `info
//! --output json` reporting the limits an image was read within.

use std::os::unix::fs::FileExt;
use std::path::Path;

use vmshift_tests::{qemu_img, tool_ok, vmshift, vmshift_ok};

fn put_be32(path: &Path, at: u64, v: u32) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), at).unwrap();
}

/// The limit `name` in `info --output json`'s `limits` of `image`.
fn limit(dir: &Path, image: &[&str], name: &str) -> serde_json::Value {
    let mut args = vec!["info", "--output", "json"];
    args.extend_from_slice(image);
    let v: serde_json::Value = serde_json::from_str(&vmshift_ok(dir, &args)).unwrap();
    v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing: {v}"))
        .clone()
}

fn info_error(dir: &Path, image: &str) -> String {
    let out = vmshift(dir, &["info", image]);
    assert!(!out.status.success(), "{image} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn small_qcow2(dir: &Path, name: &str) {
    let out = qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "64M"]);
    assert!(out.status.success());
}

/// A qcow2 whose header field at `at` is set past its limit (refused with
/// `said`) and to it (not refused for that limit).
fn qcow2_field_past_and_at(at: u64, limit: u32, said: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    small_qcow2(dir.path(), "a.qcow2");
    let p = dir.path().join("a.qcow2");
    put_be32(&p, at, limit + 1);
    let e = info_error(dir.path(), "a.qcow2");
    assert!(said.iter().all(|s| e.contains(s)), "{e}");
    put_be32(&p, at, limit);
    let e = info_error(dir.path(), "a.qcow2");
    assert!(!e.contains(said[1]), "at the limit: {e}");
}

#[test]
fn qcow2_l1_table_just_past_32_mib() {
    qcow2_field_past_and_at(36, (32 << 20) / 8, &["l1_size", "32 MiB L1 limit"]);
}

#[test]
fn qcow2_snapshots_just_past_65536() {
    qcow2_field_past_and_at(60, 65536, &["nb_snapshots", "limit of 65536"]);
}

#[test]
fn backing_chain_of_64_reads_and_65_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    small_qcow2(dir.path(), "0.qcow2");
    for i in 1..65 {
        let (b, o) = (format!("{}.qcow2", i - 1), format!("{i}.qcow2"));
        let out = qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &o],
        );
        assert!(out.status.success());
    }
    // 63.qcow2 is the top of 64 images.
    let depth = limit(dir.path(), &["63.qcow2"], "chain-depth");
    assert_eq!(
        (depth["value"].as_u64(), depth["limit"].as_u64()),
        (Some(64), Some(64))
    );
    let out = vmshift(dir.path(), &["map", "64.qcow2"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("deeper than 64 images"), "{e}");
}

#[test]
fn vmdk_descriptor_of_one_mib_is_refused_one_byte_less_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "d.vmdk",
            "1M",
        ],
    );
    assert!(out.status.success());
    let p = dir.path().join("d.vmdk");
    let text = std::fs::read_to_string(&p).unwrap();
    let padded = |total: usize| {
        let mut t = text.clone();
        while t.len() < total {
            let n = (total - t.len()).min(200);
            if n < 3 {
                t.push_str(&"#".repeat(n - 1));
                t.push('\n');
            } else {
                t.push_str(&format!("#{}\n", "x".repeat(n - 2)));
            }
        }
        assert_eq!(t.len(), total);
        t
    };
    std::fs::write(&p, padded(1 << 20)).unwrap();
    let e = info_error(dir.path(), "d.vmdk");
    assert!(
        e.contains("larger than the 1 MiB a descriptor may have"),
        "{e}"
    );
    std::fs::write(&p, padded((1 << 20) - 1)).unwrap();
    let l = limit(dir.path(), &["d.vmdk"], "vmdk-descriptor-bytes");
    assert_eq!(l["value"].as_u64(), Some((1 << 20) - 1));
    assert_eq!(l["limit"].as_u64(), Some((1 << 20) - 1));
}

/// The GPT header's entry count set to `n`, its CRC made right.
fn gpt_with_entries(path: &Path, n: u32) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 92];
    f.read_exact_at(&mut h, 512).unwrap();
    h[80..84].copy_from_slice(&n.to_le_bytes());
    h[16..20].fill(0);
    let crc = crc32(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, 512).unwrap();
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn gpt_entries_just_past_16384() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.raw");
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    tool_ok(dir.path(), "sgdisk", &["-n", "1:2048:4095", "g.raw"]);
    let json = vmshift_ok(
        dir.path(),
        &["info", "--output", "json", "-f", "raw", "g.raw"],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let l = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "gpt-entries")
        .unwrap()
        .clone();
    assert_eq!(
        (l["value"].as_u64(), l["limit"].as_u64()),
        (Some(128), Some(16384))
    );
    gpt_with_entries(&p, 16385);
    let out = vmshift(dir.path(), &["part", "-f", "raw", "g.raw"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("16385 entries (expected 1 to 16384)"),
        "{said}"
    );
    gpt_with_entries(&p, 16384);
    let out = vmshift(dir.path(), &["part", "-f", "raw", "g.raw"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("expected 1 to 16384"),
        "at the limit: {said}"
    );
}

#[test]
fn info_reports_the_limits_a_qcow2_was_read_within() {
    let dir = tempfile::tempdir().unwrap();
    small_qcow2(dir.path(), "base.qcow2");
    let out = qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert!(out.status.success());
    let get = |name: &str| limit(dir.path(), &["top.qcow2"], name);
    // 64 MiB at 64 KiB clusters: one L1 entry, one refcount table cluster.
    assert_eq!(get("qcow2-l1-table-bytes")["value"].as_u64(), Some(8));
    assert_eq!(
        get("qcow2-l1-table-bytes")["limit"].as_u64(),
        Some(32 << 20)
    );
    assert_eq!(
        get("qcow2-refcount-table-bytes")["value"].as_u64(),
        Some(65536)
    );
    assert_eq!(get("qcow2-backing-name-bytes")["value"].as_u64(), Some(10));
    assert_eq!(get("chain-depth")["value"].as_u64(), Some(2));
    let meta = get("image-metadata-bytes");
    assert!(meta["value"].as_u64().unwrap() <= meta["limit"].as_u64().unwrap());
}

/// An OVA of `linux.ovf` (the fixture) and `extra` more small members.
fn ova_with_members(dir: &Path, name: &str, extra: usize) {
    let stage = dir.join(format!("stage-{extra}"));
    std::fs::create_dir_all(&stage).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vms/ovf/linux.ovf");
    std::fs::copy(&fixture, stage.join("linux.ovf")).unwrap();
    let mut list = vec!["linux.ovf".to_string()];
    for i in 0..extra {
        let n = format!("m{i}.txt");
        std::fs::write(stage.join(&n), b"x").unwrap();
        list.push(n);
    }
    std::fs::write(stage.join("list"), list.join("\n")).unwrap();
    tool_ok(
        &stage,
        "tar",
        &["-cf", dir.join(name).to_str().unwrap(), "-T", "list"],
    );
}

#[test]
fn ova_of_10000_members_reads_and_10001_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    ova_with_members(dir.path(), "at.ova", 9_999);
    ova_with_members(dir.path(), "past.ova", 10_000);
    let at = vmshift(dir.path(), &["vm", "inspect", "at.ova"]);
    let e = String::from_utf8_lossy(&at.stderr);
    assert!(at.status.success(), "at the limit: {e}");
    assert!(String::from_utf8_lossy(&at.stdout).contains("name = \"linux\""));
    let past = vmshift(dir.path(), &["vm", "inspect", "past.ova"]);
    assert!(!past.status.success());
    let e = String::from_utf8_lossy(&past.stderr);
    assert!(e.contains("more than 10000 members; not an OVA"), "{e}");
}

/// CRC-32C, as XFS v5 checksums its metadata.
fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |mut c, &b| {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
        c
    })
}

/// Stores the XFS CRC of `b` (little-endian, computed with the field
/// zeroed) at `at`.
fn xfs_crc(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let c = crc32c(b);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// XFS v5 with 1 KiB blocks (mkfs.xfs -p), one 2 KiB file `/f` whose
/// data fork `xfs_btree_file` then replaces.
fn xfs_with_one_file(d: &Path) -> u64 {
    std::fs::write(d.join("data"), vec![0x5a; 2048]).unwrap();
    std::fs::write(
        d.join("proto"),
        format!(
            "/dev/null\n0 0\nd--755 0 0\nf ---644 0 0 {}\n$\n",
            d.join("data").display()
        ),
    )
    .unwrap();
    let f = std::fs::File::create(d.join("x.img")).unwrap();
    f.set_len(400 << 20).unwrap();
    tool_ok(
        d,
        "mkfs.xfs",
        &[
            "-q",
            "-f",
            "-b",
            "size=1024",
            "-d",
            "agcount=2",
            "-p",
            "proto",
            "x.img",
        ],
    );
    // The inode number, as xfs_db lists it: offset inode type hash ….
    let ls = tool_ok(d, "xfs_db", &["-r", "-c", "ls /", "x.img"]);
    String::from_utf8_lossy(&ls.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[5] == "f")
        .map(|f| f[1].parse().unwrap())
        .expect("/f in xfs_db ls")
}

/// Gives `/f` (inode `ino`) an extent B+tree of `leaves.len()` leaves, the
/// i-th holding `leaves[i]` one-block extents, each extent at its own
/// file block; the blocks are written from allocation group 0's block
/// 100000 on (free: the file system holds one small file, its log is in
/// group 1). Returns how many blocks the tree has (leaves and nodes).
fn xfs_btree_file(d: &Path, ino: u64, leaves: &[usize]) -> usize {
    const BS: usize = 1024;
    const HDR: usize = 72;
    const FIRST: u64 = 100_000;
    let per_block = (BS - HDR) / 16;
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("x.img"))
        .unwrap();
    let mut next = FIRST;
    let mut written = 0;
    let mut block = |level: u16, body: &dyn Fn(&mut [u8]) -> u16| -> u64 {
        let mut b = vec![0u8; BS];
        b[0..4].copy_from_slice(b"BMA3");
        b[4..6].copy_from_slice(&level.to_be_bytes());
        let n = body(&mut b);
        b[6..8].copy_from_slice(&n.to_be_bytes());
        b[8..24].fill(0xff); // no siblings
        b[24..32].copy_from_slice(&(next * (BS as u64 / 512)).to_be_bytes());
        b[56..64].copy_from_slice(&ino.to_be_bytes());
        xfs_crc(&mut b, 64);
        img.write_all_at(&b, next * BS as u64).unwrap();
        written += 1;
        next += 1;
        next - 1
    };
    // The inode, and where its data lies (its one extent, packed in
    // the inode).
    let mut found = None;
    let mut b = vec![0u8; 512];
    for at in (0..64u64 << 20).step_by(512) {
        img.read_exact_at(&mut b, at).unwrap();
        if &b[0..2] == b"IN" && u64::from_be_bytes(b[152..160].try_into().unwrap()) == ino {
            found = Some(at);
            break;
        }
    }
    let inode_at = found.expect("the inode of /f");
    assert_eq!(b[5], 2, "/f in extents format");
    let lo = u64::from_be_bytes(b[184..192].try_into().unwrap());
    let hi = u64::from_be_bytes(b[176..184].try_into().unwrap());
    let data = ((hi & 0x1ff) << 43) | (lo >> 21);
    // Leaves: (first file block, block number).
    let mut level: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    for &n in leaves {
        let first = off;
        let at = block(0, &|b| {
            for i in 0..n {
                let o = first + i as u64;
                // flag 0 | startoff 54 | startblock 52 | blockcount 21:
                // every extent is one block of the file's own data.
                let (start, count) = (data, 1u64);
                let hi = (o << 9) | (start >> 43);
                let lo = (start << 21) | count;
                b[HDR + i * 16..HDR + i * 16 + 8].copy_from_slice(&hi.to_be_bytes());
                b[HDR + i * 16 + 8..HDR + i * 16 + 16].copy_from_slice(&lo.to_be_bytes());
            }
            n as u16
        });
        level.push((first, at));
        off += n as u64;
    }
    // Nodes, until the inode's root (20 pointers in a 512-byte inode)
    // holds a level.
    let root_max = (512 - 176 - 4) / 16;
    let mut height = 1u16;
    while level.len() > root_max {
        level = level
            .chunks(per_block)
            .map(|kids| {
                let at = block(height, &|b| {
                    for (i, (key, ptr)) in kids.iter().enumerate() {
                        b[HDR + i * 8..HDR + i * 8 + 8].copy_from_slice(&key.to_be_bytes());
                        let p = HDR + per_block * 8 + i * 8;
                        b[p..p + 8].copy_from_slice(&ptr.to_be_bytes());
                    }
                    kids.len() as u16
                });
                (kids[0].0, at)
            })
            .collect();
        height += 1;
    }
    // The inode: B+tree format, the extent count, the root.
    b[5] = 3;
    b[56..64].copy_from_slice(&(off * BS as u64).to_be_bytes());
    b[76..80].copy_from_slice(&(off as u32).to_be_bytes());
    b[176..].fill(0);
    b[176..178].copy_from_slice(&height.to_be_bytes());
    b[178..180].copy_from_slice(&(level.len() as u16).to_be_bytes());
    for (i, (key, ptr)) in level.iter().enumerate() {
        b[180 + i * 8..188 + i * 8].copy_from_slice(&key.to_be_bytes());
        let p = 180 + root_max * 8 + i * 8;
        b[p..p + 8].copy_from_slice(&ptr.to_be_bytes());
    }
    xfs_crc(&mut b, 100);
    img.write_all_at(&b, inode_at).unwrap();
    written
}

#[test]
fn xfs_file_of_262145_extents_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ino = xfs_with_one_file(d);
    // 59 extents fill a 1 KiB leaf.
    let mut leaves = vec![59; 262_145 / 59];
    leaves.push(262_145 % 59);
    xfs_btree_file(d, ino, &leaves);
    let o = vmshift(d, &["guest", "cat", "-f", "raw", "x.img", "/f"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains(&format!("inode {ino}: more than 262144 extents")),
        "{e}"
    );
}

#[test]
fn xfs_extent_tree_of_65536_blocks_reads_and_65537_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ino = xfs_with_one_file(d);
    // One extent a leaf: as many leaves as make the whole tree (leaves,
    // and 59-pointer nodes over them) 65537 blocks, then 65536.
    let blocks = |leaves: usize| {
        let (mut n, mut total) = (leaves, leaves);
        while n > 20 {
            n = n.div_ceil(59);
            total += n;
        }
        total
    };
    let past = (60_000..).find(|&l| blocks(l) == 65_537).unwrap();
    assert_eq!(xfs_btree_file(d, ino, &vec![1; past]), 65_537);
    let o = vmshift(d, &["guest", "cat", "-f", "raw", "x.img", "/f"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("has more than 65536 blocks"), "{e}");

    let at = (60_000..).find(|&l| blocks(l) == 65_536).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ino = xfs_with_one_file(d);
    assert_eq!(xfs_btree_file(d, ino, &vec![1; at]), 65_536);
    let o = vmshift(d, &["guest", "cat", "-f", "raw", "x.img", "/f"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // xfs_db reads the same tree: one extent a leaf, no checksum error.
    let bmap = tool_ok(
        d,
        "xfs_db",
        &["-r", "-c", &format!("inode {ino}"), "-c", "bmap", "x.img"],
    );
    let text = String::from_utf8_lossy(&bmap.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("data offset"))
            .count(),
        at
    );
    assert!(
        !String::from_utf8_lossy(&bmap.stderr).contains("CRC"),
        "{}",
        String::from_utf8_lossy(&bmap.stderr)
    );
    // Every extent is the file's first data block.
    assert_eq!(o.stdout.len(), at * 1024);
    assert!(o.stdout.iter().all(|&b| b == 0x5a));
}

/// An XFS file system (mkfs.xfs -p) whose `/big` holds `n` files.
fn xfs_with_directory_of(d: &Path, n: usize) {
    let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\nbig d--755 0 0\n");
    for i in 0..n {
        proto.push_str(&format!("f{i:07} ---644 0 0 /dev/null\n"));
    }
    proto.push_str("$\n$\n");
    std::fs::write(d.join("proto"), proto).unwrap();
    // A million inodes take 512 MiB (and XFS gives inodes a quarter of
    // the space).
    let f = std::fs::File::create(d.join("x.img")).unwrap();
    f.set_len(4 << 30).unwrap();
    tool_ok(d, "mkfs.xfs", &["-q", "-f", "-p", "proto", "x.img"]);
}

/// `guest ls` of `/big` in `img` fails, naming the directory limit.
fn directory_refused(d: &Path, img: &str) {
    let o = vmshift(d, &["guest", "ls", "-f", "raw", img, "/big"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains("more than 1048576 entries, vmshift's limit for one directory"),
        "{e}"
    );
}

#[test]
fn xfs_directory_of_1048576_entries_lists_and_1048577_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    xfs_with_directory_of(d, 1_048_577);
    directory_refused(d, "x.img");
    std::fs::remove_file(d.join("x.img")).unwrap();
    xfs_with_directory_of(d, 1_048_576);
    let o = vmshift(d, &["guest", "ls", "-f", "raw", "x.img", "/big"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names = String::from_utf8_lossy(&o.stdout);
    assert_eq!(names.lines().count(), 1_048_576);
    assert_eq!(names.lines().last(), Some("f1048575"));
}

/// The byte offset of the data of `a.qcow2`'s header extension `magic`.
fn qcow2_extension(path: &Path, magic: u32) -> u64 {
    let b = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize; // header_length (v3)
    loop {
        let (m, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(m, 0, "no extension {magic:#x}");
        if m == magic {
            return at as u64 + 8;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn qcow2_bitmaps_just_past_65535_and_a_directory_past_64_mib_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_qcow2(d, "a.qcow2");
    tool_ok(d, "qemu-img", &["bitmap", "--add", "a.qcow2", "b0"]);
    let p = d.join("a.qcow2");
    let ext = qcow2_extension(&p, 0x2385_2875);
    // nb_bitmaps, then (after 4 reserved bytes) bitmap_directory_size.
    put_be32(&p, ext, 65_536);
    let e = info_error(d, "a.qcow2");
    assert!(
        e.contains("has 65536 bitmaps, more than QEMU's limit of 65535"),
        "{e}"
    );
    // At the limit the header is accepted (the directory, which holds
    // one bitmap, is read only by the commands that use bitmaps).
    put_be32(&p, ext, 65_535);
    let out = vmshift(d, &["info", "a.qcow2"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!e.contains("more than QEMU's limit"), "at the limit: {e}");
    put_be32(&p, ext, 1);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&((64u64 << 20) + 1).to_be_bytes(), ext + 8)
        .unwrap();
    let e = info_error(d, "a.qcow2");
    assert!(e.contains("exceeds QEMU's 64 MiB limit"), "{e}");
}

#[test]
fn qcow2_snapshot_table_just_past_64_mib_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_qcow2(d, "a.qcow2");
    let p = d.join("a.qcow2");
    // Snapshot entries with the longest id and name QEMU's format holds
    // (65535 bytes each, no L1 table): 512 of them are just past 64 MiB.
    let mut entry = vec![0u8; 40];
    entry[12..14].copy_from_slice(&u16::MAX.to_be_bytes());
    entry[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    entry.extend(std::iter::repeat_n(b'i', 65_535));
    entry.extend(std::iter::repeat_n(b'n', 65_535));
    entry.resize(entry.len().next_multiple_of(8), 0);
    let table_at = 1u64 << 20;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    for i in 0..512u64 {
        f.write_all_at(&entry, table_at + i * entry.len() as u64)
            .unwrap();
    }
    assert!(512 * entry.len() as u64 > 64 << 20);
    assert!(511 * entry.len() as u64 <= 64 << 20);
    put_be32(&p, 60, 513); // nb_snapshots
    f.write_all_at(&table_at.to_be_bytes(), 64).unwrap(); // snapshots_offset
    let e = info_error(d, "a.qcow2");
    assert!(
        e.contains("snapshot table exceeds QEMU's 64 MiB limit"),
        "{e}"
    );
}

#[test]
fn qcow2_create_at_the_l1_limit_matches_qemu_img_and_past_it_both_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 64 KiB clusters: one L1 entry covers 512 MiB; 32 MiB of L1 (4 Mi
    // entries) covers 2 PiB.
    let at = (1u64 << 51).to_string();
    let past = ((1u64 << 51) + 512).to_string();
    assert!(
        qemu_img(d, &["create", "-q", "-f", "qcow2", "theirs.qcow2", &at])
            .status
            .success()
    );
    vmshift_ok(d, &["create", "-f", "qcow2", "ours.qcow2", &at]);
    // What qemu-img says of both (compare would walk 2 PiB: 30 s).
    let info = |f: &str| {
        let o = qemu_img(d, &["info", "--output", "json", f]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            v["virtual-size"].clone(),
            v["cluster-size"].clone(),
            v["actual-size"].is_u64(),
        )
    };
    assert_eq!(info("ours.qcow2"), info("theirs.qcow2"));
    let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    assert_eq!(len("ours.qcow2"), len("theirs.qcow2"));
    assert!(qemu_img(d, &["check", "ours.qcow2"]).status.success());
    assert_eq!(
        limit(d, &["ours.qcow2"], "qcow2-l1-table-bytes")["value"],
        32 << 20
    );

    let theirs = qemu_img(d, &["create", "-q", "-f", "qcow2", "t2.qcow2", &past]);
    assert!(!theirs.status.success());
    let ours = vmshift(d, &["create", "-f", "qcow2", "o2.qcow2", &past]);
    let e = String::from_utf8_lossy(&ours.stderr);
    assert!(!ours.status.success());
    assert!(
        e.contains("o2.qcow2: a 2251799813685760-byte image needs an L1 table larger than QEMU's 32 MiB limit"),
        "{e}"
    );
    assert!(
        !e.contains(".tmp"),
        "the temporary file is not the user's: {e}"
    );
    assert_eq!(
        vmshift_tests::names_in(d)
            .iter()
            .filter(|n| n.contains("o2"))
            .count(),
        0
    );
}

/// An ext4 file system (no metadata checksums) whose `/big` is a plain
/// (linear, unindexed) directory of `n` entries, all naming one file:
/// mke2fs makes `/big` with that file, then its blocks are written here
/// (mke2fs -d takes minutes for a million entries) from block 16384 on,
/// free in the 128 MiB file system.
fn ext4_with_directory_of(d: &Path, n: usize) {
    let tree = d.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("big")).unwrap();
    std::fs::write(tree.join("big/one"), b"hi\n").unwrap();
    let f = std::fs::File::create(d.join("e.img")).unwrap();
    f.set_len(128 << 20).unwrap();
    tool_ok(
        d,
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^metadata_csum",
            "-b",
            "4096",
            "-d",
            "tree",
            "e.img",
        ],
    );
    // Where /big's inode is, and the file it holds.
    let num = |out: &std::process::Output, after: &str| -> u64 {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let at = text
            .find(after)
            .unwrap_or_else(|| panic!("{after} in {text}"))
            + after.len();
        let word: String = text[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || *c == 'x')
            .collect();
        match word.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => word.parse().unwrap(),
        }
    };
    let imap = tool_ok(d, "debugfs", &["-R", "imap /big", "e.img"]);
    let (dir_ino, block, offset) = (
        num(&imap, "Inode "),
        num(&imap, "located at block"),
        num(&imap, "offset"),
    );
    let one = num(
        &tool_ok(d, "debugfs", &["-R", "stat /big/one", "e.img"]),
        "Inode:",
    );
    // The directory's blocks: ".", "..", then f0000000…, 16 bytes each.
    const BS: usize = 4096;
    const FIRST: u64 = 16384;
    let entry = |b: &mut Vec<u8>, ino: u64, name: &[u8], kind: u8| {
        let len = (8 + name.len()).next_multiple_of(4);
        b.extend_from_slice(&(ino as u32).to_le_bytes());
        b.extend_from_slice(&(len as u16).to_le_bytes());
        b.push(name.len() as u8);
        b.push(kind);
        b.extend_from_slice(name);
        b.resize(b.len() + len - 8 - name.len(), 0);
    };
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut cur = Vec::with_capacity(BS);
    entry(&mut cur, dir_ino, b".", 2);
    entry(&mut cur, 2, b"..", 2);
    let mut last = 12; // where the last entry of `cur` starts
    for i in 0..n {
        let name = format!("f{i:07}");
        if cur.len() + 16 > BS {
            // The last entry reaches the end of the block.
            let len = (BS - last) as u16;
            cur[last + 4..last + 6].copy_from_slice(&len.to_le_bytes());
            cur.resize(BS, 0);
            blocks.push(std::mem::take(&mut cur));
        }
        last = cur.len();
        entry(&mut cur, one, name.as_bytes(), 1);
    }
    let len = (BS - last) as u16;
    cur[last + 4..last + 6].copy_from_slice(&len.to_le_bytes());
    cur.resize(BS, 0);
    blocks.push(cur);
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("e.img"))
        .unwrap();
    img.write_all_at(&blocks.concat(), FIRST * BS as u64)
        .unwrap();
    // The inode: one extent over them, the size, the block count; not
    // indexed.
    let at = block * BS as u64 + offset;
    let mut inode = vec![0u8; 256];
    img.read_exact_at(&mut inode, at).unwrap();
    let size = (blocks.len() * BS) as u64;
    inode[4..8].copy_from_slice(&(size as u32).to_le_bytes());
    inode[108..112].copy_from_slice(&((size >> 32) as u32).to_le_bytes());
    inode[28..32].copy_from_slice(&((size / 512) as u32).to_le_bytes());
    let flags = u32::from_le_bytes(inode[32..36].try_into().unwrap()) & !0x1000;
    inode[32..36].copy_from_slice(&flags.to_le_bytes());
    let mut extents = Vec::new();
    extents.extend_from_slice(&0xf30au16.to_le_bytes());
    extents.extend_from_slice(&1u16.to_le_bytes()); // entries
    extents.extend_from_slice(&4u16.to_le_bytes()); // max
    extents.extend_from_slice(&0u16.to_le_bytes()); // depth
    extents.extend_from_slice(&0u32.to_le_bytes());
    extents.extend_from_slice(&0u32.to_le_bytes()); // first logical block
    extents.extend_from_slice(&(blocks.len() as u16).to_le_bytes());
    extents.extend_from_slice(&0u16.to_le_bytes());
    extents.extend_from_slice(&(FIRST as u32).to_le_bytes());
    inode[40..40 + extents.len()].copy_from_slice(&extents);
    img.write_all_at(&inode, at).unwrap();
}

#[test]
fn ext4_directory_of_1048576_entries_lists_as_debugfs_and_1048577_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ext4_with_directory_of(d, 1_048_577);
    directory_refused(d, "e.img");
    ext4_with_directory_of(d, 1_048_576);
    let o = vmshift(d, &["guest", "ls", "-f", "raw", "e.img", "/big"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = String::from_utf8_lossy(&o.stdout);
    assert_eq!(ours.lines().count(), 1_048_576);
    // debugfs reads the same directory: its entries and the two dots.
    let theirs = tool_ok(d, "debugfs", &["-R", "ls /big", "e.img"]);
    let names = String::from_utf8_lossy(&theirs.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("(") && w.ends_with(')'))
        .count();
    assert_eq!(names, 1_048_576 + 2);
}

#[test]
fn qcow2_refcount_table_just_past_8_mib_is_refused_as_qemu_img_refuses_it() {
    // 64 KiB clusters: 128 of them are 8 MiB; qemu-img opens that and
    // refuses 129 ("Reference count table too large").
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_qcow2(d, "a.qcow2");
    let p = d.join("a.qcow2");
    put_be32(&p, 56, 129);
    let e = info_error(d, "a.qcow2");
    assert!(
        e.contains("refcount_table_clusters") && e.contains("8 MiB refcount table limit"),
        "{e}"
    );
    assert!(!qemu_img(d, &["info", "a.qcow2"]).status.success());
    put_be32(&p, 56, 128);
    assert!(qemu_img(d, &["info", "a.qcow2"]).status.success());
    vmshift_ok(d, &["info", "a.qcow2"]);
}

#[test]
fn qcow2_backing_name_of_1024_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_qcow2(d, "base.qcow2");
    let o = qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert!(o.status.success());
    let p = d.join("top.qcow2");
    put_be32(&p, 16, 1024); // backing_file_size
    let e = info_error(d, "top.qcow2");
    assert!(
        e.contains("backing_file_size") && e.contains("longer than the 1023 bytes QEMU allows"),
        "{e}"
    );
    assert!(!qemu_img(d, &["info", "top.qcow2"]).status.success());
    // At 1023 the name is read (past its 10 bytes: another name, or
    // another error, not the limit).
    put_be32(&p, 16, 1023);
    let out = vmshift(d, &["info", "top.qcow2"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!e.contains("longer than the 1023"), "{e}");
}

#[test]
fn vmdk_grain_size_and_grain_tables_just_past_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sparse = |name: &str| {
        let o = qemu_img(d, &["create", "-q", "-f", "vmdk", name, "64M"]);
        assert!(o.status.success());
        d.join(name)
    };
    let put_le = |p: &Path, at: u64, v: &[u8]| {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(v, at).unwrap();
    };
    // grainSize (sectors, at 20) and numGTEsPerGT (at 44) of the header.
    let g = sparse("g.vmdk");
    put_le(&g, 20, &8192u64.to_le_bytes());
    let e = info_error(d, "g.vmdk");
    assert!(
        e.contains("grainSize")
            && e.contains("8192 sectors (expected a power of two from 1 to 4096)"),
        "{e}"
    );
    put_le(&g, 20, &4096u64.to_le_bytes());
    let out = vmshift(d, &["info", "g.vmdk"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!e.contains("grainSize"), "at the limit: {e}");
    let t = sparse("t.vmdk");
    put_le(&t, 44, &513u32.to_le_bytes());
    let e = info_error(d, "t.vmdk");
    assert!(
        e.contains("numGTEsPerGT") && e.contains("513 (expected 1 to 512)"),
        "{e}"
    );
    // 512 is what qemu-img writes: the image reads.
    put_le(&t, 44, &512u32.to_le_bytes());
    vmshift_ok(d, &["info", "t.vmdk"]);
}
