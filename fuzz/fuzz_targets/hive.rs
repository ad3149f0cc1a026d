//! An input as a Windows registry hive: opened and every key and value
//! read, within a budget.
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
    let Ok(h) = Hive::open(Box::new(data.to_vec())) else {
        return;
    };
    let _ = h.open_path(r"ControlSet001\Services\viostor");
    if let Ok(root) = h.root() {
        let mut budget = 2000;
        walk(&root, 0, &mut budget);
    }
});
