//! XFS read by vmshift's own reader, compared with `xfs_db` on the same
//! bytes: v5 (CRCs, file types in directory entries, big timestamps) and
//! v4 (no CRCs, no file types, 8 KiB directory blocks), with directories
//! in every form XFS stores them (short-form, block, leaf, node), local and
//! remote symlinks, and files read back byte for byte.

use std::collections::BTreeMap;
use std::path::Path;

use vmshift_tests::{tool_ok, vmshift, vmshift_ok};

/// Directories and how many files each holds: short-form, block, leaf and
/// node form for 4 KiB directory blocks.
const DIRS: [(&str, usize); 4] = [("small", 3), ("block", 40), ("leaf", 400), ("node", 3000)];

/// The tree, written as files under `root/` and as an `mkfs.xfs -p`
/// proto file that lists every one.
/// mkfs.xfs 6.1 writes a remote symlink's block without the v5 header
/// (xfs_db then reports a CRC error, and Linux refuses it), so `long_link`
/// is only for v4; the LVM fixture has a v5 one written by Linux.
fn tree(d: &Path, long_link: bool) {
    let script = r#"
import os, sys
d = sys.argv[1]
root = os.path.join(d, "root")
os.makedirs(root, exist_ok=True)
def data(name, n):
    p = os.path.join(root, name)
    with open(p, "wb") as f:
        f.write(bytes((i * 7 + len(name)) % 251 for i in range(n)))
    return p
lines = ["/dev/null", "0 0", "d--755 0 0"]
def f(name, n, mode="644"):
    lines.append(f"{name} ---{mode} 0 0 {data(name, n)}")
f("empty", 0)
f("one", 1, "600")
f("big.bin", 300000)
f("x" * 255, 10)
lines.append("gr\u00fc\u00dfe ---644 0 0 " + data("utf8", 5))
for dname, n in [("small", 3), ("block", 40), ("leaf", 400), ("node", 3000)]:
    lines.append(f"{dname} d--755 0 0")
    for i in range(n):
        lines.append(f"entry-number-{i:05d} ---644 0 0 {data('e', i % 7)}")
    lines.append("$")
lines.append("links d--700 0 0")
lines.append("rel l--777 0 0 ../big.bin")
lines.append("abs l--777 0 0 /links/rel")
lines.append("dir l--777 0 0 /small")
if sys.argv[2] == "1":
    lines.append("long l--777 0 0 /" + "/".join(["..", "."] * 150) + "/one")
lines.append("loop1 l--777 0 0 loop2")
lines.append("loop2 l--777 0 0 loop1")
lines.append("$")
lines.append("$")
open(os.path.join(d, "proto"), "w").write("\n".join(lines) + "\n")
"#;
    std::fs::write(d.join("tree.py"), script).unwrap();
    tool_ok(
        d,
        "python3",
        &[
            "tree.py",
            d.to_str().unwrap(),
            if long_link { "1" } else { "0" },
        ],
    );
}

/// (name, type) from `xfs_db ls DIR`, `.` and `..` left out.
fn xfs_db_ls(d: &Path, img: &str, dir: &str) -> BTreeMap<String, String> {
    let out = tool_ok(d, "xfs_db", &["-r", "-c", &format!("ls {dir}"), img]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // offset inode type hash namelen name (good)
            (f.len() >= 7).then(|| (f[5].to_string(), f[2].to_string()))
        })
        .filter(|(n, _)| n != "." && n != "..")
        .collect()
}

/// (name, type) from `vmshift guest ls -l`, in xfs_db's type names.
fn our_ls(d: &Path, img: &str, dir: &str) -> BTreeMap<String, String> {
    vmshift_ok(d, &["guest", "ls", "-l", img, dir])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind = match l.as_bytes()[0] {
                b'd' => "directory",
                b'l' => "symlink",
                _ => "regular",
            };
            (f[4].to_string(), kind.to_string())
        })
        .collect()
}

/// `core.size` and `core.mode` of each path, as xfs_db prints them.
fn xfs_db_sizes(d: &Path, img: &str, paths: &[String]) -> Vec<(u64, u32)> {
    let mut args = vec!["-r".to_string()];
    for p in paths {
        args.push("-c".into());
        args.push(format!("path {p}"));
        args.push("-c".into());
        args.push("print core.size core.mode".into());
    }
    args.push(img.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = String::from_utf8_lossy(&tool_ok(d, "xfs_db", &args).stdout).to_string();
    let vals: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(_, v)| v))
        .collect();
    vals.chunks(2)
        .map(|c| {
            (
                c[0].parse().unwrap(),
                u32::from_str_radix(c[1].trim_start_matches('0'), 8).unwrap_or(0),
            )
        })
        .collect()
}

