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
    if opts.prealloc != Prealloc::Off {
        return Err(unsupported(
            path,
            "qcow2 resize grows without preallocation for now",
        ));
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
    let per_l2 = cs / if extended_l2 { 16 } else { 8 };
    let need = new.div_ceil(cs * per_l2);
    if need > u64::from(u32::MAX) || need * 8 > 32 << 20 {
        return Err(invalid(
            path,
            format!("{new} bytes needs an L1 table larger than QEMU allows"),
        ));
    }
    let room = (u64::from(l1_size) * 8).div_ceil(cs) * cs / 8;
    let move_l1 = need > room;
    let need = need as u32;
    // One allocator for everything that follows; nothing is written until
    // every check has passed.
    let mut sink = if move_l1 || gpt_plan.is_some() {
        Some(Qcow2Sink::new(&file, path, reader, old)?)
    } else {
        None
    };
    let new_l1 = match (&mut sink, move_l1) {
        (Some(sink), true) => {
            let clusters = (u64::from(need) * 8).div_ceil(cs);
            let first = sink.alloc()?;
            for _ in 1..clusters {
                sink.alloc()?;
            }
            Some((first, clusters))
        }
        _ => None,
    };
    if let (Some(p), Some(sink)) = (&gpt_plan, &mut sink) {
        if let Some((first, _)) = new_l1 {
            sink.l1_offset = first;
            sink.l1_size_old = u64::from(l1_size);
        }
        let mut ranges = vec![
            (
                p.backup_entries_lba * p.ss,
                (p.last_lba + 1 - p.backup_entries_lba) * p.ss,
            ),
            (0, 2 * p.ss),
        ];
        if p.rewrite_primary_entries {
            ranges.push((p.primary_entries_lba * p.ss, p.entries.len() as u64));
        }
        // L1 entries are read from the old table until the switch.
        sink.l1_offset = l1_offset;
        sink.preflight(&ranges)?;
        if let Some((first, _)) = new_l1 {
            sink.l1_offset = first;
        }
    }
    match (new_l1, &mut sink) {
        (Some((first, clusters)), Some(sink)) => {
            // A larger L1 table at the end of the file: written, refcounted
            // and synced; then the header points at it (size, l1_size and
            // l1_table_offset: bytes 24..48, one write); then the old table
            // is released. A kill after the switch and before the release
            // leaks the old table's clusters (qemu-img check: leaks), as in
            // QEMU.
            let mut table = vec![0u8; (clusters * cs) as usize];
            read_exact_at(
                &file,
                path,
                &mut table[..l1_size as usize * 8],
                l1_offset,
                "L1 table",
            )?;
            write_all_at(&file, path, &table, first)?;
            sink.write_blocks()?;
            sync(&file, path)?;
            step();
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
            sink.write_blocks()?;
            sync(&file, path)?;
            step();
            sink.l1.clear();
            sink.l1_size_old = u64::from(need);
        }
        _ => {
            if need > l1_size {
                // The slack after the old entries must read as "unallocated".
                let slack = (u64::from(need - l1_size) * 8) as usize;
                let zeros = vec![0u8; slack];
                write_all_at(&file, path, &zeros, l1_offset + u64::from(l1_size) * 8)?;
                sync(&file, path)?;
                step();
            }
            // size (24..32), crypt_method (32..36), l1_size (36..40): one write.
            let mut upd = [0u8; 16];
            upd.copy_from_slice(&h[24..40]);
            BigEndian::write_u64(&mut upd[0..8], new);
            BigEndian::write_u32(&mut upd[12..16], need.max(l1_size));
            write_all_at(&file, path, &upd, 24)?;
            sync(&file, path)?;
            step();
        }
    }
    // The image has its new size (a GPT now like qemu-img leaves it); the
    // GPT moves through guest writes.
    let mut report = report;
    if let Some((plan, mut sink)) = gpt_plan.zip(sink) {
        apply_gpt(&mut sink, &plan)?;
        report.gpt_moved = true;
    }
    Ok(report)
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
    pub(super) rt_offset: u64,
    pub(super) rt_entries: u64,
    pub(super) refcount_bits: u64,
    pub(super) file_end: u64,
    /// L1 entries written so far (index → entry), including new tables.
    pub(super) l1: std::collections::BTreeMap<u64, u64>,
    /// New L2 tables not yet linked: L1 index → (host, entries).
    pub(super) new_tables: std::collections::BTreeMap<u64, (u64, Vec<u64>)>,
    /// Entries to set in existing L2 tables: host offset of the entry → value.
    pub(super) links: Vec<(u64, u64)>,
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
        Ok(Qcow2Sink {
            file,
            path,
            reader,
            old_size,
            cs,
            l2_coverage: cs * (cs / 8),
            l1_offset: BigEndian::read_u64(&b[40..48]),
            l1_size_old: u64::from(BigEndian::read_u32(&b[36..40])),
            rt_offset: BigEndian::read_u64(&b[48..56]),
            rt_entries: u64::from(BigEndian::read_u32(&b[56..60])) * cs / 8,
            refcount_bits: 1 << order,
            file_end: file_len(file, path)?.div_ceil(cs) * cs,
            l1: Default::default(),
            new_tables: Default::default(),
            links: Vec::new(),
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
        let bi = index / per_block;
        if bi >= self.rt_entries {
            return Ok(0);
        }
        let block = self.be64(self.rt_offset + bi * 8, "refcount table")? & OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if !self.blocks.contains_key(&block) {
            let mut b = vec![0u8; self.cs as usize];
            read_exact_at(self.file, self.path, &mut b, block, "refcount block")?;
            self.blocks.insert(block, b);
        }
        let b = &self.blocks[&block];
        Ok(crate::qcow2::writer::get_refcount(
            b,
            (index % per_block) as usize,
            self.refcount_bits,
        ))
    }

    /// Writes the refcount blocks changed so far (not synced).
    pub(super) fn write_blocks(&mut self) -> Result<()> {
        for (at, b) in &self.blocks {
            write_all_at(self.file, self.path, b, *at)?;
        }
        Ok(())
    }

    /// Sets the refcount of the cluster at `host` (in memory until the
    /// blocks are written).
    pub(super) fn set_refcount(&mut self, host: u64, value: u64) -> Result<()> {
        let per_block = self.cs * 8 / self.refcount_bits;
        let index = host / self.cs;
        let bi = index / per_block;
        if bi >= self.rt_entries {
            return Err(unsupported(
                self.path,
                "the refcount table would have to grow; not supported yet",
            ));
        }
        let block = self.be64(self.rt_offset + bi * 8, "refcount table")? & OFFSET_MASK;
        if block == 0 {
            return Err(unsupported(
                self.path,
                "a new refcount block would be needed; not supported yet",
            ));
        }
        if !self.blocks.contains_key(&block) {
            let mut b = vec![0u8; self.cs as usize];
            read_exact_at(self.file, self.path, &mut b, block, "refcount block")?;
            self.blocks.insert(block, b);
        }
        let b = self.blocks.get_mut(&block).expect("inserted above");
        crate::qcow2::writer::put_refcount(
            b,
            (index % per_block) as usize,
            self.refcount_bits,
            value,
        );
        Ok(())
    }

    /// Checks, before the first write, that every guest range can be
    /// written: its clusters and L2 tables owned by the active image alone
    /// and uncompressed, and refcount blocks in place for the clusters to
    /// allocate.
    pub(super) fn preflight(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut allocs = 0u64;
        let mut new_l2: std::collections::BTreeSet<u64> = Default::default();
        for &(at, len) in ranges {
            let mut g = at / self.cs * self.cs;
            while g < at + len {
                let (l1i, l2i) = (g / self.l2_coverage, (g % self.l2_coverage) / self.cs);
                let l1e = self.l1_entry(l1i)?;
                let l2 = l1e & OFFSET_MASK;
                if l2 != 0 && l1e & OFLAG_COPIED == 0 {
                    return Err(unsupported(self.path, format!("guest offset {g:#x} is mapped by an L2 table a snapshot shares; pass --no-fix-gpt")));
                }
                let entry = if l2 != 0 {
                    self.be64(l2 + l2i * 8, "L2 table")?
                } else {
                    0
                };
                let host = entry & OFFSET_MASK;
                if entry & OFLAG_COMPRESSED != 0 {
                    return Err(unsupported(
                        self.path,
                        format!(
                            "guest offset {g:#x} is in a compressed cluster; pass --no-fix-gpt"
                        ),
                    ));
                }
                if host != 0 && entry & OFLAG_COPIED == 0 {
                    return Err(unsupported(self.path, format!("guest offset {g:#x} is in a cluster a snapshot shares; pass --no-fix-gpt")));
                }
                if host == 0 {
                    allocs += 1;
                    if l2 == 0 && new_l2.insert(l1i) {
                        allocs += 1;
                    }
                }
                g += self.cs;
            }
        }
        // The refcount blocks for the clusters to come must exist.
        let per_block = self.cs * 8 / self.refcount_bits;
        for k in 0..allocs {
            let index = (self.file_end + k * self.cs) / self.cs;
            let bi = index / per_block;
            if bi >= self.rt_entries
                || self.be64(self.rt_offset + bi * 8, "refcount table")? & OFFSET_MASK == 0
            {
                return Err(unsupported(
                    self.path,
                    "moving the GPT needs a new refcount block, which is not supported yet: pass --no-fix-gpt",
                ));
            }
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
            let (l1i, l2i) = (g / self.l2_coverage, (g % self.l2_coverage) / self.cs);
            let l2 = self.l1_entry(l1i)? & OFFSET_MASK;
            // An L2 table made earlier in this run.
            if let Some((_, t)) = self.new_tables.get(&l1i) {
                let host = t[l2i as usize] & OFFSET_MASK;
                if host != 0 {
                    write_all_at(self.file, self.path, piece, host + within as u64)?;
                    done += n;
                    continue;
                }
            }
            let entry = if l2 != 0 {
                self.be64(l2 + l2i * 8, "L2 table")?
            } else {
                0
            };
            let host = entry & OFFSET_MASK;
            if entry & OFLAG_COMPRESSED != 0 {
                return Err(unsupported(self.path, format!("guest offset {g:#x} is in a compressed cluster; moving the GPT would need it rewritten: pass --no-fix-gpt")));
            }
            if host != 0 && entry & OFLAG_COPIED == 0 {
                return Err(unsupported(
                    self.path,
                    format!(
                        "guest offset {g:#x} is in a cluster a snapshot shares; pass --no-fix-gpt"
                    ),
                ));
            }
            if host != 0 {
                write_all_at(self.file, self.path, piece, host + within as u64)?;
                done += n;
                continue;
            }
            // A new cluster: what the guest sees there now, with the piece.
            let mut cluster = vec![0u8; self.cs as usize];
            if entry & OFLAG_ZERO == 0 && cstart < self.old_size {
                let upto = (self.old_size - cstart).min(self.cs) as usize;
                self.reader.read_at(&mut cluster[..upto], cstart)?;
            }
            cluster[within..within + n].copy_from_slice(piece);
            let data = self.alloc()?;
            write_all_at(self.file, self.path, &cluster, data)?;
            if l2 != 0 {
                self.links.push((l2 + l2i * 8, data | OFLAG_COPIED));
            } else {
                if !self.new_tables.contains_key(&l1i) {
                    let t = self.alloc()?;
                    self.new_tables
                        .insert(l1i, (t, vec![0u64; (self.cs / 8) as usize]));
                }
                let (_, t) = self.new_tables.get_mut(&l1i).expect("inserted above");
                t[l2i as usize] = data | OFLAG_COPIED;
            }
            done += n;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        // 1. New tables and refcounts, durable before anything points at them.
        for (t, entries) in self.new_tables.values() {
            let mut b = vec![0u8; self.cs as usize];
            for (k, e) in entries.iter().enumerate() {
                BigEndian::write_u64(&mut b[k * 8..k * 8 + 8], *e);
            }
            write_all_at(self.file, self.path, &b, *t)?;
        }
        for (at, b) in &self.blocks {
            write_all_at(self.file, self.path, b, *at)?;
        }
        sync(self.file, self.path)?;
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
        self.blocks.clear();
        sync(self.file, self.path)
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
    if let Some(p) = &gpt_plan {
        let mut ranges = vec![
            (
                p.backup_entries_lba * p.ss,
                (p.last_lba + 1 - p.backup_entries_lba) * p.ss,
            ),
            (0, 2 * p.ss),
        ];
        if p.rewrite_primary_entries {
            ranges.push((p.primary_entries_lba * p.ss, p.entries.len() as u64));
        }
        sink.preflight(&ranges)?;
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
        sink.write_blocks()?;
        sync(file, path)?;
        step();
    }
    // 2. The size.
    let mut size = [0u8; 8];
    BigEndian::write_u64(&mut size, new);
    write_all_at(file, path, &size, 24)?;
    sync(file, path)?;
    step();
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
    sink.write_blocks()?;
    sync(file, path)?;
    Ok(report)
}
