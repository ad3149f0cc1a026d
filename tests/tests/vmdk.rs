//! VMDK images made by qemu-img, read by vmshift and compared with what
//! qemu-img reads from them.

use std::path::Path;

use vmshift_tests::{
    assert_common_fields_agree, json, patterned_raw, tool, tool_ok, vmshift, vmshift_ok,
};

/// vmshift's raw output of `image` is byte-identical to qemu-img's.
fn assert_raw_identical(dir: &Path, image: &str) {
    tool_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", image, "qemu.raw"],
    );
    vmshift_ok(
        dir,
        &["convert", "-f", "vmdk", "-O", "raw", image, "ours.raw"],
    );
    tool_ok(dir, "cmp", &["qemu.raw", "ours.raw"]);
    std::fs::remove_file(dir.join("qemu.raw")).unwrap();
    std::fs::remove_file(dir.join("ours.raw")).unwrap();
}

fn assert_info_agrees(dir: &Path, image: &str) {
    let theirs = json(&tool_ok(dir, "qemu-img", &["info", "--output", "json", image]).stdout);
    let ours = json(vmshift_ok(dir, &["info", "--output", "json", image]).as_bytes());
    for k in ["virtual-size", "format", "actual-size", "format-specific"] {
        assert!(ours.get(k).is_some(), "{image}: vmshift info lacks {k}");
    }
    assert_common_fields_agree(&ours, &theirs, image);
}

fn assert_map_agrees(dir: &Path, image: &str) {
    // Over a hole in a flat extent's file both say "zero" and "data" (the
    // VMDK driver claims the range; the file reads zeros there).
    let theirs = json(&tool_ok(dir, "qemu-img", &["map", "--output", "json", image]).stdout);
    let ours = json(vmshift_ok(dir, &["map", "--output", "json", image]).as_bytes());
    assert_common_fields_agree(&ours, &theirs, &format!("{image} map"));
}

/// A patterned raw disk of `size` bytes converted by qemu-img to VMDK.
fn qemu_vmdk(dir: &Path, size: u64, subformat: &str) -> String {
    patterned_raw(&dir.join("pat.raw"), size);
    let name = format!("{subformat}.vmdk");
    let opt = format!("subformat={subformat}");
    tool_ok(
        dir,
        "qemu-img",
        &[
            "convert", "-f", "raw", "-O", "vmdk", "-o", &opt, "pat.raw", &name,
        ],
    );
    name
}

macro_rules! subformat_case {
    ($name:ident, $subformat:expr, $size:expr, map: $map:expr) => {
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let image = qemu_vmdk(d, $size, $subformat);
            assert_raw_identical(d, &image);
            assert_info_agrees(d, &image);
            if $map {
                assert_map_agrees(d, &image);
            }
        }
    };
}

// Sizes: a grain multiple, one that is not (the last grain is partial), and
// above 2 GiB so twoGbMaxExtent splits into several files.
subformat_case!(monolithic_sparse_reads_like_qemu, "monolithicSparse", 40 << 20, map: true);
subformat_case!(monolithic_sparse_odd_size_reads_like_qemu, "monolithicSparse", (40 << 20) + 4608, map: true);
subformat_case!(stream_optimized_reads_like_qemu, "streamOptimized", 40 << 20, map: true);
subformat_case!(stream_optimized_odd_size_reads_like_qemu, "streamOptimized", (40 << 20) + 1024, map: true);
subformat_case!(monolithic_flat_reads_like_qemu, "monolithicFlat", 40 << 20, map: false);
subformat_case!(two_gb_sparse_reads_like_qemu, "twoGbMaxExtentSparse", (5 << 30) + (3 << 20), map: true);
subformat_case!(two_gb_flat_reads_like_qemu, "twoGbMaxExtentFlat", (5 << 30) + (3 << 20), map: false);

