//! `check` for qcow2: rebuild every refcount from the metadata and compare
//! with the stored ones, the way `qemu-img check` does (QEMU's
//! `qcow2_check_refcounts`: the same walk, the same checks in the same
//! order, so the two agree on every count, on leaks and corruptions).

use std::fs::File;

use byteorder::{BigEndian, ByteOrder};

use super::header::Header;
use super::reader::{
    CompressedLayout, Qcow2Reader, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use super::writer::get_refcount;
use crate::check::{CheckReport, Fix, Repaired};
use crate::error::Result;
use crate::fileio::read_up_to_at;

/// Bits of an L1 entry that must be zero.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry that must be zero.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bits of a refcount table entry that must be zero.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// The "allocated" half of an extended L2 entry's subcluster bitmap.
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Bitmap table entries: reserved bits, and the "all ones" flag.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_FLAG_ALL_ONES: u64 = 1;

/// What an L2 entry describes (QEMU's `qcow2_get_cluster_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compressed,
    /// Reads as zero, no host cluster.
    ZeroPlain,
    /// Reads as zero, owns a (preallocated) host cluster.
    ZeroAlloc,
    Normal,
    Unallocated,
}

fn kind(entry: u64, extended: bool, external: bool) -> Kind {
    if entry & OFLAG_COMPRESSED != 0 {
        Kind::Compressed
    } else if entry & OFLAG_ZERO != 0 && !extended {
        if entry & OFFSET_MASK != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if entry & OFFSET_MASK == 0 {
        // Offset 0 is a valid data offset in an external data file, where
        // every cluster has refcount 1: OFLAG_COPIED tells them apart.
        if external && entry & OFLAG_COPIED != 0 {
            Kind::Normal
        } else {
            Kind::Unallocated
        }
    } else {
        Kind::Normal
    }
}

/// A stored refcount that differs from the references counted.
#[derive(Debug, Clone, Copy)]
struct Mismatch {
    cluster: u64,
    stored: u64,
    computed: u64,
}

impl Mismatch {
    /// The line qemu-img prints for it, after `word` (ERROR, Repairing).
    fn line(&self, word: &str) -> String {
        format!(
            "{word} cluster {} refcount={} reference={}",
            self.cluster, self.stored, self.computed
        )
    }
}

struct Checker<'a> {
    r: &'a Qcow2Reader,
    h: &'a Header,
    file: &'a File,
    cs: u64,
    file_len: u64,
    /// Computed references per host cluster (QEMU's in-memory refcount
    /// table): one per cluster of the file, growing past its end only for
    /// a region that ends less than a cluster beyond it.
    refs: Vec<u64>,
    report: CheckReport,
    max_refcount: u64,
    compressed: CompressedLayout,
    /// What `compare` found, cluster by cluster.
    mismatches: Vec<Mismatch>,
}

/// Checks a qcow2 image's metadata.
pub fn check(r: &Qcow2Reader) -> Result<CheckReport> {
    let h = r.header();
    let (mut c, reftable) = calculate(
        r,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        r.file_len(),
    )?;
    c.compare(&reftable)?;
    c.check_copied(&reftable, None)?;
    Ok(c.report)
}

