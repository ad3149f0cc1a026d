//! Running out of space, and an I/O error in the middle of a copy: a clear
//! error, no partial temporary files left behind, the source and any
//! earlier output untouched.
//!
//! Out of space: a 3 MiB tmpfs mounted in a private user and mount
//! namespace (`unshare`, no root needed), the command run inside it.

use std::path::Path;
use std::process::Command;

use vmshift_tests::{noise, tool_ok, vmshift_bin};

/// `len` bytes no compressor shrinks (qcow2 and raw keep them all).
fn dense(path: &Path, len: usize) {
    std::fs::write(path, noise(len)).unwrap();
}

/// Runs `vmshift ARGS` in `dir` with a 3 MiB tmpfs on `dir/small`, after
/// `prepare` (a shell line run there first). Returns (exit code, stderr,
/// listing of small/ afterwards, sha256sum lines of what is in small/).
fn in_small_tmpfs(dir: &Path, prepare: &str, args: &[&str]) -> (i32, String, String, String) {
    std::fs::create_dir_all(dir.join("small")).unwrap();
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "set -e; mount -t tmpfs -o size=3M vmshift-test small; {prepare}; \
         rc=0; '{}' {} 2>err || rc=$?; echo \"RC=$rc\"; cat err; \
         echo LISTING; ls -A small; echo KEEP; (cd small && sha256sum -- * 2>/dev/null) || true",
        vmshift_bin().display(),
        quoted.join(" ")
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .current_dir(dir)
        .output()
        .expect("unshare (util-linux) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("RC="),
        "the namespace could not be set up: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rc: i32 = text
        .split("RC=")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap();
    let err = text
        .split("RC=")
        .nth(1)
        .unwrap()
        .split("LISTING")
        .next()
        .unwrap()
        .to_string();
    let listing = text
        .split("LISTING")
        .nth(1)
        .unwrap()
        .split("KEEP")
        .next()
        .unwrap()
        .trim()
        .to_string();
    let keep = text.split("KEEP").nth(1).unwrap().trim().to_string();
    (rc, err, listing, keep)
}

fn sha(path: &Path) -> String {
    let out = tool_ok(
        path.parent().unwrap(),
        "sha256sum",
        &[path.to_str().unwrap()],
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn convert_out_of_space_says_so_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    dense(&dir.path().join("src.raw"), 8 << 20);
    let before = sha(&dir.path().join("src.raw"));
    for fmt in ["qcow2", "raw", "vmdk"] {
        let target = format!("small/out.{fmt}");
        let (rc, err, listing, keep) = in_small_tmpfs(
            dir.path(),
            // An earlier output beside it, which must survive.
            "echo earlier > small/keep",
            &["convert", "-f", "raw", "-O", fmt, "src.raw", &target],
        );
        assert_eq!(rc, 1, "{fmt}: {err}");
        assert!(err.contains("No space left on device"), "{fmt}: {err}");
        assert!(
            err.contains("out."),
            "{fmt}: the error names the target: {err}"
        );
        assert_eq!(listing, "keep", "{fmt}: partial files left: {listing}");
        assert!(keep.starts_with(&sha_of(b"earlier\n")), "{fmt}: {keep}");
    }
    assert_eq!(sha(&dir.path().join("src.raw")), before);
}

fn sha_of(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, data).unwrap();
    sha(&p)
}

#[test]
fn convert_over_an_earlier_output_out_of_space_keeps_the_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    dense(&dir.path().join("src.raw"), 8 << 20);
    let (rc, err, listing, keep) = in_small_tmpfs(
        dir.path(),
        "echo earlier > small/keep",
        &[
            "convert",
            "--force",
            "-f",
            "raw",
            "-O",
            "raw",
            "src.raw",
            "small/keep",
        ],
    );
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(listing, "keep");
    assert!(keep.starts_with(&sha_of(b"earlier\n")), "{keep}");
}

#[test]
fn resize_out_of_space_leaves_the_image_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (rc, err, listing, keep) = in_small_tmpfs(
        dir.path(),
        "qemu-img create -q -f qcow2 small/img.qcow2 1M && qemu-io -c 'write -P 7 0 512k' small/img.qcow2 >/dev/null \
         && sha256sum small/img.qcow2 > before",
        &["resize", "--preallocation", "full", "small/img.qcow2", "+16M"],
    );
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(listing, "img.qcow2", "partial files left: {listing}");
    let before = std::fs::read_to_string(dir.path().join("before")).unwrap();
    let before = before.split_whitespace().next().unwrap();
    assert!(
        keep.starts_with(before),
        "the image changed: {keep} (was {before})"
    );
}

#[test]
fn raw_resize_out_of_space_keeps_the_old_size() {
    let dir = tempfile::tempdir().unwrap();
    let (rc, err, listing, keep) = in_small_tmpfs(
        dir.path(),
        "head -c 1048576 /dev/urandom > small/img.raw && sha256sum small/img.raw > before",
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation",
            "full",
            "small/img.raw",
            "+16M",
        ],
    );
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(listing, "img.raw");
    let before = std::fs::read_to_string(dir.path().join("before")).unwrap();
    let before = before.split_whitespace().next().unwrap();
    assert!(
        keep.starts_with(before),
        "the disk changed: {keep} (was {before})"
    );
}

#[test]
fn vm_convert_out_of_space_removes_the_folder_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    dense(&dir.path().join("d.raw"), 8 << 20);
    tool_ok(
        dir.path(),
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "d.raw",
            "vm/d.vmdk",
        ],
    );
    std::fs::write(
        vm.join("vm.vmx"),
        "config.version = \"8\"\nvirtualHW.version = \"17\"\ndisplayName = \"full\"\nguestOS = \"debian11-64\"\n\
         memSize = \"512\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n\
         scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"d.vmdk\"\n",
    )
    .unwrap();
    // libvirt, and Proxmox, whose disks go in folders of their own
    // (images/<vmid>) the failed run removes too.
    let targets: [&[&str]; 2] = [
        &["--to", "libvirt"],
        &["--to", "proxmox", "--vmid", "100", "--storage", "local"],
    ];
    for target in targets {
        let mut args = vec!["vm", "convert", "--out", "small/out", "vm/vm.vmx"];
        args.extend_from_slice(target);
        let (rc, err, listing, keep) =
            in_small_tmpfs(dir.path(), "echo earlier > small/keep", &args);
        assert_ne!(rc, 0, "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        assert_eq!(listing, "keep", "partial output left: {listing}");
        assert!(keep.starts_with(&sha_of(b"earlier\n")));
    }
}
