//! Resizing images in place, crash-safe: every step is ordered so that a
//! kill at any point leaves either the old image or the new one.
//!
//! - raw: the file's length changes (`ftruncate`; `falloc`/`full`
//!   preallocation for growth). A GPT is moved to the new end: the backup
//!   entries and header are written and synced first, then the primary
//!   header (one sector) points at them. Growing writes the new end before
//!   the table moves; shrinking moves the table before the end is cut.
//! - qcow2: growing within the L1 table's clusters changes the header's
//!   `size` and `l1_size` in one 16-byte write (the L1 slack is zeroed and
//!   synced first). Nothing else is touched.

use std::fs::{File, OpenOptions};
use std::path::Path;

use byteorder::{BigEndian, ByteOrder, LittleEndian};
use vmshift_model::DiskFormat;

use crate::block::ImageReader;
use crate::error::{Error, ErrorKind, Result};
use crate::fileio::{file_len, read_exact_at, seek_data_hole, write_all_at};
use crate::part::{read_table, TableKind};
use crate::raw::RawReader;

/// How new space is provided when growing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Sparse: nothing is allocated.
    #[default]
    Off,
    /// Metadata only (qcow2); for raw the same as `Off`.
    Metadata,
    /// Space reserved with fallocate.
    Falloc,
    /// Zeros written.
    Full,
}

/// What a resize may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeOptions {
    /// Shrinking is allowed.
    pub shrink: bool,
    /// Shrink even when data or a partition lies beyond the new end.
    pub force: bool,
    /// How new space is provided.
    pub prealloc: Prealloc,
    /// Move a GPT's backup header and entries to the new end.
    pub fix_gpt: bool,
    /// Extend this partition (the one that ends last) into the new space.
    pub grow_partition: Option<u32>,
}

impl Default for ResizeOptions {
    fn default() -> Self {
        ResizeOptions {
            shrink: false,
            force: false,
            prealloc: Prealloc::Off,
            fix_gpt: true,
            grow_partition: None,
        }
    }
}

/// What a resize did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResizeReport {
    /// Bytes before.
    pub old_size: u64,
    /// Bytes after.
    pub new_size: u64,
    /// The GPT's backup header moved to the new end.
    pub gpt_moved: bool,
    /// A partition that grew: (number, old end, new end) in bytes.
    pub partition_grown: Option<(u32, u64, u64)>,
    /// Things the user should know (a table left alone, …).
    pub notes: Vec<String>,
}

/// A smaller size needs `--shrink`.
fn needs_shrink(path: &Path, old: u64, new: u64, opts: &ResizeOptions) -> Result<()> {
    if new < old && !opts.shrink {
        return Err(invalid(
            path,
            format!("{new} bytes is smaller than the image's {old}; shrinking needs --shrink"),
        ));
    }
    Ok(())
}

/// The image at `path` opened for reading as `format`.
fn open_as(path: &Path, format: DiskFormat) -> Result<Box<dyn ImageReader>> {
    crate::open::open_image(path, Some(format), &crate::open::OpenOptions::default())
}

fn invalid(path: &Path, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, msg).at_path(path)
}

/// A pause between the steps of a resize, for the kill tests
/// (`VMSHIFT_RESIZE_STEP_DELAY_MS`); nothing otherwise.
fn step() {
    if let Some(ms) = std::env::var("VMSHIFT_RESIZE_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn sync(file: &File, path: &Path) -> Result<()> {
    file.sync_all()
        .map_err(|e| Error::io(path, "syncing the image", e))
}

/// Resizes the image at `path` (in format `format`) to `new_size` bytes.
pub fn resize(
    path: &Path,
    format: DiskFormat,
    new_size: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    // The file itself, not a symlink to it: a rewritten stream replaces
    // the real file.
    if !new_size.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("{new_size} bytes is not a whole number of 512-byte sectors"),
        ));
    }
    let real = path
        .canonicalize()
        .map_err(|e| Error::io(path, "finding the image", e))?;
    let path = real.as_path();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "opening the image for writing", e))?;
    lock_like_qemu(&file, path)?;
    match format {
        DiskFormat::Raw => resize_raw(file, path, new_size, opts),
        DiskFormat::Qcow2 => resize_qcow2(file, path, new_size, opts),
        DiskFormat::Vmdk => resize_vmdk(file, path, new_size, opts),
    }
}

fn resize_raw(file: File, path: &Path, new: u64, opts: &ResizeOptions) -> Result<ResizeReport> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "reading file metadata", e))?;
    if !meta.is_file() {
        return Err(invalid(
            path,
            "not a regular file; only image files are resized",
        ));
    }
    let old = file_len(&file, path)?;
    let mut report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    needs_shrink(path, old, new, opts)?;
    if opts.prealloc == Prealloc::Metadata {
        return Err(invalid(
            path,
            "--preallocation metadata applies to qcow2; a raw image has no metadata (use falloc or full)",
        ));
    }
    // The partition table matters only to what is asked: a table vmshift
    // cannot read does not stop a plain resize (as with qemu-img).
    let needs_table = opts.grow_partition.is_some() || new < old;
    let table = {
        let reader = RawReader::open(
            file.try_clone()
                .map_err(|e| Error::io(path, "reopening the image", e))?,
            path,
        )?;
        match read_table(&reader) {
            Ok(t) => t,
            Err(e) if !needs_table => {
                report.notes.push(format!(
                    "the partition table is unreadable and was left as it is: {e}"
                ));
                None
            }
            Err(e) => return Err(e),
        }
    };
    let gpt = table
        .as_ref()
        .filter(|t| t.kind == TableKind::Gpt && opts.fix_gpt)
        .and_then(|t| t.gpt.as_ref());
    // Nothing to do: same size, and any GPT already whole and at the end.
    let gpt_needs_fix = gpt.is_some_and(|g| !g.backup_at_end || !g.primary_ok || !g.backup_ok);
    if new == old && opts.grow_partition.is_none() && !gpt_needs_fix {
        return Ok(report);
    }
    // Plan everything before the first write: a refused resize changes
    // nothing.
    let gpt_plan = match gpt {
        Some(g) => {
            let reader = RawReader::open(
                file.try_clone()
                    .map_err(|e| Error::io(path, "reopening the image", e))?,
                path,
            )?;
            Some(plan_gpt(
                &reader,
                path,
                g.sector_size,
                old,
                new,
                opts.grow_partition,
            )?)
        }
        None => None,
    };
    let mbr_plan = match (opts.grow_partition, &gpt_plan, &table) {
        (Some(n), None, Some(t)) if t.kind == TableKind::Mbr => {
            Some(plan_mbr_growth(&file, path, t, n, new)?)
        }
        (Some(n), None, _) => {
            return Err(invalid(
                path,
                format!(
                    "--grow-partition {n}: the image has no partition table vmshift can change"
                ),
            ))
        }
        _ => None,
    };
    if new < old && !opts.force {
        shrink_checks(&file, path, table.as_ref(), gpt_plan.as_ref(), old, new)?;
    }
    if let Some(p) = gpt_plan.as_ref().filter(|p| p.last_usable < p.first_usable) {
        return Err(invalid(
            path,
            format!(
                "the disk is too small for its GPT ({} sectors of entries)",
                p.entry_sectors
            ),
        ));
    }

    // Grow: the new end exists before anything points at it.
    if new > old {
        file.set_len(new)
            .map_err(|e| Error::io(path, "growing the image", e))?;
        preallocate(&file, path, old, new, opts.prealloc)?;
        sync(&file, path)?;
        step();
    }
    if let Some(plan) = gpt_plan {
        report.partition_grown = plan.grown;
        apply_gpt(&mut RawSink { file: &file, path }, &plan)?;
        report.gpt_moved = true;
    }
    if let Some(plan) = mbr_plan {
        report.partition_grown = Some(plan.grown);
        for (at, sector) in &plan.writes {
            write_all_at(&file, path, sector, *at)?;
            sync(&file, path)?;
            step();
        }
    }
    // Shrink: the table has moved in; now cut.
    if new < old {
        file.set_len(new)
            .map_err(|e| Error::io(path, "shrinking the image", e))?;
        sync(&file, path)?;
    }
    Ok(report)
}

