//! ext2/3/4 opened with `ext4-view` over a byte range of a device, its
//! superblock's geometry checked first.

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Read};

use crate::vfs::Device;

/// A byte range of a disk image, read as a device.
struct RangeReader {
    image: Arc<dyn Device>,
    start: u64,
    len: u64,
}

impl Ext4Read for RangeReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        start_byte
            .checked_add(dst.len() as u64)
            .filter(|end| *end <= self.len)
            .ok_or_else(|| {
                format!(
                    "read of {} bytes at {start_byte} past the end of the partition ({} bytes)",
                    dst.len(),
                    self.len
                )
            })?;
        self.image.read_at(dst, self.start + start_byte)?;
        Ok(())
    }
}

/// The largest ext block size accepted (64 KiB, what Linux mounts).
const MAX_LOG_BLOCK_SIZE: u32 = 6;

/// Checks an ext superblock's geometry before the file system is opened:
/// the reader sizes its caches and tables from these numbers, so a
/// hostile superblock must not name more blocks or groups than the
/// partition can hold. `sb` is the 1024 bytes at offset 1024.
fn sane_ext_superblock(sb: &[u8; 1024], len: u64) -> bool {
    let u32_at = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().expect("4 bytes"));
    let u16_at = |at: usize| u16::from_le_bytes([sb[at], sb[at + 1]]);
    if u16_at(56) != 0xef53 {
        return false;
    }
    let log = u32_at(24);
    if log > MAX_LOG_BLOCK_SIZE {
        return false;
    }
    let block = 1024u64 << log;
    let incompat = u32_at(96);
    let is_64bit = incompat & 0x80 != 0;
    let mut blocks = u64::from(u32_at(4));
    if is_64bit {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    let per_group = u64::from(u32_at(32));
    let inodes_per_group = u32_at(40);
    let first = u64::from(u32_at(20));
    let desc = if is_64bit {
        u64::from(u16_at(0xfe)).max(32)
    } else {
        32
    };
    if per_group == 0 || inodes_per_group == 0 || blocks <= first {
        return false;
    }
    let groups = (blocks - first).div_ceil(per_group);
    blocks.checked_mul(block).is_some_and(|b| b <= len)
        && groups.checked_mul(desc).is_some_and(|d| d <= len)
}

/// Opens the ext2/3/4 file system at `[start, start + len)` of `image`,
/// its superblock's geometry checked first; `None` when it does not open.
pub(crate) fn open_ext(image: Arc<dyn Device>, start: u64, len: u64) -> Option<Ext4> {
    let mut sb = [0u8; 1024];
    if len < 2048 || image.read_at(&mut sb, start + 1024).is_err() || !sane_ext_superblock(&sb, len)
    {
        return None;
    }
    Ext4::load(Box::new(RangeReader { image, start, len })).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(log: u32, blocks: u32, per_group: u32) -> [u8; 1024] {
        let mut s = [0u8; 1024];
        s[4..8].copy_from_slice(&blocks.to_le_bytes());
        s[24..28].copy_from_slice(&log.to_le_bytes());
        s[32..36].copy_from_slice(&per_group.to_le_bytes());
        s[40..44].copy_from_slice(&8192u32.to_le_bytes());
        s[56..58].copy_from_slice(&0xef53u16.to_le_bytes());
        s
    }

    #[test]
    fn a_real_geometry_passes() {
        // 64 MiB of 4 KiB blocks, 32768 blocks per group.
        assert!(sane_ext_superblock(&sb(2, 16384, 32768), 64 << 20));
    }

    #[test]
    fn hostile_geometries_are_refused_before_opening() {
        // 2 GiB blocks.
        assert!(!sane_ext_superblock(&sb(21, 1, 1), 64 << 20));
        // 4 billion one-block groups.
        assert!(!sane_ext_superblock(&sb(0, u32::MAX, 1), 64 << 20));
        // More blocks than the partition holds.
        assert!(!sane_ext_superblock(&sb(2, 16385 * 2, 32768), 64 << 20));
        // Zero blocks per group.
        assert!(!sane_ext_superblock(&sb(2, 16384, 0), 64 << 20));
    }
}
