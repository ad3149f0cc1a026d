//! Partition tables through a resize: the GPT moved to the new end, the
//! last partition grown.

use super::*;

/// A GPT as it will be written for the new size.
#[derive(Debug)]
pub(super) struct GptPlan {
    pub(super) ss: u64,
    /// The new primary header (for LBA 1), the new backup header (for the
    /// last LBA), both CRCs done.
    pub(super) primary: Vec<u8>,
    pub(super) backup: Vec<u8>,
    pub(super) entries: Vec<u8>,
    pub(super) primary_entries_lba: u64,
    pub(super) backup_entries_lba: u64,
    pub(super) last_lba: u64,
    pub(super) first_usable: u64,
    pub(super) last_usable: u64,
    pub(super) entry_sectors: u64,
    /// Where the current backup's entries start and its header is (for the
    /// shrink check: they move, they are not data).
    pub(super) old_backup_entries_lba: u64,
    pub(super) old_backup_lba: u64,
    /// A whole backup copy was found there.
    pub(super) old_backup_found: bool,
    /// The primary's entries change (a grown partition, or rebuilt from
    /// the backup).
    pub(super) rewrite_primary_entries: bool,
    pub(super) grown: Option<(u32, u64, u64)>,
    /// The protective MBR sector, updated (`None` when it is hybrid or
    /// absent: then it is left alone).
    pub(super) pmbr: Option<[u8; 512]>,
}

/// Reads one GPT copy (header at `lba`) with every field checked; `None`
/// when it is not sound.
pub(super) fn read_gpt_copy(
    img: &dyn ImageReader,
    path: &Path,
    ss: u64,
    lba: u64,
    len: u64,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let at = lba
        .checked_mul(ss)
        .filter(|a| a.checked_add(ss).is_some_and(|e| e <= len))?;
    let mut hdr = vec![0u8; ss as usize];
    let _ = path;
    img.read_at(&mut hdr, at).ok()?;
    if &hdr[0..8] != b"EFI PART" {
        return None;
    }
    let hsize = LittleEndian::read_u32(&hdr[12..16]) as usize;
    if !(92..=ss as usize).contains(&hsize) {
        return None;
    }
    let mut h = hdr[..hsize].to_vec();
    let want = LittleEndian::read_u32(&h[16..20]);
    h[16..20].fill(0);
    if crc32fast::hash(&h) != want || LittleEndian::read_u64(&hdr[24..32]) != lba {
        return None;
    }
    let entries_lba = LittleEndian::read_u64(&hdr[72..80]);
    let count = LittleEndian::read_u32(&hdr[80..84]);
    let esize = LittleEndian::read_u32(&hdr[84..88]);
    if !(128..=4096).contains(&esize) || !esize.is_power_of_two() || count == 0 || count > 16384 {
        return None;
    }
    let bytes = u64::from(count) * u64::from(esize);
    let eat = entries_lba
        .checked_mul(ss)
        .filter(|a| a.checked_add(bytes).is_some_and(|e| e <= len))?;
    let mut entries = vec![0u8; bytes as usize];
    img.read_at(&mut entries, eat).ok()?;
    (crc32fast::hash(&entries) == LittleEndian::read_u32(&hdr[88..92])).then_some((hdr, entries))
}

