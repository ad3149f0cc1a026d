//! Resizing qcow2 images: growth within the L1 table's clusters is one
//! header write; everything else (a larger L1 table, preallocation, zero
//! clusters, a GPT moved, a shrink) is a [`Txn`], switched to in one.

use super::*;

pub(super) fn resize_qcow2(
    file: File,
    path: &Path,
    new: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    let mut h = [0u8; 80];
    read_exact_at(&file, path, &mut h, 0, "qcow2 header")?;
    if &h[0..4] != b"QFI\xfb" {
        return Err(invalid(path, "not a qcow2 image"));
    }
    let old = BigEndian::read_u64(&h[24..32]);
    let cluster_bits = BigEndian::read_u32(&h[20..24]);
    let l1_size = BigEndian::read_u32(&h[36..40]);
    let l1_offset = BigEndian::read_u64(&h[40..48]);
    let report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    let gpt_incomplete = || -> bool {
        open_as(path, DiskFormat::Qcow2)
            .ok()
            .is_some_and(|r| gpt_unfinished(r.as_ref()))
    };
    // Same size: only an unfinished GPT move (an interrupted run, or a
    // qemu-img resize) or a partition to grow is left to do.
    if new == old && opts.grow_partition.is_none() && !(opts.fix_gpt && gpt_incomplete()) {
        return Ok(report);
    }
    needs_shrink(path, old, new, opts)?;
    let version = BigEndian::read_u32(&h[4..8]);
    if version < 3 && BigEndian::read_u32(&h[60..64]) != 0 {
        // A version 2 snapshot does not record its disk size; QEMU then
        // cannot apply it to a disk of another size.
        return Err(unsupported(
            path,
            "a version 2 qcow2 with internal snapshots cannot change size (QEMU could not apply the snapshots afterwards); upgrade it with qemu-img amend -o compat=1.1 first",
        ));
    }
    if version >= 3 {
        let incompatible = BigEndian::read_u64(&h[72..80]);
        if incompatible & 1 != 0 {
            return Err(invalid(
                path,
                "the image is marked dirty (its refcounts may be stale, as after a crash with lazy_refcounts): repair it with qemu-img check -r all first",
            ));
        }
        if incompatible & 2 != 0 {
            return Err(invalid(
                path,
                "the image is marked corrupt: repair it with qemu-img check -r all first",
            ));
        }
        let mut more = [0u8; 8];
        read_exact_at(&file, path, &mut more, 88, "qcow2 header")?;
        let autoclear = BigEndian::read_u64(&more);
        if autoclear & 1 != 0 {
            return Err(unsupported(
                path,
                "the image has persistent dirty bitmaps, whose tables would have to grow too; not supported yet (remove them with qemu-img bitmap --remove, or use qemu-img resize)",
            ));
        }
        if incompatible & (1 << 2) != 0 {
            return Err(unsupported(
                path,
                "the image keeps its data in an external data file, which would have to grow too; not supported yet",
            ));
        }
    }
    let reader = open_as(path, DiskFormat::Qcow2)?;
    // Version 3 images may have extended L2 entries (16 bytes each).
    let extended_l2 =
        BigEndian::read_u32(&h[4..8]) >= 3 && BigEndian::read_u64(&h[72..80]) & (1 << 4) != 0;
    if new < old {
        return shrink_qcow2(&file, path, old, new, opts, reader, extended_l2);
    }
    // A GPT inside follows the new end: planned (and checked) now.
    let gpt_plan = gpt_plan_inside(reader.as_ref(), path, old, new, opts, "a qcow2")?;
    if gpt_plan.is_some() && extended_l2 {
        return Err(unsupported(
            path,
            "moving a GPT inside a qcow2 with extended L2 entries is not supported yet: pass --no-fix-gpt",
        ));
    }
    let cs = 1u64 << cluster_bits;
    let per_l2 = cs / if extended_l2 { 16 } else { 8 };
    let need = new.div_ceil(cs * per_l2);
    if need > u64::from(u32::MAX) || need * 8 > 32 << 20 {
        return Err(invalid(
            path,
            format!("{new} bytes needs an L1 table larger than QEMU allows"),
        ));
    }
    // The new space must read as zeros: where a longer backing file would
    // show through, its clusters are marked zero (version 3), like QEMU.
    let backing_len = reader.backing().map_or(0, |b| b.size());
    let zero_to = if backing_len > old {
        backing_len.min(new)
    } else {
        old
    };
    if zero_to > old && version < 3 && opts.prealloc == Prealloc::Off {
        return Err(unsupported(
            path,
            format!(
                "the backing file is {backing_len} bytes, longer than the image, and a version 2 qcow2 cannot mark the new clusters as zero, so its data would show through; upgrade with qemu-img amend -o compat=1.1, or grow with --preallocation metadata"
            ),
        ));
    }
    let fill = opts.prealloc != Prealloc::Off || zero_to > old;
    if fill && extended_l2 {
        return Err(unsupported(
            path,
            "preallocating or zeroing new space in a qcow2 with extended L2 entries is not supported yet",
        ));
    }
    let room = (u64::from(l1_size) * 8).div_ceil(cs) * cs / 8;
    let move_l1 = need > room;
    let need = need as u32;
    // Bytes a shrink left after the end, in the cluster the old end falls
    // in, must not reappear (qemu-img resize shows them again).
    let mut txn = Txn::new(&file, path, reader, old)?;
    let fill = fill || (!extended_l2 && txn.tail_state()?.0);
    let plain = !move_l1 && gpt_plan.is_none() && !fill;
    if plain {
        // Metadata only, nothing allocated: the L1 slack zeroed, then the
        // size and l1_size (bytes 24..40) in one write.
        zero_l1_slack(&file, path, l1_offset, l1_size, need)?;
        let mut upd = [0u8; 16];
        upd.copy_from_slice(&h[24..40]);
        BigEndian::write_u64(&mut upd[0..8], new);
        BigEndian::write_u32(&mut upd[12..16], need.max(l1_size));
        write_all_at(&file, path, &upd, 24)?;
        sync(&file, path)?;
        return Ok(report);
    }
    // One transaction: the new size (with a larger L1 table when needed),
    // the new space and a moved GPT, switched to in one header write.
    // Everything new goes to clusters past the old end: when it fails
    // before the switch (out of space, an I/O error), the file is cut back
    // to its old length and the image is as it was.
    let old_len = file_len(&file, path)?;
    let mut report = report;
    let done = (|| -> Result<()> {
        txn.set_size(new, u64::from(need.max(l1_size)));
        if fill {
            txn.fill_new_space(new, zero_to, opts.prealloc)?;
        }
        if let Some(plan) = gpt_plan {
            // The moved GPT joins the same switch: the old disk with its
            // old table, or the new disk with the new one.
            txn.atomic = true;
            apply_gpt(&mut txn, &plan)?;
            report.gpt_moved = true;
            report.partition_grown = plan.grown;
        }
        txn.commit()
    })();
    if let Err(e) = done {
        let mut now = [0u8; 80];
        let unswitched =
            read_exact_at(&file, path, &mut now, 0, "qcow2 header").is_ok() && now == h;
        if unswitched && file.set_len(old_len).is_ok() {
            let _ = sync(&file, path);
        }
        return Err(e);
    }
    Ok(report)
}

