//! vmshift's minimal KVM launcher.
//!
//! [`boot`] starts a VM on `/dev/kvm` with a Linux kernel loaded directly
//! (bzImage or ELF `vmlinux`), an initramfs, ACPI tables, an 8250 serial
//! port, an i8042 (for the guest's reset) and the VM's disks on virtio-blk
//! or virtio-scsi over PCI, read through vmshift's own image drivers with
//! the guest's writes kept in an in-memory overlay. It watches the serial
//! console and returns the [`Verdict`]: booted, failed (with the cause) or
//! timed out.

#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
mod cpu;
mod devices;
pub mod disk;
pub mod error;
pub mod layout;
pub mod pci;
pub mod qemu;
pub mod verdict;
pub mod virtio;
mod vmm;

pub use boot::Blob;

/// The probe guest (crates/kvm/probe/probe.rs), a freestanding ELF built
/// by build.rs: booted instead of a kernel, it reads each virtio-blk disk
/// by polling and prints its partition table and first file system to
/// COM1, each line starting with `VMSHIFT-PROBE`.
pub const PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));

/// The probe guest as a kernel to boot.
pub fn probe_kernel() -> Blob {
    Blob {
        name: "the built-in probe guest".into(),
        data: PROBE_ELF.to_vec(),
    }
}
pub use error::{Error, Result};
pub use verdict::{FailureCause, Verdict, Watcher};
pub use vmm::{
    boot, kvm_status, BootConfig, BootReport, DiskBus, DiskSpec, KvmStatus, RUNTIME_IOCTLS,
};
