//! The VM model every descriptor format lowers to and raises from.
//!
//! It holds what a migration must keep — identity, firmware, CPU, memory,
//! the guest OS, controllers, disks in boot order, NICs with their MACs,
//! serial ports, graphics — and the VMware features that have no faithful
//! KVM mapping, so that they can be reported rather than lost silently.
//! Disk sources stay unresolved references: resolving them is I/O, which
//! happens in the CLI below the VM's own folder.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::DiskFormat;

/// A virtual machine, as far as a migration needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Vm {
    /// The VM's display name.
    pub name: String,
    /// The SMBIOS system UUID (8-4-4-4-12, lower case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The VM generation id (Windows uses it to detect clones and restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genid: Option<String>,
    /// Free text describing the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// BIOS or UEFI, and the UEFI variable store.
    #[serde(default)]
    pub firmware: Firmware,
    /// The QEMU machine type (`q35`, `pc`, `pc-q35-8.2`), when the source
    /// names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Virtual CPUs and how they are arranged.
    pub cpu: Cpu,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// What runs inside.
    #[serde(default)]
    pub guest: Guest,
    /// The real-time clock runs in local time (Windows' default) rather
    /// than UTC.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clock_localtime: bool,
    /// Storage controllers, by bus and index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<Controller>,
    /// Disks, CD-ROMs and floppies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// Serial ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serials: Vec<Serial>,
    /// The display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<Graphics>,
    /// A virtual TPM is configured.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tpm: bool,
    /// The source VM is encrypted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted: bool,
    /// Names of the snapshots the source VM has (only its current state
    /// is converted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Firmware.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Firmware {
    /// BIOS or UEFI.
    #[serde(default)]
    pub kind: FirmwareKind,
    /// UEFI Secure Boot is on.
    #[serde(default, skip_serializing_if = "is_false")]
    pub secure_boot: bool,
    /// Where the UEFI variables live (VMware's `.nvram`, libvirt's
    /// `<nvram>`, Proxmox's `efidisk0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efi_vars: Option<DiskRef>,
}

/// BIOS or UEFI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareKind {
    /// Legacy BIOS (SeaBIOS on KVM).
    #[default]
    Bios,
    /// UEFI (OVMF on KVM).
    Uefi,
}

/// Virtual CPUs: `vcpus` = sockets × cores × threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Cpu {
    /// Virtual CPUs in all.
    pub vcpus: u32,
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl Default for Cpu {
    fn default() -> Cpu {
        Cpu {
            vcpus: 1,
            sockets: 1,
            cores: 1,
            threads: 1,
        }
    }
}

impl Cpu {
    /// `vcpus` CPUs as `cores_per_socket`-core sockets (one socket of all
    /// of them when `cores_per_socket` does not divide `vcpus`).
    pub fn with_cores_per_socket(vcpus: u32, cores_per_socket: u32) -> Cpu {
        let cores = if cores_per_socket > 0 && vcpus.is_multiple_of(cores_per_socket) {
            cores_per_socket
        } else {
            vcpus.max(1)
        };
        Cpu {
            vcpus,
            sockets: (vcpus / cores.max(1)).max(1),
            cores,
            threads: 1,
        }
    }
}

/// The guest operating system.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Guest {
    /// Linux, Windows, …
    #[serde(default)]
    pub family: OsFamily,
    /// A version as the source names it (`"2019"`, `"ubuntu-64"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The source's own identifier (VMware `guestOS`, Proxmox `ostype`,
    /// OVF `ostype`), kept for the report and round trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// 64-bit guest.
    #[serde(default = "yes")]
    pub x86_64: bool,
}

fn yes() -> bool {
    true
}

/// Operating-system family: what decides drivers, clock and NIC naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OsFamily {
    /// Linux distributions.
    Linux,
    /// Microsoft Windows.
    Windows,
    /// FreeBSD, OpenBSD, NetBSD.
    Bsd,
    /// Solaris / illumos.
    Solaris,
    /// Anything else, or not stated.
    #[default]
    Other,
}

/// A bus a disk or controller sits on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Bus {
    /// IDE (PIIX).
    Ide,
    /// SATA (AHCI).
    Sata,
    /// SCSI (any controller model).
    #[default]
    Scsi,
    /// NVMe.
    Nvme,
    /// virtio-blk.
    Virtio,
    /// USB mass storage.
    Usb,
    /// Floppy controller.
    Fdc,
}

impl fmt::Display for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bus::Ide => "ide",
            Bus::Sata => "sata",
            Bus::Scsi => "scsi",
            Bus::Nvme => "nvme",
            Bus::Virtio => "virtio",
            Bus::Usb => "usb",
            Bus::Fdc => "fdc",
        })
    }
}

/// A storage controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Controller {
    /// Its bus.
    pub bus: Bus,
    /// Its index among controllers of that bus (`scsi0`, `scsi1`).
    pub index: u32,
    /// The model: VMware's `lsilogic`, `lsisas1068`, `pvscsi`, `buslogic`;
    /// KVM's `virtio-scsi`, `ahci`, `piix3`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What a disk device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A hard disk.
    #[default]
    Disk,
    /// A CD/DVD drive.
    Cdrom,
    /// A floppy drive.
    Floppy,
}