/// Plans the GPT for a disk of `new` bytes: from the primary copy when it
/// is sound, else from the backup (an interrupted earlier run, or a
/// damaged primary), growing partition `grow` when asked.
pub(super) fn plan_gpt(
    img: &dyn ImageReader,
    path: &Path,
    ss: u64,
    old: u64,
    new: u64,
    grow: Option<u32>,
) -> Result<GptPlan> {
    let old_last = old / ss - 1;
    let primary = read_gpt_copy(img, path, ss, 1, old);
    let alt = primary
        .as_ref()
        .map(|(h, _)| LittleEndian::read_u64(&h[32..40]))
        .unwrap_or(old_last);
    let backup = read_gpt_copy(img, path, ss, alt, old)
        .or_else(|| read_gpt_copy(img, path, ss, old_last, old));
    let from_primary = primary.is_some();
    let (hdr, mut entries) = primary.or(backup.clone()).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            "both GPT copies are damaged; repair the table (gdisk) before resizing, or pass --no-fix-gpt",
        )
        .at_path(path)
    })?;
    let old_backup_entries_lba = backup
        .as_ref()
        .map_or(old_last, |(h, _)| LittleEndian::read_u64(&h[72..80]));
    let old_backup_lba = backup
        .as_ref()
        .map_or(old_last, |(h, _)| LittleEndian::read_u64(&h[24..32]));
    let hsize = LittleEndian::read_u32(&hdr[12..16]) as usize;
    let esize = LittleEndian::read_u32(&hdr[84..88]) as usize;
    let bytes = entries.len() as u64;
    let entry_sectors = bytes.div_ceil(ss);
    let first_usable = LittleEndian::read_u64(&hdr[40..48]);
    let primary_entries_lba = if from_primary {
        LittleEndian::read_u64(&hdr[72..80])
    } else {
        2
    };
    let last_lba = (new / ss)
        .checked_sub(1)
        .ok_or_else(|| invalid(path, "the new size holds no sector"))?;
    let backup_entries_lba = last_lba.saturating_sub(entry_sectors);
    let last_usable = backup_entries_lba.saturating_sub(1);
    if primary_entries_lba + entry_sectors > first_usable || last_usable <= first_usable {
        return Err(invalid(path, "the disk is too small for its GPT"));
    }
    // Grow the partition that ends last, if asked.
    let used = |e: &[u8]| e[0..16].iter().any(|&b| b != 0);
    let mut grown = None;
    let mut grown_first = 0u64;
    if let Some(n) = grow {
        let last = entries
            .chunks_exact(esize)
            .enumerate()
            .filter(|(_, e)| used(e))
            .map(|(i, e)| (i as u32 + 1, LittleEndian::read_u64(&e[40..48])))
            .max_by_key(|&(_, end)| end);
        match last {
            Some((num, end)) if num == n => {
                if end > last_usable {
                    return Err(invalid(
                        path,
                        format!("partition {n} already reaches past the new last usable sector"),
                    ));
                }
                let e = &mut entries[(n as usize - 1) * esize..n as usize * esize];
                grown_first = LittleEndian::read_u64(&e[32..40]);
                LittleEndian::write_u64(&mut e[40..48], last_usable);
                grown = Some((n, (end + 1) * ss, (last_usable + 1) * ss));
            }
            Some((num, _)) => {
                return Err(invalid(
                    path,
                    format!(
                        "--grow-partition {n}: partition {num} ends last; only that one can grow"
                    ),
                ))
            }
            None => {
                return Err(invalid(
                    path,
                    format!("--grow-partition {n}: the GPT has no partitions"),
                ))
            }
        }
    }
    if let Some(end) = entries
        .chunks_exact(esize)
        .filter(|e| used(e))
        .map(|e| LittleEndian::read_u64(&e[40..48]))
        .find(|&end| end > last_usable)
    {
        return Err(invalid(
            path,
            format!("a partition ends at LBA {end}, past the new last usable LBA {last_usable}; a GPT cannot list it there, even with --force: shrink or delete the partition first (or leave the table as it is with --no-fix-gpt)"),
        ));
    }
    let entries_crc = crc32fast::hash(&entries);
    let header = |my: u64, alt: u64, at_entries: u64| {
        let mut h = hdr.clone();
        LittleEndian::write_u64(&mut h[24..32], my);
        LittleEndian::write_u64(&mut h[32..40], alt);
        LittleEndian::write_u64(&mut h[48..56], last_usable);
        LittleEndian::write_u64(&mut h[72..80], at_entries);
        LittleEndian::write_u32(&mut h[88..92], entries_crc);
        h[16..20].fill(0);
        let crc = crc32fast::hash(&h[..hsize]);
        LittleEndian::write_u32(&mut h[16..20], crc);
        h
    };
    // The protective MBR: extended to the new end when it is purely
    // protective (a hybrid MBR describes partitions of its own).
    let mut mbr = [0u8; 512];
    img.read_at(&mut mbr, 0)?;
    let used_slots: Vec<usize> = (0..4).filter(|i| mbr[0x1be + i * 16 + 4] != 0).collect();
    let pmbr = match used_slots.as_slice() {
        [slot] if mbr[0x1be + slot * 16 + 4] == 0xee => {
            let e = 0x1be + slot * 16;
            let first = u64::from(LittleEndian::read_u32(&mbr[e + 8..e + 12]));
            let sectors = (new / ss).saturating_sub(first).min(u64::from(u32::MAX)) as u32;
            LittleEndian::write_u32(&mut mbr[e + 12..e + 16], sectors);
            Some(mbr)
        }
        // A hybrid MBR: its entry mirroring the grown partition (same
        // start, same old end) follows it, in LBA terms (CHS end: maximum).
        _ => grown.and_then(|(_, old_end, new_end)| {
            let slot = used_slots.iter().copied().find(|&s| {
                let e = 0x1be + s * 16;
                let first = u64::from(LittleEndian::read_u32(&mbr[e + 8..e + 12]));
                let n = u64::from(LittleEndian::read_u32(&mbr[e + 12..e + 16]));
                mbr[e + 4] != 0xee && first == grown_first && (first + n) * ss == old_end
            })?;
            let e = 0x1be + slot * 16;
            let sectors = (new_end / ss - grown_first).min(u64::from(u32::MAX)) as u32;
            LittleEndian::write_u32(&mut mbr[e + 12..e + 16], sectors);
            mbr[e + 5..e + 8].copy_from_slice(&[0xfe, 0xff, 0xff]);
            Some(mbr)
        }),
    };
    Ok(GptPlan {
        ss,
        primary: header(1, last_lba, primary_entries_lba),
        backup: header(last_lba, 1, backup_entries_lba),
        entries,
        primary_entries_lba,
        backup_entries_lba,
        last_lba,
        first_usable,
        last_usable,
        entry_sectors,
        old_backup_entries_lba,
        old_backup_lba,
        old_backup_found: backup.is_some(),
        rewrite_primary_entries: grown.is_some() || !from_primary,
        grown,
        pmbr,
    })
}

