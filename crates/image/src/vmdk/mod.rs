//! VMDK: VMware's virtual disk format. A descriptor (embedded in a sparse
//! file, or a text file of its own) lists extents — sparse "KDMV" files,
//! flat files, zero ranges — concatenated into one disk, optionally over a
//! parent disk (snapshot deltas).

pub mod descriptor;
pub mod sesparse;
pub mod set;
pub mod sparse;
pub mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};

use vmshift_model::DiskFormat;

use self::descriptor::{Access, Descriptor, ExtentType};
use self::sesparse::SeSparseExtent;
use self::sparse::{Grain, SparseExtent};
use crate::block::{BlockState, Extent, ImageInfo, ImageReader};
use crate::error::{Ctx, Error, ErrorKind, Result};
use crate::fileio::{file_len, read_exact_at, read_up_to_at, seek_data_hole};
use crate::qcow2::ChainOpener;

/// What backs one extent.
#[derive(Debug)]
enum Backing {
    Flat {
        file: File,
        path: PathBuf,
        offset: u64,
    },
    Zero,
    /// Hosted sparse (KDMV) or vmfsSparse (COWD).
    Sparse(SparseExtent),
    SeSparse(SeSparseExtent),
}

/// The opener of a disk that may name no other file (one inside an
/// archive).
struct NoOtherFiles;

impl ChainOpener for NoOtherFiles {
    fn open_backing(
        &self,
        image: &Path,
        name: &str,
        _format: Option<&str>,
    ) -> Result<(Box<dyn ImageReader>, Option<String>)> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("names a parent disk '{name}'; a disk inside an archive must stand alone"),
        )
        .at_path(image))
    }

    fn open_named(&self, image: &Path, name: &str, what: &str) -> Result<(PathBuf, File)> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("names its {what} '{name}' in another file; a disk inside an archive must stand alone"),
        )
        .at_path(image))
    }
}

/// The content id of a VMDK parent (`None` for other formats, which have
/// none).
fn parent_cid(parent: &dyn ImageReader) -> Option<u32> {
    parent
        .info()
        .format_specific
        .iter()
        .find(|(k, _)| *k == "cid")
        .and_then(|(_, v)| v.as_u64())
        .and_then(|c| u32::try_from(c).ok())
}

/// An extent whose data is addressed grain by grain.
trait GrainMap {
    fn grain_bytes(&self) -> u64;
    fn grain(&self, offset: u64) -> Result<Grain>;
}

impl GrainMap for SparseExtent {
    fn grain_bytes(&self) -> u64 {
        SparseExtent::grain_bytes(self)
    }
    fn grain(&self, offset: u64) -> Result<Grain> {
        SparseExtent::grain(self, offset)
    }
}

impl GrainMap for SeSparseExtent {
    fn grain_bytes(&self) -> u64 {
        SeSparseExtent::grain_bytes(self)
    }
    fn grain(&self, offset: u64) -> Result<Grain> {
        SeSparseExtent::grain(self, offset)
    }
}

impl Backing {
    /// Grain size and whether grains are compressed, for `info`.
    fn grain_info(&self) -> Option<(u64, bool)> {
        match self {
            Backing::Sparse(s) => Some((s.grain_bytes(), s.compressed())),
            Backing::SeSparse(s) => Some((s.grain_bytes(), false)),
            Backing::Flat { .. } | Backing::Zero => None,
        }
    }
}

#[derive(Debug)]
struct VmdkExtent {
    /// First guest byte.
    start: u64,
    len: u64,
    backing: Backing,
    /// The descriptor's type word (`""` for a monolithic sparse file).
    type_word: String,
    /// The file as named in `info` (descriptor folder + name).
    display: Option<String>,
}

/// A VMDK image opened for reading.
#[derive(Debug)]
pub struct VmdkReader {
    ctx: Ctx,
    size: u64,
    extents: Vec<VmdkExtent>,
    create_type: String,
    cid: u32,
    parent_cid: u32,
    parent: Option<Box<dyn ImageReader>>,
    parent_name: Option<String>,
    /// The parent's CID when it is not the parentCID this delta recorded:
    /// the parent changed after the delta was taken, so reads that fall
    /// through to it would mix two states of the disk.
    stale_parent: Option<u32>,
    /// The name the parent was opened by: the hint, or its last component
    /// when the hint is a path on another host.
    parent_opened_as: Option<String>,
    descriptor: Option<Descriptor>,
}

