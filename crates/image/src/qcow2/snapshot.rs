//! The internal snapshot table.

use std::fs::File;

use byteorder::{BigEndian, ByteOrder};

use super::header::{Header, MAX_SNAPSHOT_TABLE_BYTES};
use crate::block::SnapshotInfo;
use crate::error::{Ctx, Result};
use crate::fileio::read_exact_at;

/// QEMU refuses snapshot entries with more extra data than this.
const MAX_EXTRA_DATA: u32 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub icount: Option<u64>,
    /// Where this entry starts and how long it is, for `check`.
    pub entry_offset: u64,
    pub entry_len: u64,
}

impl Snapshot {
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: u64::from(self.date_nsec),
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: self.vm_clock_nsec % 1_000_000_000,
            icount: self.icount,
        }
    }
}

/// Reads and validates the snapshot table the header points to.
pub fn read_snapshots(file: &File, ctx: &Ctx, h: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        let field = format!("snapshot table entry {i}");
        if off - h.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(ctx.invalid(&field, off, "snapshot table exceeds QEMU's 64 MiB limit"));
        }
        if off.checked_add(40).is_none_or(|e| e > file_len) {
            return Err(ctx.corrupt(&field, off, "snapshot entry runs past the end of the file"));
        }
        let mut fixed = [0u8; 40];
        read_exact_at(file, &ctx.path, &mut fixed, off, &field)?;
        let extra_size = BigEndian::read_u32(&fixed[36..40]);
        if extra_size > MAX_EXTRA_DATA {
            return Err(ctx.invalid(
                &field,
                off + 36,
                format!("extra_data_size {extra_size} exceeds QEMU's limit of {MAX_EXTRA_DATA}"),
            ));
        }
        let id_len = BigEndian::read_u16(&fixed[12..14]) as u64;
        let name_len = BigEndian::read_u16(&fixed[14..16]) as u64;
        let var_len = u64::from(extra_size) + id_len + name_len;
        let mut var = vec![0u8; var_len as usize];
        read_exact_at(file, &ctx.path, &mut var, off + 40, &field)?;
        let extra = &var[..extra_size as usize];
        let id = &var[extra_size as usize..(u64::from(extra_size) + id_len) as usize];
        let name = &var[(u64::from(extra_size) + id_len) as usize..];
        let mut vm_state_size = u64::from(BigEndian::read_u32(&fixed[32..36]));
        if extra.len() >= 8 {
            vm_state_size = BigEndian::read_u64(&extra[0..8]);
        }
        let icount = (extra.len() >= 24)
            .then(|| BigEndian::read_u64(&extra[16..24]))
            .filter(|&v| v != u64::MAX);
        let l1_size = BigEndian::read_u32(&fixed[8..12]);
        if u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES {
            return Err(ctx.invalid(
                &field,
                off + 8,
                format!("snapshot L1 size {l1_size} exceeds QEMU's 32 MiB limit"),
            ));
        }
        let entry_len = (40 + var_len).div_ceil(8) * 8;
        out.push(Snapshot {
            l1_table_offset: BigEndian::read_u64(&fixed[0..8]),
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: BigEndian::read_u32(&fixed[16..20]),
            date_nsec: BigEndian::read_u32(&fixed[20..24]),
            vm_clock_nsec: BigEndian::read_u64(&fixed[24..32]),
            vm_state_size,
            icount,
            entry_offset: off,
            entry_len,
        });
        off += entry_len;
    }
    Ok(out)
}
