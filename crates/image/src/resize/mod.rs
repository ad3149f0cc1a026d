//! Resizing images in place, crash-safe: every step is ordered so that a
//! kill at any point leaves either the old image or the new one.
//!
//! - raw: the file's length changes (`ftruncate`; `falloc`/`full`
//!   preallocation for growth). A GPT is moved to the new end: the backup
//!   entries and header are written and synced first, then the primary
//!   header (one sector) points at them. Growing writes the new end before
//!   the table moves; shrinking moves the table before the end is cut.
//! - qcow2: growing within the L1 table's clusters changes the header's
//!   `size` and `l1_size` in one 16-byte write (the L1 slack is zeroed and
//!   synced first). Anything else (a larger L1 table, preallocation, zero
//!   clusters over a longer backing file, a moved GPT, a shrink) is a
//!   copy-on-write transaction switched to by one header write, so not even
//!   a cluster leaks when a resize is killed.
//! - VMDK: see [`vmdk`]; sparse files in place, streams through a copy,
//!   flat extents like raw with an atomically replaced descriptor.

use std::fs::{File, OpenOptions};
use std::path::Path;

use byteorder::{BigEndian, ByteOrder, LittleEndian};
use vmshift_model::DiskFormat;

use crate::block::ImageReader;
use crate::error::{Error, ErrorKind, Result};
use crate::fileio::{file_len, read_exact_at, write_all_at};
use crate::part::{read_table, TableKind};
use crate::raw::RawReader;

mod gpt;
mod qcow2;
mod raw;
mod vmdk;

use gpt::*;
use qcow2::*;
use raw::*;
use vmdk::*;

/// How new space is provided when growing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Sparse: nothing is allocated.
    #[default]
    Off,
    /// Metadata only (qcow2); for raw the same as `Off`.
    Metadata,
    /// Space reserved with fallocate.
    Falloc,
    /// Zeros written.
    Full,
}

/// What a resize may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeOptions {
    /// Shrinking is allowed.
    pub shrink: bool,
    /// Shrink even when data or a partition lies beyond the new end.
    pub force: bool,
    /// How new space is provided.
    pub prealloc: Prealloc,
    /// Move a GPT's backup header and entries to the new end.
    pub fix_gpt: bool,
    /// Extend this partition (the one that ends last) into the new space.
    pub grow_partition: Option<u32>,
}

impl Default for ResizeOptions {
    fn default() -> Self {
        ResizeOptions {
            shrink: false,
            force: false,
            prealloc: Prealloc::Off,
            fix_gpt: true,
            grow_partition: None,
        }
    }
}

/// What a resize did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResizeReport {
    /// Bytes before.
    pub old_size: u64,
    /// Bytes after.
    pub new_size: u64,
    /// The GPT's backup header moved to the new end.
    pub gpt_moved: bool,
    /// A partition that grew: (number, old end, new end) in bytes.
    pub partition_grown: Option<(u32, u64, u64)>,
    /// Things the user should know (a table left alone, …).
    pub notes: Vec<String>,
}

/// A smaller size needs `--shrink`.
pub(super) fn needs_shrink(path: &Path, old: u64, new: u64, opts: &ResizeOptions) -> Result<()> {
    if new < old && !opts.shrink {
        return Err(invalid(
            path,
            format!("{new} bytes is smaller than the image's {old}; shrinking needs --shrink"),
        ));
    }
    Ok(())
}

