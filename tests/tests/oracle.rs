//! The oracle matrix: images made by qemu-img, read by vmshift, and
//! compared with what qemu-img itself reads from them; images written by
//! vmshift, judged by qemu-img check and compare.

use std::path::Path;

use vmshift_tests::{
    assert_common_fields_agree, json, patterned_raw, qemu_img, qemu_io, tool_ok, vmshift,
    vmshift_ok,
};

const SIZE: u64 = 48 << 20;

/// Makes `img.qcow2` in `dir` from a patterned raw file with the given
/// `qemu-img convert` arguments, then adds zero clusters and a discard
/// with qemu-io so every cluster kind is present.
fn qemu_made(dir: &Path, convert_args: &[&str]) {
    patterned_raw(&dir.join("pat.raw"), SIZE);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(convert_args);
    args.extend_from_slice(&["pat.raw", "img.qcow2"]);
    tool_ok(dir, "qemu-img", &args);
    if !convert_args.contains(&"-c") {
        tool_ok(
            dir,
            "qemu-io",
            &[
                "-c",
                "write -z 64k 64k",
                "-c",
                "write -P 0x33 8M 12k",
                "-c",
                "discard 16M 1M",
                "img.qcow2",
            ],
        );
    }
}

/// vmshift's raw output is byte-identical to qemu-img's.
fn assert_raw_identical(dir: &Path, image: &str) {
    tool_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", image, "qemu.raw"],
    );
    vmshift_ok(
        dir,
        &["convert", "-f", "qcow2", "-O", "raw", image, "ours.raw"],
    );
    let a = std::fs::read(dir.join("qemu.raw")).unwrap();
    let b = std::fs::read(dir.join("ours.raw")).unwrap();
    assert_eq!(a.len(), b.len(), "{image}: raw sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{image}: raw outputs differ first at byte {i}");
    }
}

fn assert_info_agrees(dir: &Path, image: &str, extra: &[&str]) {
    let mut args = vec!["info", "--output", "json"];
    args.extend_from_slice(extra);
    args.push(image);
    let theirs = json(&tool_ok(dir, "qemu-img", &args).stdout);
    let ours = json(vmshift_ok(dir, &args).as_bytes());
    // The fields that matter must be there on our side.
    let top = if ours.is_array() { &ours[0] } else { &ours };
    for k in [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
    ] {
        assert!(top.get(k).is_some(), "{image}: vmshift info lacks {k}");
    }
    assert_common_fields_agree(&ours, &theirs, image);
}

fn assert_map_agrees(dir: &Path, image: &str) {
    let theirs = json(&tool_ok(dir, "qemu-img", &["map", "--output", "json", image]).stdout);
    let ours = json(vmshift_ok(dir, &["map", "--output", "json", image]).as_bytes());
    assert_common_fields_agree(&ours, &theirs, &format!("{image} map"));
}

/// vmshift writes the same data as qcow2 with `opts`; qemu-img finds it
/// clean and identical.
fn assert_written_qcow2_passes(dir: &Path, source: &str, opts: &[&str]) {
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[source, "written.qcow2"]);
    let _ = std::fs::remove_file(dir.join("written.qcow2"));
    vmshift_ok(dir, &args);
    let check = qemu_img(dir, &["check", "--output", "json", "written.qcow2"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check of vmshift's qcow2 ({opts:?}): {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let report = json(&check.stdout);
    assert!(
        report.get("leaks").is_none() && report.get("corruptions").is_none(),
        "{report}"
    );
    tool_ok(dir, "qemu-img", &["compare", source, "written.qcow2"]);
    // And our own check agrees it is clean.
    vmshift_ok(dir, &["check", "written.qcow2"]);
}

macro_rules! qemu_made_case {
    ($name:ident, [$($arg:expr),*], write: [$($w:expr),*]) => {
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            qemu_made(d, &[$($arg),*]);
            assert_raw_identical(d, "img.qcow2");
            assert_info_agrees(d, "img.qcow2", &[]);
            assert_map_agrees(d, "img.qcow2");
            assert_written_qcow2_passes(d, "img.qcow2", &[$($w),*]);
        }
    };
}