impl VmdkReader {
    /// Opens a VMDK: a sparse file with its descriptor inside, or a
    /// descriptor file whose extents are opened through `opener`'s gate.
    pub fn open(file: File, path: &Path, opener: &dyn ChainOpener) -> Result<Self> {
        let ctx = Ctx::new(path);
        let mut magic = [0u8; 4];
        read_up_to_at(&file, path, &mut magic, 0)?;
        match &magic {
            b"KDMV" => Self::open_sparse(file, ctx, opener),
            b"COWD" => Err(ctx.unsupported(
                "magic",
                "a vmfsSparse (COWD) extent on its own: open its descriptor file instead",
            )),
            _ => {
                let len = file_len(&file, path)?;
                let cap = (descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1).min(len);
                let mut text = vec![0u8; cap as usize];
                read_exact_at(&file, path, &mut text, 0, "descriptor")?;
                if len > descriptor::MAX_DESCRIPTOR_BYTES as u64 {
                    return Err(ctx.invalid(
                        "descriptor",
                        0,
                        format!("{len} bytes is larger than the 1 MiB a descriptor may have"),
                    ));
                }
                let d = Descriptor::parse(&text, &ctx, 0)?;
                Self::from_descriptor(d, ctx, opener)
            }
        }
    }

    fn open_sparse(file: File, ctx: Ctx, opener: &dyn ChainOpener) -> Result<Self> {
        let extent = SparseExtent::open(file, &ctx.path)?;
        Self::from_sparse(extent, ctx, opener)
    }

    /// Opens a single-file sparse VMDK (monolithicSparse, streamOptimized)
    /// stored in `len` bytes of `file` from `base`: a disk inside an OVA,
    /// read in place. `path` names it in messages (`vm.ova/disk1.vmdk`).
    /// It may name no other file: no extents, no parent.
    pub fn open_in_file(file: File, path: &Path, base: u64, len: u64) -> Result<Self> {
        let ctx = Ctx::new(path);
        let extent = SparseExtent::open_window(crate::fileio::Window::part(file, base, len), path)?;
        Self::from_sparse(extent, ctx, &NoOtherFiles)
    }

