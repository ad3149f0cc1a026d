//! Behaviour of the command line: sources are never modified, outputs are
//! atomic, exit codes follow qemu-img, the gate refuses what it must.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vmshift_tests::{
    json, names_in, patterned_raw, qcow2_with_data_past_eof, tool_ok, vmshift, vmshift_ok,
};

fn stamp(path: &Path) -> (Vec<u8>, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), m.mtime(), m.mtime_nsec())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_command_leaves_the_source_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 8 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "-c", "src.raw", "src.qcow2"],
    );
    let before_raw = stamp(&d.join("src.raw"));
    let before_qcow2 = stamp(&d.join("src.qcow2"));
    for src in ["src.raw", "src.qcow2"] {
        vmshift_ok(d, &["info", src]);
        vmshift_ok(d, &["info", "--output", "json", src]);
        // (The human map of compressed clusters is qemu-img's error.)
        vmshift_ok(d, &["map", "--output", "json", src]);
        let _ = vmshift(d, &["map", src]);
        let _ = vmshift(d, &["check", src]);
        vmshift_ok(d, &["compare", src, "src.raw"]);
        vmshift_ok(d, &["convert", "-O", "raw", src, "out.raw", "--force"]);
        vmshift_ok(
            d,
            &["convert", "-O", "qcow2", "-c", src, "out.qcow2", "--force"],
        );
    }
    assert!(stamp(&d.join("src.raw")) == before_raw, "src.raw changed");
    assert!(
        stamp(&d.join("src.qcow2")) == before_qcow2,
        "src.qcow2 changed"
    );
}

#[test]
fn convert_failing_midway_leaves_nothing_at_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data_past_eof(d, "src.qcow2");
    let before = names_in(d);
    for fmt in ["raw", "qcow2"] {
        let out = vmshift(d, &["convert", "-O", fmt, "src.qcow2", "out.img"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("L2 entry"), "{}", stderr(&out));
        assert_eq!(names_in(d), before, "convert -O {fmt} left files behind");
    }
}

#[test]
fn convert_existing_target_is_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 1 << 20);
    std::fs::write(d.join("out.qcow2"), b"precious").unwrap();
    let out = vmshift(d, &["convert", "-O", "qcow2", "src.raw", "out.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(d.join("out.qcow2")).unwrap(), b"precious");
    vmshift_ok(
        d,
        &["convert", "-O", "qcow2", "--force", "src.raw", "out.qcow2"],
    );
    tool_ok(d, "qemu-img", &["compare", "src.raw", "out.qcow2"]);
}

#[test]
fn convert_n_into_existing_raw_overwrites_zeros_unless_target_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 4 << 20;
    patterned_raw(&d.join("src.raw"), size);
    std::fs::write(d.join("dev.img"), vec![0xffu8; size as usize]).unwrap();
    vmshift_ok(d, &["convert", "-n", "-O", "raw", "src.raw", "dev.img"]);
    assert_eq!(
        std::fs::read(d.join("dev.img")).unwrap(),
        std::fs::read(d.join("src.raw")).unwrap()
    );

    // --target-is-zero trusts the target: zero ranges are not written, so
    // the 0xff filler stays visible there (proof nothing was written).
    std::fs::write(d.join("dev.img"), vec![0xffu8; size as usize]).unwrap();
    vmshift_ok(
        d,
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "raw",
            "src.raw",
            "dev.img",
        ],
    );
    let got = std::fs::read(d.join("dev.img")).unwrap();
    let src = std::fs::read(d.join("src.raw")).unwrap();
    assert_eq!(&got[..4096], &src[..4096], "data must be written");
    assert_eq!(
        got[(size / 4) as usize],
        0xff,
        "a zero range must be skipped"
    );
}

#[test]
fn convert_n_into_precreated_qcow2_passes_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 8 << 20);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "pre.qcow2",
            "8M",
        ],
    );
    vmshift_ok(d, &["convert", "-n", "-O", "qcow2", "src.raw", "pre.qcow2"]);
    tool_ok(d, "qemu-img", &["check", "pre.qcow2"]);
    tool_ok(d, "qemu-img", &["compare", "src.raw", "pre.qcow2"]);
    let info = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "pre.qcow2"]).stdout);
    assert_eq!(
        info["cluster-size"], 4096,
        "-n keeps the target's own options"
    );
}

