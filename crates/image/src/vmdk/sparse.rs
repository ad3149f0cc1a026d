//! Hosted sparse extents ("KDMV"): monolithicSparse, twoGbMaxExtentSparse
//! pieces and streamOptimized (compressed grains, markers, footer).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian};

use crate::compress::{self, Codec};
use crate::error::{Ctx, Result};
use crate::fileio::Window;

pub const MAGIC: &[u8; 4] = b"KDMV";
pub const GD_AT_END: u64 = u64::MAX;
const FLAG_REDUNDANT: u32 = 1 << 1;
const FLAG_ZEROED_GTE: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const INCOMPAT_KNOWN: u32 = FLAG_COMPRESSED | FLAG_MARKERS;
/// Limits: grains up to 2 MiB (so a grain buffer stays small; VMware uses
/// 64 KiB), QEMU's 512 entries per grain table, and a grain directory of at
/// most 16 MiB.
const MAX_GRAIN_SECTORS: u64 = vmshift_model::limits::VMDK_GRAIN_SECTORS;
const MAX_GTES_PER_GT: u32 = vmshift_model::limits::VMDK_GTES_PER_GT;
const MAX_GD_ENTRIES: u64 = vmshift_model::limits::VMDK_GD_ENTRIES;
/// Grain tables kept in memory per extent (bytes, whatever the table size).
const GT_CACHE_BYTES: usize = vmshift_model::limits::VMDK_GT_CACHE_BYTES;
/// A vmfsSparse ("COWD") extent: 2048-byte header, 4096 entries per table.
pub const COWD_MAGIC: &[u8; 4] = b"COWD";
const COWD_HEADER_BYTES: u64 = 2048;
const COWD_GTES_PER_GT: u32 = 4096;

/// What a grain table entry says about one grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Unallocated,
    Zero,
    /// Uncompressed, at this byte offset of the extent file.
    Data(u64),
    /// Compressed, starting at this byte offset (a marker when the extent
    /// has markers).
    Compressed(u64),
}

/// The fields of a sparse header vmshift uses.
#[derive(Debug, Clone)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Sectors.
    pub capacity: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean: bool,
    pub compress_algorithm: u16,
}

impl SparseHeader {
    fn parse(b: &[u8], ctx: &Ctx, at: u64) -> Result<SparseHeader> {
        if &b[0..4] != MAGIC {
            return Err(ctx.invalid("magic", at, "not a VMDK sparse extent (expected KDMV)"));
        }
        let u32_at = |o: usize| LittleEndian::read_u32(&b[o..o + 4]);
        let u64_at = |o: usize| LittleEndian::read_u64(&b[o..o + 8]);
        let h = SparseHeader {
            version: u32_at(4),
            flags: u32_at(8),
            capacity: u64_at(12),
            grain_sectors: u64_at(20),
            descriptor_offset: u64_at(28),
            descriptor_size: u64_at(36),
            gtes_per_gt: u32_at(44),
            rgd_offset: u64_at(48),
            gd_offset: u64_at(56),
            overhead: u64_at(64),
            unclean: b[72] != 0,
            compress_algorithm: LittleEndian::read_u16(&b[77..79]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(ctx.unsupported(
                "version",
                format!("sparse extent version {} (expected 1 to 3)", h.version),
            ));
        }
        let unknown = h.flags & 0xffff_0000 & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(ctx.unsupported(
                "flags",
                format!("unknown incompatible flag bits {unknown:#010x}"),
            ));
        }
        if h.grain_sectors == 0
            || !h.grain_sectors.is_power_of_two()
            || h.grain_sectors > MAX_GRAIN_SECTORS
        {
            return Err(ctx.invalid(
                "grainSize",
                at + 20,
                format!(
                    "{} sectors (expected a power of two from 1 to {MAX_GRAIN_SECTORS})",
                    h.grain_sectors
                ),
            ));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(ctx.invalid(
                "numGTEsPerGT",
                at + 44,
                format!("{} (expected 1 to {MAX_GTES_PER_GT})", h.gtes_per_gt),
            ));
        }
        if h.capacity.checked_mul(512).is_none() {
            return Err(ctx.invalid(
                "capacity",
                at + 12,
                format!("{} sectors overflows a byte count", h.capacity),
            ));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress_algorithm != 1 {
            return Err(ctx.unsupported(
                "compressAlgorithm",
                format!(
                    "compression algorithm {} (expected 1, deflate)",
                    h.compress_algorithm
                ),
            ));
        }
        Ok(h)
    }

    fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(u64::from(self.gtes_per_gt) * self.grain_sectors)
    }
}

