//! Lowering a virtual system to the model.
//!
//! Hardware comes from the `VirtualHardwareSection`'s items, by CIM
//! `ResourceType`: 3 CPU, 4 memory, 5 IDE, 6 SCSI, 20 SATA/NVMe, 10 NIC,
//! 14 floppy, 15/16 CD/DVD, 17 disk, 21 serial, 24 video. Devices find
//! their controller through `rasd:Parent` (the controller's `InstanceID`)
//! and their unit through `rasd:AddressOnParent`; disks find their file
//! through `ovf:/disk/<diskId>` → `DiskSection` → `References`. VMware's
//! `vmw:Config` and `vmw:ExtraConfig` give firmware, Secure Boot and the
//! NVRAM file. Anything not carried over is a finding with an `ovf-` code.

mod devices;
mod item;

use std::collections::HashMap;

use vmshift_model::{Cpu, DiskRef, Finding, FirmwareKind, OsFamily, Severity, Vm};

use super::{guest, units, Element, OvfDisk, OvfDocument, OvfFile, NS_VMW};
use crate::Lowered;
use item::{host_ref, key_value, parse_bool, selected, HostRef, Item};

use Severity::{Error, Info, Warning};

impl OvfDocument {
    /// The first virtual system as a [`Vm`], with what lowering noticed.
    /// A descriptor of several systems (a `VirtualSystemCollection`) gets
    /// a finding naming the others; [`OvfDocument::lower_system`] lowers
    /// any of them.
    pub fn lower(&self) -> Lowered {
        let systems = self.system_elements();
        let Some(first) = systems.first() else {
            return Lowered {
                vm: Vm::default(),
                findings: vec![Finding::new(
                    Error,
                    "ovf-no-virtual-system",
                    "ovf:VirtualSystem",
                    "the descriptor describes no virtual machine",
                )],
            };
        };
        let mut lowered = self.lower_element(first);
        if systems.len() > 1 {
            let ids = self.virtual_systems();
            lowered.findings.insert(
                0,
                Finding::new(
                    Warning,
                    "ovf-multiple-virtual-systems",
                    "ovf:VirtualSystemCollection",
                    format!(
                        "the descriptor holds {} virtual machines ({}); only the first, '{}', is lowered",
                        ids.len(),
                        ids.join(", "),
                        ids[0]
                    ),
                ),
            );
        }
        lowered
    }

    /// The virtual system whose `ovf:id` is `id`, lowered; `None` when
    /// there is none.
    pub fn lower_system(&self, id: &str) -> Option<Lowered> {
        let ns = self.ns();
        let vs = self
            .system_elements()
            .into_iter()
            .find(|vs| vs.get_ns_or_unprefixed(ns, "id") == Some(id))?;
        Some(self.lower_element(vs))
    }

    fn lower_element(&self, vs: &Element) -> Lowered {
        let mut cx = Lowering {
            ns: self.ns(),
            files: self
                .files()
                .into_iter()
                .map(|f| (f.id.clone(), f))
                .collect(),
            disks: self
                .disks()
                .into_iter()
                .map(|d| (d.disk_id.clone(), d))
                .collect(),
            vm: Vm::default(),
            f: Vec::new(),
        };
        cx.identity(vs);
        cx.guest(vs);
        if let Some(hw) = cx.hardware_section(vs) {
            let config = cx.deployment_option(self.root());
            let items: Vec<Item<'_>> = hw
                .elements()
                .filter(|e| {
                    e.namespace.as_deref() == Some(cx.ns)
                        && matches!(e.local(), "Item" | "StorageItem" | "EthernetPortItem")
                })
                .filter(|e| selected(e, cx.ns, config.as_deref()))
                .map(Item::new)
                .collect();
            cx.system(hw);
            cx.cpu_and_memory(&items);
            let controllers = cx.controllers(&items);
            cx.devices(&items, &controllers);
            cx.settings(hw);
        } else {
            cx.f.push(Finding::new(
                Error,
                "ovf-no-hardware",
                "ovf:VirtualHardwareSection",
                "the virtual system has no VirtualHardwareSection: CPU, memory and devices are unknown",
            ));
        }
        cx.vm.controllers.sort_by_key(|c| (c.bus, c.index));
        Lowered {
            vm: cx.vm,
            findings: cx.f,
        }
    }
}

