//! A guest's view of a disk image: reads through vmshift's own
//! [`ImageReader`], writes into a copy-on-write overlay held in memory (or,
//! for large runs, in an unlinked temporary file), so the image under test
//! is never modified. The overlay has a limit; past it, writes fail (the
//! guest sees an I/O error) instead of the host running out of memory or
//! disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmshift_image::ImageReader;

/// Overlay granularity.
pub const BLOCK: u64 = 4096;

/// Why a disk access failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The range ends past the end of the disk.
    #[error("bytes {offset}..{end} are past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// The byte after the range.
        end: u64,
        /// Disk size.
        size: u64,
    },
    /// The overlay is full.
    #[error("the write overlay is full ({limit} bytes); the guest's write was refused")]
    OverlayFull {
        /// The limit in bytes.
        limit: u64,
    },
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] vmshift_image::Error),
    /// The overlay's temporary file failed.
    #[error("the overlay file: {0}")]
    Spill(std::io::Error),
}

/// The bytes of guest writes one VM may keep, over all its disks, and
/// where they are kept.
#[derive(Debug)]
pub struct OverlayBudget {
    limit: u64,
    used: AtomicU64,
    /// The unlinked temporary file the blocks go to, and its next free
    /// block; `None`: memory.
    spill: Option<(File, AtomicU64)>,
}

impl OverlayBudget {
    /// A budget of `limit` bytes, kept in memory.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(OverlayBudget {
            limit,
            used: AtomicU64::new(0),
            spill: None,
        })
    }

    /// A budget of `limit` bytes kept in an unlinked temporary file in
    /// `dir` (gone with the process, whatever way it ends).
    pub fn in_file(limit: u64, dir: &Path) -> std::io::Result<Arc<Self>> {
        let file = tempfile::tempfile_in(dir)?;
        Ok(Arc::new(OverlayBudget {
            limit,
            used: AtomicU64::new(0),
            spill: Some((file, AtomicU64::new(0))),
        }))
    }

    /// Bytes taken so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes`, or fails with [`DiskError::OverlayFull`] and takes
    /// nothing.
    fn take(&self, bytes: u64) -> Result<(), DiskError> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .map(|_| ())
            .map_err(|_| DiskError::OverlayFull { limit: self.limit })
    }

    /// Gives back `bytes` taken for blocks that were not kept.
    fn give(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The overlay budget of a VM: `limit` bytes, in a temporary file in `dir`
/// when one is given, else in memory.
pub fn budget(limit: u64, dir: Option<&Path>) -> crate::Result<Arc<OverlayBudget>> {
    match dir {
        None => Ok(OverlayBudget::new(limit)),
        Some(d) => OverlayBudget::in_file(limit, d).map_err(|e| {
            crate::Error::Config(format!(
                "--overlay-dir {}: cannot make the overlay file there: {e}",
                d.display()
            ))
        }),
    }
}

/// Where one overlay block is.
#[derive(Debug)]
enum Block {
    Ram(Box<[u8]>),
    /// At this byte offset of the budget's file.
    File(u64),
}

/// A disk image with a write overlay.
#[derive(Debug)]
pub struct OverlayDisk {
    base: Arc<dyn ImageReader>,
    blocks: BTreeMap<u64, Block>,
    budget: Arc<OverlayBudget>,
    size: u64,
}

impl OverlayDisk {
    /// Wraps `base`; at most `limit` bytes of guest writes are kept.
    pub fn new(base: Arc<dyn ImageReader>, limit: u64) -> Self {
        Self::sharing(base, OverlayBudget::new(limit))
    }

    /// Wraps `base`, its writes kept within a budget the VM's other disks
    /// share.
    pub fn sharing(base: Arc<dyn ImageReader>, budget: Arc<OverlayBudget>) -> Self {
        let size = base.size();
        OverlayDisk {
            base,
            blocks: BTreeMap::new(),
            budget,
            size,
        }
    }

    /// The disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image underneath.
    pub fn image(&self) -> &dyn ImageReader {
        &*self.base
    }

    /// Bytes the overlay holds.
    pub fn overlay_bytes(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, DiskError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.size)
            .ok_or(DiskError::OutOfRange {
                offset,
                end: offset.saturating_add(len as u64),
                size: self.size,
            })?;
        Ok(end)
    }

    /// Reads `buf.len()` bytes at `offset`: the image's bytes with the
    /// overlay's on top.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let end = self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.base.read_at(buf, offset)?;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        for (&idx, block) in self.blocks.range(first..=last) {
            let bstart = idx * BLOCK;
            let from = bstart.max(offset);
            let to = (bstart + BLOCK).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match block {
                Block::Ram(data) => {
                    dst.copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize])
                }
                Block::File(at) => self
                    .spill_file()
                    .read_exact_at(dst, at + (from - bstart))
                    .map_err(DiskError::Spill)?,
            }
        }
        Ok(())
    }

    fn spill_file(&self) -> &File {
        &self
            .budget
            .spill
            .as_ref()
            .expect("file blocks only with a file")
            .0
    }

    /// Writes `data` at `offset` into the overlay.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), DiskError> {
        let end = self.check(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let new = (first..=last)
            .filter(|i| !self.blocks.contains_key(i))
            .count() as u64;
        self.budget.take(new * BLOCK)?;
        let mut inserted = 0;
        for idx in first..=last {
            let bstart = idx * BLOCK;
            if !self.blocks.contains_key(&idx) {
                let mut block = vec![0u8; BLOCK as usize].into_boxed_slice();
                let valid = (self.size - bstart).min(BLOCK) as usize;
                let from = bstart.max(offset);
                let to = (bstart + BLOCK).min(end);
                let stored = (|| {
                    // A block the write covers whole needs nothing from
                    // below.
                    if !(offset <= bstart && end >= bstart + valid as u64) {
                        self.read_at(&mut block[..valid], bstart)?;
                    }
                    block[(from - bstart) as usize..(to - bstart) as usize]
                        .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                    self.store(block)
                })();
                match stored {
                    Ok(b) => {
                        self.blocks.insert(idx, b);
                        inserted += 1;
                    }
                    Err(e) => {
                        self.budget.give((new - inserted) * BLOCK);
                        return Err(e);
                    }
                }
                continue;
            }
            let from = bstart.max(offset);
            let to = (bstart + BLOCK).min(end);
            let src = &data[(from - offset) as usize..(to - offset) as usize];
            let at = match self.blocks.get_mut(&idx).expect("present") {
                Block::Ram(b) => {
                    b[(from - bstart) as usize..(to - bstart) as usize].copy_from_slice(src);
                    continue;
                }
                Block::File(at) => *at + (from - bstart),
            };
            if let Err(e) = self.spill_file().write_all_at(src, at) {
                self.budget.give((new - inserted) * BLOCK);
                return Err(DiskError::Spill(e));
            }
        }
        Ok(())
    }

    /// Keeps a new block: in memory, or written to the next free block of
    /// the overlay file.
    fn store(&self, block: Box<[u8]>) -> Result<Block, DiskError> {
        match &self.budget.spill {
            None => Ok(Block::Ram(block)),
            Some((file, next)) => {
                let at = next.fetch_add(BLOCK, Ordering::Relaxed);
                file.write_all_at(&block, at).map_err(DiskError::Spill)?;
                Ok(Block::File(at))
            }
        }
    }
}

