//! `vmshift vm boot` on any host: what it refuses before a guest runs.
//! Booting real kernels is tests/nested/boot-check.sh (nested KVM).

use std::path::{Path, PathBuf};

use vmshift_tests::{json, sfdisk, sparse_disk, tool, tool_ok, vmshift};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vms")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unconverted_vmware_controller_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let vmx = fixtures().join("linux-web/linux-web.vmx");
    let o = vmshift(
        dir.path(),
        &[
            "vm",
            "boot",
            "--kernel",
            "/nonexistent",
            vmx.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("LSI Logic SCSI (lsilogic), which vmshift-kvm does not emulate"),
        "{e}"
    );
    assert!(e.contains("--engine qemu"), "{e}");
    assert!(e.contains("vmshift vm convert"), "{e}");
}

#[test]
fn the_probe_runs_on_vmshift_kvm_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    for extra in [
        &["--engine", "qemu"][..],
        &["--qemu", "/usr/bin/qemu-system-x86_64"],
    ] {
        let mut args = vec!["vm", "boot", "--probe", "-f", "raw"];
        args.extend_from_slice(extra);
        args.push("d.raw");
        let o = vmshift(dir.path(), &args);
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        assert!(stderr(&o).contains("vmshift-kvm only"), "{}", stderr(&o));
    }
    let o = vmshift(
        dir.path(),
        &[
            "vm", "boot", "--engine", "kvm", "--qemu", "q", "--kernel", "k", "d.raw",
        ],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("not --engine kvm"), "{}", stderr(&o));
}

/// A bzImage-looking kernel that no one runs: QEMU is stopped before.
fn fake_kernel(dir: &Path) {
    let mut k = vec![0u8; 64 << 10];
    k[0x1fe] = 0x55;
    k[0x1ff] = 0xaa;
    std::fs::write(dir.join("k"), k).unwrap();
}

/// An executable `qemu` in `dir` that says `line` on standard error and
/// fails, before any guest runs.
fn failing_qemu(dir: &Path, line: &str) -> PathBuf {
    let qemu = dir.join("qemu");
    std::fs::write(&qemu, format!("#!/bin/sh\necho '{line}' >&2\nexit 1\n")).unwrap();
    std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    qemu
}

/// `vmshift ARGS` in `dir` under strace, following threads and tracing
/// the sandbox's calls: the run, and the trace.
fn traced(dir: &Path, args: &[&str]) -> (std::process::Output, String) {
    let bin = vmshift_tests::vmshift_bin();
    let mut all = vec![
        "-f",
        "-e",
        "trace=seccomp,landlock_restrict_self",
        "-o",
        "trace",
        bin.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = tool(dir, "strace", &all);
    let trace = std::fs::read_to_string(dir.join("trace")).unwrap();
    (out, trace)
}

#[test]
fn a_missing_or_failing_qemu_is_an_error_not_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    fake_kernel(dir.path());
    let o = vmshift(
        dir.path(),
        &[
            "vm",
            "boot",
            "--qemu",
            "/nonexistent/qemu",
            "--kernel",
            "k",
            "-f",
            "raw",
            "d.raw",
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot run /nonexistent/qemu"),
        "{}",
        stderr(&o)
    );
    // A QEMU that refuses its command line: its own words are reported.
    let qemu = failing_qemu(dir.path(), "qemu: -machine q35: no such machine");
    let o = vmshift(
        dir.path(),
        &[
            "vm",
            "boot",
            "--qemu",
            qemu.to_str().unwrap(),
            "--kernel",
            "k",
            "-f",
            "raw",
            "d.raw",
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("QEMU: it exited before starting the guest"),
        "{e}"
    );
    assert!(e.contains("no such machine"), "{e}");
}

#[test]
fn bad_overlay_limit_is_an_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    let o = vmshift(
        dir.path(),
        &[
            "vm",
            "boot",
            "--kernel",
            "k",
            "--overlay-limit",
            "lots",
            "d.raw",
        ],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("--overlay-limit lots"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn initrd_without_kernel_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = vmshift(dir.path(), &["vm", "boot", "--initrd", "i", "d.raw"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "usage errors exit 1, as qemu-img's"
    );
    assert!(stderr(&o).contains("--kernel"), "{}", stderr(&o));
}

#[test]
fn a_disk_without_linux_says_to_give_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    let o = vmshift(dir.path(), &["vm", "boot", "-f", "raw", "d.raw"]);
    assert_eq!(o.status.code(), Some(4));
    let e = stderr(&o);
    assert!(e.contains("no Linux boot configuration found"), "{e}");
}

/// A 64 MiB GPT disk (sfdisk) with ext4 (mke2fs -d, a known UUID) in
/// partition 1 at 1 MiB, as raw, qcow2 and streamOptimized VMDK.
fn probe_disks(dir: &Path) {
    sparse_disk(dir, "d.raw", 64 << 20);
    sfdisk(
        dir,
        "d.raw",
        "label: gpt\nstart=2048, size=40960, type=L\nsize=20480, type=L\n",
    );
    std::fs::create_dir_all(dir.join("tree")).unwrap();
    std::fs::write(dir.join("tree/hello"), b"hello").unwrap();
    tool_ok(
        dir,
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-U",
            "0d15ea5e-0000-4000-8000-0123456789ab",
            "-d",
            "tree",
            "-E",
            "offset=1048576",
            "d.raw",
            "20480k",
        ],
    );
    tool_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "qcow2", "d.raw", "d.qcow2"],
    );
    tool_ok(
        dir,
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "d.raw",
            "d.vmdk",
        ],
    );
}

