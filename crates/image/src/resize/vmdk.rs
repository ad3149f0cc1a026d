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
    let new_text = d.encode(
        &d.resized_text(new / 512)
            .ok_or_else(|| invalid(path, "the descriptor's extent line could not be rewritten"))?,
    );
    let mut write_descriptor = || -> Result<()> {
        let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
        std::io::Write::write_all(&mut f, &new_text)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(path, "writing the descriptor", e))?;
        out.commit()
    };
    // The extent file resizes like a raw disk (every check before the
    // first write); the descriptor is replaced when the disk takes its new
    // size: after the file grew and before a GPT moves out, after a GPT
    // moved in and before the file is cut.
    let old = ext.sectors * 512;
    // Bytes of the extent file past the described disk (left by a killed
    // grow before its descriptor, or a killed shrink before its cut) are
    // not the disk's: cut first, so they never come back.
    cut_extent_to(&flat, old)?;
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
    // Same size: only an unfinished GPT move or a partition to grow is
    // left to do.
    if new == old
        && opts.grow_partition.is_none()
        && !(opts.fix_gpt
            && open_as(path, DiskFormat::Vmdk).is_ok_and(|r| gpt_unfinished(r.as_ref())))
    {
        return Ok(report);
    }
    needs_shrink(path, old, new, opts)?;
    if opts.prealloc != Prealloc::Off && new > old {
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
    let gpt_plan = gpt_plan_inside(reader.as_ref(), path, old, new, opts, "a sparse VMDK")?;
    let mut report = report;
    report.gpt_moved = gpt_plan.is_some();
    report.partition_grown = gpt_plan.as_ref().and_then(|p| p.grown);
    if new < old && !opts.force {
        // Nothing may be cut off: no partition, no stored data (the GPT's
        // own backup moves).
        shrink_checks(reader.as_ref(), path, new, old, gpt_plan.as_ref())?;
    }
    if flags & (1 << 16) != 0 {
        // streamOptimized: a stream is written once, front to back; the
        // GPT's new sectors go into the copy.
        drop(reader);
        let patches = gpt_plan.as_ref().map(gpt_patches).unwrap_or_default();
        // The stream's own disk database (uuid, hardware version, adapter)
        // carries over.
        let ddb = embedded_descriptor(&file, path, desc_off, desc_size)
            .ok()
            .flatten()
            .map(|(_, d)| d.ddb)
            .filter(|d| !d.is_empty());
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
    let descriptor = resized_embedded(&file, path, desc_off, desc_size, new / 512)?;
    // Bytes a shrink left after the old end, in the grain it falls in,
    // must not reappear (past the end, so invisible until the switch).
    zero_grain_tail(&file, path, gd, gtes, grain, old)?;
    // Entries for grains past the old end (a tool that shrank the disk may
    // have left them) must not show once the disk grows over them.
    let in_use: Vec<u64> = [gd, if flags & 2 != 0 { rgd } else { 0 }]
        .into_iter()
        .filter(|&d| d != 0 && d != u64::MAX)
        .collect();
    clear_grain_entries(
        &file,
        path,
        &in_use,
        gtes,
        (old / 512).div_ceil(grain),
        old_n,
    )?;
    let old_bytes = (old_n * 4).div_ceil(512) * 512;
    let mut hdr = *head;
    let rgd = if flags & 2 != 0 { rgd } else { 0 };
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
            reader: Some(reader),
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
        // Only an unfinished GPT move (an interrupted run) is left to do.
        let reader = open_as(path, DiskFormat::Vmdk)?;
        let unfinished = gpt_unfinished(reader.as_ref());
        if !(opts.fix_gpt && unfinished) && opts.grow_partition.is_none() {
            return Ok(report);
        }
        let Some(plan) = gpt_plan_inside(
            reader.as_ref(),
            path,
            old,
            new,
            opts,
            "a twoGbMaxExtent set",
        )?
        else {
            return Ok(report);
        };
        drop(reader);
        let extents = open_set_extents(path, d)?;
        apply_gpt(&mut SetSink::new(&extents, &mut || Ok(()))?, &plan)?;
        let mut report = report;
        report.gpt_moved = true;
        report.partition_grown = plan.grown;
        return Ok(report);
    }
    if new < old {
        return shrink_vmdk_set(path, d, old, new, opts);
    }
    if new > MAX_VMDK_BYTES {
        return Err(invalid(
            path,
            format!("{new} bytes is more than VMware's largest virtual disk (62 TiB)"),
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
    match opts.prealloc {
        Prealloc::Off => {}
        Prealloc::Falloc | Prealloc::Full if flat => {}
        Prealloc::Metadata if flat => {
            return Err(invalid(
                path,
                "--preallocation metadata applies to qcow2; flat extents have no metadata (use falloc or full)",
            ))
        }
        _ => {
            return Err(unsupported(
                path,
                "a twoGbMaxExtentSparse set grows without preallocation for now",
            ))
        }
    }
    let reader = open_as(path, DiskFormat::Vmdk)?;
    // A GPT inside follows the new end (planned and checked now).
    let gpt_plan = gpt_plan_inside(
        reader.as_ref(),
        path,
        old,
        new,
        opts,
        "a twoGbMaxExtent set",
    )?;
    drop(reader);
    // Extent names follow the descriptor's (quotes and control characters
    // would break the extent lines).
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem: String = name
        .strip_suffix(".vmdk")
        .unwrap_or(&name)
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect();
    // Everything planned first: a flat set's last extent fills up to 2 GiB
    // (so that only the set's last extent is short, as VMware lays sets
    // out), then new extents; the new descriptor is checked before any
    // file is written.
    let mut at = old;
    let mut fill = None;
    if let (true, Some(last)) = (flat, d.extents.last()) {
        let have = last.sectors * 512;
        if have < SPLIT {
            let more = (SPLIT - have).min(new - old);
            let file = crate::gate::Gate::new().resolve(
                path,
                last.file.as_deref().unwrap_or(""),
                "extent",
            )?;
            fill = Some((file, have, have + more));
            at += more;
        }
    }
    let mut planned = Vec::new();
    let mut lines = Vec::new();
    let mut n = d.extents.len() + 1;
    let kind = if sparse { "s" } else { "f" };
    while at < new {
        let len = (new - at).min(SPLIT);
        let (extent, k) = free_name(path, d, n, |k| format!("{stem}-{kind}{k:03}.vmdk"));
        n = k + 1;
        lines.push(match sparse {
            true => format!("RW {} SPARSE \"{extent}\"", len / 512),
            false => format!("RW {} FLAT \"{extent}\" 0", len / 512),
        });
        planned.push((extent, len));
        at += len;
    }
    let text = d.encode(
        &d.with_more_extents(&lines, new / 512, fill.as_ref().map(|(_, _, to)| to / 512))
            .ok_or_else(|| invalid(path, "the descriptor's extent lines could not be extended"))?,
    );
    let ctx = crate::error::Ctx::new(path);
    let grown = crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, 0)?;
    if grown.extents.len() != d.extents.len() + planned.len() {
        return Err(invalid(
            path,
            "the extended descriptor does not list the new extents",
        ));
    }
    if gpt_plan.is_some() {
        // The old extents must take the GPT's writes (and their locks).
        drop(open_set_extents(path, d)?);
    }
    // Then the files: the last flat extent grown (bytes past its described
    // size are not the disk's, a killed shrink's: cut, then grown as
    // zeros), the new extents written beside the descriptor.
    if let Some((file, have, to)) = &fill {
        cut_extent_to(file, *have)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .map_err(|e| Error::io(file, "opening the extent", e))?;
        crate::lock::lock_for_resize(&f, file)?;
        f.set_len(*to)
            .map_err(|e| Error::io(file, "growing the extent", e))?;
        preallocate(&f, file, *have, *to, opts.prealloc)?;
        sync(&f, file)?;
    }
    let mut sides = crate::output::SideOutputs::new(path, false);
    for (extent, len) in &planned {
        let (f, temp) = sides.create(extent)?;
        if sparse {
            let mut w = VmdkWriter::create(
                f,
                &temp,
                *len,
                extent,
                VmdkOptions {
                    subformat: Subformat::MonolithicSparse,
                    ..VmdkOptions::default()
                },
            )?;
            w.embed_descriptor = false;
            Box::new(w).finish()?;
        } else {
            f.set_len(*len)
                .map_err(|e| Error::io(&temp, "sizing the extent", e))?;
            preallocate(&f, &temp, 0, *len, opts.prealloc)?;
            f.sync_all()
                .map_err(|e| Error::io(&temp, "syncing the extent", e))?;
        }
    }
    sides.commit()?;
    step();
    let mut write_descriptor = || -> Result<()> {
        let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
        std::io::Write::write_all(&mut f, &text)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(path, "writing the descriptor", e))?;
        out.commit()
    };
    let mut report = report;
    match gpt_plan {
        // The new backup goes into the new space, then the descriptor
        // switches, then the primary points at the new backup.
        Some(plan) => {
            let extents = open_set_extents(path, &grown)?;
            let mut sink = SetSink::new(&extents, &mut write_descriptor)?;
            apply_gpt(&mut sink, &plan)?;
            report.gpt_moved = true;
            report.partition_grown = plan.grown;
        }
        None => write_descriptor()?,
    }
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
    /// What the guest sees where no grain is stored yet (`None`: zeros).
    pub(super) reader: Option<Box<dyn ImageReader>>,
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
                if let (0, Some(r)) = (sector, &self.reader) {
                    if gstart < self.old_size {
                        let upto = (self.old_size - gstart).min(self.grain) as usize;
                        r.read_at(&mut data[..upto], gstart)?;
                    }
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
    let descriptor = resized_embedded(file, path, desc_off, desc_size, new / 512)?;
    let rgd = if flags & 2 != 0 { rgd } else { 0 };
    let dirs: Vec<u64> = [gd, rgd]
        .into_iter()
        .filter(|&d| d != 0 && d != u64::MAX)
        .collect();
    // 1. The GPT.
    if let Some(p) = gpt {
        let mut sink = VmdkSink {
            file,
            path,
            reader: Some(reader),
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
    // 2. The capacity (one sector): the disk ends at the new end.
    let mut hdr = *head;
    LittleEndian::write_u64(&mut hdr[12..20], new / 512);
    write_all_at(file, path, &hdr, 0)?;
    sync(file, path)?;
    step();
    // 3. Grain table entries past it, unseen now, cleared (so that a later
    // growth shows zeros there).
    let first_gone = (new / 512).div_ceil(grain);
    clear_grain_entries(
        file,
        path,
        &dirs,
        gtes,
        first_gone,
        capacity.div_ceil(grain * gtes),
    )?;
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

/// Clears the grain table entries from grain `from` to the end of the
/// `tables` grain tables each directory in `dirs` lists, synced.
fn clear_grain_entries(
    file: &File,
    path: &Path,
    dirs: &[u64],
    gtes: u64,
    from: u64,
    tables: u64,
) -> Result<()> {
    for &dir in dirs {
        let mut g = from;
        while g < tables * gtes {
            let mut b = [0u8; 4];
            read_exact_at(
                file,
                path,
                &mut b,
                dir * 512 + (g / gtes) * 4,
                "grain directory",
            )?;
            let gt = LittleEndian::read_u32(&b);
            let upto = (g / gtes + 1) * gtes;
            if gt != 0 {
                let zeros = vec![0u8; ((upto - g) * 4) as usize];
                write_all_at(file, path, &zeros, u64::from(gt) * 512 + (g % gtes) * 4)?;
            }
            g = upto;
        }
    }
    sync(file, path)
}

/// Shrinks a twoGbMaxExtent set: a GPT moves inside the new end first
/// (in place, the old descriptor still in force); a sparse extent the new
/// end falls inside is copied, up to the end, to a new extent file (its
/// header states its size, so it cannot be cut in place); then the
/// shorter descriptor replaces the old one in one rename; then the flat
/// extent the end falls in is cut and the extents past it are removed.
pub(super) fn shrink_vmdk_set(
    path: &Path,
    d: &crate::vmdk::descriptor::Descriptor,
    old: u64,
    new: u64,
    opts: &ResizeOptions,
) -> Result<ResizeReport> {
    use crate::block::ImageWriter;
    use crate::vmdk::descriptor::ExtentType;
    use crate::vmdk::writer::{Subformat, VmdkOptions, VmdkWriter};
    needs_shrink(path, old, new, opts)?;
    let reader = open_as(path, DiskFormat::Vmdk)?;
    let gpt_plan = gpt_plan_inside(
        reader.as_ref(),
        path,
        old,
        new,
        opts,
        "a twoGbMaxExtent set",
    )?;
    if !opts.force {
        // The GPT's own backup moves; anything else stored is data.
        shrink_checks(reader.as_ref(), path, new, old, gpt_plan.as_ref())?;
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
    if shorter && !matches!(last.kind, ExtentType::Flat | ExtentType::Sparse) {
        return Err(unsupported(
            path,
            format!(
                "{new} bytes ends inside extent {keep}, a {} extent that is not cut",
                last.type_word
            ),
        ));
    }
    let mut report = ResizeReport {
        old_size: old,
        new_size: new,
        ..ResizeReport::default()
    };
    // Every extent open and locked (as QEMU locks an image) before the
    // first write, held to the end: one a running QEMU holds refuses the
    // resize here.
    let extents = open_set_extents(path, d)?;
    // 1. The GPT, in place.
    if let Some(plan) = &gpt_plan {
        apply_gpt(&mut SetSink::new(&extents, &mut || Ok(()))?, plan)?;
        report.gpt_moved = true;
        report.partition_grown = plan.grown;
        step();
    }
    // 2. A sparse extent cut inside: its kept part copied to a new file.
    let gate = crate::gate::Gate::new();
    let mut replaced = None;
    let mut sides = crate::output::SideOutputs::new(path, false);
    if shorter && last.kind == ExtentType::Sparse {
        let reader = open_as(path, DiskFormat::Vmdk)?;
        let old_name = last.file.clone().unwrap_or_default();
        let stem = old_name
            .strip_suffix(".vmdk")
            .unwrap_or(&old_name)
            .to_string();
        let (name, _) = free_name(path, d, 1, |k| format!("{stem}-cut{k}.vmdk"));
        let (f, temp) = sides.create(&name)?;
        let mut w = VmdkWriter::create(
            f,
            &temp,
            cut,
            &name,
            VmdkOptions {
                subformat: Subformat::MonolithicSparse,
                ..VmdkOptions::default()
            },
        )?;
        w.embed_descriptor = false;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < cut {
            let e = reader.map(start + at, cut - at)?;
            let span = e.len.min(cut - at);
            if !e.reads_as_zero() {
                let mut p = 0;
                while p < span {
                    let n = (span - p).min(buf.len() as u64) as usize;
                    reader.read_at(&mut buf[..n], start + at + p)?;
                    if buf[..n].iter().any(|&b| b != 0) {
                        w.write_at(&buf[..n], at + p)?;
                    }
                    p += n as u64;
                }
            }
            at += span;
        }
        Box::new(w).finish()?;
        replaced = Some((old_name, name));
    }
    sides.commit()?;
    step();
    // 3. The descriptor.
    let text = d
        .truncated_text(
            keep,
            shorter.then_some(cut / 512),
            replaced.as_ref().map(|(_, n)| n.as_str()),
            new / 512,
        )
        .ok_or_else(|| invalid(path, "the descriptor's extent lines could not be rewritten"))?;
    let (out, mut f) = crate::output::AtomicOutput::create(path, true)?;
    std::io::Write::write_all(&mut f, &d.encode(&text))
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, "writing the descriptor", e))?;
    out.commit()?;
    step();
    // 4. What the descriptor no longer lists.
    if shorter && last.kind == ExtentType::Flat {
        let e = &extents[keep - 1];
        e.file
            .set_len(cut)
            .map_err(|err| Error::io(&e.path, "cutting the extent", err))?;
        sync(&e.file, &e.path)?;
    }
    let gone = d.extents[keep..]
        .iter()
        .filter_map(|e| e.file.clone())
        .chain(replaced.map(|(old, _)| old));
    for name in gone {
        if let Ok(file) = gate.resolve(path, &name, "extent") {
            let _ = std::fs::remove_file(file);
        }
    }
    Ok(report)
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

/// One extent of a twoGbMaxExtent set, open for guest writes.
pub(super) struct SetExtent {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) file: File,
    pub(super) path: std::path::PathBuf,
    /// A hosted sparse extent: (grain sectors, GT entries, GD, RGD).
    pub(super) sparse: Option<(u64, u64, u64, Option<u64>)>,
}

impl SetExtent {
    /// Opens extent `e` of the set described at `desc`, starting at guest
    /// byte `start` and `sectors` long (its new length, when it grows).
    pub(super) fn open(
        desc: &Path,
        e: &crate::vmdk::descriptor::ExtentLine,
        start: u64,
        sectors: u64,
    ) -> Result<Self> {
        use crate::vmdk::descriptor::ExtentType;
        let path =
            crate::gate::Gate::new().resolve(desc, e.file.as_deref().unwrap_or(""), "extent")?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| Error::io(&path, "opening the extent for writing", err))?;
        crate::lock::lock_for_resize(&file, &path)?;
        let sparse = match e.kind {
            ExtentType::Flat if e.type_word == "FLAT" && e.offset == 0 => None,
            ExtentType::Sparse => {
                let mut h = [0u8; 512];
                read_exact_at(&file, &path, &mut h, 0, "sparse extent header")?;
                let (flags, grain, gtes, rgd, gd) = (
                    LittleEndian::read_u32(&h[8..12]),
                    LittleEndian::read_u64(&h[20..28]),
                    u64::from(LittleEndian::read_u32(&h[44..48])),
                    LittleEndian::read_u64(&h[48..56]),
                    LittleEndian::read_u64(&h[56..64]),
                );
                if &h[0..4] != b"KDMV" || flags & (1 << 16) != 0 || grain == 0 || gtes == 0 {
                    return Err(unsupported(
                        &path,
                        "only hosted sparse extents take writes in a set",
                    ));
                }
                Some((grain, gtes, gd, (flags & 2 != 0 && rgd != 0).then_some(rgd)))
            }
            _ => {
                return Err(unsupported(
                    &path,
                    format!("a {} extent does not take writes here", e.type_word),
                ))
            }
        };
        Ok(SetExtent {
            start,
            len: sectors * 512,
            file,
            path,
            sparse,
        })
    }
}

/// Guest writes into a twoGbMaxExtent set, for moving a GPT: flat extents
/// are written in place; sparse extents like a monolithicSparse file
/// (stored grains in place, new grains appended and linked once durable).
/// `switch` replaces the descriptor.
pub(super) struct SetSink<'a> {
    pub(super) extents: &'a [SetExtent],
    pub(super) sinks: Vec<Option<VmdkSink<'a>>>,
    pub(super) switch: &'a mut dyn FnMut() -> Result<()>,
}

impl<'a> SetSink<'a> {
    pub(super) fn new(
        extents: &'a [SetExtent],
        switch: &'a mut dyn FnMut() -> Result<()>,
    ) -> Result<Self> {
        let mut sinks = Vec::new();
        for e in extents {
            sinks.push(match e.sparse {
                Some((grain, gtes, gd, rgd)) => Some(VmdkSink {
                    file: &e.file,
                    path: &e.path,
                    // A set that is not a delta: unstored grains read as zeros.
                    reader: None,
                    old_size: 0,
                    grain: grain * 512,
                    gtes,
                    gd,
                    rgd,
                    file_end: file_len(&e.file, &e.path)?.div_ceil(512) * 512,
                    links: Vec::new(),
                }),
                None => None,
            });
        }
        Ok(SetSink {
            extents,
            sinks,
            switch,
        })
    }
}

impl GuestSink for SetSink<'_> {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < bytes.len() {
            let g = at + done as u64;
            let k = self
                .extents
                .iter()
                .position(|e| g >= e.start && g < e.start + e.len)
                .ok_or_else(|| {
                    invalid(
                        &self.extents[0].path,
                        format!("guest byte {g} is past the set's extents"),
                    )
                })?;
            let e = &self.extents[k];
            let n = ((e.start + e.len - g) as usize).min(bytes.len() - done);
            let piece = &bytes[done..done + n];
            match &mut self.sinks[k] {
                Some(s) => s.write(g - e.start, piece)?,
                None => write_all_at(&e.file, &e.path, piece, g - e.start)?,
            }
            done += n;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        for (k, e) in self.extents.iter().enumerate() {
            match &mut self.sinks[k] {
                Some(s) => s.sync()?,
                None => sync(&e.file, &e.path)?,
            }
        }
        Ok(())
    }

    fn switch(&mut self) -> Result<()> {
        (self.switch)()
    }
}

