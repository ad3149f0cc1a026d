//! `vmshift check` must agree with `qemu-img check` on clean images and on
//! images with one injected metadata fault: same exit code, same error,
//! corruption and leak counts, same image end offset and cluster statistics.
//!
//! Each test builds a valid image with qemu-img / qemu-io, patches bytes of
//! it here (the layout is found through the header, so it does not depend
//! on where a QEMU version puts things), runs both checkers and compares
//! them; it then also asserts what qemu-img itself reported, so a test
//! cannot pass by both tools being wrong in the same unexpected way.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use vmshift_tests::{patterned_raw, qemu_img, tool_ok, vmshift};

/// The fields compared; qemu-img omits a field whose value is 0.
const FIELDS: [&str; 8] = [
    "check-errors",
    "corruptions",
    "leaks",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
];

const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What qemu-img reported, once both tools were found to agree.
struct Agreed {
    code: Option<i32>,
    json: Value,
    /// Both tools' outputs, for assertion messages.
    both: String,
}

impl Agreed {
    fn get(&self, field: &str) -> u64 {
        field_of(&self.json, field)
    }
}

fn field_of(v: &Value, field: &str) -> u64 {
    v.get(field).and_then(Value::as_u64).unwrap_or(0)
}

fn parse(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn describe(name: &str, out: &Output) -> String {
    format!(
        "{name} exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs both checkers on `file` in `dir` and asserts that they agree.
fn check_both(dir: &Path, file: &str) -> Agreed {
    let q = qemu_img(dir, &["check", "--output", "json", file]);
    let v = vmshift(dir, &["check", "--output", "json", file]);
    let both = format!(
        "\n=== {} ===\n{}\n{}",
        file,
        describe("qemu-img check", &q),
        describe("vmshift check", &v)
    );
    let (qj, vj) = (parse(&q), parse(&v));
    assert!(qj.is_object(), "qemu-img printed no JSON{both}");
    assert!(vj.is_object(), "vmshift printed no JSON{both}");
    assert_eq!(q.status.code(), v.status.code(), "exit codes differ{both}");
    for f in FIELDS {
        assert_eq!(
            field_of(&qj, f),
            field_of(&vj, f),
            "`{f}` differs (qemu-img left, vmshift right){both}"
        );
    }
    Agreed {
        code: q.status.code(),
        json: qj,
        both,
    }
}

fn assert_clean(a: &Agreed) {
    assert_eq!(a.code, Some(0), "expected a clean image{}", a.both);
    for f in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(a.get(f), 0, "expected no {f}{}", a.both);
    }
}

/// `qemu-img create -f qcow2 [opts] name size` in `dir`.
fn create(dir: &Path, name: &str, size: &str, opts: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[name, size]);
    tool_ok(dir, "qemu-img", &args);
}

/// `qemu-io -c cmd name` for each command.
fn io(dir: &Path, name: &str, cmds: &[&str]) {
    for cmd in cmds {
        tool_ok(dir, "qemu-io", &["-c", cmd, name]);
    }
}

/// A 16 MiB image with 1 MiB of data at offset 0, with `opts`.
fn one_meg(dir: &Path, opts: &[&str]) -> &'static str {
    create(dir, "a.qcow2", "16M", opts);
    io(dir, "a.qcow2", &["write -P 0x5a 0 1M"]);
    "a.qcow2"
}

/// An image file loaded into memory to be patched, with its layout.
struct Image {
    path: std::path::PathBuf,
    buf: Vec<u8>,
    cluster_bits: u32,
    l1_offset: u64,
    l1_size: u64,
    reftable_offset: u64,
    reftable_entries: u64,
    refcount_bits: u64,
}

impl Image {
    fn open(dir: &Path, name: &str) -> Image {
        let path = dir.join(name);
        let buf = std::fs::read(&path).expect("read image");
        let be32 = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        assert_eq!(&buf[..4], b"QFI\xfb", "not a qcow2 image");
        let version = be32(4);
        let cluster_bits = be32(20);
        let refcount_order = if version >= 3 { be32(96) } else { 4 };
        let reftable_clusters = u64::from(be32(56));
        Image {
            cluster_bits,
            l1_size: u64::from(be32(36)),
            l1_offset: be64(40),
            reftable_offset: be64(48),
            reftable_entries: (reftable_clusters << cluster_bits) / 8,
            refcount_bits: 1 << refcount_order,
            buf,
            path,
        }
    }

