//! Opening images: format probing, backing chains, the gate.

use std::fs::File;
use std::path::{Path, PathBuf};

use vmshift_model::DiskFormat;

use crate::block::ImageReader;
use crate::error::{Error, ErrorKind, Result};
use crate::gate::Gate;
use crate::lock::{lock_for_read, ReadLock};
use crate::qcow2::{ChainOpener, Qcow2Reader};
use crate::raw::RawReader;
use crate::vmdk::VmdkReader;

/// The deepest backing chain vmshift follows.
pub const MAX_CHAIN_DEPTH: usize = vmshift_model::limits::CHAIN_DEPTH;

/// How to open an image and the files it names.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The gate for backing files, data files and extents.
    pub gate: Gate,
    /// Read the image even when another process (a running VM) holds
    /// QEMU's lock on it, as qemu-img's `-U`/`--force-share`: only the
    /// consistent-read lock is taken, and nothing is refused.
    pub force_share: bool,
    /// Let others write a raw image while it is read, as qemu-img's
    /// `info`, `map` and `compare` do; `convert` (the default, `false`)
    /// does not. Formats with metadata (qcow2, VMDK) and backing files are
    /// never shared for writing.
    pub share_raw_writes: bool,
    /// The caller holds the image's locks itself (a resize reading the
    /// image it is changing): take none, test none.
    pub already_locked: bool,
    /// A qcow2 data cluster past the end of a truncated file reads as
    /// zeros, as QEMU reads it (`compare`), instead of being an error.
    pub zeros_past_eof: bool,
    /// A qcow2 whose backing file the gate refuses opens without it
    /// (`info`: the chain is shown, as qemu-img shows it without opening
    /// the backing file); reading what the backing file would hold is then
    /// an error naming the refusal.
    pub keep_refused_backing: bool,
}

/// Guesses the format of an open file from its first bytes.
pub fn probe(file: &File, path: &Path) -> Result<DiskFormat> {
    let mut head = [0u8; 1024];
    let n = crate::fileio::read_up_to_at(file, path, &mut head, 0)?;
    let head = &head[..n];
    Ok(if head.starts_with(b"QFI\xfb") {
        DiskFormat::Qcow2
    } else if head.starts_with(b"KDMV") || head.starts_with(b"COWD") || is_vmdk_descriptor(head) {
        DiskFormat::Vmdk
    } else {
        DiskFormat::Raw
    })
}

/// A text file whose first meaningful lines are a VMDK descriptor's.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        // The 1 KiB may end inside a multi-byte character.
        Err(e) if e.valid_up_to() > 0 => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or("")
        }
        Err(_) => return false,
    };
    text.starts_with("# Disk DescriptorFile")
        || text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .is_some_and(|l| l.replace(' ', "").starts_with("version="))
            && text.contains("createType")
}

/// Opens `path` read-only as `format`, or probes the format when `None`.
/// Returns the reader and whether the format was probed.
pub fn open_image(
    path: &Path,
    format: Option<DiskFormat>,
    opts: &OpenOptions,
) -> Result<Box<dyn ImageReader>> {
    let chain = Chain {
        opts,
        seen: vec![canonical(path)],
    };
    let file = File::open(path).map_err(|e| Error::io(path, "opening the image", e))?;
    chain.open(file, path, format)
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Opens images one level of a chain at a time, remembering what it opened
/// to catch loops and overlong chains.
struct Chain<'a> {
    opts: &'a OpenOptions,
    seen: Vec<PathBuf>,
}

impl Chain<'_> {
    /// Reads the open `file`, naming it `path` (as the user or the image
    /// above named it) in messages and `info`.
    fn open(
        &self,
        file: File,
        path: &Path,
        format: Option<DiskFormat>,
    ) -> Result<Box<dyn ImageReader>> {
        let probed = probe(&file, path)?;
        let format = match format {
            Some(DiskFormat::Raw) => DiskFormat::Raw,
            Some(f) if f != probed => {
                return Err(Error::new(
                    ErrorKind::InvalidFormat,
                    format!("is not a {f} image (its first bytes look like {probed})"),
                )
                .at_path(path)
                .field("magic")
                .offset(0))
            }
            Some(f) => f,
            None => probed,
        };
        let lock = match format {
            _ if self.opts.already_locked => None,
            _ if self.opts.force_share => Some(ReadLock::SHARED),
            DiskFormat::Raw if self.seen.len() == 1 && self.opts.share_raw_writes => {
                Some(ReadLock::SHARED)
            }
            _ => Some(ReadLock::FORMAT),
        };
        if let Some(lock) = lock {
            lock_for_read(&file, path, lock)?;
        }
        Ok(match format {
            DiskFormat::Raw => Box::new(RawReader::open(file, path)?),
            DiskFormat::Qcow2 => Box::new(Qcow2Reader::open(file, path, self)?),
            DiskFormat::Vmdk => Box::new(VmdkReader::open(file, path, self)?),
        })
    }
}

impl ChainOpener for Chain<'_> {
    fn open_backing(
        &self,
        image: &Path,
        name: &str,
        format: Option<&str>,
    ) -> Result<(Box<dyn ImageReader>, Option<String>)> {
        let (path, file) = self.opts.gate.open(image, name, "backing file")?;
        if self.seen.contains(&path) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "backing chain loops: '{name}' ({}) is already in the chain",
                    path.display()
                ),
            )
            .at_path(image)
            .field("backing file"));
        }
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
            )
            .at_path(image)
            .field("backing file"));
        }
        let mut seen = self.seen.clone();
        seen.push(path.clone());
        let next = Chain {
            opts: self.opts,
            seen,
        };
        // Name it as QEMU does: the stored name joined to the image's folder.
        let display = image.parent().unwrap_or(Path::new("")).join(name);
        match format {
            Some(f) => {
                let f: DiskFormat = f.parse().map_err(|e: String| {
                    Error::new(ErrorKind::Unsupported, e)
                        .at_path(image)
                        .field("backing format")
                })?;
                Ok((next.open(file, &display, Some(f))?, None))
            }
            None => {
                let f = probe(&file, &path)?;
                Ok((
                    next.open(file, &display, Some(f))?,
                    Some(f.name().to_string()),
                ))
            }
        }
    }

    fn zeros_past_eof(&self) -> bool {
        self.opts.zeros_past_eof
    }

    fn keep_refused_backing(&self) -> bool {
        self.opts.keep_refused_backing
    }

    fn open_named(&self, image: &Path, name: &str, what: &str) -> Result<(PathBuf, File)> {
        let (path, file) = self.opts.gate.open(image, name, what)?;
        if !self.opts.already_locked {
            let lock = if self.opts.force_share {
                ReadLock::SHARED
            } else {
                ReadLock::EXTENT
            };
            lock_for_read(&file, &path, lock)?;
        }
        Ok((path, file))
    }
}
