//! The traits every format driver implements, and what they exchange.
//!
//! A reader answers three questions about a guest-visible byte range: how
//! big the disk is, where a range lives ([`ImageReader::map`]), and what its
//! bytes are ([`ImageReader::read_at`]). Readers are `Send + Sync` and read
//! through `&self`, so one reader can serve a guest's disk or a parallel copy
//! from several threads.
//!
//! A writer takes data in three steps: [`Encoder::encode`] does the CPU
//! work (compression) and may run on any thread; [`ImageWriter::plan`]
//! decides where the result goes and updates the metadata, in order, under
//! the writer's `&mut`; [`WritePlan::execute`] writes the bytes and may run
//! on any thread again. The copy engine drives all three without knowing
//! the format.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use vmshift_model::DiskFormat;

use crate::error::Result;

/// What a guest range is made of, as far as the image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Stored data (possibly reading as zero anyway).
    Data,
    /// Stored compressed; no single host offset.
    Compressed,
    /// Reads as zero by the image's own metadata (zero cluster, hole).
    Zero,
    /// A hole in the file that stores a flat extent's data (a thin ESXi
    /// disk): reads as zero, but QEMU reports it as data and zero both.
    DataHole,
    /// Not allocated anywhere in the chain; reads as zero.
    Unallocated,
}

/// One contiguous guest range with a single state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// What the range is made of.
    pub state: BlockState,
    /// 0 when the top image answers, 1 for its backing file, and so on; for
    /// an unallocated range, the depth of the bottom of the chain + 1.
    pub depth: u32,
    /// Where the data lies in the file that holds it, when it is stored
    /// uncompressed in one piece.
    pub host_offset: Option<u64>,
}

impl Extent {
    /// The first byte after the extent.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// True when the range reads as zeros whatever the file holds.
    pub fn reads_as_zero(&self) -> bool {
        matches!(
            self.state,
            BlockState::Zero | BlockState::DataHole | BlockState::Unallocated
        )
    }
}

/// A snapshot stored inside an image (qcow2 internal snapshots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// The snapshot's numeric id, as a string.
    pub id: String,
    /// The snapshot's tag.
    pub name: String,
    /// Bytes of saved VM state.
    pub vm_state_size: u64,
    /// When it was taken, seconds since the epoch.
    pub date_sec: u64,
    /// Nanoseconds part of the date.
    pub date_nsec: u64,
    /// Guest clock at the snapshot, seconds.
    pub vm_clock_sec: u64,
    /// Guest clock at the snapshot, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Instruction count (record/replay), when stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// What `info` reports about one image (not its backing files).
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    /// Cluster or grain size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// Backing file name exactly as stored in the image.
    pub backing_filename: Option<String>,
    /// Backing file resolved to a path (when it could be).
    pub full_backing_filename: Option<String>,
    /// Backing format as stored in the image.
    pub backing_format: Option<String>,
    /// The backing format had to be guessed because the image stores none.
    pub backing_format_probed: Option<String>,
    /// Whether the image was not closed cleanly.
    pub dirty: bool,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// Other files whose disk usage counts in `actual-size` (VMDK extents).
    pub extra_files: Vec<PathBuf>,
    /// `format-specific.data` of `qemu-img info`, as (key, value) pairs in
    /// qemu-img's order.
    pub format_specific: Vec<(&'static str, serde_json::Value)>,
    /// The backing file was not opened: the gate refused it (why, with the
    /// flag that lets it through). Only an image opened for `info` has
    /// this; reading its unallocated ranges is then an error.
    pub backing_refused: Option<String>,
    /// The limits of `vmshift_model::limits` this image was checked
    /// against, by name, with the image's own figure for each.
    pub limits: Vec<(&'static str, u64)>,
}

/// Reads a disk image as the guest sees it.
pub trait ImageReader: Send + Sync + fmt::Debug {
    /// The format of this image.
    fn format(&self) -> DiskFormat;

    /// The file this reader reads.
    fn path(&self) -> &Path;

    /// The virtual disk size in bytes.
    fn size(&self) -> u64;

    /// Describes the range starting at `offset`: returns one extent that
    /// starts there and covers at most `len` bytes (at least one byte unless
    /// `offset` is at the end). `offset + len` must not exceed [`size`](Self::size).
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Fills `buf` with the guest's bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Facts for `info`.
    fn info(&self) -> ImageInfo;

    /// Checks the image's metadata (`None`: the format has nothing to check).
    fn check(&self) -> Option<Result<crate::check::CheckReport>> {
        None
    }

    /// Repairs the image's metadata through `out`, the same file opened for
    /// writing and locked (`check -r`); `None`: the format has no repair.
    fn repair(&self, out: &File, fix: crate::check::Fix) -> Option<Result<crate::check::Repaired>> {
        let _ = (out, fix);
        None
    }

    /// The next image down the backing chain, if any.
    fn backing(&self) -> Option<&dyn ImageReader> {
        None
    }

    /// Where QEMU's answer about the block status at `offset` ends at the
    /// latest, beyond what [`map`](Self::map) already splits (a VMDK sparse
    /// extent answers one grain at a time). `qemu-img compare -s` tells
    /// statuses apart by where they end, so the strict compare splits
    /// extents here too.
    fn status_end(&self, offset: u64) -> u64 {
        let _ = offset;
        u64::MAX
    }

    /// The file that holds this layer's data at `offset`, when it is not
    /// the image's own file (a VMDK extent file), named as `qemu-img map`
    /// names it.
    fn data_file_at(&self, offset: u64) -> Option<String> {
        let _ = offset;
        None
    }
}

/// Data to place at a guest offset, with what its writer's encoder made of
/// it. It borrows the data, so the engine writes straight from its buffers.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// Guest offset of the data.
    pub offset: u64,
    /// The data.
    pub data: &'a [u8],
    /// Per cluster of `data`, its compressed form (empty where compression
    /// did not pay); `None` when the writer stores data uncompressed.
    pub compressed: Option<&'a [Vec<u8>]>,
}