/// The references to every cluster, counted from the metadata (QEMU's
/// `calculate_refcounts`), and the refcount table.
fn calculate(
    r: &Qcow2Reader,
    rt_offset: u64,
    rt_clusters: u32,
    file_len: u64,
) -> Result<(Checker<'_>, Vec<u64>)> {
    let h = r.header();
    let cs = h.cluster_size();
    let nb_clusters = file_len.div_ceil(cs);
    let bits = h.refcount_bits() as u64;
    let mut c = Checker {
        r,
        h,
        file: r.file(),
        cs,
        file_len,
        refs: vec![0; nb_clusters as usize],
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
        mismatches: Vec::new(),
    };
    c.inc(0, cs); // header
    c.check_l1(h.l1_table_offset, h.l1_size, true)?;
    if r.has_external_data() && !r.snapshots().is_empty() {
        c.corrupt(format!(
            "ERROR {} snapshots in image with data file",
            r.snapshots().len()
        ));
    }
    for sn in r.snapshots() {
        if sn.l1_table_offset % cs != 0 {
            c.corrupt(format!(
                "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                sn.id, sn.name, sn.l1_table_offset
            ));
            continue;
        }
        c.check_l1(sn.l1_table_offset, sn.l1_size, false)?;
    }
    let snapshots_size = c.snapshots_size()?;
    c.inc(h.snapshots_offset, snapshots_size);
    c.inc(rt_offset, u64::from(rt_clusters) * cs);
    c.check_bitmaps()?;
    let reftable = c.read_u64s(rt_offset, (u64::from(rt_clusters) * cs / 8) as usize)?;
    c.check_refblocks(&reftable);
    Ok((c, reftable))
}

/// Repairs `r`'s refcounts and OFLAG_COPIED flags in place through `out`
/// (the same file, opened for writing and locked), as `qemu-img check -r`
/// does: a first pass reports, a second repairs. Each write changes one
/// refcount or one table entry (at most 8 bytes, inside one sector) and
/// only ever brings the metadata closer to the references, so an
/// interrupted repair leaves an image that a new check (or repair) sees
/// as no worse than before. Damage that needs the refcount structure
/// rebuilt, or tables rewritten, is refused before anything is written.
pub fn repair(r: &Qcow2Reader, out: &File, fix: Fix) -> Result<Repaired> {
    let h = r.header();
    let (mut c, reftable) = calculate(
        r,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        r.file_len(),
    )?;
    let structural = c.report.corruptions;
    let structural_messages = c.report.messages.clone();
    c.compare(&reftable)?;
    let rebuild = c.mismatches.iter().any(|m| m.stored == 0);
    let mut done = Repaired {
        messages: c.report.messages.clone(),
        ..Repaired::default()
    };
    if fix == Fix::All && structural > 0 {
        let what = structural_messages.first().cloned().unwrap_or_default();
        return Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            format!(
                "check -r all: this damage needs tables rewritten ({what}); vmshift repairs refcounts (rebuilding their structure if need be) and OFLAG_COPIED flags, and has written nothing"
            ),
        )
        .at_path(r.path_ref()));
    }
    if fix == Fix::All && rebuild {
        return rebuild_and_repair(r, out, c, done);
    }
    if rebuild {
        done.messages
            .push("ERROR need to rebuild refcount structures".into());
        done.needs_rebuild = true;
        return Ok(done);
    }
    // The repairing pass.
    for m in c.mismatches.clone() {
        if m.stored < m.computed && fix != Fix::All {
            done.messages.push(m.line("ERROR"));
            continue;
        }
        done.messages.push(m.line("Repairing"));
        c.set_refcount(out, &reftable, m)?;
        if m.stored > m.computed {
            done.leaks_fixed += 1;
            c.report.leaks -= 1;
        } else {
            done.corruptions_fixed += 1;
            c.report.corruptions -= 1;
        }
    }
    // OFLAG_COPIED, against the repaired refcounts: always with -r all;
    // with -r leaks only when nothing else is left wrong.
    let repair_copied = match fix {
        Fix::All => true,
        Fix::Leaks => {
            c.report.check_errors == 0 && c.report.corruptions == 0 && c.report.leaks == 0
        }
    };
    let before = c.report.messages.len();
    let fixed = c.check_copied(&reftable, repair_copied.then_some(out))?;
    done.corruptions_fixed += fixed;
    done.messages
        .extend(c.report.messages[before..].iter().cloned());
    if c.report.check_errors == 0 && c.report.corruptions == 0 {
        mark_clean(r, out)?;
    }
    out.sync_all()
        .map_err(|e| crate::error::Error::io(r.path_ref(), "syncing the repaired image", e))?;
    Ok(done)
}

