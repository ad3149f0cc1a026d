//! `vmshift resize`: grow or shrink an image in place.

use anyhow::{anyhow, bail, Context, Result};
use vmshift_image::probe;
use vmshift_image::resize::{resize, Prealloc, ResizeOptions};
use vmshift_model::{format_size, parse_size, DiskFormat};

use crate::args::{PreallocArg, ResizeArgs};

pub fn run(args: &ResizeArgs) -> Result<i32> {
    let format: DiskFormat = match args.format {
        Some(f) => f.into(),
        None => {
            let f = std::fs::File::open(&args.file)
                .with_context(|| format!("{}", args.file.display()))?;
            probe(&f, &args.file)?
        }
    };
    // The size only: the resize itself takes the image exclusively, and
    // refuses one in use, with QEMU's words.
    let peek = vmshift_image::OpenOptions {
        already_locked: true,
        ..Default::default()
    };
    let current = vmshift_image::open_image(&args.file, Some(format), &peek)?.size();
    let new = match args.size.as_bytes().first() {
        Some(b'+') => current
            .checked_add(parse_size(&args.size[1..])?)
            .ok_or_else(|| anyhow!("{}: too large", args.size))?,
        Some(b'-') => current
            .checked_sub(parse_size(&args.size[1..])?)
            .ok_or_else(|| anyhow!("{}: larger than the image ({current} bytes)", args.size))?,
        _ => parse_size(&args.size)?,
    };
    if new == 0 {
        bail!("{}: an image cannot shrink to nothing", args.file.display());
    }
    let opts = ResizeOptions {
        shrink: args.shrink,
        force: args.force,
        prealloc: match args.preallocation {
            PreallocArg::Off => Prealloc::Off,
            PreallocArg::Metadata => Prealloc::Metadata,
            PreallocArg::Falloc => Prealloc::Falloc,
            PreallocArg::Full => Prealloc::Full,
        },
        fix_gpt: !args.no_fix_gpt,
        grow_partition: args.grow_partition,
    };
    // The image is rewritten in its folder (in place, or a stream-optimized
    // VMDK through a temporary file beside it), where the gate also keeps
    // its backing files and extents: only that folder may be opened.
    crate::sandbox::confine(&crate::sandbox::Policy::write(
        // (the real folder, when the image is named through a symlink)
        vec![crate::sandbox::folder_of(
            &args
                .file
                .canonicalize()
                .unwrap_or_else(|_| args.file.clone()),
        )],
        Vec::new(),
    ))?;
    let report = resize(&args.file, format, new, &opts)?;
    if args.quiet {
        return Ok(0);
    }
    println!(
        "Image resized: {} → {}.",
        format_size(report.old_size),
        format_size(report.new_size)
    );
    for n in &report.notes {
        println!("Note: {n}");
    }
    if report.gpt_moved {
        println!("The GPT's backup header and entries moved to the new end.");
    }
    if let Some((n, from, to)) = report.partition_grown {
        println!(
            "Partition {n} now ends at byte {to} (was {from}); grow the filesystem inside from the guest (resize2fs, xfs_growfs, Extend Volume)."
        );
    }
    Ok(0)
}