    fn save(&self) {
        std::fs::write(&self.path, &self.buf).expect("write image");
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn u64_at(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_be_bytes(self.buf[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set_u64(&mut self, at: u64, v: u64) {
        let at = at as usize;
        self.buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// File position of active L1 entry `i`.
    fn l1_pos(&self, i: u64) -> u64 {
        assert!(i < self.l1_size, "L1 index {i} out of range");
        self.l1_offset + i * 8
    }

    /// Offset of the first L2 table of the active L1 table.
    fn first_l2(&self) -> u64 {
        (0..self.l1_size)
            .map(|i| self.u64_at(self.l1_pos(i)) & OFFSET_MASK)
            .find(|&o| o != 0)
            .expect("the image has an L2 table")
    }

    /// File position of the first allocated (non-compressed) entry of the
    /// first L2 table, and its value.
    fn first_data_entry(&self) -> (u64, u64) {
        let l2 = self.first_l2();
        (0..self.cs() / 8)
            .map(|i| l2 + i * 8)
            .map(|pos| (pos, self.u64_at(pos)))
            .find(|&(_, e)| e & OFFSET_MASK != 0 && e & OFLAG_COMPRESSED == 0)
            .expect("the L2 table maps a data cluster")
    }

    /// File position of reftable entry `i`.
    fn reftable_pos(&self, i: u64) -> u64 {
        assert!(i < self.reftable_entries, "reftable index {i} out of range");
        self.reftable_offset + i * 8
    }

    /// (byte, shift, mask) of the stored refcount of `cluster`; the
    /// refcount block that covers it must exist.
    fn refcount_slot(&self, cluster: u64) -> (usize, u32, u64) {
        let per_block = (self.cs() * 8) / self.refcount_bits;
        let block = self.u64_at(self.reftable_pos(cluster / per_block)) & !0x1ff;
        assert_ne!(block, 0, "no refcount block covers cluster {cluster}");
        let bit = (cluster % per_block) * self.refcount_bits;
        let byte = (block + bit / 8) as usize;
        let mask = if self.refcount_bits == 64 {
            u64::MAX
        } else {
            (1 << self.refcount_bits) - 1
        };
        (byte, (bit % 8) as u32, mask)
    }

    fn refcount(&self, cluster: u64) -> u64 {
        let (byte, shift, mask) = self.refcount_slot(cluster);
        let width = (self.refcount_bits as usize).div_ceil(8);
        if self.refcount_bits >= 8 {
            let mut v = 0u64;
            for b in &self.buf[byte..byte + width] {
                v = v << 8 | u64::from(*b);
            }
            v
        } else {
            u64::from(self.buf[byte] >> shift) & mask
        }
    }

    fn set_refcount(&mut self, cluster: u64, value: u64) {
        let (byte, shift, mask) = self.refcount_slot(cluster);
        assert_eq!(value & !mask, 0, "refcount {value} does not fit");
        if self.refcount_bits >= 8 {
            let width = self.refcount_bits as usize / 8;
            let bytes = value.to_be_bytes();
            self.buf[byte..byte + width].copy_from_slice(&bytes[8 - width..]);
        } else {
            let b = &mut self.buf[byte];
            *b = (*b & !((mask as u8) << shift)) | ((value as u8) << shift);
        }
    }
}

// ---------------------------------------------------------------------------
// Clean images

#[test]
fn default_image_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let a = check_both(dir.path(), f);
    assert_clean(&a);
    assert_eq!(a.get("allocated-clusters"), 16, "{}", a.both);
}

#[test]
fn empty_image_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "e.qcow2", "1G", &[]);
    assert_clean(&check_both(dir.path(), "e.qcow2"));
}

#[test]
fn compressed_image_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    patterned_raw(&dir.path().join("src.raw"), 8 << 20);
    tool_ok(
        dir.path(),
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"],
    );
    let a = check_both(dir.path(), "c.qcow2");
    assert_clean(&a);
    assert!(
        a.get("compressed-clusters") > 0,
        "no compressed clusters{}",
        a.both
    );
}

#[test]
fn compressed_then_overwritten_clean_exit0() {
    // Compressed clusters sharing host clusters, then some of them replaced
    // by normal ones (which frees parts of shared host clusters).
    let dir = tempfile::tempdir().unwrap();
    patterned_raw(&dir.path().join("src.raw"), 4 << 20);
    tool_ok(
        dir.path(),
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"],
    );
    io(dir.path(), "c.qcow2", &["write -P 0x11 64k 192k"]);
    let a = check_both(dir.path(), "c.qcow2");
    assert_eq!(a.code, Some(0), "{}", a.both);
    assert!(
        a.get("compressed-clusters") > 0,
        "no compressed clusters{}",
        a.both
    );
}

#[test]
fn snapshots_image_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    tool_ok(dir.path(), "qemu-img", &["snapshot", "-c", "s1", f]);
    io(
        dir.path(),
        f,
        &["write -P 0x6b 512k 1M", "write -P 0x11 8M 64k"],
    );
    tool_ok(dir.path(), "qemu-img", &["snapshot", "-c", "s2", f]);
    io(dir.path(), f, &["write -P 0x22 0 64k"]);
    let a = check_both(dir.path(), f);
    assert_clean(&a);
    assert!(a.get("fragmented-clusters") > 0, "{}", a.both);
}