#[test]
fn convert_n_into_qcow2_with_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 1 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "src.raw", "full.qcow2"],
    );
    let before = stamp(&d.join("full.qcow2"));
    let out = vmshift(
        d,
        &["convert", "-n", "-O", "qcow2", "src.raw", "full.qcow2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already holds data"),
        "{}",
        stderr(&out)
    );
    assert!(stamp(&d.join("full.qcow2")) == before);
}

#[test]
fn convert_s0_allocates_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 4 << 20);
    vmshift_ok(
        d,
        &["convert", "-S", "0", "-O", "raw", "src.raw", "full.raw"],
    );
    vmshift_ok(d, &["convert", "-O", "raw", "src.raw", "sparse.raw"]);
    let full = std::fs::metadata(d.join("full.raw")).unwrap().blocks() * 512;
    let sparse = std::fs::metadata(d.join("sparse.raw")).unwrap().blocks() * 512;
    assert!(full >= 4 << 20, "-S 0 output uses {full} bytes");
    assert!(sparse < 3 << 20, "sparse output uses {sparse} bytes");
    tool_ok(d, "qemu-img", &["compare", "src.raw", "full.raw"]);
}

#[test]
fn convert_progress_is_silent_in_a_pipe_and_shown_with_p() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 4 << 20);
    let quiet = vmshift(
        d,
        &["convert", "-f", "raw", "-O", "qcow2", "src.raw", "a.qcow2"],
    );
    assert!(quiet.status.success());
    assert_eq!(stderr(&quiet), "");
    let loud = vmshift(
        d,
        &[
            "convert", "-p", "-f", "raw", "-O", "qcow2", "src.raw", "b.qcow2",
        ],
    );
    assert!(stderr(&loud).contains("100.00/100%"), "{}", stderr(&loud));
}

#[test]
fn convert_without_f_says_what_it_probed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 1 << 20);
    let out = vmshift(d, &["convert", "-O", "qcow2", "src.raw", "a.qcow2"]);
    assert!(
        stderr(&out).contains("probed format: raw"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn explicit_raw_reads_a_qcow2_file_as_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "a.qcow2", "1M"]);
    vmshift_ok(
        d,
        &["convert", "-f", "raw", "-O", "raw", "a.qcow2", "bytes.raw"],
    );
    assert_eq!(
        std::fs::read(d.join("bytes.raw")).unwrap(),
        std::fs::read(d.join("a.qcow2")).unwrap()
    );
}

#[test]
fn explicit_qcow2_on_a_raw_file_is_an_error_naming_the_magic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 1 << 20);
    let out = vmshift(d, &["info", "-f", "qcow2", "src.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("magic"), "{}", stderr(&out));
}

#[test]
fn compare_exit_codes_follow_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 2 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "a.raw", "a.qcow2"],
    );
    let mut b = std::fs::read(d.join("a.raw")).unwrap();
    b[1_000_000] ^= 1;
    std::fs::write(d.join("b.raw"), b).unwrap();
    assert_eq!(
        vmshift(d, &["compare", "a.raw", "a.qcow2"]).status.code(),
        Some(0)
    );
    // qemu-img names the first differing 512-byte sector.
    let diff = vmshift(d, &["compare", "a.qcow2", "b.raw"]);
    assert_eq!(diff.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&diff.stdout).contains("offset 999936!"));
    assert_eq!(
        vmshift(d, &["compare", "a.raw", "missing.raw"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn compare_larger_image_with_zero_tail_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 2 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "a.raw", "big.qcow2"],
    );
    tool_ok(d, "qemu-img", &["resize", "big.qcow2", "6M"]);
    assert_eq!(
        vmshift(d, &["compare", "a.raw", "big.qcow2"]).status.code(),
        Some(0)
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 1 5M 512", "big.qcow2"]);
    assert_eq!(
        vmshift(d, &["compare", "a.raw", "big.qcow2"]).status.code(),
        Some(1)
    );
}

#[test]
fn check_on_raw_exits_63() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("a.raw"), 1 << 20);
    assert_eq!(vmshift(d, &["check", "a.raw"]).status.code(), Some(63));
}

