//! VM descriptors: each format parses to a lossless document (unknown keys,
//! order and comments kept), lowers to the [`vmshift_model::Vm`] model, and
//! is raised from it.
//!
//! - [`vmx`]: VMware `.vmx` (Workstation, Fusion, ESXi).
//! - [`libvirt`]: libvirt domain XML.
//! - [`proxmox`]: Proxmox VE `qemu-server` `.conf`.
//! - [`ovf`]: OVF descriptors and OVA archives.
//!
//! [`mapping`] turns a VMware VM into a KVM one and says what it changed.
//!
//! Nothing here touches the file system beyond reading the one descriptor
//! it is given; disk references stay unresolved
//! ([`vmshift_model::DiskRef`]) until the CLI resolves them.

mod error;
pub mod libvirt;
pub mod mapping;
pub mod ovf;
pub mod proxmox;
pub mod qemu;
pub mod schema;
pub mod vmx;
pub mod xml;

pub use error::{DescError, Result};

use vmshift_model::{Finding, Vm};

/// The largest descriptor vmshift reads (a `.vmx`, `.xml`, `.conf` or
/// `.ovf` is a few KiB; anything this large is not one).
pub const MAX_DESCRIPTOR_BYTES: u64 = vmshift_model::limits::DESCRIPTOR_BYTES;

/// A descriptor lowered to the model, with what lowering noticed (keys it
/// could not map, values it had to guess).
#[derive(Debug, Clone, PartialEq)]
pub struct Lowered {
    /// The VM.
    pub vm: Vm,
    /// What the format-specific reading found.
    pub findings: Vec<Finding>,
}

/// Reads a descriptor file, refusing anything over
/// [`MAX_DESCRIPTOR_BYTES`] before reading it.
pub fn read_descriptor(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| DescError::io(path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_DESCRIPTOR_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| DescError::io(path, e))?;
    if buf.len() as u64 > MAX_DESCRIPTOR_BYTES {
        return Err(DescError::new(format!(
            "larger than {} MiB; not a VM descriptor",
            MAX_DESCRIPTOR_BYTES >> 20
        ))
        .in_file(path));
    }
    Ok(buf)
}
