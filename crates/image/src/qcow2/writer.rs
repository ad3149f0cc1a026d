//! Writing qcow2 images.
//!
//! The writer appends: guest data goes to the end of the file as it
//! arrives (compressed clusters packed byte by byte), L2 tables stay in
//! memory, and `finish` writes the L2 tables, the L1 table, refcounts
//! computed from what was written, and finally the header. Until then the
//! file is not a valid image, which is why outputs are written to a temp
//! file and renamed into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};

use super::header::{self, Compression, Header, HeaderOut};
use super::reader::{CompressedLayout, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::block::{Chunk, Encoder, ImageWriter, Packed, PlannedWrite, WritePlan, WriteSource};
use crate::compress::{self, Codec};
use crate::error::{Error, ErrorKind, Result};
use crate::fileio::write_all_at;

/// Metadata preallocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Allocate on write.
    #[default]
    Off,
    /// Allocate every L2 table and data cluster up front (sparse file).
    Metadata,
}

/// The `-o` options of a qcow2 image to create.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    pub cluster_bits: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub refcount_order: u32,
    pub compression: Compression,
    /// Compress every cluster (`-c`).
    pub compress_data: bool,
    pub lazy_refcounts: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub preallocation: Preallocation,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            compression: Compression::Zlib,
            compress_data: false,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
        }
    }
}

impl Qcow2Options {
    /// Applies `key=value` options as `qemu-img create -o` takes them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("option {key}={value}: {why}"),
            )
        };
        match key {
            "cluster_size" => {
                let n = vmshift_model::parse_size(value).map_err(|e| bad(e.to_string()))?;
                if !n.is_power_of_two() || !(512..=(2 << 20)).contains(&n) {
                    return Err(bad("expected a power of two from 512 to 2M".into()));
                }
                self.cluster_bits = n.trailing_zeros();
            }
            "compat" => {
                self.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad("expected 0.10 or 1.1".into())),
                }
            }
            "refcount_bits" => {
                let n: u32 = value.parse().map_err(|_| bad("expected a number".into()))?;
                if !n.is_power_of_two() || n > 64 {
                    return Err(bad("expected 1, 2, 4, 8, 16, 32 or 64".into()));
                }
                self.refcount_order = n.trailing_zeros();
            }
            "compression_type" => {
                self.compression = match value {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => return Err(bad("expected zlib or zstd".into())),
                }
            }
            "lazy_refcounts" => self.lazy_refcounts = parse_bool(value).ok_or_else(|| bad("expected on or off".into()))?,
            "backing_file" => {
                if value.is_empty() || value.len() > header::MAX_BACKING_NAME as usize {
                    return Err(bad(format!(
                        "a backing file name has 1 to {} bytes",
                        header::MAX_BACKING_NAME
                    )));
                }
                self.backing_file = Some(value.to_string())
            }
            "backing_fmt" => {
                let f: vmshift_model::DiskFormat = value.parse().map_err(bad)?;
                self.backing_format = Some(f.name().to_string())
            }
            "preallocation" => {
                self.preallocation = match value {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    _ => return Err(bad("expected off or metadata (falloc and full are not supported for qcow2)".into())),
                }
            }
            "extended_l2" | "data_file" | "data_file_raw" | "encryption" | "encrypt.format" => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("option {key} is not supported when writing qcow2 (reading such images works)"),
                ))
            }
            _ => return Err(Error::new(ErrorKind::InvalidInput, format!("unknown qcow2 option '{key}'"))),
        }
        Ok(())
    }

    /// Checks combinations the way qemu-img does.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::new(ErrorKind::InvalidInput, why.to_string()));
        if self.version == 2 {
            if self.refcount_order != 4 {
                return bad("refcount_bits other than 16 needs compat=1.1");
            }
            if self.compression != Compression::Zlib {
                return bad("compression_type=zstd needs compat=1.1");
            }
            if self.lazy_refcounts {
                return bad("lazy_refcounts needs compat=1.1");
            }
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("backing_fmt needs backing_file");
        }
        if self.compress_data && self.preallocation != Preallocation::Off {
            return bad("compressed output cannot be preallocated");
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            // Every cluster would be allocated, hiding the backing file.
            return bad("preallocation with a backing file would hide the backing file's data");
        }
        Ok(())
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Prepares clusters for a qcow2 writer: compresses them when asked.
#[derive(Debug)]
struct Qcow2Encoder {
    cluster_size: usize,
    codec: Option<Codec>,
}

