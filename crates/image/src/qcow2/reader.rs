//! Reading qcow2 images: L1/L2 lookup, compressed clusters, extended L2,
//! backing files and external data files.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use byteorder::{BigEndian, ByteOrder};
use vmshift_model::DiskFormat;

use super::header::{self, Compression, Header};
use super::snapshot::{read_snapshots, Snapshot};
use crate::block::{BlockState, Extent, ImageInfo, ImageReader};
use crate::compress::{self, Codec};
use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::fileio::{file_len, read_exact_at, read_up_to_at};

/// L1 and L2 entries: bits 9–55 hold a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;

/// How many bytes of L2 tables a reader keeps in memory.
const L2_CACHE_BYTES: usize = vmshift_model::limits::QCOW2_L2_CACHE_BYTES;

/// What one L2 entry (or subcluster) says about its guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated here: ask the backing file. With extended L2 the
    /// subcluster may still lie in an allocated cluster (its host offset).
    Unallocated(Option<u64>),
    /// Reads as zero; may still own a preallocated host cluster.
    Zero(Option<u64>),
    /// Stored at this host offset (of the unit's start).
    Data(u64),
    /// Compressed: the raw L2 entry.
    Compressed(u64),
}

/// The geometry of compressed cluster descriptors.
#[derive(Debug, Clone, Copy)]
pub struct CompressedLayout {
    offset_bits: u32,
    cluster_bits: u32,
}

impl CompressedLayout {
    pub fn new(cluster_bits: u32) -> Self {
        CompressedLayout {
            offset_bits: 62 - (cluster_bits - 8),
            cluster_bits,
        }
    }

    /// Host byte offset and byte length (whole sectors, as QEMU counts them
    /// for refcounts: from the sector holding the start) of a compressed entry.
    pub fn decode(&self, entry: u64) -> (u64, u64) {
        let offset = entry & ((1u64 << self.offset_bits) - 1);
        let mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let sectors = ((entry >> self.offset_bits) & mask) + 1;
        (offset, sectors * 512)
    }

    /// The L2 entry for `len` compressed bytes at host offset `offset`.
    pub fn encode(&self, offset: u64, len: u64) -> u64 {
        let extra = ((offset + len - 1) >> 9) - (offset >> 9);
        OFLAG_COMPRESSED | (extra << self.offset_bits) | offset
    }
}

/// A qcow2 image opened for reading.
#[derive(Debug)]
pub struct Qcow2Reader {
    ctx: Ctx,
    file: File,
    file_len: u64,
    /// Where guest data lives: the image itself or its external data file.
    data: Option<(File, PathBuf, u64)>,
    pub(crate) header: Header,
    pub(crate) l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    backing: Option<Box<dyn ImageReader>>,
    backing_name: Option<String>,
    full_backing: Option<String>,
    backing_probed: Option<String>,
    snapshots: Vec<Snapshot>,
    compressed: CompressedLayout,
    /// Data clusters past the end of the file read as zeros (QEMU's way,
    /// for `compare` and salvage) instead of being an error.
    zeros_past_eof: bool,
    /// Why the backing file was not opened (`info` only).
    backing_refused: Option<String>,
    /// QEMU's guess that the image was made with preallocation=metadata
    /// (more clusters in use than the file has blocks): its data clusters
    /// may be holes in the file, which block status then reports as zero.
    metadata_prealloc: std::sync::OnceLock<bool>,
}

#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
}

/// What opening a qcow2 image needs from the caller: a way to open the
/// backing file and the data file (through the gate).
pub trait ChainOpener {
    /// Opens the backing file `name` stored in `image` with `format` (or
    /// probes it when `None`, returning the probed format's name).
    fn open_backing(
        &self,
        image: &Path,
        name: &str,
        format: Option<&str>,
    ) -> Result<(Box<dyn ImageReader>, Option<String>)>;

    /// Opens a file `name` that `image` names as its `what` (a data file,
    /// an extent), through the gate.
    fn open_named(&self, image: &Path, name: &str, what: &str) -> Result<(PathBuf, File)>;

    /// Whether data past the end of a truncated file reads as zeros, as
    /// QEMU reads it, rather than being an error.
    fn zeros_past_eof(&self) -> bool {
        false
    }