/// QEMU's `qcow2_mark_clean` and `qcow2_mark_consistent` after a repair
/// that left no corruption: the dirty and corrupt bits of a version 3
/// header cleared (one 8-byte write), so QEMU opens the image for writing
/// again.
fn mark_clean(r: &Qcow2Reader, out: &File) -> Result<()> {
    let h = r.header();
    if h.version < 3 || h.incompatible & 0b11 == 0 {
        return Ok(());
    }
    out.sync_all()
        .map_err(|e| crate::error::Error::io(r.path_ref(), "syncing the repaired image", e))?;
    let cleared = h.incompatible & !0b11;
    crate::fileio::write_all_at(out, r.path_ref(), &cleared.to_be_bytes(), 72)
}

/// `-r all` where a referenced cluster has refcount 0: QEMU's
/// `rebuild_refcount_structure` — new refcount blocks and a new refcount
/// table written from the references counted (placed as QEMU places
/// them), the header switched to them in one write, then the old
/// structure's clusters freed as leaks and OFLAG_COPIED set right. Until
/// the header write the old structure stays in force: an interruption
/// before it leaves the image as it was, after it only leaks.
fn rebuild_and_repair(
    r: &Qcow2Reader,
    out: &File,
    mut c: Checker<'_>,
    mut done: Repaired,
) -> Result<Repaired> {
    done.messages.push("Rebuilding refcount structure".into());
    let (old_corruptions, old_leaks) = (c.report.corruptions, c.report.leaks);
    let (rt_offset, rt_clusters) = c.rebuild(out)?;
    // The references again, against the new structure: the old one is
    // now leaked, and its leaks are fixed (but, as in QEMU, not counted).
    // The file grew if the new structure went past its end.
    let file_len = out
        .metadata()
        .map_err(|e| crate::error::Error::io(r.path_ref(), "reading the file's length", e))?
        .len();
    let (mut c2, reftable) = calculate(r, rt_offset, rt_clusters, file_len)?;
    let structural = c2.report.corruptions;
    let before = c2.report.messages.len();
    c2.compare(&reftable)?;
    c2.report.messages.truncate(before);
    let mut still_broken = false;
    for m in c2.mismatches.clone() {
        if m.stored > m.computed {
            done.messages.push(m.line("Repairing"));
            c2.set_refcount(out, &reftable, m)?;
        } else {
            done.messages.push(m.line("ERROR"));
            still_broken |= m.stored == 0;
        }
    }
    if still_broken {
        done.messages
            .push("ERROR rebuilt refcount structure is still broken".into());
    }
    done.corruptions_fixed += old_corruptions.saturating_sub(structural);
    done.leaks_fixed += old_leaks;
    c2.report.corruptions = structural;
    c2.report.leaks = 0;
    let before = c2.report.messages.len();
    let fixed = c2.check_copied(&reftable, Some(out))?;
    done.corruptions_fixed += fixed;
    done.messages
        .extend(c2.report.messages[before..].iter().cloned());
    if c2.report.check_errors == 0 && c2.report.corruptions == 0 {
        mark_clean(r, out)?;
    }
    out.sync_all()
        .map_err(|e| crate::error::Error::io(r.path_ref(), "syncing the repaired image", e))?;
    Ok(done)
}

