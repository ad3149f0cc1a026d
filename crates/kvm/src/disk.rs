//! A guest's view of a disk image: reads through vmshift's own
//! [`ImageReader`], writes into a copy-on-write overlay held in memory, so
//! the image under test is never modified. The overlay has a limit; past
//! it, writes fail (the guest sees an I/O error) instead of the host
//! running out of memory.

use std::collections::BTreeMap;
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
}

/// The bytes of guest writes one VM may keep, over all its disks.
#[derive(Debug)]
pub struct OverlayBudget {
    limit: u64,
    used: AtomicU64,
}

impl OverlayBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(OverlayBudget {
            limit,
            used: AtomicU64::new(0),
        })
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

/// A disk image with a write overlay.
#[derive(Debug)]
pub struct OverlayDisk {
    base: Arc<dyn ImageReader>,
    blocks: BTreeMap<u64, Box<[u8]>>,
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
        for (&idx, data) in self.blocks.range(first..=last) {
            let bstart = idx * BLOCK;
            let from = bstart.max(offset);
            let to = (bstart + BLOCK).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
        }
        Ok(())
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
                // A block the write covers whole needs nothing from below.
                if !(offset <= bstart && end >= bstart + valid as u64) {
                    if let Err(e) = self.read_at(&mut block[..valid], bstart) {
                        self.budget.give((new - inserted) * BLOCK);
                        return Err(e);
                    }
                }
                self.blocks.insert(idx, block);
                inserted += 1;
            }
            let block = self.blocks.get_mut(&idx).expect("inserted above");
            let from = bstart.max(offset);
            let to = (bstart + BLOCK).min(end);
            block[(from - bstart) as usize..(to - bstart) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        Ok(())
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
        DiskError::Image(_) => std::io::ErrorKind::Other,
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
