//! The NBD export read by the real peer: `qemu-img` and `qemu-io` connect
//! to vmshift's server and must see exactly the bytes of the image.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vmshift_image::nbd::{NbdExport, NbdServer};
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

/// A writable export: a buffer in memory that refuses writes past a limit
/// of changed bytes, as vm boot's overlay does.
struct Buffer {
    data: std::sync::Mutex<Vec<u8>>,
    written: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl NbdExport for Buffer {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.written.load(Ordering::SeqCst) + data.len() as u64 > self.limit {
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        self.written.fetch_add(data.len() as u64, Ordering::SeqCst);
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn a_writable_export_takes_writes_and_reports_a_full_overlay_as_enospc() {
    let dir = tempfile::tempdir().unwrap();
    let export = Arc::new(Buffer {
        data: std::sync::Mutex::new(vec![0u8; 1 << 20]),
        written: 0.into(),
        limit: 64 << 10,
    });
    let server = NbdServer::start_export(export.clone(), &dir.path().join("s.sock")).unwrap();
    // qemu-io writes a pattern, reads it back and checks it.
    let o = run(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 8192 4096",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 8192 4096",
            "-c",
            "read -P 0 0 8192",
            &url(&server),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("wrote 4096/4096"), "{out}");
    assert_eq!(export.data.lock().unwrap()[8192..12288], [0x5a; 4096]);
    // Past the limit the client gets ENOSPC, and the data is unchanged.
    let o = run(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 65536 131072",
            &url(&server),
        ],
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("No space left on device"), "{out}");
    assert!(export.data.lock().unwrap()[65536..196608]
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn clients_past_the_connection_limit_are_closed_at_once() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    images(dir.path());
    let reader = open_image(&dir.path().join("d.raw"), None, &OpenOptions::default()).unwrap();
    let server = NbdServer::start(Arc::from(reader), &dir.path().join("s.sock")).unwrap();
    let limit = vmshift_model::limits::NBD_CONNECTIONS;
    // Each client reads the server's greeting and then stays, idle.
    let mut held = Vec::new();
    for _ in 0..limit {
        let mut c = UnixStream::connect(server.path()).unwrap();
        let mut magic = [0u8; 8];
        c.read_exact(&mut magic).unwrap();
        assert_eq!(&magic, b"NBDMAGIC");
        held.push(c);
    }
    let mut extra = UnixStream::connect(server.path()).unwrap();
    extra
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(extra.read(&mut b).unwrap(), 0, "closed without a greeting");
    // One client leaves: a new one is served again.
    drop(held.pop());
    let start = std::time::Instant::now();
    loop {
        let mut c = UnixStream::connect(server.path()).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        if c.read(&mut b).unwrap() == 8 {
            assert_eq!(&b, b"NBDMAGIC");
            break;
        }
        assert!(start.elapsed().as_secs() < 10, "no room for a new client");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
