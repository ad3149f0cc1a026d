//! A RHEL-style guest on two disks, made by Linux itself (libguestfs's
//! appliance: `tests/guests/rhel-lvm.sh`): XFS `/boot` on a partition, a
//! volume group spanning a partition and a whole disk, XFS root on a
//! linear volume that spans both, ext4 on a striped volume, swap, and a
//! raid1 volume. vmshift reads it offline and must agree with what Linux's
//! tools read in the appliance (blkid, lvs, xfs_db) and with
//! virt-inspector.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vmshift_tests::{
    build_guest, finding_codes, json, tool_ok, virt_inspector_agrees, vmshift, vmshift_ok,
};

/// The fixture, built once for the tests of this file (~25 s).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = build_guest("rhel-lvm.sh");
        // The first disk as qcow2: LVs read through vmshift's image drivers.
        tool_ok(
            &dir,
            "qemu-img",
            &["convert", "-O", "qcow2", "rhel1.raw", "rhel1.qcow2"],
        );
        dir
    })
}

/// `blkid -o export` of several devices: device → (KEY → VALUE).
fn blkid_export(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for block in text.split("\n\n") {
        let kv: BTreeMap<String, String> = block
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(dev) = kv.get("DEVNAME") {
            out.insert(dev.replace("/dev/mapper/rhel-", "/dev/rhel/"), kv);
        }
    }
    out
}