#[test]
fn delta_disk_over_parent_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_vmdk(d, 16 << 20, "monolithicSparse");
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            &base,
            "-F",
            "vmdk",
            "child.vmdk",
        ],
    );
    tool_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x77 1M 128k",
            "-c",
            "write -P 0x78 15M 4k",
            "child.vmdk",
        ],
    );
    assert_raw_identical(d, "child.vmdk");
    assert_info_agrees(d, "child.vmdk");
    assert_map_agrees(d, "child.vmdk");
}

/// Rewrites the embedded descriptor of a sparse VMDK made by qemu-img
/// (the text up to the first NUL after "# Disk DescriptorFile").
fn edit_embedded_descriptor(file: &Path, edit: impl Fn(&str) -> String) {
    let mut bytes = std::fs::read(file).unwrap();
    let start = bytes
        .windows(21)
        .position(|w| w == b"# Disk DescriptorFile")
        .unwrap();
    let end = start + bytes[start..].iter().position(|&b| b == 0).unwrap();
    let text = edit(std::str::from_utf8(&bytes[start..end]).unwrap());
    assert!(text.len() < 10 * 512, "descriptor grew past its area");
    bytes[start..start + text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn delta_naming_its_parent_by_a_path_on_another_host_finds_it_beside_itself() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_vmdk(d, 4 << 20, "monolithicSparse");
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            &base,
            "-F",
            "vmdk",
            "child.vmdk",
        ],
    );
    tool_ok(d, "qemu-io", &["-c", "write -P 0x77 1M 64k", "child.vmdk"]);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "child.vmdk", "want.raw"],
    );
    let want = std::fs::read(d.join("want.raw")).unwrap();
    for host_path in [
        format!("/vmfs/volumes/datastore1/vm/{base}"),
        format!("C:\\VMs\\vm\\{base}"),
    ] {
        edit_embedded_descriptor(&d.join("child.vmdk"), |t| {
            let hint = t
                .lines()
                .find(|l| l.starts_with("parentFileNameHint"))
                .unwrap();
            t.replace(hint, &format!("parentFileNameHint=\"{host_path}\""))
        });
        let _ = std::fs::remove_file(d.join("got.raw"));
        vmshift_ok(d, &["convert", "-O", "raw", "child.vmdk", "got.raw"]);
        assert!(
            std::fs::read(d.join("got.raw")).unwrap() == want,
            "{host_path}"
        );
        let info = json(vmshift_ok(d, &["info", "--output", "json", "child.vmdk"]).as_bytes());
        assert_eq!(info["backing-filename"], host_path.as_str());
        // Named relative to the image as it was given, like qemu-img.
        assert_eq!(info["full-backing-filename"], base.as_str());
    }
}

#[test]
fn a_damaged_delta_descriptor_is_an_error_never_a_standalone_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_vmdk(d, 4 << 20, "monolithicSparse");
    tool_ok(d, "qemu-io", &["-c", "write -P 0x11 0 1M", &base]);
    let fresh = |name: &str| {
        tool_ok(
            d,
            "qemu-img",
            &[
                "create", "-q", "-f", "vmdk", "-b", &base, "-F", "vmdk", name,
            ],
        );
    };
    // The extent line cut to its access word.
    fresh("cut.vmdk");
    edit_embedded_descriptor(&d.join("cut.vmdk"), |t| {
        let ext = t.lines().find(|l| l.starts_with("RW ")).unwrap();
        t.replace(ext, &format!("RW{}", " ".repeat(ext.len() - 2)))
    });
    // The parent's name gone, its CID still there.
    fresh("orphan.vmdk");
    edit_embedded_descriptor(&d.join("orphan.vmdk"), |t| {
        let hint = t
            .lines()
            .find(|l| l.starts_with("parentFileNameHint"))
            .unwrap();
        t.replace(hint, &"#".repeat(hint.len()))
    });
    for (image, says) in [
        ("cut.vmdk", "descriptor line 8"),
        ("orphan.vmdk", "parentCID"),
    ] {
        for args in [
            vec!["info", image],
            vec!["check", image],
            vec!["convert", "-O", "raw", image, "out.raw"],
        ] {
            let o = vmshift(d, &args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains(says), "{args:?}: {err}");
            assert!(!d.join("out.raw").exists());
        }
    }
}

