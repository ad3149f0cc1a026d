//! A VMware VM that is suspended or running is not converted or booted
//! silently: `vm validate`, `vm convert` and `vm boot` refuse it, and the
//! flag that goes on anyway is repeated in the report.

use std::path::Path;

use vmshift_tests::{tool_ok, vmshift};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A Workstation VM folder: web.vmx and its monolithicSparse disk.
fn vm(d: &Path, extra: &str) {
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
        format!(
            "config.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"web\"\nguestOS = \"debian12-64\"\nmemsize = \"1024\"\nnumvcpus = \"1\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"web.vmdk\"\n{extra}"
        ),
    )
    .unwrap();
}

fn convert(d: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "vm", "convert", "web.vmx", "--to", "libvirt", "--out", "out",
    ];
    args.extend_from_slice(extra);
    vmshift(d, &args)
}

#[test]
fn a_suspended_vm_is_refused_until_the_user_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vm(d, "checkpoint.vmState = \"web-0f3a.vmss\"\n");
    std::fs::write(d.join("web-0f3a.vmss"), b"state").unwrap();
    let o = vmshift(d, &["vm", "validate", "web.vmx"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("vm-suspended"), "{}", text(&o));
    assert!(text(&o).contains("web-0f3a.vmss"), "{}", text(&o));
    let o = convert(d, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--allow-suspended"), "{}", text(&o));
    assert!(!d.join("out/web.xml").exists());
    // The explicit flag goes on, and the report repeats it.
    let o = convert(d, &["--allow-suspended"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.join("out/web.xml").exists());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("going on anyway as --allow-suspended says"),
        "{}",
        text(&o)
    );
    // vm boot refuses it before anything runs.
    let o = vmshift(d, &["vm", "boot", "--engine", "qemu", "web.vmx"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("suspended"), "{}", text(&o));
}

#[test]
fn a_memory_file_alone_marks_the_vm_suspended_or_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vm(d, "");
    std::fs::write(d.join("web-0f3a.vmem"), b"memory").unwrap();
    let o = convert(d, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("web-0f3a.vmem"), "{}", text(&o));
}

#[test]
fn a_running_vm_s_locks_are_refused_beside_the_vmx_or_a_disk() {
    for lock in ["web.vmx.lck", "web.vmdk.lck"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        vm(d, "");
        std::fs::create_dir(d.join(lock)).unwrap();
        std::fs::write(d.join(lock).join("M12345.lck"), b"").unwrap();
        let o = vmshift(d, &["vm", "validate", "web.vmx"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("vm-locked"), "{}", text(&o));
        assert!(text(&o).contains(lock), "{}", text(&o));
        let o = convert(d, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("--allow-locked"), "{}", text(&o));
        let o = convert(d, &["--allow-locked"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("--allow-locked says"),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn a_vm_at_rest_has_no_state_finding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vm(d, "checkpoint.vmState = \"\"\n");
    let o = vmshift(d, &["vm", "validate", "web.vmx"]);
    assert!(!text(&o).contains("vm-suspended"), "{}", text(&o));
    assert!(!text(&o).contains("vm-locked"), "{}", text(&o));
    let o = convert(d, &[]);
    assert!(o.status.success(), "{}", text(&o));
}