/// An overlay disk served to another program (QEMU, through vmshift's NBD
/// server): the same copy-on-write semantics and limit as vmshift-kvm's
/// own devices. A full overlay reaches the client as `ENOSPC`.
#[derive(Debug)]
pub struct SharedOverlay(pub std::sync::Mutex<OverlayDisk>);

impl SharedOverlay {
    fn lock(&self) -> std::sync::MutexGuard<'_, OverlayDisk> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn io_error(e: DiskError) -> std::io::Error {
    let kind = match e {
        DiskError::OverlayFull { .. } => std::io::ErrorKind::StorageFull,
        DiskError::OutOfRange { .. } => std::io::ErrorKind::InvalidInput,
        DiskError::Image(_) | DiskError::Spill(_) => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e)
}

impl vmshift_image::nbd::NbdExport for SharedOverlay {
    fn size(&self) -> u64 {
        self.lock().size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.lock().read_at(buf, offset).map_err(io_error)
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.lock().write_at(data, offset).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::image;

    #[test]
    fn reads_see_earlier_writes_and_the_image_is_untouched() {
        let orig: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
        let (f, r) = image(&orig);
        let mtime = std::fs::metadata(f.path()).unwrap().modified().unwrap();
        let mut d = OverlayDisk::new(r, 1 << 20);
        d.write_at(&[0xaa; 100], 4090).unwrap();
        let mut buf = vec![0u8; 20000];
        d.read_at(&mut buf, 0).unwrap();
        let mut want = orig.clone();
        want[4090..4190].fill(0xaa);
        assert_eq!(buf, want);
        // Two partial blocks were copied up, not more.
        assert_eq!(d.overlay_bytes(), 2 * BLOCK);
        assert_eq!(std::fs::read(f.path()).unwrap(), orig);
        assert_eq!(
            std::fs::metadata(f.path()).unwrap().modified().unwrap(),
            mtime
        );
    }

    #[test]
    fn a_write_in_the_last_partial_block_keeps_its_bytes() {
        let orig = vec![7u8; 5000];
        let (_f, r) = image(&orig);
        let mut d = OverlayDisk::new(r, 1 << 20);
        d.write_at(&[1, 2], 4998).unwrap();
        let mut buf = vec![0u8; 904];
        d.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf[..902], &[7u8; 902][..]);
        assert_eq!(&buf[902..], &[1, 2]);
    }