#[test]
fn zeroed_grains_read_as_zero_over_a_parent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_vmdk(d, 8 << 20, "monolithicSparse");
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "-b",
            &base,
            "-F",
            "vmdk",
            "z.vmdk",
        ],
    );
    tool_ok(
        d,
        "qemu-io",
        &["-c", "write -z 0 256k", "-c", "write -P 9 1M 64k", "z.vmdk"],
    );
    assert_raw_identical(d, "z.vmdk");
    assert_map_agrees(d, "z.vmdk");
}

#[test]
fn vmdk_to_qcow2_passes_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = qemu_vmdk(d, 24 << 20, "streamOptimized");
    vmshift_ok(d, &["convert", "-O", "qcow2", "-c", &image, "out.qcow2"]);
    tool_ok(d, "qemu-img", &["check", "out.qcow2"]);
    tool_ok(d, "qemu-img", &["compare", &image, "out.qcow2"]);
}

#[test]
fn descriptor_with_missing_extent_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("d.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"gone-flat.vmdk\" 0\n",
    )
    .unwrap();
    let out = vmshift(d, &["info", "d.vmdk"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("descriptor line 8") && err.contains("gone-flat.vmdk"),
        "{err}"
    );
}

#[test]
fn descriptor_with_short_flat_extent_is_a_wrong_size_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("d-flat.vmdk"), vec![0u8; 4096]).unwrap();
    std::fs::write(
        d.join("d.vmdk"),
        "version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 2048 VMFS \"d-flat.vmdk\"\n",
    )
    .unwrap();
    let out = vmshift(d, &["info", "d.vmdk"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("descriptor line 5") && err.contains("4096 bytes"),
        "{err}"
    );
}

#[test]
fn descriptor_naming_a_file_outside_its_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("d.vmdk"),
        "version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 1 FLAT \"/etc/hostname\" 0\n",
    )
    .unwrap();
    let out = vmshift(d, &["info", "d.vmdk"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn esxi_descriptor_with_crlf_and_spaces_reads_its_flat_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("my disk-flat.vmdk"), 4 << 20);
    std::fs::write(
        d.join("my disk.vmdk"),
        "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\nisNativeSnapshot=\"no\"\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\nRW 8192 VMFS \"my disk-flat.vmdk\"\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\nddb.virtualHWVersion = \"13\"\r\n",
    )
    .unwrap();
    vmshift_ok(d, &["convert", "-O", "raw", "my disk.vmdk", "out.raw"]);
    assert_eq!(
        std::fs::read(d.join("out.raw")).unwrap(),
        std::fs::read(d.join("my disk-flat.vmdk")).unwrap()
    );
    let info = json(vmshift_ok(d, &["info", "--output", "json", "my disk.vmdk"]).as_bytes());
    assert_eq!(info["format-specific"]["data"]["create-type"], "vmfs");
}

/// vmshift writes `subformat` from `source`; qemu-img finds it clean and
/// identical to the source.
fn assert_written_vmdk_passes(dir: &Path, source: &str, opts: &str) {
    let _ = std::fs::remove_file(dir.join("written.vmdk"));
    vmshift_ok(
        dir,
        &["convert", "-O", "vmdk", "-o", opts, source, "written.vmdk"],
    );
    tool_ok(dir, "qemu-img", &["check", "written.vmdk"]);
    tool_ok(dir, "qemu-img", &["compare", source, "written.vmdk"]);
    vmshift_ok(dir, &["compare", source, "written.vmdk"]);
}