fn preallocate(file: &File, path: &Path, from: u64, to: u64, how: Prealloc) -> Result<()> {
    match how {
        Prealloc::Off => Ok(()),
        Prealloc::Metadata => Err(invalid(
            path,
            "--preallocation metadata applies to qcow2; a raw image has no metadata (use falloc or full)",
        )),
        Prealloc::Falloc => crate::raw::fallocate(file, path, from, to - from),
        Prealloc::Full => {
            let zeros = vec![0u8; 1 << 20];
            let mut at = from;
            while at < to {
                let n = (to - at).min(zeros.len() as u64) as usize;
                write_all_at(file, path, &zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
    }
}

/// Refuses a shrink that would cut off a partition or stored data (other
/// than the GPT's own backup, which moves).
fn shrink_checks(
    file: &File,
    path: &Path,
    table: Option<&crate::part::PartitionTable>,
    gpt: Option<&GptPlan>,
    old: u64,
    new: u64,
) -> Result<()> {
    if let Some(p) = table.and_then(|t| t.partitions.iter().find(|p| p.end > new)) {
        return Err(invalid(
            path,
            format!(
                "partition {} ends at byte {}, beyond the new end ({new}); shrink the partition first, or pass --force",
                p.number, p.end
            ),
        ));
    }
    // The old backup array and header are expected at the old end; the
    // file-system block that holds the array's start counts with them.
    let keep_from = match gpt {
        Some(g) => (g.old_backup_entries_lba * g.ss) / 4096 * 4096,
        None => old,
    };
    // Holes are skipped; what the file system stores is read, and only
    // non-zero bytes count (blocks of zeros are no data to lose).
    let mut pos = new;
    let mut buf = vec![0u8; 1 << 20];
    while pos < keep_from {
        let Some(d) = seek_data_hole(file, pos, true).filter(|&d| d < keep_from) else {
            break;
        };
        let h = seek_data_hole(file, d, false)
            .unwrap_or(keep_from)
            .min(keep_from);
        let mut at = d;
        while at < h {
            let n = (h - at).min(buf.len() as u64) as usize;
            read_exact_at(file, path, &mut buf[..n], at, "data")?;
            if let Some(k) = buf[..n].iter().position(|&b| b != 0) {
                return Err(invalid(
                    path,
                    format!(
                        "data is stored at byte {}, beyond the new end ({new}); pass --force to cut it off",
                        at + k as u64
                    ),
                ));
            }
            at += n as u64;
        }
        pos = h.max(d + 1);
    }
    Ok(())
}

/// A GPT as it will be written for the new size.
#[derive(Debug)]
struct GptPlan {
    ss: u64,
    /// The new primary header (for LBA 1), the new backup header (for the
    /// last LBA), both CRCs done.
    primary: Vec<u8>,
    backup: Vec<u8>,
    entries: Vec<u8>,
    primary_entries_lba: u64,
    backup_entries_lba: u64,
    last_lba: u64,
    first_usable: u64,
    last_usable: u64,
    entry_sectors: u64,
    /// Where the current backup's entries start (for the shrink check).
    old_backup_entries_lba: u64,
    /// The primary's entries change (a grown partition, or rebuilt from
    /// the backup).
    rewrite_primary_entries: bool,
    grown: Option<(u32, u64, u64)>,
    /// The protective MBR sector, updated (`None` when it is hybrid or
    /// absent: then it is left alone).
    pmbr: Option<[u8; 512]>,
}

/// Reads one GPT copy (header at `lba`) with every field checked; `None`
/// when it is not sound.
fn read_gpt_copy(
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
fn plan_gpt(
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
            format!("a partition ends at LBA {end}, past the new last usable LBA {last_usable}; shrink it first"),
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
        _ => None,
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
        rewrite_primary_entries: grown.is_some() || !from_primary,
        grown,
        pmbr,
    })
}

/// Writes a planned GPT: the new backup (entries, then header) first and
/// synced; then the primary's entries if they change; then the primary
/// header (one sector), which switches readers to the new table; then the
/// protective MBR.
fn apply_gpt(sink: &mut dyn GuestSink, p: &GptPlan) -> Result<()> {
    let mut backup = p.entries.clone();
    backup.resize(((p.last_lba - p.backup_entries_lba) * p.ss) as usize, 0);
    backup.extend_from_slice(&p.backup);
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
    Ok(())
}

/// Where a planned GPT is written: a raw file, or a qcow2 image's guest
/// view. `switch` runs once the new backup is durable and before the
/// primary changes (qcow2 makes its new size visible there).
trait GuestSink {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()>;
    fn sync(&mut self) -> Result<()>;
    fn switch(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A raw file is its own guest view.
struct RawSink<'a> {
    file: &'a File,
    path: &'a Path,
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
struct MbrPlan {
    /// (byte offset, new sector), in the order they are written.
    writes: Vec<(u64, [u8; 512])>,
    grown: (u32, u64, u64),
}

/// Plans extending MBR partition `n` — the one that ends last on the disk:
/// a primary one, or the last logical one together with its extended
/// container — to the end of a disk of `new` bytes.
fn plan_mbr_growth(
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
        let ebr = find_ebr(file, path, ext.start / 512, p.start / 512)?;
        writes.push((ebr * 512, sector_with(ebr * 512, 0, ebr)?));
    }
    Ok(MbrPlan {
        writes,
        grown: (n, p.end, end_sector * 512),
    })
}

/// The EBR (sector) whose first entry describes the partition starting at
/// `start` (sectors), walking the chain from the extended partition at
/// `ext`.
fn find_ebr(file: &File, path: &Path, ext: u64, start: u64) -> Result<u64> {
    let mut ebr = ext;
    for _ in 0..128 {
        let mut s = [0u8; 512];
        read_exact_at(file, path, &mut s, ebr * 512, "extended boot record")?;
        let rel = u64::from(LittleEndian::read_u32(&s[0x1be + 8..0x1be + 12]));
        if ebr + rel == start {
            return Ok(ebr);
        }
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

fn resize_qcow2(file: File, path: &Path, new: u64, opts: &ResizeOptions) -> Result<ResizeReport> {
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

fn unsupported(path: &Path, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg).at_path(path)
}

/// VMDK: a hosted sparse file grows in place (capacity, grain directory,
/// embedded descriptor); a stream is rewritten to a temp file and renamed;
/// a flat disk's extent file is resized like a raw disk (GPT included) and
/// its descriptor replaced atomically.
fn resize_vmdk(file: File, path: &Path, new: u64, opts: &ResizeOptions) -> Result<ResizeReport> {
    let mut head = [0u8; 512];
    let n = crate::fileio::read_up_to_at(&file, path, &mut head, 0)?;
    if n >= 4 && &head[0..4] == b"KDMV" {
        return resize_vmdk_sparse(file, path, &head, new, opts);
    }
    // A descriptor file.
    let len = file_len(&file, path)?;
    if len > crate::vmdk::descriptor::MAX_DESCRIPTOR_BYTES as u64 {
        return Err(invalid(path, "not a VMDK descriptor (too large)"));
    }
    let mut text = vec![0u8; len as usize];
    read_exact_at(&file, path, &mut text, 0, "descriptor")?;
    let ctx = crate::error::Ctx::new(path);
    let d = crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, 0)?;
    if d.parent_hint().is_some() {
        return Err(unsupported(path, "a delta disk follows its parent's size; resize the base disk and commit or recreate the delta"));
    }
    let split = matches!(
        d.create_type(),
        "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat"
    );
    if split {
        return grow_vmdk_set(path, &d, new, opts);
    }
    let ext = match d.extents.as_slice() {
        [e] if e.kind == crate::vmdk::descriptor::ExtentType::Flat && e.offset == 0 => e,
        [_] => {
            return Err(unsupported(
                path,
                "resizing this VMDK's extent type is not supported yet (monolithicFlat/vmfs flat, monolithicSparse and streamOptimized are)",
            ))
        }
        _ => {
            return Err(unsupported(
                path,
                "resizing a multi-extent VMDK (twoGbMaxExtent*) is not supported yet; convert it to a single-file subformat first",
            ))
        }
    };
    let name = ext.file.clone().unwrap_or_default();
    let flat = crate::gate::Gate::new().resolve(path, &name, "extent")?;
    let new_text = d
        .resized_text(new / 512)
        .ok_or_else(|| invalid(path, "the descriptor's extent line could not be rewritten"))?;
    let write_descriptor = || -> Result<()> {
        let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
        std::io::Write::write_all(&mut f, new_text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(path, "writing the descriptor", e))?;
        out.commit()
    };
    let old = ext.sectors * 512;
    if new < old {
        // Every check first (data and partitions beyond the new end), then
        // the descriptor: a shorter disk over a longer file reads.
        let ff = OpenOptions::new()
            .read(true)
            .open(&flat)
            .map_err(|e| Error::io(&flat, "opening the extent", e))?;
        let table = read_table(&RawReader::open(
            ff.try_clone()
                .map_err(|e| Error::io(&flat, "reopening", e))?,
            &flat,
        )?)?;
        if table.as_ref().is_some_and(|t| t.kind == TableKind::Gpt) && opts.fix_gpt {
            return Err(unsupported(
                path,
                "shrinking a flat VMDK that holds a GPT is not supported yet: shrink a raw copy",
            ));
        }
        if !opts.force {
            shrink_checks(&ff, &flat, table.as_ref(), None, old, new)?;
        }
        write_descriptor()?;
        step();
        let mut report = resize(&flat, DiskFormat::Raw, new, opts)?;
        report.old_size = old;
        return Ok(report);
    }
    // Growing: the extent file first (with any GPT moved), then the
    // descriptor that says so.
    let mut report = resize(&flat, DiskFormat::Raw, new, opts)?;
    report.old_size = old;
    step();
    write_descriptor()?;
    Ok(report)
}

fn resize_vmdk_sparse(
    file: File,
    path: &Path,
    head: &[u8; 512],
    new: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    let u32_at = |o: usize| LittleEndian::read_u32(&head[o..o + 4]);
    let u64_at = |o: usize| LittleEndian::read_u64(&head[o..o + 8]);
    let (flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd) = (
        u32_at(8),
        u64_at(12),
        u64_at(20),
        u64_at(28),
        u64_at(36),
        u64::from(u32_at(44)),
        u64_at(48),
        u64_at(56),
    );
    let old = capacity * 512;
    let report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    if new == old {
        return Ok(report);
    }
    needs_shrink(path, old, new, opts)?;
    if opts.prealloc != Prealloc::Off {
        return Err(unsupported(
            path,
            "a sparse VMDK grows without preallocation for now",
        ));
    }
    // The reader checks the whole image (and names a parent, if any).
    let reader = open_as(path, DiskFormat::Vmdk)?;
    if reader.backing().is_some() {
        return Err(unsupported(
            path,
            "a delta disk follows its parent's size; resize the base disk",
        ));
    }
    // A GPT inside follows the new end (planned and checked now).
    let gpt_plan = match read_table(reader.as_ref()) {
        Ok(Some(t)) if t.kind == TableKind::Gpt && opts.fix_gpt => {
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
    if let (Some(n), None) = (opts.grow_partition, &gpt_plan) {
        return Err(unsupported(
            path,
            format!(
                "--grow-partition {n}: inside a sparse VMDK only a GPT partition can grow for now"
            ),
        ));
    }
    let mut report = report;
    report.gpt_moved = gpt_plan.is_some();
    report.partition_grown = gpt_plan.as_ref().and_then(|p| p.grown);
    if new < old && !opts.force {
        // Nothing may be cut off: no partition, no stored data (the GPT's
        // own backup moves).
        if let Some(p) = read_table(reader.as_ref())
            .ok()
            .flatten()
            .and_then(|t| t.partitions.into_iter().find(|p| p.end > new))
        {
            return Err(invalid(
                path,
                format!("partition {} ends at byte {}, beyond the new end ({new}); shrink the partition first, or pass --force", p.number, p.end),
            ));
        }
        let exempt = gpt_plan
            .as_ref()
            .map_or(old, |p| p.old_backup_entries_lba * p.ss);
        let mut at = new;
        while at < exempt {
            let e = reader.map(at, exempt - at)?;
            if matches!(
                e.state,
                crate::block::BlockState::Data | crate::block::BlockState::Compressed
            ) {
                // Stored, but only non-zero bytes are data to lose.
                let mut p = at;
                let end = at + e.len;
                let mut buf = vec![0u8; 1 << 20];
                while p < end {
                    let n = (end - p).min(buf.len() as u64) as usize;
                    reader.read_at(&mut buf[..n], p)?;
                    if let Some(k) = buf[..n].iter().position(|&b| b != 0) {
                        return Err(invalid(
                            path,
                            format!(
                                "data is stored at byte {}, beyond the new end ({new}); pass --force to cut it off",
                                p + k as u64
                            ),
                        ));
                    }
                    p += n as u64;
                }
            }
            at += e.len;
        }
    }
    if flags & (1 << 16) != 0 {
        // streamOptimized: a stream is written once, front to back; the
        // GPT's new sectors go into the copy.
        drop(reader);
        let patches = gpt_plan.as_ref().map(gpt_patches).unwrap_or_default();
        // The stream's own disk database (uuid, hardware version, adapter)
        // carries over.
        let ddb = if desc_off != 0 && desc_size != 0 && desc_size <= 2048 {
            let mut text = vec![0u8; (desc_size * 512) as usize];
            read_exact_at(
                &file,
                path,
                &mut text,
                desc_off * 512,
                "embedded descriptor",
            )?;
            let ctx = crate::error::Ctx::new(path);
            crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, desc_off * 512)
                .ok()
                .map(|d| d.ddb)
                .filter(|d| !d.is_empty())
        } else {
            None
        };
        return rewrite_stream(path, new, patches, ddb).map(|()| report);
    }
    if grain == 0 || gtes == 0 {
        return Err(invalid(path, "a sparse header without grain geometry"));
    }
    if new < old {
        return shrink_vmdk_sparse(&file, path, head, new, reader, gpt_plan.as_ref(), report);
    }
    let per = gtes * grain;
    let (old_n, new_n) = (capacity.div_ceil(per), (new / 512).div_ceil(per));
    if new_n > 1 << 22 {
        return Err(invalid(
            path,
            format!("{new} bytes needs {new_n} grain tables; too many for one sparse file"),
        ));
    }
    // The embedded descriptor must take the new extent line; check before
    // writing anything.
    let descriptor = if desc_off != 0 && desc_size != 0 {
        let area = desc_size
            .checked_mul(512)
            .filter(|&n| n <= crate::vmdk::descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1)
            .ok_or_else(|| invalid(path, "descriptor area too large"))?;
        let mut text = vec![0u8; area as usize];
        read_exact_at(
            &file,
            path,
            &mut text,
            desc_off * 512,
            "embedded descriptor",
        )?;
        let ctx = crate::error::Ctx::new(path);
        let d = crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, desc_off * 512)?;
        let t = d.resized_text(new / 512).ok_or_else(|| {
            invalid(
                path,
                "the embedded descriptor's extent line could not be rewritten",
            )
        })?;
        if t.len() > text.len() {
            return Err(unsupported(
                path,
                "the new embedded descriptor does not fit its area",
            ));
        }
        let mut out = vec![0u8; text.len()];
        out[..t.len()].copy_from_slice(t.as_bytes());
        Some(out)
    } else {
        None
    };
    let old_bytes = (old_n * 4).div_ceil(512) * 512;
    let mut hdr = *head;
    let dirs: Vec<(u64, usize)> = [(gd, 56usize), (rgd, 48)]
        .into_iter()
        .filter(|&(sector, _)| sector != 0 && sector != u64::MAX)
        .collect();
    // Every new directory entry gets an empty grain table, as VMware and
    // QEMU expect of a hosted sparse file (QEMU cannot write through an
    // entry of 0). Tables and any moved directories go at the end.
    let gt_bytes = (gtes * 4).div_ceil(512) * 512;
    let mut end = file_len(&file, path)?.div_ceil(512) * 512;
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for &(sector, field) in &dirs {
        let mut entries = vec![0u8; (new_n * 4) as usize];
        read_exact_at(
            &file,
            path,
            &mut entries[..(old_n * 4) as usize],
            sector * 512,
            "grain directory",
        )?;
        for k in old_n..new_n {
            LittleEndian::write_u32(
                &mut entries[(k * 4) as usize..(k * 4 + 4) as usize],
                (end / 512) as u32,
            );
            end += gt_bytes;
        }
        if new_n * 4 <= old_bytes {
            writes.push((
                sector * 512 + old_n * 4,
                entries[(old_n * 4) as usize..].to_vec(),
            ));
        } else {
            let mut table = entries;
            table.resize(((new_n * 4).div_ceil(512) * 512) as usize, 0);
            writes.push((end, table.clone()));
            LittleEndian::write_u64(&mut hdr[field..field + 8], end / 512);
            end += table.len() as u64;
        }
    }
    if end / 512 > u64::from(u32::MAX) {
        return Err(invalid(
            path,
            "the grown file would pass the 2 TiB a sparse VMDK can address",
        ));
    }
    // The new tables read as zeros: the file's new end is a hole.
    file.set_len(end)
        .map_err(|e| Error::io(path, "extending the file", e))?;
    for (at, bytes) in &writes {
        write_all_at(&file, path, bytes, *at)?;
    }
    sync(&file, path)?;
    step();
    // The header (one sector) switches to the new capacity and directories.
    LittleEndian::write_u64(&mut hdr[12..20], new / 512);
    write_all_at(&file, path, &hdr, 0)?;
    sync(&file, path)?;
    step();
    // The embedded descriptor's extent line follows (QEMU and vmshift read
    // the capacity from the header).
    if let Some(area) = descriptor {
        write_all_at(&file, path, &area, desc_off * 512)?;
        sync(&file, path)?;
    }
    if let Some(plan) = gpt_plan {
        let gd_now = LittleEndian::read_u64(&hdr[56..64]);
        let rgd_now = LittleEndian::read_u64(&hdr[48..56]);
        let mut sink = VmdkSink {
            file: &file,
            path,
            reader,
            old_size: old,
            grain: grain * 512,
            gtes,
            gd: gd_now,
            rgd: (flags & 2 != 0 && rgd_now != 0).then_some(rgd_now),
            file_end: file_len(&file, path)?.div_ceil(512) * 512,
            links: Vec::new(),
        };
        apply_gpt(&mut sink, &plan)?;
    }
    Ok(report)
}

/// Rewrites a streamOptimized VMDK at a larger size: the stream is copied
/// to a temp file beside it (in VMware's layout, as `convert` writes it)
/// and renamed over it.
fn rewrite_stream(
    path: &Path,
    new: u64,
    patches: Vec<(u64, Vec<u8>)>,
    ddb: Option<Vec<(String, String)>>,
) -> Result<()> {
    use crate::block::ImageWriter;
    use crate::output::AtomicOutput;
    use crate::vmdk::writer::{Subformat, VmdkOptions, VmdkWriter};
    let src = open_as(path, DiskFormat::Vmdk)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (out, f) = AtomicOutput::create(path, true)?;
    let mut writer: Box<dyn ImageWriter> = Box::new(VmdkWriter::create(
        f,
        out.temp_path(),
        new,
        &name,
        VmdkOptions {
            subformat: Subformat::StreamOptimized,
            ddb,
            ..VmdkOptions::default()
        },
    )?);
    let overlay = Overlay {
        inner: src.as_ref(),
        size: new,
        patches,
    };
    crate::engine::convert(
        &overlay,
        writer.as_mut(),
        &crate::engine::ConvertOptions::default(),
        &|_, _| {},
    )?;
    writer.finish()?;
    out.commit()
}

/// Grows a twoGbMaxExtent set by adding extents (2 GiB each, the last one
/// smaller): the new files are written and synced first, the descriptor
/// that lists them replaces the old one last. Existing extents are not
/// touched, so until the descriptor lands the old set is intact.
fn grow_vmdk_set(
    path: &Path,
    d: &crate::vmdk::descriptor::Descriptor,
    new: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    use crate::block::ImageWriter;
    use crate::vmdk::descriptor::ExtentType;
    use crate::vmdk::writer::{Subformat, VmdkOptions, VmdkWriter};
    const SPLIT: u64 = 2 << 30;
    let old: u64 = d.extents.iter().map(|e| e.sectors * 512).sum();
    let report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    if new == old {
        return Ok(report);
    }
    if new < old {
        return shrink_vmdk_set(path, d, old, new, opts);
    }
    if opts.grow_partition.is_some() || opts.prealloc != Prealloc::Off {
        return Err(unsupported(
            path,
            "a twoGbMaxExtent set grows without preallocation or partition changes for now",
        ));
    }
    let sparse = d.extents.iter().all(|e| e.kind == ExtentType::Sparse);
    let flat = d
        .extents
        .iter()
        .all(|e| e.kind == ExtentType::Flat && e.type_word == "FLAT");
    if !sparse && !flat {
        return Err(unsupported(
            path,
            "a set mixing extent types is not resized",
        ));
    }
    let reader = open_as(path, DiskFormat::Vmdk)?;
    if opts.fix_gpt && read_table(reader.as_ref())?.is_some_and(|t| t.kind == TableKind::Gpt) {
        return Err(unsupported(
            path,
            "the image holds a GPT, and moving it inside a twoGbMaxExtent set is not supported yet: pass --no-fix-gpt, or resize a raw copy",
        ));
    }
    drop(reader);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".vmdk").unwrap_or(&name).to_string();
    let mut sides = crate::output::SideOutputs::new(path, false);
    let mut lines = Vec::new();
    let mut at = old;
    let mut n = d.extents.len() + 1;
    // A flat set's last extent fills up to 2 GiB first (its file may be
    // longer than the old descriptor says; the old set still reads), so
    // only the set's last extent is short, as VMware lays sets out.
    let mut last_sectors = None;
    if let (true, Some(last)) = (flat, d.extents.last()) {
        let have = last.sectors * 512;
        if have < SPLIT {
            let fill = (SPLIT - have).min(new - old);
            let file = crate::gate::Gate::new().resolve(
                path,
                last.file.as_deref().unwrap_or(""),
                "extent",
            )?;
            let f = OpenOptions::new()
                .write(true)
                .open(&file)
                .map_err(|e| Error::io(&file, "opening the extent", e))?;
            let len = file_len(&f, &file)?;
            if len < have + fill {
                f.set_len(have + fill)
                    .map_err(|e| Error::io(&file, "growing the extent", e))?;
                sync(&f, &file)?;
            }
            last_sectors = Some((have + fill) / 512);
            at += fill;
        }
    }
    while at < new {
        let len = (new - at).min(SPLIT);
        let extent = format!("{stem}-{}{n:03}.vmdk", if sparse { "s" } else { "f" });
        let (f, temp) = sides.create(&extent)?;
        if sparse {
            let mut w = VmdkWriter::create(
                f,
                &temp,
                len,
                &extent,
                VmdkOptions {
                    subformat: Subformat::MonolithicSparse,
                    ..VmdkOptions::default()
                },
            )?;
            w.embed_descriptor = false;
            Box::new(w).finish()?;
            lines.push(format!("RW {} SPARSE \"{extent}\"", len / 512));
        } else {
            f.set_len(len)
                .map_err(|e| Error::io(&temp, "sizing the extent", e))?;
            f.sync_all()
                .map_err(|e| Error::io(&temp, "syncing the extent", e))?;
            lines.push(format!("RW {} FLAT \"{extent}\" 0", len / 512));
        }
        at += len;
        n += 1;
    }
    sides.commit()?;
    step();
    let text = d
        .with_more_extents(&lines, new / 512, last_sectors)
        .ok_or_else(|| invalid(path, "the descriptor's extent lines could not be extended"))?;
    let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, "writing the descriptor", e))?;
    out.commit()?;
    Ok(report)
}

/// Guest writes into a qcow2 image, for moving a GPT: into clusters it
/// owns alone (refcount 1, uncompressed) in place, or into new clusters at
/// the end of the file. New clusters, new L2 tables and their refcounts are
/// written and synced before any table points at them; a crash in between
/// leaks those clusters (qemu-img check: leaks, no corruption), as QEMU's
/// own allocation does.
struct Qcow2Sink<'a> {
    file: &'a File,
    path: &'a Path,
    /// The image as it was (for the parts of new clusters already there).
    reader: Box<dyn ImageReader>,
    old_size: u64,
    cs: u64,
    l2_coverage: u64,
    l1_offset: u64,
    /// Entries past the old L1 size read as unallocated (the slack is
    /// zeroed before any write).
    l1_size_old: u64,
    rt_offset: u64,
    rt_entries: u64,
    refcount_bits: u64,
    file_end: u64,
    /// L1 entries written so far (index → entry), including new tables.
    l1: std::collections::BTreeMap<u64, u64>,
    /// New L2 tables not yet linked: L1 index → (host, entries).
    new_tables: std::collections::BTreeMap<u64, (u64, Vec<u64>)>,
    /// Entries to set in existing L2 tables: host offset of the entry → value.
    links: Vec<(u64, u64)>,
    /// Refcount blocks changed: block host offset → bytes.
    blocks: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl<'a> Qcow2Sink<'a> {
    fn new(
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

    fn be64(&self, at: u64, what: &str) -> Result<u64> {
        let mut e = [0u8; 8];
        read_exact_at(self.file, self.path, &mut e, at, what)?;
        Ok(BigEndian::read_u64(&e))
    }

    fn l1_entry(&mut self, i: u64) -> Result<u64> {
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
    fn take(&mut self, host: u64) -> Result<()> {
        self.set_refcount(host, 1)
    }

    /// The refcount of the cluster at `host` (changes made so far included).
    fn refcount(&mut self, host: u64) -> Result<u64> {
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
    fn write_blocks(&mut self) -> Result<()> {
        for (at, b) in &self.blocks {
            write_all_at(self.file, self.path, b, *at)?;
        }
        Ok(())
    }

    /// Sets the refcount of the cluster at `host` (in memory until the
    /// blocks are written).
    fn set_refcount(&mut self, host: u64, value: u64) -> Result<()> {
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
    fn preflight(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
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

    fn alloc(&mut self) -> Result<u64> {
        let host = self.file_end;
        self.file_end += self.cs;
        self.take(host)?;
        Ok(host)
    }
}

const OFFSET_MASK: u64 = crate::qcow2::reader::OFFSET_MASK;
const OFLAG_COPIED: u64 = crate::qcow2::reader::OFLAG_COPIED;
const OFLAG_COMPRESSED: u64 = crate::qcow2::reader::OFLAG_COMPRESSED;
const OFLAG_ZERO: u64 = crate::qcow2::reader::OFLAG_ZERO;

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

/// The sectors a planned GPT writes, in guest order.
fn gpt_patches(p: &GptPlan) -> Vec<(u64, Vec<u8>)> {
    let mut v = Vec::new();
    if let Some(m) = &p.pmbr {
        v.push((0, m.to_vec()));
    }
    v.push((p.ss, p.primary.clone()));
    if p.rewrite_primary_entries {
        v.push((p.primary_entries_lba * p.ss, p.entries.clone()));
    }
    let mut backup = p.entries.clone();
    backup.resize(((p.last_lba - p.backup_entries_lba) * p.ss) as usize, 0);
    backup.extend_from_slice(&p.backup);
    v.push((p.backup_entries_lba * p.ss, backup));
    v
}

/// An image seen at a larger size (zeros past its end) with some ranges
/// replaced: what a rewritten stream is copied from.
struct Overlay<'a> {
    inner: &'a dyn ImageReader,
    size: u64,
    patches: Vec<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for Overlay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("size", &self.size).finish()
    }
}

impl ImageReader for Overlay<'_> {
    fn format(&self) -> DiskFormat {
        self.inner.format()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, len: u64) -> Result<crate::block::Extent> {
        use crate::block::{BlockState, Extent};
        let len = len.min(self.size - offset);
        // Patched bytes are data; elsewhere the image's own answer (zeros
        // past its end), cut at the next patch.
        if let Some((at, b)) = self
            .patches
            .iter()
            .find(|(at, b)| *at <= offset && offset < at + b.len() as u64)
        {
            return Ok(Extent {
                start: offset,
                len: (at + b.len() as u64 - offset).min(len),
                state: BlockState::Data,
                depth: 0,
                host_offset: None,
            });
        }
        let next = self
            .patches
            .iter()
            .map(|(at, _)| *at)
            .filter(|&at| at > offset)
            .min()
            .unwrap_or(u64::MAX);
        let len = len.min(next - offset);
        if offset >= self.inner.size() {
            return Ok(Extent {
                start: offset,
                len,
                state: BlockState::Unallocated,
                depth: 0,
                host_offset: None,
            });
        }
        let mut e = self
            .inner
            .map(offset, len.min(self.inner.size() - offset))?;
        e.host_offset = None;
        Ok(e)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = crate::block::read_range(self.inner.path(), self.size, offset, buf.len())?;
        buf.fill(0);
        let inner = self.inner.size();
        if offset < inner {
            let n = (inner.min(end) - offset) as usize;
            self.inner.read_at(&mut buf[..n], offset)?;
        }
        for (at, b) in &self.patches {
            let (s, e) = ((*at).max(offset), (at + b.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&b[(s - at) as usize..(e - at) as usize]);
            }
        }
        Ok(())
    }
    fn info(&self) -> crate::block::ImageInfo {
        self.inner.info()
    }
}

/// Guest writes into a hosted sparse VMDK (for moving a GPT): into its
/// allocated grains in place, or into new grains appended to the file,
/// whose grain table entries (primary, then redundant) are set only once
/// the grain is durable. A kill before that leaves an unreferenced grain
/// at the end, which nothing reads.
struct VmdkSink<'a> {
    file: &'a File,
    path: &'a Path,
    reader: Box<dyn ImageReader>,
    old_size: u64,
    grain: u64,
    gtes: u64,
    gd: u64,
    rgd: Option<u64>,
    file_end: u64,
    /// Grain table entries to set once the grains are durable: (byte
    /// offset of the entry, sector).
    links: Vec<(u64, u32)>,
}

impl VmdkSink<'_> {
    fn le32(&self, at: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        read_exact_at(self.file, self.path, &mut b, at, "grain table")?;
        Ok(LittleEndian::read_u32(&b))
    }

    /// The byte offset of grain `g`'s entry in the directory at `dir`.
    fn entry_at(&self, dir: u64, g: u64) -> Result<u64> {
        let gt = self.le32(dir * 512 + (g / self.gtes) * 4)?;
        if gt == 0 {
            return Err(unsupported(
                self.path,
                "a grain directory entry without its table; pass --no-fix-gpt",
            ));
        }
        Ok(u64::from(gt) * 512 + (g % self.gtes) * 4)
    }
}

impl GuestSink for VmdkSink<'_> {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < bytes.len() {
            let off = at + done as u64;
            let g = off / self.grain;
            let gstart = g * self.grain;
            let within = (off - gstart) as usize;
            let n = (self.grain as usize - within).min(bytes.len() - done);
            let piece = &bytes[done..done + n];
            let entry = self.entry_at(self.gd, g)?;
            let sector = self.le32(entry)?;
            let pending = self
                .links
                .iter()
                .find(|(e, _)| *e == entry)
                .map(|&(_, s)| s);
            if let Some(s) = pending.or((sector > 1).then_some(sector)) {
                write_all_at(
                    self.file,
                    self.path,
                    piece,
                    u64::from(s) * 512 + within as u64,
                )?;
            } else {
                let mut data = vec![0u8; self.grain as usize];
                if sector == 0 && gstart < self.old_size {
                    let upto = (self.old_size - gstart).min(self.grain) as usize;
                    self.reader.read_at(&mut data[..upto], gstart)?;
                }
                data[within..within + n].copy_from_slice(piece);
                let s = u32::try_from(self.file_end / 512)
                    .map_err(|_| invalid(self.path, "the file would pass 2 TiB"))?;
                write_all_at(self.file, self.path, &data, self.file_end)?;
                self.file_end += self.grain;
                self.links.push((entry, s));
                if let Some(r) = self.rgd {
                    let re = self.entry_at(r, g)?;
                    self.links.push((re, s));
                }
            }
            done += n;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        sync(self.file, self.path)?;
        for (at, s) in std::mem::take(&mut self.links) {
            let mut b = [0u8; 4];
            LittleEndian::write_u32(&mut b, s);
            write_all_at(self.file, self.path, &b, at)?;
        }
        sync(self.file, self.path)
    }
}

