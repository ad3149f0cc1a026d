//! The qcow2 header and its extensions (QEMU docs/interop/qcow2.rst).

use byteorder::{BigEndian, ByteOrder};

use std::fs::File;

use crate::error::{Ctx, Result};
use crate::fileio::read_up_to_at;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// QEMU's limits, so an image QEMU refuses is refused here too (the values
/// live in `vmshift_model::limits`, with every other limit).
pub const MAX_L1_BYTES: u64 = vmshift_model::limits::QCOW2_L1_BYTES;
pub const MAX_REFTABLE_BYTES: u64 = vmshift_model::limits::QCOW2_REFTABLE_BYTES;
pub const MAX_SNAPSHOTS: u32 = vmshift_model::limits::QCOW2_SNAPSHOTS;
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = vmshift_model::limits::QCOW2_SNAPSHOT_TABLE_BYTES;
pub const MAX_BACKING_NAME: u32 = vmshift_model::limits::QCOW2_BACKING_NAME;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
pub const EXT_CRYPTO: u32 = 0x0537_be77;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// QEMU's limits on persistent bitmaps.
pub const MAX_BITMAPS: u32 = vmshift_model::limits::QCOW2_BITMAPS;
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = vmshift_model::limits::QCOW2_BITMAP_DIRECTORY_BYTES;
/// The largest file offset (QEMU's `INT64_MAX`): no table may end past it.
pub const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Names QEMU gives the feature bits it knows, used when an image carries
/// no feature-name table of its own.
pub const KNOWN_FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Compression algorithms a qcow2 image can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), window 2^12.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// A parsed, validated qcow2 header with its extensions.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// (type, bit, name) from the feature-name table extension.
    pub feature_names: Vec<(u8, u8, String)>,
    /// Bitmaps extension: (nb_bitmaps, directory size, directory offset).
    pub bitmaps: Option<(u32, u64, u64)>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// log2 of the number of L2 entries per table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    /// The smallest L1 table that covers the virtual size.
    pub fn l1_entries_needed(size: u64, coverage: u64) -> u64 {
        size.div_ceil(coverage)
    }

    /// Parses and validates the header in `buf` (the first cluster of the
    /// file, or as much of it as exists).
    pub(crate) fn parse(buf: &[u8], ctx: &Ctx) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(ctx.invalid("header", 0, "file too short for a qcow2 header"));
        }
        let be32 = |o: usize| BigEndian::read_u32(&buf[o..o + 4]);
        let be64 = |o: usize| BigEndian::read_u64(&buf[o..o + 8]);
        if be32(0) != MAGIC {
            return Err(ctx.invalid("magic", 0, "not a qcow2 image (expected QFI\\xfb)"));
        }
        let version = be32(4);
        if version != 2 && version != 3 {
            return Err(ctx.unsupported(
                "version",
                format!("qcow2 version {version} (expected 2 or 3)"),
            ));
        }
        let cluster_bits = check_cluster_bits(be32(20), ctx)?;
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits,
            size: be64(24),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Zlib,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
        };
        if be32(32) != 0 {
            return Err(ctx.unsupported("crypt_method", "encrypted qcow2 images are not supported"));
        }
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(ctx.invalid("header", 0, "file too short for a qcow2 v3 header"));
            }
            h.incompatible = be64(72);
            h.compatible = be64(80);
            h.autoclear = be64(88);
            h.refcount_order = be32(96);
            h.header_length = be32(100);
            if h.header_length < V3_HEADER_LEN {
                return Err(ctx.invalid(
                    "header_length",
                    100,
                    format!("{} is shorter than the 104-byte v3 header", h.header_length),
                ));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(ctx.invalid(
                    "header_length",
                    100,
                    format!(
                        "{} exceeds the cluster size ({cluster_size}) or the file",
                        h.header_length
                    ),
                ));
            }
            if h.header_length > V3_HEADER_LEN {
                h.compression = match buf[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => {
                        return Err(ctx.unsupported(
                            "compression_type",
                            format!("unknown compression type {t} (expected 0 zlib or 1 zstd)"),
                        ))
                    }
                };
            }
            if h.compression != Compression::Zlib && h.incompatible & INCOMPAT_COMPRESSION == 0 {
                return Err(ctx.invalid(
                    "compression_type",
                    104,
                    "a non-zlib compression type without the compression-type incompatible bit",
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(ctx.invalid(
                "refcount_order",
                96,
                format!(
                    "{} is out of range (expected 0 to 6: 1- to 64-bit refcounts)",
                    h.refcount_order
                ),
            ));
        }
        h.read_extensions(buf, ctx)?;
        h.check_features(ctx)?;
        h.check_tables(ctx)?;
        Ok(h)
    }

    fn read_extensions(&mut self, buf: &[u8], ctx: &Ctx) -> Result<()> {
        let cluster_size = self.cluster_size();
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        }
        .min(buf.len() as u64);
        let mut off = u64::from(self.header_length);
        loop {
            if off + 8 > end {
                // No end marker before the limit: QEMU tolerates a header
                // that fills its cluster exactly.
                break;
            }
            let o = off as usize;
            let ty = BigEndian::read_u32(&buf[o..o + 4]);
            let len = u64::from(BigEndian::read_u32(&buf[o + 4..o + 8]));
            if ty == EXT_END {
                break;
            }
            let data_start = off + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or_else(|| {
                    ctx.invalid(
                        "header extension length",
                        off + 4,
                        format!(
                            "extension {ty:#010x} of {len} bytes runs past the end of the header area ({end} bytes)"
                        ),
                    )
                })?;
            let data = &buf[data_start as usize..data_end as usize];
            match ty {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(ext_string(data, "backing format", off, ctx)?);
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(ext_string(data, "external data file name", off, ctx)?);
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name_bytes = &entry[2..];
                        let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&name_bytes[..n]).into_owned();
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_BITMAPS => {
                    if data.len() < 24 {
                        return Err(ctx.invalid("bitmaps extension", off, "shorter than 24 bytes"));
                    }
                    let bitmaps = (
                        BigEndian::read_u32(&data[0..4]),
                        BigEndian::read_u64(&data[8..16]),
                        BigEndian::read_u64(&data[16..24]),
                    );
                    if self.autoclear & AUTOCLEAR_BITMAPS != 0 {
                        check_bitmaps_ext(bitmaps, cluster_size, off, ctx)?;
                    }
                    self.bitmaps = Some(bitmaps);
                }
                EXT_CRYPTO => {
                    return Err(ctx.unsupported(
                        "crypto header extension",
                        "encrypted images are not supported",
                    ));
                }
                _ => {} // unknown extensions are safe to ignore
            }
            off = data_start + len.div_ceil(8) * 8;
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_NAME {
                return Err(ctx.invalid(
                    "backing_file_size",
                    16,
                    format!(
                        "{} bytes is longer than the 1023 bytes QEMU allows",
                        self.backing_file_size
                    ),
                ));
            }
            let start = self.backing_file_offset;
            let stop = start.checked_add(u64::from(self.backing_file_size));
            if stop.is_none_or(|stop| stop > cluster_size.min(buf.len() as u64)) {
                return Err(ctx.invalid(
                    "backing_file_offset",
                    8,
                    format!(
                        "backing file name at {start:#x}+{} lies outside the first cluster",
                        self.backing_file_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The backing file name stored in the first cluster, if any.
    pub(crate) fn backing_name(&self, buf: &[u8], ctx: &Ctx) -> Result<Option<String>> {
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return Ok(None);
        }
        let s = self.backing_file_offset as usize;
        let bytes = &buf[s..s + self.backing_file_size as usize];
        String::from_utf8(bytes.to_vec()).map(Some).map_err(|_| {
            ctx.invalid(
                "backing file name",
                self.backing_file_offset,
                "is not valid UTF-8",
            )
        })
    }

    fn feature_name(&self, ty: u8, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == ty && *b == bit)
            .map(|(_, _, n)| n.clone())
            .or_else(|| {
                KNOWN_FEATURES
                    .iter()
                    .find(|(t, b, _)| *t == ty && *b == bit)
                    .map(|(_, _, n)| n.to_string())
            })
            .unwrap_or_else(|| format!("unknown feature bit {bit}"))
    }

    fn check_features(&self, ctx: &Ctx) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| format!("bit {b} ({})", self.feature_name(0, b)))
                .collect();
            return Err(ctx.unsupported(
                "incompatible_features",
                format!("unsupported incompatible features: {}", names.join(", ")),
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 && self.data_file.is_none() {
            return Err(ctx.invalid(
                "incompatible_features",
                72,
                "external data file bit set but no data file name extension",
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE == 0
            && self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
        {
            // QEMU ignores the raw bit without a data file; so do we.
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(ctx.invalid(
                "incompatible_features",
                72,
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        Ok(())
    }

    fn check_tables(&self, ctx: &Ctx) -> Result<()> {
        let cs = self.cluster_size();
        let aligned = |v: u64| v.is_multiple_of(cs);
        let needed = Header::l1_entries_needed(self.size, self.l2_coverage());
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(ctx.invalid(
                "l1_size",
                36,
                format!("{} entries exceed QEMU's 32 MiB L1 limit", self.l1_size),
            ));
        }
        if u64::from(self.l1_size) < needed {
            return Err(ctx.invalid(
                "l1_size",
                36,
                format!(
                    "{} entries cannot cover the virtual size {} (needs {needed})",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.l1_size > 0 && (!aligned(self.l1_table_offset) || self.l1_table_offset == 0) {
            return Err(ctx.invalid(
                "l1_table_offset",
                40,
                format!(
                    "{:#x} is not a cluster-aligned offset",
                    self.l1_table_offset
                ),
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(ctx.invalid("refcount_table_clusters", 56, "is 0"));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(ctx.invalid(
                "refcount_table_clusters",
                56,
                format!(
                    "{} clusters exceed QEMU's 8 MiB refcount table limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        if !aligned(self.refcount_table_offset) || self.refcount_table_offset == 0 {
            return Err(ctx.invalid(
                "refcount_table_offset",
                48,
                format!(
                    "{:#x} is not a cluster-aligned offset",
                    self.refcount_table_offset
                ),
            ));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_offset > MAX_FILE_OFFSET - reftable_bytes {
            return Err(ctx.invalid(
                "refcount_table_offset",
                48,
                format!(
                    "the {reftable_bytes}-byte refcount table at {:#x} would end past the largest file offset",
                    self.refcount_table_offset
                ),
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(ctx.invalid(
                "nb_snapshots",
                60,
                format!(
                    "{} exceeds QEMU's limit of {MAX_SNAPSHOTS}",
                    self.nb_snapshots
                ),
            ));
        }
        if self.nb_snapshots > 0 && !aligned(self.snapshots_offset) {
            return Err(ctx.invalid(
                "snapshots_offset",
                64,
                format!("{:#x} is not cluster aligned", self.snapshots_offset),
            ));
        }
        // The virtual size must be addressable: QEMU caps it so that
        // offsets fit in 56 bits.
        if self.size > (1u64 << 56) {
            return Err(ctx.invalid(
                "size",
                24,
                format!("virtual size {} is too large", self.size),
            ));
        }
        Ok(())
    }
}

/// QEMU's checks of a bitmaps extension it honours (autoclear bit 0 set),
/// and a directory that must end at a possible file offset.
fn check_bitmaps_ext(
    (count, dir_size, dir_offset): (u32, u64, u64),
    cluster_size: u64,
    off: u64,
    ctx: &Ctx,
) -> Result<()> {
    let why = if count == 0 {
        "has zero bitmaps".to_string()
    } else if count > MAX_BITMAPS {
        format!("has {count} bitmaps, more than QEMU's limit of {MAX_BITMAPS}")
    } else if dir_offset % cluster_size != 0 {
        format!("bitmap directory offset {dir_offset:#x} is not cluster aligned")
    } else if dir_size > MAX_BITMAP_DIRECTORY_BYTES {
        format!("bitmap directory of {dir_size} bytes exceeds QEMU's 64 MiB limit")
    } else if dir_offset > MAX_FILE_OFFSET - dir_size {
        format!(
            "the {dir_size}-byte bitmap directory at {dir_offset:#x} would end past the largest file offset"
        )
    } else {
        return Ok(());
    };
    Err(ctx.invalid("bitmaps extension", off, why))
}

fn check_cluster_bits(cluster_bits: u32, ctx: &Ctx) -> Result<u32> {
    if !(9..=21).contains(&cluster_bits) {
        return Err(ctx.invalid(
            "cluster_bits",
            20,
            format!("{cluster_bits} is out of range (expected 9 to 21: 512 B to 2 MiB clusters)"),
        ));
    }
    Ok(cluster_bits)
}

/// Reads the first cluster of a qcow2 file (or all of a shorter file):
/// the header, its extensions and the backing file name.
pub(crate) fn read_first_cluster(file: &File, ctx: &Ctx, file_len: u64) -> Result<Vec<u8>> {
    let mut first = [0u8; 24];
    let n = read_up_to_at(file, &ctx.path, &mut first, 0)?;
    if n < first.len() {
        return Err(ctx.invalid("header", 0, "file too short for a qcow2 header"));
    }
    if BigEndian::read_u32(&first[0..4]) != MAGIC {
        return Err(ctx.invalid("magic", 0, "not a qcow2 image (expected QFI\\xfb)"));
    }
    let cluster_bits = check_cluster_bits(BigEndian::read_u32(&first[20..24]), ctx)?;
    let mut buf = vec![0u8; (1u64 << cluster_bits).min(file_len) as usize];
    let n = read_up_to_at(file, &ctx.path, &mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

fn ext_string(data: &[u8], what: &str, off: u64, ctx: &Ctx) -> Result<String> {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8(data[..end].to_vec())
        .map_err(|_| ctx.invalid(what, off, "is not valid UTF-8"))
}

/// The fields of a header to write.
#[derive(Debug)]
pub struct HeaderOut<'a> {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub refcount_order: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub compression: Compression,
    pub backing_file: Option<&'a str>,
    pub backing_format: Option<&'a str>,
}

impl HeaderOut<'_> {
    /// The first cluster's header bytes (header, extensions, backing name).
    /// The feature-name table is optional and left out when the cluster is
    /// too small to hold it beside the backing name (512-byte clusters).
    pub fn to_bytes(&self) -> std::result::Result<Vec<u8>, String> {
        let cluster = 1usize << self.cluster_bits;
        for with_features in [true, false] {
            let b = self.encode(with_features);
            if b.len() <= cluster {
                return Ok(b);
            }
        }
        Err(format!(
            "the header and backing file name do not fit in one {cluster}-byte cluster"
        ))
    }

    fn encode(&self, with_features: bool) -> Vec<u8> {
        let room = 112
            + 8
            + self.backing_format.map_or(0, |f| f.len() + 16)
            + 8
            + KNOWN_FEATURES.len() * 48
            + 8
            + self.backing_file.map_or(0, str::len);
        let mut b = vec![0u8; room];
        let header_len: u32 = if self.version == 3 {
            112
        } else {
            V2_HEADER_LEN
        };
        BigEndian::write_u32(&mut b[0..], MAGIC);
        BigEndian::write_u32(&mut b[4..], self.version);
        BigEndian::write_u32(&mut b[20..], self.cluster_bits);
        BigEndian::write_u64(&mut b[24..], self.size);
        BigEndian::write_u32(&mut b[36..], self.l1_size);
        BigEndian::write_u64(&mut b[40..], self.l1_table_offset);
        BigEndian::write_u64(&mut b[48..], self.refcount_table_offset);
        BigEndian::write_u32(&mut b[56..], self.refcount_table_clusters);
        if self.version == 3 {
            BigEndian::write_u64(&mut b[72..], self.incompatible);
            BigEndian::write_u64(&mut b[80..], self.compatible);
            BigEndian::write_u32(&mut b[96..], self.refcount_order);
            BigEndian::write_u32(&mut b[100..], header_len);
            b[104] = match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            };
        }
        let mut off = header_len as usize;
        let mut ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            BigEndian::write_u32(&mut b[off..], ty);
            BigEndian::write_u32(&mut b[off + 4..], data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(data);
            off += 8 + data.len().div_ceil(8) * 8;
        };
        if let Some(fmt) = self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if self.version == 3 && with_features {
            let mut table = Vec::with_capacity(KNOWN_FEATURES.len() * 48);
            for (ty, bit, name) in KNOWN_FEATURES {
                let mut entry = [0u8; 48];
                entry[0] = ty;
                entry[1] = bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&entry);
            }
            ext(&mut b, EXT_FEATURE_TABLE, &table);
        }
        // End-of-extensions marker: 8 zero bytes, already there.
        off += 8;
        if let Some(name) = self.backing_file {
            BigEndian::write_u64(&mut b[8..], off as u64);
            BigEndian::write_u32(&mut b[16..], name.len() as u32);
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
            off += name.len();
        }
        b.truncate(off);
        b
    }
}