#[test]
fn written_vmdk_every_single_file_subformat_passes_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for size in [24u64 << 20, (24 << 20) + 1536] {
        patterned_raw(&d.join("src.raw"), size);
        tool_ok(
            d,
            "qemu-img",
            &["convert", "-O", "qcow2", "-c", "src.raw", "src.qcow2"],
        );
        for source in ["src.raw", "src.qcow2"] {
            for opts in [
                "subformat=monolithicSparse",
                "subformat=streamOptimized",
                "subformat=streamOptimized,adapter_type=lsilogic,hwversion=13",
                "subformat=monolithicSparse,adapter_type=buslogic",
            ] {
                assert_written_vmdk_passes(d, source, opts);
            }
        }
    }
}

#[test]
fn written_stream_optimized_has_vmware_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 40 << 20);
    vmshift_ok(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "src.raw",
            "s.vmdk",
        ],
    );
    let b = std::fs::read(d.join("s.vmdk")).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(&b[0..4], b"KDMV");
    assert_eq!(u32_at(4), 3, "version");
    assert_eq!(u32_at(8) & 0x3_0000, 0x3_0000, "compressed + markers");
    assert_eq!(u64_at(56), u64::MAX, "grain directory at the end");
    let n = b.len();
    assert!(
        b[n - 512..].iter().all(|&x| x == 0),
        "ends with the end-of-stream marker"
    );
    assert_eq!(&b[n - 1024..n - 1020], b"KDMV", "footer");
    assert_eq!(u32_at(n - 1536 + 12), 3, "footer marker type");
    let gd = u64_at(n - 1024 + 56) as usize * 512;
    assert_eq!(
        u32_at(gd - 512 + 12),
        2,
        "grain directory marker before the directory"
    );
    let first_gt = u32_at(gd) as usize * 512;
    assert_eq!(
        u32_at(first_gt - 512 + 12),
        1,
        "grain table marker before the table"
    );
    let desc = String::from_utf8_lossy(&b[512..512 * 21]);
    assert!(
        desc.contains("createType=\"streamOptimized\"") && desc.contains("ddb.toolsVersion"),
        "{desc}"
    );
}

#[test]
fn written_vmdk_info_agrees_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 8 << 20);
    for sf in ["monolithicSparse", "streamOptimized"] {
        let name = format!("{sf}.vmdk");
        vmshift_ok(
            d,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sf}"),
                "src.raw",
                &name,
            ],
        );
        assert_info_agrees(d, &name);
        assert_map_agrees(d, &name);
    }
}

/// A qemu-made monolithicSparse image, its bytes, and the byte offsets of
/// the primary and redundant grain tables 0.
fn sparse_with_tables(dir: &Path) -> (Vec<u8>, usize, usize, usize) {
    let image = qemu_vmdk(dir, 8 << 20, "monolithicSparse");
    std::fs::rename(dir.join(&image), dir.join("s.vmdk")).unwrap();
    // The embedded descriptor names the extent by file name; the file is
    // its own extent, so the rename is harmless.
    let b = std::fs::read(dir.join("s.vmdk")).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (rgd, gd) = (u64_at(48) * 512, u64_at(56) * 512);
    let (rgt0, gt0) = (u32_at(rgd) * 512, u32_at(gd) * 512);
    (b, gd, gt0, rgt0)
}

fn check_code(dir: &Path, tool: &str, image: &str) -> Option<i32> {
    let out = if tool == "vmshift" {
        vmshift(dir, &["check", image])
    } else {
        vmshift_tests::qemu_img(dir, &["check", image])
    };
    out.status.code()
}

#[test]
fn vmdk_check_clean_images_exit_0_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sf in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
        let image = qemu_vmdk(d, 8 << 20, sf);
        assert_eq!(check_code(d, "vmshift", &image), Some(0), "{sf}");
        assert_eq!(check_code(d, "qemu-img", &image), Some(0), "{sf}");
    }
}

