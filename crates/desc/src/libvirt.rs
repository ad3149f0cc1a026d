//! libvirt domain XML: read and write.
//!
//! Reading keeps the whole tree ([`crate::xml::Document`]) so nothing vmshift
//! does not model is lost on a rewrite; lowering picks out what the model
//! holds. Writing produces what a KVM guest needs and libvirt's RelaxNG
//! schema accepts: q35, firmware autoselection (with Secure Boot and SMM
//! when asked), ACPI/APIC, the CPU topology, virtio devices, a serial
//! console, the qemu-guest-agent channel, and the MACs as they were.

use vmshift_model::{
    Bus, Controller, Cpu, DeviceKind, Disk, DiskFormat, DiskRef, Finding, FirmwareKind, Graphics,
    Guest, Nic, OsFamily, Serial, SerialKind, Severity, Vm,
};

use crate::xml::{Document, Element};
use crate::{DescError, Lowered, Result};

/// A parsed domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDocument {
    /// The whole tree.
    pub doc: Document,
}

/// Bytes per unit, for libvirt's `unit` attributes.
fn unit_bytes(unit: &str) -> Option<u64> {
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    })
}

/// `sda` → 0, `vdb` → 1, `hdaa` → 26: the index of a target device name.
fn dev_index(dev: &str) -> Option<u32> {
    let tail = ["xvd", "sd", "vd", "hd", "fd", "ub"]
        .iter()
        .find_map(|p| dev.strip_prefix(p))?;
    if tail.is_empty() || tail.len() > 4 || !tail.chars().all(|c| c.is_ascii_lowercase()) {
        return None;
    }
    let mut n: u32 = 0;
    for c in tail.chars() {
        n = n * 26 + (c as u32 - 'a' as u32 + 1);
    }
    Some(n - 1)
}

/// The target device name of index `i` with `prefix` (`sd`, 0 → `sda`).
fn dev_name(prefix: &str, i: u32) -> String {
    let mut n = i + 1;
    let mut s = Vec::new();
    while n > 0 {
        n -= 1;
        s.push((b'a' + (n % 26) as u8) as char);
        n /= 26;
    }
    s.reverse();
    format!("{prefix}{}", s.into_iter().collect::<String>())
}

fn bus_from(s: &str) -> Option<Bus> {
    Some(match s {
        "ide" => Bus::Ide,
        "sata" => Bus::Sata,
        "scsi" => Bus::Scsi,
        "virtio" => Bus::Virtio,
        "usb" => Bus::Usb,
        "fdc" => Bus::Fdc,
        "nvme" => Bus::Nvme,
        _ => return None,
    })
}

impl DomainDocument {
    /// Parses domain XML. A DOCTYPE or an entity beyond XML's own is
    /// refused; the root must be `<domain>`.
    pub fn parse(bytes: &[u8]) -> Result<DomainDocument> {
        let doc = Document::parse(bytes)?;
        if doc.root.local() != "domain" {
            return Err(DescError::at_line(
                doc.root.line,
                format!("the root element is <{}>, not <domain>", doc.root.name),
            ));
        }
        Ok(DomainDocument { doc })
    }

    /// The document as XML.
    pub fn render(&self) -> String {
        self.doc.render()
    }

