//! Helpers for the end-to-end tests: find the built `vmshift` binary, run
//! it and its peers (`qemu-img`, `qemu-io`), and make patterned images.
//!
//! A missing peer is a test failure, never a skip: CI installs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `vmshift` binary cargo built beside this test executable.
pub fn vmshift_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/vmshift
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("vmshift");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --workspace, or run the tests with `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// Runs `vmshift` with `args` in `dir`.
pub fn vmshift(dir: &Path, args: &[&str]) -> Output {
    Command::new(vmshift_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running vmshift")
}

/// Runs a peer tool in `dir`; panics (fails the test) if it is not installed.
pub fn tool(dir: &Path, name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("{name} must be installed for this test (apt-get install qemu-utils): {e}")
        })
}

/// Runs a peer tool and asserts it succeeded.
pub fn tool_ok(dir: &Path, name: &str, args: &[&str]) -> Output {
    let out = tool(dir, name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `vmshift` and asserts it succeeded; returns stdout.
pub fn vmshift_ok(dir: &Path, args: &[&str]) -> String {
    let out = vmshift(dir, args);
    assert!(
        out.status.success(),
        "vmshift {args:?} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `qemu-img` shorthand.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    tool(dir, "qemu-img", args)
}

/// `len` random-like bytes (xorshift, always the same): no compressor
/// shrinks them.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes a raw file of `size` bytes holding a recognisable, mostly
/// compressible pattern in a few ranges (and holes elsewhere).
pub fn patterned_raw(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("size raw");
    // Text-like data (compresses), random-like data (does not), and a
    // range of explicit zeros that must not be copied as data.
    let text: Vec<u8> = (0..300_000u32)
        .flat_map(|i| format!("line {i} of the vmshift test pattern\n").into_bytes())
        .take(1 << 20)
        .collect();
    let noise = noise(512 << 10);
    let places = [
        0u64,
        size / 3 + 4096,
        size / 2 + 512,
        size.saturating_sub(300_000),
    ];
    for (i, &at) in places.iter().enumerate() {
        let data = if i % 2 == 0 { &text[..] } else { &noise[..] };
        let n = data.len().min((size - at) as usize);
        f.write_all_at(&data[..n], at).expect("write pattern");
    }
    f.write_all_at(&vec![0u8; 256 << 10], size / 4)
        .expect("write zeros");
}

/// Parses JSON output.
pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// Makes `name` in `dir`: a qcow2 (made by qemu-img from a patterned raw
/// file) whose last data cluster is cut off, so its L2 entry points past
/// the end of the file and any copy fails partway through.
pub fn qcow2_with_data_past_eof(dir: &Path, name: &str) {
    let raw = dir.join(format!("{name}.src.raw"));
    patterned_raw(&raw, 8 << 20);
    tool_ok(
        dir,
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().expect("utf-8 path"),
            name,
        ],
    );
    std::fs::remove_file(&raw).expect("remove the raw source");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .expect("open the qcow2");
    let len = f.metadata().expect("metadata").len();
    f.set_len(len - 65536).expect("truncate");
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// Every field both print agrees (recursively for objects; arrays by element).
pub fn assert_common_fields_agree(
    ours: &serde_json::Value,
    theirs: &serde_json::Value,
    path: &str,
) {
    match (ours, theirs) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, va) in a {
                if k == "children" {
                    continue;
                }
                if let Some(vb) = b.get(k) {
                    assert_common_fields_agree(va, vb, &format!("{path}.{k}"));
                }
            }
        }
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: array lengths differ");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_common_fields_agree(x, y, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(ours, theirs, "{path} differs"),
    }
}

/// A sparse raw disk of `size` bytes.
pub fn sparse_disk(dir: &Path, name: &str, size: u64) {
    std::fs::File::create(dir.join(name))
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// Runs `program args` in `dir` with `input` on stdin; it must succeed.
pub fn tool_with_input(dir: &Path, program: &str, args: &[&str], input: &[u8]) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    assert!(child.wait().unwrap().success(), "{program} {args:?} failed");
}

/// Partitions `image` with an sfdisk script.
pub fn sfdisk(dir: &Path, image: &str, script: &str) {
    tool_with_input(dir, "sfdisk", &["-q", image], script.as_bytes());
}

/// A 64 MiB disk with a GPT of 4096-byte sectors (fdisk -b 4096): an
/// 8 MiB partition 1 and partition 2 filling the rest.
pub fn gpt_4096_disk(dir: &Path, name: &str) {
    sparse_disk(dir, name, 64 << 20);
    tool_with_input(
        dir,
        "fdisk",
        &["-b", "4096", name],
        b"g\nn\n1\n\n+8M\nn\n2\n\n\nw\n",
    );
}

/// `qemu-io -c CMD … IMAGE` in `dir`, the commands in one run; it must
/// succeed.
pub fn qemu_io(dir: &Path, image: &str, cmds: &[&str]) -> Output {
    let mut a = Vec::new();
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(image);
    tool_ok(dir, "qemu-io", &a)
}

/// The text of every `<tag>` element of an XML document (no attributes).
fn xml_all(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split(&close).next())
        .map(str::to_string)
        .collect()
}

/// Runs `virt-inspector` on `disks` (in `dir`) and asserts that `os`, one
/// operating system of `vmshift guest inspect --output json`, says what it
/// says: root, type, arch, distribution, version, hostname, package
/// format and manager, and the mount points.
pub fn virt_inspector_agrees(dir: &Path, disks: &[&str], os: &serde_json::Value) {
    // virt-inspector boots an appliance VM (under TCG here: ~20 s).
    // Without the package list: vmshift does not list applications (and
    // the fixtures' package databases are empty).
    let mut cmd = Command::new("virt-inspector");
    cmd.arg("--no-applications");
    for d in disks {
        let fmt = if d.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        cmd.arg(format!("--format={fmt}")).arg("-a").arg(d);
    }
    let out = cmd
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .current_dir(dir)
        .output()
        .expect("virt-inspector (libguestfs-tools) must be installed");
    assert!(
        out.status.success(),
        "virt-inspector: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = |tag: &str| xml_all(&xml, tag).into_iter().next().unwrap_or_default();
    // A fact one side leaves out is "" on both.
    let ours = |v: &serde_json::Value| match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for (key, tag) in [
        ("root", "root"),
        ("type", "name"),
        ("arch", "arch"),
        ("distro", "distro"),
        ("product_name", "product_name"),
        ("major_version", "major_version"),
        ("minor_version", "minor_version"),
        ("hostname", "hostname"),
        ("package_format", "package_format"),
        ("package_management", "package_management"),
    ] {
        assert_eq!(ours(&os[key]), first(tag), "{key}");
    }
    if os["type"] == "windows" {
        assert_eq!(ours(&os["product_variant"]), first("product_variant"));
        let w = &os["windows"];
        assert_eq!(ours(&w["root_dir"]), first("windows_systemroot"));
        assert_eq!(
            ours(&w["current_control_set"]),
            first("windows_current_control_set")
        );
    }
    // Mount points: (device, path), a device not on these disks as fstab
    // names it.
    let mut theirs: Vec<(String, String)> = xml
        .split("<mountpoint dev=\"")
        .skip(1)
        .map(|s| {
            let (dev, rest) = s.split_once("\">").unwrap();
            (dev.to_string(), rest.split('<').next().unwrap().to_string())
        })
        .collect();
    let mut ours: Vec<(String, String)> = os["mountpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let dev = m["device"].as_str().or(m["spec"].as_str()).unwrap();
            (dev.to_string(), m["path"].as_str().unwrap().to_string())
        })
        .collect();
    theirs.sort();
    ours.sort();
    assert_eq!(ours, theirs);
}

/// Runs a guest builder from `tests/guests` (it makes its disks with
/// libguestfs's appliance under TCG) into a new folder that outlives the
/// test process's temporary files, and returns the folder.
pub fn build_guest(script: &str) -> PathBuf {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guests")
        .join(script);
    let out = Command::new(&path)
        .arg(&dir)
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .output()
        .expect("guestfish (libguestfs-tools) must be installed");
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The finding codes of one operating system of `guest inspect --output
/// json`, in order.
pub fn finding_codes(os: &serde_json::Value) -> Vec<String> {
    os["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["code"].as_str().expect("code").to_string())
        .collect()
}
