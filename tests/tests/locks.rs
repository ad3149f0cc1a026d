//! QEMU's image locks: an image a running QEMU process holds for writing is
//! refused exactly where qemu-img refuses it, `-U`/`--force-share` reads it
//! anyway, and an image vmshift reads is refused to a QEMU that wants to
//! write it. The holder is a real `qemu-io` session; qemu-img is the
//! oracle for every refusal.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmshift_tests::{qemu_img, tool_ok, vmshift};

/// A `qemu-io` session holding `image` open read-write until dropped.
struct Holder(Child);

impl Holder {
    fn new(dir: &Path, format: &str, image: &str) -> Holder {
        let child = Command::new("qemu-io")
            .args(["-f", format, image])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io (qemu-utils) must be installed");
        let h = Holder(child);
        // Until qemu-io has the image: its lock bytes appear.
        let start = Instant::now();
        while !locked(dir, image) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-io did not lock {image}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(i) = self.0.stdin.as_mut() {
            let _ = i.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

/// True when someone holds QEMU's write-permission byte (101) on `image`.
fn locked(dir: &Path, image: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(dir.join(image)).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8
                && f[1] == "OFDLCK"
                && f[5].ends_with(&format!(":{ino}"))
                && f[6].parse::<u64>().is_ok_and(|s| s <= 101)
                && f[7].parse::<u64>().is_ok_and(|e| e >= 101)
        })
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const REFUSED: &str = "Failed to get shared \"write\" lock";

/// Runs the same command (after the program name) with vmshift and
/// qemu-img and checks they agree: both refuse, with qemu-img's words and
/// exit code, or both succeed.
fn agree(dir: &Path, args: &[&str], refused: bool) {
    let ours = vmshift(dir, args);
    let theirs = qemu_img(dir, args);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "vmshift {args:?}: {}\nqemu-img: {}",
        text(&ours),
        text(&theirs)
    );
    assert_eq!(
        text(&ours).contains(REFUSED),
        refused,
        "vmshift {args:?}: {}",
        text(&ours)
    );
    assert_eq!(
        text(&theirs).contains(REFUSED),
        refused,
        "qemu-img {args:?}: {}",
        text(&theirs)
    );
}

#[test]
fn a_qcow2_a_running_qemu_writes_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"],
    );
    let _h = Holder::new(d, "qcow2", "a.qcow2");
    agree(d, &["info", "a.qcow2"], true);
    agree(d, &["map", "a.qcow2"], true);
    agree(d, &["check", "a.qcow2"], true);
    agree(d, &["compare", "a.qcow2", "b.qcow2"], true);
    agree(d, &["convert", "-O", "raw", "a.qcow2", "out.raw"], true);
    assert!(!d.join("out.raw").exists());
    // -U reads it anyway, for both.
    agree(d, &["info", "-U", "a.qcow2"], false);
    agree(d, &["compare", "-U", "a.qcow2", "b.qcow2"], false);
    agree(
        d,
        &["convert", "-U", "-O", "raw", "a.qcow2", "u.raw"],
        false,
    );
    // The message says what to do.
    let o = vmshift(d, &["info", "a.qcow2"]);
    assert!(text(&o).contains("-U/--force-share"), "{}", text(&o));
}

#[test]
fn a_raw_image_being_written_is_read_by_info_map_compare_but_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("r.raw"), vec![0u8; 1 << 20]).unwrap();
    let _h = Holder::new(d, "raw", "r.raw");
    agree(d, &["info", "-f", "raw", "r.raw"], false);
    agree(d, &["map", "-f", "raw", "r.raw"], false);
    agree(
        d,
        &["compare", "-f", "raw", "-F", "raw", "r.raw", "r.raw"],
        false,
    );
    agree(
        d,
        &["convert", "-f", "raw", "-O", "qcow2", "r.raw", "o.qcow2"],
        true,
    );
}

#[test]
fn a_backing_file_being_written_is_refused_through_its_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    tool_ok(
        d,
        "qemu-img",
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
    let _h = Holder::new(d, "qcow2", "base.qcow2");
    agree(d, &["convert", "-O", "raw", "top.qcow2", "o.raw"], true);
    agree(d, &["info", "-U", "top.qcow2"], false);
}

#[test]
fn a_vm_whose_disk_is_in_use_is_not_converted_without_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            "web.vmdk",
            "8M",
        ],
    );
    std::fs::write(
        d.join("web.vmx"),
        "config.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"web\"\nguestOS = \"debian12-64\"\nmemsize = \"1024\"\nnumvcpus = \"1\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"web.vmdk\"\n",
    )
    .unwrap();
    let _h = Holder::new(d, "vmdk", "web.vmdk");
    let o = vmshift(
        d,
        &[
            "vm", "convert", "web.vmx", "--to", "libvirt", "--out", "out",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(REFUSED), "{}", text(&o));
    assert!(!d.join("out/web.xml").exists());
    let o = vmshift(
        d,
        &[
            "vm", "convert", "-U", "web.vmx", "--to", "libvirt", "--out", "out",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_qemu_that_wants_to_write_an_image_vmshift_reads_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"],
    );
    // The library holds the image as every command does while it reads.
    let reader = vmshift_image::open_image(
        &d.join("a.qcow2"),
        None,
        &vmshift_image::OpenOptions::default(),
    )
    .unwrap();
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", "a.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        text(&o).contains("Failed to get \"write\" lock"),
        "{}",
        text(&o)
    );
    // Reading alongside is fine, as between two QEMUs.
    let o = qemu_img(d, &["info", "a.qcow2"]);
    assert!(o.status.success(), "{}", text(&o));
    drop(reader);
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", "a.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}