/// The first name `name(k)` (k = start, start + 1, …) that the set's
/// descriptor does not list and no file beside it has: a file an
/// interrupted run left (written but never listed) is not replaced, nor
/// anything else already there.
fn free_name(
    desc: &Path,
    d: &crate::vmdk::descriptor::Descriptor,
    start: usize,
    name: impl Fn(usize) -> String,
) -> (String, usize) {
    let dir = desc.parent().unwrap_or(Path::new("."));
    let mut k = start;
    loop {
        let n = name(k);
        let listed = d
            .extents
            .iter()
            .any(|e| e.file.as_deref() == Some(n.as_str()));
        if !listed && std::fs::symlink_metadata(dir.join(&n)).is_err() {
            return (n, k);
        }
        k += 1;
    }
}

/// Every extent of the set `d` describes (at `desc`), open for writes.
fn open_set_extents(
    desc: &Path,
    d: &crate::vmdk::descriptor::Descriptor,
) -> Result<Vec<SetExtent>> {
    let mut start = 0;
    let mut out = Vec::new();
    for e in &d.extents {
        out.push(SetExtent::open(desc, e, start, e.sectors)?);
        start += e.sectors * 512;
    }
    Ok(out)
}

/// A sparse file's embedded descriptor (its area's bytes, parsed), when it
/// has one.
fn embedded_descriptor(
    file: &File,
    path: &Path,
    desc_off: u64,
    desc_size: u64,
) -> Result<Option<(Vec<u8>, crate::vmdk::descriptor::Descriptor)>> {
    if desc_off == 0 || desc_size == 0 {
        return Ok(None);
    }
    let area = desc_size
        .checked_mul(512)
        .filter(|&n| n <= crate::vmdk::descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1)
        .ok_or_else(|| invalid(path, "descriptor area too large"))?;
    let mut text = vec![0u8; area as usize];
    read_exact_at(file, path, &mut text, desc_off * 512, "embedded descriptor")?;
    let ctx = crate::error::Ctx::new(path);
    let d = crate::vmdk::descriptor::Descriptor::parse(&text, &ctx, desc_off * 512)?;
    Ok(Some((text, d)))
}

