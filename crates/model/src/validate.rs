//! Semantic checks of a [`Vm`]: pure functions of the model, no I/O.
//!
//! Each problem is a [`Finding`] with a severity, a stable code (scripts may
//! match on it) and the path of the field at fault (`nics[1].mac`). Checks
//! that need the files — a disk missing, content not in its declared
//! format — are made where the I/O is and report in the same shape.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::vm::{Bus, DeviceKind, DiskRef, FirmwareKind, Vm};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Worth knowing; nothing is wrong.
    Info,
    /// The result may not behave like the source.
    Warning,
    /// The VM cannot be converted (or run) as described.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One problem found in a VM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// A stable identifier (`mac-duplicate`).
    pub code: String,
    /// The field at fault (`nics[1].mac`), in the model's terms.
    pub path: String,
    /// What is wrong, for people.
    pub message: String,
}

impl Finding {
    /// A finding.
    pub fn new(
        severity: Severity,
        code: &str,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            code: code.to_string(),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] {}: {}",
            self.severity, self.code, self.path, self.message
        )
    }
}

/// Whether `mac` is six colon-separated hex octets.
pub fn mac_is_valid(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether `uuid` is 32 hex digits in the 8-4-4-4-12 form.
pub fn uuid_is_valid(uuid: &str) -> bool {
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// 32 hex digits, with any spaces and dashes between them (VMware writes
/// `"56 4d 9e 0f 7a 0a 3c 4b-a2 9e 1f 3b 8e 6b 2a 1c"`), as a UUID in the
/// usual lower-case 8-4-4-4-12 form; `None` when it is not 16 bytes of hex.
pub fn uuid_from_hex(text: &str) -> Option<String> {
    let hex: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| {
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    })
}

/// The most memory a VM may have: 16 TiB (QEMU's x86 limit is lower on
/// most hosts; more is certainly a damaged descriptor).
const MAX_MEMORY_MIB: u64 = 16 << 20;
/// The most vCPUs a VM may have (KVM's KVM_MAX_VCPUS on x86 is 4096).
const MAX_VCPUS: u32 = 4096;

/// SCSI controller models OVMF has no boot driver for.
const UEFI_UNBOOTABLE_SCSI: &[&str] = &["lsilogic", "lsisas1068", "buslogic"];

impl Vm {
    /// Every problem in the description, most severe first.
    pub fn validate(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut add =
            |s, code, path: String, msg: String| out.push(Finding::new(s, code, path, msg));
        use Severity::{Error, Info, Warning};

        if self.name.trim().is_empty() {
            add(
                Error,
                "name-empty",
                "name".into(),
                "the VM has no name".into(),
            );
        }
        if let Some(u) = &self.uuid {
            if !uuid_is_valid(u) {
                add(
                    Error,
                    "uuid-invalid",
                    "uuid".into(),
                    format!("'{u}' is not a UUID"),
                );
            }
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            add(
                Error,
                "memory-too-large",
                "memory-mib".into(),
                format!(
                    "{} MiB is more than the {} TiB a KVM guest can have",
                    self.memory_mib,
                    MAX_MEMORY_MIB >> 20
                ),
            );
        }
        if self.cpu.vcpus > MAX_VCPUS {
            add(
                Error,
                "vcpus-too-many",
                "cpu.vcpus".into(),
                format!(
                    "{} vCPUs is more than the {MAX_VCPUS} a KVM guest can have",
                    self.cpu.vcpus
                ),
            );
        }
        if self.memory_mib == 0 {
            add(
                Error,
                "memory-zero",
                "memory-mib".into(),
                "the VM has no memory".into(),
            );
        }
        let c = &self.cpu;
        if c.vcpus == 0 {
            add(
                Error,
                "vcpus-zero",
                "cpu.vcpus".into(),
                "the VM has no virtual CPU".into(),
            );
        } else if u64::from(c.sockets)
            .checked_mul(u64::from(c.cores))
            .and_then(|x| x.checked_mul(u64::from(c.threads)))
            != Some(u64::from(c.vcpus))
        {
            add(
                Error,
                "cpu-topology-mismatch",
                "cpu".into(),
                format!(
                    "{} sockets × {} cores × {} threads is not {} vCPUs",
                    c.sockets, c.cores, c.threads, c.vcpus
                ),
            );
        }

        // Firmware.
        let uefi = self.firmware.kind == FirmwareKind::Uefi;
        if self.firmware.secure_boot && !uefi {
            add(
                Error,
                "secure-boot-without-uefi",
                "firmware.secure-boot".into(),
                "Secure Boot needs UEFI firmware".into(),
            );
        }
        if uefi && self.firmware.efi_vars.is_none() {
            add(
                Warning,
                "uefi-no-varstore",
                "firmware.efi-vars".into(),
                "UEFI without an EFI variable store: boot entries start empty, and the firmware falls back to the default boot path".into(),
            );
        }

        // NICs: valid, unique MACs.
        let mut macs: HashMap<String, usize> = HashMap::new();
        for (i, n) in self.nics.iter().enumerate() {
            if let Some(tag) = n.vlan.filter(|t| !(1..=4094).contains(t)) {
                add(
                    Error,
                    "vlan-invalid",
                    format!("nics[{i}].vlan"),
                    format!("VLAN {tag} is not a VLAN tag (1 to 4094)"),
                );
            }
            let Some(mac) = &n.mac else { continue };
            let path = format!("nics[{i}].mac");
            if !mac_is_valid(mac) {
                add(
                    Error,
                    "mac-invalid",
                    path,
                    format!("'{mac}' is not a MAC address"),
                );
                continue;
            }
            let first = u8::from_str_radix(&mac[0..2], 16).unwrap_or(0);
            if first & 1 != 0 {
                add(
                    Error,
                    "mac-invalid",
                    path.clone(),
                    format!("'{mac}' is a multicast address, which no NIC may have"),
                );
            }
            if let Some(j) = macs.insert(mac.to_ascii_lowercase(), i) {
                add(
                    Error,
                    "mac-duplicate",
                    path,
                    format!("'{mac}' is also the MAC of nics[{j}]"),
                );
            }
        }

        // Disks: one per address, sources present, boot order unique.
        let mut addresses: HashMap<(Bus, u32, u32), usize> = HashMap::new();
        let mut orders: HashMap<u32, String> = HashMap::new();
        for (i, d) in self.disks.iter().enumerate() {
            let path = format!("disks[{i}]");
            if let Some(j) = addresses.insert((d.bus, d.controller, d.unit), i) {
                add(
                    Error,
                    "disk-address-conflict",
                    path.clone(),
                    format!("disks[{j}] is also at {}", d.address()),
                );
            }
            if d.device == DeviceKind::Disk && d.source.is_none() {
                add(
                    Error,
                    "disk-no-source",
                    format!("{path}.source"),
                    format!("the disk at {} has no image", d.address()),
                );
            }
            match &d.source {
                Some(DiskRef::Device { path: dev }) if !d.passthrough => add(
                    Error,
                    "raw-device-mapping",
                    format!("{path}.source"),
                    format!(
                        "the disk at {a} maps the host device or LUN '{dev}', which is not an image to convert; --skip-device {a} leaves it out, --map-device {a}=/dev/… gives the new VM a host block device in its place",
                        a = d.address()
                    ),
                ),
                Some(DiskRef::Device { .. }) => {}
                _ if d.passthrough => add(
                    Error,
                    "passthrough-not-device",
                    format!("{path}.passthrough"),
                    format!("the disk at {} is marked as a host device but names none", d.address()),
                ),
                _ => {}
            }
            if let Some(mode) = d.mode.as_deref().filter(|m| m.starts_with("independent")) {
                add(
                    Info,
                    "independent-disk",
                    format!("{path}.mode"),
                    format!("the disk at {} is {mode}: snapshots never included it; KVM has no such mode", d.address()),
                );
            }
            if d.shared {
                add(
                    Warning,
                    "shared-disk",
                    format!("{path}.shared"),
                    format!(
                        "the disk at {} is shared with other VMs; a copy is no longer shared",
                        d.address()
                    ),
                );
            }
            if let Some(o) = d.boot_order {
                if let Some(other) = orders.insert(o, path.clone()) {
                    add(
                        Error,
                        "boot-order-duplicate",
                        format!("{path}.boot-order"),
                        format!("{other} also boots as number {o}"),
                    );
                }
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            if let Some(o) = n.boot_order {
                if let Some(other) = orders.insert(o, format!("nics[{i}]")) {
                    add(
                        Error,
                        "boot-order-duplicate",
                        format!("nics[{i}].boot-order"),
                        format!("{other} also boots as number {o}"),
                    );
                }
            }
        }
        // What KVM cannot carry over.
        if self.tpm {
            add(
                Warning,
                "vtpm",
                "tpm".into(),
                "the VM has a virtual TPM; its secrets (BitLocker keys, measured boot) do not move with it".into(),
            );
        }
        if self.encrypted {
            add(
                Error,
                "encrypted-vm",
                "encrypted".into(),
                "the VM is encrypted; decrypt it in VMware before converting".into(),
            );
        }
        if !self.snapshots.is_empty() {
            add(
                Info,
                "snapshots-present",
                "snapshots".into(),
                format!(
                    "the VM has {} snapshot(s) ({}); only its current state is converted",
                    self.snapshots.len(),
                    self.snapshots.join(", ")
                ),
            );
        }
        out.sort_by_key(|f| std::cmp::Reverse(f.severity));
        out
    }

    /// Findings about the VM as a KVM guest (run on a converted model):
    /// a boot disk on a controller OVMF cannot boot from, or on USB.
    pub fn target_findings(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut add =
            |s, code, path: String, msg: String| out.push(Finding::new(s, code, path, msg));
        use Severity::{Error, Warning};
        let uefi = self.firmware.kind == FirmwareKind::Uefi;
        if let Some((i, d)) = self.boot_disk() {
            let model = self
                .controllers
                .iter()
                .find(|c| c.bus == d.bus && c.index == d.controller)
                .and_then(|c| c.model.as_deref());
            match (d.bus, model) {
                (Bus::Scsi, Some(m)) if uefi && UEFI_UNBOOTABLE_SCSI.contains(&m) => add(
                    Error,
                    "boot-disk-bus",
                    format!("disks[{i}].bus"),
                    format!("the boot disk is on a {m} SCSI controller, which UEFI firmware (OVMF) cannot boot from; use virtio-scsi, SATA or virtio"),
                ),
                (Bus::Usb, _) => add(
                    Warning,
                    "boot-disk-bus",
                    format!("disks[{i}].bus"),
                    "the boot disk is a USB disk; firmware may not boot from it".into(),
                ),
                _ => {}
            }
        }

        out
    }

    /// The disk the VM boots from: the disk (not CD-ROM) with the lowest
    /// boot order, or the first disk when none has one.
    pub fn boot_disk(&self) -> Option<(usize, &crate::vm::Disk)> {
        let disks = self
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.device == DeviceKind::Disk);
        disks
            .clone()
            .filter(|(_, d)| d.boot_order.is_some())
            .min_by_key(|(_, d)| d.boot_order)
            .or_else(|| disks.clone().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{Controller, Cpu, Disk, Nic};

    fn vm() -> Vm {
        Vm {
            name: "t".into(),
            memory_mib: 1024,
            cpu: Cpu::default(),
            disks: vec![Disk {
                bus: Bus::Scsi,
                source: Some(DiskRef::File {
                    path: "a.vmdk".into(),
                }),
                ..Disk::default()
            }],
            controllers: vec![Controller {
                bus: Bus::Scsi,
                index: 0,
                model: Some("lsilogic".into()),
            }],
            ..Vm::default()
        }
    }

    fn codes(v: &Vm) -> Vec<String> {
        v.validate().into_iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_plain_vm_has_no_findings() {
        assert!(codes(&vm()).is_empty(), "{:?}", vm().validate());
    }

    #[test]
    fn each_check_reports_its_code_and_field() {
        let mut v = vm();
        v.memory_mib = 0;
        v.cpu = Cpu {
            vcpus: 4,
            sockets: 1,
            cores: 2,
            threads: 1,
        };
        v.nics = vec![
            Nic {
                model: "e1000".into(),
                mac: Some("00:50:56:01:02:03".into()),
                ..Nic::default()
            },
            Nic {
                model: "e1000".into(),
                mac: Some("00:50:56:01:02:03".into()),
                ..Nic::default()
            },
            Nic {
                model: "e1000".into(),
                mac: Some("00:50:56:01:02".into()),
                ..Nic::default()
            },
            Nic {
                model: "e1000".into(),
                mac: Some("01:50:56:01:02:04".into()),
                ..Nic::default()
            },
        ];
        v.disks.push(v.disks[0].clone());
        v.firmware.kind = FirmwareKind::Uefi;
        let f = v.validate();
        let has = |code: &str, path: &str| f.iter().any(|x| x.code == code && x.path == path);
        assert!(has("memory-zero", "memory-mib"), "{f:?}");
        assert!(has("cpu-topology-mismatch", "cpu"));
        assert!(has("mac-duplicate", "nics[1].mac"));
        assert!(has("mac-invalid", "nics[2].mac"));
        assert!(has("mac-invalid", "nics[3].mac"));
        assert!(has("disk-address-conflict", "disks[1]"));
        assert!(has("uefi-no-varstore", "firmware.efi-vars"));
        assert!(
            !has("boot-disk-bus", "disks[0].bus"),
            "a source VM's own firmware boots it"
        );
        assert!(v
            .target_findings()
            .iter()
            .any(|x| x.code == "boot-disk-bus" && x.path == "disks[0].bus"));
        assert_eq!(f[0].severity, Severity::Error);
        assert_eq!(f.last().unwrap().severity, Severity::Warning);
    }

    #[test]
    fn uuids_from_vmware_spelling() {
        assert_eq!(
            uuid_from_hex("60 00 C2 97 ee 00 4e ed-cb 09 ab 10 91 3f 7f 99").as_deref(),
            Some("6000c297-ee00-4eed-cb09-ab10913f7f99")
        );
        assert_eq!(uuid_from_hex("60 00 C2 97"), None);
        assert_eq!(uuid_from_hex("zz00c297ee004eedcb09ab10913f7f99"), None);
    }

    #[test]
    fn datastore_paths_are_recognised() {
        assert_eq!(
            DiskRef::from_vmware_path("[datastore1] vm/vm.vmdk"),
            DiskRef::Datastore {
                datastore: "datastore1".into(),
                path: "vm/vm.vmdk".into()
            }
        );
        assert_eq!(
            DiskRef::from_vmware_path("/vmfs/volumes/ds2/vm/a.vmdk"),
            DiskRef::Datastore {
                datastore: "ds2".into(),
                path: "vm/a.vmdk".into()
            }
        );
        assert_eq!(DiskRef::from_vmware_path("a.vmdk").file_name(), "a.vmdk");
    }
}
