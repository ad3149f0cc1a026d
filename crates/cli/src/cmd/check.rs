//! `vmshift check`: qemu-img's exit codes (0 clean, 1 check errors,
//! 2 corruptions, 3 leaks, 63 no check for this format) and JSON fields.

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::args::{CheckArgs, Output};

pub fn run(args: &CheckArgs) -> Result<i32> {
    let img = super::open(&args.file, args.format, &args.gate, false, super::Use::Look)?;
    let Some(report) = img.check() else {
        eprintln!(
            "vmshift: {}: this image format ({}) does not support checks",
            args.file.display(),
            img.format()
        );
        return Ok(63);
    };
    let report = report?;
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
            m.insert("format".into(), json!(img.format().name()));
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
