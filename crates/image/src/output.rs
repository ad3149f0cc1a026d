//! Atomic outputs: a temp file beside the target, renamed into place only
//! once it is complete and synced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// Removes temp files an earlier vmshift left for `name` in `dir` when it
/// was killed (`.NAME.vmshift-PID-N.tmp` whose process is gone). A PID
/// that is alive again, whoever it is, keeps its file.
fn sweep_stale(dir: &Path, name: &str) {
    let prefix = format!(".{name}.vmshift-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(rest) = file
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A file being written that appears at its target path only on
/// [`commit`](AtomicOutput::commit). Dropped uncommitted, it leaves nothing.
#[derive(Debug)]
pub struct AtomicOutput {
    target: PathBuf,
    temp: PathBuf,
    force: bool,
    committed: bool,
}

impl AtomicOutput {
    /// Creates the temp file for `target`. An existing target is refused
    /// unless `force`.
    pub fn create(target: &Path, force: bool) -> Result<(Self, File)> {
        if !force && target.symlink_metadata().is_ok() {
            return Err(
                Error::new(ErrorKind::Exists, "already exists; --force replaces it")
                    .at_path(target),
            );
        }
        let dir = parent_dir(target);
        let name = target.file_name().ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "is not a file name").at_path(target)
        })?;
        sweep_stale(&dir, &name.to_string_lossy());
        for attempt in 0..100u32 {
            let temp = dir.join(format!(
                ".{}.vmshift-{}-{attempt}.tmp",
                name.to_string_lossy(),
                std::process::id()
            ));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&temp)
            {
                Ok(file) => {
                    // A replaced file keeps its permissions.
                    if let Ok(old) = std::fs::metadata(target) {
                        let _ = file.set_permissions(old.permissions());
                    }
                    let out = AtomicOutput {
                        target: target.to_path_buf(),
                        temp,
                        force,
                        committed: false,
                    };
                    return Ok((out, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                // Named by what the user asked for, not the temporary file.
                Err(e) if !dir.is_dir() => {
                    return Err(Error::io(
                        target,
                        format!("its folder {} does not exist", dir.display()),
                        e,
                    ))
                }
                Err(e) => return Err(Error::io(target, "creating the output file", e)),
            }
        }
        Err(Error::new(ErrorKind::Io, "could not find a free temporary file name").at_path(target))
    }

    /// The temp file's path.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Moves the (already synced) temp file to the target and syncs the
    /// folder so the rename is durable.
    pub fn commit(self) -> Result<()> {
        self.commit_with(true)
    }

    /// As [`commit`](Self::commit); without `flush` the folder is not
    /// synced (qemu-img's `cache=unsafe`).
    pub fn commit_with(mut self, flush: bool) -> Result<()> {
        if self.force {
            std::fs::rename(&self.temp, &self.target)
                .map_err(|e| Error::io(&self.target, "renaming the output into place", e))?;
        } else {
            // link() fails if the target appeared meanwhile: never clobber.
            std::fs::hard_link(&self.temp, &self.target).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::new(ErrorKind::Exists, "appeared while converting; not replaced")
                        .at_path(&self.target)
                } else {
                    Error::io(&self.target, "linking the output into place", e)
                }
            })?;
            let _ = std::fs::remove_file(&self.temp);
        }
        self.committed = true;
        if !flush {
            return Ok(());
        }
        let dir = parent_dir(&self.target);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&dir, "syncing the folder", e))
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_creates_target_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        let (out, _f) = AtomicOutput::create(&target, false).unwrap();
        drop(out);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let (out, f) = AtomicOutput::create(&target, false).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 0).unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_existing_target_is_refused_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        std::fs::write(&target, b"keep").unwrap();
        let err = AtomicOutput::create(&target, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Exists);
        let (out, _f) = AtomicOutput::create(&target, true).unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"");
    }
}

/// The other files of a multi-file output (VMDK extents beside their
/// descriptor), each written atomically like the main one. Committed before
/// the main file, so the file the user names appears last, complete.
#[derive(Debug)]
pub struct SideOutputs {
    dir: PathBuf,
    force: bool,
    outputs: Vec<AtomicOutput>,
}

impl SideOutputs {
    /// Side files will go beside `target`.
    pub fn new(target: &Path, force: bool) -> Self {
        SideOutputs {
            dir: parent_dir(target),
            force,
            outputs: Vec::new(),
        }
    }

    /// Creates the temp file for side file `name`; returns it and its
    /// temp path.
    pub fn create(&mut self, name: &str) -> Result<(File, PathBuf)> {
        let (out, file) = AtomicOutput::create(&self.dir.join(name), self.force)?;
        let temp = out.temp_path().to_path_buf();
        self.outputs.push(out);
        Ok((file, temp))
    }

    /// Moves every side file into place.
    pub fn commit(self) -> Result<()> {
        self.commit_with(true)
    }

    /// As [`commit`](Self::commit), syncing folders only when `flush`.
    pub fn commit_with(self, flush: bool) -> Result<()> {
        for out in self.outputs {
            out.commit_with(flush)?;
        }
        Ok(())
    }
}
