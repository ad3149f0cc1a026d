//! `vmshift create`: a new, empty image, written atomically.

use anyhow::{bail, Context, Result};
use vmshift_image::create::{create_writer, parse_options, CreateSpec};
use vmshift_image::output::{AtomicOutput, SideOutputs};
use vmshift_model::{parse_size, DiskFormat};

use crate::args::CreateArgs;

pub fn run(args: &CreateArgs) -> Result<i32> {
    let format: DiskFormat = args.format.into();
    let mut options = parse_options(&args.options)?;
    if let Some(b) = &args.backing {
        options.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &args.backing_format {
        options.push(("backing_fmt".into(), f.clone()));
    }
    let backing = options
        .iter()
        .rev()
        .find(|(k, _)| k == "backing_file")
        .map(|(_, v)| v.clone());
    let backing_fmt = options
        .iter()
        .rev()
        .find(|(k, _)| k == "backing_fmt")
        .map(|(_, v)| v.clone());
    // The backing file must exist and pass the gate, as seen from the new
    // image's folder; its size is the default size.
    let backing_reader = match &backing {
        Some(name) => {
            let gate = super::gate(&args.gate);
            let path = gate.resolve(&args.file, name, "backing file")?;
            let fmt = backing_fmt
                .as_deref()
                .map(|f| f.parse::<DiskFormat>().map_err(anyhow::Error::msg))
                .transpose()?;
            let r = vmshift_image::open_image(
                &path,
                fmt,
                &vmshift_image::OpenOptions {
                    gate,
                    ..Default::default()
                },
            )
            .with_context(|| format!("opening backing file '{name}'"))?;
            if backing_fmt.is_none() {
                eprintln!(
                    "vmshift: no backing format given; probed '{}' as {} and recorded it in the image",
                    name,
                    r.format()
                );
                options.push(("backing_fmt".into(), r.format().name().into()));
            }
            Some(r)
        }
        None => None,
    };
    let size = match (&args.size, &backing_reader) {
        (Some(s), _) => parse_size(s)?,
        (None, Some(b)) => b.size(),
        (None, None) => bail!("a size is needed (e.g. 10G) when there is no backing file"),
    };
    let spec = CreateSpec {
        format,
        size,
        options,
        compress: false,
        name: super::file_name(&args.file),
    };
    spec.validate()?;
    let (out, file) = AtomicOutput::create(&args.file, args.force)?;
    let mut sides = SideOutputs::new(&args.file, args.force);
    // Messages name the target (the temporary file is ours, not the user's).
    let writer = create_writer(file, &args.file, &spec, &mut sides)?;
    // The outputs are open: from here on they may only be put in place.
    crate::sandbox::confine(&crate::sandbox::Policy::commit(vec![
        crate::sandbox::folder_of(&args.file),
    ]))?;
    writer.finish()?;
    sides.commit()?;
    out.commit()?;
    let opts: Vec<String> = spec
        .options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if args.quiet {
        return Ok(0);
    }
    println!(
        "Formatting '{}', fmt={format} size={size}{}{}",
        args.file.display(),
        if opts.is_empty() { "" } else { " " },
        opts.join(" ")
    );
    Ok(0)
}