qemu_made_case!(qcow2_defaults_reads_like_qemu, [], write: []);
qemu_made_case!(qcow2_cluster_512_reads_like_qemu, ["-o", "cluster_size=512"], write: ["-o", "cluster_size=512"]);
qemu_made_case!(qcow2_cluster_4k_reads_like_qemu, ["-o", "cluster_size=4k"], write: ["-o", "cluster_size=4k"]);
qemu_made_case!(qcow2_cluster_2m_reads_like_qemu, ["-o", "cluster_size=2M"], write: ["-o", "cluster_size=2M"]);
qemu_made_case!(qcow2_compat_010_reads_like_qemu, ["-o", "compat=0.10"], write: ["-o", "compat=0.10"]);
qemu_made_case!(qcow2_refcount_bits_1_reads_like_qemu, ["-o", "refcount_bits=1"], write: ["-o", "refcount_bits=1"]);
qemu_made_case!(qcow2_refcount_bits_64_reads_like_qemu, ["-o", "refcount_bits=64"], write: ["-o", "refcount_bits=64"]);
qemu_made_case!(qcow2_zlib_compressed_reads_like_qemu, ["-c"], write: ["-c"]);
qemu_made_case!(qcow2_zstd_compressed_reads_like_qemu, ["-c", "-o", "compression_type=zstd"], write: ["-c", "-o", "compression_type=zstd"]);
qemu_made_case!(qcow2_zlib_compressed_512_reads_like_qemu, ["-c", "-o", "cluster_size=512"], write: ["-c", "-o", "cluster_size=512"]);
qemu_made_case!(qcow2_zstd_compressed_2m_reads_like_qemu, ["-c", "-o", "compression_type=zstd,cluster_size=2M"], write: ["-c", "-o", "compression_type=zstd,cluster_size=2M"]);
qemu_made_case!(qcow2_compressed_refcount_bits_1_reads_like_qemu, ["-c", "-o", "refcount_bits=1"], write: ["-c", "-o", "refcount_bits=1"]);
qemu_made_case!(qcow2_extended_l2_reads_like_qemu, ["-o", "extended_l2=on,cluster_size=64k"], write: []);
qemu_made_case!(qcow2_extended_l2_2m_reads_like_qemu, ["-o", "extended_l2=on,cluster_size=2M"], write: ["-o", "cluster_size=2M"]);
qemu_made_case!(qcow2_lazy_refcounts_reads_like_qemu, ["-o", "lazy_refcounts=on"], write: ["-o", "lazy_refcounts=on"]);

#[test]
fn qcow2_preallocation_metadata_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_made(d, &["-o", "preallocation=metadata"]);
    assert_raw_identical(d, "img.qcow2");
    assert_info_agrees(d, "img.qcow2", &[]);
    // QEMU guesses the preallocation from the refcounts and asks the host
    // file system which data clusters are holes (data and zero both).
    assert_map_agrees(d, "img.qcow2");
    let theirs = qemu_img(d, &["map", "--output", "json", "img.qcow2"]);
    assert!(String::from_utf8_lossy(&theirs.stdout).contains("\"zero\": true, \"data\": true"));
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "empty.qcow2",
            "8M",
        ],
    );
    assert_map_agrees(d, "empty.qcow2");
    assert_written_qcow2_passes(d, "img.qcow2", &["-o", "preallocation=metadata"]);
}

#[test]
fn qcow2_extended_l2_subclusters_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "base.qcow2",
            "8M",
        ],
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 0x11 0 1M", "base.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "img.qcow2",
        ],
    );
    // Subcluster-sized writes and zeroes over a backing file.
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x22 4k 4k",
            "-c",
            "write -z 12k 8k",
            "-c",
            "write -P 0x44 200k 4k",
            "-c",
            "write -z 512k 128k",
            "img.qcow2",
        ],
    );
    assert_raw_identical(d, "img.qcow2");
    assert_info_agrees(d, "img.qcow2", &[]);
    assert_map_agrees(d, "img.qcow2");
}

