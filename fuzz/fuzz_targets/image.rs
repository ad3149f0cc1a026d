//! An input as a disk image: probed (qcow2, every VMDK subformat, raw),
//! opened through the gate, mapped, read, checked, and its partition
//! table read — as `info`, `map`, `check`, `compare`, `convert` and `part`
//! do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmshift_image::{open_image, part::read_table, OpenOptions};

fuzz_target!(|data: &[u8]| {
    let path = vmshift_fuzz::input_file("image", data);
    let Ok(img) = open_image(&path, None, &OpenOptions::default()) else {
        return;
    };
    let size = img.size();
    let _ = img.info();
    // The first 16 MiB in 1 MiB steps and the last MiB: map and read.
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    let mut steps = 0;
    while at < size && steps < 17 {
        if let Ok(e) = img.map(at, (size - at).min(1 << 20)) {
            let _ = img.status_end(at);
            let _ = e.len;
        }
        let n = (size - at).min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], at);
        at = if steps == 15 {
            size.saturating_sub(1 << 20).max(at + (1 << 20))
        } else {
            at + (1 << 20)
        };
        steps += 1;
    }
    let _ = img.check();
    let _ = read_table(&*img);
});
