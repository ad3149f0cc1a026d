//! An input as a Windows registry hive: opened and every key and value
//! read, within a budget. (For inputs whose first byte is even the
//! harness fixes the base block's checksum and its first byte, 'r' of
//! "regf".)
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmshift_guest::hive::{Hive, Key};

fn walk(k: &Key<'_>, depth: u32, budget: &mut u32) {
    if let Ok(values) = k.values() {
        for v in values.iter().take(64) {
            let _ = v.name();
            let _ = v.data();
            let _ = v.as_string();
            let _ = v.as_multi_string();
            let _ = v.as_dword();
            let _ = v.as_qword();
        }
    }
    let Ok(subs) = k.subkeys() else { return };
    for s in subs {
        if *budget == 0 || depth > 16 {
            return;
        }
        *budget -= 1;
        let _ = k.subkey(&s.name());
        walk(&s, depth + 1, budget);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    // The base block's XOR checksum, made right (byte 0 of the input
    // decides, so that wrong sums are fuzzed too): past it, the mutations
    // reach the hive bins and cells.
    if data.len() >= 512 && data[0] & 1 == 0 {
        data[0] = b'r';
        let word = |b: &[u8], i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        let sum = (0..127).fold(0u32, |acc, i| acc ^ word(&data, i));
        data[0x1fc..0x200].copy_from_slice(&sum.to_le_bytes());
    }
    let Ok(h) = Hive::open(Box::new(data)) else {
        return;
    };
    let _ = h.open_path(r"ControlSet001\Services\viostor");
    if let Ok(root) = h.root() {
        let mut budget = 2000;
        walk(&root, 0, &mut budget);
    }
});
