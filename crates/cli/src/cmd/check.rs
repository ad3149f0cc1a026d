//! `vmshift check`: qemu-img's exit codes (0 clean, 1 check errors,
//! 2 corruptions, 3 leaks, 63 no check for this format) and JSON fields.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use vmshift_image::check::{CheckReport, Fix, Repaired};
use vmshift_model::DiskFormat;

use crate::args::{CheckArgs, Output, RepairArg};

pub fn run(args: &CheckArgs) -> Result<i32> {
    if let Some(fix) = args.repair {
        return repair(args, fix);
    }
    let img = super::open(&args.file, args.format, &args.gate, false, super::Use::Look)?;
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    let Some(report) = img.check() else {
        eprintln!(
            "vmshift: {}: this image format ({}) does not support checks",
            args.file.display(),
            img.format()
        );
        return Ok(63);
    };
    let report = report?;
    print_report(args, img.format(), &report, None)
}

/// `check -r`: the file opened for writing under QEMU's write lock, the
/// repair, then the check of the repaired image, as qemu-img prints them.
fn repair(args: &CheckArgs, fix: RepairArg) -> Result<i32> {
    if args.gate.force_share {
        bail!("-U (--force-share) reads an image others may write; -r writes it: not together");
    }
    let path = args
        .file
        .canonicalize()
        .with_context(|| format!("{}: finding the image", args.file.display()))?;
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: opening the image for writing", args.file.display()))?;
    vmshift_image::lock::lock_for_resize(&out, &path)?;
    let open = || -> Result<Box<dyn vmshift_image::ImageReader>> {
        let opts = vmshift_image::OpenOptions {
            gate: super::gate(&args.gate),
            force_share: false,
            share_raw_writes: false,
            already_locked: true,
            zeros_past_eof: false,
            keep_refused_backing: true,
        };
        Ok(vmshift_image::open_image(
            &args.file,
            args.format.map(Into::into),
            &opts,
        )?)
    };
    let img = open()?;
    // The image is rewritten in place and read again after the repair,
    // with its backing chain.
    // (its extents and data files sit in the folders of its layers)
    let mut policy = crate::sandbox::Policy::write(Vec::new(), vec![path.clone()]);
    for l in super::chain(img.as_ref()) {
        policy.read_files.push(l.path().to_path_buf());
        policy.read_files.extend(l.info().extra_files);
        policy.read_dirs.push(crate::sandbox::folder_of(
            &l.path()
                .canonicalize()
                .unwrap_or_else(|_| l.path().to_path_buf()),
        ));
    }
    crate::sandbox::confine(&policy)?;
    let fix = match fix {
        RepairArg::Leaks => Fix::Leaks,
        RepairArg::All => Fix::All,
    };
    let Some(done) = img.repair(&out, fix) else {
        eprintln!(
            "vmshift: {}: this image format ({}) does not support checks",
            args.file.display(),
            img.format()
        );
        return Ok(63);
    };
    let done = done?;
    for msg in &done.messages {
        eprintln!("{msg}");
    }
    if done.needs_rebuild {
        eprintln!(
            "vmshift: {}: check failed: a referenced cluster has refcount 0; the refcount structure must be rebuilt, which -r leaks does not do",
            args.file.display()
        );
        return Ok(1);
    }
    drop(img);
    if done.leaks_fixed + done.corruptions_fixed > 0 && args.output == Output::Human && !args.quiet
    {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            done.leaks_fixed, done.corruptions_fixed
        );
    }
    // The repaired image, read afresh (and its problems said again only
    // when something was repaired, as qemu-img double-checks only then).
    let img = open()?;
    let mut report = img
        .check()
        .ok_or_else(|| anyhow::anyhow!("{}: no check after the repair", args.file.display()))??;
    if done.leaks_fixed + done.corruptions_fixed == 0 {
        report.messages.clear();
    }
    print_report(args, img.format(), &report, Some(&done))
}

/// Prints a check report (and what a repair fixed) as qemu-img does;
/// returns qemu-img's exit code.
fn print_report(
    args: &CheckArgs,
    format: DiskFormat,
    report: &CheckReport,
    fixed: Option<&Repaired>,
) -> Result<i32> {
    if args.quiet {
        // qemu-img's -q: the problems on stderr, no report.
        for msg in &report.messages {
            eprintln!("{msg}");
        }
        return Ok(report.exit_code());
    }
    match args.output {
        Output::Json => {
            let mut m = Map::new();
            let mut opt = |k: &str, v: u64| {
                if v != 0 {
                    m.insert(k.to_string(), json!(v));
                }
            };
            opt("image-end-offset", report.image_end_offset);
            opt("total-clusters", report.total_clusters);
            m.insert("check-errors".into(), json!(report.check_errors));
            if let Some(f) = fixed {
                if f.leaks_fixed > 0 {
                    m.insert("leaks-fixed".into(), json!(f.leaks_fixed));
                }
                if f.corruptions_fixed > 0 {
                    m.insert("corruptions-fixed".into(), json!(f.corruptions_fixed));
                }
            }
            let mut opt = |k: &str, v: u64| {
                if v != 0 {
                    m.insert(k.to_string(), json!(v));
                }
            };
            opt("leaks", report.leaks);
            opt("corruptions", report.corruptions);
            opt("allocated-clusters", report.allocated_clusters);
            opt("fragmented-clusters", report.fragmented_clusters);
            opt("compressed-clusters", report.compressed_clusters);
            m.insert("filename".into(), json!(args.file.display().to_string()));
            m.insert("format".into(), json!(format.name()));
            println!("{}", serde_json::to_string_pretty(&Value::Object(m))?);
        }
        Output::Human => {
            for msg in &report.messages {
                eprintln!("{msg}");
            }
            if report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0 {
                println!("No errors were found on the image.");
            }
            if report.corruptions > 0 {
                println!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    report.corruptions
                );
            }
            if report.leaks > 0 {
                println!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                    report.leaks
                );
            }
            if report.check_errors > 0 {
                println!(
                    "\n{} internal errors have occurred during the check.",
                    report.check_errors
                );
            }
            if report.total_clusters > 0 && report.allocated_clusters > 0 {
                let pct = |n: u64, of: u64| {
                    if of == 0 {
                        0.0
                    } else {
                        n as f64 * 100.0 / of as f64
                    }
                };
                println!(
                    "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                    report.allocated_clusters,
                    report.total_clusters,
                    pct(report.allocated_clusters, report.total_clusters),
                    pct(report.fragmented_clusters, report.allocated_clusters),
                    pct(report.compressed_clusters, report.allocated_clusters)
                );
            }
            if report.image_end_offset > 0 {
                println!("Image end offset: {}", report.image_end_offset);
            }
        }
    }
    Ok(report.exit_code())
}
