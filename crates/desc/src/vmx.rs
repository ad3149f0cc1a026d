//! VMware `.vmx` (Workstation, Fusion, ESXi): read and write.
//!
//! A `.vmx` is a list of `key = "value"` lines. Keys are case-insensitive;
//! values are quoted, with `|XX` hex escapes for bytes that cannot appear
//! raw (`|22` is `"`, `|0A` a newline). `.encoding` names the character
//! set (UTF-8 today; windows-1252 from older Windows hosts). The document
//! keeps every line as it was, so a parsed file renders byte for byte; a
//! `set` rewrites only its own line. The same syntax serves `.vmsd`
//! (snapshot lists) and `.vmxf`.

use std::collections::HashMap;

use vmshift_model::text::{decode_utf8_or_windows_1252, decode_windows_1252};
use vmshift_model::{
    uuid_from_hex, Bus, Controller, Cpu, DeviceKind, Disk, DiskFormat, DiskRef, Finding,
    FirmwareKind, Graphics, Guest, Nic, OsFamily, Serial, SerialKind, Severity, Vm,
};

use crate::{DescError, Lowered, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// A `key = value` line: the key as written, the decoded value, and
    /// the line's original text (`None` once `set` changed it).
    Entry {
        key: String,
        value: String,
        raw: Option<String>,
    },
    /// A comment, blank line or the `#!` line, kept as written.
    Other(String),
}

/// A parsed `.vmx` (or `.vmsd`): every line, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmxDocument {
    lines: Vec<Line>,
    /// Lower-cased key → index into `lines`.
    index: HashMap<String, usize>,
    crlf: bool,
    /// No `.encoding`, and not valid UTF-8: read as windows-1252.
    assumed_cp1252: bool,
}

/// How the bytes of a `.vmx` are decoded.
fn decode_text(bytes: &[u8]) -> Result<(String, bool)> {
    // `.encoding` is ASCII in every encoding VMware writes; find it first.
    let declared = bytes.split(|&b| b == b'\n').find_map(|l| {
        let l = std::str::from_utf8(l).ok()?.trim();
        let (k, v) = l.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(".encoding"))
            .then(|| v.trim().trim_matches('"').to_ascii_lowercase())
    });
    match declared.as_deref() {
        None => Ok((
            decode_utf8_or_windows_1252(bytes),
            std::str::from_utf8(bytes).is_err(),
        )),
        Some("utf-8" | "utf8") => String::from_utf8(bytes.to_vec())
            .map(|t| (t, false))
            .map_err(|e| {
                let at = e.utf8_error().valid_up_to();
                let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
                DescError::at_line(
                    line,
                    format!("invalid UTF-8 at byte {at}, though .encoding says UTF-8"),
                )
                .field(".encoding")
            }),
        Some("windows-1252" | "cp1252") => Ok((decode_windows_1252(bytes), false)),
        Some("iso-8859-1" | "latin1" | "iso8859-1") => {
            Ok((bytes.iter().map(|&b| char::from(b)).collect(), false))
        }
        Some(other) => Err(DescError::new(format!(
            "character set '{other}' is not supported (UTF-8, windows-1252 and ISO-8859-1 are)"
        ))
        .field(".encoding")),
    }
}

