//! Resizing VMDK images (sparse, stream, flat and split sets).

use super::*;

/// VMDK: a hosted sparse file grows in place (capacity, grain directory,
/// embedded descriptor); a stream is rewritten to a temp file and renamed;
/// a flat disk's extent file is resized like a raw disk (GPT included) and
/// its descriptor replaced atomically.
pub(super) fn resize_vmdk(
    file: File,
    path: &Path,
    new: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
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
    let mut write_descriptor = || -> Result<()> {
        let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
        std::io::Write::write_all(&mut f, new_text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(path, "writing the descriptor", e))?;
        out.commit()
    };
    // The extent file resizes like a raw disk (every check before the
    // first write); the descriptor is replaced when the disk takes its new
    // size: after the file grew and before a GPT moves out, after a GPT
    // moved in and before the file is cut.
    let old = ext.sectors * 512;
    let mut report = resize_with_switch(&flat, DiskFormat::Raw, new, opts, &mut write_descriptor)?;
    report.old_size = old;
    Ok(report)
}

pub(super) fn resize_vmdk_sparse(
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
    // Bytes a shrink left after the old end, in the grain it falls in,
    // must not reappear (past the end, so invisible until the switch).
    zero_grain_tail(&file, path, gd, gtes, grain, old)?;
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
pub(super) fn rewrite_stream(
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
pub(super) fn grow_vmdk_set(
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

/// An image seen at a larger size (zeros past its end) with some ranges
/// replaced: what a rewritten stream is copied from.
pub(super) struct Overlay<'a> {
    pub(super) inner: &'a dyn ImageReader,
    pub(super) size: u64,
    pub(super) patches: Vec<(u64, Vec<u8>)>,
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
pub(super) struct VmdkSink<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
    pub(super) reader: Box<dyn ImageReader>,
    pub(super) old_size: u64,
    pub(super) grain: u64,
    pub(super) gtes: u64,
    pub(super) gd: u64,
    pub(super) rgd: Option<u64>,
    pub(super) file_end: u64,
    /// Grain table entries to set once the grains are durable: (byte
    /// offset of the entry, sector).
    pub(super) links: Vec<(u64, u32)>,
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

/// Shrinks a hosted sparse VMDK in place: a GPT moves inside the new end
/// first; the grain table entries past it are cleared (in both
/// directories); then the header's capacity (one sector); then the
/// embedded descriptor.
pub(super) fn shrink_vmdk_sparse(
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
    // The grain the new end falls in keeps no bytes past it.
    zero_grain_tail(file, path, gd, gtes, grain, new)?;
    // 4. The embedded descriptor.
    if let Some(area) = descriptor {
        write_all_at(file, path, &area, desc_off * 512)?;
        sync(file, path)?;
    }
    Ok(report)
}

/// Shrinks a twoGbMaxExtent set: the descriptor that lists fewer (or a
/// shorter last flat) extent(s) replaces the old one first — a longer file
/// under a shorter description still reads —; then the last flat extent is
/// cut and the extents past the end are removed. A sparse extent cannot be
/// cut in the middle (its own header states its size), so a sparse set
/// shrinks to extent boundaries.
pub(super) fn shrink_vmdk_set(
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

/// Zeros the part of the grain that byte `end` falls in past `end`, when
/// the grain is stored (a sparse extent's grains are its own, uncompressed):
/// a shrink leaves the bytes there, and growing must not show them again.
pub(super) fn zero_grain_tail(
    file: &File,
    path: &Path,
    gd: u64,
    gtes: u64,
    grain: u64,
    end: u64,
) -> Result<()> {
    let gbytes = grain * 512;
    if end.is_multiple_of(gbytes) || gd == 0 || gd == u64::MAX {
        return Ok(());
    }
    let g = end / gbytes;
    let le32 = |at: u64, what: &str| -> Result<u32> {
        let mut b = [0u8; 4];
        read_exact_at(file, path, &mut b, at, what)?;
        Ok(LittleEndian::read_u32(&b))
    };
    let gt = le32(gd * 512 + (g / gtes) * 4, "grain directory")?;
    if gt == 0 {
        return Ok(());
    }
    let sector = le32(u64::from(gt) * 512 + (g % gtes) * 4, "grain table")?;
    if sector <= 1 {
        return Ok(()); // unallocated, or a zero grain
    }
    let from = u64::from(sector) * 512 + (end - g * gbytes);
    let zeros = vec![0u8; (gbytes - (end - g * gbytes)) as usize];
    write_all_at(file, path, &zeros, from)?;
    sync(file, path)
}