/// The embedded descriptor's area with the extent line for `sectors`,
/// checked to fit before anything is written.
fn resized_embedded(
    file: &File,
    path: &Path,
    desc_off: u64,
    desc_size: u64,
    sectors: u64,
) -> Result<Option<Vec<u8>>> {
    let Some((text, d)) = embedded_descriptor(file, path, desc_off, desc_size)? else {
        return Ok(None);
    };
    let t = d.resized_text(sectors).ok_or_else(|| {
        invalid(
            path,
            "the embedded descriptor's extent line could not be rewritten",
        )
    })?;
    let t = d.encode(&t);
    if t.len() > text.len() {
        return Err(unsupported(
            path,
            "the new embedded descriptor does not fit its area",
        ));
    }
    let mut out = vec![0u8; text.len()];
    out[..t.len()].copy_from_slice(&t);
    Ok(Some(out))
}

/// VMware's largest virtual disk.
const MAX_VMDK_BYTES: u64 = 62 << 40;

/// Cuts a flat extent file that is longer than its `len` described bytes
/// (under QEMU's lock, synced).
fn cut_extent_to(file: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .map_err(|e| Error::io(file, "opening the extent", e))?;
    if file_len(&f, file)? > len {
        crate::lock::lock_for_resize(&f, file)?;
        f.set_len(len)
            .map_err(|e| Error::io(file, "cutting the extent to its described size", e))?;
        sync(&f, file)?;
    }
    Ok(())
}