/// Decodes `|XX` escapes.
fn unescape(v: &str) -> String {
    if !v.contains('|') {
        return v.to_string();
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if b[i] == b'|' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes a value for writing: `"`, `|`, `#` and control characters.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '"' | '|' | '#' | '\u{0}'..='\u{1f}' | '\u{7f}' => {
                out.push_str(&format!("|{:02X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

impl VmxDocument {
    /// Parses a `.vmx`. Every line must be blank, a comment, or
    /// `key = value`; a key may appear once.
    pub fn parse(bytes: &[u8]) -> Result<VmxDocument> {
        let (text, assumed_cp1252) = decode_text(bytes)?;
        let crlf = text.contains("\r\n");
        let mut doc = VmxDocument {
            crlf,
            assumed_cp1252,
            ..VmxDocument::default()
        };
        for (n, raw) in text.split('\n').enumerate() {
            let line_no = n + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                doc.lines.push(Line::Other(raw.to_string()));
                continue;
            }
            let Some((k, v)) = t.split_once('=') else {
                return Err(DescError::at_line(
                    line_no,
                    format!("expected 'key = \"value\"', found '{}'", clip(t)),
                ));
            };
            let key = k.trim();
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(DescError::at_line(
                    line_no,
                    format!("'{}' is not a key", clip(key)),
                ));
            }
            let v = v.trim();
            let value = match v.strip_prefix('"') {
                Some(rest) => match rest.find('"') {
                    Some(end)
                        if rest[end + 1..].trim().is_empty()
                            || rest[end + 1..].trim().starts_with('#') =>
                    {
                        unescape(&rest[..end])
                    }
                    _ => {
                        return Err(DescError::at_line(
                            line_no,
                            "the value's closing quote is missing or followed by text",
                        )
                        .field(key.to_string()))
                    }
                },
                None => unescape(v),
            };
            let lower = key.to_ascii_lowercase();
            if let Some(&prev) = doc.index.get(&lower) {
                let prev_line = prev + 1;
                return Err(DescError::at_line(
                    line_no,
                    format!("'{key}' is already set on line {prev_line}; VMware refuses a configuration that sets a key twice"),
                )
                .field(key.to_string()));
            }
            doc.index.insert(lower, doc.lines.len());
            doc.lines.push(Line::Entry {
                key: key.to_string(),
                value,
                raw: Some(raw.to_string()),
            });
        }
        // `split` yields one empty piece after a final newline; it is the
        // newline itself, not a line.
        if matches!(doc.lines.last(), Some(Line::Other(s)) if s.is_empty()) && text.ends_with('\n')
        {
            doc.lines.pop();
        }
        Ok(doc)
    }

    /// The document as text: unchanged lines exactly as read.
    pub fn render(&self) -> String {
        let nl = if self.crlf { "\r\n" } else { "\n" };
        let mut out = String::new();
        for l in &self.lines {
            match l {
                Line::Entry { raw: Some(r), .. } | Line::Other(r) => out.push_str(r),
                Line::Entry {
                    key,
                    value,
                    raw: None,
                } => out.push_str(&format!("{key} = \"{}\"", escape(value))),
            }
            out.push_str(nl);
        }
        out
    }

    /// The value of `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = *self.index.get(&key.to_ascii_lowercase())?;
        match &self.lines[i] {
            Line::Entry { value, .. } => Some(value),
            Line::Other(_) => None,
        }
    }

    /// Sets `key` to `value`: rewrites its line, or appends one.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.index.get(&key.to_ascii_lowercase()) {
            Some(&i) => {
                if let Line::Entry { value: v, raw, .. } = &mut self.lines[i] {
                    if *v != value {
                        *v = value;
                        *raw = None;
                    }
                }
            }
            None => {
                self.index
                    .insert(key.to_ascii_lowercase(), self.lines.len());
                self.lines.push(Line::Entry {
                    key: key.to_string(),
                    value,
                    raw: None,
                });
            }
        }
    }

    /// Every key, as written, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().filter_map(|l| match l {
            Line::Entry { key, .. } => Some(key.as_str()),
            Line::Other(_) => None,
        })
    }

    fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "true" | "yes" | "1" | "on"
            )
        })
    }

    fn present(&self, prefix: &str) -> bool {
        self.flag(&format!("{prefix}.present")).unwrap_or(false)
    }

    fn num<T: std::str::FromStr>(&self, key: &str, findings: &mut Vec<Finding>) -> Option<T> {
        let v = self.get(key)?;
        match v.trim().parse() {
            Ok(n) => Some(n),
            Err(_) => {
                findings.push(Finding::new(
                    Severity::Warning,
                    "vmx-bad-number",
                    format!("vmx:{key}"),
                    format!("'{v}' is not a number; ignored"),
                ));
                None
            }
        }
    }

    /// The VM this `.vmx` describes.
    pub fn lower(&self) -> Lowered {
        let mut f = Vec::new();
        if self.assumed_cp1252 {
            f.push(Finding::new(
                Severity::Info,
                "vmx-encoding-assumed",
                "vmx:.encoding",
                "no .encoding and not valid UTF-8: read as windows-1252, as older VMware products on Windows wrote it",
            ));
        }
        let mut vm = Vm {
            name: self.get("displayName").unwrap_or("").to_string(),
            ..Vm::default()
        };
        vm.uuid = self.get("uuid.bios").and_then(|u| {
            let c = uuid_from_hex(u);
            if c.is_none() {
                f.push(Finding::new(
                    Severity::Warning,
                    "vmx-bad-uuid",
                    "vmx:uuid.bios",
                    format!("'{u}' is not 16 hex bytes; the UUID is not carried over"),
                ));
            }
            c
        });
        vm.genid = genid(self, &mut f);
        vm.description = self
            .get("annotation")
            .filter(|a| !a.is_empty())
            .map(str::to_string);

        // Firmware.
        if self
            .get("firmware")
            .is_some_and(|v| v.eq_ignore_ascii_case("efi"))
        {
            vm.firmware.kind = FirmwareKind::Uefi;
            vm.firmware.secure_boot = self.flag("uefi.secureBoot.enabled").unwrap_or(false);
            vm.firmware.efi_vars = self.get("nvram").map(DiskRef::from_vmware_path);
        }

        // CPU and memory; what the .vmx leaves out takes VMware's default.
        if self.get("numvcpus").is_none() {
            f.push(Finding::new(
                Severity::Info,
                "vmx-default-numvcpus",
                "vmx:numvcpus",
                "numvcpus is not set: VMware's default, 1 vCPU, is used",
            ));
        }
        let vcpus: u32 = self.num("numvcpus", &mut f).unwrap_or(1);
        let per: u32 = self.num("cpuid.coresPerSocket", &mut f).unwrap_or(1);
        vm.cpu = Cpu::with_cores_per_socket(vcpus, per);
        if vm.cpu.cores != per && per > 1 {
            f.push(Finding::new(
                Severity::Warning,
                "vmx-cores-per-socket",
                "cpu",
                format!("{vcpus} vCPUs do not divide into sockets of {per} cores; one socket of {vcpus} cores is used"),
            ));
        }
        vm.memory_mib = match self.num("memsize", &mut f) {
            Some(m) => m,
            None => {
                f.push(Finding::new(
                    Severity::Warning,
                    "vmx-default-memsize",
                    "vmx:memsize",
                    format!(
                        "memsize is {}: VMware's default, {VMWARE_DEFAULT_MEMSIZE} MiB, is used, which is too little for any current OS to boot; \
                         set memsize (in MiB) in the .vmx before converting, or the converted VM's memory after (vm boot --memory N for a boot check)",
                        if self.get("memsize").is_some() { "not a number" } else { "not set" }
                    ),
                ));
                VMWARE_DEFAULT_MEMSIZE
            }
        };

        // Guest.
        if let Some(id) = self.get("guestOS") {
            vm.guest = guest_from_vmware(id);
        }
        vm.clock_localtime = vm.guest.family == OsFamily::Windows;

        // Controllers.
        for (bus, name, max, default_model) in [
            (Bus::Scsi, "scsi", 4u32, Some("lsilogic")),
            (Bus::Sata, "sata", 4, Some("ahci")),
            (Bus::Nvme, "nvme", 4, None),
        ] {
            for i in 0..max {
                let p = format!("{name}{i}");
                if !self.present(&p) {
                    continue;
                }
                let model = self
                    .get(&format!("{p}.virtualDev"))
                    .map(|m| m.to_ascii_lowercase())
                    .or(default_model.map(str::to_string));
                vm.controllers.push(Controller {
                    bus,
                    index: i,
                    model,
                });
            }
        }

        // Disks and CD-ROMs: scsiN:M, sataN:M, nvmeN:M, ideN:M.
        for (bus, name, ctrls, units) in [
            (Bus::Scsi, "scsi", 4u32, 65u32),
            (Bus::Sata, "sata", 4, 30),
            (Bus::Nvme, "nvme", 4, 65),
            (Bus::Ide, "ide", 2, 2),
        ] {
            for c in 0..ctrls {
                if bus != Bus::Ide && !self.present(&format!("{name}{c}")) {
                    // Devices on a controller that is not there are not
                    // part of the VM (VMware ignores them too).
                    for u in 0..units {
                        let p = format!("{name}{c}:{u}");
                        if self.present(&p) {
                            f.push(Finding::new(
                                Severity::Warning,
                                "vmx-no-controller",
                                format!("vmx:{p}"),
                                format!(
                                    "{p} is present but {name}{c} is not; the device is left out"
                                ),
                            ));
                        }
                    }
                    continue;
                }
                for u in 0..units {
                    let p = format!("{name}{c}:{u}");
                    if !self.present(&p) {
                        continue;
                    }
                    if let Some(d) = self.lower_disk(&p, bus, c, u, &mut f) {
                        vm.disks.push(d);
                    }
                }
            }
        }
        if self.present("floppy0") {
            // An image, unless it says device (or, unsaid, names one).
            let name = self.get("floppy0.fileName").unwrap_or("");
            let file = match self.get("floppy0.fileType") {
                Some(t) => t.eq_ignore_ascii_case("file"),
                None => !(name.starts_with("/dev/") || (name.len() == 2 && name.ends_with(':'))),
            };
            if !file && !name.is_empty() {
                f.push(Finding::new(
                    Severity::Info,
                    "vmx-floppy-host-device",
                    "vmx:floppy0",
                    "the floppy drive is connected to a host drive; it becomes an empty drive",
                ));
            }
            vm.disks.push(Disk {
                device: DeviceKind::Floppy,
                bus: Bus::Fdc,
                source: self
                    .get("floppy0.fileName")
                    .filter(|_| file)
                    .filter(|n| !n.is_empty())
                    .map(DiskRef::from_vmware_path),
                format: Some(DiskFormat::Raw),
                ..Disk::default()
            });
        }
        self.boot_order(&mut vm, &mut f);

        // NICs.
        for i in 0..10 {
            let p = format!("ethernet{i}");
            if !self.present(&p) {
                continue;
            }
            let g = |k: &str| self.get(&format!("{p}.{k}"));
            let model = g("virtualDev").unwrap_or("e1000").to_ascii_lowercase();
            let mac = match g("addressType").map(|t| t.to_ascii_lowercase()) {
                Some(t) if t == "static" => g("address"),
                _ => g("generatedAddress").or(g("address")),
            }
            .map(|m| m.trim().to_ascii_lowercase());
            if mac.is_none() {
                f.push(Finding::new(
                    Severity::Warning,
                    "vmx-nic-no-mac",
                    format!("nics[{}].mac", vm.nics.len()),
                    format!(
                        "{p} has no MAC address yet (never powered on?); the new VM gets a new one"
                    ),
                ));
            }
            // ESXi names a port group; Workstation a connection type
            // (`custom` with its vmnet), bridged when the key is absent.
            let network = g("networkName")
                .map(str::to_string)
                .or_else(
                    || match g("connectionType").map(|c| c.trim().to_ascii_lowercase()) {
                        Some(c) if c == "custom" => g("vnet").map(str::to_string).or(Some(c)),
                        Some(c) if !c.is_empty() => Some(c),
                        _ => g("vnet").map(str::to_string),
                    },
                )
                .or_else(|| Some("bridged".to_string()));
            vm.nics.push(Nic {
                model,
                mac,
                network,
                bridge: None,
                connected: self.flag(&format!("{p}.startConnected")).unwrap_or(true),
                boot_order: None,
                vlan: None,
            });
        }

        // Serial ports.
        for i in 0..4 {
            let p = format!("serial{i}");
            if !self.present(&p) {
                continue;
            }
            let target = self.get(&format!("{p}.fileName")).map(str::to_string);
            let kind = match self
                .get(&format!("{p}.fileType"))
                .unwrap_or("device")
                .to_ascii_lowercase()
                .as_str()
            {
                "file" => SerialKind::File,
                "pipe" => SerialKind::Pipe,
                "network" => SerialKind::Network,
                "device" if target.is_some() => SerialKind::Device,
                _ => SerialKind::Pty,
            };
            vm.serials.push(Serial {
                port: i,
                kind,
                target: if kind == SerialKind::Pty {
                    None
                } else {
                    target
                },
            });
        }

        // Display.
        let vram: Option<u64> = self.num("svga.vramSize", &mut f);
        let vnc = self.flag("RemoteDisplay.vnc.enabled").unwrap_or(false);
        vm.graphics = Some(Graphics {
            protocol: vnc.then(|| "vnc".to_string()),
            video: Some("vmvga".into()),
            vram_kib: vram.map(|b| b / 1024),
        });

        // What does not carry over.
        for i in 0..16 {
            let p = format!("pciPassthru{i}");
            if self.present(&p) {
                f.push(Finding::new(
                    Severity::Warning,
                    "vmx-pci-passthrough",
                    format!("vmx:{p}"),
                    format!(
                        "{p} passes a host PCI device through ({}): it is left out; pass the KVM host's device with libvirt's <hostdev> or Proxmox's hostpciN",
                        self.get(&format!("{p}.id"))
                            .or(self.get(&format!("{p}.deviceId")))
                            .unwrap_or("id not recorded")
                    ),
                ));
            }
        }
        for i in 0..16 {
            let k = format!("usb.autoConnect.device{i}");
            if let Some(dev) = self.get(&k) {
                f.push(Finding::new(
                    Severity::Info,
                    "vmx-usb-passthrough",
                    format!("vmx:{k}"),
                    format!("the host's USB device '{dev}' is connected to the VM at power-on: not carried over (libvirt <hostdev type='usb'>, Proxmox usbN)"),
                ));
            }
        }
        vm.tpm = self.present("vtpm");
        vm.encrypted =
            self.get("encryption.keySafe").is_some() || self.get("encryption.data").is_some();
        Lowered { vm, findings: f }
    }

    fn lower_disk(&self, p: &str, bus: Bus, c: u32, u: u32, f: &mut Vec<Finding>) -> Option<Disk> {
        let g = |k: &str| self.get(&format!("{p}.{k}"));
        let file = g("fileName").filter(|n| !n.is_empty());
        let ty = g("deviceType").map(|t| t.to_ascii_lowercase());
        let is_cd = match ty.as_deref() {
            Some(t) => t.contains("cdrom"),
            None => file.is_some_and(|n| n.to_ascii_lowercase().ends_with(".iso")),
        };
        let mut d = Disk {
            bus,
            controller: c,
            unit: u,
            ..Disk::default()
        };
        if is_cd {
            d.device = DeviceKind::Cdrom;
            d.read_only = true;
            match ty.as_deref() {
                Some("cdrom-image") | None => {
                    d.source = file.map(DiskRef::from_vmware_path);
                    d.format = d.source.as_ref().map(|_| DiskFormat::Raw);
                }
                Some(_) => f.push(Finding::new(
                    Severity::Info,
                    "vmx-cdrom-host-device",
                    format!("vmx:{p}"),
                    "the CD-ROM is connected to a host drive; it becomes an empty drive"
                        .to_string(),
                )),
            }
            return Some(d);
        }
        if ty.as_deref() == Some("scsi-passthru") {
            // A host SCSI device passed through (a tape drive, a changer,
            // a dongle): its data stays on the device; the VM loses it.
            f.push(Finding::new(
                Severity::Warning,
                "vmx-scsi-passthrough",
                format!("vmx:{p}"),
                format!(
                    "{p} passes the host's SCSI device '{}' through (a tape drive, a changer, a dongle): it is left out; on KVM, pass it with libvirt's <hostdev type='scsi'> or Proxmox's scsiN: /dev/sgN by hand",
                    file.unwrap_or("")
                ),
            ));
            return None;
        }
        match ty.as_deref() {
            Some("rawdisk" | "plaindisk") => {
                d.source = Some(DiskRef::Device {
                    path: file.unwrap_or("").to_string(),
                });
            }
            _ => {
                d.source = file.map(DiskRef::from_vmware_path);
                d.format = file.map(|n| {
                    if n.to_ascii_lowercase().ends_with(".vmdk") {
                        DiskFormat::Vmdk
                    } else {
                        DiskFormat::Raw
                    }
                });
            }
        }
        d.mode = g("mode")
            .map(|m| m.to_ascii_lowercase())
            .filter(|m| m != "persistent");
        d.shared = g("sharing").is_some_and(|s| s.eq_ignore_ascii_case("multi-writer"));
        if file.is_none() {
            f.push(Finding::new(
                Severity::Error,
                "vmx-disk-no-file",
                format!("vmx:{p}.fileName"),
                format!("the disk at {p} names no file"),
            ));
        }
        Some(d)
    }

    /// Boot order: `bios.hddOrder` names the first disk; `bios.bootOrder`
    /// says whether CD-ROM or disk comes first.
    fn boot_order(&self, vm: &mut Vm, f: &mut Vec<Finding>) {
        let addr = |d: &Disk| {
            format!(
                "{}{}:{}",
                match d.bus {
                    Bus::Scsi => "scsi",
                    Bus::Sata => "sata",
                    Bus::Nvme => "nvme",
                    Bus::Ide => "ide",
                    _ => "",
                },
                d.controller,
                d.unit
            )
        };
        let first_disk = self
            .get("bios.hddOrder")
            .and_then(|o| o.split(',').next())
            .map(|s| s.trim().to_ascii_lowercase())
            .and_then(|want| vm.disks.iter().position(|d| addr(d) == want))
            .or_else(|| vm.disks.iter().position(|d| d.device == DeviceKind::Disk));
        let cd_first = self.get("bios.bootOrder").is_some_and(|o| {
            let o = o.to_ascii_lowercase();
            o.find("cdrom")
                .is_some_and(|c| o.find("hdd").is_none_or(|h| c < h))
        });
        let first_cd = vm.disks.iter().position(|d| d.device == DeviceKind::Cdrom);
        let mut order = Vec::new();
        if cd_first {
            order.extend(first_cd);
        }
        order.extend(first_disk);
        if !cd_first {
            if let Some(cd) = first_cd.filter(|_| self.get("bios.bootOrder").is_some()) {
                order.push(cd);
            }
        }
        for (n, i) in order.into_iter().enumerate() {
            vm.disks[i].boot_order = Some(n as u32 + 1);
        }
        if self.get("bios.hddOrder").is_none()
            && vm
                .disks
                .iter()
                .filter(|d| d.device == DeviceKind::Disk)
                .count()
                > 1
        {
            f.push(Finding::new(
                Severity::Info,
                "vmx-boot-disk-assumed",
                "disks",
                "no bios.hddOrder: the first disk (SCSI, then SATA, NVMe, IDE) is taken as the boot disk",
            ));
        }
    }

    /// A `.vmx` for `vm`, as VMware Workstation/ESXi write them.
    pub fn raise(vm: &Vm) -> (VmxDocument, Vec<Finding>) {
        let mut f = Vec::new();
        let mut d = VmxDocument::default();
        d.lines.push(Line::Other("#!/usr/bin/vmware".into()));
        d.set(".encoding", "UTF-8");
        d.set("config.version", "8");
        d.set("virtualHW.version", "19");
        d.set("displayName", vm.name.clone());
        d.set(
            "guestOS",
            vm.guest
                .source_id
                .clone()
                .filter(|s| is_vmware_guest_id(s) && guest_from_vmware(s).family == vm.guest.family)
                .unwrap_or_else(|| vmware_guest_id(&vm.guest)),
        );
        d.set("memsize", vm.memory_mib.to_string());
        d.set("numvcpus", vm.cpu.vcpus.to_string());
        d.set(
            "cpuid.coresPerSocket",
            (vm.cpu.cores * vm.cpu.threads).to_string(),
        );
        if vm.firmware.kind == FirmwareKind::Uefi {
            d.set("firmware", "efi");
            if vm.firmware.secure_boot {
                d.set("uefi.secureBoot.enabled", "TRUE");
            }
            if let Some(nv) = &vm.firmware.efi_vars {
                d.set("nvram", nv.to_string());
            }
        }
        if let Some(u) = &vm.uuid {
            if let Some(v) = to_vmware_uuid(u) {
                d.set("uuid.bios", v);
            }
        }
        if let Some((hi, lo)) = vm.genid.as_deref().and_then(genid_halves) {
            d.set("vm.genid", lo.to_string());
            d.set("vm.genidX", hi.to_string());
        }
        if let Some(desc) = &vm.description {
            d.set("annotation", desc.clone());
        }
        for c in &vm.controllers {
            let p = format!("{}{}", c.bus, c.index);
            match c.bus {
                Bus::Scsi => {
                    d.set(&format!("{p}.present"), "TRUE");
                    // VMware's own models stay; KVM's become pvscsi.
                    let model = c
                        .model
                        .as_deref()
                        .filter(|m| matches!(*m, "lsilogic" | "lsisas1068" | "pvscsi" | "buslogic"))
                        .unwrap_or("pvscsi");
                    d.set(&format!("{p}.virtualDev"), model);
                }
                Bus::Sata | Bus::Nvme => d.set(&format!("{p}.present"), "TRUE"),
                _ => {}
            }
        }
        // Where each disk goes: native buses keep their address; virtio
        // disks move to SCSI units that are free (unit 7 is the SCSI
        // controller's own).
        let mut taken: std::collections::HashSet<(Bus, u32, u32)> = vm
            .disks
            .iter()
            .filter(|x| matches!(x.bus, Bus::Scsi | Bus::Sata | Bus::Nvme | Bus::Ide))
            .map(|x| (x.bus, x.controller, x.unit))
            .collect();
        let mut placed: Vec<Option<(Bus, u32, u32)>> = Vec::new();
        for x in &vm.disks {
            placed.push(match x.bus {
                Bus::Scsi | Bus::Sata | Bus::Nvme | Bus::Ide => Some((x.bus, x.controller, x.unit)),
                Bus::Virtio => (0..4u32)
                    .flat_map(|c| (0..64u32).filter(|&u| u != 7).map(move |u| (c, u)))
                    .find(|&(c, u)| !taken.contains(&(Bus::Scsi, c, u)))
                    .map(|(c, u)| {
                        taken.insert((Bus::Scsi, c, u));
                        (Bus::Scsi, c, u)
                    }),
                Bus::Usb | Bus::Fdc => None,
            });
        }
        for (i, disk) in vm.disks.iter().enumerate() {
            let bus = match disk.bus {
                Bus::Scsi | Bus::Sata | Bus::Nvme | Bus::Ide => disk.bus,
                Bus::Virtio => {
                    f.push(Finding::new(
                        Severity::Info,
                        "vmx-virtio-disk",
                        format!("disks[{i}].bus"),
                        "VMware has no virtio-blk; the disk goes on SCSI",
                    ));
                    Bus::Scsi
                }
                Bus::Usb | Bus::Fdc => {
                    if disk.device == DeviceKind::Floppy {
                        d.set("floppy0.present", "TRUE");
                        if let Some(s) = &disk.source {
                            d.set("floppy0.fileType", "file");
                            d.set("floppy0.fileName", s.to_string());
                        }
                    } else {
                        f.push(Finding::new(
                            Severity::Warning,
                            "vmx-unsupported-bus",
                            format!("disks[{i}].bus"),
                            format!(
                                "a {} disk has no VMware equivalent here; left out",
                                disk.bus
                            ),
                        ));
                    }
                    continue;
                }
            };
            let ctrl_index = placed[i].map_or(disk.controller, |(_, c, _)| c);
            if bus != Bus::Ide
                && !vm
                    .controllers
                    .iter()
                    .any(|c| c.bus == bus && c.index == ctrl_index)
            {
                let p = format!("{bus}{ctrl_index}");
                d.set(&format!("{p}.present"), "TRUE");
                if bus == Bus::Scsi {
                    d.set(&format!("{p}.virtualDev"), "pvscsi");
                }
            }
            let Some((_, ctrl, unit)) = placed[i] else {
                continue;
            };
            let p = format!("{bus}{ctrl}:{unit}");
            d.set(&format!("{p}.present"), "TRUE");
            match disk.device {
                DeviceKind::Cdrom => {
                    d.set(&format!("{p}.deviceType"), "cdrom-image");
                    d.set(
                        &format!("{p}.fileName"),
                        disk.source
                            .as_ref()
                            .map(|s| s.to_string())
                            .unwrap_or_default(),
                    );
                    if disk.source.is_none() {
                        d.set(&format!("{p}.startConnected"), "FALSE");
                    }
                }
                _ => {
                    if let Some(s) = &disk.source {
                        d.set(&format!("{p}.fileName"), s.to_string());
                    }
                    if bus == Bus::Scsi {
                        d.set(&format!("{p}.deviceType"), "scsi-hardDisk");
                    }
                    if let Some(m) = &disk.mode {
                        d.set(&format!("{p}.mode"), m.clone());
                    }
                }
            }
        }
        if let Some((b, c, u)) = vm.boot_disk().and_then(|(i, _)| placed[i]) {
            d.set("bios.hddOrder", format!("{b}{c}:{u}"));
        }
        // bios.bootOrder: CD-ROM before or after the disk.
        let first = |kind: DeviceKind| {
            vm.disks
                .iter()
                .filter(|x| x.device == kind)
                .filter_map(|x| x.boot_order)
                .min()
        };
        match (first(DeviceKind::Cdrom), first(DeviceKind::Disk)) {
            (Some(c), Some(h)) if c < h => d.set("bios.bootOrder", "cdrom,hdd"),
            (Some(_), _) => d.set("bios.bootOrder", "hdd,cdrom"),
            _ => {}
        }
        for (i, n) in vm.nics.iter().enumerate() {
            let p = format!("ethernet{i}");
            d.set(&format!("{p}.present"), "TRUE");
            let model = match n.model.as_str() {
                m @ ("e1000" | "e1000e" | "vmxnet3" | "vlance") => m,
                _ => "vmxnet3",
            };
            d.set(&format!("{p}.virtualDev"), model);
            match n.network.as_deref() {
                // Workstation's connection modes are not network names.
                Some(kind @ ("nat" | "bridged" | "hostonly")) => {
                    d.set(&format!("{p}.connectionType"), kind)
                }
                Some(vnet)
                    if vnet
                        .trim_start_matches("/dev/")
                        .strip_prefix("vmnet")
                        .is_some_and(|n| {
                            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                        }) =>
                {
                    d.set(&format!("{p}.connectionType"), "custom");
                    d.set(&format!("{p}.vnet"), vnet);
                }
                Some(net) => d.set(&format!("{p}.networkName"), net),
                None => {}
            }
            match &n.mac {
                Some(mac) => {
                    d.set(&format!("{p}.addressType"), "static");
                    d.set(&format!("{p}.address"), mac.clone());
                    if !vmware_static_mac(mac) {
                        f.push(Finding::new(
                            Severity::Warning,
                            "vmx-mac-outside-vmware-range",
                            format!("nics[{i}].mac"),
                            format!("{mac} is outside 00:50:56:00:00:00–00:50:56:3f:ff:ff; ESXi refuses static MACs outside that range"),
                        ));
                    }
                }
                None => d.set(&format!("{p}.addressType"), "generated"),
            }
            if !n.connected {
                d.set(&format!("{p}.startConnected"), "FALSE");
            }
        }
        for s in &vm.serials {
            let p = format!("serial{}", s.port);
            d.set(&format!("{p}.present"), "TRUE");
            let ty = match s.kind {
                SerialKind::File => "file",
                SerialKind::Pipe => "pipe",
                SerialKind::Network => "network",
                SerialKind::Device | SerialKind::Pty => "device",
            };
            d.set(&format!("{p}.fileType"), ty);
            if let Some(t) = &s.target {
                d.set(&format!("{p}.fileName"), t.clone());
            }
        }
        if let Some(kib) = vm.graphics.as_ref().and_then(|g| g.vram_kib) {
            d.set("svga.vramSize", (kib * 1024).to_string());
        }
        if vm.tpm {
            d.set("vtpm.present", "TRUE");
        }
        (d, f)
    }
}

