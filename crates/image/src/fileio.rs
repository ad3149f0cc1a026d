//! Positioned file I/O with errors that carry the file and offset.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Reads exactly `buf.len()` bytes at `offset`; a short file is an error
/// that names `what` (the structure being read).
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{what} of {} bytes runs past the end of the file",
                buf.len()
            ),
        )
        .at_path(path)
        .field(what)
        .offset(offset)),
        Err(e) => Err(Error::io(
            path,
            format!("reading {what} at offset {offset:#x}"),
            e,
        )),
    }
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early only at EOF;
/// returns how many bytes were read.
pub(crate) fn read_up_to_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, format!("reading at offset {offset:#x}"), e)),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|e| {
        Error::io(
            path,
            format!("writing {} bytes at offset {offset:#x}", buf.len()),
            e,
        )
    })
}

/// The length of an open file (or block device).
pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "reading file metadata", e))?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in metadata; ask the device for its end.
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
        .map_err(|e| Error::io(path, "finding the size of the device", e))
}

/// Bytes the file occupies on disk (`st_blocks` × 512), as `du` reports.
pub fn allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Where the next data or hole begins at or after `offset`
/// (`SEEK_DATA`/`SEEK_HOLE`); `None` if the file system cannot say.
pub(crate) fn seek_data_hole(file: &File, offset: u64, data: bool) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    let off = i64::try_from(offset).ok()?;
    // SAFETY: lseek on a valid, open descriptor borrowed from `file` for the
    // duration of the call; it touches no memory of ours. It moves the shared
    // file position, which no vmshift code relies on (all I/O is positioned).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Some(r as u64);
    }
    // ENXIO: no data at or after `offset`, i.e. a hole up to the end.
    if data && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        return Some(u64::MAX);
    }
    None
}

/// Asks the kernel to start writing a just-written range to disk now, so
/// the final fsync of an output finds little left to do and dirty pages do
/// not pile up. Advisory: errors are ignored (the fsync reports them).
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a valid descriptor borrowed from `file`;
    // it reads and writes no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A byte range of a file read as if it were a whole file: a disk stored
/// inside an archive (an OVA member) is read in place through one.
#[derive(Debug)]
pub struct Window {
    file: File,
    base: u64,
    len: u64,
}

impl Window {
    /// The whole of `file`.
    pub(crate) fn whole(file: File, path: &Path) -> Result<Window> {
        let len = file_len(&file, path)?;
        Ok(Window { file, base: 0, len })
    }

    /// `len` bytes of `file` from `base`.
    pub(crate) fn part(file: File, base: u64, len: u64) -> Window {
        Window { file, base, len }
    }

    /// The window's length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// [`read_exact_at`] inside the window: reading past its end is the
    /// same error as reading past the end of a file.
    pub(crate) fn read_exact_at(
        &self,
        path: &Path,
        buf: &mut [u8],
        offset: u64,
        what: &str,
    ) -> Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{what} of {} bytes runs past the end of the file",
                    buf.len()
                ),
            )
            .at_path(path)
            .field(what)
            .offset(offset));
        }
        read_exact_at(&self.file, path, buf, self.base + offset, what)
    }

    /// [`read_up_to_at`] inside the window.
    pub(crate) fn read_up_to_at(&self, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize> {
        let room = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        read_up_to_at(&self.file, path, &mut buf[..room], self.base + offset)
    }
}