impl Encoder for Qcow2Encoder {
    fn encode(&self, data: &[u8]) -> Result<Packed> {
        Ok(self.codec.map(|codec| {
            data.chunks(self.cluster_size)
                .map(|chunk| {
                    let mut padded;
                    let input = if chunk.len() < self.cluster_size {
                        padded = chunk.to_vec();
                        padded.resize(self.cluster_size, 0);
                        &padded[..]
                    } else {
                        chunk
                    };
                    compress::compress(codec, input, self.cluster_size).unwrap_or_default()
                })
                .collect()
        }))
    }
}

/// Writes a new qcow2 image into a file.
#[derive(Debug)]
pub struct Qcow2Writer {
    file: Arc<File>,
    path: PathBuf,
    opts: Qcow2Options,
    size: u64,
    cs: u64,
    l2_entries: u64,
    /// L2 tables by L1 index.
    l2: BTreeMap<u64, Box<[u64]>>,
    /// The next free byte of the file.
    end: u64,
    /// The host cluster compressed data last went into, and how many
    /// compressed clusters it holds (refcounts have a maximum).
    packed: (u64, u64),
    /// Compressed clusters waiting to be written: (host offset, bytes).
    batch: (u64, Vec<u8>),
    layout: CompressedLayout,
}

impl Qcow2Writer {
    /// Starts a new image of `size` bytes in `file` (empty, writable).
    pub fn create(file: File, path: &Path, size: u64, opts: Qcow2Options) -> Result<Self> {
        Self::create_after(file, path, size, opts, 0)
    }

