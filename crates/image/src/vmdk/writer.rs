//! Writing VMDK: monolithicSparse (QEMU's hosted layout, with a redundant
//! grain directory) and streamOptimized in VMware's layout (compressed
//! grains with markers, a grain table after each table's grains, the grain
//! directory and a footer at the end), which is what ESXi and cloud
//! importers expect.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian};

use super::sparse::{GD_AT_END, MAGIC};
use crate::block::{Chunk, Encoder, ImageWriter, Packed, PlannedWrite, WritePlan, WriteSource};
use crate::compress::{self, Codec};
use crate::error::{Error, ErrorKind, Result};
use crate::fileio::write_all_at;

const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * 512;
const GTES_PER_GT: u64 = 512;
const GT_SECTORS: u64 = GTES_PER_GT * 4 / 512;
const DESC_OFFSET: u64 = 1;
const DESC_SECTORS: u64 = 20;
/// GTEs are u32 sector numbers: one sparse file stops at 2 TiB.
const MAX_FILE_SECTORS: u64 = u32::MAX as u64;

/// The VMDK subformats vmshift writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    MonolithicSparse,
    StreamOptimized,
    MonolithicFlat,
    TwoGbMaxExtentSparse,
    TwoGbMaxExtentFlat,
}

/// `-o` options for VMDK.
#[derive(Debug, Clone)]
pub struct VmdkOptions {
    pub subformat: Subformat,
    pub adapter_type: String,
    pub hw_version: String,
    pub tools_version: String,
    /// A disk database to write instead of the one built from the options
    /// (a resized stream keeps its own: uuid, hardware version, adapter);
    /// the cylinders are recomputed.
    pub ddb: Option<Vec<(String, String)>>,
}

impl Default for VmdkOptions {
    fn default() -> Self {
        VmdkOptions {
            subformat: Subformat::MonolithicSparse,
            adapter_type: "ide".into(),
            hw_version: "4".into(),
            tools_version: "2147483647".into(),
            ddb: None,
        }
    }
}

impl VmdkOptions {
    /// Applies `key=value` options as `qemu-img create -o` takes them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("option {key}={value}: {why}"),
            )
        };
        match key {
            "subformat" => {
                self.subformat = match value {
                    "monolithicSparse" => Subformat::MonolithicSparse,
                    "streamOptimized" => Subformat::StreamOptimized,
                    "monolithicFlat" => Subformat::MonolithicFlat,
                    "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
                    "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
                    _ => {
                        return Err(bad(
                            "expected monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized",
                        ))
                    }
                }
            }
            "adapter_type" => {
                if !["ide", "lsilogic", "buslogic", "legacyESX"].contains(&value) {
                    return Err(bad("expected ide, lsilogic, buslogic or legacyESX"));
                }
                self.adapter_type = value.into();
            }
            "hwversion" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("expected a number"));
                }
                self.hw_version = value.into();
            }
            "compat6" => {
                if matches!(value, "on" | "true") {
                    self.hw_version = "6".into();
                }
            }
            "toolsversion" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("expected a number"));
                }
                self.tools_version = value.into();
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("unknown or unsupported vmdk option '{key}'"),
                ))
            }
        }
        Ok(())
    }
}

/// Compresses grains for streamOptimized output (zlib framing).
#[derive(Debug)]
struct StreamEncoder;