struct Lowering {
    ns: &'static str,
    files: HashMap<String, OvfFile>,
    disks: HashMap<String, OvfDisk>,
    vm: Vm,
    f: Vec<Finding>,
}

impl Lowering {
    fn add(&mut self, s: Severity, code: &str, path: impl Into<String>, msg: impl Into<String>) {
        self.f.push(Finding::new(s, code, path, msg));
    }

    /// Name and description.
    fn identity(&mut self, vs: &Element) {
        let ns = self.ns;
        self.vm.name = vs
            .first_ns(ns, "Name")
            .map(Element::own_text)
            .filter(|n| !n.is_empty())
            .or_else(|| vs.get_ns_or_unprefixed(ns, "id").map(str::to_string))
            .unwrap_or_default();
        self.vm.description = vs
            .all_ns(ns, "AnnotationSection")
            .filter_map(|a| a.first_ns(ns, "Annotation"))
            .map(Element::own_text)
            .find(|t| !t.is_empty());
        if let Some(p) = vs.all_ns(ns, "ProductSection").find(|p| {
            p.elements()
                .any(|e| e.is(ns, "Property") || e.is(ns, "Category"))
        }) {
            let keys: Vec<&str> = p
                .all_ns(ns, "Property")
                .filter_map(|e| e.get_ns_or_unprefixed(ns, "key"))
                .collect();
            self.add(
                Info,
                "ovf-product-properties",
                "ovf:ProductSection",
                format!(
                    "the appliance's deployment properties ({}) are not carried over; set them in the guest",
                    keys.join(", ")
                ),
            );
        }
        if vs.first_ns(ns, "EulaSection").is_some() {
            self.add(
                Info,
                "ovf-eula",
                "ovf:EulaSection",
                "the package carries a license agreement, which is not shown",
            );
        }
    }

    fn guest(&mut self, vs: &Element) {
        let ns = self.ns;
        let Some(os) = vs.first_ns(ns, "OperatingSystemSection") else {
            self.add(
                Info,
                "ovf-os-unknown",
                "guest",
                "the descriptor does not say which operating system the guest runs",
            );
            return;
        };
        let cim = os
            .get_ns_or_unprefixed(ns, "id")
            .and_then(|i| i.trim().parse::<u16>().ok());
        let vmw = os.get_ns(NS_VMW, "osType").filter(|t| !t.is_empty());
        let (g, known) = guest::guest(cim, vmw);
        if !known {
            self.add(
                Info,
                "ovf-os-unknown",
                "guest",
                format!(
                    "operating system type {} / '{}' is not one vmshift knows; the guest is treated as '{:?}'",
                    os.get_ns_or_unprefixed(ns, "id").unwrap_or("(none)"),
                    vmw.unwrap_or(""),
                    g.family
                ),
            );
        }
        self.vm.clock_localtime = g.family == OsFamily::Windows;
        self.vm.guest = g;
    }