fn check(d: &Path, mkfs: &[&str], img: &str, long_link: bool) {
    let raw = format!("{img}.raw");
    tool_ok(d, "truncate", &["-s", "320M", &raw]);
    let mut args = vec!["-q", "-f", "-p", "proto", "-L", "xfsroot"];
    args.extend_from_slice(mkfs);
    args.push(&raw);
    tool_ok(d, "mkfs.xfs", &args);
    tool_ok(d, "qemu-img", &["convert", "-O", "qcow2", &raw, img]);
    // Listings, in every directory form, name for name and type for type.
    for dir in ["/", "/small", "/block", "/leaf", "/node", "/links"] {
        let theirs = xfs_db_ls(d, &raw, dir);
        assert!(!theirs.is_empty(), "{img} {dir}");
        let ours = our_ls(d, img, dir);
        if theirs.values().all(|t| t == "unknown") {
            // Without file types in the entries xfs_db names none: the
            // names must agree, and the types are checked below.
            assert!(ours.keys().eq(theirs.keys()), "{img} {dir}");
        } else {
            assert_eq!(ours, theirs, "{img} {dir}");
        }
    }
    for (dir, n) in DIRS {
        assert_eq!(our_ls(d, img, &format!("/{dir}")).len(), n, "{img} {dir}");
    }
    // Sizes and modes of files and symlinks, as xfs_db reads the inodes.
    let mut names = vec![
        "/empty",
        "/one",
        "/big.bin",
        "/links/rel",
        "/small",
        "/node/entry-number-02999",
    ];
    if long_link {
        names.push("/links/long");
    }
    let paths: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let theirs = xfs_db_sizes(d, &raw, &paths);
    for (p, (size, mode)) in names.iter().zip(theirs) {
        let (dir, name) = p.rsplit_once('/').unwrap();
        let dir = if dir.is_empty() { "/" } else { dir };
        let line = vmshift_ok(d, &["guest", "ls", "-l", img, dir])
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(name))
            .unwrap_or_else(|| panic!("{p} not listed"))
            .to_string();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[1].parse::<u64>().unwrap(), size, "{img} {p}: {line}");
        let perm = f[0][1..].chars().enumerate().fold(0u32, |acc, (i, c)| {
            if c != '-' {
                acc | (0o400 >> i)
            } else {
                acc
            }
        });
        assert_eq!(perm, mode & 0o777, "{img} {p}: {line}");
    }
    // Files byte for byte, through symlinks resolved inside the guest.
    let cat = |p: &str| {
        let o = vmshift(d, &["guest", "cat", img, p]);
        assert!(
            o.status.success(),
            "{img} {p}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let src = |n: &str| std::fs::read(d.join("root").join(n)).unwrap();
    assert_eq!(cat("/big.bin"), src("big.bin"));
    assert_eq!(cat("/one"), src("one"));
    assert_eq!(cat("/empty"), b"");
    assert_eq!(cat(&format!("/{}", "x".repeat(255))), src(&"x".repeat(255)));
    assert_eq!(cat("/gr\u{fc}\u{df}e"), src("utf8"));
    assert_eq!(cat("/links/rel"), src("big.bin"));
    assert_eq!(cat("/links/abs"), src("big.bin"));
    if long_link {
        assert_eq!(cat("/links/long"), src("one"));
    }
    assert_eq!(cat("/links/dir/entry-number-00002"), src("e"));
    let ls = vmshift_ok(d, &["guest", "ls", "-l", img, "/links"]);
    assert!(ls.contains("rel -> ../big.bin"), "{ls}");
    // A symlink loop is an error, not a hang.
    let o = vmshift(d, &["guest", "cat", img, "/links/loop1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("symlinks"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The file system is named with its UUID and label, as blkid reads it.
    let fs = vmshift_ok(d, &["guest", "filesystems", img]);
    let blkid =
        String::from_utf8_lossy(&tool_ok(d, "blkid", &["-s", "UUID", "-o", "value", &raw]).stdout)
            .trim()
            .to_string();
    assert!(
        fs.contains("xfs") && fs.contains(&blkid) && fs.contains("xfsroot"),
        "{fs}"
    );
}

#[test]
fn xfs_v5_reads_as_xfs_db_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tree(d, false);
    check(d, &[], "v5.qcow2", false);
}

#[test]
fn xfs_v4_without_file_types_and_with_8k_directory_blocks_reads_as_xfs_db_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tree(d, true);
    check(
        d,
        &["-m", "crc=0", "-n", "ftype=0,size=8192", "-i", "size=256"],
        "v4.qcow2",
        true,
    );
}