/// Shrinks a qcow2 image: a GPT moves inside the new end first; then the
/// header's size (one write); then the references past the end are cleared
/// (L1 entries of tables wholly past it, L2 entries in the table that
/// straddles it) and synced; then the clusters they held lose a refcount —
/// freed when nothing else (an internal snapshot) still holds them. A kill
/// between the last two steps leaks those clusters (qemu-img check: leaks).
fn shrink_qcow2(
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

/// Shrinks a hosted sparse VMDK in place: a GPT moves inside the new end
/// first; the grain table entries past it are cleared (in both
/// directories); then the header's capacity (one sector); then the
/// embedded descriptor.
fn shrink_vmdk_sparse(
    file: &File,
    path: &Path,
    head: &[u8; 512],
    new: u64,
    reader: Box<dyn ImageReader>,
    gpt: Option<&GptPlan>,
    report: ResizeReport,
) -> Result<ResizeReport> {
    let u64_at = |o: usize| LittleEndian::read_u64(&head[o..o + 8]);
    let (flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd) = (
        LittleEndian::read_u32(&head[8..12]),
        u64_at(12),
        u64_at(20),
        u64_at(28),
        u64_at(36),
        u64::from(LittleEndian::read_u32(&head[44..48])),
        u64_at(48),
        u64_at(56),
    );
    let old = capacity * 512;
    // The new embedded descriptor must fit (checked before writing).
    let descriptor = if desc_off != 0 && desc_size != 0 && desc_size <= 2048 {
        let mut text = vec![0u8; (desc_size * 512) as usize];
        read_exact_at(file, path, &mut text, desc_off * 512, "embedded descriptor")?;
        let ctx = crate::error::Ctx::new(path);
        let d = crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, desc_off * 512)?;
        let t = d.resized_text(new / 512).ok_or_else(|| {
            invalid(
                path,
                "the embedded descriptor's extent line could not be rewritten",
            )
        })?;
        let mut out = vec![0u8; text.len()];
        if t.len() > out.len() {
            return Err(unsupported(
                path,
                "the new embedded descriptor does not fit its area",
            ));
        }
        out[..t.len()].copy_from_slice(t.as_bytes());
        Some(out)
    } else {
        None
    };
    let dirs: Vec<u64> = [gd, rgd]
        .into_iter()
        .filter(|&d| d != 0 && d != u64::MAX)
        .collect();
    // 1. The GPT.
    if let Some(p) = gpt {
        let mut sink = VmdkSink {
            file,
            path,
            reader,
            old_size: old,
            grain: grain * 512,
            gtes,
            gd,
            rgd: (flags & 2 != 0 && rgd != 0).then_some(rgd),
            file_end: file_len(file, path)?.div_ceil(512) * 512,
            links: Vec::new(),
        };
        apply_gpt(&mut sink, p)?;
    }
    // 2. Grain table entries past the new end.
    let first_gone = (new / 512).div_ceil(grain);
    let grains = capacity.div_ceil(grain);
    for &dir in &dirs {
        let mut g = first_gone;
        while g < grains {
            let gt = {
                let mut b = [0u8; 4];
                read_exact_at(
                    file,
                    path,
                    &mut b,
                    dir * 512 + (g / gtes) * 4,
                    "grain directory",
                )?;
                LittleEndian::read_u32(&b)
            };
            let upto = ((g / gtes + 1) * gtes).min(grains);
            if gt != 0 {
                let zeros = vec![0u8; ((upto - g) * 4) as usize];
                write_all_at(file, path, &zeros, u64::from(gt) * 512 + (g % gtes) * 4)?;
            }
            g = upto;
        }
    }
    sync(file, path)?;
    step();
    // 3. The capacity.
    let mut hdr = *head;
    LittleEndian::write_u64(&mut hdr[12..20], new / 512);
    write_all_at(file, path, &hdr, 0)?;
    sync(file, path)?;
    step();
    // 4. The embedded descriptor.
    if let Some(area) = descriptor {
        write_all_at(file, path, &area, desc_off * 512)?;
        sync(file, path)?;
    }
    Ok(report)
}

