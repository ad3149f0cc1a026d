//! Resizing raw images.

use super::*;

pub(super) fn resize_raw(
    file: File,
    path: &Path,
    new: u64,
    opts: &ResizeOptions,
    switch: &mut dyn FnMut() -> Result<()>,
) -> Result<ResizeReport> {
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
    let gpt_needs_fix = gpt.is_some() && {
        let reader = RawReader::open(
            file.try_clone()
                .map_err(|e| Error::io(path, "reopening the image", e))?,
            path,
        )?;
        gpt_unfinished(&reader)
    };
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
        let reader = RawReader::open(
            file.try_clone()
                .map_err(|e| Error::io(path, "reopening the image", e))?,
            path,
        )?;
        shrink_checks(&reader, path, new, old, gpt_plan.as_ref())?;
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

    // Grow: the new end exists before anything points at it. If the new
    // space cannot be written (out of space, an I/O error), the file is cut
    // back: the disk keeps its old size.
    if new > old {
        let grown = file
            .set_len(new)
            .map_err(|e| Error::io(path, "growing the image", e))
            .and_then(|()| preallocate(&file, path, old, new, opts.prealloc))
            .and_then(|()| sync(&file, path));
        if let Err(e) = grown {
            if file.set_len(old).is_ok() {
                let _ = sync(&file, path);
            }
            return Err(e);
        }
        step();
    }
    if new >= old {
        switch()?;
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
        switch()?;
        step();
        file.set_len(new)
            .map_err(|e| Error::io(path, "shrinking the image", e))?;
        sync(&file, path)?;
    }
    Ok(report)
}

pub(super) fn preallocate(
    file: &File,
    path: &Path,
    from: u64,
    to: u64,
    how: Prealloc,
) -> Result<()> {
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
