//! Raw images: the guest's bytes, byte for byte (also block devices).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmshift_model::DiskFormat;

use crate::block::{
    BlockState, Chunk, Encoder, Extent, ImageInfo, ImageReader, ImageWriter, PlainEncoder,
    PlannedWrite, WritePlan, WriteSource,
};
use crate::error::{Error, ErrorKind, Result};
use crate::fileio::{file_len, read_exact_at, seek_data_hole, write_all_at};

/// A raw image opened for reading.
#[derive(Debug)]
pub struct RawReader {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawReader {
    /// Wraps an open file; its length is the virtual size.
    pub fn open(file: File, path: &Path) -> Result<Self> {
        let size = file_len(&file, path)?;
        Ok(RawReader {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl ImageReader for RawReader {
    fn format(&self) -> DiskFormat {
        DiskFormat::Raw
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = len.min(self.size.saturating_sub(offset));
        let end = offset + len;
        let data = |n: u64| Extent {
            start: offset,
            len: n,
            state: BlockState::Data,
            depth: 0,
            host_offset: Some(offset),
        };
        // Without SEEK_DATA (block devices, some file systems) all is data.
        let Some(next_data) = seek_data_hole(&self.file, offset, true) else {
            return Ok(data(len));
        };
        if next_data > offset {
            return Ok(Extent {
                state: BlockState::Zero,
                ..data(next_data.min(end) - offset)
            });
        }
        let next_hole = seek_data_hole(&self.file, offset, false).unwrap_or(end);
        Ok(data(next_hole.clamp(offset + 1, end) - offset))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::block::read_range(&self.path, self.size, offset, buf.len())?;
        read_exact_at(&self.file, &self.path, buf, offset, "data")
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::default()
    }
}

/// Writes a raw image or device.
#[derive(Debug)]
pub struct RawWriter {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    zeroed: bool,
    is_file: bool,
}

impl RawWriter {
    /// A writer on `file`. A new file is sized to `size` (sparse); an
    /// existing target (`-n`) keeps its length, which must be at least
    /// `size`. `zeroed` says whether unwritten ranges read as zero.
    pub fn new(file: File, path: &Path, size: u64, fresh: bool, zeroed: bool) -> Result<Self> {
        let is_file = file
            .metadata()
            .map_err(|e| Error::io(path, "reading file metadata", e))?
            .is_file();
        if fresh {
            file.set_len(size)
                .map_err(|e| Error::io(path, format!("sizing the image to {size} bytes"), e))?;
        } else {
            let have = file_len(&file, path)?;
            if have < size {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("target holds {have} bytes, fewer than the {size} bytes to write"),
                )
                .at_path(path));
            }
        }
        Ok(RawWriter {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            zeroed: fresh || zeroed,
            is_file,
        })
    }
}

impl ImageWriter for RawWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        4096
    }

    fn zero_initialized(&self) -> bool {
        self.zeroed
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        Arc::new(PlainEncoder)
    }

    fn plan(&mut self, e: &Chunk<'_>) -> Result<WritePlan> {
        if e.offset
            .checked_add(e.data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at {:#x} past the end ({})",
                    e.data.len(),
                    e.offset,
                    self.size
                ),
            )
            .at_path(&self.path));
        }
        Ok(WritePlan {
            file: self.file.clone(),
            path: self.path.clone(),
            writes: vec![PlannedWrite {
                host_offset: e.offset,
                source: WriteSource::Data(0..e.data.len()),
            }],
            parts: Vec::new(),
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.is_file && punch_hole(&self.file, offset, len) {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            write_all_at(&self.file, &self.path, &zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn finish_with(self: Box<Self>, flush: bool) -> Result<()> {
        if !flush {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.path, "syncing the image", e))
    }
}

/// Reserves `len` bytes of `file` from `offset` (fallocate, mode 0).
pub(crate) fn fallocate(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(Error::new(ErrorKind::InvalidInput, "range too large").at_path(path));
    };
    // SAFETY: fallocate on a valid descriptor borrowed from `file`; it reads
    // and writes no memory of ours.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, off, n) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::io(
            path,
            "reserving space (fallocate)",
            std::io::Error::last_os_error(),
        ))
    }
}

/// Deallocates a range of a regular file so it reads as zero.
fn punch_hole(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on a valid descriptor borrowed from `file`; it reads
    // and writes no memory of ours.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    r == 0
}