/// Which of the two sector-addressed sparse layouts an extent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseKind {
    /// Hosted ("KDMV"): Workstation, Fusion, streamOptimized.
    Hosted,
    /// ESXi snapshot deltas before VMFS 6 ("COWD", vmfsSparse): no
    /// redundant directory, no zeroed-grain entries, no compression.
    Cowd,
}

/// A sparse extent file opened for reading.
#[derive(Debug)]
pub struct SparseExtent {
    src: Window,
    ctx: Ctx,
    file_len: u64,
    pub kind: SparseKind,
    pub header: SparseHeader,
    gd: Vec<u32>,
    /// The primary grain directory was damaged; the redundant one is used.
    pub used_redundant: bool,
    /// Fields where a stream's header and footer disagree (the footer wins).
    pub footer_mismatch: Vec<String>,
    gt_cache: Mutex<HashMap<u32, Arc<[u32]>>>,
}

impl SparseExtent {
    pub fn open(file: File, path: &Path) -> Result<SparseExtent> {
        Self::open_window(Window::whole(file, path)?, path)
    }

    /// Opens a sparse extent stored in part of a file (an OVA member).
    pub fn open_window(file: Window, path: &Path) -> Result<SparseExtent> {
        let ctx = Ctx::new(path);
        let len = file.len();
        let mut first = [0u8; 512];
        if file.read_up_to_at(path, &mut first, 0)? < 512 {
            return Err(ctx.invalid("header", 0, "file too short for a VMDK sparse header"));
        }
        let mut header = SparseHeader::parse(&first, &ctx, 0)?;
        let mut footer_mismatch = Vec::new();
        if header.gd_offset == GD_AT_END {
            let footer = read_footer(&file, &ctx, len)?;
            // The footer is the header with the directory's offset filled
            // in; anything else differing means one of them is damaged.
            let fields = [
                ("capacity", header.capacity, footer.capacity),
                ("grainSize", header.grain_sectors, footer.grain_sectors),
                (
                    "numGTEsPerGT",
                    u64::from(header.gtes_per_gt),
                    u64::from(footer.gtes_per_gt),
                ),
                (
                    "descriptorOffset",
                    header.descriptor_offset,
                    footer.descriptor_offset,
                ),
                ("flags", u64::from(header.flags), u64::from(footer.flags)),
            ];
            for (name, h, f) in fields {
                if h != f {
                    footer_mismatch.push(format!("{name}: header {h}, footer {f}"));
                }
            }
            header = footer;
        }
        check_descriptor_area(&header, &ctx, len)?;
        let entries = header.gd_entries();
        if entries > MAX_GD_ENTRIES {
            return Err(ctx.invalid(
                "capacity",
                12,
                format!(
                    "{} sectors need {entries} grain directory entries (at most {MAX_GD_ENTRIES})",
                    header.capacity
                ),
            ));
        }
        let primary = read_directory(
            &file,
            &ctx,
            header.gd_offset,
            entries,
            len,
            ("gdOffset", 56),
        );
        // A damaged primary directory (unreadable, pointing past the end,
        // or wiped while the redundant one is not) gives way to the
        // redundant copy, which holds the same tables.
        let redundant = (header.flags & FLAG_REDUNDANT != 0 && header.rgd_offset != 0).then(|| {
            read_directory(
                &file,
                &ctx,
                header.rgd_offset,
                entries,
                len,
                ("rgdOffset", 48),
            )
        });
        let (gd, used_redundant) = match (primary, redundant) {
            (Ok(p), Some(Ok(r))) if damaged(&p, len) && !damaged(&r, len) => (r, true),
            (Ok(p), _) => (p, false),
            (Err(_), Some(Ok(r))) if !damaged(&r, len) => (r, true),
            (Err(e), _) => return Err(e),
        };
        Ok(SparseExtent {
            src: file,
            ctx,
            file_len: len,
            kind: SparseKind::Hosted,
            header,
            gd,
            used_redundant,
            footer_mismatch,
            gt_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Opens a vmfsSparse ("COWD") extent: a 2048-byte header (magic,
    /// version, flags, numSectors, grainSize, gdOffset, numGDEntries,
    /// freeSector, then names and geometry vmshift does not need), a grain
    /// directory of sector numbers and tables of 4096 sector numbers.
    pub fn open_cowd(file: File, path: &Path) -> Result<SparseExtent> {
        let ctx = Ctx::new(path);
        let file = Window::whole(file, path)?;
        let len = file.len();
        let mut b = [0u8; 32];
        if file.read_up_to_at(path, &mut b, 0)? < 32 || len < COWD_HEADER_BYTES {
            return Err(ctx.invalid("header", 0, "file too short for a vmfsSparse (COWD) header"));
        }
        if &b[0..4] != COWD_MAGIC {
            return Err(ctx.invalid("magic", 0, "not a vmfsSparse extent (expected COWD)"));
        }
        let u32_at = |o: usize| LittleEndian::read_u32(&b[o..o + 4]);
        let (version, capacity, grain, gd_offset, gd_entries) =
            (u32_at(4), u32_at(12), u32_at(16), u32_at(20), u32_at(24));
        if version != 1 {
            return Err(ctx.unsupported(
                "version",
                format!("vmfsSparse version {version} (expected 1)"),
            ));
        }
        if grain == 0 || u64::from(grain) > MAX_GRAIN_SECTORS {
            return Err(ctx.invalid(
                "grainSize",
                16,
                format!("{grain} sectors (expected 1 to {MAX_GRAIN_SECTORS})"),
            ));
        }
        let header = SparseHeader {
            version: 1,
            flags: 0,
            capacity: u64::from(capacity),
            grain_sectors: u64::from(grain),
            descriptor_offset: 0,
            descriptor_size: 0,
            gtes_per_gt: COWD_GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: u64::from(gd_offset),
            overhead: 0,
            unclean: false,
            compress_algorithm: 0,
        };
        let entries = header.gd_entries();
        if u64::from(gd_entries) < entries {
            return Err(ctx.corrupt(
                "numGDEntries",
                24,
                format!(
                    "{gd_entries} grain directory entries, but {capacity} sectors in grains of {grain} need {entries}"
                ),
            ));
        }
        if u64::from(gd_offset) * 512 < COWD_HEADER_BYTES {
            return Err(ctx.invalid(
                "gdOffset",
                20,
                format!("grain directory at sector {gd_offset}, inside the 4-sector header"),
            ));
        }
        let gd = read_directory(
            &file,
            &ctx,
            header.gd_offset,
            entries,
            len,
            ("gdOffset", 20),
        )?;
        Ok(SparseExtent {
            src: file,
            ctx,
            file_len: len,
            kind: SparseKind::Cowd,
            header,
            gd,
            used_redundant: false,
            footer_mismatch: Vec::new(),
            gt_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes of header at the start of the file.
    fn header_bytes(&self) -> u64 {
        match self.kind {
            SparseKind::Hosted => 512,
            SparseKind::Cowd => COWD_HEADER_BYTES,
        }
    }

    pub fn path(&self) -> &Path {
        &self.ctx.path
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * 512
    }

    pub fn grain_bytes(&self) -> u64 {
        self.header.grain_sectors * 512
    }

    pub fn compressed(&self) -> bool {
        self.header.flags & FLAG_COMPRESSED != 0
    }

    /// The embedded descriptor's bytes, if the header points at one.
    pub fn embedded_descriptor(&self) -> Result<Option<(Vec<u8>, u64)>> {
        let h = &self.header;
        if h.descriptor_offset == 0 || h.descriptor_size == 0 {
            return Ok(None);
        }
        let at = h.descriptor_offset.saturating_mul(512);
        let size = h
            .descriptor_size
            .saturating_mul(512)
            .min(super::descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1);
        if at >= self.file_len {
            return Err(self.ctx.corrupt(
                "descriptorOffset",
                28,
                "embedded descriptor lies past the end of the file",
            ));
        }
        let mut buf = vec![0u8; size as usize];
        let n = self.src.read_up_to_at(&self.ctx.path, &mut buf, at)?;
        buf.truncate(n);
        Ok(Some((buf, at)))
    }

    fn grain_table(&self, gt_sector: u32) -> Result<Arc<[u32]>> {
        let lock = || self.gt_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = lock().get(&gt_sector) {
            return Ok(t.clone());
        }
        let n = self.header.gtes_per_gt as usize;
        let at = u64::from(gt_sector) * 512;
        if at + n as u64 * 4 > self.file_len {
            return Err(self.ctx.corrupt(
                "grain directory entry",
                at,
                format!("grain table at sector {gt_sector} lies past the end of the file"),
            ));
        }
        let mut raw = vec![0u8; n * 4];
        self.src
            .read_exact_at(&self.ctx.path, &mut raw, at, "grain table")?;
        let table: Arc<[u32]> = raw.chunks_exact(4).map(LittleEndian::read_u32).collect();
        let mut cache = lock();
        if cache.len() >= GT_CACHE_BYTES / (n * 4) {
            cache.clear();
        }
        cache.insert(gt_sector, table.clone());
        Ok(table)
    }

    /// The grain holding byte `offset` of the extent.
    pub fn grain(&self, offset: u64) -> Result<Grain> {
        let g = offset / self.grain_bytes();
        let per = u64::from(self.header.gtes_per_gt);
        let gt_sector = self.gd.get((g / per) as usize).copied().unwrap_or(0);
        if gt_sector == 0 {
            return Ok(Grain::Unallocated);
        }
        let gte = self.grain_table(gt_sector)?[(g % per) as usize];
        Ok(match gte {
            0 => Grain::Unallocated,
            1 if self.header.flags & FLAG_ZEROED_GTE != 0 => Grain::Zero,
            s => {
                let at = u64::from(s) * 512;
                if at >= self.file_len {
                    return Err(self.ctx.corrupt(
                        "grain table entry",
                        at,
                        format!("grain for extent offset {offset:#x} is at sector {s}, past the end of the file"),
                    ));
                }
                if self.compressed() {
                    Grain::Compressed(at)
                } else {
                    Grain::Data(at)
                }
            }
        })
    }

    /// Reads `buf.len()` bytes of uncompressed grain data at host `at`.
    pub fn read_data(&self, buf: &mut [u8], at: u64) -> Result<()> {
        if at + buf.len() as u64 > self.file_len {
            return Err(self.ctx.corrupt(
                "grain table entry",
                at,
                "grain data runs past the end of the file",
            ));
        }
        self.src.read_exact_at(&self.ctx.path, buf, at, "grain")
    }

    /// Inflates the compressed grain at host `at`, which holds extent offset
    /// `grain_start`, into `out` (one grain; the part past the capacity may
    /// be missing from the stream and reads as zeros).
    pub fn read_compressed(&self, at: u64, grain_start: u64, out: &mut [u8]) -> Result<()> {
        let grain = self.grain_bytes();
        let markers = self.header.flags & FLAG_MARKERS != 0;
        let (data_at, size) = if markers {
            let mut m = [0u8; 12];
            self.src
                .read_exact_at(&self.ctx.path, &mut m, at, "grain marker")?;
            let lba = LittleEndian::read_u64(&m[0..8]);
            let size = u64::from(LittleEndian::read_u32(&m[8..12]));
            if lba.checked_mul(512) != Some(grain_start) {
                return Err(self.ctx.corrupt(
                    "grain marker",
                    at,
                    format!(
                        "marker says sector {lba}, but the grain table maps it to sector {}",
                        grain_start / 512
                    ),
                ));
            }
            if size == 0 || at + 12 + size > self.file_len {
                return Err(self.ctx.corrupt(
                    "grain marker",
                    at + 8,
                    format!("compressed size {size} is zero or runs past the end of the file ({} bytes)", self.file_len),
                ));
            }
            (at + 12, size)
        } else {
            (at, (2 * grain).min(self.file_len - at))
        };
        if size > 2 * grain {
            return Err(self.ctx.corrupt(
                "grain marker",
                at + 8,
                format!("compressed size {size} is more than twice the grain size"),
            ));
        }
        let mut input = vec![0u8; size as usize];
        self.src
            .read_exact_at(&self.ctx.path, &mut input, data_at, "compressed grain")?;
        let valid = (self.capacity_bytes() - grain_start).min(grain) as usize;
        let n = compress::decompress_prefix(Codec::Zlib, &input, out).map_err(|why| {
            self.ctx.corrupt(
                "compressed grain",
                at,
                format!("grain at extent offset {grain_start:#x}: {why}"),
            )
        })?;
        if n < valid {
            return Err(self.ctx.corrupt(
                "compressed grain",
                at,
                format!("grain at extent offset {grain_start:#x} inflates to {n} bytes, fewer than {valid}"),
            ));
        }
        out[n..].fill(0);
        Ok(())
    }

    /// Every allocated grain: (grain index, GTE) — for `check`.
    pub fn allocated(&self) -> Result<Vec<(u64, u32)>> {
        let per = u64::from(self.header.gtes_per_gt);
        let grains = self.header.capacity.div_ceil(self.header.grain_sectors);
        let mut out = Vec::new();
        for (i, &gt) in self.gd.iter().enumerate() {
            if gt == 0 {
                continue;
            }
            let table = self.grain_table(gt)?;
            for (j, &e) in table.iter().enumerate() {
                let g = i as u64 * per + j as u64;
                if e > 1 && g < grains {
                    out.push((g, e));
                }
            }
        }
        Ok(out)
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn path_buf(&self) -> PathBuf {
        self.ctx.path.clone()
    }
}

/// The embedded descriptor's area (descriptorOffset, descriptorSize) must
/// lie inside the file when the header names one: `embedded_descriptor`
/// and `check` work on its byte range.
fn check_descriptor_area(h: &SparseHeader, ctx: &Ctx, len: u64) -> Result<()> {
    if h.descriptor_offset == 0 {
        return Ok(());
    }
    let Some(at) = h.descriptor_offset.checked_mul(512).filter(|&a| a < len) else {
        return Err(ctx.corrupt(
            "descriptorOffset",
            28,
            format!(
                "embedded descriptor at sector {} lies past the end of the file ({len} bytes)",
                h.descriptor_offset
            ),
        ));
    };
    if h.descriptor_size
        .checked_mul(512)
        .and_then(|n| n.checked_add(at))
        .is_none_or(|end| end > len)
    {
        return Err(ctx.corrupt(
            "descriptorSize",
            36,
            format!(
                "embedded descriptor of {} sectors at sector {} runs past the end of the file ({len} bytes)",
                h.descriptor_size, h.descriptor_offset
            ),
        ));
    }
    Ok(())
}

/// Reads a grain directory of `entries` sector numbers at sector `sector`.
fn read_directory(
    file: &Window,
    ctx: &Ctx,
    sector: u64,
    entries: u64,
    len: u64,
    (field, field_at): (&str, u64),
) -> Result<Vec<u32>> {
    let bytes = entries * 4;
    let at = sector
        .checked_mul(512)
        .filter(|&o| o.checked_add(bytes).is_some_and(|e| e <= len))
        .ok_or_else(|| {
            ctx.corrupt(
                field,
                field_at,
                format!("grain directory at sector {sector} ({bytes} bytes) lies past the end of the file ({len} bytes)"),
            )
        })?;
    let mut raw = vec![0u8; bytes as usize];
    file.read_exact_at(&ctx.path, &mut raw, at, "grain directory")?;
    Ok(raw.chunks_exact(4).map(LittleEndian::read_u32).collect())
}

/// A directory is damaged when it is all zeros or names a table past the
/// end of the file.
fn damaged(gd: &[u32], len: u64) -> bool {
    gd.iter().all(|&e| e == 0) || gd.iter().any(|&e| u64::from(e) * 512 + 2048 > len)
}

/// Reads the footer of a stream whose header says the grain directory is
/// at the end: the last non-zero sectors are the footer marker and the
/// footer (the end-of-stream marker, and any padding after it, are zeros).
fn read_footer(file: &Window, ctx: &Ctx, len: u64) -> Result<SparseHeader> {
    let mut end = len / 512 * 512;
    let mut sector = [0u8; 512];
    // Skip the end-of-stream marker and up to 1 MiB of zero padding (tar).
    for _ in 0..2048 {
        if end < 1024 {
            break;
        }
        file.read_exact_at(&ctx.path, &mut sector, end - 512, "footer")?;
        if sector.iter().any(|&b| b != 0) {
            break;
        }
        end -= 512;
    }
    if end < 1536 {
        return Err(ctx.invalid(
            "footer",
            len,
            "header says the grain directory is at the end, but there is no footer",
        ));
    }
    let footer_at = end - 512;
    file.read_exact_at(&ctx.path, &mut sector, footer_at, "footer")?;
    if &sector[0..4] != MAGIC {
        return Err(ctx.invalid(
            "footer",
            footer_at,
            "header says the grain directory is at the end, but the footer there has no KDMV magic",
        ));
    }
    let mut marker = [0u8; 16];
    file.read_exact_at(&ctx.path, &mut marker, footer_at - 512, "footer marker")?;
    if LittleEndian::read_u32(&marker[8..12]) != 0 || LittleEndian::read_u32(&marker[12..16]) != 3 {
        return Err(ctx.invalid(
            "footer marker",
            footer_at - 512,
            "expected a footer marker (size 0, type 3) before the footer",
        ));
    }
    let h = SparseHeader::parse(&sector, ctx, footer_at)?;
    if h.gd_offset == GD_AT_END {
        return Err(ctx.invalid(
            "gdOffset",
            footer_at + 56,
            "the footer does not give the grain directory's offset either",
        ));
    }
    Ok(h)
}

impl SparseExtent {
    /// Checks the grain directory and tables: tables and grains past the
    /// end of the file, grains overlapping each other or the metadata, a
    /// redundant directory that disagrees with the primary one.
    pub fn check(&self, report: &mut crate::check::CheckReport) -> Result<()> {
        let name = self.ctx.path.display().to_string();
        let mut err = |report: &mut crate::check::CheckReport, msg: String| {
            report.corruptions += 1;
            report.messages.push(format!("ERROR {name}: {msg}"));
        };
        let grain = self.grain_bytes();
        let grains = self.header.capacity.div_ceil(self.header.grain_sectors);
        report.total_clusters += grains;
        for m in &self.footer_mismatch {
            err(report, format!("header and footer disagree on {m}"));
        }
        if self.used_redundant {
            err(
                report,
                "the primary grain directory is damaged; the redundant one was used".into(),
            );
        }
        // Metadata ranges (in bytes): header, descriptor, directories, tables.
        let mut used: Vec<(u64, u64, String)> = vec![(0, self.header_bytes(), "header".into())];
        let h = &self.header;
        if h.descriptor_offset != 0 {
            used.push((
                h.descriptor_offset * 512,
                h.descriptor_size * 512,
                "descriptor".into(),
            ));
        }
        let gt_bytes = u64::from(h.gtes_per_gt) * 4;
        let per = u64::from(h.gtes_per_gt);
        for (i, &gt) in self.gd.iter().enumerate() {
            if gt == 0 {
                continue;
            }
            let at = u64::from(gt) * 512;
            if at + gt_bytes > self.file_len {
                err(
                    report,
                    format!("grain table {i} at sector {gt} lies past the end of the file"),
                );
                continue;
            }
            used.push((at, gt_bytes, format!("grain table {i}")));
            let table = self.grain_table(gt)?;
            for (j, &e) in table.iter().enumerate() {
                let g = i as u64 * per + j as u64;
                if e == 0 || (e == 1 && h.flags & FLAG_ZEROED_GTE != 0) {
                    continue;
                }
                if g >= grains {
                    err(
                        report,
                        format!("grain table entry for grain {g} lies beyond the capacity"),
                    );
                    continue;
                }
                report.allocated_clusters += 1;
                let host = u64::from(e) * 512;
                let len = if self.compressed() {
                    report.compressed_clusters += 1;
                    match self.compressed_len(host) {
                        Some((Some(lba), _)) if lba.checked_mul(512) != Some(g * grain) => {
                            err(
                                report,
                                format!(
                                    "grain {g} at sector {e}: its marker says sector {lba}, not {}",
                                    g * grain / 512
                                ),
                            );
                            continue;
                        }
                        Some((_, n)) => n,
                        None => {
                            err(report, format!("grain {g} at sector {e}: its marker lies past the end of the file"));
                            continue;
                        }
                    }
                } else {
                    grain
                };
                if host + len > self.file_len {
                    err(
                        report,
                        format!(
                            "grain {g} at sector {e} runs past the end of the file ({} bytes)",
                            self.file_len
                        ),
                    );
                    continue;
                }
                used.push((host, len, format!("grain {g}")));
            }
        }
        // Overlaps: sort by start and compare neighbours.
        used.sort_by_key(|u| u.0);
        for pair in used.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.0 + a.1 > b.0 {
                err(
                    report,
                    format!("{} overlaps {} at byte {:#x}", b.2, a.2, b.0),
                );
            }
        }
        if h.flags & FLAG_REDUNDANT != 0 && h.rgd_offset != 0 && !self.used_redundant {
            self.check_redundant(report, &mut err)?;
        }
        Ok(())
    }

    /// The sector a compressed grain's marker names (`None` without
    /// markers) and the bytes the grain occupies (marker + data), if
    /// readable.
    fn compressed_len(&self, host: u64) -> Option<(Option<u64>, u64)> {
        if self.header.flags & FLAG_MARKERS == 0 {
            return Some((None, 512));
        }
        let mut m = [0u8; 12];
        self.src
            .read_exact_at(&self.ctx.path, &mut m, host, "grain marker")
            .ok()?;
        Some((
            Some(LittleEndian::read_u64(&m[0..8])),
            12 + u64::from(LittleEndian::read_u32(&m[8..12])),
        ))
    }

    fn check_redundant(
        &self,
        report: &mut crate::check::CheckReport,
        err: &mut impl FnMut(&mut crate::check::CheckReport, String),
    ) -> Result<()> {
        let entries = self.gd.len() as u64;
        let rgd = match read_directory(
            &self.src,
            &self.ctx,
            self.header.rgd_offset,
            entries,
            self.file_len,
            ("rgdOffset", 48),
        ) {
            Ok(r) => r,
            Err(e) => {
                err(report, format!("redundant grain directory: {e}"));
                return Ok(());
            }
        };
        for (i, (&p, &r)) in self.gd.iter().zip(&rgd).enumerate() {
            if (p == 0) != (r == 0) {
                err(report, format!("grain directory entry {i}: primary and redundant disagree on whether the table exists"));
                continue;
            }
            if p == 0 || u64::from(r) * 512 + 2048 > self.file_len {
                continue;
            }
            let (a, b) = (self.grain_table(p)?, self.grain_table(r)?);
            let differ = a.iter().zip(b.iter()).filter(|(x, y)| x != y).count();
            if differ > 0 {
                err(report, format!("grain table {i}: {differ} entries differ between primary and redundant tables"));
            }
        }
        Ok(())
    }
}