#[test]
fn qcow2_backing_chain_depth_3_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "16M"],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x01 0 4M",
            "-c",
            "write -c -P 0x07 6M 128k",
            "base.qcow2",
        ],
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
            "mid.qcow2",
        ],
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 0x02 1M 1M", "mid.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "24M",
        ],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x03 1536k 64k",
            "-c",
            "write -z 2M 256k",
            "-c",
            "write -P 0x04 20M 64k",
            "top.qcow2",
        ],
    );
    assert_raw_identical(d, "top.qcow2");
    assert_info_agrees(d, "top.qcow2", &[]);
    assert_info_agrees(d, "top.qcow2", &["--backing-chain"]);
    assert_map_agrees(d, "top.qcow2");
    assert_written_qcow2_passes(d, "top.qcow2", &[]);
}

#[test]
fn qcow2_backing_raw_without_format_is_probed_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("base.raw"), 4 << 20);
    // qemu-img no longer creates such images: make one with a format, then
    // turn the backing-format extension into an unknown (ignored) one, as in
    // an image from an old QEMU.
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
            "4M",
        ],
    );
    let mut bytes = std::fs::read(d.join("top.qcow2")).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(d.join("top.qcow2"), bytes).unwrap();
    let info = json(vmshift_ok(d, &["info", "--output", "json", "top.qcow2"]).as_bytes());
    assert_eq!(info["backing-format-probed"], "raw", "{info}");
    assert!(info.get("backing-filename-format").is_none(), "{info}");
    let human = vmshift_ok(d, &["info", "top.qcow2"]);
    assert!(human.contains("probed"), "{human}");
    vmshift_ok(d, &["convert", "-O", "raw", "top.qcow2", "ours.raw"]);
    assert_eq!(
        std::fs::read(d.join("ours.raw")).unwrap(),
        std::fs::read(d.join("base.raw")).unwrap()
    );
}

#[test]
fn qcow2_internal_snapshots_are_listed_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_made(d, &[]);
    tool_ok(d, "qemu-img", &["snapshot", "-c", "first", "img.qcow2"]);
    tool_ok(d, "qemu-io", &["-c", "write -P 0x77 0 2M", "img.qcow2"]);
    tool_ok(d, "qemu-img", &["snapshot", "-c", "second", "img.qcow2"]);
    tool_ok(d, "qemu-io", &["-c", "write -P 0x78 1M 2M", "img.qcow2"]);
    assert_raw_identical(d, "img.qcow2");
    assert_info_agrees(d, "img.qcow2", &[]);
    let info = json(vmshift_ok(d, &["info", "--output", "json", "img.qcow2"]).as_bytes());
    let names: Vec<&str> = info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(vmshift(d, &["check", "img.qcow2"]).status.code(), Some(0));
    assert_written_qcow2_passes(d, "img.qcow2", &[]);
}

#[test]
fn qcow2_external_data_file_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=img.data",
            "img.qcow2",
            "8M",
        ],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "write -z 3M 64k",
            "img.qcow2",
        ],
    );
    assert_raw_identical(d, "img.qcow2");
    assert_info_agrees(d, "img.qcow2", &[]);
    assert_eq!(vmshift(d, &["check", "img.qcow2"]).status.code(), Some(0));
}

#[test]
fn qcow2_raw_external_data_file_reads_guest_cluster_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=img.data,data_file_raw=on",
            "img.qcow2",
            "8M",
        ],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x6b 0 256k",
            "-c",
            "write -P 0x6c 5M 64k",
            "img.qcow2",
        ],
    );
    assert_raw_identical(d, "img.qcow2");
    assert_info_agrees(d, "img.qcow2", &[]);
    assert_map_agrees(d, "img.qcow2");
}

