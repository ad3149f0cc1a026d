//! `check` for qcow2: rebuild every refcount from the metadata and compare
//! with the stored ones, the way `qemu-img check` does (same counting, so
//! the two agree on leaks and corruptions).

use std::collections::BTreeMap;
use std::fs::File;

use byteorder::{BigEndian, ByteOrder};

use super::header::Header;
use super::reader::{
    CompressedLayout, Qcow2Reader, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use super::writer::get_refcount;
use crate::check::CheckReport;
use crate::error::Result;
use crate::fileio::read_up_to_at;

/// Computed references per host cluster: dense inside the file, sparse
/// beyond it (so a wild offset cannot make us allocate gigabytes).
struct Refs {
    dense: Vec<u64>,
    beyond: BTreeMap<u64, u64>,
}

impl Refs {
    fn get(&self, c: u64) -> u64 {
        self.dense
            .get(c as usize)
            .copied()
            .unwrap_or_else(|| self.beyond.get(&c).copied().unwrap_or(0))
    }

    fn bump(&mut self, c: u64) -> u64 {
        let slot = match self.dense.get_mut(c as usize) {
            Some(v) => v,
            None => self.beyond.entry(c).or_insert(0),
        };
        *slot += 1;
        *slot
    }
}

struct Checker<'a> {
    r: &'a Qcow2Reader,
    h: &'a Header,
    file: &'a File,
    cs: u64,
    refs: Refs,
    report: CheckReport,
    max_refcount: u64,
    compressed: CompressedLayout,
}

/// Checks a qcow2 image's metadata.
pub fn check(r: &Qcow2Reader) -> Result<CheckReport> {
    let h = r.header();
    let cs = h.cluster_size();
    let nb_clusters = r.file_len().div_ceil(cs);
    let bits = h.refcount_bits() as u64;
    let mut c = Checker {
        r,
        h,
        file: r.file(),
        cs,
        refs: Refs {
            dense: vec![0; nb_clusters as usize],
            beyond: BTreeMap::new(),
        },
        report: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..CheckReport::default()
        },
        max_refcount: if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        },
        compressed: CompressedLayout::new(h.cluster_bits),
    };
    c.inc(0, cs); // header
    c.check_l1(h.l1_table_offset, h.l1_size, true)?;
    for sn in r.snapshots() {
        c.check_l1(sn.l1_table_offset, sn.l1_size, false)?;
    }
    if let Some(last) = r.snapshots().last() {
        let len = last.entry_offset + last.entry_len - h.snapshots_offset;
        c.inc(h.snapshots_offset, len);
    }
    c.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    c.check_bitmaps()?;
    let reftable = c.read_u64s(
        h.refcount_table_offset,
        (u64::from(h.refcount_table_clusters) * cs / 8) as usize,
    )?;
    c.check_refblocks(&reftable, nb_clusters);
    c.compare(&reftable)?;
    c.check_copied(&reftable)?;
    Ok(c.report)
}

