//! A `qemu-system-x86_64` command line for a VM, for people who run QEMU
//! by hand: KVM on q35, the CPU topology, OVMF when the VM is UEFI, the
//! disks in boot order, NICs with their MACs, a serial console.

use vmshift_model::{Bus, DeviceKind, DiskRef, Finding, FirmwareKind, SerialKind, Severity, Vm};

/// Where OVMF lives (Debian's `ovmf` package).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    /// The firmware code (read-only).
    pub code: String,
    /// The VM's own copy of the variable store.
    pub vars: String,
}

/// A value inside a QEMU option list: commas doubled, so that text from a
/// descriptor can never add an option of its own (`br=x,helper=/bin/sh`).
fn opt(v: &str) -> String {
    v.replace(',', ",,")
}

/// A host bridge name as Linux allows them.
fn bridge_ok(b: &str) -> bool {
    (1..=15).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The argv (program first) and what could not be expressed.
pub fn command_line(vm: &Vm, ovmf: Option<&Ovmf>) -> (Vec<String>, Vec<Finding>) {
    let mut a: Vec<String> = vec!["qemu-system-x86_64".into()];
    let mut f = Vec::new();
    let mut arg = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    arg("-name", format!("guest={}", opt(&vm.name)));
    let secure = vm.firmware.kind == FirmwareKind::Uefi && vm.firmware.secure_boot;
    arg(
        "-machine",
        format!(
            "{},accel=kvm{}",
            vm.machine.as_deref().unwrap_or("q35"),
            if secure { ",smm=on" } else { "" }
        ),
    );
    // Windows: the Hyper-V enlightenments the libvirt domain gets too.
    if vm.guest.family == vmshift_model::OsFamily::Windows {
        arg(
            "-cpu",
            "host,hv_relaxed,hv_vapic,hv_spinlocks=0x1fff,hv_vpindex,hv_synic,hv_stimer,hv_reset,hv_frequencies,hv_time".into(),
        );
    } else {
        arg("-cpu", "host".into());
    }
    arg(
        "-smp",
        format!(
            "{},sockets={},cores={},threads={}",
            vm.cpu.vcpus, vm.cpu.sockets, vm.cpu.cores, vm.cpu.threads
        ),
    );
    arg("-m", format!("{}M", vm.memory_mib));
    if let Some(u) = vm
        .uuid
        .as_deref()
        .filter(|u| vmshift_model::uuid_is_valid(u))
    {
        arg("-uuid", u.to_string());
    }
    if let Some(g) = vm
        .genid
        .as_deref()
        .filter(|u| vmshift_model::uuid_is_valid(u))
    {
        arg("-device", format!("vmgenid,guid={g}"));
    }
    if vm.clock_localtime {
        arg("-rtc", "base=localtime".into());
    }
    if vm.firmware.kind == FirmwareKind::Uefi {
        match ovmf {
            Some(o) => {
                if secure {
                    arg(
                        "-global",
                        "driver=cfi.pflash01,property=secure,value=on".into(),
                    );
                }
                arg(
                    "-drive",
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        opt(&o.code)
                    ),
                );
                arg(
                    "-drive",
                    format!("if=pflash,format=raw,unit=1,file={}", opt(&o.vars)),
                );
            }
            None => f.push(Finding::new(
                Severity::Error,
                "qemu-no-ovmf",
                "firmware",
                "the VM is UEFI but no OVMF firmware was found (install Debian's ovmf package)",
            )),
        }
    }
    // Controllers the disks need.
    let mut scsi: Vec<u32> = vm
        .disks
        .iter()
        .filter(|d| d.bus == Bus::Scsi)
        .map(|d| d.controller)
        .collect();
    scsi.sort_unstable();
    scsi.dedup();
    for c in &scsi {
        // The controller the mapping kept (--keep-models), as QEMU names it.
        let model = vm
            .controllers
            .iter()
            .find(|x| x.bus == Bus::Scsi && x.index == *c)
            .and_then(|x| x.model.as_deref())
            .unwrap_or("virtio-scsi");
        let device = match model {
            "lsilogic" => "lsi53c895a",
            "lsisas1068" => "mptsas1068",
            "pvscsi" => "pvscsi",
            "megasas" => "megasas",
            _ => "virtio-scsi-pci",
        };
        arg("-device", format!("{device},id=scsi{c}"));
    }
    // q35's built-in AHCI (ide.0 … ide.5) is SATA controller 0; further
    // ones are added.
    let mut sata: Vec<u32> = vm
        .disks
        .iter()
        .filter(|d| matches!(d.bus, Bus::Sata | Bus::Ide) && d.controller > 0)
        .map(|d| d.controller)
        .collect();
    sata.sort_unstable();
    sata.dedup();
    for c in &sata {
        arg("-device", format!("ahci,id=sata{c}"));
    }
    for (i, d) in vm.disks.iter().enumerate() {
        if d.bus == Bus::Fdc {
            f.push(Finding::new(
                Severity::Warning,
                "qemu-floppy",
                format!("disks[{i}]"),
                "q35 has no floppy controller; the floppy is left out",
            ));
            continue;
        }
        let id = format!("drive{i}");
        let mut drive = format!("if=none,id={id}");
        if let Some(src) = &d.source {
            let path = match src {
                DiskRef::File { path } | DiskRef::Device { path } => path.clone(),
                other => {
                    f.push(Finding::new(
                        Severity::Error,
                        "qemu-disk-not-a-file",
                        format!("disks[{i}].source"),
                        format!("'{other}' is not a local path QEMU can open"),
                    ));
                    continue;
                }
            };
            drive.push_str(&format!(
                ",file={},format={}",
                opt(&path),
                d.format.map_or("raw".into(), |x| x.to_string())
            ));
        }
        if d.read_only || d.device == DeviceKind::Cdrom {
            drive.push_str(",readonly=on");
        }
        if d.discard {
            drive.push_str(",discard=unmap");
        }
        if d.device == DeviceKind::Cdrom {
            drive.push_str(",media=cdrom");
        }
        arg("-drive", drive);
        let boot = d
            .boot_order
            .map(|o| format!(",bootindex={o}"))
            .unwrap_or_default();
        let cd = d.device == DeviceKind::Cdrom;
        let dev = match d.bus {
            Bus::Scsi => format!(
                "{},bus=scsi{}.0,scsi-id={},drive={id}",
                if cd { "scsi-cd" } else { "scsi-hd" },
                d.controller,
                d.unit
            ),
            Bus::Virtio => format!("virtio-blk-pci,drive={id}"),
            // One NVMe controller per disk; QEMU wants a serial number.
            Bus::Nvme if !cd => format!(
                "nvme,serial=vmshift-nvme{}-{},drive={id}",
                d.controller, d.unit
            ),
            Bus::Fdc => unreachable!("floppies are handled above"),
            // q35's built-in AHCI has six ports: ide.0 … ide.5.
            Bus::Sata | Bus::Ide | Bus::Nvme | Bus::Usb => format!(
                "{},bus={}.{},drive={id}",
                if cd { "ide-cd" } else { "ide-hd" },
                if d.controller == 0 {
                    "ide".to_string()
                } else {
                    format!("sata{}", d.controller)
                },
                d.unit
            ),
        };
        arg("-device", format!("{dev}{boot}"));
    }
    if vm.nics.is_empty() {
        arg("-nic", "none".into());
    }
    for (i, n) in vm.nics.iter().enumerate() {
        let netdev = match n.bridge.as_deref() {
            Some(b) if bridge_ok(b) => format!("bridge,id=net{i},br={b}"),
            Some(b) => {
                f.push(Finding::new(
                    Severity::Warning,
                    "qemu-bridge-name",
                    format!("nics[{i}].bridge"),
                    format!(
                        "'{}' is not a bridge name; user-mode networking is used",
                        b.escape_debug()
                    ),
                ));
                format!("user,id=net{i}")
            }
            None => {
                if let Some(net) = &n.network {
                    f.push(Finding::new(
                        Severity::Info,
                        "qemu-user-network",
                        format!("nics[{i}].network"),
                        format!(
                            "network '{}' has no QEMU counterpart: the NIC gets user-mode NAT (-netdev user; outgoing connections only); --network-map NAME=bridge:BRIDGE or --bridge BRIDGE puts it on a host bridge",
                            net.escape_debug()
                        ),
                    ));
                }
                format!("user,id=net{i}")
            }
        };
        if let (Some(tag), Some(b)) = (n.vlan, &n.bridge) {
            f.push(Finding::new(
                Severity::Warning,
                "qemu-vlan",
                format!("nics[{i}].vlan"),
                format!(
                    "VLAN {tag} is not tagged by the script (qemu-bridge-helper cannot tag): bridge '{}' must carry VLAN {tag} untagged, e.g. a bridge on the VLAN interface",
                    b.escape_debug()
                ),
            ));
        }
        arg("-netdev", netdev);
        let model = match n.model.as_str() {
            "virtio" => "virtio-net-pci",
            "e1000" => "e1000",
            "e1000e" => "e1000e",
            "rtl8139" => "rtl8139",
            "vmxnet3" => "vmxnet3",
            _ => "virtio-net-pci",
        };
        let mut dev = format!("{model},netdev=net{i}");
        match n.mac.as_deref() {
            Some(m) if vmshift_model::mac_is_valid(m) => dev.push_str(&format!(",mac={m}")),
            Some(m) => f.push(Finding::new(
                Severity::Error,
                "mac-invalid",
                format!("nics[{i}].mac"),
                format!("'{}' is not a MAC address; left out", m.escape_debug()),
            )),
            None => {}
        }
        if let Some(o) = n.boot_order {
            dev.push_str(&format!(",bootindex={o}"));
        }
        if !n.connected {
            f.push(Finding::new(
                Severity::Info,
                "qemu-link-down",
                format!("nics[{i}]"),
                "the NIC starts disconnected in the source; QEMU starts it connected (set_link in the monitor)",
            ));
        }
        arg("-device", dev);
    }
    // -serial options take ports in order: fill gaps with "none".
    let mut serials = vm.serials.clone();
    serials.sort_by_key(|s| s.port);
    let top = serials.last().map_or(0, |s| s.port.min(3) + 1);
    for port in 0..top {
        let v = match serials.iter().find(|s| s.port == port) {
            Some(s) => match (s.kind, &s.target) {
                (SerialKind::File, Some(p)) => format!("file:{p}"),
                _ if port == 0 => "mon:stdio".into(),
                _ => "pty".into(),
            },
            None => "none".into(),
        };
        arg("-serial", v);
    }
    if serials.is_empty() {
        arg("-serial", "mon:stdio".into());
    }
    let video = vm
        .graphics
        .as_ref()
        .and_then(|g| g.video.as_deref())
        .unwrap_or("vga");
    arg(
        "-vga",
        match video {
            "virtio" => "virtio",
            "qxl" => "qxl",
            "vmvga" => "vmware",
            _ => "std",
        }
        .into(),
    );
    arg("-display", "vnc=127.0.0.1:0".into());
    if vm.tpm {
        f.push(Finding::new(
            Severity::Warning,
            "qemu-tpm",
            "tpm",
            "a TPM needs swtpm running beside QEMU; not part of this command line",
        ));
    }
    (a, f)
}

