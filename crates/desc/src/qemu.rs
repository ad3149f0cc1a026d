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

/// The argv (program first) and what could not be expressed.
pub fn command_line(vm: &Vm, ovmf: Option<&Ovmf>) -> (Vec<String>, Vec<Finding>) {
    let mut a: Vec<String> = vec!["qemu-system-x86_64".into()];
    let mut f = Vec::new();
    let mut arg = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    arg("-name", vm.name.clone());
    let secure = vm.firmware.kind == FirmwareKind::Uefi && vm.firmware.secure_boot;
    arg(
        "-machine",
        format!(
            "{},accel=kvm{}",
            vm.machine.as_deref().unwrap_or("q35"),
            if secure { ",smm=on" } else { "" }
        ),
    );
    arg("-cpu", "host".into());
    arg(
        "-smp",
        format!(
            "{},sockets={},cores={},threads={}",
            vm.cpu.vcpus, vm.cpu.sockets, vm.cpu.cores, vm.cpu.threads
        ),
    );
    arg("-m", format!("{}M", vm.memory_mib));
    if let Some(u) = &vm.uuid {
        arg("-uuid", u.clone());
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
                    format!("if=pflash,format=raw,unit=0,readonly=on,file={}", o.code),
                );
                arg(
                    "-drive",
                    format!("if=pflash,format=raw,unit=1,file={}", o.vars),
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
        arg("-device", format!("virtio-scsi-pci,id=scsi{c}"));
    }
    for (i, d) in vm.disks.iter().enumerate() {
        if d.bus == Bus::Fdc {
            if let Some(src) = &d.source {
                arg(
                    "-drive",
                    format!("if=floppy,index={},format=raw,file={src}", d.unit),
                );
            }
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
                path.replace(',', ",,"),
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
            Bus::Fdc => unreachable!("floppies are handled above"),
            // q35's built-in AHCI has six ports: ide.0 … ide.5.
            Bus::Sata | Bus::Ide | Bus::Nvme | Bus::Usb => format!(
                "{},bus=ide.{},drive={id}",
                if cd { "ide-cd" } else { "ide-hd" },
                d.unit
            ),
        };
        arg("-device", format!("{dev}{boot}"));
    }
    for (i, n) in vm.nics.iter().enumerate() {
        let netdev = match &n.bridge {
            Some(b) => format!("bridge,id=net{i},br={b}"),
            None => format!("user,id=net{i}"),
        };
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
        if let Some(m) = &n.mac {
            dev.push_str(&format!(",mac={m}"));
        }
        if let Some(o) = n.boot_order {
            dev.push_str(&format!(",bootindex={o}"));
        }
        arg("-device", dev);
    }
    let mut console = false;
    for s in &vm.serials {
        let v = match (s.kind, &s.target) {
            (SerialKind::File, Some(p)) => format!("file:{p}"),
            (SerialKind::Pipe, Some(p)) => format!("pipe:{p}"),
            (SerialKind::Device, Some(p)) => p.clone(),
            _ if s.port == 0 => {
                console = true;
                "mon:stdio".into()
            }
            _ => "pty".into(),
        };
        arg("-serial", v);
    }
    if !console && vm.serials.is_empty() {
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
        assert!(f.is_empty(), "{f:?}");
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
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
    }
}
