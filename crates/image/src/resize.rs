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
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "opening the image for writing", e))?;
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
            "a block device's size is not the image's to change",
        ));
    }
    let old = file_len(&file, path)?;
    let mut report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    if new == old && opts.grow_partition.is_none() {
        return Ok(report);
    }
    if !new.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("{new} bytes is not a whole number of 512-byte sectors"),
        ));
    }
    let table = {
        let reader = RawReader::open(
            file.try_clone()
                .map_err(|e| Error::io(path, "reopening the image", e))?,
            path,
        )?;
        read_table(&reader)?
    };
    if new < old {
        if !opts.shrink {
            return Err(invalid(
                path,
                format!("{new} bytes is smaller than the image's {old}; shrinking needs --shrink"),
            ));
        }
        if !opts.force {
            if let Some(p) = table
                .as_ref()
                .and_then(|t| t.partitions.iter().find(|p| p.end > new))
            {
                return Err(invalid(
                    path,
                    format!(
                        "partition {} ends at byte {}, beyond the new end ({new}); shrink the partition first, or pass --force",
                        p.number, p.end
                    ),
                ));
            }
            // GPT metadata at the old end is expected there; other data is not.
            let keep_from = match &table {
                Some(t) if t.kind == TableKind::Gpt => {
                    let g = t.gpt.as_ref().map_or(0, |g| g.sector_size);
                    old.saturating_sub(g * 33)
                }
                _ => old,
            };
            if let Some(d) = seek_data_hole(&file, new, true).filter(|&d| d < keep_from) {
                return Err(invalid(
                    path,
                    format!("data is stored at byte {d}, beyond the new end ({new}); pass --force to cut it off"),
                ));
            }
        }
    }
    let gpt = table
        .as_ref()
        .filter(|t| t.kind == TableKind::Gpt && opts.fix_gpt)
        .and_then(|t| t.gpt.as_ref().map(|g| g.sector_size));
    let mbr = table.as_ref().filter(|t| t.kind == TableKind::Mbr);

    // Grow: the new end exists before anything points at it.
    if new > old {
        file.set_len(new)
            .map_err(|e| Error::io(path, "growing the image", e))?;
        preallocate(&file, path, old, new, opts.prealloc)?;
        sync(&file, path)?;
        step();
    }
    if let Some(ss) = gpt {
        report.partition_grown = move_gpt(&file, path, ss, new, opts.grow_partition)?;
        report.gpt_moved = true;
    } else if let Some(n) = opts.grow_partition {
        match mbr {
            Some(_) => report.partition_grown = Some(grow_mbr_partition(&file, path, n, new)?),
            None => {
                return Err(invalid(
                    path,
                    format!(
                        "--grow-partition {n}: the image has no partition table vmshift can change"
                    ),
                ))
            }
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
        Prealloc::Off | Prealloc::Metadata => Ok(()),
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

/// Moves the backup GPT to the end of a disk of `new` bytes and points the
/// primary header at it (growing partition `grow` to the new last usable
/// LBA when asked). Returns the partition grown.
fn move_gpt(
    file: &File,
    path: &Path,
    ss: u64,
    new: u64,
    grow: Option<u32>,
) -> Result<Option<(u32, u64, u64)>> {
    let mut hdr = vec![0u8; ss as usize];
    read_exact_at(file, path, &mut hdr, ss, "GPT header")?;
    let hsize = LittleEndian::read_u32(&hdr[12..16]) as usize;
    let crc_ok = {
        let mut h = hdr[..hsize.clamp(92, ss as usize)].to_vec();
        let want = LittleEndian::read_u32(&h[16..20]);
        h[16..20].fill(0);
        crc32fast::hash(&h) == want
    };
    if &hdr[0..8] != b"EFI PART" || !crc_ok {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "the primary GPT header is damaged; repair the table (sgdisk -e / gdisk) before resizing, or pass --no-fix-gpt",
        )
        .at_path(path));
    }
    let entries_lba = LittleEndian::read_u64(&hdr[72..80]);
    let count = LittleEndian::read_u32(&hdr[80..84]);
    let esize = LittleEndian::read_u32(&hdr[84..88]);
    let bytes = u64::from(count) * u64::from(esize);
    let mut entries = vec![0u8; bytes as usize];
    read_exact_at(file, path, &mut entries, entries_lba * ss, "GPT entries")?;
    if crc32fast::hash(&entries) != LittleEndian::read_u32(&hdr[88..92]) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "the primary GPT entry array is damaged; repair the table before resizing, or pass --no-fix-gpt",
        )
        .at_path(path));
    }
    let entry_sectors = bytes.div_ceil(ss);
    let last_lba = new / ss - 1;
    let backup_entries_lba = last_lba - entry_sectors;
    let last_usable = backup_entries_lba - 1;
    let first_usable = LittleEndian::read_u64(&hdr[40..48]);
    if last_usable <= first_usable {
        return Err(invalid(path, "the disk is too small for its GPT"));
    }
    // Grow the partition that ends last, if asked.
    let mut grown = None;
    if let Some(n) = grow {
        let ends: Vec<(u32, u64)> = entries
            .chunks_exact(esize as usize)
            .enumerate()
            .filter(|(_, e)| e[0..16].iter().any(|&b| b != 0))
            .map(|(i, e)| (i as u32 + 1, LittleEndian::read_u64(&e[40..48])))
            .collect();
        let last = ends.iter().max_by_key(|(_, end)| *end).copied();
        match last {
            Some((num, end)) if num == n => {
                if end > last_usable {
                    return Err(invalid(
                        path,
                        format!("partition {n} already reaches past the new last usable sector"),
                    ));
                }
                let e =
                    &mut entries[(n as usize - 1) * esize as usize..n as usize * esize as usize];
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
    if let Some(p) = entries
        .chunks_exact(esize as usize)
        .filter(|e| e[0..16].iter().any(|&b| b != 0))
        .map(|e| LittleEndian::read_u64(&e[40..48]))
        .find(|&end| end > last_usable)
    {
        return Err(invalid(
            path,
            format!("a partition ends at LBA {p}, past the new last usable LBA {last_usable}"),
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
    // 1. The new backup (entries, then header), synced.
    write_all_at(file, path, &entries, backup_entries_lba * ss)?;
    write_all_at(
        file,
        path,
        &header(last_lba, 1, backup_entries_lba),
        last_lba * ss,
    )?;
    sync(file, path)?;
    step();
    // 2. The primary: with a grown partition its entries change too. The
    // entry array goes first; until the header (one sector) lands, the
    // primary's CRC does not match and readers use the new backup.
    if grown.is_some() {
        write_all_at(file, path, &entries, entries_lba * ss)?;
        sync(file, path)?;
        step();
    }
    write_all_at(file, path, &header(1, last_lba, entries_lba), ss)?;
    sync(file, path)?;
    step();
    // 3. The protective MBR covers the whole disk (up to 2^32 - 1 sectors;
    // it sits in the first logical sector whatever its size).
    let mut mbr = [0u8; 512];
    read_exact_at(file, path, &mut mbr, 0, "protective MBR")?;
    if let Some(slot) = (0..4).find(|i| mbr[0x1be + i * 16 + 4] == 0xee) {
        let e = 0x1be + slot * 16;
        let first = u64::from(LittleEndian::read_u32(&mbr[e + 8..e + 12]));
        // In the disk's logical sectors, like every GPT field.
        let sectors = (new / ss - first).min(u64::from(u32::MAX)) as u32;
        LittleEndian::write_u32(&mut mbr[e + 12..e + 16], sectors);
        write_all_at(file, path, &mbr, 0)?;
        sync(file, path)?;
    }
    Ok(grown)
}

/// Extends MBR partition `n` (the one that ends last; a primary one, or a
/// logical one with its extended container) to the end of a disk of `new`
/// bytes.
fn grow_mbr_partition(file: &File, path: &Path, n: u32, new: u64) -> Result<(u32, u64, u64)> {
    let reader = RawReader::open(
        file.try_clone()
            .map_err(|e| Error::io(path, "reopening the image", e))?,
        path,
    )?;
    let t = read_table(&reader)?.ok_or_else(|| invalid(path, "no partition table"))?;
    let last = t
        .last()
        .ok_or_else(|| invalid(path, "the MBR has no partitions"))?;
    if last.number != n {
        return Err(invalid(
            path,
            format!(
                "--grow-partition {n}: partition {} ends last; only that one can grow",
                last.number
            ),
        ));
    }
    let end_sector = (new / 512).min(u64::from(u32::MAX));
    let grow = |sector_at: u64, slot: usize, base: u64| -> Result<()> {
        let mut s = [0u8; 512];
        read_exact_at(file, path, &mut s, sector_at, "partition table")?;
        let e = 0x1be + slot * 16;
        let lba = u64::from(LittleEndian::read_u32(&s[e + 8..e + 12]));
        let sectors = end_sector - base - lba;
        LittleEndian::write_u32(&mut s[e + 12..e + 16], sectors as u32);
        write_all_at(file, path, &s, sector_at)?;
        sync(file, path)
    };
    if n <= 4 {
        grow(0, n as usize - 1, 0)?;
    } else {
        // The container first (a larger container with the old logical
        // partition is still a valid table), then the logical one.
        let ext = t
            .partitions
            .iter()
            .find(|p| p.extended)
            .ok_or_else(|| invalid(path, "a logical partition without an extended one"))?;
        grow(0, ext.number as usize - 1, 0)?;
        step();
        // The logical partition's EBR sits right before it... find it: the
        // EBR whose first entry starts the partition.
        let ebr = find_ebr(file, path, ext.start / 512, last.start / 512)?;
        grow(ebr * 512, 0, ebr)?;
    }
    Ok((n, last.end, end_sector * 512))
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
    if new == old {
        return Ok(report);
    }
    if new < old {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "shrinking a qcow2 image is not supported yet",
        )
        .at_path(path));
    }
    if !new.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("{new} bytes is not a whole number of 512-byte sectors"),
        ));
    }
    if opts.prealloc != Prealloc::Off || opts.grow_partition.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "qcow2 resize supports growing without preallocation or partition changes for now",
        )
        .at_path(path));
    }
    // A partition table inside would need guest writes to follow the new
    // end; refuse rather than leave a GPT's backup in the middle.
    let reader = crate::open::open_image(
        path,
        Some(DiskFormat::Qcow2),
        &crate::open::OpenOptions::default(),
    )?;
    if opts.fix_gpt && read_table(reader.as_ref())?.is_some_and(|t| t.kind == TableKind::Gpt) {
        return Err(Error::new(
                ErrorKind::Unsupported,
                "the image holds a GPT, and moving it inside a qcow2 is not supported yet: pass --no-fix-gpt (and fix it in the guest), or resize a raw copy",
            )
            .at_path(path));
    }

    // Version 3 images may have extended L2 entries (16 bytes each).
    let extended_l2 =
        BigEndian::read_u32(&h[4..8]) >= 3 && BigEndian::read_u64(&h[72..80]) & (1 << 4) != 0;
    let cs = 1u64 << cluster_bits;
    let per_l2 = cs / if extended_l2 { 16 } else { 8 };
    let need = new.div_ceil(cs * per_l2);
    let room = (u64::from(l1_size) * 8).div_ceil(cs) * cs / 8;
    if need > room || need > u64::from(u32::MAX) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "growing to {new} bytes needs {need} L1 entries; the L1 table has room for {room} and moving it is not supported yet"
            ),
        )
        .at_path(path));
    }
    let need = need as u32;
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
    if !new.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("{new} bytes is not a whole number of 512-byte sectors"),
        ));
    }
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
        if opts.fix_gpt {
            return Err(unsupported(path, "shrinking a flat VMDK that may hold a GPT: pass --no-fix-gpt after shrinking its partitions"));
        }
        // The descriptor first: a shorter disk over a longer file reads.
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
    if new < old {
        return Err(unsupported(
            path,
            "shrinking a sparse VMDK is not supported yet",
        ));
    }
    if opts.grow_partition.is_some() || opts.prealloc != Prealloc::Off {
        return Err(unsupported(
            path,
            "a sparse VMDK grows without preallocation or partition changes for now",
        ));
    }
    // The reader checks the whole image (and names a parent, if any).
    let reader = crate::open::open_image(
        path,
        Some(DiskFormat::Vmdk),
        &crate::open::OpenOptions::default(),
    )?;
    if reader.backing().is_some() {
        return Err(unsupported(
            path,
            "a delta disk follows its parent's size; resize the base disk",
        ));
    }
    if opts.fix_gpt && read_table(reader.as_ref())?.is_some_and(|t| t.kind == TableKind::Gpt) {
        return Err(unsupported(
            path,
            "the image holds a GPT, and moving it inside a sparse VMDK is not supported yet: pass --no-fix-gpt, or resize a raw copy",
        ));
    }
    if flags & (1 << 16) != 0 {
        // streamOptimized: a stream is written once, front to back.
        drop(reader);
        return rewrite_stream(path, new).map(|()| report);
    }
    if grain == 0 || gtes == 0 {
        return Err(invalid(path, "a sparse header without grain geometry"));
    }
    let per = gtes * grain;
    let (old_n, new_n) = (capacity.div_ceil(per), (new / 512).div_ceil(per));
    let old_bytes = (old_n * 4).div_ceil(512) * 512;
    let mut hdr = *head;
    let dirs: Vec<(u64, usize)> = [(gd, 56usize), (rgd, 48)]
        .into_iter()
        .filter(|&(sector, _)| sector != 0 && sector != u64::MAX)
        .collect();
    if new_n * 4 <= old_bytes {
        // The directories have room in their last sector: make sure the
        // new entries read as "no table".
        for &(sector, _) in &dirs {
            let zeros = vec![0u8; ((new_n - old_n) * 4) as usize];
            write_all_at(&file, path, &zeros, sector * 512 + old_n * 4)?;
        }
    } else {
        // New, larger directories at the end of the file; the old ones are
        // left as they are until the header points away from them.
        let mut end = file_len(&file, path)?.div_ceil(512) * 512;
        for &(sector, field) in &dirs {
            let mut table = vec![0u8; ((new_n * 4).div_ceil(512) * 512) as usize];
            read_exact_at(
                &file,
                path,
                &mut table[..(old_n * 4) as usize],
                sector * 512,
                "grain directory",
            )?;
            write_all_at(&file, path, &table, end)?;
            LittleEndian::write_u64(&mut hdr[field..field + 8], end / 512);
            end += table.len() as u64;
        }
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
    if desc_off != 0 && desc_size != 0 {
        let mut text = vec![0u8; (desc_size * 512) as usize];
        read_exact_at(
            &file,
            path,
            &mut text,
            desc_off * 512,
            "embedded descriptor",
        )?;
        let ctx = crate::error::Ctx::new(path);
        let d = crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, desc_off * 512)?;
        if let Some(t) = d.resized_text(new / 512) {
            if t.len() < text.len() {
                let mut area = vec![0u8; text.len()];
                area[..t.len()].copy_from_slice(t.as_bytes());
                write_all_at(&file, path, &area, desc_off * 512)?;
                sync(&file, path)?;
            }
        }
    }
    Ok(report)
}