#[test]
fn refcount_bits_1_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "refcount_bits=1"]);
    assert_clean(&check_both(dir.path(), f));
}

#[test]
fn refcount_bits_64_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "refcount_bits=64"]);
    tool_ok(dir.path(), "qemu-img", &["snapshot", "-c", "s1", f]);
    io(dir.path(), f, &["write -P 0x6b 0 64k"]);
    assert_clean(&check_both(dir.path(), f));
}

#[test]
fn cluster_512_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "cluster_size=512"]);
    let a = check_both(dir.path(), f);
    assert_clean(&a);
    assert_eq!(a.get("allocated-clusters"), 2048, "{}", a.both);
}

#[test]
fn cluster_2m_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "a.qcow2", "64M", &["-o", "cluster_size=2M"]);
    io(
        dir.path(),
        "a.qcow2",
        &["write -P 0x5a 0 1M", "write -P 0x5b 7M 3M"],
    );
    assert_clean(&check_both(dir.path(), "a.qcow2"));
}

#[test]
fn compat_010_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "compat=0.10"]);
    tool_ok(dir.path(), "qemu-img", &["snapshot", "-c", "s1", f]);
    io(dir.path(), f, &["write -P 0x6b 0 64k", "write -z 2M 64k"]);
    assert_clean(&check_both(dir.path(), f));
}

#[test]
fn extended_l2_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "extended_l2=on"]);
    io(dir.path(), f, &["write -P 0x6b 3M 4k", "write -z 5M 64k"]);
    assert_clean(&check_both(dir.path(), f));
}

#[test]
fn external_data_file_clean_exit0() {
    // Data at offset 0 of the data file: an L2 entry with offset 0 that
    // only OFLAG_COPIED marks as allocated.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "data_file=a.raw"]);
    io(dir.path(), f, &["write -z 4M 64k"]);
    let a = check_both(dir.path(), f);
    assert_clean(&a);
    assert!(a.get("allocated-clusters") >= 16, "{}", a.both);
}

#[test]
fn persistent_bitmap_clean_exit0() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "a.qcow2", "16M", &[]);
    tool_ok(
        dir.path(),
        "qemu-img",
        &["bitmap", "--add", "a.qcow2", "b0"],
    );
    io(dir.path(), "a.qcow2", &["write -P 0x5a 0 1M"]);
    tool_ok(
        dir.path(),
        "qemu-img",
        &["bitmap", "--add", "--granularity", "512", "a.qcow2", "b1"],
    );
    io(dir.path(), "a.qcow2", &["write -P 0x5b 4M 64k"]);
    assert_clean(&check_both(dir.path(), "a.qcow2"));
}

// ---------------------------------------------------------------------------
// Leaks

#[test]
fn unused_cluster_with_refcount_leak_exit3() {
    // Grow the file by two clusters and give the first new one a refcount:
    // allocated on disk, referenced by nothing.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let cluster = img.len().div_ceil(img.cs());
    img.buf.resize(((cluster + 2) * img.cs()) as usize, 0);
    img.set_refcount(cluster, 1);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(3), "{}", a.both);
    assert_eq!(a.get("leaks"), 1, "{}", a.both);
    assert_eq!(a.get("corruptions"), 0, "{}", a.both);
    assert_eq!(
        a.get("image-end-offset"),
        (cluster + 1) * img.cs(),
        "{}",
        a.both
    );
}

#[test]
fn refcount_past_eof_not_compared_exit0() {
    // A refcount for a cluster past the end of the file (still covered by
    // an existing refcount block): qemu-img compares refcounts only for
    // the clusters the file holds, so this is not even a leak.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let cluster = img.len().div_ceil(img.cs()) + 3;
    img.set_refcount(cluster, 1);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(0), "{}", a.both);
    assert_eq!(a.get("leaks"), 0, "{}", a.both);
}

#[test]
fn data_refcount_two_leak_and_copied_exit2() {
    // A data cluster's refcount raised to 2 with no snapshot: a leak, and
    // its L2 entry's OFLAG_COPIED no longer matches.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (_, entry) = img.first_data_entry();
    img.set_refcount((entry & OFFSET_MASK) >> img.cluster_bits, 2);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.get("leaks"), 1, "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
    assert_eq!(a.code, Some(2), "{}", a.both);
}

