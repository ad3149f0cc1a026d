//! The bad-input corpus: every malformed image in `fixtures/bad` (written
//! by `fixtures/bad/generate.py`, listed in its MANIFEST with the words the
//! error must contain) makes `info`, `convert`, `check` and `map` fail
//! cleanly: a non-zero exit code that is not a panic (101) or a signal, no
//! "panicked" on stderr, no hang, no runaway allocation (each run is capped
//! at 256 MiB of address space and 30 seconds), an error that names the
//! field at fault, and nothing left behind by `convert`.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmshift_tests::vmshift_bin;

/// Address space each run may use, in KiB (`ulimit -v`).
const MEMORY_CAP_KIB: u64 = 256 * 1024;
/// How long each run may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Info,
    Convert,
    Check,
    Map,
}

impl Cmd {
    fn name(self) -> &'static str {
        match self {
            Cmd::Info => "info",
            Cmd::Convert => "convert",
            Cmd::Check => "check",
            Cmd::Map => "map",
        }
    }
}

/// Cases whose header and tables open fine: the damage is in guest data or
/// in a structure only some commands read, so the others succeed, as
/// qemu-img's do (`info` reads no L2 table; `map` does not look at the data
/// an L2 entry points to; `check` counts references and never inflates a
/// compressed cluster; nothing but `check` reads snapshot L1 tables). VMDK
/// alike: `info` reads no grain table; `map` reads grain tables but not the
/// grains or grain markers they point to; `check` reads grain markers but
/// never inflates a grain. The listed commands may exit 0; if they fail,
/// they must still fail cleanly.
const MAY_SUCCEED: &[(&str, &[Cmd])] = &[
    ("l2_entry_past_eof.qcow2", &[Cmd::Info, Cmd::Map]),
    ("l2_entry_unaligned.qcow2", &[Cmd::Info]),
    ("l1_entry_past_eof.qcow2", &[Cmd::Info]),
    ("l1_entry_unaligned.qcow2", &[Cmd::Info]),
    ("truncated_in_l2_table.qcow2", &[Cmd::Info]),
    (
        "compressed_inflates_past_cluster.qcow2",
        &[Cmd::Info, Cmd::Map, Cmd::Check],
    ),
    (
        "compressed_inflates_short.qcow2",
        &[Cmd::Info, Cmd::Map, Cmd::Check],
    ),
    (
        "compressed_garbage.qcow2",
        &[Cmd::Info, Cmd::Map, Cmd::Check],
    ),
    ("compressed_offset_past_eof.qcow2", &[Cmd::Info, Cmd::Map]),
    (
        "snapshot_l1_offset_huge.qcow2",
        &[Cmd::Info, Cmd::Convert, Cmd::Map],
    ),
    // A grain table entry (or GD entry) past the end: only `info` reads
    // no grain table.
    ("vmdk_gte_past_eof.vmdk", &[Cmd::Info]),
    ("vmdk_gd_entry_past_eof.vmdk", &[Cmd::Info]),
    // The grain starts inside the file and runs past its end: `map` only
    // sees the entry, which is in range.
    ("vmdk_gte_partly_past_eof.vmdk", &[Cmd::Info, Cmd::Map]),
    // Damage in a grain marker or the compressed stream behind it.
    (
        "vmdk_stream_marker_size_past_eof.vmdk",
        &[Cmd::Info, Cmd::Map],
    ),
    ("vmdk_stream_marker_lba_huge.vmdk", &[Cmd::Info, Cmd::Map]),
    (
        "vmdk_stream_compressed_garbage.vmdk",
        &[Cmd::Info, Cmd::Map, Cmd::Check],
    ),
    // A backing file the gate refuses: `info` shows the chain without
    // opening it, as qemu-img opens no backing file for `info`, and says
    // so (checked below); reading through it is refused.
    ("backing_etc_passwd.qcow2", &[Cmd::Info]),
    ("backing_parent_dir.qcow2", &[Cmd::Info]),
    ("backing_json.qcow2", &[Cmd::Info]),
    ("backing_nbd.qcow2", &[Cmd::Info]),
    ("backing_file_protocol.qcow2", &[Cmd::Info]),
];

fn may_succeed(file: &str, cmd: Cmd) -> bool {
    MAY_SUCCEED
        .iter()
        .any(|(f, cmds)| *f == file && cmds.contains(&cmd))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/bad")
}

/// One MANIFEST line: the file and the words its error must contain.
#[derive(Debug)]
struct Case {
    file: String,
    expected: String,
}

fn manifest() -> Vec<Case> {
    let path = fixtures().join("MANIFEST");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run python3 fixtures/bad/generate.py)",
            path.display()
        )
    });
    let cases: Vec<Case> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (file, expected) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("MANIFEST line without expected words: {l:?}"));
            Case {
                file: file.to_string(),
                expected: expected.trim().to_string(),
            }
        })
        .collect();
    assert!(!cases.is_empty(), "{} lists no cases", path.display());
    cases
}

