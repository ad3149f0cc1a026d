//! The NBD export read by the real peer: `qemu-img` and `qemu-io` connect
//! to vmshift's server and must see exactly the bytes of the image.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vmshift_image::nbd::NbdServer;
use vmshift_image::{open_image, OpenOptions};

fn run(dir: &Path, prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e} (qemu-utils must be installed)"))
}

/// A raw file with a pattern, and its qcow2 copy made by qemu-img.
fn images(dir: &Path) {
    let data: Vec<u8> = (0..(3u32 << 20) + 512).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("d.raw"), &data).unwrap();
    let o = run(
        dir,
        "qemu-img",
        &["convert", "-O", "qcow2", "-f", "raw", "d.raw", "d.qcow2"],
    );
    assert!(o.status.success());
}

fn url(server: &NbdServer) -> String {
    format!("nbd+unix:///?socket={}", server.path().display())
}

#[test]
fn qemu_img_compare_sees_the_image_through_the_export() {
    let dir = tempfile::tempdir().unwrap();
    images(dir.path());
    let reader = open_image(&dir.path().join("d.qcow2"), None, &OpenOptions::default()).unwrap();
    let server = NbdServer::start(Arc::from(reader), &dir.path().join("s.sock")).unwrap();
    let o = run(
        dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &url(&server), "d.raw"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // qemu-img info over NBD reports the guest size.
    let o = run(
        dir.path(),
        "qemu-img",
        &["info", "--output", "json", "-f", "raw", &url(&server)],
    );
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", (3u64 << 20) + 512)),
        "{info}"
    );
}

#[test]
fn writes_through_the_export_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    images(dir.path());
    let before = std::fs::read(dir.path().join("d.qcow2")).unwrap();
    let reader = open_image(&dir.path().join("d.qcow2"), None, &OpenOptions::default()).unwrap();
    let server = NbdServer::start(Arc::from(reader), &dir.path().join("s.sock")).unwrap();
    let o = run(
        dir.path(),
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xaa 0 4096", &url(&server)],
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("ermission denied") || out.contains("read-only") || out.contains("Read-only"),
        "{out}"
    );
    // The server goes on serving reads after refusing the write.
    let o = run(
        dir.path(),
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 0 512", &url(&server)],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 512/512"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    drop(server);
    assert_eq!(std::fs::read(dir.path().join("d.qcow2")).unwrap(), before);
    assert!(!dir.path().join("s.sock").exists());
}
