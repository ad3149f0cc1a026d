//! The vocabulary every vmshift crate shares.
//!
//! The disk side: which format an image is in, and sizes written the way
//! `qemu-img` users write them (`10G`, `512M`). The VM side: [`Vm`], the
//! one model every descriptor format (`.vmx`, libvirt XML, Proxmox `.conf`,
//! OVF) lowers to and raises from, and [`Vm::validate`], its pure checks.
#![deny(missing_docs)]

mod format;
pub mod limits;
mod size;
pub mod text;
mod validate;
mod vm;

pub use format::DiskFormat;
pub use size::{format_size, parse_size, SizeError};
pub use validate::{mac_is_valid, uuid_from_hex, uuid_is_valid, Finding, Severity};
pub use vm::{
    Bus, Controller, Cpu, DeviceKind, Disk, DiskRef, Firmware, FirmwareKind, Graphics, Guest, Nic,
    OsFamily, Serial, SerialKind, Vm,
};