    /// The hardware section to read: the first, or the first for VMware
    /// (`vmx-NN`) when there are several for different platforms.
    fn hardware_section<'e>(&mut self, vs: &'e Element) -> Option<&'e Element> {
        let ns = self.ns;
        let all: Vec<&Element> = vs.all_ns(ns, "VirtualHardwareSection").collect();
        let kind = |hw: &Element| {
            hw.first_ns(ns, "System")
                .and_then(|s| s.first_ns(super::NS_VSSD, "VirtualSystemType"))
                .map(Element::own_text)
                .unwrap_or_default()
        };
        let chosen = all
            .iter()
            .copied()
            .find(|hw| kind(hw).contains("vmx-"))
            .or_else(|| all.first().copied())?;
        if all.len() > 1 {
            self.add(
                Info,
                "ovf-hardware-section-alternative",
                "ovf:VirtualHardwareSection",
                format!(
                    "{} hardware sections; the one for '{}' is used",
                    all.len(),
                    kind(chosen)
                ),
            );
        }
        Some(chosen)
    }

    /// The deployment option in force: the default one, else the first.
    fn deployment_option(&mut self, root: &Element) -> Option<String> {
        let ns = self.ns;
        let sec = root.first_ns(ns, "DeploymentOptionSection")?;
        let configs: Vec<&Element> = sec.all_ns(ns, "Configuration").collect();
        let chosen = configs
            .iter()
            .find(|c| c.get_ns_or_unprefixed(ns, "default").and_then(parse_bool) == Some(true))
            .or_else(|| configs.first())?;
        let id = chosen.get_ns_or_unprefixed(ns, "id")?.to_string();
        if configs.len() > 1 {
            let ids: Vec<&str> = configs
                .iter()
                .filter_map(|c| c.get_ns_or_unprefixed(ns, "id"))
                .collect();
            self.add(
                Info,
                "ovf-deployment-option",
                "ovf:DeploymentOptionSection",
                format!(
                    "deployment options {}; '{id}' (the default) is used",
                    ids.join(", ")
                ),
            );
        }
        Some(id)
    }

    /// `vssd:` system data: the VMware hardware version, and the name
    /// when the system has none of its own.
    fn system(&mut self, hw: &Element) {
        let Some(sys) = hw.first_ns(self.ns, "System") else {
            return;
        };
        let vssd = |local: &str| {
            sys.first_ns(super::NS_VSSD, local)
                .map(Element::own_text)
                .filter(|t| !t.is_empty())
        };
        if self.vm.name.is_empty() {
            self.vm.name = vssd("VirtualSystemIdentifier").unwrap_or_default();
        }
        if let Some(t) = vssd("VirtualSystemType") {
            self.add(
                Info,
                "ovf-hardware-version",
                "ovf:System/vssd:VirtualSystemType",
                format!("exported as virtual hardware '{t}'"),
            );
        }
    }

    fn cpu_and_memory(&mut self, items: &[Item<'_>]) {
        let cpu = items.iter().find(|i| i.resource_type == Some(3));
        match cpu.and_then(|i| i.field("VirtualQuantity").map(|q| (i, q))) {
            Some((item, q)) => match q.parse::<u32>() {
                Ok(vcpus) => {
                    let per = item
                        .el
                        .first_ns(NS_VMW, "CoresPerSocket")
                        .map(Element::own_text)
                        .and_then(|t| t.parse::<u32>().ok())
                        .unwrap_or(1);
                    self.vm.cpu = Cpu::with_cores_per_socket(vcpus, per);
                    if per > 1 && self.vm.cpu.cores != per {
                        self.add(
                            Warning,
                            "ovf-cpu-topology",
                            "cpu",
                            format!("{vcpus} vCPUs do not divide into sockets of {per} cores; one socket of {vcpus} cores is used"),
                        );
                    }
                }
                Err(_) => self.add(
                    Warning,
                    "ovf-cpu-missing",
                    "cpu.vcpus",
                    format!("CPU quantity '{q}' is not a number; 1 vCPU is assumed"),
                ),
            },
            None => self.add(
                Warning,
                "ovf-cpu-missing",
                "cpu.vcpus",
                "no CPU item with a VirtualQuantity; 1 vCPU is assumed",
            ),
        }

        let Some(mem) = items.iter().find(|i| i.resource_type == Some(4)) else {
            self.add(
                Warning,
                "ovf-memory-missing",
                "memory-mib",
                "no memory item: the VM's memory size is unknown",
            );
            return;
        };
        let q = mem.field("VirtualQuantity").unwrap_or_default();
        let units = mem
            .field("AllocationUnits")
            .unwrap_or_else(|| "byte * 2^20".into());
        match units::bytes(&q, Some(&units)) {
            Some(b) => {
                self.vm.memory_mib = b.div_ceil(1 << 20);
                if b % (1 << 20) != 0 {
                    self.add(
                        Warning,
                        "ovf-memory-units",
                        "memory-mib",
                        format!(
                            "{q} × '{units}' is not a whole number of MiB; rounded up to {} MiB",
                            self.vm.memory_mib
                        ),
                    );
                }
            }
            None => self.add(
                Warning,
                "ovf-memory-units",
                "memory-mib",
                format!("memory '{q}' in units '{units}' is not a size vmshift can read"),
            ),
        }
    }

    /// VM-wide `vmw:Config` and `vmw:ExtraConfig` settings.
    fn settings(&mut self, hw: &Element) {
        let pairs: Vec<(String, String)> = hw
            .elements()
            .filter(|e| e.is(NS_VMW, "Config") || e.is(NS_VMW, "ExtraConfig"))
            .filter_map(key_value)
            .collect();
        let mut nvram = None;
        let mut ignored = Vec::new();
        for (k, v) in &pairs {
            match k.to_ascii_lowercase().as_str() {
                "firmware" => match v.to_ascii_lowercase().as_str() {
                    "efi" => self.vm.firmware.kind = FirmwareKind::Uefi,
                    "bios" => self.vm.firmware.kind = FirmwareKind::Bios,
                    _ => self.add(
                        Warning,
                        "ovf-firmware-unknown",
                        "firmware.kind",
                        format!("firmware '{v}' is neither efi nor bios; BIOS is assumed"),
                    ),
                },
                "bootoptions.efisecurebootenabled" | "uefi.secureboot.enabled" => {
                    self.vm.firmware.secure_boot = parse_bool(v).unwrap_or(false)
                }
                "nvram" => nvram = Some(v.clone()),
                "uuid.bios" => match vmshift_model::uuid_from_hex(v) {
                    Some(u) => self.vm.uuid = Some(u),
                    None => self.add(
                        Warning,
                        "ovf-uuid-invalid",
                        "uuid",
                        format!(
                            "uuid.bios '{v}' is not 16 hex bytes; the UUID is not carried over"
                        ),
                    ),
                },
                _ => ignored.push(format!("{k}={v}")),
            }
        }
        match (nvram, self.vm.firmware.kind) {
            (Some(v), FirmwareKind::Uefi) => {
                self.vm.firmware.efi_vars = match host_ref(&v) {
                    HostRef::File(id) => match self.files.get(id) {
                        Some(file) => Some(DiskRef::File {
                            path: file.href.clone(),
                        }),
                        None => {
                            self.add(
                                Warning,
                                "ovf-file-reference",
                                "firmware.efi-vars",
                                format!("the NVRAM names file '{id}', which References does not list; UEFI variables start empty"),
                            );
                            None
                        }
                    },
                    _ => Some(DiskRef::from_vmware_path(&v)),
                };
            }
            (Some(v), FirmwareKind::Bios) => ignored.push(format!("nvram={v}")),
            (None, _) => {}
        }
        if !ignored.is_empty() {
            self.add(
                Info,
                "ovf-config-ignored",
                "ovf:VirtualHardwareSection",
                format!(
                    "VMware settings with no counterpart in the model, not carried over: {}",
                    ignored.join(", ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use vmshift_model::{
        Bus, Controller, DeviceKind, Disk, DiskFormat, Firmware, Graphics, Guest, Nic, Serial,
        SerialKind,
    };

    use super::*;

    const LINUX_OVF: &str = include_str!("../../../../fixtures/vms/ovf/linux.ovf");

    fn lower(text: &str) -> Lowered {
        OvfDocument::parse(text.as_bytes()).unwrap().lower()
    }

    fn codes(l: &Lowered) -> Vec<&str> {
        l.findings.iter().map(|f| f.code.as_str()).collect()
    }

    #[test]
    fn ovftool_linux_export_lowers_to_the_expected_vm() {
        let l = lower(LINUX_OVF);
        let expected = Vm {
            name: "linux".into(),
            description: Some("Ubuntu 22.04 web server (nginx), owner: ops".into()),
            firmware: Firmware {
                kind: FirmwareKind::Uefi,
                secure_boot: false,
                efi_vars: Some(DiskRef::File {
                    path: "linux-file1.nvram".into(),
                }),
            },
            cpu: Cpu {
                vcpus: 2,
                sockets: 1,
                cores: 2,
                threads: 1,
            },
            memory_mib: 2048,
            guest: Guest {
                family: OsFamily::Linux,
                version: Some("ubuntu".into()),
                source_id: Some("ubuntu64Guest".into()),
                x86_64: true,
            },
            controllers: vec![
                Controller {
                    bus: Bus::Ide,
                    index: 0,
                    model: None,
                },
                Controller {
                    bus: Bus::Ide,
                    index: 1,
                    model: None,
                },
                Controller {
                    bus: Bus::Scsi,
                    index: 0,
                    model: Some("lsilogic".into()),
                },
            ],
            disks: vec![
                Disk {
                    device: DeviceKind::Cdrom,
                    bus: Bus::Ide,
                    controller: 1,
                    unit: 0,
                    ..Disk::default()
                },
                Disk {
                    device: DeviceKind::Disk,
                    bus: Bus::Scsi,
                    controller: 0,
                    unit: 0,
                    source: Some(DiskRef::File {
                        path: "linux-disk1.vmdk".into(),
                    }),
                    format: Some(DiskFormat::Vmdk),
                    size: Some(16 << 30),
                    ..Disk::default()
                },
            ],
            nics: vec![Nic {
                model: "e1000".into(),
                mac: Some("00:50:56:3a:12:34".into()),
                network: Some("VM Network".into()),
                bridge: None,
                connected: true,
                boot_order: None,
                vlan: None,
            }],
            graphics: Some(Graphics {
                protocol: None,
                video: Some("vmvga".into()),
                vram_kib: Some(8192),
            }),
            ..Vm::default()
        };
        assert_eq!(l.vm, expected);
        assert_eq!(
            codes(&l),
            [
                "ovf-hardware-version",
                "ovf-item-ignored",
                "ovf-config-ignored"
            ],
            "{:#?}",
            l.findings
        );
        let ignored = &l.findings[2].message;
        assert!(ignored.contains("cpuHotAddEnabled=false"), "{ignored}");
        assert!(!ignored.contains("firmware"), "{ignored}");
        // Kept as it is, the VM would not boot under OVMF.
        assert!(l
            .vm
            .target_findings()
            .iter()
            .any(|f| f.code == "boot-disk-bus"));
    }

    #[test]
    fn ovf2_storage_and_ethernet_port_items_lower() {
        let text = r#"<?xml version="1.0"?>
<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2"
  xmlns:vmw="http://www.vmware.com/schema/ovf"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
  xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData">
  <ovf:References><ovf:File ovf:id="f1" ovf:href="win-disk1.vmdk"/></ovf:References>
  <ovf:DiskSection><ovf:Info/>
    <ovf:Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="64424509440"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <ovf:Disk ovf:diskId="d2" ovf:capacity="10" ovf:capacityAllocationUnits="byte * 2^30"/>
  </ovf:DiskSection>
  <ovf:DeploymentOptionSection>
    <ovf:Configuration ovf:id="small"><ovf:Label>Small</ovf:Label></ovf:Configuration>
    <ovf:Configuration ovf:id="large" ovf:default="true"><ovf:Label>Large</ovf:Label></ovf:Configuration>
  </ovf:DeploymentOptionSection>
  <ovf:VirtualSystem ovf:id="winsrv">
    <ovf:OperatingSystemSection ovf:id="1" vmw:osType="windows2019srv_64Guest"/>
    <ovf:VirtualHardwareSection>
      <ovf:Item ovf:configuration="small"><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></ovf:Item>
      <ovf:Item ovf:configuration="large"><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>6</rasd:VirtualQuantity><vmw:CoresPerSocket>4</vmw:CoresPerSocket></ovf:Item>
      <ovf:Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:VirtualQuantity>8192</rasd:VirtualQuantity></ovf:Item>
      <ovf:Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>20</rasd:ResourceType><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType><rasd:Address>0</rasd:Address></ovf:Item>
      <ovf:Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>20</rasd:ResourceType><rasd:ResourceSubType>vmware.nvme.controller</rasd:ResourceSubType></ovf:Item>
      <ovf:StorageItem><sasd:HostResource>ovf:/disk/d1</sasd:HostResource><sasd:InstanceID>5</sasd:InstanceID><sasd:Parent>4</sasd:Parent><sasd:AddressOnParent>0</sasd:AddressOnParent><sasd:ResourceType>17</sasd:ResourceType></ovf:StorageItem>
      <ovf:StorageItem><sasd:HostResource>ovf:/disk/d2</sasd:HostResource><sasd:InstanceID>6</sasd:InstanceID><sasd:Parent>3</sasd:Parent><sasd:ResourceType>17</sasd:ResourceType></ovf:StorageItem>
      <ovf:EthernetPortItem><epasd:AutomaticAllocation>false</epasd:AutomaticAllocation><epasd:Connection>LAN</epasd:Connection><epasd:InstanceID>7</epasd:InstanceID><epasd:ResourceSubType>VmxNet3</epasd:ResourceSubType><epasd:ResourceType>10</epasd:ResourceType></ovf:EthernetPortItem>
      <ovf:Item><rasd:InstanceID>8</rasd:InstanceID><rasd:ResourceType>21</rasd:ResourceType><rasd:ResourceSubType>vmware.serialport.file</rasd:ResourceSubType><rasd:HostResource>[ds1] winsrv/serial.log</rasd:HostResource></ovf:Item>
      <ovf:Item><rasd:InstanceID>9</rasd:InstanceID><rasd:ResourceType>23</rasd:ResourceType><rasd:ResourceSubType>vmware.usb.xhci</rasd:ResourceSubType></ovf:Item>
      <ovf:Item><rasd:InstanceID>10</rasd:InstanceID><rasd:ResourceType>42</rasd:ResourceType></ovf:Item>
      <vmw:Config vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="true"/>
      <vmw:ExtraConfig vmw:key="uuid.bios" vmw:value="42 1f 0a 1b 2c 3d 4e 5f-60 71 82 93 a4 b5 c6 d7"/>
    </ovf:VirtualHardwareSection>
  </ovf:VirtualSystem>
</ovf:Envelope>"#;
        let l = lower(text);
        let vm = &l.vm;
        assert_eq!(vm.name, "winsrv");
        assert_eq!(
            vm.uuid.as_deref(),
            Some("421f0a1b-2c3d-4e5f-6071-8293a4b5c6d7")
        );
        assert_eq!(
            (vm.guest.family, vm.guest.version.as_deref()),
            (OsFamily::Windows, Some("2019"))
        );
        assert!(vm.clock_localtime);
        assert_eq!(
            vm.cpu,
            Cpu {
                vcpus: 6,
                sockets: 1,
                cores: 6,
                threads: 1
            }
        );
        assert_eq!(vm.memory_mib, 8192);
        assert_eq!(
            (vm.firmware.kind, vm.firmware.secure_boot),
            (FirmwareKind::Uefi, true)
        );
        assert_eq!(
            vm.controllers
                .iter()
                .map(|c| (c.bus, c.index, c.model.as_deref()))
                .collect::<Vec<_>>(),
            [(Bus::Sata, 0, Some("ahci")), (Bus::Nvme, 0, Some("nvme"))]
        );
        let d = &vm.disks;
        assert_eq!((d[0].bus, d[0].controller, d[0].unit), (Bus::Nvme, 0, 0));
        assert_eq!(d[0].size, Some(64424509440));
        assert_eq!(
            d[0].source,
            Some(DiskRef::File {
                path: "win-disk1.vmdk".into()
            })
        );
        assert_eq!(
            (d[1].bus, d[1].unit, d[1].size, d[1].source.as_ref()),
            (Bus::Sata, 0, Some(10 << 30), None)
        );
        assert_eq!(vm.nics[0].model, "vmxnet3");
        assert_eq!(
            (
                vm.nics[0].mac.as_deref(),
                vm.nics[0].network.as_deref(),
                vm.nics[0].connected
            ),
            (None, Some("LAN"), false)
        );
        assert_eq!(
            vm.serials,
            [Serial {
                port: 0,
                kind: SerialKind::File,
                target: Some("[ds1] winsrv/serial.log".into())
            }]
        );
        let c = codes(&l);
        for code in [
            "ovf-deployment-option",
            "ovf-cpu-topology",
            "ovf-device-address-assigned",
            "ovf-disk-no-file",
            "ovf-item-ignored",
            "ovf-item-unknown",
        ] {
            assert!(c.contains(&code), "{code} missing from {:#?}", l.findings);
        }
    }

    #[test]
    fn broken_references_are_findings_not_guesses() {
        let text = r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:id="gz" ovf:href="a.vmdk.gz" ovf:compression="gzip"/>
    <File ovf:id="web" ovf:href="https://example.invalid/b.vmdk"/>
  </References>
  <DiskSection><Disk ovf:diskId="a" ovf:fileRef="gz" ovf:capacity="${size}" ovf:format="urn:x-unknown"/>
    <Disk ovf:diskId="b" ovf:fileRef="web" ovf:capacity="1"/>
    <Disk ovf:diskId="c" ovf:fileRef="nowhere" ovf:capacity="1"/></DiskSection>
  <VirtualSystem ovf:id="x"><VirtualHardwareSection>
    <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType><rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType></Item>
    <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>1</rasd:Parent><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/a</rasd:HostResource></Item>
    <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>1</rasd:Parent><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/b</rasd:HostResource></Item>
    <Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>1</rasd:Parent><rasd:AddressOnParent>2</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/c</rasd:HostResource></Item>
    <Item><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>1</rasd:Parent><rasd:AddressOnParent>3</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/zz</rasd:HostResource></Item>
    <Item><rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>99</rasd:Parent></Item>
    <Item><rasd:InstanceID>7</rasd:InstanceID><rasd:ResourceType>10</rasd:ResourceType><rasd:ResourceSubType>Fancy</rasd:ResourceSubType><rasd:Address>not-a-mac</rasd:Address></Item>
  </VirtualHardwareSection></VirtualSystem></Envelope>"#;
        let l = lower(text);
        let c = codes(&l);
        for code in [
            "ovf-file-compressed",
            "ovf-file-remote",
            "ovf-disk-capacity",
            "ovf-disk-format-unknown",
            "ovf-disk-reference",
            "ovf-device-no-controller",
            "ovf-nic-model",
            "ovf-nic-mac-invalid",
            "ovf-cpu-missing",
            "ovf-memory-missing",
        ] {
            assert!(c.contains(&code), "{code} missing from {:#?}", l.findings);
        }
        assert_eq!(l.vm.controllers[0].model.as_deref(), Some("pvscsi"));
        assert_eq!(
            l.vm.disks.len(),
            4,
            "the disk without a controller is skipped"
        );
        assert_eq!(l.vm.disks[2].source, None);
        assert_eq!(l.vm.nics[0].mac, None);
    }

    #[test]
    fn collections_lower_the_first_system_and_name_the_others() {
        let text = r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <VirtualSystemCollection ovf:id="app">
    <VirtualSystem ovf:id="web"><Name>web</Name></VirtualSystem>
    <VirtualSystem ovf:id="db"><Name>db</Name></VirtualSystem>
  </VirtualSystemCollection></Envelope>"#;
        let d = OvfDocument::parse(text.as_bytes()).unwrap();
        assert_eq!(d.virtual_systems(), ["web", "db"]);
        let l = d.lower();
        assert_eq!(l.vm.name, "web");
        assert_eq!(l.findings[0].code, "ovf-multiple-virtual-systems");
        assert!(codes(&l).contains(&"ovf-no-hardware"));
        assert_eq!(d.lower_system("db").unwrap().vm.name, "db");
        assert!(d.lower_system("nope").is_none());
        let empty =
            OvfDocument::parse(br#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>"#)
                .unwrap();
        assert_eq!(codes(&empty.lower()), ["ovf-no-virtual-system"]);
    }

    #[test]
    fn every_truncation_of_the_fixture_parses_or_fails_cleanly() {
        let bytes = LINUX_OVF.as_bytes();
        let mut ok = 0;
        for n in 0..=bytes.len() {
            if let Ok(d) = OvfDocument::parse(&bytes[..n]) {
                let _ = d.lower();
                ok += 1;
            }
        }
        // Only the whole document (and it minus its final newline) is
        // well-formed.
        assert_eq!(ok, 2);
    }

    #[test]
    fn mangled_fixtures_never_panic() {
        let bytes = LINUX_OVF.as_bytes();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut b = bytes.to_vec();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed % b.len() as u64) as usize;
                let alphabet = b"<>&;/=\"' 0123456789abcxyz:\n\xff";
                b[i] = alphabet[(seed >> 32) as usize % alphabet.len()];
            }
            if let Ok(d) = OvfDocument::parse(&b) {
                let _ = d.lower();
            }
        }
    }
}