/// `vm boot --probe` on one disk, JSON output.
fn probe(dir: &Path, disk: &str) -> std::process::Output {
    vmshift(
        dir,
        &[
            "vm",
            "boot",
            "--probe",
            "--timeout",
            "30",
            "--output",
            "json",
            disk,
        ],
    )
}

fn probe_lines(dir: &Path, disk: &str) -> (Option<i32>, Vec<String>) {
    let o = probe(dir, disk);
    let v = json(&o.stdout);
    let lines = v["console-tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .filter(|l| l.starts_with("VMSHIFT-PROBE"))
        .collect();
    (o.status.code(), lines)
}

#[test]
fn probe_guest_reads_the_same_disk_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    probe_disks(dir.path());
    let (code, raw) = probe_lines(dir.path(), "d.raw");
    assert_eq!(code, Some(0), "{raw:?}");
    assert_eq!(
        raw,
        vec![
            "VMSHIFT-PROBE start",
            "VMSHIFT-PROBE disk 00:01.0 virtio-blk sectors 131072",
            "VMSHIFT-PROBE table gpt entries 128",
            "VMSHIFT-PROBE part 1 start 2048 sectors 40960",
            "VMSHIFT-PROBE part 2 start 43008 sectors 20480",
            "VMSHIFT-PROBE fs ext magic 0xef53 blocks 20480 uuid 0d15ea5e-0000-4000-8000-0123456789ab",
            "VMSHIFT-PROBE done",
        ]
    );
    for f in ["d.qcow2", "d.vmdk"] {
        assert_eq!(probe_lines(dir.path(), f), (Some(0), raw.clone()), "{f}");
    }
}