/// Zeroes the L1 entries past the old `l1_size` up to `need` (they must
/// read as "unallocated" once the header counts them), synced.
fn zero_l1_slack(file: &File, path: &Path, l1_offset: u64, l1_size: u32, need: u32) -> Result<()> {
    if need <= l1_size {
        return Ok(());
    }
    let zeros = vec![0u8; (u64::from(need - l1_size) * 8) as usize];
    write_all_at(file, path, &zeros, l1_offset + u64::from(l1_size) * 8)?;
    sync(file, path)?;
    step();
    Ok(())
}

/// A change to a qcow2 image's metadata, made copy-on-write: the L1
/// table, the refcount table and every L2 table and refcount block that
/// changes are written as new copies into free clusters (free in the image
/// as committed, never one the old image uses) or past the end of the
/// file, and one write of header bytes 24..60 (size, l1_size,
/// l1_table_offset, refcount_table_offset, refcount_table_clusters: one
/// sector) switches to them. Until the switch the new clusters are free
/// space to the image (unreferenced, refcount 0); after it the old
/// structures are free space to the new one. A kill at any point leaves
/// one image or the other, and neither leaks a cluster. Guest data goes
/// into clusters the image owns alone in place (or, when the whole change
/// must be one switch, into copies), and otherwise (shared with an internal
/// snapshot, compressed, unallocated) into new clusters.
pub(super) struct Txn<'a> {
    file: &'a File,
    path: &'a Path,
    /// The image as it was, for the old bytes of clusters copied on write.
    reader: Box<dyn ImageReader>,
    /// The guest size `reader` knows.
    old_size: u64,
    cs: u64,
    refcount_bits: u64,
    layout: crate::qcow2::reader::CompressedLayout,
    /// The image as last committed.
    size: u64,
    l1_offset: u64,
    l1_size: u64,
    rt_offset: u64,
    rt_clusters: u64,
    /// What the next commit writes: the size and L1 size…
    new_size: u64,
    new_l1_size: u64,
    /// …the L1 table (changes included) and whether it changed…
    l1: Vec<u64>,
    l1_dirty: bool,
    /// …the refcount table (entries of relocated blocks included)…
    rt: Vec<u64>,
    /// …refcount blocks by index (read once; the changed ones listed)…
    rb: std::collections::BTreeMap<u64, Vec<u8>>,
    rb_dirty: std::collections::BTreeSet<u64>,
    /// Refcount table entries dropped (the table is rewritten).
    rt_dirty: bool,
    /// …and the L2 tables made or copied: L1 index → (host, entries; empty
    /// once written out early).
    l2: std::collections::BTreeMap<u64, (u64, Vec<u64>)>,
    /// Where the next cluster is allocated, and where this transaction's
    /// clusters begin (everything from there on is new).
    file_end: u64,
    base_end: u64,
    /// Clusters below `base_end` this transaction took (new, like the
    /// ones past it), clusters it freed (the old image may use them until
    /// the switch), and where to look for free clusters next.
    reused: std::collections::BTreeSet<u64>,
    freed: std::collections::BTreeSet<u64>,
    free_hint: u64,
    /// One switch for everything: guest writes copy even the image's own
    /// clusters, and [`GuestSink::sync`] waits for [`Txn::commit`].
    pub(super) atomic: bool,
}

/// QEMU's limits on the refcount table (`QCOW_MAX_REFTABLE_SIZE`) and the
/// L1 table (`QCOW_MAX_L1_SIZE`).
use crate::qcow2::header::{MAX_L1_BYTES, MAX_REFTABLE_BYTES};