// ---------------------------------------------------------------------------
// Corruptions

/// Sets the first data cluster's refcount to 0 in an image made with
/// `opts`: both tools must report the mismatch and the OFLAG_COPIED error.
fn data_refcount_zero_case(opts: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), opts);
    let mut img = Image::open(dir.path(), f);
    let (_, entry) = img.first_data_entry();
    let cluster = (entry & OFFSET_MASK) >> img.cluster_bits;
    assert_eq!(img.refcount(cluster), 1, "refcount of the data cluster");
    img.set_refcount(cluster, 0);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    // The refcount mismatch, and OFLAG_COPIED set on a refcount-0 cluster.
    assert_eq!(a.get("corruptions"), 2, "{}", a.both);
    assert_eq!(a.get("leaks"), 0, "{}", a.both);
}

#[test]
fn data_refcount_zero_corruption_exit2() {
    data_refcount_zero_case(&[]);
}

#[test]
fn data_refcount_zero_refcount_bits_1_corruption_exit2() {
    data_refcount_zero_case(&["-o", "refcount_bits=1"]);
}

#[test]
fn data_refcount_zero_refcount_bits_64_corruption_exit2() {
    data_refcount_zero_case(&["-o", "refcount_bits=64"]);
}

#[test]
fn shared_data_cluster_refcount_bits_1_overflow_exit2() {
    // Two L2 entries naming one host cluster: with 1-bit refcounts the
    // second reference overflows the in-memory count.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "refcount_bits=1"]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    img.set_u64(pos + 8, entry);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert!(a.get("corruptions") >= 1, "{}", a.both);
}

#[test]
fn shared_data_cluster_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    img.set_u64(pos + 8, entry);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    // One cluster referenced twice (refcount 1), one no longer referenced.
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
    assert_eq!(a.get("leaks"), 1, "{}", a.both);
}

#[test]
fn l2_entry_past_eof_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    let far = (img.len().div_ceil(img.cs()) + 100) * img.cs();
    img.set_u64(pos, (entry & !OFFSET_MASK) | far);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    // The reference past the end of the file, and OFLAG_COPIED on a cluster
    // with refcount 0; the cluster the entry used to name is leaked.
    assert_eq!(a.get("corruptions"), 2, "{}", a.both);
    assert_eq!(a.get("leaks"), 1, "{}", a.both);
    assert_eq!(a.get("image-end-offset"), img.len(), "{}", a.both);
}

#[test]
fn l2_entry_just_past_eof_corruption_exit2() {
    // The first cluster past the end of the file.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    let next = img.len().div_ceil(img.cs()) * img.cs();
    img.set_u64(pos, (entry & !OFFSET_MASK) | next);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
}

#[test]
fn l2_table_refcount_two_corruption_exit2() {
    // OFLAG_COPIED set in the L1 entry of an L2 table with refcount 2.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let l2 = img.first_l2();
    img.set_refcount(l2 >> img.cluster_bits, 2);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
    assert_eq!(a.get("leaks"), 1, "{}", a.both);
}

#[test]
fn l2_entry_unaligned_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    img.set_u64(pos, entry + 512);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    // The misalignment, and the next data cluster counted twice: the
    // cluster-sized range from the unaligned offset reaches into it.
    assert_eq!(a.get("corruptions"), 2, "{}", a.both);
    assert_eq!(a.get("leaks"), 0, "{}", a.both);
}

#[test]
fn l2_entry_reserved_bit_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    img.set_u64(pos, entry | 0x2);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
}

#[test]
fn l2_entry_copied_cleared_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    img.set_u64(pos, entry & !OFLAG_COPIED);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
}

#[test]
fn external_data_copied_cleared_corruption_exit2() {
    // Clusters of an external data file always have refcount 1.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "data_file=a.raw"]);
    let mut img = Image::open(dir.path(), f);
    let (pos, entry) = img.first_data_entry();
    img.set_u64(pos, entry & !OFLAG_COPIED);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
}

#[test]
fn l1_entry_reserved_bit_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let pos = img.l1_pos(0);
    let e = img.u64_at(pos);
    img.set_u64(pos, e | 0x1);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
}

#[test]
fn l1_entry_unaligned_corruption_exit2() {
    // The L2 table is read from the unaligned offset anyway: its entries
    // then come from the next cluster (our 0x5a data, which decodes as
    // compressed entries far past the end of the file).
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let pos = img.l1_pos(0);
    let e = img.u64_at(pos);
    img.set_u64(pos, e + 512);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert!(a.get("corruptions") > 1, "{}", a.both);
}