impl Encoder for StreamEncoder {
    fn encode(&self, data: &[u8]) -> Result<Packed> {
        let grains = data
            .chunks(GRAIN as usize)
            .map(|g| {
                let mut padded;
                let input = if g.len() < GRAIN as usize {
                    padded = g.to_vec();
                    padded.resize(GRAIN as usize, 0);
                    &padded[..]
                } else {
                    g
                };
                // Every stream grain is compressed; incompressible data
                // grows a little, well within the two grains readers allow.
                compress::compress(Codec::Zlib, input, 2 * GRAIN as usize).ok_or_else(|| {
                    Error::new(ErrorKind::Io, "a grain did not compress into two grains")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(grains))
    }
}

/// Writes a new single-file sparse VMDK.
#[derive(Debug)]
pub struct VmdkWriter {
    file: Arc<File>,
    path: PathBuf,
    opts: VmdkOptions,
    /// Virtual size in bytes (a multiple of 512).
    size: u64,
    /// The extent's file name as the descriptor names it.
    name: String,
    gt: Vec<u32>,
    /// Next free sector.
    next: u64,
    /// Stream: grain tables written so far, and the first not yet written.
    gd: Vec<u32>,
    gts_flushed: u64,
    /// Stream: the last grain placed (grains must come in order).
    last_grain: Option<u64>,
    /// Write the descriptor into the file (not for the pieces of a split
    /// set, whose descriptor is a file of its own).
    pub(crate) embed_descriptor: bool,
    layout: Layout,
}

/// Where a hosted sparse file keeps its tables.
#[derive(Debug, Clone, Copy)]
struct Layout {
    gd_entries: u64,
    gd_sectors: u64,
    rgd: u64,
    gd: u64,
    overhead: u64,
}

impl VmdkWriter {
    pub fn create(
        file: File,
        path: &Path,
        size: u64,
        name: &str,
        opts: VmdkOptions,
    ) -> Result<Self> {
        let size = size.div_ceil(512) * 512;
        let capacity = size / 512;
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gd_entries = grains.div_ceil(GTES_PER_GT);
        let gd_sectors = (gd_entries * 4).div_ceil(512);
        let layout = match opts.subformat {
            Subformat::MonolithicSparse
            | Subformat::MonolithicFlat
            | Subformat::TwoGbMaxExtentSparse
            | Subformat::TwoGbMaxExtentFlat => {
                let rgd = DESC_OFFSET + DESC_SECTORS;
                let gd = rgd + gd_sectors + gd_entries * GT_SECTORS;
                let end = gd + gd_sectors + gd_entries * GT_SECTORS;
                Layout {
                    gd_entries,
                    gd_sectors,
                    rgd,
                    gd,
                    overhead: end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS,
                }
            }
            Subformat::StreamOptimized => Layout {
                gd_entries,
                gd_sectors,
                rgd: 0,
                gd: GD_AT_END,
                overhead: (DESC_OFFSET + DESC_SECTORS).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS,
            },
        };
        // Metadata plus every grain allocated must stay addressable.
        if layout.overhead + grains * GRAIN_SECTORS + gd_entries * (GT_SECTORS + 1) + gd_sectors + 8
            > MAX_FILE_SECTORS
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a {size}-byte disk does not fit one sparse VMDK file (2 TiB at most)"),
            )
            .at_path(path));
        }
        Ok(VmdkWriter {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            name: name.to_string(),
            gt: vec![0; (gd_entries * GTES_PER_GT) as usize],
            next: layout.overhead,
            gd: vec![0; gd_entries as usize],
            gts_flushed: 0,
            last_grain: None,
            embed_descriptor: true,
            layout,
            opts,
        })
    }

    fn stream(&self) -> bool {
        self.opts.subformat == Subformat::StreamOptimized
    }

    /// Stream: appends grain tables `self.gts_flushed..upto` (those holding
    /// any grain) as GT markers + tables.
    fn flush_gts(&mut self, upto: u64, out: &mut Vec<u8>, out_start: u64) {
        while self.gts_flushed < upto.min(self.layout.gd_entries) {
            let k = self.gts_flushed as usize;
            let table = &self.gt[k * GTES_PER_GT as usize..(k + 1) * GTES_PER_GT as usize];
            if table.iter().any(|&e| e != 0) {
                out.extend_from_slice(&marker(GT_SECTORS, 1));
                self.gd[k] = u32::try_from(out_start + out.len() as u64 / 512).unwrap_or(u32::MAX);
                for e in table {
                    out.extend_from_slice(&e.to_le_bytes());
                }
            }
            self.gts_flushed += 1;
        }
    }