impl Checker<'_> {
    /// Counts a reference to every cluster of `[offset, offset + len)`.
    fn inc(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / self.cs, (offset + len - 1) / self.cs);
        for cl in first..=last {
            if self.refs.get(cl) == self.max_refcount {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    cl * self.cs
                ));
                continue;
            }
            self.refs.bump(cl);
        }
    }

    /// Reads big-endian u64s; bytes past the end of the file read as zero,
    /// as QEMU's block layer returns them.
    fn read_u64s(&self, offset: u64, n: usize) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; n * 8];
        if offset < self.r.file_len() {
            read_up_to_at(self.file, self.r.path_ref(), &mut raw, offset)?;
        }
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    fn check_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        self.inc(l1_offset, u64::from(l1_size) * 8);
        let l1 = self.read_u64s(l1_offset, l1_size as usize)?;
        let mut next_contiguous = 0u64;
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.inc(l2, self.cs);
            if l2 % self.cs != 0 {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR l2_offset={l2:#x}: Table is not cluster aligned; L1 entry corrupted (l1_index={i})"
                ));
                continue;
            }
            self.check_l2(l2, active, &mut next_contiguous)?;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2: u64, active: bool, next_contiguous: &mut u64) -> Result<()> {
        let ext = self.h.extended_l2();
        let per = if ext { 2 } else { 1 };
        let table = self.read_u64s(l2, (self.cs / 8) as usize)?;
        let external = self.r.has_external_data();
        for pair in table.chunks_exact(per) {
            let e = pair[0];
            let bitmap = if ext { pair[1] } else { 0 };
            if e & OFLAG_COMPRESSED != 0 {
                if e & OFLAG_COPIED != 0 {
                    self.report.corruptions += 1;
                    self.report.messages.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        e & !(OFLAG_COPIED | OFLAG_COMPRESSED)
                    ));
                }
                if active {
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    self.report.fragmented_clusters += 1;
                }
                let (off, len) = self.compressed.decode(e);
                self.inc(off & !511, len);
                continue;
            }
            let host = e & OFFSET_MASK;
            let zero_plain = !ext && e & OFLAG_ZERO != 0 && host == 0;
            if host == 0 || zero_plain {
                if ext && bitmap & 0xffff_ffff != 0 {
                    self.report.corruptions += 1;
                    self.report
                        .messages
                        .push("ERROR: Unallocated cluster has non-zero l2 bitmap".to_string());
                }
                continue;
            }
            if ext && (bitmap >> 32) & bitmap != 0 {
                self.report.corruptions += 1;
                self.report
                    .messages
                    .push(format!("ERROR: Invalid cluster entry at offset {host:#x}"));
            }
            if host % self.cs != 0 {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR offset={host:#x}: Cluster is not properly aligned; L2 entry corrupted."
                ));
            }
            if active {
                self.report.allocated_clusters += 1;
                if *next_contiguous != 0 && host != *next_contiguous {
                    self.report.fragmented_clusters += 1;
                }
                *next_contiguous = host + self.cs;
            }
            if !external {
                self.inc(host, self.cs);
            }
        }
        Ok(())
    }

    fn check_bitmaps(&mut self) -> Result<()> {
        let Some((count, dir_size, dir_offset)) = self.h.bitmaps else {
            return Ok(());
        };
        if dir_size > 64 << 20 {
            self.report.check_errors += 1;
            self.report
                .messages
                .push("ERROR: bitmap directory is too large".into());
            return Ok(());
        }
        self.inc(dir_offset, dir_size);
        let mut dir = vec![0u8; dir_size as usize];
        read_up_to_at(self.file, self.r.path_ref(), &mut dir, dir_offset)?;
        let mut pos = 0usize;
        for _ in 0..count {
            if pos + 24 > dir.len() {
                self.report.corruptions += 1;
                self.report
                    .messages
                    .push("ERROR: bitmap directory entry runs past the directory".into());
                break;
            }
            let table_offset = BigEndian::read_u64(&dir[pos..]);
            let table_size = BigEndian::read_u32(&dir[pos + 8..]);
            let name_size = BigEndian::read_u16(&dir[pos + 18..]) as usize;
            let extra = BigEndian::read_u32(&dir[pos + 20..]) as usize;
            self.inc(table_offset, u64::from(table_size) * 8);
            if u64::from(table_size) * 8 <= 64 << 20 {
                for e in self.read_u64s(table_offset, table_size as usize)? {
                    let off = e & 0x00ff_ffff_ffff_fe00;
                    if off != 0 {
                        self.inc(off, self.cs);
                    }
                }
            }
            pos += (24 + extra + name_size).div_ceil(8) * 8;
        }
        Ok(())
    }

    fn check_refblocks(&mut self, reftable: &[u64], nb_clusters: u64) {
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & !0x1ff;
            if off == 0 {
                continue;
            }
            if off % self.cs != 0 {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if off / self.cs >= nb_clusters {
                self.report.corruptions += 1;
                self.report
                    .messages
                    .push(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            self.inc(off, self.cs);
            let n = self.refs.get(off / self.cs);
            if n != 1 {
                self.report.corruptions += 1;
                self.report
                    .messages
                    .push(format!("ERROR refcount block {i} refcount={n}"));
            }
        }
    }

    /// The stored refcount of cluster `c`; `None` when it cannot be read.
    fn stored(
        &self,
        reftable: &[u64],
        c: u64,
        cache: &mut Option<(u64, Vec<u8>)>,
    ) -> Result<Option<u64>> {
        let bits = u64::from(self.h.refcount_bits());
        let per_block = self.cs * 8 / bits;
        let idx = c / per_block;
        let Some(&entry) = reftable.get(idx as usize) else {
            return Ok(Some(0));
        };
        let off = entry & !0x1ff;
        if off == 0 {
            return Ok(Some(0));
        }
        if off % self.cs != 0 {
            return Ok(None);
        }
        if cache.as_ref().is_none_or(|(o, _)| *o != off) {
            let mut block = vec![0u8; self.cs as usize];
            if off < self.r.file_len() {
                read_up_to_at(self.file, self.r.path_ref(), &mut block, off)?;
            }
            *cache = Some((off, block));
        }
        let block = &cache
            .as_ref()
            .map(|(_, b)| b)
            .expect("cache was just filled");
        Ok(Some(get_refcount(block, (c % per_block) as usize, bits)))
    }

    fn compare(&mut self, reftable: &[u64]) -> Result<()> {
        let mut cache = None;
        let dense = self.refs.dense.len() as u64;
        let beyond: Vec<u64> = self.refs.beyond.keys().copied().collect();
        let mut highest = None;
        for c in (0..dense).chain(beyond) {
            let computed = self.refs.get(c);
            let Some(stored) = self.stored(reftable, c, &mut cache)? else {
                self.report.check_errors += 1;
                self.report
                    .messages
                    .push(format!("ERROR: Can't get refcount for cluster {c}"));
                continue;
            };
            if stored > 0 || computed > 0 {
                highest = Some(c);
            }
            if stored < computed {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR cluster {c} refcount={stored} reference={computed}"
                ));
            } else if stored > computed {
                self.report.leaks += 1;
                self.report.messages.push(format!(
                    "Leaked cluster {c} refcount={stored} reference={computed}"
                ));
            }
        }
        self.report.image_end_offset = highest.map_or(0, |c| (c + 1) * self.cs);
        Ok(())
    }

    /// OFLAG_COPIED must be set exactly when a cluster's refcount is 1.
    fn check_copied(&mut self, reftable: &[u64]) -> Result<()> {
        let mut cache = None;
        let l1 = self.r.l1.clone();
        let per = if self.h.extended_l2() { 2 } else { 1 };
        let external = self.r.has_external_data();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if let Some(rc) = self.stored(reftable, l2 / self.cs, &mut cache)? {
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    self.report.corruptions += 1;
                    self.report.messages.push(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                    ));
                }
            }
            if l2 % self.cs != 0 {
                continue;
            }
            let table = self.read_u64s(l2, (self.cs / 8) as usize)?;
            for pair in table.chunks_exact(per) {
                let entry = pair[0];
                let host = entry & OFFSET_MASK;
                if entry & OFLAG_COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let rc = if external {
                    Some(1)
                } else {
                    self.stored(reftable, host / self.cs, &mut cache)?
                };
                if let Some(rc) = rc {
                    if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                        self.report.corruptions += 1;
                        self.report.messages.push(format!(
                            "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