/// A disk, CD-ROM or floppy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Disk {
    /// Disk, CD-ROM or floppy.
    #[serde(default)]
    pub device: DeviceKind,
    /// The bus it is attached to.
    pub bus: Bus,
    /// The controller's index on that bus.
    #[serde(default)]
    pub controller: u32,
    /// The unit (target) on that controller.
    #[serde(default)]
    pub unit: u32,
    /// Where the content comes from; `None` for an empty drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DiskRef>,
    /// The format the descriptor declares for the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Virtual size in bytes, when the descriptor states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Position in the boot order (1 first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// VMware's independent modes (`independent-persistent`,
    /// `independent-nonpersistent`): excluded from snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Shared between VMs (multi-writer).
    #[serde(default, skip_serializing_if = "is_false")]
    pub shared: bool,
    /// Thin-provisioned at the source: `discard` is worth enabling.
    #[serde(default, skip_serializing_if = "is_false")]
    pub thin: bool,
    /// Discard (TRIM/UNMAP) is passed to the image.
    #[serde(default, skip_serializing_if = "is_false")]
    pub discard: bool,
    /// The VM uses `source`, a host block device, as it is (the user's
    /// `--map-device`): nothing is copied.
    #[serde(default, skip_serializing_if = "is_false")]
    pub passthrough: bool,
}

impl Disk {
    /// `bus` `controller`:`unit`, as people write a disk's address.
    pub fn address(&self) -> String {
        format!("{}{}:{}", self.bus, self.controller, self.unit)
    }
}

/// A reference to a disk's content, as the descriptor wrote it. Nothing
/// here has been opened or checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum DiskRef {
    /// A file path, relative to the descriptor's folder or absolute.
    File {
        /// The path as written.
        path: String,
    },
    /// A file on a VMware datastore: `[datastore1] vm/disk.vmdk` or
    /// `/vmfs/volumes/datastore1/vm/disk.vmdk`.
    Datastore {
        /// The datastore's name (or UUID).
        datastore: String,
        /// The path inside the datastore.
        path: String,
    },
    /// A volume of a Proxmox storage: `local-lvm:vm-100-disk-0`.
    Volume {
        /// The storage's id.
        storage: String,
        /// The volume inside it.
        volume: String,
    },
    /// A host device or raw LUN (RDM, passthrough).
    Device {
        /// The device path as written.
        path: String,
    },
}

impl DiskRef {
    /// Classifies a path as VMware writes one: `[ds] path`,
    /// `/vmfs/volumes/ds/path`, a device, or a plain file path.
    pub fn from_vmware_path(text: &str) -> DiskRef {
        let t = text.trim();
        if let Some(rest) = t.strip_prefix('[') {
            if let Some((ds, path)) = rest.split_once(']') {
                return DiskRef::Datastore {
                    datastore: ds.trim().to_string(),
                    path: path.trim().to_string(),
                };
            }
        }
        if let Some(rest) = t.strip_prefix("/vmfs/volumes/") {
            if let Some((ds, path)) = rest.split_once('/') {
                return DiskRef::Datastore {
                    datastore: ds.to_string(),
                    path: path.to_string(),
                };
            }
        }
        if t.starts_with("/dev/") || t.starts_with("/vmfs/devices/") {
            return DiskRef::Device {
                path: t.to_string(),
            };
        }
        DiskRef::File {
            path: t.to_string(),
        }
    }

    /// The last component of the path: the file name a disk keeps when its
    /// folder moves.
    pub fn file_name(&self) -> &str {
        let p = match self {
            DiskRef::File { path } | DiskRef::Device { path } => path,
            DiskRef::Datastore { path, .. } => path,
            DiskRef::Volume { volume, .. } => volume,
        };
        p.rsplit(['/', '\\']).next().unwrap_or(p)
    }
}

impl fmt::Display for DiskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskRef::File { path } | DiskRef::Device { path } => f.write_str(path),
            DiskRef::Datastore { datastore, path } => write!(f, "[{datastore}] {path}"),
            DiskRef::Volume { storage, volume } => write!(f, "{storage}:{volume}"),
        }
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Nic {
    /// The device model: `vmxnet3`, `e1000`, `e1000e`, `vlance`, `virtio`,
    /// `rtl8139`.
    pub model: String,
    /// The MAC address (`xx:xx:xx:xx:xx:xx`, lower case); `None` when the
    /// hypervisor is to generate one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The network it is attached to (VMware port group, libvirt network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The host bridge it is attached to (`vmbr0`, `br0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Connected at power-on.
    #[serde(default = "yes")]
    pub connected: bool,
    /// Position in the boot order (PXE), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// The VLAN its traffic is tagged with on the bridge (802.1Q, 1 to
    /// 4094), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

/// A serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Serial {
    /// Port number (0 = COM1 / ttyS0).
    pub port: u32,
    /// What it is connected to.
    pub kind: SerialKind,
    /// The file, pipe, device or URI, for the kinds that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What a serial port is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialKind {
    /// A pseudo-terminal (the host's console).
    Pty,
    /// Output to a file.
    File,
    /// A named pipe.
    Pipe,
    /// A host serial device.
    Device,
    /// A network socket.
    Network,
}

/// The display.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Graphics {
    /// The remote display protocol (`vnc`, `spice`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The video device model (`vmvga`, `vga`, `qxl`, `virtio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<String>,
    /// Video memory in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_kib: Option<u64>,
}
