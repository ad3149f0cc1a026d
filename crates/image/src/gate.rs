//! The gate every file named by an image or descriptor passes through.
//!
//! A qcow2 backing file, a qcow2 external data file, a VMDK extent, a disk
//! path in a `.vmx` — each is a name chosen by whoever wrote the file, and
//! opening it blindly lets a crafted image read `/etc/shadow` or a block
//! device into a conversion. The gate resolves the name beside the file that
//! names it and lets it through only if it stays inside a root: by default
//! the folder of the naming file; the user adds roots or opens the gate
//! entirely, explicitly.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// Decides which named files may be opened.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    extra_roots: Vec<PathBuf>,
    allow_outside: bool,
    /// How the user lets a refused name through (the flags differ between
    /// commands).
    hint: Option<&'static str>,
}

impl Gate {
    /// The default gate: a named file must lie in the folder of the file
    /// that names it (or below it).
    pub fn new() -> Self {
        Gate::default()
    }

    /// Also accept files under `root`.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.extra_roots.push(root.into());
        self
    }

    /// Accept absolute names, `..` and files anywhere (the user vouches for
    /// the image). Protocol and `json:` names stay refused: vmshift opens
    /// local files only.
    pub fn allow_outside(mut self, allow: bool) -> Self {
        self.allow_outside = allow;
        self
    }

    /// Says how to let a refused name through, in the refusal (default:
    /// the image commands' `--allow-backing-outside` and `--root`).
    pub fn hint(mut self, hint: &'static str) -> Self {
        self.hint = Some(hint);
        self
    }

    /// Whether the gate is fully open.
    pub fn is_open(&self) -> bool {
        self.allow_outside
    }

    /// Resolves `name`, found in `referrer` as its `what` (e.g. "backing
    /// file"), to a path that may be opened.
    pub fn resolve(&self, referrer: &Path, name: &str, what: &str) -> Result<PathBuf> {
        let refuse = |kind: ErrorKind, why: String| {
            Error::new(kind, format!("{what} '{}' {why}", name.escape_debug())).at_path(referrer)
        };
        if name.is_empty() {
            return Err(refuse(ErrorKind::InvalidFormat, "is empty".into()));
        }
        if name.contains('\0') {
            return Err(refuse(
                ErrorKind::InvalidFormat,
                "contains a NUL byte".into(),
            ));
        }
        let name = name.strip_prefix("file:").unwrap_or(name);
        if name.starts_with("json:") {
            return Err(refuse(
                ErrorKind::Refused,
                "is a json: block specification; vmshift opens plain files only".into(),
            ));
        }
        if has_protocol(name) {
            return Err(refuse(
                ErrorKind::Refused,
                "names a protocol (network or device access); vmshift opens plain files only"
                    .into(),
            ));
        }
        let dir = referrer
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let candidate = dir.join(name);
        let lexical_escape = Path::new(name).is_absolute()
            || Path::new(name)
                .components()
                .any(|c| matches!(c, Component::ParentDir));
        let canonical = match candidate.canonicalize() {
            Ok(c) => c,
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "{what} '{}' (resolved to {}) cannot be opened",
                        name.escape_debug(),
                        candidate.display()
                    ),
                )
                .at_path(referrer)
                .with_io(e))
            }
        };
        if !self.allow_outside {
            let mut roots = vec![dir.to_path_buf()];
            roots.extend(self.extra_roots.iter().cloned());
            let inside = roots.iter().any(|root| {
                root.canonicalize()
                    .map(|r| canonical.starts_with(r))
                    .unwrap_or(false)
            });
            if !inside {
                let how = if lexical_escape {
                    "is absolute or climbs with '..'"
                } else {
                    "leads through a symbolic link"
                };
                return Err(refuse(
                    ErrorKind::Refused,
                    format!(
                        "{how} and resolves to {}, outside {}; {}",
                        canonical.display(),
                        dir.display(),
                        self.hint.unwrap_or(
                            "pass --allow-backing-outside (or add its folder as a root) if you trust this image"
                        )
                    ),
                ));
            }
            let meta = std::fs::metadata(&canonical)
                .map_err(|e| Error::io(&canonical, "reading file metadata", e))?;
            if !meta.is_file() {
                return Err(refuse(
                    ErrorKind::Refused,
                    "is not a regular file (a device, folder or pipe); pass \
                     --allow-backing-outside if you mean it"
                        .into(),
                ));
            }
        }
        Ok(canonical)
    }
}

