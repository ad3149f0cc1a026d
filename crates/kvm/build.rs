//! Builds the probe guest (probe/probe.rs) with the host's rustc as a
//! freestanding static ELF linked at 2 MiB, for `include_bytes!`. Only the
//! host target is installed, so it is built for the host target with
//! `#![no_std]`, panic=abort and no start files: it never runs on the host.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir")).join("probe");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let elf = out.join("probe.elf");
    let status = Command::new(rustc)
        .arg(dir.join("probe.rs"))
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "vmshift_probe",
        ])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "relocation-model=static",
        ])
        .args([
            "-C",
            "debuginfo=0",
            "-C",
            "strip=symbols",
            "-C",
            "code-model=small",
        ])
        // No SSE: kvm_pvm cannot run it in a freestanding guest (KVM
        // "emulation failure" on the first xorps); the probe does no float math.
        .args(["-C", "target-feature=-sse,-sse2,-avx,-avx2,+soft-float"])
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
        ])
        .args([
            "-C",
            "link-arg=-no-pie",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!(
            "link-arg=-Wl,-T,{}",
            dir.join("probe.ld").display()
        ))
        .arg("-o")
        .arg(&elf)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("running rustc for the probe guest");
    assert!(status.success(), "building the probe guest failed");
    println!("cargo:rerun-if-changed=probe/probe.rs");
    println!("cargo:rerun-if-changed=probe/probe.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