    /// Like [`create`](Self::create), but places every new cluster after
    /// byte `keep` of the file: what lies before it (an old image's
    /// header and tables) stays intact until `finish` writes the header.
    fn create_after(
        file: File,
        path: &Path,
        size: u64,
        opts: Qcow2Options,
        keep: u64,
    ) -> Result<Self> {
        opts.validate()?;
        // QEMU counts the virtual size in 512-byte sectors and rounds up.
        let size = size.div_ceil(512) * 512;
        let cs = 1u64 << opts.cluster_bits;
        let l2_entries = cs / 8;
        let coverage = cs * l2_entries;
        let l1_size = Header::l1_entries_needed(size, coverage);
        if l1_size * 8 > header::MAX_L1_BYTES || size > 1 << 56 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a {size}-byte image needs an L1 table larger than QEMU's 32 MiB limit; use larger clusters"),
            )
            .at_path(path));
        }
        let mut w = Qcow2Writer {
            file: Arc::new(file),
            path: path.to_path_buf(),
            layout: CompressedLayout::new(opts.cluster_bits),
            opts,
            size,
            cs,
            l2_entries,
            l2: BTreeMap::new(),
            end: keep.div_ceil(cs).max(1) * cs,
            packed: (0, 0),
            batch: (0, Vec::new()),
        };
        // Check the header fits before any work is done.
        w.header_bytes(0, 0, 0, 0)?;
        if w.opts.preallocation == Preallocation::Metadata {
            let clusters = size.div_ceil(cs);
            for c in 0..clusters {
                let host = w.alloc_cluster();
                *w.entry_mut(c * cs) = host | OFLAG_COPIED;
            }
        }
        Ok(w)
    }

    fn write_plan(&self, writes: Vec<PlannedWrite>) -> WritePlan {
        WritePlan {
            file: self.file.clone(),
            path: self.path.clone(),
            writes,
            parts: Vec::new(),
        }
    }

    fn max_refcount(&self) -> u64 {
        match 1u64 << self.opts.refcount_order {
            64 => u64::MAX,
            bits => (1 << bits) - 1,
        }
    }

    fn alloc_cluster(&mut self) -> u64 {
        let host = self.end.div_ceil(self.cs) * self.cs;
        self.end = host + self.cs;
        host
    }

    fn entry_mut(&mut self, guest: u64) -> &mut u64 {
        let coverage = self.cs * self.l2_entries;
        let n = self.l2_entries as usize;
        let table = self
            .l2
            .entry(guest / coverage)
            .or_insert_with(|| vec![0u64; n].into_boxed_slice());
        &mut table[((guest % coverage) / self.cs) as usize]
    }

    fn entry(&self, guest: u64) -> u64 {
        let coverage = self.cs * self.l2_entries;
        self.l2
            .get(&(guest / coverage))
            .map_or(0, |t| t[((guest % coverage) / self.cs) as usize])
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "write of {len} bytes at {offset:#x} past the virtual size {}",
                    self.size
                ),
            )
            .at_path(&self.path));
        }
        Ok(())
    }

    /// Plans uncompressed data (any alignment) into clusters, allocating
    /// runs of new clusters contiguously so each run is one write. `base` is
    /// where `data` starts in the encoded chunk the plan refers to.
    fn plan_plain(
        &mut self,
        data: &[u8],
        base: usize,
        offset: u64,
        out: &mut Vec<PlannedWrite>,
    ) -> Result<()> {
        let cs = self.cs;
        let mut pos = offset;
        let end = offset + data.len() as u64;
        while pos < end {
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min(end - pos);
            let src = &data[(pos - offset) as usize..(pos - offset + n) as usize];
            let entry = self.entry(pos);
            let host = entry & OFFSET_MASK;
            if entry & OFLAG_COMPRESSED != 0 {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("rewriting compressed cluster at guest offset {pos:#x}"),
                )
                .at_path(&self.path));
            }
            if host != 0 {
                let at = base + (pos - offset) as usize;
                out.push(PlannedWrite {
                    host_offset: host + in_cluster,
                    source: WriteSource::Data(at..at + src.len()),
                });
                if entry & OFLAG_ZERO != 0 {
                    *self.entry_mut(pos) = host | OFLAG_COPIED;
                }
                pos += n;
                continue;
            }
            // A run of unallocated clusters: allocate them together.
            let run_start = pos - in_cluster;
            let mut run_end = run_start + cs;
            while run_end < end && self.entry(run_end) & (OFFSET_MASK | OFLAG_COMPRESSED) == 0 {
                run_end += cs;
            }
            if self.opts.backing_file.is_some()
                && (in_cluster != 0 || (run_end > end && end < self.size))
            {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "partial-cluster write over a backing file (the writer does not copy on write)",
                )
                .at_path(&self.path));
            }
            let first = self.alloc_cluster();
            for (i, g) in (run_start..run_end).step_by(cs as usize).enumerate() {
                if i > 0 {
                    self.alloc_cluster();
                }
                *self.entry_mut(g) = (first + i as u64 * cs) | OFLAG_COPIED;
            }
            let run_len = run_end - run_start;
            let data_end = end.min(run_end);
            let source = if in_cluster == 0 && data_end - run_start == run_len {
                let at = base + (run_start - offset) as usize;
                WriteSource::Data(at..at + run_len as usize)
            } else {
                // A partial cluster: pad it with zeros.
                let mut buf = vec![0u8; run_len as usize];
                buf[in_cluster as usize..(data_end - run_start) as usize]
                    .copy_from_slice(&data[(pos - offset) as usize..(data_end - offset) as usize]);
                WriteSource::Owned(buf)
            };
            out.push(PlannedWrite {
                host_offset: first,
                source,
            });
            pos = data_end;
        }
        Ok(())
    }

    fn flush_batch(&mut self, out: &mut Vec<PlannedWrite>) {
        if !self.batch.1.is_empty() {
            out.push(PlannedWrite {
                host_offset: self.batch.0,
                source: WriteSource::Owned(std::mem::take(&mut self.batch.1)),
            });
        }
    }

    /// Appends one compressed cluster and points `guest` at it.
    fn plan_compressed(
        &mut self,
        packed: &[u8],
        guest: u64,
        out: &mut Vec<PlannedWrite>,
    ) -> Result<()> {
        let entry = self.entry(guest);
        if entry & (OFFSET_MASK | OFLAG_COMPRESSED) != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("compressed rewrite of allocated cluster at guest offset {guest:#x}"),
            )
            .at_path(&self.path));
        }
        let mut start = self.end;
        let first_cluster = (start & !511) / self.cs;
        if self.packed.0 == first_cluster && self.packed.1 >= self.max_refcount() {
            start = self.end.div_ceil(self.cs) * self.cs;
        }
        let len = packed.len() as u64;
        // Batch contiguous compressed clusters into one write.
        if self.batch.0 + self.batch.1.len() as u64 != start {
            self.flush_batch(out);
            self.batch.0 = start;
        }
        self.batch.1.extend_from_slice(packed);
        let (first, last) = ((start & !511) / self.cs, (start + len - 1) / self.cs);
        self.packed = if self.packed.0 == first {
            (last, if last == first { self.packed.1 + 1 } else { 1 })
        } else {
            (last, 1)
        };
        self.end = start + len;
        *self.entry_mut(guest) = self.layout.encode(start, len);
        Ok(())
    }

    fn header_bytes(
        &self,
        l1_size: u32,
        l1_offset: u64,
        rt_offset: u64,
        rt_clusters: u32,
    ) -> Result<Vec<u8>> {
        let o = &self.opts;
        let mut incompatible = 0;
        if o.compression != Compression::Zlib {
            incompatible |= header::INCOMPAT_COMPRESSION;
        }
        HeaderOut {
            version: o.version,
            cluster_bits: o.cluster_bits,
            size: self.size,
            l1_size,
            l1_table_offset: l1_offset,
            refcount_table_offset: rt_offset,
            refcount_table_clusters: rt_clusters,
            refcount_order: o.refcount_order,
            incompatible,
            compatible: if o.lazy_refcounts {
                header::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            compression: o.compression,
            backing_file: o.backing_file.as_deref(),
            backing_format: o.backing_format.as_deref(),
        }
        .to_bytes()
        .map_err(|e| Error::new(ErrorKind::InvalidInput, e).at_path(&self.path))
    }
}