#[test]
fn raw_to_qcow2_every_writer_option_passes_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("pat.raw"), SIZE);
    for opts in [
        vec![],
        vec!["-o", "cluster_size=512"],
        vec!["-o", "cluster_size=2M"],
        vec!["-o", "compat=0.10"],
        vec!["-o", "refcount_bits=1"],
        vec!["-o", "refcount_bits=2"],
        vec!["-o", "refcount_bits=64"],
        vec!["-o", "preallocation=metadata"],
        vec!["-c"],
        vec!["-c", "-o", "compression_type=zstd"],
        vec!["-c", "-o", "cluster_size=4k,refcount_bits=2"],
        vec!["-c", "-o", "compat=0.10"],
        vec!["-S", "0"],
        vec!["-S", "64k"],
    ] {
        assert_written_qcow2_passes(d, "pat.raw", &opts);
    }
}

#[test]
fn raw_to_qcow2_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("pat.raw"), SIZE);
    vmshift_ok(d, &["convert", "-O", "qcow2", "pat.raw", "ours.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "pat.raw", "qemu.qcow2"],
    );
    let ours = std::fs::metadata(d.join("ours.qcow2")).unwrap().len();
    let theirs = std::fs::metadata(d.join("qemu.qcow2")).unwrap().len();
    // Same data clusters; metadata placement may differ by a few clusters.
    assert!(
        ours <= theirs + (256 << 10),
        "ours {ours} vs qemu-img {theirs}"
    );
}

#[test]
fn create_qcow2_options_match_qemu_info() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, opts) in [
        "cluster_size=4k",
        "compat=0.10",
        "refcount_bits=8",
        "compression_type=zstd",
        "lazy_refcounts=on",
        "preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let ours = format!("ours{i}.qcow2");
        let theirs = format!("theirs{i}.qcow2");
        vmshift_ok(d, &["create", "-f", "qcow2", "-o", opts, &ours, "10M"]);
        tool_ok(
            d,
            "qemu-img",
            &["create", "-f", "qcow2", "-o", opts, &theirs, "10M"],
        );
        tool_ok(d, "qemu-img", &["check", &ours]);
        let a = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", &ours]).stdout);
        let b = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", &theirs]).stdout);
        assert_eq!(a["virtual-size"], b["virtual-size"], "{opts}");
        assert_eq!(a["cluster-size"], b["cluster-size"], "{opts}");
        assert_eq!(a["format-specific"], b["format-specific"], "{opts}");
    }
}

#[test]
fn create_with_backing_file_takes_its_size_and_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "20M"],
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 0x42 0 1M", "base.qcow2"]);
    vmshift_ok(
        d,
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
    let info = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "top.qcow2"]).stdout);
    assert_eq!(info["virtual-size"], 20 << 20);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    tool_ok(d, "qemu-img", &["check", "top.qcow2"]);
    tool_ok(d, "qemu-img", &["compare", "base.qcow2", "top.qcow2"]);
}

/// `map --start-offset/--max-length` prints what qemu-img prints for the
/// same range, byte for byte, in both output styles (empty ranges too).
#[test]
fn map_ranges_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vmshift_tests::tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    vmshift_tests::tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write 1M 2M",
            "-c",
            "write 9M 64k",
            "-c",
            "write -z 12M 1M",
            "m.qcow2",
        ],
    );
    for range in [
        &["--start-offset", "1536k", "--max-length", "8M"][..],
        &["--start-offset", "9M"],
        &["--max-length", "100"],
        &["--start-offset", "1000", "--max-length", "5000"],
        &["--start-offset", "16M"],
        &["--start-offset", "20M"],
        &["--start-offset", "1M", "--max-length", "0"],
    ] {
        for output in ["json", "human"] {
            let mut args = vec!["map", "--output", output];
            args.extend_from_slice(range);
            args.push("m.qcow2");
            let ours = vmshift_tests::vmshift(d, &args);
            let theirs = vmshift_tests::qemu_img(d, &args);
            assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&theirs.stdout),
                "{args:?}"
            );
        }
    }
}