#[test]
fn l1_entry_past_eof_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let pos = img.l1_pos(0);
    let e = img.u64_at(pos);
    let far = (img.len().div_ceil(img.cs()) + 7) * img.cs();
    img.set_u64(pos, (e & !OFFSET_MASK) | far);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
}

#[test]
fn l1_entry_flags_only_corruption_exit2() {
    // A non-zero L1 entry with a zero offset: QEMU counts a reference to
    // cluster 0 and reads the header as an L2 table.
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "a.qcow2", "2G", &[]);
    io(dir.path(), "a.qcow2", &["write -P 0x5a 0 1M"]);
    let f = "a.qcow2";
    let mut img = Image::open(dir.path(), f);
    let pos = img.l1_pos(1);
    img.set_u64(pos, OFLAG_COPIED);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
}

#[test]
fn refblock_outside_image_corruption_exit2() {
    // An unused reftable entry pointing past the end of the file.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let far = (img.len().div_ceil(img.cs()) + 5) * img.cs();
    let pos = img.reftable_pos(1);
    img.set_u64(pos, far);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
    assert_eq!(a.get("leaks"), 0, "{}", a.both);
}

#[test]
fn first_refblock_outside_image_corruption_exit2() {
    // The refcount block covering every cluster moved past the end of the
    // file: every refcount reads as 0.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let far = (img.len().div_ceil(img.cs()) + 5) * img.cs();
    let pos = img.reftable_pos(0);
    img.set_u64(pos, far);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert!(a.get("corruptions") > 1, "{}", a.both);
}

#[test]
fn refblock_reserved_bit_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let pos = img.reftable_pos(0);
    let e = img.u64_at(pos);
    img.set_u64(pos, e | 0x1);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    // The reserved bit; the refcount block is then not counted (a leak).
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
    assert_eq!(a.get("leaks"), 1, "{}", a.both);
}

#[test]
fn refblock_unaligned_check_error_exit1() {
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    let mut img = Image::open(dir.path(), f);
    let pos = img.reftable_pos(0);
    let e = img.u64_at(pos);
    img.set_u64(pos, e + 512);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(1), "{}", a.both);
    assert!(a.get("check-errors") > 0, "{}", a.both);
}

#[test]
fn compressed_entry_past_eof_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    patterned_raw(&dir.path().join("src.raw"), 4 << 20);
    tool_ok(
        dir.path(),
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"],
    );
    let mut img = Image::open(dir.path(), "c.qcow2");
    let l2 = img.first_l2();
    let (pos, entry) = (0..img.cs() / 8)
        .map(|i| (l2 + i * 8, img.u64_at(l2 + i * 8)))
        .find(|&(_, e)| e & OFLAG_COMPRESSED != 0)
        .expect("a compressed entry");
    // Keep the sector count, move the data far past the end.
    let offset_bits = 62 - (img.cluster_bits - 8);
    let far = (img.len().div_ceil(img.cs()) + 50) * img.cs() + 1000;
    let entry = (entry & !((1u64 << offset_bits) - 1)) | far;
    img.set_u64(pos, entry);
    img.save();
    let a = check_both(dir.path(), "c.qcow2");
    assert_eq!(a.code, Some(2), "{}", a.both);
}

#[test]
fn compressed_entry_copied_corruption_exit2() {
    let dir = tempfile::tempdir().unwrap();
    patterned_raw(&dir.path().join("src.raw"), 4 << 20);
    tool_ok(
        dir.path(),
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"],
    );
    let mut img = Image::open(dir.path(), "c.qcow2");
    let l2 = img.first_l2();
    let (pos, entry) = (0..img.cs() / 8)
        .map(|i| (l2 + i * 8, img.u64_at(l2 + i * 8)))
        .find(|&(_, e)| e & OFLAG_COMPRESSED != 0)
        .expect("a compressed entry");
    img.set_u64(pos, entry | OFLAG_COPIED);
    img.save();
    let a = check_both(dir.path(), "c.qcow2");
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
}

#[test]
fn snapshot_l1_entry_past_eof_corruption_exit2() {
    // An inactive (snapshot) L2 table past the end of the file.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    tool_ok(dir.path(), "qemu-img", &["snapshot", "-c", "s1", f]);
    io(dir.path(), f, &["write -P 0x6b 0 1M"]);
    let mut img = Image::open(dir.path(), f);
    let snapshots_offset = img.u64_at(64);
    let sn_l1 = img.u64_at(snapshots_offset);
    let e = img.u64_at(sn_l1);
    assert_ne!(e, 0, "the snapshot maps an L2 table");
    let far = (img.len().div_ceil(img.cs()) + 9) * img.cs();
    img.set_u64(sn_l1, (e & !OFFSET_MASK) | far);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
}