impl ImageWriter for Qcow2Writer {
    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.cs
    }

    fn compresses(&self) -> bool {
        self.opts.compress_data
    }

    fn zero_initialized(&self) -> bool {
        self.opts.backing_file.is_none()
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        let codec = self
            .opts
            .compress_data
            .then_some(match self.opts.compression {
                Compression::Zlib => Codec::RawDeflate,
                Compression::Zstd => Codec::Zstd,
            });
        Arc::new(Qcow2Encoder {
            cluster_size: self.cs as usize,
            codec,
        })
    }

    fn plan(&mut self, e: &Chunk<'_>) -> Result<WritePlan> {
        self.check_range(e.offset, e.data.len() as u64)?;
        let mut out = Vec::new();
        let Some(packed) = e.compressed else {
            self.plan_plain(e.data, 0, e.offset, &mut out)?;
            return Ok(self.write_plan(out));
        };
        if !e.offset.is_multiple_of(self.cs) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "compressed writes must be cluster aligned",
            )
            .at_path(&self.path));
        }
        for (i, (chunk, p)) in e.data.chunks(self.cs as usize).zip(packed).enumerate() {
            let guest = e.offset + i as u64 * self.cs;
            if p.is_empty() {
                self.plan_plain(chunk, i * self.cs as usize, guest, &mut out)?;
            } else {
                self.plan_compressed(p, guest, &mut out)?;
            }
        }
        self.flush_batch(&mut out);
        Ok(self.write_plan(out))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let cs = self.cs;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min(end - pos);
            let whole = in_cluster == 0 && (n == cs || pos + n == self.size);
            let entry = self.entry(pos);
            let host = entry & OFFSET_MASK;
            let backing = self.opts.backing_file.is_some();
            if whole && self.opts.version == 3 && entry & OFLAG_COMPRESSED == 0 {
                // Keep a preallocated cluster, marked as reading zero.
                let keep = if host != 0 { host | OFLAG_COPIED } else { 0 };
                *self.entry_mut(pos) = keep | OFLAG_ZERO;
            } else if entry == 0 && !backing {
                // Unallocated without a backing file already reads as zero.
            } else {
                let zeros = vec![0u8; n as usize];
                let mut out = Vec::new();
                self.plan_plain(&zeros, 0, pos, &mut out)?;
                self.write_plan(out).execute(&zeros)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn finish_with(mut self: Box<Self>, flush: bool) -> Result<()> {
        let cs = self.cs;
        // L2 tables.
        let coverage = cs * self.l2_entries;
        let l1_size = Header::l1_entries_needed(self.size, coverage);
        let mut l1 = vec![0u64; l1_size as usize];
        let tables = std::mem::take(&mut self.l2);
        let mut refs = vec![0u64; 1];
        refs[0] = 1; // header
        self.count_data_refs_from(&tables, &mut refs);
        for (&idx, table) in &tables {
            if table.iter().all(|&e| e == 0) {
                continue;
            }
            let host = self.alloc_cluster();
            let mut raw = vec![0u8; cs as usize];
            for (i, e) in table.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            write_all_at(&self.file, &self.path, &raw, host)?;
            l1[idx as usize] = host | OFLAG_COPIED;
            bump(&mut refs, host / cs);
        }
        // L1 table (at least one cluster, as QEMU does).
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let l1_offset = self.alloc_cluster();
        for _ in 1..l1_clusters {
            self.alloc_cluster();
        }
        let mut raw = vec![0u8; (l1_clusters * cs) as usize];
        for (i, e) in l1.iter().enumerate() {
            BigEndian::write_u64(&mut raw[i * 8..], *e);
        }
        write_all_at(&self.file, &self.path, &raw, l1_offset)?;
        for c in 0..l1_clusters {
            bump(&mut refs, l1_offset / cs + c);
        }
        // Refcount blocks and table, sized to also count themselves.
        let bits = 1u64 << self.opts.refcount_order;
        let per_block = cs * 8 / bits;
        let base = self.end.div_ceil(cs);
        let (mut blocks, mut rt_clusters) = (0u64, 0u64);
        loop {
            let total = base + blocks + rt_clusters;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs).max(1);
            if (b, t) == (blocks, rt_clusters) {
                break;
            }
            (blocks, rt_clusters) = (b, t);
        }
        if rt_clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the image needs a refcount table of {} bytes, over QEMU's 8 MiB limit; \
                     use larger clusters or fewer refcount bits",
                    rt_clusters * cs
                ),
            )
            .at_path(&self.path));
        }
        let rb_offset = base * cs;
        let rt_offset = rb_offset + blocks * cs;
        for c in base..base + blocks + rt_clusters {
            bump(&mut refs, c);
        }
        let mut table = vec![0u8; (rt_clusters * cs) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            let first = b * per_block;
            for i in 0..per_block {
                let r = refs.get((first + i) as usize).copied().unwrap_or(0);
                if r != 0 {
                    put_refcount(&mut block, i as usize, bits, r);
                }
            }
            let off = rb_offset + b * cs;
            write_all_at(&self.file, &self.path, &block, off)?;
            BigEndian::write_u64(&mut table[(b * 8) as usize..], off);
        }
        write_all_at(&self.file, &self.path, &table, rt_offset)?;
        self.end = rt_offset + rt_clusters * cs;
        let file_end = self.end.max(tables_end(&tables, cs));
        self.file
            .set_len(file_end)
            .map_err(|e| Error::io(&self.path, "setting the file length", e))?;
        // The header last: until now the file is not a valid image.
        let header = self.header_bytes(l1_size as u32, l1_offset, rt_offset, rt_clusters as u32)?;
        write_all_at(&self.file, &self.path, &header, 0)?;
        if !flush {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.path, "syncing the image", e))
    }
}

