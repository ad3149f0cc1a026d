//! Resizing qcow2 images.

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
            .and_then(|r| read_table(r.as_ref()).ok().flatten())
            .and_then(|t| t.gpt)
            .is_some_and(|g| !g.backup_at_end || !g.primary_ok || !g.backup_ok)
    };
    // Same size: only an unfinished GPT move (an interrupted run, or a
    // qemu-img resize) is left to do.
    if new == old && !(opts.fix_gpt && gpt_incomplete()) {
        return Ok(report);
    }
    needs_shrink(path, old, new, opts)?;
    if BigEndian::read_u32(&h[4..8]) >= 3 {
        let incompatible = BigEndian::read_u64(&h[72..80]);
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
    // A GPT inside follows the new end: planned (and checked) now,
    // written after the size switch.
    let gpt_plan = match opts.fix_gpt {
        true => match read_table(reader.as_ref()) {
            Ok(Some(t)) if t.kind == TableKind::Gpt => {
                let ss = t.gpt.as_ref().map_or(512, |g| g.sector_size);
                if extended_l2 {
                    return Err(unsupported(
                        path,
                        "moving a GPT inside a qcow2 with extended L2 entries is not supported yet: pass --no-fix-gpt",
                    ));
                }
                Some(plan_gpt(
                    reader.as_ref(),
                    path,
                    ss,
                    old,
                    new,
                    opts.grow_partition,
                )?)
            }
            _ => None,
        },
        false => None,
    };
    if let (Some(n), None) = (opts.grow_partition, &gpt_plan) {
        return Err(unsupported(
            path,
            format!("--grow-partition {n}: inside a qcow2 only a GPT partition can grow for now"),
        ));
    }
    let cs = 1u64 << cluster_bits;
    let version = BigEndian::read_u32(&h[4..8]);
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
    let mut sink = Qcow2Sink::new(&file, path, reader, old)?;
    let fill = fill || (!extended_l2 && sink.tail_state()?.0);
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
    // One allocator for everything that follows; nothing the old image
    // uses is written before every check has passed.
    let new_l1 = if move_l1 {
        // A larger L1 table at the end of the file, a copy of the old one
        // for now; what follows reads and links through it.
        let clusters = (u64::from(need) * 8).div_ceil(cs);
        let first = sink.alloc()?;
        for _ in 1..clusters {
            sink.alloc()?;
        }
        let mut table = vec![0u8; (clusters * cs) as usize];
        read_exact_at(
            &file,
            path,
            &mut table[..l1_size as usize * 8],
            l1_offset,
            "L1 table",
        )?;
        write_all_at(&file, path, &table, first)?;
        sink.l1_offset = first;
        Some((first, clusters))
    } else {
        zero_l1_slack(&file, path, l1_offset, l1_size, need)?;
        None
    };
    if fill {
        sink.fill_new_space(new, zero_to, opts.prealloc)?;
    }
    // New tables, refcounts, links and L1 entries, durable before the
    // header makes them part of the image.
    sink.sync()?;
    step();
    match new_l1 {
        Some((first, _)) => {
            // size, l1_size and l1_table_offset: bytes 24..48, one write;
            // then the old table is released. A kill before the release
            // leaks the old table's clusters (qemu-img check: leaks), as in
            // QEMU.
            let mut upd = [0u8; 24];
            upd.copy_from_slice(&h[24..48]);
            BigEndian::write_u64(&mut upd[0..8], new);
            BigEndian::write_u32(&mut upd[12..16], need);
            BigEndian::write_u64(&mut upd[16..24], first);
            write_all_at(&file, path, &upd, 24)?;
            sync(&file, path)?;
            step();
            let old_clusters = (u64::from(l1_size) * 8).div_ceil(cs);
            for k in 0..old_clusters {
                sink.set_refcount(l1_offset + k * cs, 0)?;
            }
            sink.commit_refcounts()?;
            step();
        }
        None => {
            let mut upd = [0u8; 16];
            upd.copy_from_slice(&h[24..40]);
            BigEndian::write_u64(&mut upd[0..8], new);
            BigEndian::write_u32(&mut upd[12..16], need.max(l1_size));
            write_all_at(&file, path, &upd, 24)?;
            sync(&file, path)?;
            step();
        }
    }
    sink.l1_size_old = u64::from(need.max(l1_size));
    // The image has its new size (a GPT now like qemu-img leaves it); the
    // GPT moves through guest writes.
    let mut report = report;
    if let Some(plan) = gpt_plan {
        apply_gpt(&mut sink, &plan)?;
        report.gpt_moved = true;
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

/// Guest writes into a qcow2 image, for moving a GPT: into clusters it
/// owns alone (refcount 1, uncompressed) in place, or into new clusters at
/// the end of the file. New clusters, new L2 tables and their refcounts are
/// written and synced before any table points at them; a crash in between
/// leaks those clusters (qemu-img check: leaks, no corruption), as QEMU's
/// own allocation does.
pub(super) struct Qcow2Sink<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
    /// The image as it was (for the parts of new clusters already there).
    pub(super) reader: Box<dyn ImageReader>,
    pub(super) old_size: u64,
    pub(super) cs: u64,
    pub(super) l2_coverage: u64,
    pub(super) l1_offset: u64,
    /// Entries past the old L1 size read as unallocated (the slack is
    /// zeroed before any write).
    pub(super) l1_size_old: u64,
    /// The refcount table (entries changed in this run included).
    pub(super) rt: Vec<u64>,
    pub(super) rt_offset: u64,
    /// Table entries that point at refcount blocks made in this run.
    pub(super) rt_new: std::collections::BTreeSet<u64>,
    /// A larger refcount table, allocated at the end of the file and not
    /// yet switched to: (offset, clusters); the old one's clusters.
    pub(super) rt_moved: Option<(u64, u64)>,
    pub(super) rt_clusters: u64,
    pub(super) refcount_bits: u64,
    pub(super) file_end: u64,
    /// L1 entries written so far (index → entry), including new tables.
    pub(super) l1: std::collections::BTreeMap<u64, u64>,
    /// New L2 tables not yet linked: L1 index → (host, entries).
    pub(super) new_tables: std::collections::BTreeMap<u64, (u64, Vec<u64>)>,
    /// Entries to set in existing L2 tables: host offset of the entry → value.
    pub(super) links: std::collections::BTreeMap<u64, u64>,
    /// Clusters the active image stops using once the links are durable
    /// (copied-on-write data and shared tables): each loses one count.
    pub(super) releases: Vec<u64>,
    pub(super) layout: crate::qcow2::reader::CompressedLayout,
    /// Refcount blocks changed: block host offset → bytes.
    pub(super) blocks: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl<'a> Qcow2Sink<'a> {
    pub(super) fn new(
        file: &'a File,
        path: &'a Path,
        reader: Box<dyn ImageReader>,
        old_size: u64,
    ) -> Result<Self> {
        let mut b = [0u8; 104];
        read_exact_at(file, path, &mut b, 0, "qcow2 header")?;
        let cs = 1u64 << BigEndian::read_u32(&b[20..24]);
        let version = BigEndian::read_u32(&b[4..8]);
        let order = if version >= 3 {
            BigEndian::read_u32(&b[96..100])
        } else {
            4
        };
        let rt_offset = BigEndian::read_u64(&b[48..56]);
        let rt_clusters = u64::from(BigEndian::read_u32(&b[56..60]));
        if rt_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(invalid(
                path,
                format!(
                    "the refcount table has {rt_clusters} clusters, more than QEMU's 8 MiB limit"
                ),
            ));
        }
        let mut raw = vec![0u8; (rt_clusters * cs) as usize];
        read_exact_at(file, path, &mut raw, rt_offset, "refcount table")?;
        let rt = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        Ok(Qcow2Sink {
            file,
            path,
            reader,
            old_size,
            cs,
            l2_coverage: cs * (cs / 8),
            l1_offset: BigEndian::read_u64(&b[40..48]),
            l1_size_old: u64::from(BigEndian::read_u32(&b[36..40])),
            rt,
            rt_offset,
            rt_new: Default::default(),
            rt_moved: None,
            rt_clusters,
            refcount_bits: 1 << order,
            file_end: file_len(file, path)?.div_ceil(cs) * cs,
            l1: Default::default(),
            new_tables: Default::default(),
            links: Default::default(),
            releases: Vec::new(),
            layout: crate::qcow2::reader::CompressedLayout::new(BigEndian::read_u32(&b[20..24])),
            blocks: Default::default(),
        })
    }

    pub(super) fn be64(&self, at: u64, what: &str) -> Result<u64> {
        let mut e = [0u8; 8];
        read_exact_at(self.file, self.path, &mut e, at, what)?;
        Ok(BigEndian::read_u64(&e))
    }

    pub(super) fn l1_entry(&mut self, i: u64) -> Result<u64> {
        if let Some(&e) = self.l1.get(&i) {
            return Ok(e);
        }
        let e = if i < self.l1_size_old {
            self.be64(self.l1_offset + i * 8, "L1 table")?
        } else {
            0
        };
        self.l1.insert(i, e);
        Ok(e)
    }

    /// Marks the cluster at `host` as used once.
    pub(super) fn take(&mut self, host: u64) -> Result<()> {
        self.set_refcount(host, 1)
    }

    /// The refcount of the cluster at `host` (changes made so far included).
    pub(super) fn refcount(&mut self, host: u64) -> Result<u64> {
        let per_block = self.cs * 8 / self.refcount_bits;
        let index = host / self.cs;
        let Some(&entry) = self.rt.get((index / per_block) as usize) else {
            return Ok(0);
        };
        let block = entry & OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        let bits = self.refcount_bits;
        let b = self.block(block)?;
        Ok(crate::qcow2::writer::get_refcount(
            b,
            (index % per_block) as usize,
            bits,
        ))
    }

    /// The refcount block at `host`, read once.
    fn block(&mut self, host: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&host) {
            let mut b = vec![0u8; self.cs as usize];
            read_exact_at(self.file, self.path, &mut b, host, "refcount block")?;
            self.blocks.insert(host, b);
        }
        Ok(self.blocks.get_mut(&host).expect("inserted above"))
    }

    /// Sets the refcount of the cluster at `host` (in memory until
    /// [`Self::commit_refcounts`]). A missing refcount block is made at the
    /// end of the file, and a refcount table too small for it is replaced
    /// by a larger one there.
    pub(super) fn set_refcount(&mut self, host: u64, value: u64) -> Result<()> {
        let per_block = self.cs * 8 / self.refcount_bits;
        let index = host / self.cs;
        let bi = index / per_block;
        if bi >= self.rt.len() as u64 {
            if value == 0 {
                return Ok(());
            }
            self.grow_refcount_table(bi)?;
        }
        let mut block = self.rt[bi as usize] & OFFSET_MASK;
        if block == 0 {
            if value == 0 {
                return Ok(());
            }
            // A new block; it may have to count itself.
            block = self.file_end;
            self.file_end += self.cs;
            self.blocks.insert(block, vec![0u8; self.cs as usize]);
            self.rt[bi as usize] = block;
            self.rt_new.insert(bi);
            self.set_refcount(block, 1)?;
        }
        let bits = self.refcount_bits;
        let b = self.block(block)?;
        crate::qcow2::writer::put_refcount(b, (index % per_block) as usize, bits, value);
        Ok(())
    }

    /// Makes room in the refcount table for block index `bi`: a table twice
    /// as large (at least) at the end of the file, counted in itself.
    fn grow_refcount_table(&mut self, bi: u64) -> Result<()> {
        let per_cluster = self.cs / 8;
        if let Some((at, clusters)) = self.rt_moved.take() {
            // A table grown earlier in this run and not switched to yet is
            // given up for a larger one.
            for k in 0..clusters {
                self.set_refcount(at + k * self.cs, 0)?;
            }
        }
        let entries = (bi + 1).max(self.rt.len() as u64) * 2;
        let clusters = entries.div_ceil(per_cluster);
        if clusters * self.cs > MAX_REFTABLE_BYTES {
            return Err(unsupported(
                self.path,
                "the refcount table would grow past QEMU's 8 MiB limit",
            ));
        }
        let at = self.file_end;
        self.file_end += clusters * self.cs;
        self.rt.resize((clusters * per_cluster) as usize, 0);
        self.rt_moved = Some((at, clusters));
        for k in 0..clusters {
            self.set_refcount(at + k * self.cs, 1)?;
        }
        Ok(())
    }

    /// Makes the refcount changes durable, in an order that never lets a
    /// table entry point at a block not yet written: the blocks (and a new
    /// table) are written and synced; then the table entries for new blocks
    /// are written, or the header switches to the new table (bytes 48..60,
    /// one write) and the old table's clusters are released. A kill between
    /// the steps leaves clusters counted that nothing uses (leaks), never a
    /// reference without a count.
    pub(super) fn commit_refcounts(&mut self) -> Result<()> {
        for (at, b) in &self.blocks {
            write_all_at(self.file, self.path, b, *at)?;
        }
        match self.rt_moved.take() {
            Some((at, clusters)) => {
                let mut t = vec![0u8; (clusters * self.cs) as usize];
                for (k, e) in self.rt.iter().enumerate() {
                    BigEndian::write_u64(&mut t[k * 8..k * 8 + 8], *e);
                }
                write_all_at(self.file, self.path, &t, at)?;
                sync(self.file, self.path)?;
                step();
                let mut h = [0u8; 12];
                BigEndian::write_u64(&mut h[0..8], at);
                BigEndian::write_u32(&mut h[8..12], clusters as u32);
                write_all_at(self.file, self.path, &h, 48)?;
                sync(self.file, self.path)?;
                step();
                let (old, old_clusters) = (self.rt_offset, self.rt_clusters);
                self.rt_offset = at;
                self.rt_clusters = clusters;
                self.rt_new.clear();
                for k in 0..old_clusters {
                    self.set_refcount(old + k * self.cs, 0)?;
                }
                for (at, b) in &self.blocks {
                    write_all_at(self.file, self.path, b, *at)?;
                }
                sync(self.file, self.path)?;
            }
            None => {
                sync(self.file, self.path)?;
                if !self.rt_new.is_empty() {
                    step();
                    for bi in std::mem::take(&mut self.rt_new) {
                        let mut e = [0u8; 8];
                        BigEndian::write_u64(&mut e, self.rt[bi as usize]);
                        write_all_at(self.file, self.path, &e, self.rt_offset + bi * 8)?;
                    }
                    sync(self.file, self.path)?;
                }
            }
        }
        Ok(())
    }

    /// The L2 entry for guest offset `g`: (where it is stored, its value),
    /// the place `None` when no table maps `g` yet.
    pub(super) fn l2_slot(&mut self, g: u64) -> Result<(Option<u64>, u64)> {
        let (l1i, l2i) = (g / self.l2_coverage, (g % self.l2_coverage) / self.cs);
        if let Some((t, entries)) = self.new_tables.get(&l1i) {
            let at = t + l2i * 8;
            return match (entries.is_empty(), self.links.get(&at)) {
                (false, _) => Ok((Some(at), entries[l2i as usize])),
                (true, Some(&v)) => Ok((Some(at), v)),
                (true, None) => Ok((Some(at), self.be64(at, "L2 table")?)),
            };
        }
        let l1e = self.l1_entry(l1i)?;
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            return Ok((None, 0));
        }
        let at = l2 + l2i * 8;
        match self.links.get(&at) {
            Some(&v) => Ok((Some(at), v)),
            None => Ok((Some(at), self.be64(at, "L2 table")?)),
        }
    }

    /// Sets the L2 entry for guest offset `g` to `value`: in a table made
    /// in this run (made now if none maps `g`), or as a link into an
    /// existing table, written by [`GuestSink::sync`].
    fn set_l2(&mut self, g: u64, value: u64) -> Result<()> {
        let (l1i, l2i) = (g / self.l2_coverage, (g % self.l2_coverage) / self.cs);
        self.own_table(l1i)?;
        match self.new_tables.get_mut(&l1i) {
            Some((_, entries)) if !entries.is_empty() => {
                entries[l2i as usize] = value;
                return Ok(());
            }
            Some((t, _)) => {
                let at = *t + l2i * 8;
                self.links.insert(at, value);
                return Ok(());
            }
            None => {}
        }
        match self.l2_slot(g)? {
            (Some(at), _) => {
                self.links.insert(at, value);
            }
            (None, _) => {
                let t = self.alloc()?;
                let mut entries = vec![0u64; (self.cs / 8) as usize];
                entries[l2i as usize] = value;
                self.new_tables.insert(l1i, (t, entries));
            }
        }
        Ok(())
    }

    /// Makes the L2 table for L1 index `l1i` the active image's own: a
    /// table an internal snapshot shares is copied to a new cluster (linked
    /// by [`GuestSink::sync`]; the shared one loses the active image's count
    /// after that). The data clusters it maps keep their counts: qcow2
    /// counts a cluster once per table path, and the copy replaces one path.
    fn own_table(&mut self, l1i: u64) -> Result<()> {
        if self.new_tables.contains_key(&l1i) {
            return Ok(());
        }
        let l1e = self.l1_entry(l1i)?;
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 || l1e & OFLAG_COPIED != 0 {
            return Ok(());
        }
        let mut raw = vec![0u8; self.cs as usize];
        read_exact_at(self.file, self.path, &mut raw, l2, "L2 table")?;
        let mut entries = Vec::with_capacity(raw.len() / 8);
        for e in raw.chunks_exact(8).map(BigEndian::read_u64) {
            let host = e & OFFSET_MASK;
            if e & OFLAG_COMPRESSED == 0 && host != 0 {
                // OFLAG_COPIED marks the clusters only the active image holds.
                let flag = if self.refcount(host)? == 1 {
                    OFLAG_COPIED
                } else {
                    0
                };
                entries.push((e & !OFLAG_COPIED) | flag);
            } else {
                entries.push(e);
            }
        }
        let t = self.alloc()?;
        self.new_tables.insert(l1i, (t, entries));
        self.releases.push(l2);
        Ok(())
    }

    /// The host clusters a compressed L2 entry's data touches.
    fn compressed_clusters(&self, entry: u64) -> Vec<u64> {
        let (off, len) = self.layout.decode(entry & !OFLAG_COMPRESSED);
        let start = off & !511;
        let mut out = Vec::new();
        let mut c = start / self.cs * self.cs;
        while c < start + len {
            out.push(c);
            c += self.cs;
        }
        out
    }

    /// Writes a finished new L2 table now and keeps only its place, so that
    /// memory stays bounded however much is preallocated.
    fn flush_table(&mut self, l1i: u64) -> Result<()> {
        if let Some((t, entries)) = self.new_tables.get_mut(&l1i) {
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
        let (_, entry) = self.l2_slot(c)?;
        let host = entry & OFFSET_MASK;
        let mut stored = vec![0u8; tail];
        let unallocated = host == 0 && entry & OFLAG_ZERO == 0;
        if entry & OFLAG_COMPRESSED != 0 {
            // A compressed cluster is written whole, zeros after the end.
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
    /// (`full`); tables and refcounts go through [`GuestSink::sync`].
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
            let l1i = g / self.l2_coverage;
            if let Some(prev) = last_l1.filter(|&p| p != l1i) {
                self.flush_table(prev)?;
            }
            last_l1 = Some(l1i);
            let (_, entry) = self.l2_slot(g)?;
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
                    let data = self.alloc()?;
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
        // blocks are written over it later).
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
    pub(super) fn write_zeros(&self, from: u64, to: u64) -> Result<()> {
        let zeros = vec![0u8; (to - from).min(1 << 20) as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeros.len() as u64);
            write_all_at(self.file, self.path, &zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    pub(super) fn alloc(&mut self) -> Result<u64> {
        let host = self.file_end;
        self.file_end += self.cs;
        self.take(host)?;
        Ok(host)
    }
}

/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

pub(super) const OFFSET_MASK: u64 = crate::qcow2::reader::OFFSET_MASK;
pub(super) const OFLAG_COPIED: u64 = crate::qcow2::reader::OFLAG_COPIED;
pub(super) const OFLAG_COMPRESSED: u64 = crate::qcow2::reader::OFLAG_COMPRESSED;
pub(super) const OFLAG_ZERO: u64 = crate::qcow2::reader::OFLAG_ZERO;

impl GuestSink for Qcow2Sink<'_> {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < bytes.len() {
            let g = at + done as u64;
            let cstart = g / self.cs * self.cs;
            let within = (g - cstart) as usize;
            let n = (self.cs as usize - within).min(bytes.len() - done);
            let piece = &bytes[done..done + n];
            // Nothing a snapshot shares is written in place.
            self.own_table(g / self.l2_coverage)?;
            let (_, entry) = self.l2_slot(g)?;
            let host = entry & OFFSET_MASK;
            let compressed = entry & OFLAG_COMPRESSED != 0;
            if !compressed && host != 0 && entry & OFLAG_COPIED != 0 {
                write_all_at(self.file, self.path, piece, host + within as u64)?;
                done += n;
                continue;
            }
            // A new cluster (copy-on-write for a shared or compressed one):
            // what the guest sees there now, with the piece.
            let mut cluster = vec![0u8; self.cs as usize];
            if (compressed || entry & OFLAG_ZERO == 0) && cstart < self.old_size {
                let upto = (self.old_size - cstart).min(self.cs) as usize;
                self.reader.read_at(&mut cluster[..upto], cstart)?;
            }
            cluster[within..within + n].copy_from_slice(piece);
            let data = self.alloc()?;
            write_all_at(self.file, self.path, &cluster, data)?;
            self.set_l2(g, data | OFLAG_COPIED)?;
            if compressed {
                let touched = self.compressed_clusters(entry);
                self.releases.extend(touched);
            } else if host != 0 {
                self.releases.push(host);
            }
            done += n;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        // 1. New tables and refcounts, durable before anything points at them.
        for (t, entries) in self.new_tables.values() {
            if entries.is_empty() {
                continue; // written by flush_table
            }
            let mut b = vec![0u8; self.cs as usize];
            for (k, e) in entries.iter().enumerate() {
                BigEndian::write_u64(&mut b[k * 8..k * 8 + 8], *e);
            }
            write_all_at(self.file, self.path, &b, *t)?;
        }
        self.commit_refcounts()?;
        // 2. The links.
        for (at, v) in std::mem::take(&mut self.links) {
            let mut e = [0u8; 8];
            BigEndian::write_u64(&mut e, v);
            write_all_at(self.file, self.path, &e, at)?;
        }
        let tables: Vec<(u64, u64)> = self.new_tables.iter().map(|(&i, (t, _))| (i, *t)).collect();
        for (i, t) in tables {
            let mut e = [0u8; 8];
            BigEndian::write_u64(&mut e, t | OFLAG_COPIED);
            write_all_at(self.file, self.path, &e, self.l1_offset + i * 8)?;
            self.l1.insert(i, t | OFLAG_COPIED);
        }
        // Linked tables are existing tables from now on.
        self.new_tables.clear();
        sync(self.file, self.path)?;
        // 3. What the active image no longer uses loses its count (a kill
        // before this leaks it: qemu-img check reports leaks, no corruption).
        let releases = std::mem::take(&mut self.releases);
        if !releases.is_empty() {
            step();
            for c in releases {
                let rc = self.refcount(c)?;
                self.set_refcount(c, rc.saturating_sub(1))?;
            }
            self.commit_refcounts()?;
        }
        Ok(())
    }
}

/// Shrinks a qcow2 image: a GPT moves inside the new end first; then the
/// header's size (one write); then the references past the end are cleared
/// (L1 entries of tables wholly past it, L2 entries in the table that
/// straddles it) and synced; then the clusters they held lose a refcount —
/// freed when nothing else (an internal snapshot) still holds them. A kill
/// between the last two steps leaks those clusters (qemu-img check: leaks).
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
    let table = read_table(reader.as_ref())?;
    if !opts.force {
        if let Some(p) = table
            .as_ref()
            .and_then(|t| t.partitions.iter().find(|p| p.end > new))
        {
            return Err(invalid(
                path,
                format!("partition {} ends at byte {}, beyond the new end ({new}); shrink the partition first, or pass --force", p.number, p.end),
            ));
        }
    }
    let gpt_plan = match table.as_ref() {
        Some(t) if t.kind == TableKind::Gpt && opts.fix_gpt => {
            let ss = t.gpt.as_ref().map_or(512, |g| g.sector_size);
            Some(plan_gpt(
                reader.as_ref(),
                path,
                ss,
                old,
                new,
                opts.grow_partition,
            )?)
        }
        _ => None,
    };
    let gpt_exempt_from = gpt_plan
        .as_ref()
        .map_or(u64::MAX, |p| p.old_backup_entries_lba * p.ss);
    let mut sink = Qcow2Sink::new(file, path, reader, old)?;
    let cs = sink.cs;
    let layout = crate::qcow2::reader::CompressedLayout::new(cs.trailing_zeros());
    // What lies past the new end: (entry offset to clear, clusters to
    // release) for L2 entries, (L1 index, table, owned) for whole tables.
    let first_gone = new.div_ceil(cs);
    let old_clusters = old.div_ceil(cs);
    let per_l2 = cs / 8;
    let mut clear_l2: Vec<u64> = Vec::new();
    let mut clear_l1: Vec<u64> = Vec::new();
    let mut release: Vec<u64> = Vec::new();
    // Table copies (L1 index, table bytes).
    let mut copies: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut data_beyond = false;
    let l1_first = first_gone / per_l2;
    let l1_last = old_clusters.div_ceil(per_l2);
    for i in l1_first..l1_last {
        let l1e = sink.l1_entry(i)?;
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let owned = l1e & OFLAG_COPIED != 0;
        let whole = i * per_l2 >= first_gone;
        let mut raw = vec![0u8; cs as usize];
        read_exact_at(file, path, &mut raw, l2, "L2 table")?;
        let from = if whole { 0 } else { first_gone - i * per_l2 };
        let mut held = Vec::new();
        for j in from..per_l2 {
            let e = BigEndian::read_u64(&raw[(j * 8) as usize..(j * 8 + 8) as usize]);
            if e & !OFLAG_ZERO == 0 {
                continue;
            }
            // The old GPT backup at the old end moves; it is not data.
            let guest = (i * per_l2 + j) * cs;
            let stored = e & OFFSET_MASK != 0 || e & OFLAG_COMPRESSED != 0;
            if stored && guest < gpt_exempt_from.min(old) && !data_beyond {
                // Stored, but only non-zero bytes are data to lose (the old
                // GPT backup excepted).
                let upto = (guest + cs).min(gpt_exempt_from).min(old);
                let mut bytes = vec![0u8; (upto - guest) as usize];
                sink.reader.read_at(&mut bytes, guest)?;
                data_beyond |= bytes.iter().any(|&b| b != 0);
            }
            if e & OFLAG_COMPRESSED != 0 {
                let (off, len) = layout.decode(e & !OFLAG_COMPRESSED);
                let start = off & !511;
                let mut c = start / cs * cs;
                while c < start + len {
                    held.push(c);
                    c += cs;
                }
            } else if e & OFFSET_MASK != 0 {
                held.push(e & OFFSET_MASK);
            }
            if !whole {
                clear_l2.push(l2 + j * 8);
            }
        }
        if whole {
            clear_l1.push(i);
            release.push(l2);
            // qcow2 counts a data cluster once per L1 table that reaches
            // it: the active image's path to these goes, shared or not.
            release.extend(held);
        } else if !owned && !held.is_empty() {
            // The table that straddles the new end is shared with a
            // snapshot: the active image gets its own copy without the
            // entries past the end. The clusters it keeps are reached by
            // the active image as before (no refcount change); those past
            // the end and the shared table lose the active image's count.
            let mut copy = raw.clone();
            let mut keep: Vec<(usize, u64)> = Vec::new();
            for j in 0..per_l2 {
                let at = (j * 8) as usize;
                let e = BigEndian::read_u64(&copy[at..at + 8]);
                if j >= from {
                    copy[at..at + 8].fill(0);
                    continue;
                }
                if e & OFLAG_COMPRESSED == 0 && e & OFFSET_MASK != 0 {
                    keep.push((at, e));
                }
            }
            // The straddling entries are not cleared in place: the copy
            // replaces the table.
            clear_l2.retain(|&a| a < l2 || a >= l2 + cs);
            // OFLAG_COPIED marks the clusters only the active image holds.
            for (at, e) in keep {
                let rc = sink.refcount(e & OFFSET_MASK)?;
                let flag = if rc == 1 { OFLAG_COPIED } else { 0 };
                BigEndian::write_u64(&mut copy[at..at + 8], (e & !OFLAG_COPIED) | flag);
            }
            copies.push((i, copy));
            release.push(l2);
            release.extend(held);
        } else if !held.is_empty() {
            release.extend(held);
        }
    }
    if data_beyond && !opts.force {
        return Err(invalid(
            path,
            format!("data is stored beyond the new end ({new}); pass --force to cut it off"),
        ));
    }
    // Every release must find its refcount block (checked before writing).
    let mut counts: std::collections::BTreeMap<u64, u64> = Default::default();
    for &c in &release {
        *counts.entry(c).or_default() += 1;
    }
    for (&c, &n) in &counts {
        let now = sink.refcount(c)?;
        if now < n {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("cluster {c:#x} has refcount {now} but {n} references to drop; run qemu-img check -r"),
            )
            .at_path(path));
        }
    }
    if gpt_plan.is_some() && !copies.is_empty() {
        return Err(unsupported(
            path,
            "moving a GPT while shrinking through a table a snapshot shares is not supported yet: pass --no-fix-gpt",
        ));
    }
    // Table copies: allocated and counted now, written before the size
    // changes, linked with the other reference changes.
    let mut links: Vec<(u64, u64)> = Vec::new();
    for (i, bytes) in &copies {
        let t = sink.alloc()?;
        write_all_at(file, path, bytes, t)?;
        links.push((*i, t));
    }
    // 1. The GPT moves inside the new end.
    let mut report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    if let Some(p) = &gpt_plan {
        apply_gpt(&mut sink, p)?;
        report.gpt_moved = true;
        report.partition_grown = p.grown;
    }
    if !copies.is_empty() {
        sink.commit_refcounts()?;
        step();
    }
    // 2. The size.
    let mut size = [0u8; 8];
    BigEndian::write_u64(&mut size, new);
    write_all_at(file, path, &size, 24)?;
    sync(file, path)?;
    step();
    // The bytes after the new end in the cluster it falls in are past the
    // image now; zeroed, so that growing again shows zeros (a cluster a
    // snapshot shares keeps them; growing zeroes them then).
    let c = new / cs * cs;
    if c < new && !extended_l2 && sink.l1_entry(c / sink.l2_coverage)? & OFLAG_COPIED != 0 {
        let (_, e) = sink.l2_slot(c)?;
        if e & OFFSET_MASK != 0 && e & OFLAG_COPIED != 0 && e & OFLAG_COMPRESSED == 0 {
            sink.write_zeros((e & OFFSET_MASK) + (new - c), (e & OFFSET_MASK) + cs)?;
        }
    }
    // 3. The references.
    for at in clear_l2 {
        write_all_at(file, path, &[0u8; 8], at)?;
    }
    for i in clear_l1 {
        write_all_at(file, path, &[0u8; 8], sink.l1_offset + i * 8)?;
    }
    for (i, t) in links {
        let mut e = [0u8; 8];
        BigEndian::write_u64(&mut e, t | OFLAG_COPIED);
        write_all_at(file, path, &e, sink.l1_offset + i * 8)?;
    }
    sync(file, path)?;
    step();
    // 4. The refcounts.
    for (&c, &n) in &counts {
        let now = sink.refcount(c)?;
        sink.set_refcount(c, now.saturating_sub(n))?;
    }
    sink.commit_refcounts()?;
    Ok(report)
}