/// QEMU's permission bits for its image locks (block.h BLK_PERM_*):
/// consistent read, write, write unchanged, resize, graph modification.
const QEMU_PERMS: u64 = 5;
const QEMU_LOCK_PERM_BASE: i64 = 100;
const QEMU_LOCK_SHARED_BASE: i64 = 200;

/// Takes the image the way QEMU takes one it resizes — open file
/// description locks on QEMU's bytes: 100+perm for what it uses,
/// 200+perm for what it does not share — after checking that no running
/// QEMU (or qemu-img) holds it. The locks go with the file.
fn lock_like_qemu(file: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let conflict = |byte: i64| -> Option<bool> {
        // SAFETY: a zeroed `flock` is a valid value for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: fcntl on a valid descriptor borrowed from `file`, with a
        // pointer to a live `flock` it fills in.
        let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
        (r == 0).then_some(fl.l_type != libc::F_UNLCK as i16)
    };
    // Anyone using the image at all, or not sharing write or resize, holds
    // one of these.
    let busy = (0..QEMU_PERMS as i64)
        .map(|i| QEMU_LOCK_PERM_BASE + i)
        .chain([QEMU_LOCK_SHARED_BASE + 1, QEMU_LOCK_SHARED_BASE + 3])
        .any(|b| conflict(b) == Some(true));
    if busy {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the image is in use (a running QEMU or qemu-img holds its lock); stop it first",
        )
        .at_path(path));
    }
    // Our own: we use write and resize, and share nothing.
    for byte in [QEMU_LOCK_PERM_BASE + 1, QEMU_LOCK_PERM_BASE + 3]
        .into_iter()
        .chain((0..QEMU_PERMS as i64).map(|i| QEMU_LOCK_SHARED_BASE + i))
    {
        // SAFETY: as above.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_RDLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: fcntl on a valid descriptor borrowed from `file`, with a
        // pointer to a live `flock`; the lock belongs to this open file
        // description and ends when it is closed.
        let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
        if r != 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the image is in use (its lock is held); stop the process that has it open",
            )
            .at_path(path));
        }
    }
    Ok(())
}

