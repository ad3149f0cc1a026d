//! Controllers and the devices on them: disks, CD/DVD drives and
//! floppies (through `rasd:Parent`, `AddressOnParent` and `HostResource`),
//! NICs, serial ports and the video card.

use std::collections::{HashMap, HashSet};

use vmshift_model::{
    mac_is_valid, Bus, Controller, DeviceKind, Disk, DiskFormat, DiskRef, Graphics, Nic, Serial,
    SerialKind,
};

use super::item::{host_ref, parse_bool, HostRef, Item};
use super::{Error, Info, Lowering, Warning};
use crate::ovf::OvfFile;

/// A controller an item's `rasd:Parent` can name.
#[derive(Clone, Copy)]
pub(super) struct Ctrl {
    bus: Bus,
    index: u32,
}

impl Lowering {
    /// IDE (5), SCSI (6), SATA/NVMe (20) controllers, by `InstanceID`.
    pub(super) fn controllers(&mut self, items: &[Item<'_>]) -> HashMap<String, Ctrl> {
        let mut by_id = HashMap::new();
        let mut next: HashMap<Bus, u32> = HashMap::new();
        for it in items {
            let sub = it.subtype.clone().unwrap_or_default();
            let lower = sub.to_ascii_lowercase();
            let (bus, model) = match it.resource_type {
                Some(5) => (Bus::Ide, (!sub.is_empty()).then(|| lower.clone())),
                Some(6) => {
                    let model = match lower.as_str() {
                        "lsilogic" => Some("lsilogic".to_string()),
                        "lsilogicsas" | "lsisas1068" => Some("lsisas1068".to_string()),
                        "virtualscsi" | "pvscsi" => Some("pvscsi".to_string()),
                        "buslogic" => Some("buslogic".to_string()),
                        "" => None,
                        _ => {
                            self.add(
                                Warning,
                                "ovf-controller-unknown",
                                it.path(),
                                format!("SCSI controller model '{sub}' is not one vmshift knows; kept as written"),
                            );
                            Some(lower.clone())
                        }
                    };
                    (Bus::Scsi, model)
                }
                Some(20) if lower.contains("nvme") => (Bus::Nvme, Some("nvme".to_string())),
                Some(20)
                    if lower.contains("ahci") || lower.contains("sata") || lower.is_empty() =>
                {
                    (Bus::Sata, Some("ahci".to_string()))
                }
                Some(20) => {
                    self.add(
                        Warning,
                        "ovf-controller-unknown",
                        it.path(),
                        format!("storage controller '{sub}' ({}) is not one vmshift knows; devices on it are skipped", it.label()),
                    );
                    continue;
                }
                _ => continue,
            };
            let index = match it.field("Address").and_then(|a| a.parse::<u32>().ok()) {
                Some(i) => i,
                None => *next.get(&bus).unwrap_or(&0),
            };
            next.insert(
                bus,
                index.saturating_add(1).max(*next.get(&bus).unwrap_or(&0)),
            );
            if self
                .vm
                .controllers
                .iter()
                .any(|c| c.bus == bus && c.index == index)
            {
                self.add(
                    Warning,
                    "ovf-controller-duplicate",
                    it.path(),
                    format!("a second {bus} controller {index}; its devices share the first's"),
                );
            } else {
                self.vm.controllers.push(Controller { bus, index, model });
            }
            by_id.insert(it.instance_id.clone(), Ctrl { bus, index });
        }
        by_id
    }

    /// Every item that is not CPU, memory or a controller.
    pub(super) fn devices(&mut self, items: &[Item<'_>], controllers: &HashMap<String, Ctrl>) {
        let mut used: HashSet<(Bus, u32, u32)> = HashSet::new();
        for it in items {
            match it.resource_type {
                Some(3 | 4 | 5 | 6 | 20) => {}
                Some(14) => self.drive(it, DeviceKind::Floppy, None, &mut used),
                Some(15..=17) => {
                    let kind = if it.resource_type == Some(17) {
                        DeviceKind::Disk
                    } else {
                        DeviceKind::Cdrom
                    };
                    let parent = it.field("Parent");
                    match parent.as_deref().and_then(|p| controllers.get(p)) {
                        Some(c) => self.drive(it, kind, Some(*c), &mut used),
                        None => self.add(
                            Error,
                            "ovf-device-no-controller",
                            it.path(),
                            format!(
                                "{} names controller '{}', which is not an IDE, SCSI, SATA or NVMe controller of this system; the device is skipped",
                                it.label(),
                                parent.as_deref().unwrap_or("(none)")
                            ),
                        ),
                    }
                }
                Some(10) => self.nic(it),
                Some(21) => self.serial(it),
                Some(24) => self.video(it),
                Some(1) if it.subtype.as_deref() == Some("vmware.vtpm") => self.vm.tpm = true,
                Some(1) if it.subtype.as_deref() == Some("vmware.vmci") => self.add(
                    Info,
                    "ovf-item-ignored",
                    it.path(),
                    "the VMCI device is VMware-only and is not carried over",
                ),
                Some(23) => self.add(
                    Info,
                    "ovf-item-ignored",
                    it.path(),
                    format!("{} is not carried over; the new VM gets its own USB controller", it.label()),
                ),
                Some(t @ (1 | 22 | 35)) => self.add(
                    Warning,
                    "ovf-item-ignored",
                    it.path(),
                    format!(
                        "{} ({}) is not carried over",
                        it.label(),
                        match t {
                            22 => "parallel port".to_string(),
                            35 => "sound card".to_string(),
                            _ => it.subtype.clone().unwrap_or_else(|| "other device".into()),
                        }
                    ),
                ),
                Some(t) => self.add(
                    Warning,
                    "ovf-item-unknown",
                    it.path(),
                    format!("{} has ResourceType {t}, which vmshift does not map; it is not carried over", it.label()),
                ),
                None => self.add(
                    Warning,
                    "ovf-item-unknown",
                    it.path(),
                    format!("{} has no numeric ResourceType; it is not carried over", it.label()),
                ),
            }
        }
    }

    /// A disk, CD/DVD drive or floppy.
    fn drive(
        &mut self,
        it: &Item<'_>,
        device: DeviceKind,
        ctrl: Option<Ctrl>,
        used: &mut HashSet<(Bus, u32, u32)>,
    ) {
        let Ctrl { bus, index } = ctrl.unwrap_or(Ctrl {
            bus: Bus::Fdc,
            index: 0,
        });
        let n = self.vm.disks.len();
        let unit = match it
            .field("AddressOnParent")
            .and_then(|a| a.parse::<u32>().ok())
        {
            Some(u) => u,
            None => {
                let u = (0..u32::MAX)
                    .find(|&u| {
                        let reserved = bus == Bus::Scsi && u == 7;
                        !reserved && !used.contains(&(bus, index, u))
                    })
                    .unwrap_or(0);
                if device != DeviceKind::Floppy {
                    self.add(
                        Info,
                        "ovf-device-address-assigned",
                        format!("disks[{n}].unit"),
                        format!("{} has no AddressOnParent; unit {u} is used", it.label()),
                    );
                }
                u
            }
        };
        used.insert((bus, index, unit));
        let mut disk = Disk {
            device,
            bus,
            controller: index,
            unit,
            ..Disk::default()
        };
        let host = it.field("HostResource");
        match host.as_deref().map(host_ref) {
            Some(HostRef::Disk(id)) => self.disk_source(&mut disk, id, &it.path()),
            Some(HostRef::File(id)) => match self.files.get(id).cloned() {
                Some(file) => {
                    disk.source = Some(self.file_source(&file, n));
                    disk.format = (device != DeviceKind::Disk).then_some(DiskFormat::Raw);
                }
                None => self.add(
                    Error,
                    "ovf-disk-reference",
                    format!("disks[{n}].source"),
                    format!(
                        "{} names file '{id}', which References does not list",
                        it.label()
                    ),
                ),
            },
            Some(HostRef::Other) if device != DeviceKind::Disk => {}
            Some(HostRef::Other) => self.add(
                Error,
                "ovf-disk-reference",
                format!("disks[{n}].source"),
                format!(
                    "{}'s HostResource '{}' is not ovf:/disk/… or ovf:/file/…",
                    it.label(),
                    host.as_deref().unwrap_or("")
                ),
            ),
            None if device == DeviceKind::Disk => self.add(
                Error,
                "ovf-disk-reference",
                format!("disks[{n}].source"),
                format!("{} has no HostResource naming its disk", it.label()),
            ),
            None => {}
        }
        self.vm.disks.push(disk);
    }

    /// A disk's content through `DiskSection` and `References`.
    fn disk_source(&mut self, disk: &mut Disk, id: &str, item: &str) {
        let n = self.vm.disks.len();
        let Some(d) = self.disks.get(id).cloned() else {
            self.add(
                Error,
                "ovf-disk-reference",
                format!("disks[{n}].source"),
                format!("{item} names disk '{id}', which DiskSection does not list"),
            );
            return;
        };
        disk.size = d.capacity_bytes();
        if disk.size.is_none() {
            self.add(
                Warning,
                "ovf-disk-capacity",
                format!("disks[{n}].size"),
                format!(
                    "disk '{id}' has capacity '{}' in units '{}', which is not a size vmshift can read",
                    d.capacity,
                    d.capacity_units.as_deref().unwrap_or("byte")
                ),
            );
        }
        disk.format = d.format.as_deref().and_then(disk_format);
        if let (None, Some(uri)) = (disk.format, d.format.as_deref()) {
            self.add(
                Warning,
                "ovf-disk-format-unknown",
                format!("disks[{n}].format"),
                format!("disk '{id}' is in format '{uri}', which vmshift does not know; the content is probed"),
            );
        }
        let Some(file_ref) = d.file_ref.as_deref() else {
            self.add(
                Warning,
                "ovf-disk-no-file",
                format!("disks[{n}].source"),
                format!(
                    "disk '{id}' has no file: the package asks for a new empty disk of {} bytes",
                    disk.size
                        .map_or_else(|| "unknown".into(), |s| s.to_string())
                ),
            );
            return;
        };
        match self.files.get(file_ref).cloned() {
            Some(file) => disk.source = Some(self.file_source(&file, n)),
            None => self.add(
                Error,
                "ovf-disk-reference",
                format!("disks[{n}].source"),
                format!("disk '{id}' names file '{file_ref}', which References does not list"),
            ),
        }
    }

    /// A file of the package as a disk source, with what makes it
    /// unreadable in place.
    fn file_source(&mut self, file: &OvfFile, n: usize) -> DiskRef {
        let path = format!("disks[{n}].source");
        if let Some(c) = &file.compression {
            self.add(
                Error,
                "ovf-file-compressed",
                path.clone(),
                format!("'{}' is stored {c}-compressed, which vmshift does not read; re-export without compression", file.href),
            );
        }
        if file.chunk_size.is_some() {
            self.add(
                Error,
                "ovf-file-chunked",
                path.clone(),
                format!("'{}' is split into chunks, which vmshift does not join; re-export without chunking", file.href),
            );
        }
        if file.href.split_once(':').is_some_and(|(scheme, _)| {
            scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        }) {
            self.add(
                Error,
                "ovf-file-remote",
                path,
                format!(
                    "'{}' is a URL, not a file of the package; download it first",
                    file.href
                ),
            );
        }
        DiskRef::File {
            path: file.href.clone(),
        }
    }

    fn nic(&mut self, it: &Item<'_>) {
        let n = self.vm.nics.len();
        let sub = it.subtype.clone().unwrap_or_default();
        let model = match sub.to_ascii_lowercase().as_str() {
            "e1000" => "e1000".to_string(),
            "e1000e" => "e1000e".to_string(),
            "vmxnet3" => "vmxnet3".to_string(),
            "vmxnet2" => "vmxnet2".to_string(),
            "vmxnet" => "vmxnet".to_string(),
            "pcnet32" => "vlance".to_string(),
            "virtio" | "virtio-net" | "virtionet" => "virtio".to_string(),
            "" => {
                self.add(
                    Warning,
                    "ovf-nic-model",
                    format!("nics[{n}].model"),
                    format!("{} names no adapter model; e1000 is assumed", it.label()),
                );
                "e1000".to_string()
            }
            other => {
                self.add(
                    Warning,
                    "ovf-nic-model",
                    format!("nics[{n}].model"),
                    format!("adapter model '{sub}' is not one vmshift knows; kept as written"),
                );
                other.to_string()
            }
        };
        let mac = it.field("Address").and_then(|a| {
            let m = normalize_mac(&a);
            if m.is_none() {
                self.add(
                    Warning,
                    "ovf-nic-mac-invalid",
                    format!("nics[{n}].mac"),
                    format!("'{a}' is not a MAC address; the new VM gets a new one"),
                );
            }
            m
        });
        self.vm.nics.push(Nic {
            model,
            mac,
            network: it.field("Connection"),
            bridge: None,
            connected: it
                .field("AutomaticAllocation")
                .and_then(|a| parse_bool(&a))
                .unwrap_or(true),
            boot_order: None,
            vlan: None,
        });
    }

    fn serial(&mut self, it: &Item<'_>) {
        let port = self.vm.serials.len() as u32;
        let sub = it.subtype.clone().unwrap_or_default();
        let kind = match sub.to_ascii_lowercase().as_str() {
            "vmware.serialport.device" => SerialKind::Device,
            "vmware.serialport.file" => SerialKind::File,
            "vmware.serialport.pipe" => SerialKind::Pipe,
            "vmware.serialport.uri" => SerialKind::Network,
            _ => {
                self.add(
                    Warning,
                    "ovf-serial-unknown",
                    format!("serials[{port}].kind"),
                    format!("{} has backing '{sub}', which vmshift does not know; it becomes a pseudo-terminal", it.label()),
                );
                SerialKind::Pty
            }
        };
        let target = it.field("HostResource").or_else(|| it.field("Connection"));
        self.vm.serials.push(Serial { port, kind, target });
    }

    fn video(&mut self, it: &Item<'_>) {
        self.vm.graphics = Some(Graphics {
            protocol: None,
            video: Some("vmvga".to_string()),
            vram_kib: it
                .setting("videoRamSizeInKB")
                .and_then(|v| v.trim().parse().ok()),
        });
    }
}

/// The disk format an `ovf:format` URI names.
fn disk_format(uri: &str) -> Option<DiskFormat> {
    let l = uri.to_ascii_lowercase();
    if l.contains("vmdk") {
        Some(DiskFormat::Vmdk)
    } else if l.contains("qcow") {
        Some(DiskFormat::Qcow2)
    } else if l.contains("wiki/byte") || l.ends_with("#raw") || l.ends_with("/raw") {
        Some(DiskFormat::Raw)
    } else {
        None
    }
}

/// A MAC written with `:` or `-`, as the model spells it.
fn normalize_mac(s: &str) -> Option<String> {
    let m = s.trim().replace('-', ":").to_ascii_lowercase();
    mac_is_valid(&m).then_some(m)
}