/// Compressed forms of a chunk's clusters (see [`Chunk::compressed`]).
pub type Packed = Option<Vec<Vec<u8>>>;

/// The CPU-bound half of writing: safe to call from many threads at once.
pub trait Encoder: Send + Sync {
    /// What this writer stores for `data` besides the data itself: its
    /// clusters compressed, or `None` when it stores data as it is.
    fn encode(&self, data: &[u8]) -> Result<Packed>;
}

/// An encoder that stores data as it is.
#[derive(Debug, Default)]
pub struct PlainEncoder;

impl Encoder for PlainEncoder {
    fn encode(&self, _data: &[u8]) -> Result<Packed> {
        Ok(None)
    }
}

/// Where bytes of a planned write come from.
#[derive(Debug)]
pub enum WriteSource {
    /// A range of the chunk's data.
    Data(Range<usize>),
    /// Bytes the plan made itself (compressed clusters, padding).
    Owned(Vec<u8>),
}

/// One positioned write decided by [`ImageWriter::plan`].
#[derive(Debug)]
pub struct PlannedWrite {
    /// Byte offset in the target file.
    pub host_offset: u64,
    /// What to write there.
    pub source: WriteSource,
}

/// The data writes for one encoded chunk, to run on any thread. The
/// metadata that points at them is already updated in the writer.
#[derive(Debug)]
pub struct WritePlan {
    /// The file to write to.
    pub file: Arc<File>,
    /// Its path, for errors.
    pub path: PathBuf,
    /// The writes, in any order.
    pub writes: Vec<PlannedWrite>,
    /// Plans for other files (extents of a multi-file image), each with
    /// where its chunk starts in this plan's data.
    pub parts: Vec<(usize, WritePlan)>,
}

impl WritePlan {
    /// Performs the writes; `data` is the planned chunk's data.
    pub fn execute(&self, data: &[u8]) -> Result<()> {
        for w in &self.writes {
            let bytes = match &w.source {
                WriteSource::Data(r) => &data[r.clone()],
                WriteSource::Owned(v) => &v[..],
            };
            crate::fileio::write_all_at(&self.file, &self.path, bytes, w.host_offset)?;
            crate::fileio::start_writeback(&self.file, w.host_offset, bytes.len() as u64);
        }
        for (base, part) in &self.parts {
            part.execute(&data[*base..])?;
        }
        Ok(())
    }
}

/// Writes a disk image.
pub trait ImageWriter: Send + fmt::Debug {
    /// The virtual disk size in bytes.
    fn size(&self) -> u64;

    /// The allocation unit: writes aligned to it never read back what is
    /// already there. The copy engine aligns its chunks to it.
    fn granularity(&self) -> u64;

    /// True when every range not written reads as zero (a new image without a
    /// backing file), so zeros need not be written.
    fn zero_initialized(&self) -> bool;

    /// The encoder to prepare data with (may be shared across threads).
    fn encoder(&self) -> Arc<dyn Encoder>;

    /// True when data clusters are stored compressed, each written whole.
    fn compresses(&self) -> bool {
        false
    }

    /// Decides where a chunk (encoded by this writer's encoder) goes and
    /// updates the metadata; the returned plan writes the bytes.
    fn plan(&mut self, chunk: &Chunk<'_>) -> Result<WritePlan>;

    /// Makes `len` bytes at `offset` read as zero.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Writes all metadata and, when `flush`, syncs the file(s). Nothing
    /// written is readable as an image before this returns, nor durable
    /// unless flushed (qemu-img's `cache=unsafe` does not flush).
    fn finish_with(self: Box<Self>, flush: bool) -> Result<()>;

    /// Writes all metadata and syncs the file(s).
    fn finish(self: Box<Self>) -> Result<()> {
        self.finish_with(true)
    }

    /// Encodes, plans and writes `data` in one step.
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let packed = self.encoder().encode(data)?;
        let chunk = Chunk {
            offset,
            data,
            compressed: packed.as_deref(),
        };
        self.plan(&chunk)?.execute(data)
    }
}

/// Reads what an image shows where it holds nothing itself: its backing
/// image's bytes, or zeros (also past the end of a smaller backing image).
pub(crate) fn read_below(
    backing: Option<&dyn ImageReader>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    match backing {
        Some(b) if offset < b.size() => {
            let n = ((b.size() - offset) as usize).min(buf.len());
            b.read_at(&mut buf[..n], offset)?;
            buf[n..].fill(0);
        }
        _ => buf.fill(0),
    }
    Ok(())
}

/// Maps a range an image holds nothing for (`here`, unallocated at depth
/// 0): what its backing image says one level down, or `here` itself past
/// the backing image's end or without one.
pub(crate) fn map_below(backing: Option<&dyn ImageReader>, here: Extent) -> Result<Extent> {
    match backing {
        Some(b) if here.start < b.size() => {
            let mut e = b.map(here.start, here.len.min(b.size() - here.start))?;
            e.depth += 1;
            Ok(e)
        }
        _ => Ok(here),
    }
}

/// Checks a read of `len` bytes at `offset` fits a disk of `size` bytes;
/// returns its end.
pub(crate) fn read_range(path: &Path, size: u64, offset: u64, len: usize) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            crate::error::Error::new(
                crate::error::ErrorKind::InvalidInput,
                format!(
                    "read of {len} bytes at {offset:#x} past the end of the disk ({size} bytes)"
                ),
            )
            .at_path(path)
        })
}