/// Shrinks a twoGbMaxExtent set: the descriptor that lists fewer (or a
/// shorter last flat) extent(s) replaces the old one first — a longer file
/// under a shorter description still reads —; then the last flat extent is
/// cut and the extents past the end are removed. A sparse extent cannot be
/// cut in the middle (its own header states its size), so a sparse set
/// shrinks to extent boundaries.
fn shrink_vmdk_set(
    path: &Path,
    d: &crate::vmdk::descriptor::Descriptor,
    old: u64,
    new: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    use crate::vmdk::descriptor::ExtentType;
    needs_shrink(path, old, new, opts)?;
    let reader = open_as(path, DiskFormat::Vmdk)?;
    let table = read_table(reader.as_ref()).ok().flatten();
    if table.as_ref().is_some_and(|t| t.kind == TableKind::Gpt) && opts.fix_gpt {
        return Err(unsupported(path, "moving a GPT inside a twoGbMaxExtent set is not supported yet: pass --no-fix-gpt after shrinking the partitions"));
    }
    if !opts.force {
        if let Some(p) = table.and_then(|t| t.partitions.into_iter().find(|p| p.end > new)) {
            return Err(invalid(path, format!("partition {} ends at byte {}, beyond the new end ({new}); shrink the partition first, or pass --force", p.number, p.end)));
        }
        let mut at = new;
        let mut buf = vec![0u8; 1 << 20];
        while at < old {
            let e = reader.map(at, old - at)?;
            if matches!(
                e.state,
                crate::block::BlockState::Data | crate::block::BlockState::Compressed
            ) {
                let mut p = at;
                while p < at + e.len {
                    let n = (at + e.len - p).min(buf.len() as u64) as usize;
                    reader.read_at(&mut buf[..n], p)?;
                    if let Some(k) = buf[..n].iter().position(|&b| b != 0) {
                        return Err(invalid(path, format!("data is stored at byte {}, beyond the new end ({new}); pass --force to cut it off", p + k as u64)));
                    }
                    p += n as u64;
                }
            }
            at += e.len;
        }
    }
    drop(reader);
    // The extent holding the new end, and where it starts.
    let mut start = 0u64;
    let mut keep = 0usize;
    for (k, e) in d.extents.iter().enumerate() {
        let end = start + e.sectors * 512;
        if new <= end {
            keep = k + 1;
            break;
        }
        start = end;
    }
    let last = &d.extents[keep - 1];
    let cut = new - start;
    let shorter = cut < last.sectors * 512;
    if shorter && last.kind != ExtentType::Flat {
        return Err(unsupported(
            path,
            format!("{new} bytes ends inside sparse extent {keep}; a sparse set shrinks to extent boundaries (for example {start} bytes)"),
        ));
    }
    let text = d
        .truncated_text(keep, shorter.then_some(cut / 512), new / 512)
        .ok_or_else(|| invalid(path, "the descriptor's extent lines could not be rewritten"))?;
    let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, "writing the descriptor", e))?;
    out.commit()?;
    step();
    let gate = crate::gate::Gate::new();
    if shorter {
        let file = gate.resolve(path, last.file.as_deref().unwrap_or(""), "extent")?;
        let f = OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(|e| Error::io(&file, "opening the extent", e))?;
        f.set_len(cut)
            .map_err(|e| Error::io(&file, "cutting the extent", e))?;
        sync(&f, &file)?;
    }
    for e in &d.extents[keep..] {
        if let Ok(file) = gate.resolve(path, e.file.as_deref().unwrap_or(""), "extent") {
            let _ = std::fs::remove_file(file);
        }
    }
    Ok(ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    })
}