fn clip(s: &str) -> String {
    let mut c: String = s.chars().take(60).collect();
    if c.len() < s.len() {
        c.push('…');
    }
    c
}

/// The usual UUID form in VMware's spelling.
fn to_vmware_uuid(u: &str) -> Option<String> {
    let hex: String = u.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<&str> = (0..16).map(|i| &hex[i * 2..i * 2 + 2]).collect();
    Some(format!("{}-{}", bytes[..8].join(" "), bytes[8..].join(" ")))
}

/// `vm.genid` and `vm.genidX`: the low and high 64 bits of the generation
/// id as signed decimals; the model keeps it as 8-4-4-4-12 hex, high half
/// first.
fn genid(d: &VmxDocument, f: &mut Vec<Finding>) -> Option<String> {
    let lo: i64 = d.num("vm.genid", f)?;
    let hi: i64 = d.num("vm.genidX", f).unwrap_or(0);
    uuid_from_hex(&format!("{:016x}{:016x}", hi as u64, lo as u64))
}

/// The two signed 64-bit halves of a generation id as `.vmx` stores them
/// (`vm.genidX`, `vm.genid`).
fn genid_halves(g: &str) -> Option<(i64, i64)> {
    let hex: String = g.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let hi = u64::from_str_radix(&hex[..16], 16).ok()?;
    let lo = u64::from_str_radix(&hex[16..], 16).ok()?;
    Some((hi as i64, lo as i64))
}