    fn from_sparse(extent: SparseExtent, ctx: Ctx, opener: &dyn ChainOpener) -> Result<Self> {
        let desc = match extent.embedded_descriptor()? {
            Some((bytes, at)) if bytes.iter().any(|&b| b != 0) => {
                Some(Descriptor::parse(&bytes, &ctx, at)?)
            }
            _ => None,
        };
        if extent.header.capacity == 0 {
            // A descriptor container: the extents are elsewhere.
            let d = desc.ok_or_else(|| {
                ctx.invalid("capacity", 12, "zero capacity and no embedded descriptor")
            })?;
            return Self::from_descriptor(d, ctx, opener);
        }
        let create_type = if extent.compressed() {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let len = extent.capacity_bytes();
        let mut r = VmdkReader {
            size: len,
            extents: vec![VmdkExtent {
                start: 0,
                len,
                backing: Backing::Sparse(extent),
                type_word: String::new(),
                display: Some(ctx.path.display().to_string()),
            }],
            create_type: create_type.to_string(),
            cid: 0xffff_ffff,
            parent_cid: 0xffff_ffff,
            parent: None,
            parent_name: None,
            stale_parent: None,
            parent_opened_as: None,
            descriptor: None,
            ctx,
        };
        if let Some(d) = desc {
            r.cid = d.cid("CID", &r.ctx)?;
            r.parent_cid = d.cid("parentCID", &r.ctx)?;
            r.open_parent(&d, opener)?;
            r.descriptor = Some(d);
        }
        Ok(r)
    }

    fn from_descriptor(d: Descriptor, ctx: Ctx, opener: &dyn ChainOpener) -> Result<Self> {
        let create_type = d.create_type().to_string();
        if matches!(
            create_type.as_str(),
            "vmfsRawDeviceMap" | "vmfsPassthroughRawDeviceMap" | "fullDevice" | "partitionedDevice"
        ) {
            return Err(Error::new(
                ErrorKind::DeviceMapping,
                format!("'{create_type}' maps a physical device; there is no disk image to read"),
            )
            .at_path(&ctx.path)
            .field("createType"));
        }
        let dir_display = |name: &str| {
            ctx.path
                .parent()
                .unwrap_or(Path::new(""))
                .join(name)
                .display()
                .to_string()
        };
        let mut extents = Vec::new();
        let mut start = 0u64;
        for line in &d.extents {
            let field = format!("descriptor line {}", line.line);
            let len = line.sectors.checked_mul(512).ok_or_else(|| {
                ctx.invalid(
                    &field,
                    0,
                    format!("extent of {} sectors overflows", line.sectors),
                )
            })?;
            if line.access == Access::NoAccess {
                return Err(ctx.unsupported(&field, "a NOACCESS extent has no readable data"));
            }
            let name = line.file.as_deref().unwrap_or("");
            let open = |what: &str| {
                opener
                    .open_named(&ctx.path, name, what)
                    .map_err(|e| e.field_if_unset(field.clone()))
            };
            let backing = match line.kind {
                ExtentType::Zero => Backing::Zero,
                ExtentType::Flat => {
                    let (path, file) = open("extent")?;
                    let have = file_len(&file, &path)?;
                    let offset = line
                        .offset
                        .checked_mul(512)
                        .ok_or_else(|| ctx.invalid(&field, 0, "extent offset overflows"))?;
                    if offset.checked_add(len).is_none_or(|end| end > have) {
                        return Err(ctx.corrupt(
                            &field,
                            0,
                            format!(
                                "extent '{name}' holds {have} bytes, fewer than the {} the descriptor gives it (from offset {offset})",
                                len
                            ),
                        ));
                    }
                    Backing::Flat { file, path, offset }
                }
                ExtentType::Sparse | ExtentType::VmfsSparse | ExtentType::SeSparse => {
                    let (path, file) = open("extent")?;
                    let (backing, sectors) = match line.kind {
                        ExtentType::SeSparse => {
                            let e = SeSparseExtent::open(file, &path)?;
                            let sectors = e.capacity;
                            (Backing::SeSparse(e), sectors)
                        }
                        ExtentType::VmfsSparse => {
                            let e = SparseExtent::open_cowd(file, &path)?;
                            let sectors = e.header.capacity;
                            (Backing::Sparse(e), sectors)
                        }
                        _ => {
                            let e = SparseExtent::open(file, &path)?;
                            let sectors = e.header.capacity;
                            (Backing::Sparse(e), sectors)
                        }
                    };
                    if sectors != line.sectors {
                        return Err(ctx.corrupt(
                            &field,
                            0,
                            format!(
                                "extent '{name}' has a capacity of {sectors} sectors, the descriptor says {}",
                                line.sectors
                            ),
                        ));
                    }
                    backing
                }
                ExtentType::Device => {
                    return Err(Error::new(
                        ErrorKind::DeviceMapping,
                        format!("a {} extent maps a device, not image data", line.type_word),
                    )
                    .at_path(&ctx.path)
                    .field(field))
                }
            };
            extents.push(VmdkExtent {
                start,
                len,
                backing,
                type_word: line.type_word.clone(),
                display: line.file.as_deref().map(dir_display),
            });
            start = start
                .checked_add(len)
                .ok_or_else(|| ctx.invalid(&field, 0, "disk size overflows"))?;
        }
        let mut r = VmdkReader {
            size: start,
            extents,
            cid: d.cid("CID", &ctx)?,
            parent_cid: d.cid("parentCID", &ctx)?,
            create_type,
            parent: None,
            parent_name: None,
            stale_parent: None,
            parent_opened_as: None,
            descriptor: None,
            ctx,
        };
        r.open_parent(&d, opener)?;
        r.descriptor = Some(d);
        Ok(r)
    }

    fn open_parent(&mut self, d: &Descriptor, opener: &dyn ChainOpener) -> Result<()> {
        if let Some(hint) = d.parent_hint() {
            // VMware records the parent as it was named when the snapshot
            // was taken: often an absolute path on the original host
            // (`/vmfs/volumes/datastore1/vm/disk.vmdk`, `C:\VMs\disk.vmdk`).
            // When that path cannot be opened, the file of that name beside
            // the delta is its parent if the CIDs agree (checked below, on
            // every read through it).
            let opened = opener.open_backing(&self.ctx.path, hint, Some("vmdk"));
            let base = hint.rsplit(['/', '\\']).next().unwrap_or(hint);
            let (parent, used) = match opened {
                Err(e) if base != hint && !base.is_empty() => opener
                    .open_backing(&self.ctx.path, base, Some("vmdk"))
                    .map(|(p, _)| (p, base))
                    .map_err(|_| e),
                other => other.map(|(p, _)| (p, hint)),
            }
            .map_err(|e| e.field_if_unset("parentFileNameHint"))?;
            self.parent_opened_as = Some(used.to_string());
            let cid = parent_cid(parent.as_ref());
            self.stale_parent = cid.filter(|&c| c != self.parent_cid);
            self.parent = Some(parent);
            self.parent_name = Some(hint.to_string());
        } else if self.parent_cid != 0xffff_ffff {
            // A delta whose parent the descriptor does not name (a damaged
            // or cut descriptor): read alone, it would lack every sector
            // the parent holds.
            let line = d
                .lines
                .iter()
                .position(|l| {
                    l.trim_start()
                        .get(..9)
                        .is_some_and(|k| k.eq_ignore_ascii_case("parentCID"))
                })
                .map_or(String::from("parentCID"), |i| {
                    format!("descriptor line {}", i + 1)
                });
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::Corrupt,
                format!(
                    "parentCID is {:08x}, so this is a delta disk of a parent, but the descriptor names none (no parentFileNameHint): read alone it would lack the parent's data",
                    self.parent_cid
                ),
            )
            .at_path(&self.ctx.path)
            .field(line));
        }
        Ok(())
    }

    /// What the disk database says about the virtual hardware (vmshift's
    /// additions to qemu-img's fields): adapter type, geometry, hardware
    /// version.
    fn ddb_facts(&self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        let Some(d) = &self.descriptor else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(a) = d.ddb("ddb.adapterType") {
            out.push(("adapter-type", json!(a)));
        }
        let num = |k: &str| d.ddb(k).and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(c), Some(h), Some(s)) = (
            num("ddb.geometry.cylinders"),
            num("ddb.geometry.heads"),
            num("ddb.geometry.sectors"),
        ) {
            out.push((
                "geometry",
                json!({"cylinders": c, "heads": h, "sectors": s}),
            ));
        }
        if let Some(v) = d.ddb("ddb.virtualHWVersion") {
            out.push(("hw-version", json!(v)));
        }
        if let Some(u) = d.ddb("ddb.uuid").and_then(vmshift_model::uuid_from_hex) {
            out.push(("uuid", json!(u)));
        }
        out
    }

    /// The extent holding guest byte `offset`.
    fn extent_at(&self, offset: u64) -> Result<&VmdkExtent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents.get(i).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("offset {offset:#x} is past the end of the disk"),
            )
            .at_path(&self.ctx.path)
        })
    }

    /// This layer's answer for `offset`: a state (with host offset) and
    /// how many bytes it holds for.
    fn local(&self, offset: u64, len: u64) -> Result<(Grain, u64, &VmdkExtent)> {
        let e = self.extent_at(offset)?;
        let rel = offset - e.start;
        let avail = (e.len - rel).min(len);
        let s: &dyn GrainMap = match &e.backing {
            Backing::Zero => return Ok((Grain::Zero, avail, e)),
            Backing::Flat {
                file, offset: base, ..
            } => {
                // Holes in a flat file (thin ESXi disks) read as zeros and
                // need not be copied.
                let host = base + rel;
                return Ok(match seek_data_hole(file, host, true) {
                    Some(data) if data > host => (Grain::Zero, (data - host).min(avail), e),
                    Some(_) => {
                        let hole = seek_data_hole(file, host, false).unwrap_or(u64::MAX);
                        (Grain::Data(host), (hole - host).clamp(1, avail), e)
                    }
                    None => (Grain::Data(host), avail, e),
                });
            }
            Backing::Sparse(s) => s,
            Backing::SeSparse(s) => s,
        };
        let grain = s.grain_bytes();
        let first = (grain - rel % grain).min(avail);
        let state = s.grain(rel)?;
        let mut n = first;
        // Extend over following grains of the same kind (contiguous
        // host offsets for data; compressed grains one at a time).
        while n < avail && !matches!(state, Grain::Compressed(_)) {
            let next = s.grain(rel + n)?;
            let same = match (state, next) {
                (Grain::Data(a), Grain::Data(b)) => b == a + rel % grain + n,
                (Grain::Zero, Grain::Zero) | (Grain::Unallocated, Grain::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n = (n + grain).min(avail);
        }
        let state = match state {
            Grain::Data(h) => Grain::Data(h + rel % grain),
            other => other,
        };
        Ok((state, n, e))
    }
}

impl ImageReader for VmdkReader {
    fn format(&self) -> DiskFormat {
        DiskFormat::Vmdk
    }

    fn path(&self) -> &Path {
        &self.ctx.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = len.min(self.size.saturating_sub(offset));
        let (state, n, e) = self.local(offset, len)?;
        let ext = |state, host_offset| Extent {
            start: offset,
            len: n,
            state,
            depth: 0,
            host_offset,
        };
        Ok(match state {
            Grain::Data(h) => ext(BlockState::Data, Some(h)),
            Grain::Compressed(_) => ext(BlockState::Compressed, None),
            Grain::Zero => match &e.backing {
                Backing::Flat { offset: base, .. } => {
                    ext(BlockState::DataHole, Some(base + offset - e.start))
                }
                _ => ext(BlockState::Zero, None),
            },
            Grain::Unallocated => {
                crate::block::map_below(self.parent.as_deref(), ext(BlockState::Unallocated, None))?
            }
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = crate::block::read_range(&self.ctx.path, self.size, offset, buf.len())?;
        let mut pos = offset;
        let mut scratch = Vec::new();
        while pos < end {
            let (state, n, e) = self.local(pos, end - pos)?;
            let piece = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            match (state, &e.backing) {
                (Grain::Zero, _) => piece.fill(0),
                (Grain::Unallocated, _) => {
                    if let (Some(cid), Some(_)) = (self.stale_parent, &self.parent) {
                        return Err(self.ctx.corrupt(
                            "parentCID",
                            0,
                            format!(
                                "this delta was taken when its parent's CID was {:08x}, but the parent's CID is now {cid:08x}: the parent changed after the delta was made, and reading through it would mix two states of the disk (offset {pos:#x})",
                                self.parent_cid
                            ),
                        ));
                    }
                    crate::block::read_below(self.parent.as_deref(), piece, pos)?
                }
                (Grain::Data(h), Backing::Flat { file, path, .. }) => {
                    read_exact_at(file, path, piece, h, "flat extent")?
                }
                (Grain::Data(h), Backing::Sparse(s)) => s.read_data(piece, h)?,
                (Grain::Data(h), Backing::SeSparse(s)) => s.read_data(piece, h)?,
                (Grain::Compressed(h), Backing::Sparse(s)) => {
                    let grain = s.grain_bytes();
                    let rel = pos - e.start;
                    let grain_start = rel - rel % grain;
                    scratch.resize(grain as usize, 0);
                    s.read_compressed(h, grain_start, &mut scratch)?;
                    let from = (rel % grain) as usize;
                    piece.copy_from_slice(&scratch[from..from + piece.len()]);
                }
                _ => unreachable!("flat and zero extents have no compressed or sparse states"),
            }
            pos += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        use serde_json::{json, Value};
        let grain_of = |e: &VmdkExtent| e.backing.grain_info();
        let first = self.extents.first().and_then(grain_of);
        let cluster_size = first
            .filter(|_| self.extents.iter().all(|e| grain_of(e) == first))
            .map(|(g, _)| g);
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut m = serde_json::Map::new();
                if let Some((_, true)) = grain_of(e) {
                    m.insert("compressed".into(), json!(true));
                }
                m.insert("virtual-size".into(), json!(e.len));
                if let Some(f) = &e.display {
                    m.insert("filename".into(), json!(f));
                }
                if let Some((g, _)) = grain_of(e) {
                    m.insert("cluster-size".into(), json!(g));
                }
                m.insert("format".into(), json!(e.type_word));
                Value::Object(m)
            })
            .collect();
        let full_backing = self.parent_opened_as.as_deref().map(|name| {
            self.ctx
                .path
                .parent()
                .unwrap_or(Path::new(""))
                .join(name)
                .display()
                .to_string()
        });
        ImageInfo {
            cluster_size,
            backing_filename: self.parent_name.clone(),
            full_backing_filename: full_backing,
            backing_format: self.parent_name.as_ref().map(|_| "vmdk".to_string()),
            backing_format_probed: None,
            dirty: false,
            snapshots: Vec::new(),
            extra_files: self
                .extents
                .iter()
                .filter_map(|e| match &e.backing {
                    Backing::Flat { path, .. } => Some(path.clone()),
                    Backing::Sparse(s) => Some(s.path_buf()),
                    Backing::SeSparse(s) => Some(s.path_buf()),
                    Backing::Zero => None,
                })
                .filter(|p| p.as_path() != self.ctx.path.as_path())
                .collect(),
            backing_refused: None,
            limits: {
                let mut l = Vec::new();
                if let Some(d) = &self.descriptor {
                    l.push(("vmdk-descriptor-bytes", d.len as u64));
                }
                if let Some(g) = self
                    .extents
                    .iter()
                    .filter_map(grain_of)
                    .map(|(g, _)| g)
                    .max()
                {
                    l.push(("vmdk-grain-sectors", g / 512));
                }
                l
            },
            format_specific: vec![
                ("cid", json!(self.cid)),
                ("parent-cid", json!(self.parent_cid)),
                ("create-type", json!(self.create_type)),
                ("extents", Value::Array(extents)),
            ]
            .into_iter()
            .chain(self.ddb_facts())
            .collect(),
        }
    }

    fn backing(&self) -> Option<&dyn ImageReader> {
        self.parent.as_deref()
    }

    fn data_file_at(&self, offset: u64) -> Option<String> {
        let e = self.extent_at(offset).ok()?;
        match e.backing {
            Backing::Flat { .. } | Backing::Sparse(_) | Backing::SeSparse(_) => e.display.clone(),
            Backing::Zero => None,
        }
    }

    fn status_end(&self, offset: u64) -> u64 {
        // QEMU's VMDK driver answers a sparse extent one grain at a time,
        // a flat one to its end; an unallocated grain defers to the parent.
        let Ok(e) = self.extent_at(offset) else {
            return u64::MAX;
        };
        let rel = offset - e.start;
        let grain = match &e.backing {
            Backing::Sparse(s) => s.grain_bytes(),
            Backing::SeSparse(s) => GrainMap::grain_bytes(s),
            Backing::Flat { .. } | Backing::Zero => return e.start + e.len,
        };
        let end = (e.start + (rel / grain + 1) * grain).min(e.start + e.len);
        match (self.local(offset, 1), &self.parent) {
            (Ok((Grain::Unallocated, _, _)), Some(p)) if offset < p.size() => {
                end.min(p.status_end(offset))
            }
            _ => end,
        }
    }

    fn check(&self) -> Option<Result<crate::check::CheckReport>> {
        let mut report = crate::check::CheckReport::default();
        // A delta records its parent's content id when it was taken; a
        // different id now means the parent changed under the delta.
        if let Some(cid) = self.stale_parent {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR {}: parentCID {:08x} does not match the parent's CID {cid:08x}: the parent changed after this delta was made",
                self.ctx.path.display(),
                self.parent_cid
            ));
        }
        for e in &self.extents {
            let checked = match &e.backing {
                Backing::Sparse(s) => s.check(&mut report),
                Backing::SeSparse(s) => s.check(&mut report),
                Backing::Flat { .. } | Backing::Zero => Ok(()),
            };
            if let Err(err) = checked {
                return Some(Err(err));
            }
        }
        Some(Ok(report))
    }
}