/// Writes a planned GPT: the new backup (entries, then header) first and
/// synced; then the primary's entries if they change; then the primary
/// header (one sector), which switches readers to the new table; then the
/// protective MBR.
pub(super) fn apply_gpt(sink: &mut dyn GuestSink, p: &GptPlan) -> Result<()> {
    let backup = p.backup_area();
    sink.write(p.backup_entries_lba * p.ss, &backup)?;
    sink.sync()?;
    step();
    sink.switch()?;
    if p.rewrite_primary_entries {
        sink.write(p.primary_entries_lba * p.ss, &p.entries)?;
        sink.sync()?;
        step();
    }
    sink.write(p.ss, &p.primary)?;
    sink.sync()?;
    step();
    if let Some(m) = &p.pmbr {
        sink.write(0, m)?;
        sink.sync()?;
    }
    // Past the new end, the old backup is garbage now: zeroed, so that a
    // re-run of an interrupted shrink does not count it as data. (Inside
    // the disk it stays, as qemu-img and sgdisk leave it.)
    if let Some((a, z)) = p
        .stale_backup()
        .filter(|&(a, _)| a >= (p.last_lba + 1) * p.ss)
    {
        sink.write(a, &vec![0u8; (z - a) as usize])?;
        sink.sync()?;
    }
    Ok(())
}

/// Where a planned GPT is written: a raw file, or a qcow2 image's guest
/// view. `switch` runs once the new backup is durable and before the
/// primary changes (qcow2 makes its new size visible there).
pub(super) trait GuestSink {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()>;
    fn sync(&mut self) -> Result<()>;
    fn switch(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A raw file is its own guest view.
pub(super) struct RawSink<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
}

impl GuestSink for RawSink<'_> {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        write_all_at(self.file, self.path, bytes, at)
    }
    fn sync(&mut self) -> Result<()> {
        sync(self.file, self.path)
    }
}

/// The sector writes that extend an MBR partition, and what grows.
#[derive(Debug)]
pub(super) struct MbrPlan {
    /// (byte offset, new sector), in the order they are written.
    pub(super) writes: Vec<(u64, [u8; 512])>,
    pub(super) grown: (u32, u64, u64),
}