#[test]
fn snapshot_l1_unaligned_corruption_exit2() {
    // A snapshot whose L1 table is misaligned is skipped: its clusters
    // then look leaked.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &[]);
    tool_ok(dir.path(), "qemu-img", &["snapshot", "-c", "s1", f]);
    let mut img = Image::open(dir.path(), f);
    let snapshots_offset = img.u64_at(64);
    let sn_l1 = img.u64_at(snapshots_offset);
    img.set_u64(snapshots_offset, sn_l1 + 512);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
    assert!(a.get("leaks") > 1, "{}", a.both);
}

#[test]
fn extended_l2_bitmap_corruption_exit2() {
    // An allocated cluster whose subcluster is both allocated and zero.
    let dir = tempfile::tempdir().unwrap();
    let f = one_meg(dir.path(), &["-o", "extended_l2=on"]);
    let mut img = Image::open(dir.path(), f);
    let l2 = img.first_l2();
    let bitmap = img.u64_at(l2 + 8);
    assert_ne!(bitmap & 1, 0, "subcluster 0 is allocated");
    img.set_u64(l2 + 8, bitmap | 1 << 32);
    img.save();
    let a = check_both(dir.path(), f);
    assert_eq!(a.code, Some(2), "{}", a.both);
    assert_eq!(a.get("corruptions"), 1, "{}", a.both);
}