    fn header(&self, gd_offset: u64, rgd_offset: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[0..4].copy_from_slice(MAGIC);
        let (version, flags, compress) = match self.opts.subformat {
            Subformat::StreamOptimized => (3u32, 0x3_0001u32, 1u16),
            _ => (1, 0x3, 0),
        };
        LittleEndian::write_u32(&mut h[4..], version);
        LittleEndian::write_u32(&mut h[8..], flags);
        LittleEndian::write_u64(&mut h[12..], self.size / 512);
        LittleEndian::write_u64(&mut h[20..], GRAIN_SECTORS);
        LittleEndian::write_u64(&mut h[28..], DESC_OFFSET);
        LittleEndian::write_u64(&mut h[36..], DESC_SECTORS);
        LittleEndian::write_u32(&mut h[44..], GTES_PER_GT as u32);
        LittleEndian::write_u64(&mut h[48..], rgd_offset);
        LittleEndian::write_u64(&mut h[56..], gd_offset);
        LittleEndian::write_u64(&mut h[64..], self.layout.overhead);
        h[73..77].copy_from_slice(b"\n \r\n");
        LittleEndian::write_u16(&mut h[77..], compress);
        h
    }

    fn descriptor(&self) -> String {
        let create_type = match self.opts.subformat {
            Subformat::StreamOptimized => "streamOptimized",
            _ => "monolithicSparse",
        };
        let line = format!(
            "RW {} SPARSE \"{}\"",
            self.size / 512,
            self.name.replace('"', "_")
        );
        descriptor_text(create_type, &[line], self.size, &self.opts)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(GRAIN) || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("VMDK writes must be grain aligned and inside the disk (offset {offset:#x}, {len} bytes)"),
            )
            .at_path(&self.path));
        }
        Ok(())
    }
}

/// A descriptor in the form QEMU and VMware write: header, extent lines,
/// disk database.
pub(crate) fn descriptor_text(
    create_type: &str,
    extents: &[String],
    size: u64,
    opts: &VmdkOptions,
) -> String {
    if let Some(ddb) = &opts.ddb {
        let num = |k: &str| {
            ddb.iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        };
        let heads = num("ddb.geometry.heads").unwrap_or(16).max(1);
        let sectors = num("ddb.geometry.sectors").unwrap_or(63).max(1);
        let cylinders = (size / (heads * sectors * 512)).min(65535);
        let lines: Vec<String> = ddb
            .iter()
            .map(|(k, v)| {
                let v = if k == "ddb.geometry.cylinders" {
                    cylinders.to_string()
                } else {
                    v.clone()
                };
                format!("{k} = \"{v}\"")
            })
            .collect();
        return format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
             # Extent description\n{extents}\n\n\
             # The Disk Data Base\n#DDB\n\n{ddb}\n",
            cid = new_cid(),
            extents = extents.join("\n"),
            ddb = lines.join("\n"),
        );
    }
    let heads: u64 = if opts.adapter_type == "ide" { 16 } else { 255 };
    let cylinders = size / (63 * heads * 512);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
         # Extent description\n{extents}\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"{hw}\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"{adapter}\"\nddb.toolsVersion = \"{tools}\"\n",
        cid = new_cid(),
        extents = extents.join("\n"),
        hw = opts.hw_version,
        adapter = opts.adapter_type,
        tools = opts.tools_version,
    )
}

/// A metadata marker sector: {numSectors, size 0, type}.
fn marker(sectors: u64, ty: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    LittleEndian::write_u64(&mut m[0..], sectors);
    LittleEndian::write_u32(&mut m[12..], ty);
    m
}

/// A content id: random enough to tell disks apart, never the special
/// values ffffffff ("no parent") and fffffffe.
fn new_cid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() as u32).min(0xffff_fffd)
}