impl Gate {
    /// Resolves `name` like [`resolve`](Gate::resolve) and opens it
    /// read-only, then checks that what was opened is what was checked: the
    /// descriptor's own path (from /proc) must be the resolved path, so a
    /// symlink swapped in between cannot redirect the open. FIFOs cannot
    /// block the open (O_NONBLOCK) and the last component is not followed.
    pub fn open(&self, referrer: &Path, name: &str, what: &str) -> Result<(PathBuf, File)> {
        let path = self.resolve(referrer, name, what)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::io(&path, format!("opening the {what}"), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(&path, "reading file metadata", e))?;
        if !self.allow_outside && !meta.is_file() {
            return Err(
                Error::new(ErrorKind::Refused, format!("{what} is not a regular file"))
                    .at_path(&path),
            );
        }
        let fd_path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if let Ok(actual) = fd_path {
            if actual != path {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!(
                        "{what} changed while it was being opened (now {})",
                        actual.display()
                    ),
                )
                .at_path(referrer));
            }
        }
        Ok((path, file))
    }
}

/// QEMU's rule: a name whose first ':' comes before any '/' is a protocol
/// (`nbd:host:port`, `http://…`, `iscsi://…`).
fn has_protocol(name: &str) -> bool {
    match (name.find(':'), name.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        _ => false,
    }
}

impl Error {
    pub(crate) fn with_io(self, source: std::io::Error) -> Self {
        let mut e = self;
        e.set_source(source);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("top.qcow2");
        std::fs::write(&img, b"x").unwrap();
        std::fs::write(dir.path().join("base.qcow2"), b"x").unwrap();
        (dir, img)
    }

    #[test]
    fn resolve_sibling_is_allowed() {
        let (dir, img) = setup();
        let got = Gate::new()
            .resolve(&img, "base.qcow2", "backing file")
            .unwrap();
        assert_eq!(got, dir.path().canonicalize().unwrap().join("base.qcow2"));
    }

    #[test]
    fn resolve_absolute_outside_is_refused_unless_allowed() {
        let (_dir, img) = setup();
        let err = Gate::new()
            .resolve(&img, "/etc/passwd", "backing file")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused);
        assert!(Gate::new()
            .allow_outside(true)
            .resolve(&img, "/etc/passwd", "backing file")
            .is_ok());
    }

    #[test]
    fn resolve_parent_dir_escape_is_refused() {
        let (dir, _img) = setup();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let img = sub.join("top.qcow2");
        std::fs::write(&img, b"x").unwrap();
        let err = Gate::new()
            .resolve(&img, "../base.qcow2", "backing file")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused);
        assert!(Gate::new()
            .with_root(dir.path())
            .resolve(&img, "../base.qcow2", "backing file")
            .is_ok());
    }

    #[test]
    fn resolve_symlink_escape_is_refused() {
        let (dir, img) = setup();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        let err = Gate::new()
            .resolve(&img, "link", "backing file")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused);
    }

    #[test]
    fn resolve_protocols_and_json_are_refused_even_when_open() {
        let (_dir, img) = setup();
        let gate = Gate::new().allow_outside(true);
        for name in [
            "json:{\"file.driver\":\"nbd\"}",
            "nbd:localhost:10809",
            "http://x/y",
        ] {
            let err = gate.resolve(&img, name, "backing file").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Refused, "{name}");
        }
    }

    #[test]
    fn resolve_device_is_refused() {
        let (dir, img) = setup();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("dev")).unwrap();
        // /dev/null is outside the folder, so the gate refuses it either way.
        assert!(Gate::new().resolve(&img, "dev", "backing file").is_err());
    }
}
