//! An input as every descriptor format vmshift reads: `.vmx` (and
//! `.vmsd`), libvirt domain XML, Proxmox `.conf`, OVF, and an OVA
//! manifest; each parsed and lowered into the model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmshift_desc::libvirt::DomainDocument;
use vmshift_desc::ovf::{Manifest, OvfDocument};
use vmshift_desc::proxmox::ConfDocument;
use vmshift_desc::vmx::VmxDocument;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = VmxDocument::parse(data) {
        let _ = d.lower();
        let _ = vmshift_desc::vmx::snapshot_names(&d);
    }
    if let Ok(d) = DomainDocument::parse(data) {
        let _ = d.lower();
    }
    if let Ok(d) = ConfDocument::parse(data) {
        let _ = d.lower();
        let _ = d.to_string();
    }
    if let Ok(d) = OvfDocument::parse(data) {
        let _ = d.lower();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Manifest::parse("fuzz.mf", text);
    }
});
