//! `vmshift map`: where each guest range lives, as `qemu-img map` prints it.

use anyhow::anyhow;
use anyhow::Result;
use vmshift_image::engine::{map_flags, map_range};
use vmshift_image::BlockState;

use crate::args::{MapArgs, Output};

pub fn run(args: &MapArgs) -> Result<i32> {
    let img = super::open(&args.file, args.format, &args.gate, false, super::Use::Look)?;
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    let size = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
        v.as_deref()
            .map(|v| vmshift_model::parse_size(v).map_err(|e| anyhow!("{flag} {v}: {e}")))
            .transpose()
    };
    let start = size("--start-offset", &args.start_offset)?.unwrap_or(0);
    let len = size("--max-length", &args.max_length)?.unwrap_or(u64::MAX);
    let extents = map_range(img.as_ref(), start, len)?;
    let layers = super::chain(img.as_ref());
    match args.output {
        Output::Json => {
            if extents.is_empty() {
                // qemu-img's answer for an empty range: one empty record
                // where the range starts.
                println!(
                    "[{{ \"start\": {start}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}]"
                );
                return Ok(0);
            }
            let lines: Vec<String> = extents
                .iter()
                .map(|e| {
                    let (present, zero, data) = map_flags(e);
                    let offset = e.host_offset.map_or(String::new(), |o| format!(", \"offset\": {o}"));
                    format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {present}, \"zero\": {zero}, \"data\": {data}, \"compressed\": {}{offset}}}",
                        e.start,
                        e.len,
                        e.depth,
                        e.state == BlockState::Compressed
                    )
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        Output::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            // qemu-img's human map cannot show data without a host offset.
            if extents
                .iter()
                .any(|e| map_flags(e).2 && e.host_offset.is_none())
            {
                anyhow::bail!("File contains external, encrypted or compressed clusters.");
            }
            for e in &extents {
                if let (BlockState::Data, Some(host)) = (e.state, e.host_offset) {
                    // The file that holds the data: an extent file, or the
                    // layer's own file (the top one named as given).
                    let layer = layers.get(e.depth as usize);
                    let file = match layer.and_then(|l| l.data_file_at(e.start)) {
                        Some(f) => f,
                        None if e.depth == 0 => args.file.display().to_string(),
                        None => layer.map_or(String::new(), |l| l.path().display().to_string()),
                    };
                    // C's %#x: no 0x for zero.
                    let hex = |v: u64| {
                        if v == 0 {
                            "0".to_string()
                        } else {
                            format!("{v:#x}")
                        }
                    };
                    println!(
                        "{:<16}{:<16}{:<16}{file}",
                        hex(e.start),
                        hex(e.len),
                        hex(host)
                    );
                }
            }
        }
    }
    Ok(0)
}