/// `-q` as qemu-img has it: nothing on standard output, the same exit
/// codes, problems still on standard error. Each tool runs the same
/// commands in a folder of its own.
#[test]
fn quiet_prints_nothing_but_problems_like_qemu_img() {
    let steps: [&[&str]; 7] = [
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
        &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"],
        &["compare", "-q", "a.qcow2", "b.qcow2"],
        &["check", "-q", "a.qcow2"],
        &["convert", "-q", "-p", "-O", "raw", "a.qcow2", "a.raw"],
        &["resize", "-q", "-f", "raw", "a.raw", "8M"],
        &["compare", "-q", "a.qcow2", "c.qcow2"],
    ];
    for tool in ["vmshift", "qemu-img"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for args in steps {
            if args.contains(&"c.qcow2") {
                // A different image: compare says so by its exit code only.
                vmshift_tests::tool_ok(
                    d,
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
                );
                vmshift_tests::tool_ok(d, "qemu-io", &["-c", "write -P 1 0 512", "c.qcow2"]);
            }
            let out = if tool == "vmshift" {
                vmshift_tests::vmshift(d, args)
            } else {
                vmshift_tests::qemu_img(d, args)
            };
            let want = if args.contains(&"c.qcow2") { 1 } else { 0 };
            assert_eq!(
                out.status.code(),
                Some(want),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stdout.is_empty(),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

/// `vmshift compare` and `compare -s` say what qemu-img says (the same
/// line, the same exit code) for every pair of a matrix of images: qcow2
/// (sparse, copied, compressed, preallocated, an overlay, a larger one),
/// raw (sparse, and with one byte changed at a sector's middle), and VMDK
/// (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
/// streamOptimized). Strict mode tells block statuses apart the way QEMU
/// reports them, down to where each answer ends.
#[test]
fn compare_and_strict_compare_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = |img: &str, cmds: &[&str]| qemu_io(d, img, cmds);
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    io("a.qcow2", &["write -P 1 0 1M", "write -z 2M 64k"]);
    let conv = |args: &[&str]| {
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        tool_ok(d, "qemu-img", &a);
    };
    conv(&["-O", "qcow2", "a.qcow2", "b.qcow2"]);
    conv(&["-O", "raw", "a.qcow2", "a.raw"]);
    conv(&["-c", "-O", "qcow2", "a.qcow2", "comp.qcow2"]);
    conv(&["-O", "vmdk", "a.qcow2", "a.vmdk"]);
    conv(&[
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "a.qcow2",
        "f.vmdk",
    ]);
    conv(&[
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        "a.qcow2",
        "t.vmdk",
    ]);
    conv(&[
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "a.qcow2",
        "so.vmdk",
    ]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pm.qcow2",
            "4M",
        ],
    );
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "8M"],
    );
    io("c.qcow2", &["write -P 1 0 1M"]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "ov.qcow2",
        ],
    );
    io("ov.qcow2", &["write -P 7 64k 64k"]);
    let mut raw = std::fs::read(d.join("a.raw")).unwrap();
    raw[1000] ^= 0xff;
    std::fs::write(d.join("d.raw"), &raw).unwrap();
    let images = [
        "a.qcow2",
        "b.qcow2",
        "a.raw",
        "d.raw",
        "a.vmdk",
        "f.vmdk",
        "t.vmdk",
        "so.vmdk",
        "ov.qcow2",
        "comp.qcow2",
        "pm.qcow2",
        "c.qcow2",
    ];
    let said = |o: &std::process::Output| {
        format!(
            "{}rc={:?}",
            String::from_utf8_lossy(&o.stdout),
            o.status.code()
        )
    };
    let mut differ = Vec::new();
    for x in images {
        for y in images {
            for strict in [false, true] {
                let mut args = vec!["compare"];
                if strict {
                    args.push("-s");
                }
                args.extend_from_slice(&[x, y]);
                let theirs = said(&qemu_img(d, &args));
                let ours = said(&vmshift(d, &args));
                if theirs != ours {
                    differ.push(format!("{args:?}: qemu-img {theirs:?}, vmshift {ours:?}"));
                }
            }
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    // A flat extent's holes are data and zero to QEMU; the human map names
    // the extent file.
    for img in ["f.vmdk", "t.vmdk"] {
        assert_map_agrees(d, img);
        let theirs = qemu_img(d, &["map", img]);
        let ours = vmshift(d, &["map", img]);
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout)
        );
    }
}