impl ImageWriter for VmdkWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        GRAIN
    }

    fn zero_initialized(&self) -> bool {
        true
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        if self.stream() {
            Arc::new(StreamEncoder)
        } else {
            Arc::new(crate::block::PlainEncoder)
        }
    }

    fn plan(&mut self, c: &Chunk<'_>) -> Result<WritePlan> {
        self.check_range(c.offset, c.data.len() as u64)?;
        let first_grain = c.offset / GRAIN;
        let mut writes = Vec::new();
        if !self.stream() {
            for (i, g) in c.data.chunks(GRAIN as usize).enumerate() {
                let grain = first_grain + i as u64;
                if self.gt[grain as usize] != 0 {
                    return Err(
                        Error::new(ErrorKind::Unsupported, "rewriting an allocated grain")
                            .at_path(&self.path),
                    );
                }
                let sector = self.next;
                self.next += GRAIN_SECTORS;
                self.gt[grain as usize] = sector as u32;
                let at = i * GRAIN as usize;
                let source = if g.len() == GRAIN as usize {
                    WriteSource::Data(at..at + g.len())
                } else {
                    let mut padded = g.to_vec();
                    padded.resize(GRAIN as usize, 0);
                    WriteSource::Owned(padded)
                };
                writes.push(PlannedWrite {
                    host_offset: sector * 512,
                    source,
                });
            }
            return Ok(WritePlan {
                file: self.file.clone(),
                path: self.path.clone(),
                writes,
                parts: Vec::new(),
            });
        }
        let packed = c.compressed.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "streamOptimized data must come from its encoder",
            )
            .at_path(&self.path)
        })?;
        let start = self.next;
        let mut out = Vec::new();
        for (i, p) in packed.iter().enumerate() {
            let grain = first_grain + i as u64;
            if self.last_grain.is_some_and(|l| grain <= l) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "streamOptimized output is written in order, each grain once",
                )
                .at_path(&self.path));
            }
            self.flush_gts(grain / GTES_PER_GT, &mut out, start);
            let sector = start + out.len() as u64 / 512;
            self.gt[grain as usize] = sector as u32;
            out.extend_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
            out.resize(out.len().div_ceil(512) * 512, 0);
            self.last_grain = Some(grain);
        }
        self.next = start + out.len() as u64 / 512;
        Ok(WritePlan {
            file: self.file.clone(),
            path: self.path.clone(),
            writes: vec![PlannedWrite {
                host_offset: start * 512,
                source: WriteSource::Owned(out),
            }],
            parts: Vec::new(),
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        // A new image reads as zero; only allocated grains need zeroing.
        let (first, last) = (offset / GRAIN, (offset + len).div_ceil(GRAIN));
        if (first..last).any(|g| self.gt.get(g as usize).is_some_and(|&e| e != 0)) {
            return Err(
                Error::new(ErrorKind::Unsupported, "zeroing grains already written")
                    .at_path(&self.path),
            );
        }
        Ok(())
    }

    fn finish_with(mut self: Box<Self>, flush: bool) -> Result<()> {
        let desc = self.descriptor();
        if desc.len() as u64 > DESC_SECTORS * 512 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the descriptor does not fit its 20 sectors (file name too long?)",
            )
            .at_path(&self.path));
        }
        let le = |v: &[u32]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
        let header = if self.stream() {
            let start = self.next;
            let mut out = Vec::new();
            self.flush_gts(u64::MAX, &mut out, start);
            let gd_at = start + out.len() as u64 / 512 + 1;
            out.extend_from_slice(&marker(self.layout.gd_sectors, 2));
            let mut gd = le(&self.gd);
            gd.resize((self.layout.gd_sectors * 512) as usize, 0);
            out.extend_from_slice(&gd);
            out.extend_from_slice(&marker(1, 3));
            out.extend_from_slice(&self.header(gd_at, 0));
            out.extend_from_slice(&marker(0, 0));
            write_all_at(&self.file, &self.path, &out, start * 512)?;
            self.next = start + out.len() as u64 / 512;
            self.header(GD_AT_END, 0)
        } else {
            let l = self.layout;
            for (dir, tables) in [(l.rgd, l.rgd + l.gd_sectors), (l.gd, l.gd + l.gd_sectors)] {
                let entries: Vec<u32> = (0..l.gd_entries)
                    .map(|k| (tables + k * GT_SECTORS) as u32)
                    .collect();
                write_all_at(&self.file, &self.path, &le(&entries), dir * 512)?;
                write_all_at(&self.file, &self.path, &le(&self.gt), tables * 512)?;
            }
            self.next = self.next.max(l.overhead);
            self.header(l.gd, l.rgd)
        };
        if self.embed_descriptor {
            let mut d = desc.into_bytes();
            d.resize((DESC_SECTORS * 512) as usize, 0);
            write_all_at(&self.file, &self.path, &d, DESC_OFFSET * 512)?;
        }
        self.file
            .set_len(self.next * 512)
            .map_err(|e| Error::io(&self.path, "setting the file length", e))?;
        write_all_at(&self.file, &self.path, &header, 0)?;
        if !flush {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.path, "syncing the image", e))
    }
}