/// The memory VMware gives a VM whose `.vmx` has no `memsize`, in MiB.
pub const VMWARE_DEFAULT_MEMSIZE: u64 = 32;

/// Whether `id` reads as a VMware guestOS id (`windows9-64`, `ubuntu-64`,
/// `otherlinux`) rather than another product's (`win11`, `l26`, a
/// libosinfo URL).
fn is_vmware_guest_id(id: &str) -> bool {
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return false;
    }
    let g = guest_from_vmware(id);
    match g.family {
        OsFamily::Windows => g.version.is_some(),
        OsFamily::Other => id.starts_with("other"),
        _ => true,
    }
}

/// Whether a MAC lies in VMware's range for static addresses.
fn vmware_static_mac(mac: &str) -> bool {
    let m = mac.to_ascii_lowercase();
    m.starts_with("00:50:56:")
        && u8::from_str_radix(m.get(9..11).unwrap_or("ff"), 16).is_ok_and(|b| b <= 0x3f)
}

/// Windows versions by VMware guestOS id (without `-64`).
const WINDOWS: &[(&str, &str)] = &[
    ("win2000", "2000"),
    ("winxp", "xp"),
    ("winnet", "2003"),
    ("longhorn", "2008"),
    ("winvista", "vista"),
    ("windows7srv", "2008r2"),
    ("windows7", "7"),
    ("windows8srv", "2012"),
    ("windows8", "8"),
    ("windows9srv", "2016"),
    ("windows9", "10"),
    ("windows2019srvnext", "2022"),
    ("windows2022srvnext", "2025"),
    ("windows2019srv", "2019"),
    ("windows11", "11"),
    ("windows12", "12"),
];