#[test]
fn backing_file_in_parent_folder_needs_a_root_or_permission() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("vm")).unwrap();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "4M"],
    );
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "vm/top.qcow2",
        ],
    );
    // info shows the chain as qemu-img does (it opens no backing file
    // either), says the backing file was not opened and which flag opens
    // it, and reads no guest data.
    let out = vmshift(d, &["info", "vm/top.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "backing file: ../base.qcow2 (actual path: vm/../base.qcow2)",
        "backing file format: qcow2",
        "backing file not opened",
        "--allow-backing-outside",
        "Partition table: not read",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let theirs = vmshift_tests::json(&qemu_img_out(
        d,
        &["info", "--output", "json", "vm/top.qcow2"],
    ));
    let ours = vmshift_tests::json(
        vmshift_ok(d, &["info", "--output", "json", "vm/top.qcow2"]).as_bytes(),
    );
    for k in [
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "virtual-size",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    // Reading is refused, naming the flag.
    for args in [
        vec!["convert", "-O", "raw", "vm/top.qcow2", "o.raw"],
        vec!["map", "vm/top.qcow2"],
        vec![
            "info",
            "--backing-chain",
            "--output",
            "json",
            "vm/top.qcow2",
        ],
    ] {
        let out = vmshift(d, &args);
        if args[0] == "info" {
            // The chain ends where the gate stopped it.
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("--allow-backing-outside"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!d.join("o.raw").exists());
    let out = vmshift_ok(d, &["info", "--root", ".", "vm/top.qcow2"]);
    assert!(!out.contains("not opened"), "{out}");
    vmshift_ok(d, &["info", "--allow-backing-outside", "vm/top.qcow2"]);
    vmshift_ok(
        d,
        &[
            "convert",
            "--allow-backing-outside",
            "-O",
            "raw",
            "vm/top.qcow2",
            "o.raw",
        ],
    );
}

fn qemu_img_out(d: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let o = vmshift_tests::qemu_img(d, args);
    assert!(o.status.success());
    o.stdout
}

#[test]
fn backing_file_in_same_folder_by_absolute_path_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "4M"],
    );
    let abs = d.join("base.qcow2").canonicalize().unwrap();
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            abs.to_str().unwrap(),
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    vmshift_ok(d, &["info", "top.qcow2"]);
}

#[test]
fn info_backing_chain_lists_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "4M"],
    );
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let human = vmshift_ok(d, &["info", "--backing-chain", "top.qcow2"]);
    assert!(
        human.contains("image: top.qcow2") && human.contains("image: base.qcow2"),
        "{human}"
    );
}

#[test]
fn create_refuses_existing_file_and_missing_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vmshift_ok(d, &["create", "-f", "qcow2", "a.qcow2", "1G"]);
    assert_eq!(
        vmshift(d, &["create", "-f", "qcow2", "a.qcow2", "1G"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        vmshift(d, &["create", "-f", "qcow2", "b.qcow2"])
            .status
            .code(),
        Some(1)
    );
    let bad = vmshift(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "c.qcow2",
            "1G",
        ],
    );
    assert!(stderr(&bad).contains("cluster_size"), "{}", stderr(&bad));
    tool_ok(d, "qemu-img", &["check", "a.qcow2"]);
}

#[test]
fn convert_interrupted_by_sigint_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Dense, compressible data and tiny clusters: a convert of several
    // seconds, long enough to interrupt once its temp file exists.
    let f = std::fs::File::create(d.join("src.raw")).unwrap();
    let line: Vec<u8> = (0..(1u32 << 20))
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect();
    for i in 0..64u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, &line, i * line.len() as u64).unwrap();
    }
    drop(f);
    let mut child = std::process::Command::new(vmshift_tests::vmshift_bin())
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "cluster_size=512",
            "src.raw",
            "out.qcow2",
        ])
        .current_dir(d)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !names_in(d).iter().any(|n| n.ends_with(".tmp")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no temp file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    tool_ok(d, "kill", &["-INT", &child.id().to_string()]);
    let status = child.wait().unwrap();
    // The shell's convention for a command stopped by Ctrl-C.
    assert_eq!(
        status.code(),
        Some(130),
        "interrupted convert must exit 130"
    );
    assert_eq!(
        names_in(d),
        ["src.raw"],
        "an interrupted convert left files behind"
    );
}

#[test]
fn convert_n_failing_midway_leaves_the_precreated_qcow2_valid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data_past_eof(d, "bad.qcow2");
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "pre.qcow2", "8M"]);
    let out = vmshift(
        d,
        &["convert", "-n", "-O", "qcow2", "bad.qcow2", "pre.qcow2"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    tool_ok(d, "qemu-img", &["check", "pre.qcow2"]);
}

#[test]
fn convert_n_into_a_backing_file_of_the_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("base.raw"), 4 << 20);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    let before = stamp(&d.join("base.raw"));
    let out = vmshift(d, &["convert", "-n", "-O", "raw", "top.qcow2", "base.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("which the source reads"),
        "{}",
        stderr(&out)
    );
    assert!(stamp(&d.join("base.raw")) == before);
}