/// Plans extending MBR partition `n` — the one that ends last on the disk:
/// a primary one, or the last logical one together with its extended
/// container — to the end of a disk of `new` bytes.
pub(super) fn plan_mbr_growth(
    file: &File,
    path: &Path,
    t: &crate::part::PartitionTable,
    n: u32,
    new: u64,
) -> Result<MbrPlan> {
    let p = t
        .partitions
        .iter()
        .find(|p| p.number == n && !p.extended)
        .ok_or_else(|| {
            invalid(
                path,
                format!("--grow-partition {n}: there is no partition {n}"),
            )
        })?;
    // Nothing else may lie after it (an extended container included).
    if let Some(q) = t
        .partitions
        .iter()
        .filter(|q| q.number != n)
        .filter(|q| !(q.extended && n > 4 && p.start >= q.start && p.end <= q.end))
        .find(|q| q.end > p.end || q.start >= p.end)
    {
        return Err(invalid(
            path,
            format!("--grow-partition {n}: partition {} lies after it; only the partition that ends last can grow", q.number),
        ));
    }
    let end_sector = new / 512;
    if end_sector > u64::from(u32::MAX) {
        return Err(invalid(
            path,
            "an MBR partition cannot reach past 2 TiB; convert the table to GPT first",
        ));
    }
    if end_sector * 512 <= p.start {
        return Err(invalid(
            path,
            format!("the new end lies before partition {n} starts"),
        ));
    }
    let sector_with = |sector_at: u64, slot: usize, base: u64| -> Result<[u8; 512]> {
        let mut s = [0u8; 512];
        read_exact_at(file, path, &mut s, sector_at, "partition table")?;
        let e = 0x1be + slot * 16;
        let lba = u64::from(LittleEndian::read_u32(&s[e + 8..e + 12]));
        let sectors = end_sector
            .checked_sub(base + lba)
            .ok_or_else(|| invalid(path, "the partition starts past the new end"))?;
        LittleEndian::write_u32(&mut s[e + 12..e + 16], sectors as u32);
        Ok(s)
    };
    let mut writes = Vec::new();
    if n <= 4 {
        writes.push((0, sector_with(0, n as usize - 1, 0)?));
    } else {
        // The container first (a larger container around the old logical
        // partition is still a valid table), then the logical one.
        let ext = t
            .partitions
            .iter()
            .find(|q| q.extended)
            .ok_or_else(|| invalid(path, "a logical partition without an extended one"))?;
        writes.push((0, sector_with(0, ext.number as usize - 1, 0)?));
        let (ebr, prev) = find_ebr(file, path, ext.start / 512, p.start / 512)?;
        writes.push((ebr * 512, sector_with(ebr * 512, 0, ebr)?));
        // The previous EBR's link entry spans the last EBR and its
        // partition (as fdisk writes it): it follows the new end too.
        if let Some(prev) = prev {
            // (Its start is relative to the extended partition's.)
            writes.push((prev * 512, sector_with(prev * 512, 1, ext.start / 512)?));
        }
    }
    Ok(MbrPlan {
        writes,
        grown: (n, p.end, end_sector * 512),
    })
}

/// The EBR (sector) whose first entry describes the partition starting at
/// `start` (sectors), walking the chain from the extended partition at
/// `ext`.
/// The sector of the extended boot record describing the logical
/// partition that starts at sector `start`, and of the one before it in
/// the chain (whose link entry points at it), if any.
pub(super) fn find_ebr(
    file: &File,
    path: &Path,
    ext: u64,
    start: u64,
) -> Result<(u64, Option<u64>)> {
    let mut ebr = ext;
    let mut prev = None;
    for _ in 0..128 {
        let mut s = [0u8; 512];
        read_exact_at(file, path, &mut s, ebr * 512, "extended boot record")?;
        let rel = u64::from(LittleEndian::read_u32(&s[0x1be + 8..0x1be + 12]));
        if ebr + rel == start {
            return Ok((ebr, prev));
        }
        prev = Some(ebr);
        let next = u64::from(LittleEndian::read_u32(&s[0x1be + 16 + 8..0x1be + 16 + 12]));
        if next == 0 {
            break;
        }
        ebr = ext + next;
    }
    Err(invalid(
        path,
        "the logical partition's extended boot record was not found",
    ))
}

/// The sectors a planned GPT writes, in guest order.
pub(super) fn gpt_patches(p: &GptPlan) -> Vec<(u64, Vec<u8>)> {
    let mut v = Vec::new();
    if let Some(m) = &p.pmbr {
        v.push((0, m.to_vec()));
    }
    v.push((p.ss, p.primary.clone()));
    if p.rewrite_primary_entries {
        v.push((p.primary_entries_lba * p.ss, p.entries.clone()));
    }
    let backup = p.backup_area();
    v.push((p.backup_entries_lba * p.ss, backup));
    v
}