const LINUX_HINTS: &[&str] = &[
    "linux",
    "ubuntu",
    "rhel",
    "centos",
    "debian",
    "sles",
    "oracle",
    "fedora",
    "photon",
    "coreos",
    "asianux",
    "mandrake",
    "mandriva",
    "opensuse",
    "suse",
    "turbolinux",
    "amazonlinux",
    "rocky",
    "alma",
    "redhat",
    "nld",
    "vmware-photon",
    "crxpod",
    "crxsys",
];

fn guest_from_vmware(id: &str) -> Guest {
    let lower = id.to_ascii_lowercase();
    let base = lower.trim_end_matches("-64");
    let x86_64 = lower.ends_with("-64")
        || [
            "windows9",
            "windows11",
            "windows2019",
            "windows2022",
            "windows12",
            "windows8srv",
            "windows9srv",
            "windows7srv",
        ]
        .iter()
        .any(|p| base.starts_with(p));
    let (family, version) = if base.starts_with("win") || base.starts_with("longhorn") {
        let v = WINDOWS
            .iter()
            .find(|(p, _)| base.starts_with(p))
            .map(|(_, v)| v.to_string());
        (OsFamily::Windows, v)
    } else if LINUX_HINTS.iter().any(|h| base.contains(h)) {
        (OsFamily::Linux, Some(base.to_string()))
    } else if base.contains("freebsd") || base.contains("openbsd") || base.contains("netbsd") {
        (OsFamily::Bsd, Some(base.to_string()))
    } else if base.contains("solaris") {
        (OsFamily::Solaris, Some(base.to_string()))
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

/// A VMware guestOS id for a guest that has none from VMware.
fn vmware_guest_id(g: &Guest) -> String {
    let id = match (g.family, g.version.as_deref()) {
        (OsFamily::Windows, Some(v)) => WINDOWS
            .iter()
            .find(|(_, ver)| *ver == v)
            .map(|(p, _)| p.to_string())
            .unwrap_or_else(|| "windows9".into()),
        (OsFamily::Windows, None) => "windows9".into(),
        (OsFamily::Linux, _) => "otherlinux".into(),
        (OsFamily::Bsd, _) => "freebsd".into(),
        (OsFamily::Solaris, _) => "solaris11".into(),
        (OsFamily::Other, _) => "other".into(),
    };
    if g.x86_64 {
        format!("{id}-64")
    } else {
        id
    }
}

/// The snapshot names in a `.vmsd` (`snapshotN.displayName`), in order.
pub fn snapshot_names(vmsd: &VmxDocument) -> Vec<String> {
    let mut out: Vec<(u32, String)> = vmsd
        .keys()
        .filter_map(|k| {
            let lower = k.to_ascii_lowercase();
            let n = lower
                .strip_prefix("snapshot")?
                .strip_suffix(".displayname")?
                .parse()
                .ok()?;
            Some((n, vmsd.get(k)?.to_string()))
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX: &str = include_str!("../../../fixtures/vms/linux-web/linux-web.vmx");
    const WINDOWS: &str = include_str!("../../../fixtures/vms/winsrv/winsrv.vmx");

    fn lower(text: &str) -> Lowered {
        VmxDocument::parse(text.as_bytes()).unwrap().lower()
    }

    #[test]
    fn parse_render_is_byte_identical_and_set_touches_one_line() {
        for text in [
            LINUX,
            WINDOWS,
            "a = \"1\"\r\n# c\r\n\r\nb = \"2\"\r\n",
            "x = \"1\"",
        ] {
            let d = VmxDocument::parse(text.as_bytes()).unwrap();
            let again = d.render();
            // A file without a final newline gains one; nothing else moves.
            assert_eq!(
                again.trim_end_matches(['\r', '\n']),
                text.trim_end_matches(['\r', '\n'])
            );
        }
        let mut d = VmxDocument::parse(LINUX.as_bytes()).unwrap();
        d.set("MEMSIZE", "8192");
        let out = d.render();
        let changed: Vec<_> = LINUX
            .lines()
            .zip(out.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed, [("memsize = \"4096\"", "memsize = \"8192\"")]);
    }

    #[test]
    fn escapes_and_case_insensitive_keys() {
        let d = VmxDocument::parse(b"Annotation = \"a|0Ab|7Cc|22\"\n").unwrap();
        assert_eq!(d.get("annotation"), Some("a\nb|c\""));
        let mut e = VmxDocument::default();
        e.set("annotation", "a\nb|c\"#");
        assert_eq!(e.render(), "annotation = \"a|0Ab|7Cc|22|23\"\n");
        assert_eq!(
            VmxDocument::parse(e.render().as_bytes())
                .unwrap()
                .get("ANNOTATION"),
            Some("a\nb|c\"#")
        );
    }

    #[test]
    fn linux_sample_lowers_to_the_model() {
        let Lowered { vm, findings } = lower(LINUX);
        assert_eq!(vm.name, "linux-web");
        assert_eq!(
            vm.uuid.as_deref(),
            Some("564d9e0f-7a0a-3c4b-a29e-1f3b8e6b2a1c")
        );
        assert_eq!(vm.memory_mib, 4096);
        assert_eq!((vm.cpu.vcpus, vm.cpu.sockets, vm.cpu.cores), (4, 2, 2));
        assert_eq!(vm.guest.family, OsFamily::Linux);
        assert!(!vm.clock_localtime);
        assert_eq!(vm.firmware.kind, FirmwareKind::Bios);
        assert_eq!(
            vm.description.as_deref(),
            Some("Web front end\nOwner: ops|web")
        );
        assert_eq!(vm.controllers[0].model.as_deref(), Some("lsilogic"));
        let disks: Vec<_> = vm
            .disks
            .iter()
            .map(|d| {
                (
                    d.device,
                    d.address(),
                    d.source.as_ref().map(|s| s.to_string()),
                    d.boot_order,
                )
            })
            .collect();
        assert_eq!(
            disks,
            [
                (
                    DeviceKind::Disk,
                    "scsi0:0".into(),
                    Some("linux-web.vmdk".into()),
                    Some(1)
                ),
                (
                    DeviceKind::Disk,
                    "scsi0:1".into(),
                    Some("linux-web-data.vmdk".into()),
                    None
                ),
                (
                    DeviceKind::Cdrom,
                    "ide1:0".into(),
                    Some("ubuntu-22.04.3-live-server-amd64.iso".into()),
                    Some(2)
                ),
            ]
        );
        assert_eq!(vm.disks[1].mode.as_deref(), Some("independent-persistent"));
        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[0].mac.as_deref(), Some("00:0c:29:5a:7b:9c"));
        assert_eq!(vm.nics[1].mac.as_deref(), Some("00:50:56:3f:00:11"));
        assert!(!vm.nics[1].connected);
        assert_eq!(vm.serials[0].kind, SerialKind::File);
        assert_eq!(vm.graphics.as_ref().unwrap().vram_kib, Some(16384));
        assert!(findings.is_empty(), "{findings:?}");
        let v = vm.validate();
        assert_eq!(
            v.iter().map(|f| f.code.as_str()).collect::<Vec<_>>(),
            ["independent-disk"]
        );
    }

    #[test]
    fn windows_sample_lowers_to_the_model() {
        let Lowered { vm, .. } = lower(WINDOWS);
        assert_eq!(vm.name, "winsrv-2019");
        assert_eq!(vm.memory_mib, 16384, "memSize is case-insensitive");
        assert_eq!((vm.cpu.vcpus, vm.cpu.sockets, vm.cpu.cores), (8, 2, 4));
        assert_eq!(vm.firmware.kind, FirmwareKind::Uefi);
        assert!(vm.firmware.secure_boot);
        assert_eq!(
            vm.firmware.efi_vars.as_ref().unwrap().to_string(),
            "winsrv.nvram"
        );
        assert_eq!(vm.guest.family, OsFamily::Windows);
        assert_eq!(vm.guest.version.as_deref(), Some("2019"));
        assert!(vm.clock_localtime);
        assert!(vm.tpm);
        assert_eq!(vm.controllers[0].model.as_deref(), Some("pvscsi"));
        assert_eq!(vm.disks[1].device, DeviceKind::Cdrom);
        assert_eq!(
            vm.disks[1].source, None,
            "a host drive becomes an empty drive"
        );
        assert_eq!(vm.nics[0].model, "vmxnet3");
        assert_eq!(vm.nics[0].network.as_deref(), Some("VM Network"));
        assert_eq!(
            vm.genid.as_deref(),
            Some("cc045e15-389a-3dae-8987-940a09512cc5")
        );
    }

    #[test]
    fn raise_then_lower_keeps_every_modelled_field() {
        for text in [LINUX, WINDOWS] {
            let first = lower(text).vm;
            let (doc, _) = VmxDocument::raise(&first);
            let again = VmxDocument::parse(doc.render().as_bytes())
                .unwrap()
                .lower()
                .vm;
            let want = first.clone();
            assert_eq!(again, want, "{}", doc.render());
        }
    }

    #[test]
    fn bad_input_is_a_clear_error_naming_the_line() {
        let err = |t: &[u8]| VmxDocument::parse(t).unwrap_err().to_string();
        let e = err(b"a = \"1\"\nmemsize = \"1\"\nMemSize = \"2\"\n");
        assert!(e.contains("line 3") && e.contains("line 2"), "{e}");
        let e = err(b"a = \"1\"\nthis is not a key value line\n");
        assert!(e.contains("line 2") && e.contains("key"), "{e}");
        let e = err(b".encoding = \"UTF-8\"\ndisplayName = \"caf\xe9\"\n");
        assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
        let e = err(b".encoding = \"Shift_JIS\"\n");
        assert!(e.contains("shift_jis"), "{e}");
        let e = err(b"a = \"unterminated\n");
        assert!(e.contains("line 1") && e.contains("quote"), "{e}");
        // Without .encoding, windows-1252 bytes are read as such.
        let d = VmxDocument::parse(b"displayName = \"caf\xe9\"\n").unwrap();
        assert_eq!(d.get("displayName"), Some("café"));
    }

    #[test]
    fn datastore_paths_and_rdm_are_recognised() {
        let vm = lower("scsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"/vmfs/volumes/datastore1/db/db.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.deviceType = \"rawDisk\"\nscsi0:1.fileName = \"db_1-rdm.vmdk\"\nmemsize = \"1024\"\ndisplayName = \"db\"\n").vm;
        assert_eq!(
            vm.disks[0].source,
            Some(DiskRef::Datastore {
                datastore: "datastore1".into(),
                path: "db/db.vmdk".into()
            })
        );
        assert!(matches!(vm.disks[1].source, Some(DiskRef::Device { .. })));
        assert!(vm.validate().iter().any(|f| f.code == "raw-device-mapping"));
    }

    #[test]
    fn vmsd_snapshot_names() {
        let d = VmxDocument::parse(b".encoding = \"UTF-8\"\nsnapshot.lastUID = \"2\"\nsnapshot1.displayName = \"after update\"\nsnapshot0.displayName = \"clean install\"\n").unwrap();
        assert_eq!(snapshot_names(&d), ["clean install", "after update"]);
    }
}