#[test]
fn vmdk_grain_entry_past_eof_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut b, _, gt0, rgt0) = sparse_with_tables(d);
    for t in [gt0, rgt0] {
        b[t..t + 4].copy_from_slice(&0x00f0_0000u32.to_le_bytes());
    }
    std::fs::write(d.join("s.vmdk"), &b).unwrap();
    // qemu-img reports the error, then fails the whole check (exit 1,
    // "Check failed: Invalid argument"); vmshift counts it as a corruption,
    // with the exit code of a corrupt qcow2 (2).
    assert_eq!(check_code(d, "qemu-img", "s.vmdk"), Some(1));
    assert_eq!(check_code(d, "vmshift", "s.vmdk"), Some(2));
    let out = vmshift(d, &["convert", "-O", "raw", "s.vmdk", "out.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("grain table entry"));
}

#[test]
fn vmdk_overlapping_grains_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut b, _, gt0, rgt0) = sparse_with_tables(d);
    for t in [gt0, rgt0] {
        let first: [u8; 4] = b[t..t + 4].try_into().unwrap();
        b[t + 4..t + 8].copy_from_slice(&first);
    }
    std::fs::write(d.join("s.vmdk"), &b).unwrap();
    assert_eq!(check_code(d, "vmshift", "s.vmdk"), Some(2));
}

#[test]
fn vmdk_redundant_table_disagreeing_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut b, _, _, rgt0) = sparse_with_tables(d);
    b[rgt0 + 40..rgt0 + 44].copy_from_slice(&12345u32.to_le_bytes());
    std::fs::write(d.join("s.vmdk"), &b).unwrap();
    let out = vmshift(d, &["check", "s.vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("differ between primary and redundant"));
}

#[test]
fn vmdk_zeroed_primary_directory_reads_through_the_redundant_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut b, gd, _, _) = sparse_with_tables(d);
    tool_ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "s.vmdk", "before.raw"],
    );
    b[gd..gd + 16].fill(0);
    std::fs::write(d.join("s.vmdk"), &b).unwrap();
    vmshift_ok(d, &["convert", "-O", "raw", "s.vmdk", "after.raw"]);
    tool_ok(d, "cmp", &["before.raw", "after.raw"]);
    let out = vmshift(d, &["check", "s.vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("redundant one was used"));
}

#[test]
fn written_vmdk_multi_file_subformats_pass_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Above 2 GiB, so the split subformats make three extent files.
    patterned_raw(&d.join("src.raw"), (5 << 30) + (1 << 20));
    for sf in [
        "monolithicFlat",
        "twoGbMaxExtentFlat",
        "twoGbMaxExtentSparse",
    ] {
        let name = format!("{sf}.vmdk");
        vmshift_ok(
            d,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sf}"),
                "src.raw",
                &name,
            ],
        );
        tool_ok(d, "qemu-img", &["check", &name]);
        tool_ok(d, "qemu-img", &["compare", "src.raw", &name]);
        let info = json(&tool_ok(d, "qemu-img", &["info", "--output", "json", &name]).stdout);
        assert_eq!(info["format-specific"]["data"]["create-type"], sf);
    }
    let split: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("twoGbMaxExtentSparse-s"))
        .collect();
    assert_eq!(split.len(), 3, "{split:?}");
}

#[test]
fn failed_multi_file_convert_leaves_no_extent_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vmshift_tests::qcow2_with_data_past_eof(d, "bad.qcow2");
    let out = vmshift(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "bad.qcow2",
            "out.vmdk",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let names = vmshift_tests::names_in(d);
    assert_eq!(names, ["bad.qcow2"]);
}

#[test]
fn vmdk_delta_over_a_changed_parent_is_reported_by_check_and_not_read_through() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_vmdk(d, 8 << 20, "monolithicSparse");
    tool_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            &base,
            "-F",
            "vmdk",
            "child.vmdk",
        ],
    );
    assert_eq!(check_code(d, "vmshift", "child.vmdk"), Some(0));
    // Writing to the parent gives it a new CID.
    tool_ok(d, "qemu-io", &["-c", "write -P 1 0 64k", &base]);
    let out = vmshift(d, &["check", "child.vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parentCID"));
    // qemu-img refuses to read through a parent whose CID changed; so does
    // vmshift, naming the field. Metadata stays readable.
    let peer = tool(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "child.vmdk", "q.raw"],
    );
    assert!(!peer.status.success());
    let out = vmshift(d, &["convert", "-O", "raw", "child.vmdk", "v.raw"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("parentCID") && err.contains("changed"),
        "{err}"
    );
    assert!(!d.join("v.raw").exists());
    vmshift_ok(d, &["info", "child.vmdk"]);
    vmshift_ok(d, &["map", "child.vmdk"]);
}

