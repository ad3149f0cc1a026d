//! The sandbox, seen from outside: a running command's /proc status says
//! no_new_privs and a seccomp filter, for a command that reads and for one
//! that writes; --no-sandbox leaves only no_new_privs. (What the sandbox
//! refuses is tested inside the crate, on a confined test thread.)

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmshift_tests::vmshift_bin;

/// A raw image with 4 KiB of data every 8 KiB: thousands of extents.
fn holey_raw(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let block = [0x5au8; 4096];
    for at in (0..size).step_by(8192) {
        f.write_all_at(&block, at).unwrap();
    }
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(vmshift_bin())
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running vmshift")
}

/// The child's /proc status once `ready` says so; None if it exited
/// first.
fn status_when(child: &mut Child, ready: impl Fn(&str) -> bool) -> Option<String> {
    let path = format!("/proc/{}/status", child.id());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if let Ok(s) = std::fs::read_to_string(&path) {
            if ready(&s) {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no status within 30 s");
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{name} missing from {status}"))
}

/// The capability sets (effective, permitted, bounding) of every thread
/// of `child`, as /proc shows them.
fn capabilities(child: &Child) -> Vec<(u64, u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).ok())
        .map(|s| {
            let hex = |name: &str| u64::from_str_radix(field(&s, name), 16).unwrap();
            (hex("CapEff"), hex("CapPrm"), hex("CapBnd"))
        })
        .collect()
}

/// CAP_DAC_OVERRIDE and CAP_FOWNER: what a writing command keeps.
const WRITE_CAPS: u64 = 1 << 1 | 1 << 3;

/// Whether this test runs as root (with capabilities to drop).
fn privileged() -> bool {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    field(&own, "CapEff") != "0000000000000000"
}

fn finish(mut child: Child) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "vmshift failed ({st}): {err}");
    (out, err)
}

#[test]
fn a_reading_command_runs_with_no_new_privs_and_seccomp() {
    let dir = tempfile::tempdir().unwrap();
    holey_raw(&dir.path().join("h.raw"), 64 << 20);
    // Its map is larger than a pipe holds: it waits for us, confined.
    let mut child = spawn(
        dir.path(),
        &["map", "--output", "json", "-f", "raw", "h.raw"],
    );
    let status = status_when(&mut child, |s| s.contains("Seccomp_filters:\t4"))
        .expect("map ended before its status was read");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "Seccomp"), "2");
    // Four filters: x32 calls, clone3, opening a file, and the calls no
    // command makes.
    assert_eq!(field(&status, "Seccomp_filters"), "4");
    // No capability left, on any thread, whoever runs it (as root, the
    // bounding set is emptied too).
    for (eff, prm, bnd) in capabilities(&child) {
        assert_eq!((eff, prm), (0, 0));
        if privileged() {
            assert_eq!(bnd, 0, "bounding set");
        }
    }
    let (out, _) = finish(child);
    let map: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(map.as_array().unwrap().len(), 2 * (64 << 20) / 8192);
}

#[test]
fn a_writing_command_runs_with_no_new_privs_and_seccomp() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    {
        let f = std::fs::File::create(&src).unwrap();
        let chunk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        for i in 0..128u64 {
            f.write_all_at(&chunk, i * (4 << 20)).unwrap();
        }
    }
    let mut child = spawn(
        dir.path(),
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "big.raw",
            "out.qcow2",
        ],
    );
    let status = status_when(&mut child, |s| s.contains("Seccomp_filters:\t3"))
        .expect("convert of 512 MiB ended before its status was read");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    // Three filters: a command that writes may open files (Landlock keeps
    // it to the target's folder).
    assert_eq!(field(&status, "Seccomp_filters"), "3");
    // At most CAP_DAC_OVERRIDE and CAP_FOWNER (root writing into a
    // folder it does not own), on every thread.
    for (eff, prm, bnd) in capabilities(&child) {
        assert_eq!((eff & !WRITE_CAPS, prm & !WRITE_CAPS), (0, 0));
        if privileged() {
            assert_eq!(bnd, WRITE_CAPS, "bounding set");
        }
    }
    finish(child);
    let out = vmshift_tests::qemu_img(dir.path(), &["compare", "big.raw", "out.qcow2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn no_sandbox_leaves_only_no_new_privs_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    holey_raw(&dir.path().join("h.raw"), 64 << 20);
    let mut child = spawn(
        dir.path(),
        &[
            "map",
            "--no-sandbox",
            "--output",
            "json",
            "-f",
            "raw",
            "h.raw",
        ],
    );
    let status = status_when(&mut child, |s| s.contains("NoNewPrivs:\t1"))
        .expect("map ended before its status was read");
    // Read while it waits on the full pipe: nothing more is coming.
    std::thread::sleep(Duration::from_millis(200));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or(status);
    assert_eq!(field(&status, "Seccomp"), "0");
    let (_, err) = finish(child);
    assert!(
        err.contains("--no-sandbox: Landlock and seccomp are off"),
        "{err}"
    );
}

#[test]
fn vm_convert_copies_its_disks_confined() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("big.raw");
    {
        let f = std::fs::File::create(&disk).unwrap();
        let chunk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        for i in 0..128u64 {
            f.write_all_at(&chunk, i * (4 << 20)).unwrap();
        }
    }
    std::fs::write(
        dir.path().join("big.xml"),
        "<domain type='kvm'><name>big</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='big.raw'/><target dev='vda' bus='virtio'/></disk>\
         </devices></domain>",
    )
    .unwrap();
    let mut child = spawn(
        dir.path(),
        &[
            "vm",
            "convert",
            "--to",
            "qemu-args",
            "--out",
            "new/vm",
            "big.xml",
        ],
    );
    let status = status_when(&mut child, |s| s.contains("Seccomp_filters:\t3"))
        .expect("vm convert of 512 MiB ended before its status was read");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    for (eff, prm, _) in capabilities(&child) {
        assert_eq!((eff & !WRITE_CAPS, prm & !WRITE_CAPS), (0, 0));
    }
    finish(child);
    let out = vmshift_tests::qemu_img(
        dir.path(),
        &["compare", "big.raw", "new/vm/big-disk0.qcow2"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn root_still_reads_a_descriptor_in_another_users_home() {
    // Its reader thread keeps CAP_DAC_READ_SEARCH (and only reads).
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("alice");
    std::fs::create_dir(&home).unwrap();
    let vmx = home.join("vm.vmx");
    std::fs::write(&vmx, "displayName = \"alice-vm\"\nmemSize = \"512\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vmx, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    if privileged() {
        // nobody's home, not root's: only the capability reads it.
        std::os::unix::fs::chown(&vmx, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    }
    let out = Command::new(vmshift_bin())
        .args(["vm", "inspect", "--output", "json"])
        .arg(&vmx)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vm"]["name"], "alice-vm");
}