impl Checker<'_> {
    /// Sets `m`'s stored refcount to the references counted (one small
    /// write in its refcount block); a cluster freed gives its space back
    /// (QEMU discards it).
    fn set_refcount(&self, out: &File, reftable: &[u64], m: Mismatch) -> Result<()> {
        let bits = u64::from(self.h.refcount_bits());
        let per_block = self.cs * 8 / bits;
        let block = reftable[(m.cluster / per_block) as usize] & !REFT_RESERVED_MASK;
        let index = (m.cluster % per_block) as usize;
        write_refcount(out, self.r.path_ref(), block, index, bits, m.computed)?;
        if m.computed == 0 {
            punch_hole(out, m.cluster * self.cs, self.cs);
        }
        Ok(())
    }

    /// QEMU's `alloc_clusters_imrt`: `count` free clusters in a row in the
    /// counted references, from `*first_free` on (growing the table past
    /// the end of the file if need be), marked used; their offset.
    fn alloc_imrt(&mut self, count: u64, first_free: &mut u64) -> u64 {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut contiguous = 0u64;
        while cluster < self.refs.len() as u64 && contiguous < count {
            if self.refs[cluster as usize] == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            let new_len = cluster + count - contiguous;
            if (self.refs.len() as u64) < new_len {
                self.refs.resize(new_len as usize, 0);
            }
        }
        cluster -= contiguous;
        for i in cluster..cluster + count {
            self.refs[i as usize] = 1;
        }
        cluster * self.cs
    }

    /// QEMU's `rebuild_refcounts_write_refblocks`: writes the refcount
    /// block of every range of clusters in `[first, end)` that holds a
    /// used cluster, allocating those that `reftable` lacks; true when the
    /// table had to grow.
    fn write_refblocks(
        &mut self,
        out: &File,
        first: u64,
        end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<bool> {
        let bits = u64::from(self.h.refcount_bits());
        let per_block = self.cs * 8 / bits;
        let mut end = end;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.refs.get(cluster as usize).copied().unwrap_or(0) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / per_block;
            let start = index * per_block;
            let offset = match reftable.get(index as usize) {
                Some(&o) if o != 0 => o,
                _ => {
                    first_free = first_free.max(start);
                    let o = self.alloc_imrt(1, &mut first_free);
                    if o / self.cs >= end {
                        // The block that counts this block must be written.
                        end = o / self.cs + 1;
                    }
                    if reftable.len() as u64 <= index {
                        let entries = ((index + 1) * 8).div_ceil(self.cs) * self.cs / 8;
                        reftable.resize(entries as usize, 0);
                        grown = true;
                    }
                    reftable[index as usize] = o;
                    o
                }
            };
            let mut block = vec![0u8; self.cs as usize];
            for i in 0..per_block {
                let v = self.refs.get((start + i) as usize).copied().unwrap_or(0);
                if v != 0 {
                    super::writer::put_refcount(&mut block, i as usize, bits, v);
                }
            }
            crate::fileio::write_all_at(out, self.r.path_ref(), &block, offset)?;
            cluster = start + per_block;
        }
        Ok(grown)
    }

    /// QEMU's `rebuild_refcount_structure`: new refcount blocks and table
    /// from the counted references; returns the table's offset and size in
    /// clusters, now in the header.
    fn rebuild(&mut self, out: &File) -> Result<(u64, u32)> {
        let path = self.r.path_ref().to_path_buf();
        let mut reftable: Vec<u64> = Vec::new();
        let nb = self.refs.len() as u64;
        self.write_refblocks(out, 0, nb, &mut reftable)?;
        let (offset, clusters) = loop {
            let clusters = (reftable.len() as u64 * 8).div_ceil(self.cs);
            let mut first_free = 0;
            let offset = self.alloc_imrt(clusters, &mut first_free);
            let start = offset / self.cs;
            let grown = self.write_refblocks(out, start, start + clusters, &mut reftable)?;
            if !grown {
                break (offset, clusters);
            }
        };
        let bytes: Vec<u8> = reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        crate::fileio::write_all_at(out, &path, &bytes, offset)?;
        // Everything the new table names is on disk before the header
        // points at it.
        out.sync_all()
            .map_err(|e| crate::error::Error::io(&path, "syncing the new refcount structure", e))?;
        let clusters = u32::try_from(clusters).map_err(|_| {
            crate::error::Error::new(
                crate::error::ErrorKind::Unsupported,
                "the rebuilt refcount table would be too large",
            )
            .at_path(&path)
        })?;
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&offset.to_be_bytes());
        header[8..].copy_from_slice(&clusters.to_be_bytes());
        crate::fileio::write_all_at(out, &path, &header, 48)?;
        out.sync_all()
            .map_err(|e| crate::error::Error::io(&path, "syncing the header", e))?;
        Ok((offset, clusters))
    }
}