pub(super) const OFFSET_MASK: u64 = crate::qcow2::reader::OFFSET_MASK;
pub(super) const OFLAG_COPIED: u64 = crate::qcow2::reader::OFLAG_COPIED;
pub(super) const OFLAG_COMPRESSED: u64 = crate::qcow2::reader::OFLAG_COMPRESSED;
pub(super) const OFLAG_ZERO: u64 = crate::qcow2::reader::OFLAG_ZERO;

impl<'a> Txn<'a> {
    pub(super) fn new(
        file: &'a File,
        path: &'a Path,
        reader: Box<dyn ImageReader>,
        old_size: u64,
    ) -> Result<Self> {
        let mut b = [0u8; 104];
        read_exact_at(file, path, &mut b, 0, "qcow2 header")?;
        let cluster_bits = BigEndian::read_u32(&b[20..24]);
        let cs = 1u64 << cluster_bits;
        let version = BigEndian::read_u32(&b[4..8]);
        let order = if version >= 3 {
            BigEndian::read_u32(&b[96..100])
        } else {
            4
        };
        let l1_size = u64::from(BigEndian::read_u32(&b[36..40]));
        let l1_offset = BigEndian::read_u64(&b[40..48]);
        let rt_offset = BigEndian::read_u64(&b[48..56]);
        let rt_clusters = u64::from(BigEndian::read_u32(&b[56..60]));
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("an L1 table of {l1_size} entries is more than QEMU's 32 MiB limit"),
            ));
        }
        if rt_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(invalid(
                path,
                format!(
                    "the refcount table has {rt_clusters} clusters, more than QEMU's 8 MiB limit"
                ),
            ));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        read_exact_at(file, path, &mut raw, l1_offset, "L1 table")?;
        let l1 = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        let mut raw = vec![0u8; (rt_clusters * cs) as usize];
        read_exact_at(file, path, &mut raw, rt_offset, "refcount table")?;
        let rt = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        let size = BigEndian::read_u64(&b[24..32]);
        let file_end = file_len(file, path)?.div_ceil(cs) * cs;
        Ok(Txn {
            file,
            path,
            reader,
            old_size,
            cs,
            refcount_bits: 1 << order,
            layout: crate::qcow2::reader::CompressedLayout::new(cluster_bits),
            size,
            l1_offset,
            l1_size,
            rt_offset,
            rt_clusters,
            new_size: size,
            new_l1_size: l1_size,
            l1,
            l1_dirty: false,
            rt,
            rb: Default::default(),
            rb_dirty: Default::default(),
            rt_dirty: false,
            l2: Default::default(),
            file_end,
            base_end: file_end,
            reused: Default::default(),
            freed: Default::default(),
            free_hint: 0,
            atomic: false,
        })
    }

    fn be64(&self, at: u64, what: &str) -> Result<u64> {
        let mut e = [0u8; 8];
        read_exact_at(self.file, self.path, &mut e, at, what)?;
        Ok(BigEndian::read_u64(&e))
    }

    /// Guest bytes one L2 table maps.
    fn l2_coverage(&self) -> u64 {
        self.cs * (self.cs / 8)
    }

    /// The size and L1 size the next commit gives the image.
    pub(super) fn set_size(&mut self, size: u64, l1_size: u64) {
        self.new_size = size;
        self.new_l1_size = l1_size.max(self.new_l1_size);
        if self.l1.len() < self.new_l1_size as usize {
            self.l1.resize(self.new_l1_size as usize, 0);
        }
    }

    fn l1_entry(&self, i: u64) -> u64 {
        self.l1.get(i as usize).copied().unwrap_or(0)
    }

    fn set_l1(&mut self, i: u64, e: u64) {
        if self.l1.len() <= i as usize {
            self.l1.resize(i as usize + 1, 0);
        }
        self.l1[i as usize] = e;
        self.new_l1_size = self.new_l1_size.max(i + 1);
        self.l1_dirty = true;
    }

    /// Refcount block `bi` (read once; zeros for one not there yet).
    fn block(&mut self, bi: u64) -> Result<&mut Vec<u8>> {
        if !self.rb.contains_key(&bi) {
            let at = self.rt.get(bi as usize).copied().unwrap_or(0) & OFFSET_MASK;
            let mut b = vec![0u8; self.cs as usize];
            if at != 0 {
                read_exact_at(self.file, self.path, &mut b, at, "refcount block")?;
            }
            self.rb.insert(bi, b);
        }
        Ok(self.rb.get_mut(&bi).expect("inserted above"))
    }

    /// The refcount of the cluster at `host` (this transaction's changes
    /// included).
    pub(super) fn refcount(&mut self, host: u64) -> Result<u64> {
        let per_block = self.cs * 8 / self.refcount_bits;
        let index = host / self.cs;
        let bi = index / per_block;
        if bi >= self.rt.len() as u64 && !self.rb.contains_key(&bi) {
            return Ok(0);
        }
        let bits = self.refcount_bits;
        let b = self.block(bi)?;
        Ok(crate::qcow2::writer::get_refcount(
            b,
            (index % per_block) as usize,
            bits,
        ))
    }

    fn set_refcount(&mut self, host: u64, value: u64) -> Result<()> {
        let per_block = self.cs * 8 / self.refcount_bits;
        let index = host / self.cs;
        let bi = index / per_block;
        if bi >= self.rt.len() as u64 {
            self.rt.resize(bi as usize + 1, 0);
        }
        let bits = self.refcount_bits;
        let b = self.block(bi)?;
        crate::qcow2::writer::put_refcount(b, (index % per_block) as usize, bits, value);
        self.rb_dirty.insert(bi);
        Ok(())
    }

    /// Drops one count of the cluster at `host` (the active image stops
    /// using it; freed when nothing else, such as a snapshot, holds it).
    fn release(&mut self, host: u64) -> Result<()> {
        let rc = self.refcount(host)?;
        if rc == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "cluster {host:#x} is in use but its refcount is 0; run qemu-img check -r all"
                ),
            )
            .at_path(self.path));
        }
        if rc == 1 {
            self.freed.insert(host);
        }
        self.set_refcount(host, rc - 1)
    }

    /// `n` free clusters in a row, counted once: the first run free in
    /// the image as committed (and not freed by this transaction, whose
    /// old image may still use it), else at the end of the file.
    fn alloc_run(&mut self, n: u64) -> Result<u64> {
        if let Some(start) = self.find_free(n)? {
            for k in 0..n {
                self.set_refcount(start + k * self.cs, 1)?;
                self.reused.insert(start + k * self.cs);
            }
            return Ok(start);
        }
        self.alloc_at_end(n)
    }

    /// `n` clusters in a row at the end of the file (never used before:
    /// they read as zeros until written).
    fn alloc_at_end(&mut self, n: u64) -> Result<u64> {
        'search: loop {
            let start = self.file_end;
            for k in 0..n {
                if self.refcount(start + k * self.cs)? != 0 {
                    // Counted past the end of the file: skipped, as QEMU does.
                    self.file_end = start + (k + 1) * self.cs;
                    continue 'search;
                }
            }
            self.file_end = start + n * self.cs;
            for k in 0..n {
                self.set_refcount(start + k * self.cs, 1)?;
            }
            return Ok(start);
        }
    }

    /// The first run of `n` clusters inside the file (below where this
    /// transaction began appending) that nothing counts, scanning the
    /// refcount blocks from a hint.
    fn find_free(&mut self, n: u64) -> Result<Option<u64>> {
        let cs = self.cs;
        let per_block = cs * 8 / self.refcount_bits;
        let end = self.base_end / cs;
        let mut idx = self.free_hint / cs;
        let mut run: Option<(u64, u64)> = None;
        let mut buf = vec![0u8; cs as usize];
        while idx < end {
            let bi = idx / per_block;
            let at = self.rt.get(bi as usize).copied().unwrap_or(0) & OFFSET_MASK;
            let content: &[u8] = match self.rb.get(&bi) {
                Some(b) => b,
                None if at == 0 => {
                    buf.fill(0);
                    &buf
                }
                None => {
                    read_exact_at(self.file, self.path, &mut buf, at, "refcount block")?;
                    &buf
                }
            };
            let upto = ((bi + 1) * per_block).min(end);
            for i in idx..upto {
                let c = i * cs;
                let rc = crate::qcow2::writer::get_refcount(
                    content,
                    (i % per_block) as usize,
                    self.refcount_bits,
                );
                if rc == 0 && !self.freed.contains(&c) {
                    let (s, len) = run.map_or((c, 1), |(s, l)| (s, l + 1));
                    if len == n {
                        if n == 1 {
                            self.free_hint = c + cs;
                        }
                        return Ok(Some(s));
                    }
                    run = Some((s, len));
                } else {
                    run = None;
                }
            }
            idx = upto;
        }
        if n == 1 {
            self.free_hint = self.base_end;
        }
        Ok(None)
    }

    pub(super) fn alloc(&mut self) -> Result<u64> {
        self.alloc_run(1)
    }

    /// The L2 entry for guest offset `g` (this transaction's changes
    /// included).
    pub(super) fn l2_entry(&mut self, g: u64) -> Result<u64> {
        let cov = self.l2_coverage();
        let (l1i, l2i) = (g / cov, (g % cov) / self.cs);
        if let Some((t, entries)) = self.l2.get(&l1i) {
            return match entries.is_empty() {
                false => Ok(entries[l2i as usize]),
                true => self.be64(t + l2i * 8, "L2 table"),
            };
        }
        let l2 = self.l1_entry(l1i) & OFFSET_MASK;
        if l2 == 0 {
            return Ok(0);
        }
        self.be64(l2 + l2i * 8, "L2 table")
    }

    /// The L2 table for L1 index `l1i` as a new copy in this transaction
    /// (a new empty one where there is none). A copy of a table an internal
    /// snapshot shares marks with OFLAG_COPIED only the clusters the active
    /// image alone holds; the data clusters keep their counts (qcow2 counts
    /// a cluster once per table path, and the copy replaces one path).
    fn own_table(&mut self, l1i: u64) -> Result<()> {
        if self.l2.contains_key(&l1i) {
            return Ok(());
        }
        let l1e = self.l1_entry(l1i);
        let old = l1e & OFFSET_MASK;
        let mut entries = vec![0u64; (self.cs / 8) as usize];
        if old != 0 {
            let mut raw = vec![0u8; self.cs as usize];
            read_exact_at(self.file, self.path, &mut raw, old, "L2 table")?;
            for (k, e) in raw.chunks_exact(8).map(BigEndian::read_u64).enumerate() {
                let host = e & OFFSET_MASK;
                entries[k] = if l1e & OFLAG_COPIED == 0 && e & OFLAG_COMPRESSED == 0 && host != 0 {
                    let flag = if self.refcount(host)? == 1 {
                        OFLAG_COPIED
                    } else {
                        0
                    };
                    (e & !OFLAG_COPIED) | flag
                } else {
                    e
                };
            }
            self.release(old)?;
        }
        let t = self.alloc()?;
        self.l2.insert(l1i, (t, entries));
        self.set_l1(l1i, t | OFLAG_COPIED);
        Ok(())
    }

    /// Sets the L2 entry for guest offset `g` (in this transaction's copy
    /// of its table).
    fn set_l2(&mut self, g: u64, value: u64) -> Result<()> {
        let cov = self.l2_coverage();
        let (l1i, l2i) = (g / cov, (g % cov) / self.cs);
        self.own_table(l1i)?;
        let (t, entries) = self.l2.get_mut(&l1i).expect("owned above");
        if entries.is_empty() {
            // Written out early; the copy is not part of the image yet.
            let mut e = [0u8; 8];
            BigEndian::write_u64(&mut e, value);
            write_all_at(self.file, self.path, &e, *t + l2i * 8)
        } else {
            entries[l2i as usize] = value;
            Ok(())
        }
    }

    /// Drops the active image's use of what an L2 entry points at.
    fn release_entry(&mut self, e: u64) -> Result<()> {
        if e & OFLAG_COMPRESSED != 0 {
            let (off, len) = self.layout.decode(e & !OFLAG_COMPRESSED);
            let start = off & !511;
            let mut c = start / self.cs * self.cs;
            while c < start + len {
                self.release(c)?;
                c += self.cs;
            }
        } else if e & OFFSET_MASK != 0 {
            self.release(e & OFFSET_MASK)?;
        }
        Ok(())
    }

    /// Writes a new L2 table out now and keeps only its place, so that
    /// memory stays bounded however much is preallocated.
    fn flush_table(&mut self, l1i: u64) -> Result<()> {
        if let Some((t, entries)) = self.l2.get_mut(&l1i) {
            if !entries.is_empty() {
                let mut b = vec![0u8; self.cs as usize];
                for (k, e) in entries.iter().enumerate() {
                    BigEndian::write_u64(&mut b[k * 8..k * 8 + 8], *e);
                }
                write_all_at(self.file, self.path, &b, *t)?;
                *entries = Vec::new();
            }
        }
        Ok(())
    }

    /// The part of the cluster the old end falls in that lies past the end:
    /// (something other than zeros is stored there — a longer backing file,
    /// or bytes a shrink left —, the cluster is unallocated).
    pub(super) fn tail_state(&mut self) -> Result<(bool, bool)> {
        let (cs, old) = (self.cs, self.old_size);
        let c = old / cs * cs;
        if c == old {
            return Ok((false, false));
        }
        let tail = (c + cs - old) as usize;
        let entry = self.l2_entry(c)?;
        let host = entry & OFFSET_MASK;
        let mut stored = vec![0u8; tail];
        let unallocated = host == 0 && entry & OFLAG_ZERO == 0;
        if entry & OFLAG_COMPRESSED != 0 {
            // What a compressed cluster holds past the end is not known
            // without inflating it: rewritten to be sure.
            return Ok((true, false));
        } else if entry & OFLAG_ZERO != 0 {
            // Reads as zeros.
        } else if host != 0 {
            read_exact_at(
                self.file,
                self.path,
                &mut stored,
                host + (old - c),
                "cluster",
            )?;
        } else if unallocated {
            if let Some(b) = self.reader.backing() {
                let upto = b.size().min(c + cs);
                if upto > old {
                    b.read_at(&mut stored[..(upto - old) as usize], old)?;
                }
            }
        }
        Ok((stored.iter().any(|&x| x != 0), unallocated))
    }

    /// Makes the space past the old end read as zeros and, with
    /// preallocation, allocates it: the cluster the old end falls in gets
    /// zeros after the end (only when something else is stored there — a
    /// longer backing file, or bytes left by a shrink); whole clusters up to
    /// `new` are allocated (`prealloc`), or marked zero up to `zero_to`
    /// (where a longer backing file would show through). Data clusters are
    /// reserved (`metadata`), fallocated (`falloc`) or written with zeros
    /// (`full`).
    pub(super) fn fill_new_space(
        &mut self,
        new: u64,
        zero_to: u64,
        prealloc: Prealloc,
    ) -> Result<()> {
        let cs = self.cs;
        let old = self.old_size;
        let first_new = self.file_end;
        let c = old / cs * cs;
        if c < old {
            let (dirty, unallocated) = self.tail_state()?;
            if dirty || (prealloc != Prealloc::Off && unallocated) {
                self.write(old, &vec![0u8; (c + cs - old) as usize])?;
            }
        }
        let end = match prealloc {
            Prealloc::Off => zero_to,
            _ => new,
        };
        let mut g = old.div_ceil(cs) * cs;
        let mut last_l1 = None;
        let mut run: Option<(u64, u64)> = None;
        while g < end {
            let l1i = g / self.l2_coverage();
            if let Some(prev) = last_l1.filter(|&p| p != l1i) {
                self.flush_table(prev)?;
            }
            last_l1 = Some(l1i);
            let entry = self.l2_entry(g)?;
            if entry != 0 {
                return Err(unsupported(
                    self.path,
                    format!(
                        "the L2 entry for guest offset {g:#x}, past the image's end, is in use ({entry:#x}); qemu-img check -r all may clean it up"
                    ),
                ));
            }
            let value = match prealloc {
                Prealloc::Off => OFLAG_ZERO,
                _ => {
                    // Past the old end of the file: reads as zeros (a
                    // reused cluster could show old bytes).
                    let data = self.alloc_at_end(1)?;
                    if prealloc == Prealloc::Full {
                        // Contiguous data clusters are zeroed as one run.
                        match &mut run {
                            Some((_, e)) if *e == data => *e += cs,
                            _ => {
                                if let Some((s, e)) = run.replace((data, data + cs)) {
                                    self.write_zeros(s, e)?;
                                }
                            }
                        }
                    }
                    data | OFLAG_COPIED
                }
            };
            self.set_l2(g, value)?;
            g += cs;
        }
        if let Some((s, e)) = run {
            self.write_zeros(s, e)?;
        }
        // Everything appended: reserved in the file (tables and refcount
        // blocks are written over it at the commit).
        let end = self.file_end;
        if end > first_new {
            match prealloc {
                Prealloc::Off | Prealloc::Full => {}
                Prealloc::Metadata => {
                    if file_len(self.file, self.path)? < end {
                        self.file
                            .set_len(end)
                            .map_err(|e| Error::io(self.path, "extending the image", e))?;
                    }
                }
                Prealloc::Falloc => {
                    crate::raw::fallocate(self.file, self.path, first_new, end - first_new)?
                }
            }
        }
        Ok(())
    }

    /// Writes zeros over host bytes [from, to), a MiB at a time.
    fn write_zeros(&self, from: u64, to: u64) -> Result<()> {
        let zeros = vec![0u8; (to - from).min(1 << 20) as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeros.len() as u64);
            write_all_at(self.file, self.path, &zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    /// Drops every reference past guest byte `new`: L1 entries of tables
    /// wholly past it (the table and what it maps lose the active image's
    /// count), and the entries past it in the table it falls in (copied).
    fn drop_past(&mut self, new: u64) -> Result<()> {
        let cs = self.cs;
        let per_l2 = cs / 8;
        let first_gone = new.div_ceil(cs);
        let last = self
            .size
            .div_ceil(cs)
            .div_ceil(per_l2)
            .max(self.l1.len() as u64);
        for i in first_gone / per_l2..last {
            let l1e = self.l1_entry(i);
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 && !self.l2.contains_key(&i) {
                continue;
            }
            if i * per_l2 >= first_gone {
                self.flush_table(i)?;
                let t = self.l2.remove(&i).map_or(l2, |(t, _)| t);
                let mut raw = vec![0u8; cs as usize];
                read_exact_at(self.file, self.path, &mut raw, t, "L2 table")?;
                for e in raw.chunks_exact(8).map(BigEndian::read_u64) {
                    self.release_entry(e)?;
                }
                self.release(t)?;
                self.set_l1(i, 0);
            } else {
                let from = first_gone - i * per_l2;
                let mut gone = Vec::new();
                for j in from..per_l2 {
                    let e = self.l2_entry(i * per_l2 * cs + j * cs)?;
                    if e != 0 {
                        gone.push((j, e));
                    }
                }
                for (j, e) in gone {
                    self.set_l2(i * per_l2 * cs + j * cs, 0)?;
                    self.release_entry(e)?;
                }
            }
        }
        Ok(())
    }

    /// After a shrink: the L1 table, refcount table and refcount blocks
    /// that lie past everything else in use move further in (one more
    /// transaction, into clusters freed before), then the file is cut
    /// after its last cluster in use, as QEMU does.
    pub(super) fn trim(&mut self) -> Result<()> {
        let cs = self.cs;
        // Refcount blocks that count nothing (but maybe themselves) go, as
        // QEMU drops them after a shrink.
        let per_block = cs * 8 / self.refcount_bits;
        let mut dropped = false;
        for bi in 0..self.rt.len() as u64 {
            let at = self.rt[bi as usize] & OFFSET_MASK;
            if at == 0 {
                continue;
            }
            let own = (at / cs / per_block == bi).then_some((at / cs) % per_block);
            let bits = self.refcount_bits;
            let b = self.block(bi)?;
            let empty = (0..per_block).all(|j| {
                Some(j) == own || crate::qcow2::writer::get_refcount(b, j as usize, bits) == 0
            });
            if empty {
                self.rt[bi as usize] = 0;
                self.rb.remove(&bi);
                self.rb_dirty.remove(&bi);
                if own.is_none() {
                    self.release(at)?;
                }
                dropped = true;
            }
        }
        if dropped {
            self.rt_dirty = true;
            self.commit()?;
        }
        let l1_clusters = (self.l1_size * 8).div_ceil(cs);
        let mut meta: std::collections::BTreeSet<u64> =
            (0..l1_clusters).map(|k| self.l1_offset + k * cs).collect();
        meta.extend((0..self.rt_clusters).map(|k| self.rt_offset + k * cs));
        meta.extend(self.rt.iter().map(|e| e & OFFSET_MASK).filter(|&a| a != 0));
        let mut limit = cs;
        let mut c = self.file_end;
        while c > cs {
            c -= cs;
            if !meta.contains(&c) && self.refcount(c)? != 0 {
                limit = c + cs;
                break;
            }
        }
        // Tables past everything else move further in, when there is room
        // for their copies before the last of them (else the copies would
        // only make the file longer).
        let moving = meta.iter().filter(|&&m| m >= limit).count() as u64;
        let last = meta.iter().copied().max().unwrap_or(0);
        let needed = l1_clusters + self.rt_clusters + self.rt_clusters / 4 + moving + 2;
        let mut free = 0;
        let mut c = 0;
        while c < last && free < needed {
            if self.refcount(c)? == 0 {
                free += 1;
            }
            c += cs;
        }
        if moving > 0 && free >= needed {
            self.l1_dirty |= (0..l1_clusters).any(|k| self.l1_offset + k * cs >= limit);
            for bi in 0..self.rt.len() as u64 {
                let at = self.rt[bi as usize] & OFFSET_MASK;
                if at >= limit || (bi == 0 && self.rt_offset + self.rt_clusters * cs > limit) {
                    // Block 0 stands for the table: moving any block moves it.
                    self.block(bi)?;
                    self.rb_dirty.insert(bi);
                }
            }
            self.commit()?;
        }
        let mut end = self.file_end;
        while end > cs && self.refcount(end - cs)? == 0 {
            end -= cs;
        }
        if end < file_len(self.file, self.path)? {
            self.file
                .set_len(end)
                .map_err(|e| Error::io(self.path, "cutting the image's free end", e))?;
            sync(self.file, self.path)?;
            self.file_end = end;
            self.base_end = end;
        }
        Ok(())
    }

    fn dirty(&self) -> bool {
        self.l1_dirty
            || self.rt_dirty
            || !self.rb_dirty.is_empty()
            || !self.l2.is_empty()
            || self.new_size != self.size
            || self.new_l1_size != self.l1_size
    }

    /// Writes the new structures, syncs, and switches the header to them
    /// (bytes 24..60, one write), synced.
    pub(super) fn commit(&mut self) -> Result<()> {
        if !self.dirty() {
            return sync(self.file, self.path);
        }
        let cs = self.cs;
        // 1. The L2 tables.
        for (t, entries) in self.l2.values() {
            if entries.is_empty() {
                continue; // written out already
            }
            let mut b = vec![0u8; cs as usize];
            for (k, e) in entries.iter().enumerate() {
                BigEndian::write_u64(&mut b[k * 8..k * 8 + 8], *e);
            }
            write_all_at(self.file, self.path, &b, *t)?;
        }
        // 2. The L1 table: a new copy when it changed or outgrew its
        // clusters; otherwise its slack is zeroed (past l1_size, unseen).
        if self.new_l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid(
                self.path,
                format!(
                    "{} bytes needs an L1 table larger than QEMU allows",
                    self.new_size
                ),
            ));
        }
        let room = (self.l1_size * 8).div_ceil(cs) * cs / 8;
        let l1_clusters = (self.new_l1_size * 8).div_ceil(cs);
        let l1_at = if self.l1_dirty || self.new_l1_size > room {
            let at = self.alloc_run(l1_clusters)?;
            for k in 0..(self.l1_size * 8).div_ceil(cs) {
                self.release(self.l1_offset + k * cs)?;
            }
            at
        } else {
            self.l1_offset
        };
        // 3. Refcount blocks, each changed one to a new cluster, and the
        // refcount table, to a fixed point (placing a block or the table
        // changes counts in turn).
        let mut rt_at = (self.rt_offset, self.rt_clusters);
        if !self.rb_dirty.is_empty() || self.rt_dirty {
            for k in 0..self.rt_clusters {
                self.release(self.rt_offset + k * cs)?;
            }
            let mut placed = std::collections::BTreeSet::new();
            let mut table: Option<(u64, u64)> = None;
            loop {
                let pending: Vec<u64> = self
                    .rb_dirty
                    .iter()
                    .copied()
                    .filter(|bi| !placed.contains(bi))
                    .collect();
                if pending.is_empty() {
                    let need = (self.rt.len() as u64 * 8).div_ceil(cs).max(1);
                    match table {
                        Some((_, have)) if have >= need => break,
                        Some((at, have)) => {
                            // Outgrown while placing blocks: a larger one
                            // (this one was never part of any image).
                            for k in 0..have {
                                self.release(at + k * cs)?;
                            }
                        }
                        None => {}
                    }
                    let clusters = need + need / 4;
                    if clusters * cs > MAX_REFTABLE_BYTES {
                        return Err(unsupported(
                            self.path,
                            "the refcount table would grow past QEMU's 8 MiB limit",
                        ));
                    }
                    table = Some((self.alloc_run(clusters)?, clusters));
                    continue;
                }
                for bi in pending {
                    let old = self.rt.get(bi as usize).copied().unwrap_or(0) & OFFSET_MASK;
                    let at = self.alloc()?;
                    if old != 0 {
                        self.release(old)?;
                    }
                    self.rt[bi as usize] = at;
                    placed.insert(bi);
                }
            }
            let (at, clusters) = table.expect("placed above");
            for bi in &self.rb_dirty {
                write_all_at(self.file, self.path, &self.rb[bi], self.rt[*bi as usize])?;
            }
            let mut t = vec![0u8; (clusters * cs) as usize];
            for (k, e) in self.rt.iter().enumerate() {
                BigEndian::write_u64(&mut t[k * 8..k * 8 + 8], *e);
            }
            write_all_at(self.file, self.path, &t, at)?;
            rt_at = (at, clusters);
        }
        // 4. The L1 table.
        if l1_at != self.l1_offset {
            let mut t = vec![0u8; (l1_clusters * cs) as usize];
            for (k, e) in self.l1.iter().take(self.new_l1_size as usize).enumerate() {
                BigEndian::write_u64(&mut t[k * 8..k * 8 + 8], *e);
            }
            write_all_at(self.file, self.path, &t, l1_at)?;
        } else if self.new_l1_size > self.l1_size {
            let zeros = vec![0u8; ((self.new_l1_size - self.l1_size) * 8) as usize];
            write_all_at(self.file, self.path, &zeros, l1_at + self.l1_size * 8)?;
        }
        sync(self.file, self.path)?;
        step();
        // 5. The switch.
        let mut h = [0u8; 36];
        read_exact_at(self.file, self.path, &mut h, 24, "qcow2 header")?;
        BigEndian::write_u64(&mut h[0..8], self.new_size);
        BigEndian::write_u32(&mut h[12..16], self.new_l1_size as u32);
        BigEndian::write_u64(&mut h[16..24], l1_at);
        BigEndian::write_u64(&mut h[24..32], rt_at.0);
        BigEndian::write_u32(&mut h[32..36], rt_at.1 as u32);
        write_all_at(self.file, self.path, &h, 24)?;
        sync(self.file, self.path)?;
        step();
        // The new structures are the image's now.
        self.size = self.new_size;
        self.l1_size = self.new_l1_size;
        self.l1_offset = l1_at;
        (self.rt_offset, self.rt_clusters) = rt_at;
        self.l1.truncate(self.l1_size as usize);
        self.l1_dirty = false;
        self.rb_dirty.clear();
        self.rt_dirty = false;
        self.l2.clear();
        self.base_end = self.file_end;
        if let Some(&first) = self.freed.first() {
            self.free_hint = self.free_hint.min(first);
        }
        self.freed.clear();
        self.reused.clear();
        Ok(())
    }
}

