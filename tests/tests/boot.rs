//! `vmshift vm boot` on any host: what it refuses before a guest runs.
//! Booting real kernels is tests/nested/boot-check.sh (nested KVM).

use std::path::{Path, PathBuf};

use vmshift_tests::vmshift;

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
    assert!(e.contains("is not emulated"), "{e}");
    assert!(e.contains("vmshift vm convert"), "{e}");
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
fn missing_kernel_argument_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = vmshift(dir.path(), &["vm", "boot", "d.raw"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--kernel"), "{}", stderr(&o));
}