/// Whether a GPT move is left unfinished on `img` (by an interrupted run,
/// or by a tool that only changed the size): a copy damaged, the backup
/// not at the end, or a protective MBR that does not cover the disk.
pub(super) fn gpt_unfinished(img: &dyn ImageReader) -> bool {
    let Some(g) = read_table(img).ok().flatten().and_then(|t| t.gpt) else {
        return false;
    };
    if !g.backup_at_end || !g.primary_ok || !g.backup_ok {
        return true;
    }
    // A pure protective MBR (one 0xEE entry, nothing else) covers the disk
    // from LBA 1 to its end (or 2^32 - 1 sectors).
    let mut mbr = [0u8; 512];
    if img.read_at(&mut mbr, 0).is_err() || mbr[510..512] != [0x55, 0xaa] {
        return false;
    }
    let entries: Vec<&[u8]> = (0..4).map(|k| &mbr[446 + k * 16..462 + k * 16]).collect();
    let used: Vec<&&[u8]> = entries.iter().filter(|e| e[4] != 0).collect();
    match used.as_slice() {
        [e] if e[4] == 0xee => {
            let sectors = u64::from(LittleEndian::read_u32(&e[12..16]));
            let want = (img.size() / g.sector_size - 1).min(u64::from(u32::MAX));
            sectors != want
        }
        _ => false,
    }
}

impl GptPlan {
    /// The new backup's sectors: the entry array, then the header in the
    /// disk's last sector.
    fn backup_area(&self) -> Vec<u8> {
        let mut area = self.entries.clone();
        area.resize(
            ((self.last_lba - self.backup_entries_lba) * self.ss) as usize,
            0,
        );
        area.extend_from_slice(&self.backup);
        area
    }

    /// When guest byte `byte` lies in a stale copy of this table (a
    /// backup header with the same disk GUID and a sound CRC, or the entry
    /// array before it): where that copy ends.
    pub(super) fn stale_copy_around(&self, img: &dyn ImageReader, byte: u64) -> Option<u64> {
        let ss = self.ss;
        let guid = &self.primary[56..72];
        let lba = byte / ss;
        // The header is at most the entry array's length after the byte.
        let span = self.entry_sectors + 1;
        let mut h = vec![0u8; ss as usize];
        for at in lba..lba + span {
            if (at + 1) * ss > img.size() || img.read_at(&mut h, at * ss).is_err() {
                return None;
            }
            if &h[0..8] != b"EFI PART" || &h[56..72] != guid {
                continue;
            }
            let hsize = (LittleEndian::read_u32(&h[12..16]) as usize).clamp(92, ss as usize);
            let mut c = h[..hsize].to_vec();
            c[16..20].fill(0);
            let entries = LittleEndian::read_u64(&h[72..80]);
            let sound = crc32fast::hash(&c) == LittleEndian::read_u32(&h[16..20]);
            if sound && LittleEndian::read_u64(&h[24..32]) == at && entries <= lba {
                return Some((at + 1) * ss);
            }
        }
        None
    }

    /// The old backup copy's bytes when the move leaves them behind (a
    /// whole copy was there, clear of the new backup and the primary).
    pub(super) fn stale_backup(&self) -> Option<(u64, u64)> {
        let (a, z) = self.old_backup_bytes();
        let new_backup = (
            self.backup_entries_lba * self.ss,
            (self.last_lba + 1) * self.ss,
        );
        let primary = (
            0,
            (self.primary_entries_lba * self.ss + self.entries.len() as u64).max(2 * self.ss),
        );
        let clear = |(b, e): (u64, u64)| z <= b || a >= e;
        (self.old_backup_found && clear(new_backup) && clear(primary)).then_some((a, z))
    }

    /// The bytes the current backup copy (entries and header) occupies.
    pub(super) fn old_backup_bytes(&self) -> (u64, u64) {
        let a = self.old_backup_entries_lba.min(self.old_backup_lba);
        let b = self.old_backup_entries_lba.max(self.old_backup_lba);
        (a * self.ss, (b + 1) * self.ss)
    }
}

/// The plan for moving the GPT inside `img` (in a container such as "a
/// qcow2"), when there is one and it is to move; `--grow-partition` needs
/// one there.
pub(super) fn gpt_plan_inside(
    img: &dyn ImageReader,
    path: &Path,
    old: u64,
    new: u64,
    opts: &ResizeOptions,
    container: &str,
) -> Result<Option<GptPlan>> {
    let plan = match read_table(img) {
        Ok(Some(t)) if t.kind == TableKind::Gpt && opts.fix_gpt => {
            let ss = t.gpt.as_ref().map_or(512, |g| g.sector_size);
            Some(plan_gpt(img, path, ss, old, new, opts.grow_partition)?)
        }
        _ => None,
    };
    if let (Some(n), None) = (opts.grow_partition, &plan) {
        return Err(unsupported(
            path,
            format!(
                "--grow-partition {n}: inside {container} only a GPT partition can grow for now"
            ),
        ));
    }
    Ok(plan)
}