/// Quotes an argument for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The argv as a shell script.
pub fn script(argv: &[String]) -> String {
    let mut out = String::from("#!/bin/sh\n# Written by vmshift.\nexec");
    let mut it = argv.iter().peekable();
    while let Some(a) = it.next() {
        out.push(' ');
        out.push_str(&shell_quote(a));
        // Options start a new line, with their value.
        if a.starts_with('-') {
            if let Some(v) = it.next_if(|v| !v.starts_with('-')) {
                out.push(' ');
                out.push_str(&shell_quote(v));
            }
        }
        if it.peek().is_some() {
            out.push_str(" \\\n   ");
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{to_kvm, MapOptions};
    use crate::vmx::VmxDocument;

    #[test]
    fn linux_sample_command_line() {
        let vm = VmxDocument::parse(include_bytes!(
            "../../../fixtures/vms/linux-web/linux-web.vmx"
        ))
        .unwrap()
        .lower()
        .vm;
        let (vm, _) = to_kvm(&vm, &MapOptions::default());
        let (argv, f) = command_line(&vm, None);
        assert!(f.iter().all(|x| x.severity == Severity::Info), "{f:?}");
        let line = argv.join(" ");
        for want in [
            "-smp 4,sockets=2,cores=2,threads=1",
            "-m 4096M",
            "-device virtio-scsi-pci,id=scsi0",
            "scsi-hd,bus=scsi0.0,scsi-id=0,drive=drive0,bootindex=1",
            "virtio-net-pci,netdev=net0,mac=00:0c:29:5a:7b:9c",
        ] {
            assert!(line.contains(want), "{want} not in {line}");
        }
        assert!(script(&argv).starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn descriptor_text_cannot_add_qemu_options() {
        let mut vm = VmxDocument::parse(include_bytes!(
            "../../../fixtures/vms/linux-web/linux-web.vmx"
        ))
        .unwrap()
        .lower()
        .vm;
        vm.name = "x,debugcon=file:/etc/passwd".into();
        vm.nics[0].bridge = Some("br0,helper=/tmp/pwn.sh".into());
        vm.nics[1].mac = Some("00:50:56:00:00:01,romfile=/etc/shadow".into());
        if let Some(vmshift_model::DiskRef::File { path }) = &mut vm.disks[0].source {
            *path = "a.qcow2,file.locking=off".into();
        }
        let (argv, f) = command_line(&vm, None);
        let line = argv.join(" ");
        assert!(
            !line.contains("helper=") && !line.contains("romfile="),
            "{line}"
        );
        assert!(line.contains("guest=x,,debugcon"), "{line}");
        assert!(line.contains("a.qcow2,,file.locking"), "{line}");
        assert!(f.iter().any(|x| x.code == "mac-invalid"));
        assert!(f.iter().any(|x| x.code == "qemu-bridge-name"));
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
    }
}
