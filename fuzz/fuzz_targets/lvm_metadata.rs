//! An input as LVM2 metadata text (the VG description a PV's metadata
//! area holds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vmshift_guest::lvm::parse_metadata(text);
    }
});
