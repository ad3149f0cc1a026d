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