/// The entries (name → type) of each directory `xfs_db ls` printed.
fn xfs_db_dirs(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut cur = None;
    for l in text.lines() {
        if let Some(d) = l.strip_suffix(':') {
            cur = Some(d.to_string());
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        if let (Some(d), true) = (&cur, f.len() >= 7) {
            if f[5] != "." && f[5] != ".." {
                out.entry(d.clone())
                    .or_default()
                    .insert(f[5].to_string(), f[2].to_string());
            }
        }
    }
    out
}

#[test]
fn volumes_and_xfs_read_as_linux_reads_them() {
    let d = fixture();
    let disks = ["rhel1.qcow2", "rhel2.raw"];
    let fs = json(
        vmshift_ok(
            d,
            &[
                "guest",
                "filesystems",
                "--output",
                "json",
                disks[0],
                disks[1],
            ],
        )
        .as_bytes(),
    );
    let fs = fs.as_array().unwrap();
    let by_name = |n: &str| {
        fs.iter()
            .find(|f| f["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {fs:?}"))
    };
    // Every file system Linux's blkid sees, with its type, UUID and label.
    let blkid = blkid_export(&std::fs::read_to_string(d.join("src/blkid.txt")).unwrap());
    assert_eq!(blkid.len(), 4, "{blkid:?}");
    for (dev, kv) in &blkid {
        let f = by_name(dev);
        assert_eq!(f["type"], kv["TYPE"].as_str(), "{dev}");
        assert_eq!(f["uuid"], kv["UUID"].as_str(), "{dev}");
        assert_eq!(
            f["label"].as_str(),
            kv.get("LABEL").map(String::as_str),
            "{dev}"
        );
        if f["type"] != "swap" {
            assert_eq!(f["readable"], true, "{dev}");
        }
    }
    // Every LV lvs lists; the raid1 one named as not read, with its type.
    let lvs = std::fs::read_to_string(d.join("src/lvs.txt")).unwrap();
    for l in lvs.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let entry = by_name(&format!("/dev/rhel/{}", f[0]));
        if f[2] == "raid1" {
            assert_eq!(entry["type"], "unknown");
            assert!(entry["note"].as_str().unwrap().contains("raid1"), "{entry}");
        } else {
            assert_ne!(entry["type"], "unknown", "{entry}");
        }
    }
    // XFS written by Linux: a node-form directory of 3000 entries, the
    // root, a file whose extent map is a B+tree, a remote symlink.
    let xdb = std::fs::read_to_string(d.join("src/xfs_db.txt")).unwrap();
    assert!(xdb.contains("core.format = 3 (btree)"), "{xdb}");
    let dirs = xfs_db_dirs(&xdb);
    for (dir, theirs) in &dirs {
        let mut ours: Vec<String> = vmshift_ok(d, &["guest", "ls", disks[0], "-a", disks[1], dir])
            .lines()
            .map(str::to_string)
            .collect();
        ours.sort();
        let theirs: Vec<String> = theirs.keys().cloned().collect();
        assert_eq!(ours, theirs, "{dir}");
    }
    assert_eq!(dirs["/many"].len(), 3000);
    let cat = |p: &str| {
        let o = vmshift(d, &["guest", "cat", disks[0], "-a", disks[1], p]);
        assert!(
            o.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    assert_eq!(cat("/frag"), std::fs::read(d.join("src/frag")).unwrap());
    assert_eq!(cat("/longlink"), b"rhel9.example.com\n");
    // ext4 on the striped volume, by its LV name.
    assert_eq!(cat("/dev/rhel/data:/hello"), b"on a striped volume\n");
    // /boot is its own file system: the root's /boot is an empty folder.
    let boot = vmshift_ok(d, &["guest", "ls", disks[0], "-a", disks[1], "/dev/sda1:/"]);
    assert!(boot.contains("loader") && boot.contains("grub2"), "{boot}");
}

#[test]
fn rhel_inspection_agrees_with_virt_inspector() {
    let d = fixture();
    let v = json(
        vmshift_ok(
            d,
            &[
                "guest",
                "inspect",
                "--output",
                "json",
                "rhel1.qcow2",
                "rhel2.raw",
            ],
        )
        .as_bytes(),
    );
    let os = &v["operatingsystems"][0];
    assert_eq!(os["root"], "/dev/rhel/root");
    virt_inspector_agrees(d, &["rhel1.qcow2", "rhel2.raw"], os);
    // The kernel is found on /boot's own file system, and its dracut
    // initramfs has no virtio.
    assert_eq!(os["kernels"][0]["version"], "5.14.0-362.el9.x86_64");
    assert_eq!(os["kernels"][0]["dracut_hostonly"], true);
    let codes = finding_codes(os);
    assert_eq!(codes, ["guest-initramfs-no-virtio"]);
    assert!(os["findings"][0]["message"]
        .as_str()
        .unwrap()
        .contains("dracut -f"));
}

#[test]
fn damaged_lvm_metadata_is_named_and_the_other_copy_serves() {
    let d = fixture();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    // The whole-disk PV's current metadata text (where its metadata
    // area header's first location points): flip one byte of it.
    let mut pv2 = std::fs::read(d.join("rhel2.raw")).unwrap();
    let mda = pv2[..1 << 20]
        .windows(16)
        .position(|w| w == b" LVM2 x[5A%r0N*>")
        .expect("a metadata area in the first MiB")
        - 4;
    let text = mda + u64::from_le_bytes(pv2[mda + 40..mda + 48].try_into().unwrap()) as usize;
    pv2[text + 10] ^= 0x20;
    std::fs::write(t.join("rhel2.raw"), &pv2).unwrap();
    std::fs::copy(d.join("rhel1.qcow2"), t.join("rhel1.qcow2")).unwrap();
    let fs = vmshift_ok(t, &["guest", "filesystems", "rhel1.qcow2", "rhel2.raw"]);
    let sdb = fs.lines().find(|l| l.starts_with("/dev/sdb ")).unwrap();
    assert!(sdb.contains("checksum mismatch"), "{fs}");
    // The first PV's copy of the VG's metadata still describes every LV.
    assert!(fs.contains("/dev/rhel/root   xfs"), "{fs}");
    let o = vmshift(
        t,
        &[
            "guest",
            "cat",
            "rhel1.qcow2",
            "-a",
            "rhel2.raw",
            "/etc/hostname",
        ],
    );
    assert_eq!(o.stdout, b"rhel9.example.com\n");
    // Without the second disk, the volumes on it are named, not misread.
    let fs = vmshift_ok(t, &["guest", "filesystems", "rhel1.qcow2"]);
    assert!(
        fs.lines()
            .any(|l| l.starts_with("/dev/rhel/root") && l.contains("not on these disks")),
        "{fs}"
    );
    // A PV whose label is damaged is not read as one.
    let mut lbl = pv2.clone();
    lbl[512 + 40] ^= 1;
    std::fs::write(t.join("rhel2.raw"), &lbl).unwrap();
    let fs = vmshift_ok(t, &["guest", "filesystems", "rhel1.qcow2", "rhel2.raw"]);
    assert!(fs.contains("label in sector 1: checksum mismatch"), "{fs}");
}

#[test]
fn vm_boot_finds_the_kernel_on_xfs_boot_and_the_root_on_lvm() {
    // What `vm boot` boots by default: the newest BootLoaderSpec entry on
    // the XFS /boot, its $kernelopts-free options naming the LVM root.
    let d = fixture();
    let open = |p: &str| -> std::sync::Arc<dyn vmshift_image::ImageReader> {
        std::sync::Arc::from(
            vmshift_image::open_image(&d.join(p), None, &vmshift_image::OpenOptions::default())
                .unwrap(),
        )
    };
    let e = vmshift_guest::find_boot_entry(&[open("rhel1.qcow2"), open("rhel2.raw")]).unwrap();
    assert_eq!(
        e.source,
        "/dev/sda1: /loader/entries/0123456789abcdef-5.14.0-362.el9.x86_64.conf"
    );
    assert_eq!(e.kernel_path, "/vmlinuz-5.14.0-362.el9.x86_64");
    assert_eq!(e.kernel.len(), 4096);
    assert!(
        e.cmdline.starts_with("root=/dev/mapper/rhel-root ro"),
        "{}",
        e.cmdline
    );
    let initrd = e.initrd.unwrap().1;
    assert_eq!(initrd, std::fs::read(d.join("src/initramfs.img")).unwrap());
}

/// The whole-disk PV with its current metadata text rewritten by `edit`
/// (the seqno raised so that this copy wins), checksums recomputed as
/// LVM writes them.
fn pv2_with(d: &Path, edit: impl Fn(&str) -> String) -> Vec<u8> {
    let mut pv = std::fs::read(d.join("rhel2.raw")).unwrap();
    let mda = pv[..1 << 20]
        .windows(16)
        .position(|w| w == b" LVM2 x[5A%r0N*>")
        .unwrap()
        - 4;
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (off, size) = (le64(&pv, mda + 40) as usize, le64(&pv, mda + 48) as usize);
    let area = le64(&pv, mda + 32) as usize;
    let text = String::from_utf8_lossy(&pv[mda + off..mda + off + size])
        .trim_end_matches('\0')
        .to_string();
    let seq: u64 = text
        .split("seqno = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let new = edit(&text).replacen(
        &format!("seqno = {seq}"),
        &format!("seqno = {}", seq + 1),
        1,
    );
    // Written after the header, unwrapped: the area must hold it.
    let at = 512;
    assert!(at + new.len() < area, "{} bytes of metadata", new.len());
    pv[mda + at..mda + at + new.len()].copy_from_slice(new.as_bytes());
    pv[mda + 40..mda + 48].copy_from_slice(&(at as u64).to_le_bytes());
    pv[mda + 48..mda + 56].copy_from_slice(&(new.len() as u64).to_le_bytes());
    let c = vmshift_guest::lvm::lvm_crc(new.as_bytes());
    pv[mda + 56..mda + 60].copy_from_slice(&c.to_le_bytes());
    let c = vmshift_guest::lvm::lvm_crc(&pv[mda + 4..mda + 512]);
    pv[mda..mda + 4].copy_from_slice(&c.to_le_bytes());
    pv
}

#[test]
fn hostile_lvm_metadata_is_named_not_misread() {
    let d = fixture();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    std::fs::copy(d.join("rhel1.qcow2"), t.join("rhel1.qcow2")).unwrap();
    let fs_of = |pv: Vec<u8>| {
        std::fs::write(t.join("rhel2.raw"), pv).unwrap();
        let o = vmshift(t, &["guest", "filesystems", "rhel1.qcow2", "rhel2.raw"]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // The edited copy is the one read: the LV renamed.
    let fs = fs_of(pv2_with(d, |t| t.replacen("root {", "slash {", 1)));
    assert!(fs.contains("/dev/rhel/slash"), "{fs}");
    // A name of 100,000 characters lists (no column of that width).
    let long = "r".repeat(100_000);
    let fs = fs_of(pv2_with(d, |t| {
        t.replacen("root {", &format!("{long} {{"), 1)
    }));
    assert!(fs.contains(&format!("/dev/rhel/{long}")));
    // stripe_count that disagrees with the stripes listed.
    let fs = fs_of(pv2_with(d, |t| {
        t.replacen("stripe_count = 2", "stripe_count = 1000", 1)
    }));
    let data = fs
        .lines()
        .find(|l| l.starts_with("/dev/rhel/data"))
        .unwrap();
    assert!(data.contains("stripe_count 1000 but 2 stripes"), "{data}");
    // Two segments over the same extents of the volume.
    let fs = fs_of(pv2_with(d, |t| {
        let i = t
            .find("segment2")
            .expect("root spans two PVs: two segments");
        let (a, b) = t.split_at(i);
        format!(
            "{a}{}",
            b.replacen(
                &b.split("start_extent = ")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .map(|n| format!("start_extent = {n}"))
                    .unwrap(),
                "start_extent = 0",
                1,
            )
        )
    }));
    let root = fs
        .lines()
        .find(|l| l.starts_with("/dev/rhel/root"))
        .unwrap();
    assert!(
        root.contains("unknown") && root.contains("starts at byte"),
        "{root}"
    );
}