    /// The VM this domain describes.
    pub fn lower(&self) -> Result<Lowered> {
        let d = &self.doc.root;
        let mut f = Vec::new();
        let text = |path: &str| d.at(path).map(|e| e.text_content());
        let mut vm = Vm {
            name: text("name").unwrap_or_default(),
            uuid: text("uuid").map(|u| u.to_ascii_lowercase()),
            genid: text("genid").filter(|g| !g.is_empty()),
            description: text("description").filter(|t| !t.is_empty()),
            ..Vm::default()
        };
        // Memory.
        let mem = d.first("memory").ok_or_else(|| {
            DescError::at_line(d.line, "no <memory>: libvirt requires one").field("memory")
        })?;
        let unit = mem.get("unit").unwrap_or("KiB");
        let per = unit_bytes(unit).ok_or_else(|| {
            DescError::at_line(mem.line, format!("unknown unit '{unit}'")).field("memory/@unit")
        })?;
        let amount: u64 = mem.text_content().parse().map_err(|_| {
            DescError::at_line(
                mem.line,
                format!("'{}' is not a number", mem.text_content()),
            )
            .field("memory")
        })?;
        vm.memory_mib = amount.saturating_mul(per) >> 20;
        // CPU.
        let vcpus: u32 = match d.first("vcpu") {
            Some(v) => v.text_content().parse().map_err(|_| {
                DescError::at_line(v.line, format!("'{}' is not a number", v.text_content()))
                    .field("vcpu")
            })?,
            None => 1,
        };
        vm.cpu = Cpu::with_cores_per_socket(vcpus, vcpus);
        if let Some(t) = d.at("cpu/topology") {
            let mut n = |k: &str| match t.get(k) {
                None => 1,
                Some(v) => v.parse::<u32>().unwrap_or_else(|_| {
                    f.push(Finding::new(
                        Severity::Warning,
                        "libvirt-bad-number",
                        format!("cpu.{k}"),
                        format!("topology {k}='{v}' is not a number; 1 is used"),
                    ));
                    1
                }),
            };
            let dies = n("dies");
            vm.cpu = Cpu {
                vcpus,
                sockets: n("sockets").saturating_mul(dies),
                cores: n("cores"),
                threads: n("threads"),
            };
            if dies > 1 {
                f.push(Finding::new(
                    Severity::Info,
                    "libvirt-dies",
                    "cpu",
                    format!("{dies} dies per socket are counted as sockets"),
                ));
            }
        }
        // OS and firmware.
        if let Some(os) = d.first("os") {
            if let Some(t) = os.first("type") {
                vm.machine = t.get("machine").map(str::to_string);
                vm.guest.x86_64 = t.get("arch").is_none_or(|a| a == "x86_64");
            }
            let loader = os.first("loader");
            let efi = os.get("firmware") == Some("efi")
                || loader.is_some_and(|l| l.get("type") == Some("pflash"));
            if efi {
                vm.firmware.kind = FirmwareKind::Uefi;
                vm.firmware.secure_boot = loader.is_some_and(|l| l.get("secure") == Some("yes"))
                    || os.at("firmware").is_some_and(|fw| {
                        fw.all("feature").any(|x| {
                            x.get("name") == Some("secure-boot") && x.get("enabled") == Some("yes")
                        })
                    });
                vm.firmware.efi_vars = os
                    .first("nvram")
                    .map(|n| n.text_content())
                    .filter(|p| !p.is_empty())
                    .map(|path| DiskRef::File { path });
            }
        }
        if let Some(id) = d
            .at("metadata/libosinfo/os")
            .and_then(|o| o.get("id"))
            .map(str::to_string)
        {
            vm.guest = guest_from_osinfo(&id, vm.guest.x86_64);
        }
        vm.clock_localtime = d.first("clock").and_then(|c| c.get("offset")) == Some("localtime");
        if d.first("features")
            .is_some_and(|x| x.first("hyperv").is_some())
            && vm.guest.family == OsFamily::Other
        {
            vm.guest.family = OsFamily::Windows;
        }
        // Devices.
        let mut boot_from_os: Vec<String> = d
            .first("os")
            .map(|os| {
                os.all("boot")
                    .filter_map(|b| b.get("dev").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(devs) = d.first("devices") {
            for c in devs.all("controller") {
                let bus = match c.get("type") {
                    Some("scsi") => Bus::Scsi,
                    Some("sata") => Bus::Sata,
                    Some("ide") => Bus::Ide,
                    Some("nvme") => Bus::Nvme,
                    _ => continue,
                };
                vm.controllers.push(Controller {
                    bus,
                    index: c.get("index").and_then(|i| i.parse().ok()).unwrap_or(0),
                    model: c
                        .get("model")
                        .map(str::to_string)
                        .or((bus == Bus::Sata).then(|| "ahci".to_string())),
                });
            }
            for (i, e) in devs.all("disk").enumerate() {
                vm.disks.push(lower_disk(e, i, &mut f)?);
            }
            for (i, e) in devs.all("interface").enumerate() {
                let ty = e.get("type").unwrap_or("network");
                let src = e.first("source");
                vm.nics.push(Nic {
                    model: e
                        .first("model")
                        .and_then(|m| m.get("type"))
                        .unwrap_or("rtl8139")
                        .to_string(),
                    mac: e
                        .first("mac")
                        .and_then(|m| m.get("address"))
                        .map(|m| m.to_ascii_lowercase()),
                    network: src
                        .and_then(|s| s.get("network"))
                        .filter(|_| ty == "network")
                        .map(str::to_string),
                    bridge: src
                        .and_then(|s| s.get("bridge"))
                        .filter(|_| ty == "bridge")
                        .map(str::to_string),
                    connected: e.first("link").and_then(|l| l.get("state")) != Some("down"),
                    boot_order: e
                        .first("boot")
                        .and_then(|b| b.get("order"))
                        .and_then(|o| o.parse().ok()),
                    vlan: lower_vlan(e, i, &mut f),
                });
                if !matches!(ty, "network" | "bridge") {
                    f.push(Finding::new(
                        Severity::Info,
                        "libvirt-interface-type",
                        format!("nics[{i}]"),
                        format!("an interface of type '{ty}' is kept as a NIC without network"),
                    ));
                }
            }
            for e in devs.all("serial") {
                let port = e
                    .first("target")
                    .and_then(|t| t.get("port"))
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(vm.serials.len() as u32);
                let src = e.first("source");
                let (kind, target) = match e.get("type").unwrap_or("pty") {
                    "file" => (SerialKind::File, src.and_then(|s| s.get("path"))),
                    "pipe" => (SerialKind::Pipe, src.and_then(|s| s.get("path"))),
                    "dev" => (SerialKind::Device, src.and_then(|s| s.get("path"))),
                    "tcp" | "udp" | "unix" => (
                        SerialKind::Network,
                        src.and_then(|s| s.get("path").or(s.get("host"))),
                    ),
                    _ => (SerialKind::Pty, None),
                };
                vm.serials.push(Serial {
                    port,
                    kind,
                    target: target.map(str::to_string),
                });
            }
            let graphics = devs.first("graphics").and_then(|g| g.get("type"));
            let video = devs.at("video/model");
            if graphics.is_some() || video.is_some() {
                vm.graphics = Some(Graphics {
                    protocol: graphics.map(str::to_string),
                    video: video.and_then(|v| v.get("type")).map(str::to_string),
                    vram_kib: video
                        .and_then(|v| v.get("vram"))
                        .and_then(|v| v.parse().ok()),
                });
            }
            vm.tpm = devs.first("tpm").is_some();
        }
        // <os><boot dev=…/> orders devices by kind when no device has its
        // own <boot order>.
        if vm.disks.iter().all(|x| x.boot_order.is_none())
            && vm.nics.iter().all(|n| n.boot_order.is_none())
        {
            if boot_from_os.is_empty() {
                boot_from_os.push("hd".into());
            }
            let mut n = 1;
            for dev in boot_from_os {
                let pick = match dev.as_str() {
                    "hd" => vm.disks.iter().position(|x| x.device == DeviceKind::Disk),
                    "cdrom" => vm.disks.iter().position(|x| x.device == DeviceKind::Cdrom),
                    "fd" => vm.disks.iter().position(|x| x.device == DeviceKind::Floppy),
                    _ => None,
                };
                if let Some(i) = pick {
                    vm.disks[i].boot_order = Some(n);
                    n += 1;
                } else if dev == "network" {
                    if let Some(nic) = vm.nics.first_mut() {
                        nic.boot_order = Some(n);
                        n += 1;
                    }
                }
            }
        }
        Ok(Lowered { vm, findings: f })
    }

    /// A domain for `vm` (already mapped to KVM devices).
    pub fn raise(vm: &Vm) -> DomainDocument {
        let mut dom = Element::new("domain").attr("type", "kvm");
        dom.push(Element::new("name").text(vm.name.clone()));
        if let Some(u) = &vm.uuid {
            dom.push(Element::new("uuid").text(u.clone()));
        }
        if let Some(g) = &vm.genid {
            dom.push(Element::new("genid").text(g.clone()));
        }
        if let Some(t) = &vm.description {
            dom.push(Element::new("description").text(t.clone()));
        }
        if let Some(id) = osinfo_id(&vm.guest) {
            dom.push(
                Element::new("metadata").child(
                    Element::new("libosinfo:libosinfo")
                        .attr(
                            "xmlns:libosinfo",
                            "http://libosinfo.org/xmlns/libvirt/domain/1.0",
                        )
                        .child(Element::new("libosinfo:os").attr("id", id)),
                ),
            );
        }
        let kib = vm.memory_mib.saturating_mul(1024).to_string();
        dom.push(Element::new("memory").attr("unit", "KiB").text(kib.clone()));
        dom.push(Element::new("currentMemory").attr("unit", "KiB").text(kib));
        dom.push(
            Element::new("vcpu")
                .attr("placement", "static")
                .text(vm.cpu.vcpus.to_string()),
        );
        let uefi = vm.firmware.kind == FirmwareKind::Uefi;
        let mut os = Element::new("os");
        if uefi {
            os = os.attr("firmware", "efi");
        }
        os.push(
            Element::new("type")
                .attr("arch", if vm.guest.x86_64 { "x86_64" } else { "i686" })
                .attr(
                    "machine",
                    vm.machine.clone().unwrap_or_else(|| "q35".into()),
                )
                .text("hvm"),
        );
        if uefi {
            let sb = if vm.firmware.secure_boot { "yes" } else { "no" };
            os.push(
                Element::new("firmware")
                    .child(
                        Element::new("feature")
                            .attr("enabled", sb)
                            .attr("name", "enrolled-keys"),
                    )
                    .child(
                        Element::new("feature")
                            .attr("enabled", sb)
                            .attr("name", "secure-boot"),
                    ),
            );
            // libvirt wants an absolute path; without one it makes its own
            // copy of the template.
            if let Some(DiskRef::File { path }) = &vm.firmware.efi_vars {
                if path.starts_with('/') {
                    os.push(Element::new("nvram").text(path.clone()));
                }
            }
        }
        dom.push(os);
        let windows = vm.guest.family == OsFamily::Windows;
        let mut features = Element::new("features")
            .child(Element::new("acpi"))
            .child(Element::new("apic"));
        if windows {
            features.push(
                Element::new("hyperv")
                    .attr("mode", "custom")
                    .child(Element::new("relaxed").attr("state", "on"))
                    .child(Element::new("vapic").attr("state", "on"))
                    .child(
                        Element::new("spinlocks")
                            .attr("state", "on")
                            .attr("retries", "8191"),
                    )
                    .child(Element::new("vpindex").attr("state", "on"))
                    .child(Element::new("synic").attr("state", "on"))
                    .child(Element::new("stimer").attr("state", "on"))
                    .child(Element::new("reset").attr("state", "on"))
                    .child(Element::new("frequencies").attr("state", "on")),
            );
        }
        if uefi && vm.firmware.secure_boot {
            features.push(Element::new("smm").attr("state", "on"));
        }
        dom.push(features);
        dom.push(
            Element::new("cpu")
                .attr("mode", "host-passthrough")
                .attr("check", "none")
                .attr("migratable", "on")
                .child(
                    Element::new("topology")
                        .attr("sockets", vm.cpu.sockets.to_string())
                        .attr("dies", "1")
                        .attr("cores", vm.cpu.cores.to_string())
                        .attr("threads", vm.cpu.threads.to_string()),
                ),
        );
        let mut clock = Element::new("clock").attr(
            "offset",
            if vm.clock_localtime {
                "localtime"
            } else {
                "utc"
            },
        );
        clock.push(
            Element::new("timer")
                .attr("name", "rtc")
                .attr("tickpolicy", "catchup"),
        );
        clock.push(
            Element::new("timer")
                .attr("name", "pit")
                .attr("tickpolicy", "delay"),
        );
        clock.push(
            Element::new("timer")
                .attr("name", "hpet")
                .attr("present", "no"),
        );
        if windows {
            clock.push(
                Element::new("timer")
                    .attr("name", "hypervclock")
                    .attr("present", "yes"),
            );
        }
        dom.push(clock);
        dom.push(Element::new("on_poweroff").text("destroy"));
        dom.push(Element::new("on_reboot").text("restart"));
        dom.push(Element::new("on_crash").text("destroy"));

        let mut devs = Element::new("devices");
        for disk in &vm.disks {
            devs.push(raise_disk(disk, vm));
        }
        for c in &vm.controllers {
            let ty = match c.bus {
                Bus::Scsi => "scsi",
                Bus::Sata => "sata",
                Bus::Ide => "ide",
                _ => continue,
            };
            let mut e = Element::new("controller")
                .attr("type", ty)
                .attr("index", c.index.to_string());
            if let Some(m) = c.model.as_deref().filter(|_| c.bus == Bus::Scsi) {
                e = e.attr("model", libvirt_scsi_model(m));
            }
            devs.push(e);
        }
        for n in &vm.nics {
            let (ty, src) = match (&n.bridge, &n.network) {
                (Some(b), _) => ("bridge", Element::new("source").attr("bridge", b.clone())),
                (None, Some(net)) => (
                    "network",
                    Element::new("source").attr("network", net.clone()),
                ),
                (None, None) => ("network", Element::new("source").attr("network", "default")),
            };
            let mut e = Element::new("interface").attr("type", ty);
            if let Some(m) = &n.mac {
                e.push(Element::new("mac").attr("address", m.clone()));
            }
            e.push(src);
            if let (Some(tag), Some(_)) = (n.vlan, &n.bridge) {
                // libvirt tags a bridged NIC's traffic on Open vSwitch only.
                e.push(Element::new("virtualport").attr("type", "openvswitch"));
                e.push(Element::new("vlan").child(Element::new("tag").attr("id", tag.to_string())));
            }
            e.push(Element::new("model").attr("type", n.model.clone()));
            if let Some(o) = n.boot_order {
                e.push(Element::new("boot").attr("order", o.to_string()));
            }
            if !n.connected {
                e.push(Element::new("link").attr("state", "down"));
            }
            devs.push(e);
        }
        let mut console_done = false;
        for s in &vm.serials {
            let (ty, src) = match s.kind {
                SerialKind::File => ("file", s.target.as_ref().map(|p| ("path", p))),
                SerialKind::Pipe => ("pipe", s.target.as_ref().map(|p| ("path", p))),
                SerialKind::Device => ("dev", s.target.as_ref().map(|p| ("path", p))),
                SerialKind::Network | SerialKind::Pty => ("pty", None),
            };
            let mut e = Element::new("serial").attr("type", ty);
            if let Some((k, v)) = src {
                e.push(Element::new("source").attr(k, v.clone()));
            }
            e.push(
                Element::new("target")
                    .attr("type", "isa-serial")
                    .attr("port", s.port.to_string())
                    .child(Element::new("model").attr("name", "isa-serial")),
            );
            devs.push(e);
            if s.port == 0 && ty == "pty" {
                console_done = true;
            }
        }
        if !vm.serials.iter().any(|s| s.port == 0) {
            // A serial console for the guest (and for vmshift's boot check).
            devs.push(
                Element::new("serial").attr("type", "pty").child(
                    Element::new("target")
                        .attr("type", "isa-serial")
                        .attr("port", "0")
                        .child(Element::new("model").attr("name", "isa-serial")),
                ),
            );
            console_done = true;
        }
        if console_done {
            devs.push(
                Element::new("console").attr("type", "pty").child(
                    Element::new("target")
                        .attr("type", "serial")
                        .attr("port", "0"),
                ),
            );
        }
        devs.push(
            Element::new("channel").attr("type", "unix").child(
                Element::new("target")
                    .attr("type", "virtio")
                    .attr("name", "org.qemu.guest_agent.0"),
            ),
        );
        let g = vm.graphics.clone().unwrap_or_default();
        let proto = g.protocol.as_deref().unwrap_or("vnc");
        devs.push(
            Element::new("graphics")
                .attr("type", if proto == "spice" { "spice" } else { "vnc" })
                .attr("port", "-1")
                .attr("autoport", "yes"),
        );
        let video = g.video.as_deref().unwrap_or("vga");
        let mut model = Element::new("model").attr("type", video);
        if matches!(video, "vga" | "qxl" | "vmvga" | "cirrus") {
            let kib = g.vram_kib.unwrap_or(16384).max(1024);
            model = model.attr("vram", kib.to_string());
        }
        model = model.attr("heads", "1").attr("primary", "yes");
        devs.push(Element::new("video").child(model));
        if vm.tpm {
            devs.push(
                Element::new("tpm").attr("model", "tpm-crb").child(
                    Element::new("backend")
                        .attr("type", "emulator")
                        .attr("version", "2.0"),
                ),
            );
        }
        devs.push(Element::new("memballoon").attr("model", "virtio"));
        devs.push(
            Element::new("rng").attr("model", "virtio").child(
                Element::new("backend")
                    .attr("model", "random")
                    .text("/dev/urandom"),
            ),
        );
        dom.push(devs);
        DomainDocument {
            doc: Document::new(dom),
        }
    }
}

/// The VLAN of an interface: `<vlan><tag id='N'/></vlan>`. A trunk (several
/// tags or `trunk='yes'`) has no place in the model: its first tag is kept,
/// and said.
fn lower_vlan(e: &Element, i: usize, f: &mut Vec<Finding>) -> Option<u16> {
    let v = e.first("vlan")?;
    let tags: Vec<&Element> = v.all("tag").collect();
    let id = tags
        .first()
        .and_then(|t| t.get("id"))
        .and_then(|id| id.trim().parse::<u16>().ok())
        .filter(|id| (1..=4094).contains(id));
    let Some(id) = id else {
        f.push(Finding::new(
            Severity::Warning,
            "libvirt-vlan",
            format!("nics[{i}].vlan"),
            "the interface's <vlan> has no tag id from 1 to 4094: left out",
        ));
        return None;
    };
    if tags.len() > 1 || v.get("trunk") == Some("yes") {
        f.push(Finding::new(
            Severity::Warning,
            "libvirt-vlan-trunk",
            format!("nics[{i}].vlan"),
            format!(
                "the interface is a VLAN trunk ({} tags): only VLAN {id} is kept",
                tags.len()
            ),
        ));
    }
    Some(id)
}

fn lower_disk(e: &Element, i: usize, f: &mut Vec<Finding>) -> Result<Disk> {
    let device = match e.get("device").unwrap_or("disk") {
        "cdrom" => DeviceKind::Cdrom,
        "floppy" => DeviceKind::Floppy,
        "disk" | "lun" => DeviceKind::Disk,
        other => {
            return Err(DescError::at_line(
                e.line,
                format!("disk device '{other}' (expected disk, cdrom, floppy or lun)"),
            )
            .field("disk/@device"))
        }
    };
    let target = e.first("target").ok_or_else(|| {
        DescError::at_line(e.line, "a <disk> without <target>").field("disk/target")
    })?;
    let dev = target.get("dev").unwrap_or("");
    let bus = match target.get("bus").and_then(bus_from) {
        Some(b) => b,
        None => match &dev.get(..2) {
            Some("vd") => Bus::Virtio,
            Some("hd") => Bus::Ide,
            Some("fd") => Bus::Fdc,
            _ => Bus::Scsi,
        },
    };
    let idx = dev_index(dev).unwrap_or(i as u32);
    let addr = e
        .first("address")
        .filter(|a| a.get("type") == Some("drive"));
    let num = |k: &str| {
        addr.and_then(|a| a.get(k))
            .and_then(|v| v.parse::<u32>().ok())
    };
    let (controller, unit) = match (num("controller"), num("unit"), bus) {
        (Some(c), Some(u), Bus::Ide) => (
            c,
            num("bus").unwrap_or(0).saturating_mul(2).saturating_add(u),
        ),
        (Some(c), Some(u), _) => (c, u),
        (_, _, Bus::Ide) => (idx / 2, idx % 2),
        _ => (0, idx),
    };
    let src = e.first("source");
    let source = match e.get("type").unwrap_or("file") {
        "file" => src
            .and_then(|s| s.get("file"))
            .map(|p| DiskRef::File { path: p.into() }),
        "block" => src
            .and_then(|s| s.get("dev"))
            .map(|p| DiskRef::Device { path: p.into() }),
        "volume" => src.and_then(|s| {
            Some(DiskRef::Volume {
                storage: s.get("pool")?.into(),
                volume: s.get("volume")?.into(),
            })
        }),
        other => {
            f.push(Finding::new(
                Severity::Warning,
                "libvirt-disk-type",
                format!("disks[{i}].source"),
                format!("a disk of type '{other}' (network storage) has no file to convert"),
            ));
            None
        }
    };
    let drv = e.first("driver");
    let format = drv
        .and_then(|d| d.get("type"))
        .and_then(|t| t.parse::<DiskFormat>().ok())
        .filter(|_| source.is_some());
    Ok(Disk {
        device,
        bus,
        controller,
        unit,
        source,
        format,
        size: None,
        read_only: e.first("readonly").is_some() || device == DeviceKind::Cdrom,
        boot_order: e
            .first("boot")
            .and_then(|b| b.get("order"))
            .and_then(|o| o.parse().ok()),
        mode: None,
        shared: e.first("shareable").is_some(),
        thin: false,
        discard: drv.and_then(|d| d.get("discard")) == Some("unmap"),
        passthrough: false,
    })
}

fn raise_disk(disk: &Disk, vm: &Vm) -> Element {
    let (ty, src) = match &disk.source {
        Some(DiskRef::File { path }) => (
            "file",
            Some(Element::new("source").attr("file", path.clone())),
        ),
        Some(DiskRef::Device { path }) => (
            "block",
            Some(Element::new("source").attr("dev", path.clone())),
        ),
        Some(DiskRef::Volume { storage, volume }) => (
            "volume",
            Some(
                Element::new("source")
                    .attr("pool", storage.clone())
                    .attr("volume", volume.clone()),
            ),
        ),
        Some(DiskRef::Datastore { datastore, path }) => (
            "file",
            Some(Element::new("source").attr("file", format!("[{datastore}] {path}"))),
        ),
        None => ("file", None),
    };
    let device = match disk.device {
        DeviceKind::Disk => "disk",
        DeviceKind::Cdrom => "cdrom",
        DeviceKind::Floppy => "floppy",
    };
    let mut e = Element::new("disk").attr("type", ty).attr("device", device);
    let mut drv = Element::new("driver")
        .attr("name", "qemu")
        .attr("type", disk.format.unwrap_or(DiskFormat::Raw).to_string());
    if disk.discard && disk.device == DeviceKind::Disk {
        drv = drv.attr("discard", "unmap");
    }
    e.push(drv);
    if let Some(s) = src {
        e.push(s);
    }
    let (prefix, bus) = match disk.bus {
        Bus::Virtio => ("vd", "virtio"),
        Bus::Ide => ("hd", "ide"),
        Bus::Fdc => ("fd", "fdc"),
        Bus::Sata => ("sd", "sata"),
        Bus::Usb => ("sd", "usb"),
        Bus::Scsi => ("sd", "scsi"),
        Bus::Nvme => ("nvme", "nvme"),
    };
    // Device names follow the order of disks on the same name family.
    let family = |d: &Disk| match d.bus {
        Bus::Virtio => 0,
        Bus::Ide => 1,
        Bus::Fdc => 2,
        _ => 3,
    };
    let n = vm
        .disks
        .iter()
        .take_while(|d| !std::ptr::eq(*d, disk))
        .filter(|d| family(d) == family(disk))
        .count() as u32;
    // NVMe names a controller and a namespace: nvme0n1.
    let dev = if disk.bus == Bus::Nvme {
        format!("nvme{}n{}", disk.controller, disk.unit + 1)
    } else {
        dev_name(prefix, n)
    };
    e.push(Element::new("target").attr("dev", dev).attr("bus", bus));
    if let Some(o) = disk.boot_order {
        e.push(Element::new("boot").attr("order", o.to_string()));
    }
    if disk.read_only {
        e.push(Element::new("readonly"));
    }
    if disk.shared {
        e.push(Element::new("shareable"));
    }
    if matches!(disk.bus, Bus::Scsi | Bus::Sata | Bus::Ide) {
        let (b, u) = if disk.bus == Bus::Ide {
            (disk.unit / 2, disk.unit % 2)
        } else {
            (0, disk.unit)
        };
        e.push(
            Element::new("address")
                .attr("type", "drive")
                .attr("controller", disk.controller.to_string())
                .attr("bus", b.to_string())
                .attr("target", "0")
                .attr("unit", u.to_string()),
        );
    }
    e
}

fn libvirt_scsi_model(m: &str) -> &str {
    match m {
        "pvscsi" => "vmpvscsi",
        "lsisas1068" => "lsisas1068",
        "lsilogic" => "lsilogic",
        "buslogic" => "buslogic",
        "virtio-scsi" => "virtio-scsi",
        _ => "virtio-scsi",
    }
}

/// A libosinfo id for the guest, when one is clear: the source's own when
/// it is one (a domain read from libvirt), else one from the family and
/// version.
fn osinfo_id(g: &Guest) -> Option<String> {
    if let Some(id) = g.source_id.as_deref().filter(|i| i.starts_with("http://")) {
        return Some(id.to_string());
    }
    let v = g.version.as_deref().unwrap_or("");
    let id = match g.family {
        OsFamily::Windows => match v {
            "2008r2" => "http://microsoft.com/win/2k8r2",
            "2012" => "http://microsoft.com/win/2k12",
            "2016" => "http://microsoft.com/win/2k16",
            "2019" => "http://microsoft.com/win/2k19",
            "2022" => "http://microsoft.com/win/2k22",
            "2025" => "http://microsoft.com/win/2k25",
            "7" => "http://microsoft.com/win/7",
            "8" => "http://microsoft.com/win/8",
            "10" => "http://microsoft.com/win/10",
            "11" => "http://microsoft.com/win/11",
            _ => return None,
        },
        OsFamily::Linux => "http://libosinfo.org/linux/2022",
        _ => return None,
    };
    Some(id.to_string())
}

fn guest_from_osinfo(id: &str, x86_64: bool) -> Guest {
    let (family, version) = if let Some(w) = id.strip_prefix("http://microsoft.com/win/") {
        let v = match w {
            "2k8r2" => "2008r2",
            "2k12" | "2k12r2" => "2012",
            "2k16" => "2016",
            "2k19" => "2019",
            "2k22" => "2022",
            "2k25" => "2025",
            other => other,
        };
        (OsFamily::Windows, Some(v.to_string()))
    } else if id.contains("freebsd") || id.contains("openbsd") || id.contains("netbsd") {
        (OsFamily::Bsd, None)
    } else if id.contains("solaris") || id.contains("illumos") {
        (OsFamily::Solaris, None)
    } else if id.contains("linux")
        || [
            "ubuntu",
            "debian",
            "fedora",
            "redhat",
            "rhel",
            "centos",
            "suse",
            "rocky",
            "alma",
            "archlinux",
            "alpine",
        ]
        .iter()
        .any(|d| id.contains(d))
    {
        (OsFamily::Linux, None)
    } else {
        (OsFamily::Other, None)
    };
    Guest {
        family,
        version,
        source_id: Some(id.to_string()),
        x86_64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{to_kvm, MapOptions};
    use crate::vmx::VmxDocument;

    fn kvm_of(vmx: &str) -> Vm {
        let vm = VmxDocument::parse(vmx.as_bytes()).unwrap().lower().vm;
        to_kvm(&vm, &MapOptions::default()).0
    }

    const LINUX: &str = include_str!("../../../fixtures/vms/linux-web/linux-web.vmx");
    const WINDOWS: &str = include_str!("../../../fixtures/vms/winsrv/winsrv.vmx");

    #[test]
    fn raise_then_lower_keeps_every_modelled_field() {
        for vmx in [LINUX, WINDOWS] {
            let mut vm = kvm_of(vmx);
            // libvirt names the variable store by an absolute path.
            if vm.firmware.efi_vars.is_some() {
                vm.firmware.efi_vars = Some(DiskRef::File {
                    path: "/var/lib/libvirt/qemu/nvram/vm_VARS.fd".into(),
                });
            }
            let xml = DomainDocument::raise(&vm).render();
            let back = DomainDocument::parse(xml.as_bytes())
                .unwrap()
                .lower()
                .unwrap()
                .vm;
            // Not carried by domain XML: VMware-only facts and the source's
            // own guest id (libosinfo's replaces it).
            for d in &mut vm.disks {
                d.mode = None;
                d.thin = false;
                d.size = None;
            }
            vm.guest.source_id = back.guest.source_id.clone();
            vm.guest.version = back.guest.version.clone().or(vm.guest.version.clone());
            if vm.guest.family == OsFamily::Linux {
                vm.guest.version = None;
            }
            vm.snapshots.clear();
            let mut want = vm.clone();
            // libvirt adds the serial console vmshift's boot check reads.
            if !want.serials.iter().any(|s| s.port == 0) {
                want.serials.push(Serial {
                    port: 0,
                    kind: SerialKind::Pty,
                    target: None,
                });
            }
            assert_eq!(back, want, "{xml}");
        }
    }

    #[test]
    fn written_xml_has_what_a_kvm_guest_needs() {
        let xml = DomainDocument::raise(&kvm_of(WINDOWS)).render();
        for want in [
            "<domain type=\"kvm\">",
            "machine=\"q35\"",
            "<os firmware=\"efi\">",
            "name=\"secure-boot\"",
            "<smm state=\"on\"/>",
            "<hyperv mode=\"custom\">",
            "<clock offset=\"localtime\">",
            "<topology sockets=\"2\" dies=\"1\" cores=\"4\" threads=\"1\"/>",
            "<mac address=\"00:50:56:a1:4e:02\"/>",
            "org.qemu.guest_agent.0",
            "<console type=\"pty\">",
            "<tpm model=\"tpm-crb\">",
        ] {
            assert!(xml.contains(want), "{want} missing from\n{xml}");
        }
    }

    #[test]
    fn sample_domain_lowers_raises_and_lowers_to_the_same_model() {
        let text = include_bytes!("../../../fixtures/vms/libvirt/web01.xml");
        let first = DomainDocument::parse(text).unwrap().lower().unwrap().vm;
        assert_eq!(first.name, "web01");
        assert_eq!(first.firmware.kind, FirmwareKind::Uefi);
        let xml = DomainDocument::raise(&first).render();
        let again = DomainDocument::parse(xml.as_bytes())
            .unwrap()
            .lower()
            .unwrap()
            .vm;
        assert_eq!(again, first, "{xml}");
        // Unknown elements survive a parse → render of the same document.
        let doc = DomainDocument::parse(text).unwrap();
        let out = doc.render();
        for kept in [
            "<pm>",
            "<vmport state=\"off\"/>",
            "<emulator>",
            "virsh edit web01",
        ] {
            assert!(out.contains(kept), "{kept} lost:\n{out}");
        }
    }

    #[test]
    fn hand_written_domain_lowers() {
        let xml = br#"<domain type='kvm'>
  <name>web</name>
  <uuid>0b2a6f1e-4a3b-4c5d-8e9f-0a1b2c3d4e5f</uuid>
  <memory unit='GiB'>2</memory>
  <vcpu>4</vcpu>
  <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type><boot dev='cdrom'/><boot dev='hd'/></os>
  <cpu><topology sockets='1' cores='2' threads='2'/></cpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/><source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/isos/debian.iso'/><target dev='sdb' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:AA:BB:CC'/><source bridge='br0'/><model type='virtio'/></interface>
    <!-- a comment kept on rewrite -->
  </devices>
</domain>"#;
        let d = DomainDocument::parse(xml).unwrap();
        let vm = d.lower().unwrap().vm;
        assert_eq!(vm.memory_mib, 2048);
        assert_eq!((vm.cpu.sockets, vm.cpu.cores, vm.cpu.threads), (1, 2, 2));
        assert_eq!(vm.machine.as_deref(), Some("pc-q35-8.2"));
        assert_eq!(vm.disks[0].bus, Bus::Virtio);
        assert!(vm.disks[0].discard);
        assert_eq!(vm.disks[1].unit, 1, "sdb");
        assert_eq!(vm.disks[1].boot_order, Some(1), "<boot dev='cdrom'/> first");
        assert_eq!(vm.disks[0].boot_order, Some(2));
        assert_eq!(vm.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(vm.nics[0].bridge.as_deref(), Some("br0"));
        assert!(d.render().contains("<!-- a comment kept on rewrite -->"));
    }

    #[test]
    fn bad_domains_are_clear_errors() {
        let e = DomainDocument::parse(b"<vm/>").unwrap_err().to_string();
        assert!(e.contains("<domain>"), "{e}");
        let d = DomainDocument::parse(b"<domain><name>x</name></domain>").unwrap();
        assert!(d.lower().unwrap_err().to_string().contains("memory"));
        let d =
            DomainDocument::parse(b"<domain><memory unit='parsecs'>1</memory></domain>").unwrap();
        assert!(d.lower().unwrap_err().to_string().contains("parsecs"));
    }

    #[test]
    fn device_names_and_indexes() {
        assert_eq!(dev_name("sd", 0), "sda");
        assert_eq!(dev_name("sd", 25), "sdz");
        assert_eq!(dev_name("sd", 26), "sdaa");
        assert_eq!(dev_index("sdaa"), Some(26));
        assert_eq!(dev_index("vdc"), Some(2));
        assert_eq!(dev_index("nvme0n1"), None);
    }
}
