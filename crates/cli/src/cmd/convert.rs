//! `vmshift convert`: copy an image into another format.

use std::fs::OpenOptions;

use anyhow::{bail, Context, Result};
use vmshift_image::create::{create_writer, open_existing_writer, parse_options, CreateSpec};
use vmshift_image::engine::{convert, ConvertOptions};
use vmshift_image::output::{AtomicOutput, SideOutputs};
use vmshift_model::{parse_size, DiskFormat};

use crate::args::{CacheArg, ConvertArgs, FormatArg};
use crate::progress::Progress;

pub fn run(args: &ConvertArgs) -> Result<i32> {
    if matches!(args.source_cache, CacheArg::None | CacheArg::Directsync) {
        bail!(
            "-T {}: vmshift reads sources through the page cache; O_DIRECT reads are not supported (use -T writeback)",
            if args.source_cache == CacheArg::None { "none" } else { "directsync" }
        );
    }
    // Only cache=unsafe skips the final flush, as in qemu-img.
    let flush = args.cache != CacheArg::Unsafe;
    let min_sparse = parse_size(&args.sparse_size)?;
    if min_sparse % 512 != 0 {
        bail!("-S {}: must be a multiple of 512 bytes", args.sparse_size);
    }
    let src = super::open(
        &args.source,
        args.format,
        &args.gate,
        !args.quiet,
        super::Use::Copy,
    )?;
    let src: Box<dyn vmshift_image::ImageReader> = if args.salvage {
        let quiet = args.quiet;
        Box::new(vmshift_image::salvage::SalvageReader::new(
            src,
            Box::new(move |what: &str| {
                if !quiet {
                    eprintln!("vmshift: warning: {what}");
                }
            }),
        ))
    } else {
        src
    };
    // The target must not be any file the source reads (its backing
    // files included): writing it would corrupt what is being copied.
    if let Some(layer) = super::chain(src.as_ref())
        .into_iter()
        .find(|l| same_file(l.path(), &args.target))
    {
        bail!(
            "{}: the target is {}, which the source reads",
            args.target.display(),
            layer.path().display()
        );
    }
    let format: DiskFormat = args.output_format.into();
    let mut options = parse_options(&args.options)?;
    if let Some(b) = &args.backing {
        options.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = args.backing_format {
        if args.backing.is_none() && !options.iter().any(|(k, _)| k == "backing_file") {
            bail!("-F: a backing format cannot be used without a backing file (-B)");
        }
        options.push(("backing_fmt".into(), DiskFormat::from(f).to_string()));
    }
    let spec = CreateSpec {
        format,
        size: src.size(),
        options,
        compress: args.compress,
        name: super::file_name(&args.target),
    };
    // A target with a backing file is an overlay: only the source's top
    // image is written, as qemu-img does.
    let mut target_backing = None;
    if let Some(b) = spec.backing_file() {
        if format != DiskFormat::Qcow2 {
            bail!("-B: a backing file needs -O qcow2 ({format} images have none here)");
        }
        if args.no_create {
            bail!("-B names the backing file of a new image; -n writes into an existing one");
        }
        let fmt = spec
            .options
            .iter()
            .rev()
            .find(|(k, _)| k == "backing_fmt")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("-B {b}: a backing file needs its format (-F raw|qcow2|vmdk), as qemu-img requires"))?;
        let fmt: DiskFormat = fmt
            .parse()
            .map_err(|e| anyhow::anyhow!("backing_fmt={fmt}: {e}"))?;
        // The backing file the target will name, from its folder, through
        // the gate; opened for its bytes (copy on write) and its size.
        let path = super::gate(&args.gate)
            .resolve(&args.target, b, "backing file")
            .context("the target's backing file")?;
        let fmt = match fmt {
            DiskFormat::Raw => FormatArg::Raw,
            DiskFormat::Qcow2 => FormatArg::Qcow2,
            DiskFormat::Vmdk => FormatArg::Vmdk,
        };
        let reader = super::open(&path, Some(fmt), &args.gate, false, super::Use::Copy)
            .context("the target's backing file")?;
        target_backing = Some(std::sync::Arc::from(reader));
    }
    let opts = ConvertOptions {
        min_sparse,
        target_is_zero: args.target_is_zero,
        cancel: Some(&crate::signals::INTERRUPTED),
        in_order: !args.out_of_order,
        target_backing,
        ..ConvertOptions::default()
    };
    let opts = match args.workers {
        Some(n) => ConvertOptions {
            threads: usize::from(n),
            ..opts
        },
        None => opts,
    };
    crate::signals::install();
    let progress = if args.quiet {
        Progress::Silent
    } else {
        Progress::new(src.size(), args.progress)
    };
    let report = |done, total| progress.update(done, total);
    if args.no_create {
        if !spec.options.is_empty() || args.compress {
            bail!("-n writes into an existing image and takes no -o or -c");
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&args.target)
            .with_context(|| {
                format!(
                    "{}: opening the existing target (-n)",
                    args.target.display()
                )
            })?;
        let mut writer =
            open_existing_writer(file, &args.target, format, src.size(), args.target_is_zero)?;
        // Source and target are open: no file may be opened from here on.
        crate::sandbox::confine(&crate::sandbox::Policy::write(Vec::new(), Vec::new()))?;
        convert(src.as_ref(), writer.as_mut(), &opts, &report)?;
        writer.finish_with(flush)?;
    } else {
        spec.validate()?;
        let (out, file) = AtomicOutput::create(&args.target, args.force)?;
        let mut sides = SideOutputs::new(&args.target, args.force);
        // Messages name the target (the temporary file is ours).
        let mut writer = create_writer(file, &args.target, &spec, &mut sides)?;
        // Source and outputs (the temporary files) are open: from here on
        // the outputs may only be put in place in the target's folder.
        crate::sandbox::confine(&crate::sandbox::Policy::commit(vec![
            crate::sandbox::folder_of(&args.target),
        ]))?;
        convert(src.as_ref(), writer.as_mut(), &opts, &report)?;
        writer.finish_with(flush)?;
        sides.commit_with(flush)?;
        out.commit_with(flush)?;
    }
    progress.finish();
    Ok(0)
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