/// Refuses a shrink to `from` bytes that would cut off a partition, or
/// data: the first byte in `[from, to)` that reads as non-zero (stored in
/// the image or in its backing file) is named. The GPT's own backup copy, which moves, is not data, nor is a
/// stale copy of the same table an earlier move left behind. Ranges the
/// image maps as holes or zeros are skipped; stored ranges are read, since
/// only non-zero bytes are data to lose.
fn shrink_checks(
    reader: &dyn ImageReader,
    path: &Path,
    from: u64,
    to: u64,
    gpt: Option<&GptPlan>,
) -> Result<()> {
    if let Some(p) =
        read_table(reader)?.and_then(|t| t.partitions.into_iter().find(|p| p.end > from))
    {
        return Err(invalid(
            path,
            format!(
                "partition {} ends at byte {}, beyond the new end ({from}); shrink the partition first, or pass --force",
                p.number, p.end
            ),
        ));
    }
    let to = to.min(reader.size());
    let exempt = gpt.map(GptPlan::old_backup_bytes);
    let mut at = from;
    let mut buf = vec![0u8; 1 << 20];
    while at < to {
        let e = reader.map(at, to - at)?;
        let end = (at + e.len.max(1)).min(to);
        if e.reads_as_zero() {
            at = end;
            continue;
        }
        let n = (end - at).min(buf.len() as u64);
        reader.read_at(&mut buf[..n as usize], at)?;
        let hit = buf[..n as usize].iter().enumerate().position(|(k, &b)| {
            let byte = at + k as u64;
            b != 0 && !exempt.is_some_and(|(a, z)| byte >= a && byte < z)
        });
        match hit {
            None => at += n,
            Some(k) => {
                let byte = at + k as u64;
                match gpt.and_then(|p| p.stale_copy_around(reader, byte)) {
                    Some(past) => at = past.max(byte + 1),
                    None => {
                        return Err(invalid(
                            path,
                            format!(
                                "data is stored at byte {byte}, beyond the new end ({from}); pass --force to cut it off"
                            ),
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

/// The image at `path`, which this resize holds locked, opened for
/// reading as `format`.
pub(super) fn open_as(path: &Path, format: DiskFormat) -> Result<Box<dyn ImageReader>> {
    let opts = crate::open::OpenOptions {
        already_locked: true,
        ..Default::default()
    };
    crate::open::open_image(path, Some(format), &opts)
}

pub(super) fn invalid(path: &Path, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, msg).at_path(path)
}

/// A pause between the steps of a resize, for the kill tests
/// (`VMSHIFT_RESIZE_STEP_DELAY_MS`); nothing otherwise.
pub(super) fn step() {
    if let Some(ms) = std::env::var("VMSHIFT_RESIZE_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

pub(super) fn sync(file: &File, path: &Path) -> Result<()> {
    file.sync_all()
        .map_err(|e| Error::io(path, "syncing the image", e))
}

/// Resizes the image at `path` (in format `format`) to `new_size` bytes.
pub fn resize(
    path: &Path,
    format: DiskFormat,
    new_size: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    let mut report = resize_with_switch(path, format, new_size, opts, &mut || Ok(()))?;
    if !opts.fix_gpt && report.new_size != report.old_size {
        let gpt = open_as(path, format)
            .ok()
            .and_then(|r| read_table(r.as_ref()).ok().flatten())
            .and_then(|t| t.gpt);
        if gpt.is_some_and(|g| !g.backup_at_end) {
            report.notes.push(format!(
                "the GPT's backup header is not at the end of the disk now (--no-fix-gpt); `vmshift resize {} {}` moves it",
                path.display(),
                report.new_size
            ));
        }
    }
    Ok(report)
}

/// [`resize`], with `switch` run when a raw disk takes its new size as far
/// as its partition table is concerned: after the file grew and before a
/// GPT moves out to the new end; after a GPT moved in and before the file
/// is cut. A flat VMDK's descriptor is replaced there, so that a table
/// never points past the disk its descriptor describes.
pub(super) fn resize_with_switch(
    path: &Path,
    format: DiskFormat,
    new_size: u64,
    opts: &ResizeOptions,
    switch: &mut dyn FnMut() -> Result<()>,
) -> Result<ResizeReport> {
    // The file itself, not a symlink to it: a rewritten stream replaces
    // the real file.
    if !new_size.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("{new_size} bytes is not a whole number of 512-byte sectors"),
        ));
    }
    let real = path
        .canonicalize()
        .map_err(|e| Error::io(path, "finding the image", e))?;
    let path = real.as_path();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "opening the image for writing", e))?;
    crate::lock::lock_for_resize(&file, path)?;
    match format {
        DiskFormat::Raw => resize_raw(file, path, new_size, opts, switch),
        DiskFormat::Qcow2 => resize_qcow2(file, path, new_size, opts),
        DiskFormat::Vmdk => resize_vmdk(file, path, new_size, opts),
    }
}

pub(super) fn unsupported(path: &Path, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg).at_path(path)
}