    #[test]
    fn writes_past_the_limit_fail_and_change_nothing() {
        let (_f, r) = image(&[0u8; 65536]);
        let mut d = OverlayDisk::new(r, 2 * BLOCK);
        d.write_at(&[1; 8192], 0).unwrap();
        assert!(matches!(
            d.write_at(&[2; 1], 8192),
            Err(DiskError::OverlayFull { .. })
        ));
        // Rewriting a block it already holds still works.
        d.write_at(&[3; 10], 0).unwrap();
        let mut b = [0u8; 1];
        d.read_at(&mut b, 8192).unwrap();
        assert_eq!(b[0], 0);
    }

    #[test]
    fn disks_of_one_vm_share_the_limit() {
        let (_f, r) = image(&[0u8; 65536]);
        let budget = OverlayBudget::new(3 * BLOCK);
        let mut a = OverlayDisk::sharing(r.clone(), budget.clone());
        let mut b = OverlayDisk::sharing(r, budget.clone());
        a.write_at(&[1; 8192], 0).unwrap();
        assert!(matches!(
            b.write_at(&[2; 8192], 0),
            Err(DiskError::OverlayFull { .. })
        ));
        // The refused write took nothing: one block is still free.
        b.write_at(&[2; 4096], 0).unwrap();
        assert_eq!(budget.used(), 3 * BLOCK);
        assert!(a.write_at(&[1], 20000).is_err());
    }

    #[test]
    fn an_overlay_in_a_file_reads_and_limits_as_one_in_memory() {
        let orig: Vec<u8> = (0..40000u32).map(|i| (i * 3) as u8).collect();
        let (f, r) = image(&orig);
        let dir = tempfile::tempdir().unwrap();
        let budget = OverlayBudget::in_file(4 * BLOCK, dir.path()).unwrap();
        let mut a = OverlayDisk::sharing(r.clone(), budget.clone());
        let mut b = OverlayDisk::sharing(r, budget.clone());
        a.write_at(&[0xaa; 100], 4090).unwrap();
        b.write_at(&[0xbb; 5000], 0).unwrap();
        // Rewrites of kept blocks, inside them.
        a.write_at(&[0xcc; 3], 4095).unwrap();
        let mut want_a = orig.clone();
        want_a[4090..4190].fill(0xaa);
        want_a[4095..4098].fill(0xcc);
        let mut want_b = orig.clone();
        want_b[..5000].fill(0xbb);
        let mut got = vec![0u8; orig.len()];
        a.read_at(&mut got, 0).unwrap();
        assert_eq!(got, want_a);
        b.read_at(&mut got, 0).unwrap();
        assert_eq!(got, want_b);
        // Four blocks kept, none in memory, nothing in the folder (the
        // file is unlinked); the fifth is refused.
        assert_eq!(budget.used(), 4 * BLOCK);
        assert!(a.blocks.values().all(|b| matches!(b, Block::File(_))));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(
            b.write_at(&[1], 30000),
            Err(DiskError::OverlayFull { .. })
        ));
        assert_eq!(std::fs::read(f.path()).unwrap(), orig);
    }

    #[test]
    fn access_past_the_end_is_an_error() {
        let (_f, r) = image(&[0u8; 4096]);
        let mut d = OverlayDisk::new(r, 1 << 20);
        let mut b = [0u8; 2];
        assert!(matches!(
            d.read_at(&mut b, 4095),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_at(&b, u64::MAX),
            Err(DiskError::OutOfRange { .. })
        ));
    }
}