#[test]
fn convert_odd_size_rounds_qcow2_up_to_a_sector() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("odd.raw"), vec![0x5au8; 1000]).unwrap();
    vmshift_ok(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "odd.raw",
            "odd.qcow2",
        ],
    );
    let info = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "odd.qcow2"]).stdout);
    assert_eq!(info["virtual-size"], 1024);
    tool_ok(d, "qemu-img", &["compare", "odd.raw", "odd.qcow2"]);
}

#[test]
fn convert_compressed_with_sparse_size_above_cluster_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 8 << 20);
    vmshift_ok(
        d,
        &[
            "convert", "-c", "-S", "96k", "-O", "qcow2", "src.raw", "c.qcow2",
        ],
    );
    tool_ok(d, "qemu-img", &["check", "c.qcow2"]);
    tool_ok(d, "qemu-img", &["compare", "src.raw", "c.qcow2"]);
}

#[test]
fn create_preallocated_overlay_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "4M"],
    );
    let out = vmshift(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "o.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("hide the backing"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn info_backing_offset_overflow_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(d, "qemu-img", &["create", "-f", "qcow2", "a.qcow2", "4M"]);
    let mut bytes = std::fs::read(d.join("a.qcow2")).unwrap();
    bytes[8..16].copy_from_slice(&0xffff_ffff_ffff_fff0u64.to_be_bytes());
    bytes[16..20].copy_from_slice(&0x20u32.to_be_bytes());
    std::fs::write(d.join("a.qcow2"), bytes).unwrap();
    let out = vmshift(d, &["info", "a.qcow2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("backing_file_offset"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn errors_name_what_the_user_gave_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An OS error is said once.
    let out = vmshift(d, &["vm", "inspect", "nope.vmx"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).matches("No such file or directory").count(),
        1,
        "{}",
        stderr(&out)
    );
    // An output in a folder that does not exist: named as given, not by a
    // temporary name.
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    let out = vmshift(d, &["convert", "-O", "raw", "a.qcow2", "missing/dir/o.raw"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("missing/dir/o.raw: its folder missing/dir does not exist"),
        "{e}"
    );
    assert!(!e.contains(".tmp"), "{e}");
    // --out naming a file.
    std::fs::write(d.join("afile"), b"").unwrap();
    let vmx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vms/linux-web/linux-web.vmx");
    let out = vmshift(
        d,
        &[
            "vm",
            "convert",
            vmx.to_str().unwrap(),
            "--to",
            "libvirt",
            "--out",
            "afile",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("afile: exists and is not a folder"),
        "{}",
        stderr(&out)
    );
    // A refused conversion leaves no empty --out folder behind.
    std::fs::create_dir(d.join("vm")).unwrap();
    std::fs::copy(&vmx, d.join("vm/linux-web.vmx")).unwrap();
    let out = vmshift(
        d,
        &[
            "vm",
            "convert",
            "vm/linux-web.vmx",
            "--to",
            "libvirt",
            "--out",
            "new/out",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!d.join("new").exists());
    // vm validate: 2 when the descriptor cannot be read at all.
    let out = vmshift(d, &["vm", "validate", "vm"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn convert_m_sets_the_workers_within_qemu_imgs_range() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 7 1M 5M",
            "-c",
            "write -P 9 12M 64k",
            "m.qcow2",
        ],
    );
    for m in ["1", "4", "16"] {
        let out = format!("o{m}.qcow2");
        vmshift_ok(d, &["convert", "-m", m, "-O", "qcow2", "m.qcow2", &out]);
        tool_ok(d, "qemu-img", &["compare", "m.qcow2", &out]);
        tool_ok(d, "qemu-img", &["check", &out]);
    }
    for m in ["0", "17"] {
        let out = vmshift(d, &["convert", "-m", m, "-O", "raw", "m.qcow2", "x.raw"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("1..=16"), "{}", stderr(&out));
    }
}

/// The fsync-family calls a vmshift run makes, counted by strace.
fn syncs(d: &Path, args: &[&str]) -> usize {
    let bin = vmshift_tests::vmshift_bin();
    let mut a = vec![
        "-f",
        "-qq",
        "-e",
        "trace=fsync,fdatasync,syncfs,sync_file_range",
        "-o",
        "trace.txt",
        bin.to_str().unwrap(),
    ];
    a.extend_from_slice(args);
    tool_ok(d, "strace", &a);
    std::fs::read_to_string(d.join("trace.txt"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync(") || l.contains("syncfs("))
        .count()
}

#[test]
fn convert_cache_modes_and_out_of_order_writes_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "16M"],
    );
    tool_ok(
        d,
        "qemu-io",
        &["-c", "write -P 3 0 3M", "-c", "write -P 5 9M 1M", "c.qcow2"],
    );
    // Every mode but unsafe flushes before the output is in place.
    for (i, t) in ["writeback", "writethrough", "none", "directsync"]
        .iter()
        .enumerate()
    {
        let out = format!("t{i}.qcow2");
        let n = syncs(d, &["convert", "-t", t, "-O", "qcow2", "c.qcow2", &out]);
        assert!(n >= 2, "-t {t}: {n} syncs (image and folder)");
        tool_ok(d, "qemu-img", &["compare", "c.qcow2", &out]);
    }
    let n = syncs(
        d,
        &[
            "convert", "-t", "unsafe", "-O", "qcow2", "c.qcow2", "u.qcow2",
        ],
    );
    assert_eq!(n, 0, "-t unsafe flushes nothing");
    tool_ok(d, "qemu-img", &["compare", "c.qcow2", "u.qcow2"]);
    tool_ok(d, "qemu-img", &["check", "u.qcow2"]);
    // Reading with O_DIRECT is not done, and said.
    for t in ["none", "directsync"] {
        let out = vmshift(d, &["convert", "-T", t, "-O", "raw", "c.qcow2", "x.raw"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("-T {t}")),
            "{}",
            stderr(&out)
        );
        assert!(!d.join("x.raw").exists());
    }
    vmshift_ok(
        d,
        &[
            "convert",
            "-T",
            "writeback",
            "-W",
            "-m",
            "4",
            "-O",
            "qcow2",
            "c.qcow2",
            "w.qcow2",
        ],
    );
    tool_ok(d, "qemu-img", &["compare", "c.qcow2", "w.qcow2"]);
    let out = vmshift(d, &["convert", "-t", "bogus", "c.qcow2", "y.raw"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn a_large_sparse_size_never_fills_the_sources_holes() {
    // -S says how many zero bytes in data may be skipped; the source's
    // holes are skipped whatever it says (qemu-img reads its block status
    // first). Allocation no larger than qemu-img's, content identical.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "s.qcow2",
            "8M",
        ],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 3M 4k",
            "-c",
            "write -P 3 6M 128k",
            "s.qcow2",
        ],
    );
    let used = |f: &str| std::fs::metadata(d.join(f)).unwrap().blocks() * 512;
    for s in ["64k", "1M"] {
        for o in ["raw", "qcow2"] {
            let (q, v) = (format!("q{s}.{o}"), format!("v{s}.{o}"));
            tool_ok(d, "qemu-img", &["convert", "-S", s, "-O", o, "s.qcow2", &q]);
            vmshift_ok(d, &["convert", "-S", s, "-O", o, "s.qcow2", &v]);
            tool_ok(d, "qemu-img", &["compare", &q, &v]);
            // One file-system block of slack: st_blocks of a file just
            // written can carry a block of the file system's own
            // preallocation (seen once under load).
            assert!(
                used(&v) <= used(&q) + 4096,
                "-S {s} -O {o}: {} bytes used, qemu-img {}",
                used(&v),
                used(&q)
            );
        }
    }
}

#[test]
fn without_w_the_target_is_written_in_guest_order() {
    // Four workers read and encode in parallel, but the data reaches the
    // target in guest order (qemu-img's default; -W lifts it): the
    // pwrite offsets of a raw target only ever increase.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Data everywhere (no zero run to skip).
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(d.join("p.raw"), data).unwrap();
    let bin = vmshift_tests::vmshift_bin();
    tool_ok(
        d,
        "strace",
        &[
            "-f",
            "-qq",
            "-e",
            "trace=pwrite64",
            "-o",
            "w.txt",
            bin.to_str().unwrap(),
            "convert",
            "-m",
            "4",
            "-O",
            "raw",
            "p.raw",
            "o.raw",
        ],
    );
    let offsets: Vec<u64> = std::fs::read_to_string(d.join("w.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.rsplit(", ").next())
        .filter_map(|o| o.split(')').next()?.trim().parse().ok())
        .collect();
    assert!(offsets.len() >= 16, "{} writes", offsets.len());
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "out of order: {offsets:?}"
    );
    tool_ok(d, "cmp", &["p.raw", "o.raw"]);
}
