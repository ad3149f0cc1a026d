//! `vmshift part`: a disk image's partition table (MBR or GPT).

use anyhow::Result;
use vmshift_image::part::{read_table, PartitionTable, TableKind};
use vmshift_model::format_size;

use crate::args::{Output, PartArgs};

pub fn run(args: &PartArgs) -> Result<i32> {
    let img = super::open(&args.file, args.format, &args.gate, false, super::Use::Look)?;
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    let table = read_table(img.as_ref())?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&table)?),
        Output::Human => match &table {
            Some(t) => print!("{}", human(t)),
            None => println!("{}: no partition table", args.file.display()),
        },
    }
    // A damaged table is worth a non-zero exit, as check does.
    Ok(match &table {
        Some(t) if !t.problems.is_empty() => 2,
        _ => 0,
    })
}

/// The table as text: a header line, one line a partition, the problems.
pub fn human(t: &PartitionTable) -> String {
    let mut out = String::new();
    match (&t.kind, &t.gpt) {
        (TableKind::Gpt, Some(g)) => out.push_str(&format!(
            "Partition table: GPT, {}-byte sectors, disk GUID {}, usable LBA {}–{}, backup header at LBA {}\n",
            g.sector_size, g.disk_guid, g.first_usable_lba, g.last_usable_lba, g.backup_lba
        )),
        _ => out.push_str("Partition table: MBR\n"),
    }
    out.push_str(&format!(
        "{:>3}  {:>14}  {:>14}  {:>10}  {:<24}  {}\n",
        "#", "start", "end", "size", "type", "name"
    ));
    for p in &t.partitions {
        let mut ty = p.type_name.clone();
        if ty == "unknown" {
            ty = p.type_id.clone();
        }
        let mut name = p.label.clone().unwrap_or_default();
        if p.bootable {
            name.push_str("(boot)");
        }
        out.push_str(&format!(
            "{:>3}  {:>14}  {:>14}  {:>10}  {:<24}  {}\n",
            p.number,
            p.start,
            p.end,
            format_size(p.size),
            ty,
            name
        ));
    }
    for pr in &t.problems {
        out.push_str(&format!("problem: {pr}\n"));
    }
    out
}