impl GuestSink for Txn<'_> {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < bytes.len() {
            let g = at + done as u64;
            let cstart = g / self.cs * self.cs;
            let within = (g - cstart) as usize;
            let n = (self.cs as usize - within).min(bytes.len() - done);
            let piece = &bytes[done..done + n];
            let l1i = g / self.l2_coverage();
            let entry = self.l2_entry(g)?;
            let host = entry & OFFSET_MASK;
            let table_owned = self.l2.contains_key(&l1i) || self.l1_entry(l1i) & OFLAG_COPIED != 0;
            let plain = entry & OFLAG_COMPRESSED == 0 && entry & OFLAG_ZERO == 0 && host != 0;
            let fresh = host >= self.base_end || self.reused.contains(&host);
            let owned = table_owned && entry & OFLAG_COPIED != 0;
            if plain && (fresh || (owned && !self.atomic)) {
                // A cluster of this transaction, or the image's own one
                // (when writes may show before the switch): in place.
                write_all_at(self.file, self.path, piece, host + within as u64)?;
                done += n;
                continue;
            }
            // A new cluster (copy-on-write for a shared or compressed one):
            // what the guest sees there now, with the piece.
            let compressed = entry & OFLAG_COMPRESSED != 0;
            let mut cluster = vec![0u8; self.cs as usize];
            if (compressed || entry & OFLAG_ZERO == 0) && cstart < self.old_size {
                let upto = (self.old_size - cstart).min(self.cs) as usize;
                self.reader.read_at(&mut cluster[..upto], cstart)?;
            }
            cluster[within..within + n].copy_from_slice(piece);
            let data = self.alloc()?;
            write_all_at(self.file, self.path, &cluster, data)?;
            self.set_l2(g, data | OFLAG_COPIED)?;
            self.release_entry(entry)?;
            done += n;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        match self.atomic {
            true => Ok(()),
            false => self.commit(),
        }
    }
}