/// A copy of the corpus folder at `<tmp>/bad`, so relative backing names
/// resolve and nothing in the repository is touched; `<tmp>/outside.qcow2`
/// and `<tmp>/outside.vmdk` exist so that a backing file or extent name
/// climbing out with `..` is refused by the gate, not merely missing.
fn stage() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("bad");
    std::fs::create_dir(&dir).expect("create staging dir");
    for entry in std::fs::read_dir(fixtures()).expect("read fixtures/bad") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy fixture");
        }
    }
    for outside in ["outside.qcow2", "outside.vmdk"] {
        std::fs::write(tmp.path().join(outside), b"not an image").expect("write outside");
    }
    (tmp, dir)
}

/// How one capped run ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

/// Runs `vmshift args` in `dir` under the memory cap and the timeout.
fn run_capped(dir: &Path, args: &[String]) -> Run {
    let logs = tempfile::tempdir().expect("temp dir for output");
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_CAP_KIB} && exec \"$0\" \"$@\""))
        .arg(vmshift_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawning sh");
    let deadline = Instant::now() + TIMEOUT;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("waiting for vmshift") {
            break (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().expect("reaping vmshift"), true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Run {
        code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// Runs `cmd` on every case; returns one message per violated expectation.
fn run_corpus(cmd: Cmd) -> Vec<String> {
    let (_tmp, dir) = stage();
    let cases = manifest();
    let mut failures = Vec::new();
    for case in &cases {
        let out_dir = tempfile::tempdir().expect("temp dir for convert");
        let target = out_dir.path().join("out.raw");
        let mut args = vec![cmd.name().to_string()];
        if cmd == Cmd::Convert {
            args.extend(["-O".into(), "raw".into()]);
        }
        args.push(case.file.clone());
        if cmd == Cmd::Convert {
            args.push(target.display().to_string());
        }
        let run = run_capped(&dir, &args);
        let what = format!("{}: vmshift {}", case.file, args.join(" "));
        let detail = format!(
            "exit code {:?}, signal {:?}\n    stderr: {}\n    stdout: {}",
            run.code,
            run.signal,
            run.stderr.trim(),
            run.stdout.chars().take(400).collect::<String>().trim()
        );
        let mut fail = |why: &str| failures.push(format!("{what}: {why}\n    {detail}"));
        if run.timed_out {
            fail(&format!("still running after {TIMEOUT:?}; killed"));
        } else if let Some(sig) = run.signal {
            fail(&format!("killed by signal {sig}"));
        } else if run.code == Some(101) || run.stderr.contains("panicked") {
            fail("panicked");
        } else if run.code == Some(0) {
            if !may_succeed(&case.file, cmd) {
                fail("succeeded on a bad image");
            } else if case.file.starts_with("backing_")
                && !run.stdout.contains("backing file not opened")
            {
                fail("did not say that the backing file was not opened");
            }
        } else if matches!(cmd, Cmd::Info | Cmd::Convert)
            && !run
                .stderr
                .to_lowercase()
                .contains(&case.expected.to_lowercase())
        {
            fail(&format!("error does not mention {:?}", case.expected));
        }
        if cmd == Cmd::Convert && run.code != Some(0) {
            let left: Vec<String> = std::fs::read_dir(out_dir.path())
                .expect("read convert dir")
                .map(|e| {
                    e.expect("dir entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            if !left.is_empty() {
                fail(&format!("failed but left {left:?} in the target folder"));
            }
        }
    }
    failures
}

fn assert_corpus(cmd: Cmd) {
    let failures = run_corpus(cmd);
    assert!(
        failures.is_empty(),
        "{} of {} bad images broke `vmshift {}`:\n{}",
        failures.len(),
        manifest().len(),
        cmd.name(),
        failures.join("\n")
    );
}

#[test]
fn info_of_bad_image_fails_naming_the_field() {
    assert_corpus(Cmd::Info);
}

#[test]
fn convert_of_bad_image_fails_naming_the_field_and_leaves_nothing() {
    assert_corpus(Cmd::Convert);
}

#[test]
fn check_of_bad_image_fails_without_panic() {
    assert_corpus(Cmd::Check);
}

#[test]
fn map_of_bad_image_fails_without_panic() {
    assert_corpus(Cmd::Map);
}

#[test]
fn manifest_of_bad_corpus_lists_every_image_once() {
    let cases = manifest();
    let mut listed: Vec<&str> = cases.iter().map(|c| c.file.as_str()).collect();
    listed.sort_unstable();
    let before = listed.len();
    listed.dedup();
    assert_eq!(before, listed.len(), "MANIFEST lists a file twice");
    let mut present: Vec<String> = std::fs::read_dir(fixtures())
        .expect("read fixtures/bad")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n != "MANIFEST" && n != "generate.py")
        .collect();
    present.sort_unstable();
    assert_eq!(
        listed, present,
        "MANIFEST and the files in fixtures/bad differ (rerun generate.py)"
    );
    for (file, _) in MAY_SUCCEED {
        assert!(
            listed.contains(file),
            "MAY_SUCCEED names {file}, which MANIFEST does not list"
        );
    }
}

#[test]
fn capped_run_with_memory_limit_applies_it() {
    // The wrapper the corpus runs through really caps the child: a shell in
    // its place reports the limit.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_CAP_KIB} && exec \"$0\" \"$@\""))
        .args(["sh", "-c", "ulimit -v"])
        .output()
        .expect("running sh");
    assert!(out.status.success(), "ulimit -v failed: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        MEMORY_CAP_KIB.to_string()
    );
}