impl Qcow2Writer {
    fn count_data_refs_from(&self, tables: &BTreeMap<u64, Box<[u64]>>, refs: &mut Vec<u64>) {
        for table in tables.values() {
            for &e in table.iter() {
                if e & OFLAG_COMPRESSED != 0 {
                    let (off, len) = self.layout.decode(e);
                    let start = off & !511;
                    for c in start / self.cs..=(start + len - 1) / self.cs {
                        bump(refs, c);
                    }
                } else if e & OFFSET_MASK != 0 {
                    bump(refs, (e & OFFSET_MASK) / self.cs);
                }
            }
        }
    }
}

/// The end of the last preallocated data cluster.
fn tables_end(tables: &BTreeMap<u64, Box<[u64]>>, cs: u64) -> u64 {
    tables
        .values()
        .flat_map(|t| t.iter())
        .filter(|&&e| e & OFLAG_COMPRESSED == 0 && e & OFFSET_MASK != 0)
        .map(|&e| (e & OFFSET_MASK) + cs)
        .max()
        .unwrap_or(0)
}

fn bump(refs: &mut Vec<u64>, cluster: u64) {
    let i = cluster as usize;
    if refs.len() <= i {
        refs.resize(i + 1, 0);
    }
    refs[i] += 1;
}

/// Stores refcount `value` at `index` of a refcount block of `bits`-bit
/// entries (big-endian; sub-byte entries LSB-first).
pub(crate) fn put_refcount(block: &mut [u8], index: usize, bits: u64, value: u64) {
    match bits {
        64 => BigEndian::write_u64(&mut block[index * 8..], value),
        32 => BigEndian::write_u32(&mut block[index * 4..], value as u32),
        16 => BigEndian::write_u16(&mut block[index * 2..], value as u16),
        8 => block[index] = value as u8,
        _ => {
            let bit = index * bits as usize;
            let mask = ((1u16 << bits) - 1) as u8;
            let shift = bit % 8;
            let byte = &mut block[bit / 8];
            *byte = (*byte & !(mask << shift)) | (((value as u8) & mask) << shift);
        }
    }
}