    /// Whether an image whose backing file the gate refuses is still
    /// opened, without it (`info`: the chain is shown, nothing is read
    /// through it).
    fn keep_refused_backing(&self) -> bool {
        false
    }
}

impl Qcow2Reader {
    /// Opens `path` (already opened read-only as `file`).
    pub fn open(file: File, path: &Path, opener: &dyn ChainOpener) -> Result<Self> {
        let ctx = Ctx::new(path);
        let file_len = file_len(&file, path)?;
        let buf = header::read_first_cluster(&file, &ctx, file_len)?;
        let header = Header::parse(&buf, &ctx)?;
        let backing_name = header.backing_name(&buf, &ctx)?;
        let l1 = read_table(
            &file,
            &ctx,
            header.l1_table_offset,
            header.l1_size as usize,
            "L1 table",
            file_len,
        )?;
        let snapshots = read_snapshots(&file, &ctx, &header, file_len)?;
        let data = match &header.data_file {
            Some(name) if header.incompatible & header::INCOMPAT_DATA_FILE != 0 => {
                let (p, f) = opener.open_named(path, name, "external data file")?;
                let len = crate::fileio::file_len(&f, &p)?;
                Some((f, p, len))
            }
            _ => None,
        };
        let (backing, backing_probed, backing_refused) = match &backing_name {
            Some(name) => match opener.open_backing(path, name, header.backing_format.as_deref()) {
                Ok((r, probed)) => (Some(r), probed, None),
                Err(e) if e.kind() == ErrorKind::Refused && opener.keep_refused_backing() => {
                    (None, None, Some(e.to_string()))
                }
                Err(e) => return Err(e),
            },
            None => (None, None, None),
        };
        let full_backing = backing_name.as_deref().map(|name| {
            let dir = path.parent().unwrap_or(Path::new(""));
            dir.join(name).display().to_string()
        });
        Ok(Qcow2Reader {
            full_backing,
            compressed: CompressedLayout::new(header.cluster_bits),
            ctx,
            file,
            file_len,
            data,
            header,
            l1,
            l2_cache: Mutex::new(L2Cache::default()),
            backing,
            backing_name,
            backing_probed,
            snapshots,
            zeros_past_eof: opener.zeros_past_eof(),
            backing_refused,
            metadata_prealloc: std::sync::OnceLock::new(),
        })
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`: at least
    /// max(n * 10/9, n + 2) clusters have a refcount, where n is the number
    /// of clusters the file's blocks would fill. Unreadable refcounts: no.
    fn metadata_preallocated(&self) -> bool {
        *self.metadata_prealloc.get_or_init(|| {
            use std::os::unix::fs::MetadataExt;
            let h = &self.header;
            let cs = h.cluster_size();
            let Ok(meta) = self.file.metadata() else {
                return false;
            };
            let real_clusters = meta.blocks() * 512 / cs;
            let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
            let end_cluster = self.file_len.div_ceil(cs);
            let entries = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
            let Ok(reftable) = read_table(
                &self.file,
                &self.ctx,
                h.refcount_table_offset,
                entries,
                "refcount table",
                self.file_len,
            ) else {
                return false;
            };
            let bits = u64::from(h.refcount_bits());
            let per_block = cs * 8 / bits;
            let mut block = vec![0u8; cs as usize];
            let mut count = 0u64;
            let mut c = 0u64;
            while c < end_cluster && count < threshold {
                let entry = reftable.get((c / per_block) as usize).copied().unwrap_or(0);
                let off = entry & !0x1ff;
                let last = ((c / per_block + 1) * per_block).min(end_cluster);
                if off == 0 || off % cs != 0 || off >= self.file_len {
                    c = last;
                    continue;
                }
                if read_up_to_at(&self.file, &self.ctx.path, &mut block, off).is_err() {
                    return false;
                }
                while c < last && count < threshold {
                    count += u64::from(
                        super::writer::get_refcount(&block, (c % per_block) as usize, bits) != 0,
                    );
                    c += 1;
                }
            }
            count >= threshold
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path_ref(&self) -> &Path {
        &self.ctx.path
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    pub fn has_external_data(&self) -> bool {
        self.data.is_some()
    }

    /// Loads (or finds cached) the L2 table at `offset`.
    pub(crate) fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        if let Some(t) = self.lock_cache().tables.get(&offset) {
            return Ok(t.clone());
        }
        let cs = self.header.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(self.ctx.corrupt(
                "L1 entry",
                offset,
                format!("L2 table offset {offset:#x} is not cluster aligned"),
            ));
        }
        let words = (cs / 8) as usize;
        let table: Arc<[u64]> = read_table(
            &self.file,
            &self.ctx,
            offset,
            words,
            "L2 table",
            self.file_len,
        )?
        .into();
        let mut cache = self.lock_cache();
        if (cache.tables.len() + 1) * cs as usize > L2_CACHE_BYTES {
            if let Some(old) = cache.order.pop_front() {
                cache.tables.remove(&old);
            }
        }
        cache.tables.insert(offset, table.clone());
        cache.order.push_back(offset);
        Ok(table)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, L2Cache> {
        // A panic elsewhere cannot leave the cache inconsistent: recover it.
        self.l2_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// log2 of the allocation unit: the cluster, or the subcluster with
    /// extended L2 entries.
    fn unit_bits(&self) -> u32 {
        if self.header.extended_l2() {
            self.header.cluster_bits - 5
        } else {
            self.header.cluster_bits
        }
    }

    /// Decodes one L2 entry (and its bitmap) for subcluster `sub`.
    pub(crate) fn classify(
        &self,
        entry: u64,
        bitmap: u64,
        sub: u32,
        guest: u64,
    ) -> Result<Cluster> {
        if entry & OFLAG_COMPRESSED != 0 {
            if self.data.is_some() {
                return Err(self.ctx.corrupt(
                    "L2 entry",
                    guest,
                    format!("compressed cluster at guest offset {guest:#x} in an image with an external data file"),
                ));
            }
            return Ok(Cluster::Compressed(entry));
        }
        let host = entry & OFFSET_MASK;
        // With an external data file, host offset 0 is real data when the
        // entry is marked allocated (QEMU maps guest cluster 0 there).
        let allocated_at_zero = self.data.is_some() && entry & OFLAG_COPIED != 0;
        let cs = self.header.cluster_size();
        if !host.is_multiple_of(cs) {
            return Err(self.ctx.corrupt(
                "L2 entry",
                host,
                format!("data cluster for guest offset {guest:#x} is at unaligned host offset {host:#x}"),
            ));
        }
        if self.header.extended_l2() {
            let alloc = bitmap & (1 << sub) != 0;
            let zero = bitmap & (1 << (sub + 32)) != 0;
            let sub_host = host + (u64::from(sub) << self.unit_bits());
            return Ok(match (alloc, zero) {
                (true, true) => {
                    return Err(self.ctx.corrupt(
                        "L2 bitmap",
                        host,
                        format!("subcluster {sub} of guest offset {guest:#x} is both allocated and zero"),
                    ))
                }
                (_, true) => Cluster::Zero((host != 0).then_some(sub_host)),
                (true, false) if host == 0 && !allocated_at_zero => {
                    return Err(self.ctx.corrupt(
                        "L2 entry",
                        guest,
                        format!("subcluster {sub} of guest offset {guest:#x} is allocated in a cluster without a host offset"),
                    ))
                }
                (true, false) => Cluster::Data(sub_host),
                (false, false) => Cluster::Unallocated((host != 0).then_some(sub_host)),
            });
        }
        if entry & OFLAG_ZERO != 0 && self.header.version == 2 {
            return Err(self.ctx.corrupt(
                "L2 entry",
                guest,
                format!("zero flag at guest offset {guest:#x} in a version 2 image (it has no zero clusters)"),
            ));
        }
        Ok(if entry & OFLAG_ZERO != 0 {
            Cluster::Zero((host != 0 || allocated_at_zero).then_some(host))
        } else if host == 0 && !allocated_at_zero {
            Cluster::Unallocated(None)
        } else {
            Cluster::Data(host)
        })
    }

    /// This layer's answer for the range at `offset`: a state and how many
    /// bytes it holds for (contiguous host offsets for data).
    fn local_map(&self, offset: u64, len: u64) -> Result<(Cluster, u64)> {
        let h = &self.header;
        let unit_bits = self.unit_bits();
        let unit = 1u64 << unit_bits;
        let coverage = h.l2_coverage();
        let l1_index = (offset / coverage) as usize;
        let table_end = (l1_index as u64 + 1) * coverage;
        let limit = len.min(table_end - offset);
        let first_len = (unit - (offset & (unit - 1))).min(limit);
        let l1_entry = self.l1.get(l1_index).copied().unwrap_or(0);
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Cluster::Unallocated(None), limit));
        }
        let table = self.l2_table(l2_offset)?;
        let words_per_entry = if h.extended_l2() { 2 } else { 1 };
        let entry_at = |guest: u64| -> Result<Cluster> {
            let idx = ((guest % coverage) >> h.cluster_bits) as usize * words_per_entry;
            let bitmap = if h.extended_l2() { table[idx + 1] } else { 0 };
            let sub = ((guest >> unit_bits) & 31) as u32;
            self.classify(table[idx], bitmap, sub, guest)
        };
        let first = entry_at(offset)?;
        let in_unit = offset & (unit - 1);
        let state = match first {
            Cluster::Data(host) => Cluster::Data(host + in_unit),
            Cluster::Zero(host) => Cluster::Zero(host.map(|h| h + in_unit)),
            Cluster::Unallocated(host) => Cluster::Unallocated(host.map(|h| h + in_unit)),
            other => other,
        };
        if matches!(first, Cluster::Compressed(_)) {
            // Each compressed cluster is stored apart; report one at a time.
            let in_cluster = offset & (h.cluster_size() - 1);
            return Ok((state, (h.cluster_size() - in_cluster).min(limit)));
        }
        let mut covered = first_len;
        while covered < limit {
            let next = entry_at(offset + covered)?;
            // Same kind, and host offsets (where there are any) contiguous.
            let host_follows = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => b == a + in_unit + covered,
                (None, None) => true,
                _ => false,
            };
            let same = match (first, next) {
                (Cluster::Data(a), Cluster::Data(b)) => host_follows(Some(a), Some(b)),
                (Cluster::Zero(a), Cluster::Zero(b)) => host_follows(a, b),
                (Cluster::Unallocated(a), Cluster::Unallocated(b)) => host_follows(a, b),
                _ => false,
            };
            if !same {
                break;
            }
            covered = (covered + unit).min(limit);
        }
        Ok((state, covered))
    }

    fn data_target(&self) -> (&File, &Path, u64) {
        match &self.data {
            Some((f, p, len)) => (f, p.as_path(), *len),
            None => (&self.file, self.ctx.path.as_path(), self.file_len),
        }
    }

    /// An error when the backing file was not opened (the gate refused it):
    /// what it holds cannot be read.
    fn refused_backing(&self) -> Result<()> {
        match &self.backing_refused {
            Some(why) => Err(Error::new(ErrorKind::Refused, why.clone())),
            None => Ok(()),
        }
    }

    /// Where the L2 entry for `guest` lies in the file, and its table.
    fn l2_entry_location(&self, guest: u64) -> Option<(u64, u64)> {
        let h = &self.header;
        let coverage = h.l2_coverage();
        let l2 = self.l1.get((guest / coverage) as usize)? & OFFSET_MASK;
        let words = if h.extended_l2() { 2 } else { 1 };
        let idx = (guest % coverage) >> h.cluster_bits;
        (l2 != 0).then_some((l2 + idx * 8 * words, l2))
    }

    fn read_data(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let (file, path, len) = self.data_target();
        let end = host.saturating_add(buf.len() as u64);
        if end > len {
            // The run is contiguous on the host: the first byte past the
            // end of the file belongs to this guest offset.
            let cut = host.max(len);
            let lost = guest + (cut - host);
            if self.zeros_past_eof {
                let keep = (cut - host) as usize;
                read_exact_at(file, path, &mut buf[..keep], host, "data cluster")?;
                buf[keep..].fill(0);
                return Ok(());
            }
            let cs = self.header.cluster_size();
            let cluster_guest = lost & !(cs - 1);
            let mut e = Error::new(
                ErrorKind::Corrupt,
                format!(
                    "the cluster for guest offset {cluster_guest:#x} is at host offset {:#x}, past the end of the {} ({len} bytes): guest bytes {lost:#x}..{:#x} of this read are not in the file (truncated?)",
                    cut & !(cs - 1),
                    if self.data.is_some() { "external data file" } else { "file" },
                    guest + buf.len() as u64,
                ),
            )
            .at_path(&self.ctx.path);
            e = match self.l2_entry_location(cluster_guest) {
                Some((at, table)) => e
                    .field(format!("L2 entry (table at {table:#x})"))
                    .offset(at),
                None => e.field("L2 entry"),
            };
            return Err(e);
        }
        read_exact_at(file, path, buf, host, "data cluster")
    }

    /// Decompresses the cluster an entry points to into `out` (one cluster).
    pub(crate) fn read_compressed(&self, entry: u64, out: &mut [u8], guest: u64) -> Result<()> {
        let (host, max_len) = self.compressed.decode(entry);
        if host >= self.file_len {
            return Err(self.ctx.corrupt(
                "L2 entry",
                host,
                format!(
                    "compressed data for guest offset {guest:#x} starts past the end of the file"
                ),
            ));
        }
        // The sector count includes the partial first sector.
        let len = max_len - (host & 511);
        let mut input = vec![0u8; len as usize];
        let n = read_up_to_at(&self.file, &self.ctx.path, &mut input, host)?;
        input.truncate(n);
        let codec = match self.header.compression {
            Compression::Zlib => Codec::RawDeflate,
            Compression::Zstd => Codec::Zstd,
        };
        compress::decompress(codec, &input, out).map_err(|why| {
            self.ctx.corrupt(
                "compressed cluster",
                host,
                format!("guest offset {guest:#x}: {why}"),
            )
        })
    }
}

/// Reads a table of big-endian u64 entries.
pub(crate) fn read_table(
    file: &File,
    ctx: &Ctx,
    offset: u64,
    entries: usize,
    what: &str,
    file_len: u64,
) -> Result<Vec<u64>> {
    let bytes = entries as u64 * 8;
    if offset.checked_add(bytes).is_none_or(|e| e > file_len) {
        return Err(ctx.corrupt(
            what,
            offset,
            format!("{what} of {bytes} bytes at {offset:#x} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    read_exact_at(file, &ctx.path, &mut raw, offset, what)?;
    Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
}

impl ImageReader for Qcow2Reader {
    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    fn path(&self) -> &Path {
        &self.ctx.path
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = len.min(self.size().saturating_sub(offset));
        let (state, n) = self.local_map(offset, len)?;
        let ext = |state, host_offset| Extent {
            start: offset,
            len: n,
            state,
            depth: 0,
            host_offset,
        };
        Ok(match state {
            // With metadata preallocation QEMU asks the file which data
            // clusters are holes: data and zero both, split where the
            // file's data and holes change.
            Cluster::Data(host) if self.metadata_preallocated() => {
                let (file, _, _) = self.data_target();
                let mut e = ext(BlockState::Data, Some(host));
                match crate::fileio::seek_data_hole(file, host, true) {
                    Some(data) if data > host => {
                        e.state = BlockState::DataHole;
                        if data != u64::MAX {
                            e.len = e.len.min(data - host);
                        }
                    }
                    Some(_) => {
                        if let Some(hole) = crate::fileio::seek_data_hole(file, host, false) {
                            e.len = e.len.min(hole.saturating_sub(host).max(1));
                        }
                    }
                    None => {}
                }
                e
            }
            Cluster::Data(host) => ext(BlockState::Data, Some(host)),
            Cluster::Zero(host) => ext(BlockState::Zero, host),
            Cluster::Compressed(_) => ext(BlockState::Compressed, None),
            Cluster::Unallocated(host) => {
                self.refused_backing()?;
                crate::block::map_below(
                    self.backing.as_deref(),
                    ext(BlockState::Unallocated, host),
                )?
            }
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = crate::block::read_range(&self.ctx.path, self.size(), offset, buf.len())?;
        let cs = self.header.cluster_size();
        let mut pos = offset;
        let mut scratch = Vec::new();
        while pos < end {
            let (state, n) = self.local_map(pos, end - pos)?;
            let piece = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            match state {
                Cluster::Data(host) => self.read_data(piece, host, pos)?,
                Cluster::Zero(_) => piece.fill(0),
                Cluster::Unallocated(_) => {
                    self.refused_backing()?;
                    crate::block::read_below(self.backing.as_deref(), piece, pos)?
                }
                Cluster::Compressed(entry) => {
                    let in_cluster = (pos & (cs - 1)) as usize;
                    if in_cluster == 0 && piece.len() == cs as usize {
                        self.read_compressed(entry, piece, pos)?;
                    } else {
                        scratch.resize(cs as usize, 0);
                        self.read_compressed(entry, &mut scratch, pos)?;
                        piece.copy_from_slice(&scratch[in_cluster..in_cluster + piece.len()]);
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let h = &self.header;
        let mut fs: Vec<(&'static str, serde_json::Value)> = vec![
            (
                "compat",
                (if h.version == 2 { "0.10" } else { "1.1" }).into(),
            ),
            ("compression-type", h.compression.name().into()),
        ];
        if h.version == 3 {
            fs.push((
                "lazy-refcounts",
                (h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0).into(),
            ));
        }
        fs.push(("refcount-bits", h.refcount_bits().into()));
        if h.version == 3 {
            if let Some(name) = &h.data_file {
                fs.push(("data-file", name.clone().into()));
                fs.push((
                    "data-file-raw",
                    (h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0).into(),
                ));
            }
            fs.push((
                "corrupt",
                (h.incompatible & header::INCOMPAT_CORRUPT != 0).into(),
            ));
            fs.push(("extended-l2", h.extended_l2().into()));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        let reftable_bytes = u64::from(h.refcount_table_clusters) * h.cluster_size();
        // L2 tables held in memory: as many as the L1 table names, within
        // the cache.
        let l2_bytes = (u64::from(h.l1_size) * h.cluster_size())
            .min(vmshift_model::limits::QCOW2_L2_CACHE_BYTES as u64);
        let bitmaps = h.bitmaps.map(|(n, size, _)| (n, size));
        let mut limits = vec![
            ("qcow2-l1-table-bytes", l1_bytes),
            ("qcow2-refcount-table-bytes", reftable_bytes),
            ("qcow2-l2-cache-bytes", l2_bytes),
            ("qcow2-snapshots", u64::from(h.nb_snapshots)),
            ("qcow2-backing-name-bytes", u64::from(h.backing_file_size)),
        ];
        if let Some((n, size)) = bitmaps {
            limits.push(("qcow2-bitmaps", u64::from(n)));
            limits.push(("qcow2-bitmap-directory-bytes", size));
        }
        limits.push((
            "image-metadata-bytes",
            l1_bytes + reftable_bytes + l2_bytes + bitmaps.map_or(0, |b| b.1),
        ));
        ImageInfo {
            limits,
            cluster_size: Some(h.cluster_size()),
            backing_filename: self.backing_name.clone(),
            full_backing_filename: self.full_backing.clone(),
            backing_format: h.backing_format.clone(),
            backing_format_probed: self.backing_probed.clone(),
            dirty: h.incompatible & header::INCOMPAT_DIRTY != 0,
            snapshots: self.snapshots.iter().map(Snapshot::info).collect(),
            extra_files: Vec::new(),
            format_specific: fs,
            backing_refused: self.backing_refused.clone(),
        }
    }

    fn backing(&self) -> Option<&dyn ImageReader> {
        self.backing.as_deref()
    }

    fn status_end(&self, offset: u64) -> u64 {
        // An unallocated cluster defers to the backing file's answer.
        match (self.local_map(offset, 1), &self.backing) {
            (Ok((Cluster::Unallocated(_), _)), Some(b)) if offset < b.size() => {
                b.status_end(offset)
            }
            _ => u64::MAX,
        }
    }

    fn check(&self) -> Option<Result<crate::check::CheckReport>> {
        Some(super::check::check(self))
    }

    fn repair(&self, out: &File, fix: crate::check::Fix) -> Option<Result<crate::check::Repaired>> {
        Some(super::check::repair(self, out, fix))
    }
}