#[test]
fn probe_of_a_damaged_image_fails_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    probe_disks(dir.path());
    // Point the qcow2's first L2 entry (guest offset 0: the MBR) past the
    // end of the file.
    let path = dir.path().join("d.qcow2");
    let mut q = std::fs::read(&path).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&q, 40) as usize;
    let l2 = (be(&q, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = (1u64 << 63) | (1u64 << 40);
    q[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&path, &q).unwrap();
    let o = probe(dir.path(), "d.qcow2");
    let v = json(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{v}");
    assert_eq!(v["cause"], "probe-error");
    assert!(
        v["line"]
            .as_str()
            .unwrap()
            .contains("error reading the MBR"),
        "{v}"
    );
}

#[test]
fn an_overlay_in_a_folder_boots_and_a_missing_folder_is_said() {
    let dir = tempfile::tempdir().unwrap();
    probe_disks(dir.path());
    std::fs::create_dir(dir.path().join("spill")).unwrap();
    let o = vmshift(
        dir.path(),
        &[
            "vm",
            "boot",
            "--probe",
            "--timeout",
            "30",
            "--overlay-dir",
            "spill",
            "d.raw",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The overlay file was unlinked: nothing is left in the folder.
    assert_eq!(
        std::fs::read_dir(dir.path().join("spill")).unwrap().count(),
        0
    );
    let o = vmshift(
        dir.path(),
        &[
            "vm",
            "boot",
            "--probe",
            "--timeout",
            "30",
            "--overlay-dir",
            "missing",
            "d.raw",
        ],
    );
    assert_eq!(o.status.code(), Some(4));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--overlay-dir missing: cannot make the overlay file there"),
        "{e}"
    );
}

#[test]
fn the_launcher_confines_itself_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    probe_disks(dir.path());
    // strace sees the filters installed (four: x32 calls, clone3, opens,
    // and the other calls and ioctls) and the probe still runs to its end
    // under them.
    let (out, trace) = traced(
        dir.path(),
        &["vm", "boot", "--probe", "--timeout", "30", "d.raw"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let filters = trace
        .lines()
        .filter(|l| l.contains("seccomp(SECCOMP_SET_MODE_FILTER") && l.ends_with("= 0"))
        .count();
    assert_eq!(filters, 4, "{trace}");
    assert!(trace.contains("landlock_restrict_self("), "{trace}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("VMSHIFT-PROBE done"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_guests_boot_files_are_read_on_a_confined_thread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sparse_disk(d, "d.raw", 64 << 20);
    sfdisk(d, "d.raw", "label: gpt\nstart=2048, size=40960, type=L\n");
    std::fs::create_dir_all(d.join("tree/boot/grub")).unwrap();
    fake_kernel(d);
    std::fs::copy(d.join("k"), d.join("tree/boot/vmlinuz-6.1.0-9-amd64")).unwrap();
    std::fs::write(d.join("tree/boot/initrd.img-6.1.0-9-amd64"), b"07070").unwrap();
    std::fs::write(
        d.join("tree/boot/grub/grub.cfg"),
        "menuentry 'Debian GNU/Linux' {\n\tlinux /boot/vmlinuz-6.1.0-9-amd64 root=/dev/vda1 ro\n\tinitrd /boot/initrd.img-6.1.0-9-amd64\n}\n",
    )
    .unwrap();
    tool_ok(
        d,
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            "tree",
            "-E",
            "offset=1048576",
            "d.raw",
            "20480k",
        ],
    );
    // A QEMU that refuses to start: the boot ends there, after the read.
    failing_qemu(d, "qemu: no");
    let (out, trace) = traced(d, &["vm", "boot", "--qemu", "./qemu", "-f", "raw", "d.raw"]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{e}");
    assert!(
        e.contains("kernel /boot/vmlinuz-6.1.0-9-amd64 (") && e.contains("QEMU"),
        "{e}"
    );
    // Two threads confined themselves, each alone (no TSYNC): the one
    // that read the guest's files (Landlock and the four filters of a
    // command that only reads), then the disk's NBD server (four filters)
    // before QEMU ran. The process itself was not: it runs QEMU.
    let filters: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("seccomp(SECCOMP_SET_MODE_FILTER") && l.ends_with("= 0"))
        .collect();
    assert_eq!(filters.len(), 8, "{trace}");
    assert!(
        filters
            .iter()
            .all(|l| l.contains("SECCOMP_SET_MODE_FILTER, 0,")),
        "{trace}"
    );
    let pid = |l: &str| l.split_whitespace().next().unwrap().to_string();
    let mut threads: Vec<String> = filters.iter().map(|l| pid(l)).collect();
    threads.dedup();
    assert_eq!(threads.len(), 2, "{trace}");
    for t in &threads {
        assert_eq!(
            filters.iter().filter(|l| &pid(l) == t).count(),
            4,
            "{trace}"
        );
        assert!(
            trace
                .lines()
                .any(|l| l.contains("landlock_restrict_self(") && &pid(l) == t),
            "{trace}"
        );
    }
}

#[test]
fn a_guest_kernel_past_512_mib_is_refused_and_one_of_512_mib_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A failing QEMU: the boot ends once the kernel is loaded.
    failing_qemu(d, "qemu: no");
    for (size, refused) in [((512u64 << 20) + 1, true), (512 << 20, false)] {
        let tree = d.join("tree");
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(tree.join("boot/grub")).unwrap();
        // Sparse (mke2fs -d keeps the holes): a 64 MiB disk holds it.
        let k = std::fs::File::create(tree.join("boot/vmlinuz-6.1.0-9-amd64")).unwrap();
        k.set_len(size).unwrap();
        std::fs::write(
            tree.join("boot/grub/grub.cfg"),
            "menuentry 'Debian' {\n\tlinux /boot/vmlinuz-6.1.0-9-amd64 root=/dev/vda1\n}\n",
        )
        .unwrap();
        sparse_disk(d, "d.raw", 64 << 20);
        tool_ok(
            d,
            "mke2fs",
            &["-q", "-F", "-t", "ext4", "-d", "tree", "d.raw"],
        );
        let o = vmshift(d, &["vm", "boot", "--qemu", "./qemu", "-f", "raw", "d.raw"]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(4), "{e}");
        let limit = format!("is {size} bytes, more than vmshift loads (536870912)");
        if refused {
            assert!(e.contains(&limit), "{e}");
        } else {
            assert!(!e.contains("more than vmshift loads"), "{e}");
            assert!(e.contains("kernel /boot/vmlinuz-6.1.0-9-amd64 ("), "{e}");
        }
        std::fs::remove_file(d.join("d.raw")).unwrap();
    }
}
