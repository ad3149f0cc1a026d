//! File systems on a disk: each partition (or the whole disk when it has
//! no partition table) that holds ext2/3/4.

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Read};
use vmshift_image::part::read_table;
use vmshift_image::ImageReader;

use crate::Result;

/// A byte range of a disk image, read as a device.
struct RangeReader {
    image: Arc<dyn ImageReader>,
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

/// An ext2/3/4 file system found on a disk.
pub struct Filesystem {
    /// Where it is, for messages: "disk.qcow2 partition 1".
    pub place: String,
    /// Its partition number (None: the whole disk).
    pub partition: Option<u32>,
    /// The file system UUID.
    pub uuid: String,
    /// The file system.
    pub fs: Ext4,
}

impl std::fmt::Debug for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filesystem")
            .field("place", &self.place)
            .field("uuid", &self.uuid)
            .finish()
    }
}

/// The ext2/3/4 file systems of a disk, in partition order. A partition
/// that holds something else (or damaged ext4) is skipped.
pub fn filesystems(image: Arc<dyn ImageReader>) -> Result<Vec<Filesystem>> {
    let name = image.path().display().to_string();
    let size = image.size();
    let ranges: Vec<(Option<u32>, u64, u64)> = match read_table(&*image)? {
        Some(t) => t
            .partitions
            .iter()
            .filter(|p| !p.extended && p.end <= size && p.start < p.end)
            .map(|p| (Some(p.number), p.start, p.end - p.start))
            .collect(),
        None => vec![(None, 0, size)],
    };
    let mut out = Vec::new();
    for (number, start, len) in ranges {
        let reader = RangeReader {
            image: image.clone(),
            start,
            len,
        };
        if let Ok(fs) = Ext4::load(Box::new(reader)) {
            let place = match number {
                Some(n) => format!("{name} partition {n}"),
                None => name.clone(),
            };
            out.push(Filesystem {
                place,
                partition: number,
                uuid: fs.uuid().to_string(),
                fs,
            });
        }
    }
    Ok(out)
}