/// Rewrites a streamOptimized VMDK at a larger size: the stream is copied
/// to a temp file beside it (in VMware's layout, as `convert` writes it)
/// and renamed over it.
fn rewrite_stream(path: &Path, new: u64) -> Result<()> {
    use crate::create::{create_writer, CreateSpec};
    use crate::output::{AtomicOutput, SideOutputs};
    let src = crate::open::open_image(
        path,
        Some(DiskFormat::Vmdk),
        &crate::open::OpenOptions::default(),
    )?;
    let adapter = src
        .info()
        .format_specific
        .iter()
        .find(|(k, _)| *k == "adapter-type")
        .and_then(|(_, v)| v.as_str().map(str::to_string));
    let mut options = vec![("subformat".to_string(), "streamOptimized".to_string())];
    if let Some(a) =
        adapter.filter(|a| ["ide", "lsilogic", "buslogic", "legacyESX"].contains(&a.as_str()))
    {
        options.push(("adapter_type".into(), a));
    }
    let spec = CreateSpec {
        format: DiskFormat::Vmdk,
        size: new,
        options,
        compress: false,
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    spec.validate()?;
    let (out, f) = AtomicOutput::create(path, true)?;
    let mut sides = SideOutputs::new(path, true);
    let mut writer = create_writer(f, out.temp_path(), &spec, &mut sides)?;
    crate::engine::convert(
        src.as_ref(),
        writer.as_mut(),
        &crate::engine::ConvertOptions::default(),
        &|_, _| {},
    )?;
    writer.finish()?;
    sides.commit()?;
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
        return Err(unsupported(
            path,
            "shrinking a twoGbMaxExtent set is not supported yet",
        ));
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
    let reader = crate::open::open_image(
        path,
        Some(DiskFormat::Vmdk),
        &crate::open::OpenOptions::default(),
    )?;
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
        .with_more_extents(&lines, new / 512)
        .ok_or_else(|| invalid(path, "the descriptor's extent lines could not be extended"))?;
    let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, "writing the descriptor", e))?;
    out.commit()?;
    Ok(report)
}