/// Shrinks a qcow2 image in one transaction: a GPT moved inside the new
/// end, the size, and every reference past the end dropped (clusters no
/// snapshot holds are freed).
pub(super) fn shrink_qcow2(
    file: &File,
    path: &Path,
    old: u64,
    new: u64,
    opts: &ResizeOptions,
    reader: Box<dyn ImageReader>,
    extended_l2: bool,
) -> Result<ResizeReport> {
    if extended_l2 {
        return Err(unsupported(
            path,
            "shrinking a qcow2 with extended L2 entries is not supported yet",
        ));
    }
    let gpt_plan = gpt_plan_inside(reader.as_ref(), path, old, new, opts, "a qcow2")?;
    if !opts.force {
        // The old GPT backup moves; it is not data.
        shrink_checks(reader.as_ref(), path, new, old, gpt_plan.as_ref())?;
    }
    let mut txn = Txn::new(file, path, reader, old)?;
    let mut report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    // The GPT moved inside the new end, the size and the references past
    // it dropped: one switch.
    txn.atomic = true;
    if let Some(p) = &gpt_plan {
        apply_gpt(&mut txn, p)?;
        report.gpt_moved = true;
        report.partition_grown = p.grown;
    }
    txn.drop_past(new)?;
    let l1_size = txn.l1_size;
    txn.set_size(new, l1_size);
    txn.commit()?;
    // The bytes after the new end in the cluster it falls in are past the
    // image now; zeroed where the image owns the cluster, so that growing
    // again shows zeros (growing zeroes any others then).
    let cs = txn.cs;
    let c = new / cs * cs;
    if c < new && txn.l1_entry(c / txn.l2_coverage()) & OFLAG_COPIED != 0 {
        let e = txn.l2_entry(c)?;
        if e & OFFSET_MASK != 0 && e & OFLAG_COPIED != 0 && e & OFLAG_COMPRESSED == 0 {
            txn.write_zeros((e & OFFSET_MASK) + (new - c), (e & OFFSET_MASK) + cs)?;
            sync(file, path)?;
        }
    }
    txn.trim()?;
    Ok(report)
}
