//! `vmshift map`: where each guest range lives, as `qemu-img map` prints it.

use anyhow::Result;
use vmshift_image::engine::{map_all, map_flags};
use vmshift_image::BlockState;

use crate::args::{MapArgs, Output};

pub fn run(args: &MapArgs) -> Result<i32> {
    let img = super::open(&args.file, args.format, &args.gate, false, super::Use::Look)?;
    let extents = map_all(img.as_ref())?;
    let layers = super::chain(img.as_ref());
    match args.output {
        Output::Json => {
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
            for e in &extents {
                if let (BlockState::Data, Some(host)) = (e.state, e.host_offset) {
                    let file = layers
                        .get(e.depth as usize)
                        .map_or(String::new(), |l| l.path().display().to_string());
                    let file = if e.depth == 0 {
                        args.file.display().to_string()
                    } else {
                        file
                    };
                    println!(
                        "{:<16}{:<16}{:<16}{file}",
                        format!("{:#x}", e.start).replace("0x0", "0"),
                        format!("{:#x}", e.len),
                        format!("{host:#x}")
                    );
                }
            }
        }
    }
    Ok(0)
}