/// A qcow2 cut short: reading names the L2 entry that really points past
/// the end (where it lies, in which table) and the guest range it hides;
/// `compare` reads the missing data as zeros and reports the mismatch
/// exactly as qemu-img does.
#[test]
fn a_truncated_qcow2_names_the_entry_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "t.qcow2", "4M", &[]);
    io(d, "t.qcow2", &["write -P 0x22 0 4M"]);
    std::fs::copy(d.join("t.qcow2"), d.join("cut.qcow2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("cut.qcow2"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    // Where qemu-img put things: the data run's host start, the L2 table.
    let map = qemu_img(d, &["map", "--output=json", "t.qcow2"]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let data_at = map[0]["offset"].as_u64().unwrap();
    let bytes = std::fs::read(d.join("t.qcow2")).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l2 = be(be(40) as usize) & 0x00ff_ffff_ffff_fe00;
    let lost = (1u64 << 20) - data_at;
    let entry = l2 + (lost >> 16) * 8;
    let o = vmshift(d, &["convert", "-O", "raw", "cut.qcow2", "o.raw"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        format!("L2 entry (table at {l2:#x}) (at offset {entry:#x})"),
        format!("guest offset {lost:#x} is at host offset 0x100000"),
    ] {
        assert!(err.contains(&want), "{want}: {err}");
    }
    assert!(!d.join("o.raw").exists());
    for (a, b) in [("cut.qcow2", "t.qcow2"), ("t.qcow2", "cut.qcow2")] {
        let ours = vmshift(d, &["compare", a, b]);
        let theirs = qemu_img(d, &["compare", a, b]);
        assert_eq!(ours.status.code(), theirs.status.code());
        assert_eq!(ours.stdout, theirs.stdout);
        assert!(
            String::from_utf8_lossy(&ours.stdout).contains(&format!("offset {lost}!")),
            "{}",
            String::from_utf8_lossy(&ours.stdout)
        );
    }
}

// ---------------------------------------------------------------------------
// Repair (`check -r`): the same damage in two copies, one repaired by
// qemu-img, one by vmshift; the same lines, the same exit code, the same
// counts, and afterwards images qemu-img finds equally clean and equal.

/// Damage the way `kind` says, in `name`.
fn damaged(dir: &Path, name: &str, kind: &str) {
    create(dir, name, "4M", &[]);
    match kind {
        // Two data clusters no L2 entry points to any more.
        "leak" => {
            io(dir, name, &["write -P 1 0 256k"]);
            let mut img = Image::open(dir, name);
            let l2 = img.first_l2();
            img.set_u64(l2 + 8, 0);
            img.set_u64(l2 + 16, 0);
            img.save();
        }
        // A cluster a snapshot shares, with refcount 1 instead of 2.
        "low" => {
            io(dir, name, &["write -P 1 0 128k"]);
            tool_ok(dir, "qemu-img", &["snapshot", "-c", "s1", name]);
            let mut img = Image::open(dir, name);
            let (_, e) = img.first_data_entry();
            img.set_refcount((e & OFFSET_MASK) >> img.cluster_bits, 1);
            img.save();
        }
        // OFLAG_COPIED set on a cluster a snapshot shares.
        "copied" => {
            io(dir, name, &["write -P 1 0 128k"]);
            tool_ok(dir, "qemu-img", &["snapshot", "-c", "s1", name]);
            let mut img = Image::open(dir, name);
            let (pos, e) = img.first_data_entry();
            img.set_u64(pos, e | OFLAG_COPIED);
            img.save();
        }
        // A referenced cluster with refcount 0: only a rebuild fixes it.
        "zero" => {
            io(dir, name, &["write -P 1 0 128k"]);
            let mut img = Image::open(dir, name);
            let (_, e) = img.first_data_entry();
            img.set_refcount((e & OFFSET_MASK) >> img.cluster_bits, 0);
            img.save();
        }
        _ => unreachable!("{kind}"),
    }
}

fn text(b: &[u8], name: &str) -> String {
    String::from_utf8_lossy(b).replace(name, "IMG")
}

#[test]
fn repair_does_what_qemu_img_check_r_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for kind in ["leak", "low", "copied"] {
        for fix in ["leaks", "all"] {
            damaged(d, "q.qcow2", kind);
            std::fs::copy(d.join("q.qcow2"), d.join("v.qcow2")).unwrap();
            let theirs = qemu_img(d, &["check", "-r", fix, "q.qcow2"]);
            let ours = vmshift(d, &["check", "-r", fix, "v.qcow2"]);
            let case = format!("{kind} -r {fix}");
            assert_eq!(ours.status.code(), theirs.status.code(), "{case}");
            assert_eq!(
                text(&ours.stdout, "v.qcow2"),
                text(&theirs.stdout, "q.qcow2"),
                "{case}"
            );
            assert_eq!(
                text(&ours.stderr, "v.qcow2"),
                text(&theirs.stderr, "q.qcow2"),
                "{case}"
            );
            // Afterwards: the same verdict from qemu-img, the same content.
            let after = |f: &str| qemu_img(d, &["check", "--output", "json", f]);
            let (a, b) = (after("v.qcow2"), after("q.qcow2"));
            assert_eq!(a.status.code(), b.status.code(), "{case}");
            for field in FIELDS {
                assert_eq!(
                    field_of(&parse(&a), field),
                    field_of(&parse(&b), field),
                    "{case} {field}"
                );
            }
            tool_ok(d, "qemu-img", &["compare", "q.qcow2", "v.qcow2"]);
            // JSON: the counts repaired, by name.
            damaged(d, "v.qcow2", kind);
            damaged(d, "q.qcow2", kind);
            let theirs = parse(&qemu_img(
                d,
                &["check", "-r", fix, "--output", "json", "q.qcow2"],
            ));
            let ours = parse(&vmshift(
                d,
                &["check", "-r", fix, "--output", "json", "v.qcow2"],
            ));
            for field in FIELDS.iter().chain(&["leaks-fixed", "corruptions-fixed"]) {
                assert_eq!(
                    field_of(&ours, field),
                    field_of(&theirs, field),
                    "{case} json {field}"
                );
            }
        }
    }
}

#[test]
fn repair_rebuilds_the_refcount_structure_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    damaged(d, "q.qcow2", "zero");
    std::fs::copy(d.join("q.qcow2"), d.join("v.qcow2")).unwrap();
    // -r leaks: the same error and exit code as qemu-img, nothing written.
    let before = std::fs::read(d.join("v.qcow2")).unwrap();
    let theirs = qemu_img(d, &["check", "-r", "leaks", "q.qcow2"]);
    let ours = vmshift(d, &["check", "-r", "leaks", "v.qcow2"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(theirs.status.code(), Some(1));
    assert!(text(&ours.stderr, "v.qcow2").contains("ERROR need to rebuild refcount structures"));
    assert_eq!(std::fs::read(d.join("v.qcow2")).unwrap(), before);
    assert_eq!(std::fs::read(d.join("q.qcow2")).unwrap(), before);
    // -r all: a new refcount structure, placed where QEMU places it; the
    // same lines, and the same file to the byte — with one refcount block
    // and with many (512-byte clusters: a block per 128 KiB).
    for opts in [&[][..], &["-o", "cluster_size=512"][..]] {
        create(d, "q.qcow2", "8M", opts);
        io(d, "q.qcow2", &["write -P 1 0 3M"]);
        let mut img = Image::open(d, "q.qcow2");
        let (_, e) = img.first_data_entry();
        img.set_refcount((e & OFFSET_MASK) >> img.cluster_bits, 0);
        img.save();
        std::fs::copy(d.join("q.qcow2"), d.join("v.qcow2")).unwrap();
        let theirs = qemu_img(d, &["check", "-r", "all", "q.qcow2"]);
        let ours = vmshift(d, &["check", "-r", "all", "v.qcow2"]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{opts:?}");
        assert_eq!(
            text(&ours.stdout, "v.qcow2"),
            text(&theirs.stdout, "q.qcow2"),
            "{opts:?}"
        );
        assert_eq!(
            text(&ours.stderr, "v.qcow2"),
            text(&theirs.stderr, "q.qcow2"),
            "{opts:?}"
        );
        assert!(text(&ours.stderr, "v").contains("Rebuilding refcount structure"));
        assert_eq!(
            std::fs::read(d.join("v.qcow2")).unwrap(),
            std::fs::read(d.join("q.qcow2")).unwrap(),
            "{opts:?}"
        );
    }
}

#[test]
fn repair_refuses_what_it_cannot_do_or_cannot_lock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An L2 entry pointing at an unaligned offset: tables to rewrite,
    // which vmshift does not do: refused before anything is written.
    create(d, "u.qcow2", "4M", &[]);
    io(d, "u.qcow2", &["write -P 1 0 128k"]);
    let mut img = Image::open(d, "u.qcow2");
    let (pos, e) = img.first_data_entry();
    img.set_u64(pos, e | 0x200);
    img.save();
    let before = std::fs::read(d.join("u.qcow2")).unwrap();
    let ours = vmshift(d, &["check", "-r", "all", "u.qcow2"]);
    assert_eq!(ours.status.code(), Some(1));
    assert!(
        text(&ours.stderr, "u").contains("has written nothing"),
        "{}",
        text(&ours.stderr, "u")
    );
    assert_eq!(std::fs::read(d.join("u.qcow2")).unwrap(), before);
    // Formats without a repair: qemu-img's 63.
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "vmdk", "v.vmdk", "4M"],
    );
    assert_eq!(
        qemu_img(d, &["check", "-r", "leaks", "v.vmdk"])
            .status
            .code(),
        Some(63)
    );
    assert_eq!(
        vmshift(d, &["check", "-r", "leaks", "v.vmdk"])
            .status
            .code(),
        Some(63)
    );
    // An image a QEMU process has open is not repaired under it.
    damaged(d, "held.qcow2", "leak");
    let sock = d.join("held.sock");
    let mut nbd = std::process::Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--socket",
            sock.to_str().unwrap(),
            "held.qcow2",
        ])
        .current_dir(d)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ours = vmshift(d, &["check", "-r", "leaks", "held.qcow2"]);
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert_ne!(
        ours.status.code(),
        Some(0),
        "{}",
        text(&ours.stderr, "held")
    );
    assert!(
        text(&ours.stderr, "held").contains("lock"),
        "{}",
        text(&ours.stderr, "held")
    );
    assert_eq!(
        qemu_img(d, &["check", "held.qcow2"]).status.code(),
        Some(3),
        "still leaking"
    );
}