/// The allocation of an image as qemu-img maps it, host offsets left out.
fn layout(d: &Path, image: &str) -> String {
    let out = tool_ok(d, "qemu-img", &["map", "--output", "json", image]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(|l| match l.find(", \"offset\"") {
            Some(i) => format!("{}}}", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `convert -B BACKING -F FMT` writes what qemu-img writes: the source's
/// top image only (its data and its zeros), what it reads from its own
/// chain left to read through the new backing file, partly written
/// clusters completed from it; the same content and the same allocation,
/// compressed or not, from an overlay (4 KiB clusters into 64 KiB ones),
/// a standalone qcow2 and sparse and full raw files.
#[test]
fn convert_with_a_backing_file_writes_what_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = |img: &str, cmds: &[&str]| qemu_io(d, img, cmds);
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
    );
    io("base.qcow2", &["write -P 1 0 8M"]);
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io(
        "top.qcow2",
        &[
            "write -P 2 4k 4k",
            "write -z 1M 64k",
            "write -P 3 2M 128k",
            "write -z 3M 4k",
            "write -P 0 5M 64k",
        ],
    );
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "other.qcow2", "8M"],
    );
    io("other.qcow2", &["write -P 9 0 6M"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "top.raw"],
    );
    let sparse = std::fs::File::create(d.join("sp.raw")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"abc", 70000).unwrap();
    // A backing file shorter than the source: zeros past its end stay
    // unallocated.
    tool_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "short.qcow2", "1M"],
    );
    io("short.qcow2", &["write -P 4 0 1M"]);
    for (src, base) in [
        ("top.qcow2", "short.qcow2"),
        ("other.qcow2", "short.qcow2"),
        ("top.qcow2", "base.qcow2"),
        ("top.qcow2", "other.qcow2"),
        ("other.qcow2", "base.qcow2"),
        ("sp.raw", "base.qcow2"),
        ("top.raw", "base.qcow2"),
    ] {
        for compress in [false, true] {
            let mut args = vec!["convert", "-O", "qcow2", "-B", base, "-F", "qcow2"];
            if compress {
                args.push("-c");
            }
            args.push(src);
            let mut theirs = args.clone();
            theirs.push("q.qcow2");
            tool_ok(d, "qemu-img", &theirs);
            let mut ours = args.clone();
            ours.push("v.qcow2");
            vmshift_ok(d, &ours);
            tool_ok(d, "qemu-img", &["check", "v.qcow2"]);
            tool_ok(d, "qemu-img", &["compare", "q.qcow2", "v.qcow2"]);
            assert_eq!(layout(d, "v.qcow2"), layout(d, "q.qcow2"), "{args:?}");
            let info =
                json(&tool_ok(d, "qemu-img", &["info", "--output", "json", "v.qcow2"]).stdout);
            assert_eq!(info["backing-filename"], base);
            assert_eq!(info["backing-filename-format"], "qcow2");
            std::fs::remove_file(d.join("q.qcow2")).unwrap();
            std::fs::remove_file(d.join("v.qcow2")).unwrap();
        }
    }
    // What qemu-img refuses, refused: no format for the backing file, a
    // format without a backing file, a format that has none.
    for args in [
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "x.qcow2",
        ][..],
        &[
            "convert",
            "-O",
            "qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "x.qcow2",
        ][..],
        &[
            "convert",
            "-O",
            "raw",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "x.raw",
        ][..],
    ] {
        assert_eq!(qemu_img(d, args).status.code(), Some(1), "{args:?}");
        assert_eq!(vmshift(d, args).status.code(), Some(1), "{args:?}");
        assert!(!d.join("x.qcow2").exists() && !d.join("x.raw").exists());
    }
}