#[test]
fn vmdk_stream_footer_disagreeing_with_header_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned_raw(&d.join("src.raw"), 8 << 20);
    vmshift_ok(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "src.raw",
            "s.vmdk",
        ],
    );
    assert_eq!(check_code(d, "vmshift", "s.vmdk"), Some(0));
    let mut b = std::fs::read(d.join("s.vmdk")).unwrap();
    // The header's numGTEsPerGT (offset 44) no longer matches the footer's.
    b[44..48].copy_from_slice(&256u32.to_le_bytes());
    std::fs::write(d.join("s.vmdk"), &b).unwrap();
    let out = vmshift(d, &["check", "s.vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("header and footer disagree on numGTEsPerGT")
    );
}

// --- Hand-built fixtures: what qemu-img cannot make --------------------------

/// Runs `fixtures/vmdk/generate.py` into `dir`: VMware's stream layout, a
/// split sparse set, an ESXi pair, a delta chain, stale redundant tables,
/// vmfsSparse (COWD) and seSparse deltas.
fn generate_fixtures(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vmdk/generate.py");
    tool_ok(dir, "python3", &[script.to_str().unwrap(), "."]);
}

/// A MANIFEST of the generator: (file to open, expected raw content,
/// createType) per line.
fn manifest(dir: &Path, name: &str) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(dir.join(name)).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{name} line {l:?}");
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

/// vmshift reads `file` as `expected` and reports `create_type`; its
/// qcow2 copy is the same disk to qemu-img.
fn assert_fixture_reads(d: &Path, file: &str, expected: &str, create_type: &str) {
    vmshift_ok(d, &["convert", "-O", "raw", file, "ours.raw"]);
    tool_ok(d, "cmp", &["ours.raw", expected]);
    std::fs::remove_file(d.join("ours.raw")).unwrap();
    let info = json(vmshift_ok(d, &["info", "--output", "json", file]).as_bytes());
    assert_eq!(
        info["format-specific"]["data"]["create-type"], create_type,
        "{file}"
    );
    vmshift_ok(d, &["convert", "-O", "qcow2", file, "out.qcow2"]);
    tool_ok(d, "qemu-img", &["check", "out.qcow2"]);
    tool_ok(
        d,
        "qemu-img",
        &["compare", "-f", "raw", expected, "out.qcow2"],
    );
    std::fs::remove_file(d.join("out.qcow2")).unwrap();
}

#[test]
fn hand_built_fixtures_read_as_written_and_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_fixtures(d);
    let cases = manifest(d, "MANIFEST");
    assert!(cases.len() >= 12, "{cases:?}");
    for (file, expected, create_type) in cases {
        // The fixture is what its generator meant: qemu-img reads the
        // generator's model of the content, and so does vmshift.
        tool_ok(d, "qemu-img", &["convert", "-O", "raw", &file, "qemu.raw"]);
        tool_ok(d, "cmp", &["qemu.raw", &expected]);
        std::fs::remove_file(d.join("qemu.raw")).unwrap();
        assert_fixture_reads(d, &file, &expected, &create_type);
        assert_info_agrees(d, &file);
        assert_map_agrees(d, &file);
        // Redundant tables that lag the primary ones (a crash between the
        // two updates) are an inconsistency check reports; the data is
        // read through the primary tables, as qemu-img does.
        let want = if file == "rgd.vmdk" { 2 } else { 0 };
        let out = vmshift(d, &["check", &file]);
        assert_eq!(out.status.code(), Some(want), "{file}: {out:?}");
    }
}