#[test]
fn a_repair_that_leaves_no_corruption_marks_the_image_clean_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The corrupt bit (QEMU set it when it found damage) and the dirty bit
    // (a lazy-refcounts image that crashed), each on an otherwise clean
    // image, and with a leak to repair.
    for (bit, kind) in [(0x02u8, "leak"), (0x01, "leak"), (0x02, "low")] {
        damaged(d, "q.qcow2", kind);
        let mut img = std::fs::read(d.join("q.qcow2")).unwrap();
        img[79] |= bit;
        std::fs::write(d.join("q.qcow2"), &img).unwrap();
        std::fs::copy(d.join("q.qcow2"), d.join("v.qcow2")).unwrap();
        let theirs = qemu_img(d, &["check", "-r", "all", "q.qcow2"]);
        let ours = vmshift(d, &["check", "-r", "all", "v.qcow2"]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{bit} {kind}");
        assert_eq!(
            std::fs::read(d.join("v.qcow2")).unwrap(),
            std::fs::read(d.join("q.qcow2")).unwrap(),
            "bit {bit} {kind}: the repaired files differ"
        );
        // QEMU opens it for writing again.
        tool_ok(d, "qemu-io", &["-c", "write 0 512", "v.qcow2"]);
    }
}

#[test]
fn refcount_overflow_says_what_qemu_img_says() {
    // One-bit refcounts, and a cluster two L2 entries point to: the
    // second reference overflows; the same lines as qemu-img, hint included.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "o.qcow2", "4M", &["-o", "refcount_bits=1"]);
    io(d, "o.qcow2", &["write -P 1 0 128k"]);
    let mut img = Image::open(d, "o.qcow2");
    let l2 = img.first_l2();
    let e0 = img.u64_at(l2);
    img.set_u64(l2 + 8, e0);
    img.save();
    let theirs = qemu_img(d, &["check", "o.qcow2"]);
    let ours = vmshift(d, &["check", "o.qcow2"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(ours.stdout, theirs.stdout);
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert!(String::from_utf8_lossy(&ours.stderr).contains("Use qemu-img amend"));
}