/// Sets the refcount at `index` of the refcount block at `block` to
/// `value`, writing only the bytes that hold it.
fn write_refcount(
    out: &File,
    path: &std::path::Path,
    block: u64,
    index: usize,
    bits: u64,
    value: u64,
) -> Result<()> {
    let bit = index as u64 * bits;
    let (first, len) = (bit / 8, bits.div_ceil(8));
    let mut bytes = vec![0u8; len as usize];
    read_up_to_at(out, path, &mut bytes, block + first)?;
    // Place the entry in a scratch block aligned like the real one.
    let mut scratch = vec![0u8; (first + len) as usize];
    scratch[first as usize..].copy_from_slice(&bytes);
    super::writer::put_refcount(&mut scratch, index, bits, value);
    crate::fileio::write_all_at(out, path, &scratch[first as usize..], block + first)
}

/// Gives a freed cluster's space back to the file system; advisory.
fn punch_hole(out: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate on a valid descriptor borrowed from `out`; it reads
    // and writes no memory of ours. Errors only mean the space stays used.
    unsafe {
        libc::fallocate(
            out.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        );
    }
}

impl Checker<'_> {
    fn corrupt(&mut self, message: String) {
        self.report.corruptions += 1;
        self.report.messages.push(message);
    }

    /// Counts a reference to every cluster of `[offset, offset + len)`.
    /// A region may end less than a cluster past the end of the file (a
    /// partly written last cluster); one reaching further is a corruption
    /// and is not counted.
    fn inc(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let beyond = i128::from(offset) + i128::from(len) - i128::from(self.file_len);
        if beyond >= i128::from(self.cs) {
            self.corrupt(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {len:#x}"
            ));
            return;
        }
        let (first, last) = (offset / self.cs, (offset + len - 1) / self.cs);
        for cl in first..=last {
            let i = cl as usize;
            if i >= self.refs.len() {
                self.refs.resize(i + 1, 0);
            }
            if self.refs[i] == self.max_refcount {
                self.corrupt(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    cl * self.cs
                ));
                self.report.messages.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into(),
                );
                continue;
            }
            self.refs[i] += 1;
        }
    }

    /// Reads big-endian u64s; bytes past the end of the file read as zero,
    /// as QEMU's block layer returns them.
    fn read_u64s(&self, offset: u64, n: usize) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; n * 8];
        if offset < self.file_len {
            read_up_to_at(self.file, self.r.path_ref(), &mut raw, offset)?;
        }
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    /// The snapshot table's length as QEMU counts it: up to the end of the
    /// last entry, without padding that entry to 8 bytes.
    fn snapshots_size(&self) -> Result<u64> {
        let Some(last) = self.r.snapshots().last() else {
            return Ok(0);
        };
        let mut fixed = [0u8; 40];
        read_up_to_at(self.file, self.r.path_ref(), &mut fixed, last.entry_offset)?;
        let id_len = u64::from(BigEndian::read_u16(&fixed[12..14]));
        let name_len = u64::from(BigEndian::read_u16(&fixed[14..16]));
        let extra = u64::from(BigEndian::read_u32(&fixed[36..40]));
        let end = last.entry_offset + 40 + extra + id_len + name_len;
        Ok(end - self.h.snapshots_offset)
    }

    fn check_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(l1_offset, u64::from(l1_size) * 8);
        let l1 = self.read_u64s(l1_offset, l1_size as usize)?;
        for &e in &l1 {
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            // An entry with flags but no offset still names cluster 0, and
            // a misaligned table is still read where it points: as QEMU.
            let l2 = e & OFFSET_MASK;
            self.inc(l2, self.cs);
            if !l2.is_multiple_of(self.cs) {
                self.corrupt(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(l2, active)?;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2: u64, active: bool) -> Result<()> {
        let ext = self.h.extended_l2();
        let per = if ext { 2 } else { 1 };
        let table = self.read_u64s(l2, (self.cs / 8) as usize)?;
        let external = self.r.has_external_data();
        // Fragmentation is counted within one L2 table.
        let mut next_contiguous = 0u64;
        for (i, pair) in table.chunks_exact(per).enumerate() {
            let mut e = pair[0];
            let bitmap = if ext { pair[1] } else { 0 };
            let k = kind(e, ext, external);
            if k != Kind::Compressed && e & L2E_STD_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
            }
            match k {
                Kind::Compressed => {
                    if e & OFLAG_COPIED != 0 {
                        self.corrupt(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            self.compressed.decode(e).0
                        ));
                        e &= !OFLAG_COPIED;
                    }
                    if external {
                        self.corrupt(format!(
                            "ERROR compressed cluster {i} with data file, entry={e:#x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.corrupt(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}"
                        ));
                        continue;
                    }
                    // The sector count includes the partial first sector.
                    let (off, sectors_len) = self.compressed.decode(e);
                    self.inc(off, sectors_len - (off & 511));
                    if active {
                        // Compressed clusters count as fragmented.
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                }
                Kind::Normal | Kind::ZeroAlloc => {
                    let host = e & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.corrupt(format!(
                            "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !host.is_multiple_of(self.cs) {
                        let data = if ext {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            e & OFLAG_ZERO == 0
                        };
                        self.corrupt(if data {
                            format!("ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                        } else {
                            format!("ERROR offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        });
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host + self.cs;
                    }
                    if !external {
                        self.inc(host, self.cs);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.corrupt(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string(),
                        );
                    }
                }
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
        if dir_offset < self.file_len {
            read_up_to_at(self.file, self.r.path_ref(), &mut dir, dir_offset)?;
        }
        let mut pos = 0usize;
        for _ in 0..count {
            if pos + 24 > dir.len() {
                self.corrupt("ERROR: bitmap directory entry runs past the directory".into());
                break;
            }
            let table_offset = BigEndian::read_u64(&dir[pos..]);
            let table_size = BigEndian::read_u32(&dir[pos + 8..]);
            let name_size = BigEndian::read_u16(&dir[pos + 18..]) as usize;
            let extra = BigEndian::read_u32(&dir[pos + 20..]) as usize;
            self.inc(table_offset, u64::from(table_size) * 8);
            if u64::from(table_size) * 8 <= 64 << 20 {
                for e in self.read_u64s(table_offset, table_size as usize)? {
                    let off = e & BME_OFFSET_MASK;
                    let bad = e & BME_RESERVED_MASK != 0
                        || (off != 0
                            && (e & BME_FLAG_ALL_ONES != 0 || !off.is_multiple_of(self.cs)));
                    if bad {
                        self.corrupt(format!("ERROR: invalid bitmap table entry {e:#x}"));
                        continue;
                    }
                    if off != 0 {
                        self.inc(off, self.cs);
                    }
                }
            }
            pos += (24 + extra + name_size).div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Counts the refcount blocks; each must be referenced exactly once.
    fn check_refblocks(&mut self, reftable: &[u64]) {
        for (i, &e) in reftable.iter().enumerate() {
            if e & REFT_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            let off = e & !REFT_RESERVED_MASK;
            if !off.is_multiple_of(self.cs) {
                self.corrupt(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            // Outside the clusters counted so far (the file, plus what
            // references just past its end added).
            if off / self.cs >= self.refs.len() as u64 {
                self.corrupt(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if off == 0 {
                continue;
            }
            self.inc(off, self.cs);
            let n = self.refs[(off / self.cs) as usize];
            if n != 1 {
                self.corrupt(format!("ERROR refcount block {i} refcount={n}"));
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
        let off = entry & !REFT_RESERVED_MASK;
        if off == 0 {
            return Ok(Some(0));
        }
        if !off.is_multiple_of(self.cs) {
            return Ok(None);
        }
        if cache.as_ref().is_none_or(|(o, _)| *o != off) {
            let mut block = vec![0u8; self.cs as usize];
            if off < self.file_len {
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

    /// Compares stored and computed refcounts of every counted cluster.
    fn compare(&mut self, reftable: &[u64]) -> Result<()> {
        let mut cache = None;
        let mut highest = 0;
        for c in 0..self.refs.len() as u64 {
            let Some(stored) = self.stored(reftable, c, &mut cache)? else {
                self.report.check_errors += 1;
                self.report
                    .messages
                    .push(format!("ERROR: Can't get refcount for cluster {c}"));
                continue;
            };
            let computed = self.refs[c as usize];
            if stored > 0 || computed > 0 {
                highest = c;
            }
            if stored != computed {
                self.mismatches.push(Mismatch {
                    cluster: c,
                    stored,
                    computed,
                });
            }
            if stored < computed {
                self.corrupt(format!(
                    "ERROR cluster {c} refcount={stored} reference={computed}"
                ));
            } else if stored > computed {
                self.report.leaks += 1;
                self.report.messages.push(format!(
                    "Leaked cluster {c} refcount={stored} reference={computed}"
                ));
            }
        }
        self.report.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// OFLAG_COPIED must be set exactly when a cluster's refcount is 1, in
    /// the active L1 table and its L2 tables. With `repair`, each entry in
    /// error is set right (one 8-byte write); returns how many.
    fn check_copied(&mut self, reftable: &[u64], repair: Option<&File>) -> Result<u64> {
        let mut fixed = 0;
        let word = if repair.is_some() {
            "Repairing"
        } else {
            "ERROR"
        };
        let mut cache = None;
        let l1 = self.r.l1.clone();
        let ext = self.h.extended_l2();
        let per = if ext { 2 } else { 1 };
        let external = self.r.has_external_data();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            // An unreadable refcount was reported by `compare`: skip the
            // table, as QEMU does.
            let Some(rc) = self.stored(reftable, l2 / self.cs, &mut cache)? else {
                continue;
            };
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                self.corrupt(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                if let Some(out) = repair {
                    let new = if rc == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    let at = self.h.l1_table_offset + 8 * i as u64;
                    crate::fileio::write_all_at(out, self.r.path_ref(), &new.to_be_bytes(), at)?;
                    self.report.corruptions -= 1;
                    fixed += 1;
                }
            }
            let table = self.read_u64s(l2, (self.cs / 8) as usize)?;
            for (j, pair) in table.chunks_exact(per).enumerate() {
                let entry = pair[0];
                if !matches!(kind(entry, ext, external), Kind::Normal | Kind::ZeroAlloc) {
                    continue;
                }
                let rc = if external {
                    Some(1)
                } else {
                    self.stored(reftable, (entry & OFFSET_MASK) / self.cs, &mut cache)?
                };
                if let Some(rc) = rc {
                    if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                        self.corrupt(format!(
                            "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                        ));
                        if let Some(out) = repair {
                            let new = if rc == 1 {
                                entry | OFLAG_COPIED
                            } else {
                                entry & !OFLAG_COPIED
                            };
                            let at = l2 + (j * per * 8) as u64;
                            crate::fileio::write_all_at(
                                out,
                                self.r.path_ref(),
                                &new.to_be_bytes(),
                                at,
                            )?;
                            self.report.corruptions -= 1;
                            fixed += 1;
                        }
                    }
                }
            }
        }
        Ok(fixed)
    }
}