/// Reads the refcount at `index` of a refcount block.
pub(crate) fn get_refcount(block: &[u8], index: usize, bits: u64) -> u64 {
    match bits {
        64 => BigEndian::read_u64(&block[index * 8..]),
        32 => u64::from(BigEndian::read_u32(&block[index * 4..])),
        16 => u64::from(BigEndian::read_u16(&block[index * 2..])),
        8 => u64::from(block[index]),
        _ => {
            let bit = index * bits as usize;
            let mask = ((1u16 << bits) - 1) as u8;
            u64::from((block[bit / 8] >> (bit % 8)) & mask)
        }
    }
}

impl Qcow2Writer {
    /// Rebuilds a pre-created qcow2 image that holds no data yet in place,
    /// with its own options (`convert -n`). The image must be at least
    /// `min_size` bytes and have no allocated clusters or snapshots.
    pub fn reuse_empty(file: File, path: &Path, min_size: u64) -> Result<Self> {
        use super::reader::read_table;
        let ctx = crate::error::Ctx::new(path);
        let len = crate::fileio::file_len(&file, path)?;
        let buf = header::read_first_cluster(&file, &ctx, len)?;
        let h = Header::parse(&buf, &ctx)?;
        let backing = h.backing_name(&buf, &ctx)?;
        let l1 = read_table(
            &file,
            &ctx,
            h.l1_table_offset,
            h.l1_size as usize,
            "L1 table",
            len,
        )?;
        if l1.iter().any(|&e| e & OFFSET_MASK != 0)
            || h.nb_snapshots != 0
            || h.data_file.is_some()
            || h.extended_l2()
            || h.bitmaps.is_some()
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "-n into a qcow2 image that already holds data, snapshots, bitmaps, extended L2 \
                 entries or an external data file; \
                 only a freshly created (empty) qcow2 can be written in place",
            )
            .at_path(path));
        }
        if h.size < min_size {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "target's virtual size {} is smaller than the source's {min_size}",
                    h.size
                ),
            )
            .at_path(path));
        }
        let opts = Qcow2Options {
            cluster_bits: h.cluster_bits,
            version: h.version,
            refcount_order: h.refcount_order,
            compression: h.compression,
            compress_data: false,
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            backing_file: backing,
            backing_format: h.backing_format.clone(),
            preallocation: Preallocation::Off,
        };
        // Build the new image after the old one's end: until `finish`
        // writes the new header, the file is still the old, valid image.
        Qcow2Writer::create_after(file, path, h.size, opts, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_packing_round_trips_every_width() {
        for bits in [1u64, 2, 4, 8, 16, 32, 64] {
            let mut block = vec![0u8; 64];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let n = 64 * 8 / bits as usize;
            for i in 0..n {
                put_refcount(&mut block, i, bits, (i as u64) % (max.min(1000) + 1));
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, i, bits),
                    (i as u64) % (max.min(1000) + 1),
                    "bits {bits} index {i}"
                );
            }
        }
    }
}
