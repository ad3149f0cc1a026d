//! `convert --salvage`: a reader that reads what can be read. As qemu-img
//! does, a range whose block status cannot be read is retried on shorter
//! ranges down to one 512-byte sector, which is then read as data; a read
//! that fails is retried sector by sector, and a sector that still fails
//! reads as zeros. Each give-up is reported, with its offset, once.

use std::path::Path;

use vmshift_model::DiskFormat;

use crate::block::{BlockState, Extent, ImageInfo, ImageReader};
use crate::error::Result;

const SECTOR: u64 = 512;

/// Told of each sector given up on: its guest offset and why.
pub type Warn = Box<dyn Fn(&str) + Send + Sync>;

/// Reads `inner`, salvaging what fails.
pub struct SalvageReader {
    inner: Box<dyn ImageReader>,
    warn: Warn,
}

impl std::fmt::Debug for SalvageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalvageReader")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl SalvageReader {
    /// `inner`, with failures reported to `warn`.
    pub fn new(inner: Box<dyn ImageReader>, warn: Warn) -> Self {
        SalvageReader { inner, warn }
    }
}

/// An error's message with its causes, on one line.
fn text(e: &crate::Error) -> String {
    let mut out = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

impl ImageReader for SalvageReader {
    fn format(&self) -> DiskFormat {
        self.inner.format()
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut n = len;
        loop {
            match self.inner.map(offset, n) {
                Ok(e) => return Ok(e),
                Err(e) if n <= SECTOR => {
                    (self.warn)(&format!(
                        "error while reading block status at offset {offset}: {}",
                        text(&e)
                    ));
                    // Just try to read the data, then.
                    return Ok(Extent {
                        start: offset,
                        len: n.clamp(1, SECTOR).min(self.size() - offset),
                        state: BlockState::Data,
                        depth: 0,
                        host_offset: None,
                    });
                }
                // Retry on a shorter range, a quarter as long.
                Err(_) => n = (n.div_ceil(SECTOR).div_ceil(4) * SECTOR).min(n - 1).max(1),
            }
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.inner.read_at(buf, offset).is_ok() {
            return Ok(());
        }
        // Sector by sector; what still fails reads as zeros.
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let n = ((SECTOR - at % SECTOR) as usize).min(buf.len() - pos);
            let piece = &mut buf[pos..pos + n];
            if let Err(e) = self.inner.read_at(piece, at) {
                (self.warn)(&format!("error while reading offset {at}: {}", text(&e)));
                piece.fill(0);
            }
            pos += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        self.inner.info()
    }

    fn backing(&self) -> Option<&dyn ImageReader> {
        self.inner.backing()
    }

    fn status_end(&self, offset: u64) -> u64 {
        self.inner.status_end(offset)
    }

    fn data_file_at(&self, offset: u64) -> Option<String> {
        self.inner.data_file_at(offset)
    }
}