#[test]
fn hand_built_fixtures_qemu_misreads_are_read_by_the_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_fixtures(d);
    let cases = manifest(d, "MANIFEST.qemu-differs");
    let names: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names, ["split-unaligned.vmdk", "rgd-primary-zeroed.vmdk"]);
    for (file, expected, create_type) in &cases {
        // An extent that ends inside a grain: qemu-img reads the next
        // extent's first sectors as the tail of that grain. A wiped primary
        // grain directory: qemu-img reads zeros; vmshift uses the
        // redundant one (and check says so).
        assert_fixture_reads(d, file, expected, create_type);
        let want = if file == "rgd-primary-zeroed.vmdk" {
            2
        } else {
            0
        };
        let out = vmshift(d, &["check", file]);
        assert_eq!(out.status.code(), Some(want), "{file}: {out:?}");
    }
}

/// Overwrites a little-endian integer of `width` bytes at `at` in `file`.
fn put_le(file: &Path, at: usize, width: usize, value: u64) {
    let mut b = std::fs::read(file).unwrap();
    b[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    std::fs::write(file, b).unwrap();
}

fn le64(file: &Path, at: usize) -> u64 {
    let b = std::fs::read(file).unwrap();
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Runs vmshift with `args` and asserts it fails with exit code 1 and a
/// message containing `words`.
fn assert_fails_naming(d: &Path, args: &[&str], words: &str) {
    let out = vmshift(d, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(words), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sesparse_damage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_fixtures(d);
    let data = d.join("sesp-000001-sesparse.vmdk");
    let pristine = std::fs::read(&data).unwrap();
    // A journal still to replay: the tables cannot be trusted (qemu-img
    // refuses it too).
    let volatile = le64(&data, 80) as usize * 512;
    put_le(&data, volatile + 24, 8, 1);
    assert!(!tool(d, "qemu-img", &["info", "sesp-000001.vmdk"])
        .status
        .success());
    assert_fails_naming(d, &["info", "sesp-000001.vmdk"], "replay_journal");
    std::fs::write(&data, &pristine).unwrap();
    // A grain directory entry that is not 0x10000000 + a table index.
    let gd = le64(&data, 128) as usize * 512;
    put_le(&data, gd + 8, 8, 0x2000_0000_0000_0001);
    assert_fails_naming(
        d,
        &["convert", "-O", "raw", "sesp-000001.vmdk", "out.raw"],
        "grain directory entry",
    );
    assert!(!d.join("out.raw").exists());
    let out = vmshift(d, &["check", "sesp-000001.vmdk"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    std::fs::write(&data, &pristine).unwrap();
    // A grain table entry of an unknown kind.
    let tables = le64(&data, 144) as usize * 512;
    put_le(&data, tables + 16, 8, 0x5000_0000_0000_0000);
    let out = vmshift(d, &["check", "sesp-000001.vmdk"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a known kind"));
}

#[test]
fn cowd_damage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_fixtures(d);
    let data = d.join("cowd-000001-delta.vmdk");
    let pristine = std::fs::read(&data).unwrap();
    // Fewer directory entries than the capacity needs.
    put_le(&data, 24, 4, 1);
    assert_fails_naming(d, &["info", "cowd-000001.vmdk"], "numGDEntries");
    std::fs::write(&data, &pristine).unwrap();
    // A grain directory past the end of the file.
    put_le(&data, 20, 4, 1 << 30);
    assert_fails_naming(d, &["info", "cowd-000001.vmdk"], "gdOffset");
    std::fs::write(&data, &pristine).unwrap();
    // A grain table entry past the end of the file: check counts it, a
    // read of it fails.
    let gd = 4 * 512;
    let gt = u32::from_le_bytes(pristine[gd..gd + 4].try_into().unwrap()) as usize * 512;
    put_le(&data, gt, 4, 1 << 30);
    let out = vmshift(d, &["check", "cowd-000001.vmdk"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_fails_naming(
        d,
        &["convert", "-O", "raw", "cowd-000001.vmdk", "out.raw"],
        "grain table entry",
    );
}