/// The offsets in qemu-img's or vmshift's salvage warnings.
fn salvage_offsets(stderr: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| l.split("error while reading offset ").nth(1))
        .map(|rest| rest.split(':').next().unwrap().parse().unwrap())
        .collect()
}

/// `convert --salvage` over a compressed qcow2 cluster whose deflate data
/// is damaged: the same zeros where qemu-img puts them, the same warnings
/// (one per 512-byte sector, same offsets), exit 0; without it both fail.
#[test]
fn convert_salvage_reads_what_qemu_img_salvages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut text = Vec::new();
    let mut i = 0;
    while text.len() < 2 << 20 {
        text.extend_from_slice(format!("line {i:09} of the salvage pattern\n").as_bytes());
        i += 1;
    }
    text.truncate(2 << 20);
    std::fs::write(d.join("pat.raw"), &text).unwrap();
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "pat.raw", "c.qcow2"],
    );
    // Damage the compressed cluster at guest 192 KiB (L2 entry 3).
    let mut img = std::fs::read(d.join("c.qcow2")).unwrap();
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(img[20..24].try_into().unwrap());
    let l1 = be(&img[40..48]) as usize;
    let l2 = (be(&img[l1..l1 + 8]) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(&img[l2 + 24..l2 + 32]);
    assert_ne!(entry & (1 << 62), 0, "cluster 3 is compressed");
    let host = (entry & ((1 << (62 - (cluster_bits - 8))) - 1)) as usize;
    img[host + 100..host + 132].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef].repeat(8));
    std::fs::write(d.join("c.qcow2"), &img).unwrap();

    let args = ["convert", "-O", "raw", "c.qcow2", "x.raw"];
    assert_eq!(qemu_img(d, &args).status.code(), Some(1));
    // qemu-img leaves its partial output behind; vmshift leaves none.
    let _ = std::fs::remove_file(d.join("x.raw"));
    assert_eq!(vmshift(d, &args).status.code(), Some(1));
    assert!(!d.join("x.raw").exists());
    let theirs = qemu_img(
        d,
        &["convert", "--salvage", "-O", "raw", "c.qcow2", "q.raw"],
    );
    let ours = vmshift(
        d,
        &[
            "convert",
            "--salvage",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "c.qcow2",
            "v.raw",
        ],
    );
    assert_eq!(theirs.status.code(), Some(0));
    assert_eq!(
        ours.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let (q, v) = (
        salvage_offsets(&theirs.stderr),
        salvage_offsets(&ours.stderr),
    );
    assert_eq!(q.len(), 128, "one warning per sector of the 64 KiB cluster");
    assert_eq!(v, q);
    tool_ok(d, "cmp", &["q.raw", "v.raw"]);
    // -q: the same data, no warnings.
    let quiet = vmshift(
        d,
        &[
            "convert",
            "-q",
            "--salvage",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "c.qcow2",
            "v.qcow2",
        ],
    );
    assert_eq!(quiet.status.code(), Some(0));
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    tool_ok(d, "qemu-img", &["compare", "q.raw", "v.qcow2"]);
}

/// The human map of an image with compressed clusters is qemu-img's
/// error (it has no host offset to show), after the same header line.
#[test]
fn human_map_of_compressed_clusters_is_qemu_imgs_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("p.raw"), 4 << 20);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "p.raw", "c.qcow2"],
    );
    let theirs = qemu_img(d, &["map", "c.qcow2"]);
    let ours = vmshift(d, &["map", "c.qcow2"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(ours.stdout, theirs.stdout);
    assert!(String::from_utf8_lossy(&ours.stderr)
        .contains("File contains external, encrypted or compressed clusters."));
}
