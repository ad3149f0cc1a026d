//! The VMware → KVM mapping: which devices a converted VM gets, and why.
//!
//! Every change is returned as a [`Change`] so the user sees what was done
//! (ARCHITECTURE.md, "The VMware → KVM mapping"). The defaults:
//! SCSI controllers become virtio-scsi and NICs virtio-net (MACs kept);
//! IDE moves to SATA (q35 has no IDE); the machine is q35; Windows guests,
//! which may lack virtio drivers, keep their disks on SATA and get an
//! Intel NIC unless virtio is forced; thin disks get discard.

use std::fmt;

use vmshift_model::{
    Bus, Controller, DeviceKind, Disk, DiskFormat, Finding, Nic, OsFamily, SerialKind, Severity, Vm,
};

/// What the mapping may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOptions {
    /// Keep controller and NIC models where KVM has them (`--keep-models`).
    pub keep_models: bool,
    /// Use virtio even for Windows guests (`--virtio`).
    pub force_virtio: bool,
    /// The format the disks are converted to.
    pub disk_format: DiskFormat,
    /// Where each VMware network goes (`--network-map NAME=TARGET`): the
    /// name as the source names it (a port group, `bridged`, `nat`,
    /// `hostonly`, `vmnet2`), compared without regard to case.
    pub networks: Vec<(String, NetTarget)>,
    /// The host bridge for every bridged NIC not mapped otherwise
    /// (`--bridge NAME`).
    pub bridge: Option<String>,
    /// The target emulates NVMe disks (the QEMU script; libvirt where its
    /// schema has `bus='nvme'`): an NVMe disk may stay on NVMe.
    pub nvme: bool,
    /// What the guest inside the disks drives, read offline (None: not
    /// read). It decides between virtio and the fallback models unless a
    /// flag (`--virtio`, `--keep-models`) already did: the user's flags,
    /// then the guest's facts, then the defaults.
    pub guest: Option<GuestDrivers>,
}

/// What the guest can drive, as read from its disks: each `Some((yes,
/// why))` where the guest says, `None` where it does not (the defaults
/// then apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDrivers {
    /// It boots from a virtio disk (virtio-scsi or virtio-blk), or it does
    /// not but boots from SATA (AHCI).
    pub virtio_disk: Option<(bool, String)>,
    /// It has a virtio-net driver.
    pub virtio_net: Option<(bool, String)>,
}

impl Default for MapOptions {
    fn default() -> MapOptions {
        MapOptions {
            keep_models: false,
            force_virtio: false,
            disk_format: DiskFormat::Qcow2,
            networks: Vec::new(),
            bridge: None,
            nvme: false,
            guest: None,
        }
    }
}

/// Where a VMware network goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetTarget {
    /// A libvirt network by name.
    Network(String),
    /// A host bridge (libvirt `type='bridge'`, Proxmox `bridge=`, QEMU
    /// `-netdev bridge`), its traffic tagged with a VLAN if given.
    Bridge {
        /// The bridge.
        name: String,
        /// The 802.1Q tag, 1 to 4094.
        vlan: Option<u16>,
    },
}

impl NetTarget {
    /// Reads `bridge:NAME`, `bridge:NAME,tag=N` or `network:NAME`.
    pub fn parse(text: &str) -> Result<NetTarget, String> {
        let usage = "expected bridge:NAME, bridge:NAME,tag=VLAN or network:NAME";
        if let Some(net) = text.strip_prefix("network:") {
            if net.is_empty() {
                return Err(format!("'{text}': no network name; {usage}"));
            }
            if net.contains(',') || net.contains('/') {
                return Err(format!(
                    "'{text}': a libvirt network name has no ',' or '/' (a VLAN tag goes with bridge:NAME,tag=VLAN)"
                ));
            }
            return Ok(NetTarget::Network(net.to_string()));
        }
        let Some(rest) = text.strip_prefix("bridge:") else {
            return Err(format!("'{text}': {usage}"));
        };
        let (name, vlan) = match rest.split_once(",tag=") {
            Some((n, t)) => {
                let tag: u16 = t
                    .parse()
                    .ok()
                    .filter(|v| (1..=4094).contains(v))
                    .ok_or_else(|| format!("'{text}': a VLAN tag is 1 to 4094"))?;
                (n, Some(tag))
            }
            None => (rest, None),
        };
        let ok = (1..=15).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(format!(
                "'{text}': '{name}' is not a bridge name (1 to 15 letters, digits, '_', '.', '-')"
            ));
        }
        Ok(NetTarget::Bridge {
            name: name.to_string(),
            vlan,
        })
    }
}

impl NetTarget {
    /// The target as `--network-map` spells it.
    pub fn spec(&self) -> String {
        match self {
            NetTarget::Network(n) => format!("network:{n}"),
            NetTarget::Bridge { name, vlan: None } => format!("bridge:{name}"),
            NetTarget::Bridge {
                name,
                vlan: Some(v),
            } => format!("bridge:{name},tag={v}"),
        }
    }
}

/// A network's name as maps compare it: without `/dev/`, lower case.
pub fn net_key(name: &str) -> String {
    name.trim_start_matches("/dev/").to_ascii_lowercase()
}

impl fmt::Display for NetTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetTarget::Network(n) => write!(f, "network {n}"),
            NetTarget::Bridge { name, vlan: None } => write!(f, "bridge {name}"),
            NetTarget::Bridge {
                name,
                vlan: Some(v),
            } => write!(f, "bridge {name}, VLAN {v}"),
        }
    }
}

/// What a VMware Workstation connection is, when `network` names one
/// rather than a network: `bridged`, `nat`, `hostonly` or a custom
/// `vmnetN` (`/dev/vmnetN` on Linux hosts).
fn workstation_kind(network: &str) -> Option<&'static str> {
    let n = network.trim_start_matches("/dev/").to_ascii_lowercase();
    match n.as_str() {
        "bridged" => Some("bridged"),
        "nat" => Some("nat"),
        "hostonly" => Some("hostonly"),
        "custom" | "pvn" => Some("custom"),
        // Workstation's default networks: vmnet0 bridged, vmnet1
        // host-only, vmnet8 NAT; others are custom.
        "vmnet0" => Some("bridged"),
        "vmnet1" => Some("hostonly"),
        "vmnet8" => Some("nat"),
        _ if n
            .strip_prefix("vmnet")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Some("custom")
        }
        _ => None,
    }
}

/// One change the mapping made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The model field (`disks[0].bus`).
    pub path: String,
    /// Before.
    pub from: String,
    /// After.
    pub to: String,
    /// Why.
    pub why: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} → {} ({})",
            self.path, self.from, self.to, self.why
        )
    }
}

/// SCSI controller models QEMU emulates (so `--keep-models` can keep them).
const QEMU_SCSI: &[&str] = &["lsilogic", "lsisas1068", "pvscsi", "virtio-scsi"];
/// NIC models QEMU emulates.
const QEMU_NICS: &[&str] = &["e1000", "e1000e", "rtl8139", "virtio", "vmxnet3"];

/// Whether a Windows version ships without an e1000 (82540EM) driver but
/// with e1000e (82574L): Windows 8 / Server 2012 and later.
fn windows_wants_e1000e(version: Option<&str>) -> bool {
    !matches!(
        version,
        Some("2000" | "xp" | "2003" | "2008" | "vista" | "7" | "2008r2")
    )
}

/// `vm` with KVM devices, and the list of changes.
pub fn to_kvm(vm: &Vm, opts: &MapOptions) -> (Vm, Vec<Change>) {
    let mut out = vm.clone();
    let mut ch = Vec::new();
    let mut change = |path: String, from: String, to: String, why: &str| {
        if from != to {
            ch.push(Change {
                path,
                from,
                to,
                why: why.to_string(),
            });
        }
    };
    let windows = vm.guest.family == OsFamily::Windows;
    // A source already on virtio (a libvirt or Proxmox VM) has the drivers.
    let has_virtio = vm.disks.iter().any(|d| d.bus == Bus::Virtio)
        || vm
            .controllers
            .iter()
            .any(|c| c.model.as_deref().is_some_and(|m| m.starts_with("virtio")))
        || vm.nics.iter().any(|n| n.model == "virtio");
    let virtio = opts.force_virtio || !windows || has_virtio;
    // Flags first, then what the guest drives, then the default above.
    let from_guest = |fact: Option<&(bool, String)>| {
        if opts.force_virtio {
            return (true, None);
        }
        match fact {
            Some((yes, why)) => (*yes, Some(why.clone())),
            None => (virtio, None),
        }
    };
    let (disk_virtio, disk_why) =
        from_guest(opts.guest.as_ref().and_then(|g| g.virtio_disk.as_ref()));
    let (net_virtio, net_why) = from_guest(opts.guest.as_ref().and_then(|g| g.virtio_net.as_ref()));

    // Name: libvirt refuses '/', and control characters break every format.
    let clean: String = vm
        .name
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    let clean = if clean.trim().is_empty() {
        "vm".to_string()
    } else {
        clean.trim().to_string()
    };
    change(
        "name".into(),
        vm.name.clone(),
        clean.clone(),
        "a name libvirt and QEMU accept: no '/', no control characters, not empty",
    );
    out.name = clean;

    // Machine: q35, or the source's own version of it without vendor
    // suffixes (Proxmox's `+pve0`, `.pxe`).
    let machine = match vm.machine.as_deref() {
        None => "q35".to_string(),
        Some(m) => {
            let base = m.split('+').next().unwrap_or(m);
            base.strip_suffix(".pxe").unwrap_or(base).to_string()
        }
    };
    change(
        "machine".into(),
        vm.machine.clone().unwrap_or_else(|| "(none)".into()),
        machine.clone(),
        "q35: PCIe, AHCI and SMM for Secure Boot (vendor suffixes dropped: upstream QEMU has no such machine)",
    );
    out.machine = Some(machine);

    // Serial ports: a converted VM must not write into the host's files,
    // pipes or devices the source named; a file stays a log (the caller
    // places it), everything else becomes a pseudo-terminal.
    for (i, s) in out.serials.iter_mut().enumerate() {
        if matches!(
            s.kind,
            SerialKind::Pipe | SerialKind::Device | SerialKind::Network
        ) {
            change(
                format!("serials[{i}]"),
                format!("{:?} {}", s.kind, s.target.clone().unwrap_or_default()).to_lowercase(),
                "pty".into(),
                "host pipes, devices and sockets named by the source are not carried over",
            );
            s.kind = SerialKind::Pty;
            s.target = None;
        }
    }

    // Disks: where each goes.
    let scsi_model = |c: u32| {
        vm.controllers
            .iter()
            .find(|x| x.bus == Bus::Scsi && x.index == c)
            .and_then(|x| x.model.clone())
            .unwrap_or_else(|| "lsilogic".into())
    };
    let mut disks: Vec<Disk> = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let mut nd = d.clone();
        let target = match (d.device, d.bus) {
            (DeviceKind::Floppy, _) => Bus::Fdc,
            (DeviceKind::Cdrom, _) => Bus::Sata,
            (_, Bus::Ide) => Bus::Sata,
            (_, Bus::Virtio) if disk_virtio => Bus::Virtio,
            (_, Bus::Scsi)
                if opts.keep_models && QEMU_SCSI.contains(&scsi_model(d.controller).as_str()) =>
            {
                Bus::Scsi
            }
            // The controller the guest boots from today, where the
            // target has it: kept for a guest that may lack virtio
            // drivers, and when asked.
            (DeviceKind::Disk, Bus::Nvme) if opts.nvme && (opts.keep_models || !disk_virtio) => {
                Bus::Nvme
            }
            (_, Bus::Scsi | Bus::Nvme | Bus::Sata | Bus::Usb | Bus::Virtio) if !disk_virtio => {
                Bus::Sata
            }
            (_, Bus::Sata) if opts.keep_models => Bus::Sata,
            (_, _) => Bus::Scsi,
        };
        let guest_why;
        let why = match (d.device, target) {
            (DeviceKind::Cdrom, _) => "CD-ROMs go on SATA: q35 has no IDE",
            (_, Bus::Sata) if d.bus == Bus::Ide => "q35 has no IDE; SATA (AHCI) is the equivalent",
            (_, Bus::Scsi) if opts.keep_models => "--keep-models",
            (_, Bus::Sata | Bus::Scsi | Bus::Virtio) if disk_why.is_some() => {
                guest_why = format!("the guest: {}", disk_why.as_deref().unwrap_or_default());
                guest_why.as_str()
            }
            (_, Bus::Sata) if !disk_virtio => "a Windows guest may lack virtio drivers: its disks stay on SATA (AHCI), which Windows boots from with its own driver (use --virtio once the drivers are installed)",
            _ => "virtio-scsi: fast, and every modern guest has the driver",
        };
        if target != d.bus {
            change(
                format!("disks[{i}].bus"),
                d.bus.to_string(),
                target.to_string(),
                why,
            );
        }
        nd.bus = target;
        if d.device == DeviceKind::Disk && d.source.is_some() && !d.passthrough {
            let to = opts.disk_format;
            change(
                format!("disks[{i}].format"),
                d.format.map_or("?".into(), |f| f.to_string()),
                to.to_string(),
                "the disk is converted to a format native to QEMU",
            );
            nd.format = Some(to);
            if d.thin && !d.discard {
                nd.discard = true;
                change(
                    format!("disks[{i}].discard"),
                    "off".into(),
                    "unmap".into(),
                    "the source disk was thin: the guest's TRIM/UNMAP keeps the image small",
                );
            }
        }
        disks.push(nd);
    }
    // Addresses: devices that stay where they were keep their address;
    // the others are numbered after them on their new bus, in their
    // original order (the boot order travels as bootindex, and the guest's
    // sda/sdb order is kept). AHCI controllers have six ports each.
    let ports = |bus: Bus| if bus == Bus::Sata { 6 } else { u32::MAX };
    let mut taken: std::collections::HashSet<(Bus, u32, u32)> = Default::default();
    let stays: Vec<bool> = disks
        .iter()
        .zip(&vm.disks)
        .map(|(n, o)| n.bus == o.bus && o.unit < ports(o.bus))
        .collect();
    for (i, d) in disks.iter().enumerate() {
        if stays[i] {
            taken.insert((d.bus, d.controller, d.unit));
        }
    }
    let mut claimed: std::collections::HashSet<(Bus, u32, u32)> = Default::default();
    for i in 0..disks.len() {
        let d = &mut disks[i];
        // The first device at an address keeps it; a second one moves.
        let key = (d.bus, d.controller, d.unit);
        if stays[i] && claimed.insert(key) {
            continue;
        }
        let per = ports(d.bus);
        let mut n: u64 = 0;
        let (c, u) = loop {
            let (c, u) = ((n / u64::from(per)) as u32, (n % u64::from(per)) as u32);
            if !taken.contains(&(d.bus, c, u)) && !claimed.contains(&(d.bus, c, u)) {
                break (c, u);
            }
            n += 1;
        };
        claimed.insert((d.bus, c, u));
        change(
            format!("disks[{i}].address"),
            vm.disks[i].address(),
            format!("{}{c}:{u}", d.bus),
            "placed on its new bus after the devices already there",
        );
        d.controller = c;
        d.unit = u;
    }
    out.disks = disks;

    // Controllers: what the disks now need.
    let mut controllers: Vec<Controller> = Vec::new();
    for d in &out.disks {
        if !matches!(d.bus, Bus::Scsi | Bus::Sata) {
            continue;
        }
        if controllers
            .iter()
            .any(|c| c.bus == d.bus && c.index == d.controller)
        {
            continue;
        }
        let model = match d.bus {
            Bus::Scsi => {
                let old = vm
                    .controllers
                    .iter()
                    .find(|c| c.bus == Bus::Scsi && c.index == d.controller)
                    .and_then(|c| c.model.clone());
                let keep =
                    opts.keep_models && old.as_deref().is_some_and(|m| QEMU_SCSI.contains(&m));
                let m = if keep {
                    old.clone().unwrap_or_default()
                } else {
                    "virtio-scsi".into()
                };
                if let Some(o) = old {
                    change(
                        format!("controllers[scsi{}].model", d.controller),
                        o,
                        m.clone(),
                        "virtio-scsi: fast, and every modern guest has the driver",
                    );
                }
                Some(m)
            }
            _ => Some("ahci".into()),
        };
        controllers.push(Controller {
            bus: d.bus,
            index: d.controller,
            model,
        });
    }
    out.controllers = controllers;

    // NICs.
    for (i, n) in out.nics.iter_mut().enumerate() {
        let to = if opts.keep_models && QEMU_NICS.contains(&n.model.as_str()) {
            n.model.clone()
        } else if net_virtio {
            "virtio".into()
        } else if !windows || windows_wants_e1000e(vm.guest.version.as_deref()) {
            "e1000e".into()
        } else {
            "e1000".into()
        };
        let why = match (&net_why, net_virtio) {
            _ if opts.keep_models && QEMU_NICS.contains(&n.model.as_str()) => "--keep-models".to_string(),
            (Some(w), _) => format!("the guest: {w}; the MAC is kept"),
            (None, true) => "virtio-net: fast; the MAC is kept".to_string(),
            (None, false) => "a Windows guest may lack virtio drivers: an Intel NIC Windows has a driver for; the MAC is kept".to_string(),
        };
        change(
            format!("nics[{i}].model"),
            n.model.clone(),
            to.clone(),
            &why,
        );
        n.model = to;
        // Where it is attached: the user's map first, then --bridge for
        // bridged NICs, then the closest default.
        let from = n
            .network
            .clone()
            .or_else(|| n.bridge.clone())
            .unwrap_or_default();
        let kind = workstation_kind(&from);
        let mapped = opts
            .networks
            .iter()
            .find(|(k, _)| net_key(k) == net_key(&from))
            .map(|(_, t)| (t.clone(), "as --network-map says"));
        let mapped = mapped.or_else(|| match (kind, &opts.bridge) {
            (Some("nat" | "hostonly" | "custom"), _) | (_, None) => None,
            (_, Some(b)) => Some((
                NetTarget::Bridge {
                    name: b.clone(),
                    vlan: n.vlan,
                },
                "--bridge names the host bridge for every NIC not on VMware NAT, host-only or a custom vmnet",
            )),
        });
        let path = format!("nics[{i}].network");
        match mapped {
            Some((t, why)) => {
                change(path, from.clone(), t.to_string(), why);
                match t {
                    NetTarget::Network(net) => {
                        n.network = Some(net);
                        n.bridge = None;
                        n.vlan = None;
                    }
                    NetTarget::Bridge { name, vlan } => {
                        n.network = None;
                        n.bridge = Some(name);
                        n.vlan = vlan;
                    }
                }
            }
            None => {
                if let Some(kind) = kind {
                    let why = match kind {
                        "bridged" => "bridged on VMware (on the LAN), NAT here: libvirt's 'default' network (Proxmox: bridge vmbr0; the QEMU script: user-mode NAT); --bridge NAME puts bridged NICs on a host bridge",
                        "nat" => "NAT on VMware, NAT here: libvirt's 'default' network (Proxmox: bridge vmbr0; the QEMU script: user-mode NAT)",
                        "hostonly" => "host-only on VMware; libvirt has no host-only network by default, so libvirt's 'default' NAT network (the QEMU script: user-mode NAT); --network-map hostonly=network:NAME names an isolated one",
                        _ => "a custom VMware network (vmnetN) has no counterpart here: libvirt's 'default' NAT network (the QEMU script: user-mode NAT); --network-map names where it goes",
                    };
                    change(path, from.clone(), "network default".into(), why);
                    n.network = Some("default".into());
                    n.bridge = None;
                }
            }
        }
    }

    // Display.
    let g = out.graphics.get_or_insert_with(Default::default);
    let video = if virtio { "virtio" } else { "vga" };
    if g.video.as_deref() != Some(video) && !(opts.keep_models && g.video.as_deref() == Some("vga"))
    {
        change(
            "graphics.video".into(),
            g.video.clone().unwrap_or_else(|| "(none)".into()),
            video.into(),
            if virtio {
                "virtio-gpu: the Linux kernel drives it"
            } else {
                "standard VGA: every Windows has a driver"
            },
        );
        g.video = Some(video.into());
        if video == "virtio" {
            g.vram_kib = None; // virtio-gpu has no fixed video memory
        }
    }
    if g.protocol.is_none() {
        g.protocol = Some("vnc".into());
    }
    (out, ch)
}

fn linux_nic_names() -> Finding {
    Finding::new(
        Severity::Info,
        "linux-nic-names",
        "nics",
        "network interface names follow the PCI slot: ens192/ens33 under VMware become names like enp1s0 on KVM; update configurations that name the old interface (netplan, ifcfg, NetworkManager, udev rules) or match on the MAC, which is kept",
    )
}

/// What the guest will notice after the move, beyond the device list.
pub fn migration_findings(src: &Vm, kvm: &Vm, opts: &MapOptions) -> Vec<Finding> {
    let mut f = Vec::new();
    // The guest was read: its own findings say what it has, not "may".
    let guest_disk = opts.guest.as_ref().and_then(|g| g.virtio_disk.as_ref());
    match src.guest.family {
        OsFamily::Linux
            if guest_disk.is_none()
                && kvm
                .disks
                .iter()
                .zip(&src.disks)
                .any(|(k, s)| k.bus != s.bus && k.device == DeviceKind::Disk) =>
        {
            f.push(Finding::new(
                Severity::Warning,
                "linux-initramfs-drivers",
                "disks",
                "the disks move to another controller: an initramfs built for this host only (dracut's hostonly mode on RHEL and its relatives) may lack virtio_scsi/virtio_blk and stop at the emergency shell; rebuild it with those drivers (dracut -f --add-drivers 'virtio_scsi virtio_blk virtio_pci') before converting",
            ));
            if !kvm.nics.is_empty() {
                f.push(linux_nic_names());
            }
        }
        OsFamily::Linux if !kvm.nics.is_empty() => f.push(linux_nic_names()),
        OsFamily::Windows if !opts.force_virtio && guest_disk.is_some_and(|g| g.0) => {}
        OsFamily::Windows if opts.force_virtio => f.push(Finding::new(
            Severity::Warning,
            "windows-virtio-forced",
            "disks",
            "virtio disks and NICs were forced for a Windows guest: without the virtio-win drivers installed beforehand it stops with INACCESSIBLE_BOOT_DEVICE",
        )),
        OsFamily::Windows => f.push(Finding::new(
            Severity::Info,
            "windows-virtio-drivers",
            "disks",
            if opts.keep_models {
                "the Windows guest keeps the controller and NIC models QEMU emulates (--keep-models); install the virtio-win drivers in the guest, then switch to virtio (convert with --virtio) for speed"
            } else {
                "the Windows guest keeps SATA disks and an Intel NIC, which it has drivers for; install the virtio-win drivers in the guest, then switch to virtio (convert with --virtio) for speed"
            },
        )),
        _ => {}
    }
    if src.guest.family == OsFamily::Windows {
        f.extend(windows_boot_controller(src, kvm));
    }
    f.extend(network_findings(src, opts));
    f
}

/// The Windows driver that runs a disk's controller, and whether it ships
/// with Windows.
fn windows_storage_driver(vm: &Vm, d: &Disk, target: bool) -> (&'static str, bool) {
    match d.bus {
        Bus::Sata => ("storahci", true),
        Bus::Ide => ("pciide", true),
        Bus::Nvme => ("stornvme", true),
        Bus::Virtio => ("viostor", false),
        Bus::Usb => ("USBSTOR", true),
        Bus::Fdc => ("flpydisk", true),
        Bus::Scsi => {
            let model = vm
                .controllers
                .iter()
                .find(|c| c.bus == Bus::Scsi && c.index == d.controller)
                .and_then(|c| c.model.as_deref())
                .unwrap_or("lsilogic");
            match model {
                // QEMU's "lsilogic" is an LSI 53C895A, not VMware's LSI
                // 53C1030: 64-bit Windows has no driver for it.
                "lsilogic" if target => ("lsi53c895a", false),
                "lsisas1068" => ("LSI_SAS", true),
                "pvscsi" => ("pvscsi", false),
                "buslogic" => ("BusLogic", false),
                m if m.starts_with("virtio") => ("vioscsi", false),
                _ => ("LSI_SCSI", true),
            }
        }
    }
}

/// The boot disk of a Windows guest on another controller: what the guest
/// needs before it moves, or it stops with INACCESSIBLE_BOOT_DEVICE.
fn windows_boot_controller(src: &Vm, kvm: &Vm) -> Option<Finding> {
    let disks = || {
        src.disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.device == DeviceKind::Disk)
    };
    let (i, s) = disks()
        .filter(|(_, d)| d.boot_order.is_some())
        .min_by_key(|(_, d)| d.boot_order)
        .or_else(|| disks().next())?;
    let k = kvm.disks.get(i)?;
    let (from, _) = windows_storage_driver(src, s, false);
    let (to, inbox) = windows_storage_driver(kvm, k, true);
    if from == to {
        return None;
    }
    let how = if to == "lsi53c895a" {
        "QEMU's LSI Logic model is an LSI 53C895A, for which 64-bit Windows has no driver: convert without --keep-models (SATA, storahci) or install virtio-win and use --virtio".to_string()
    } else if inbox {
        format!(
            "{to} ships with Windows but starts at boot only where Windows was installed on it: before converting, in the guest run `reg add HKLM\\SYSTEM\\CurrentControlSet\\Services\\{to} /v Start /t REG_DWORD /d 0 /f` and `reg delete HKLM\\SYSTEM\\CurrentControlSet\\Services\\{to}\\StartOverride /f`, or `bcdedit /set {{current}} safeboot minimal` before the last shutdown (Safe Mode loads every storage driver; undo it with `bcdedit /deletevalue {{current}} safeboot` once it is up)"
        )
    } else {
        format!(
            "{to} is a virtio-win driver: install the virtio-win drivers in the guest before converting (virtio-win-guest-tools.exe), which registers it to start at boot"
        )
    };
    Some(Finding::new(
        Severity::Warning,
        "windows-boot-controller",
        format!("disks[{i}].bus"),
        format!(
            "the Windows boot disk moves from {} ({from}) to {} ({to}): Windows finds it only if {to} starts at boot, or it stops with INACCESSIBLE_BOOT_DEVICE (0x7B); {how}",
            s.address(),
            k.address()
        ),
    ))
}

/// What `--network-map` did not match, and the networks left for the
/// host to provide.
fn network_findings(src: &Vm, opts: &MapOptions) -> Vec<Finding> {
    let mut f = Vec::new();
    let source = |n: &Nic| n.network.clone().or_else(|| n.bridge.clone());
    let on: Vec<String> = src.nics.iter().filter_map(source).collect();
    for (key, target) in &opts.networks {
        if !on.iter().any(|n| net_key(n) == net_key(key)) {
            let have = if on.is_empty() {
                "it has no NIC on a network".to_string()
            } else {
                format!("its NICs are on: {}", on.join(", "))
            };
            f.push(Finding::new(
                Severity::Warning,
                "network-map-unused",
                "nics",
                format!(
                    "--network-map {key}={}: no NIC of this VM is on '{key}' ({have})",
                    target.spec()
                ),
            ));
        }
    }
    f
}

/// For a libvirt target: the networks kept by name, which the host must
/// have.
pub fn libvirt_network_findings(src: &Vm, kvm: &Vm) -> Vec<Finding> {
    let mut f = Vec::new();
    for (i, (s, k)) in src.nics.iter().zip(&kvm.nics).enumerate() {
        let Some(from) = s.network.clone() else {
            continue;
        };
        if from != "default"
            && workstation_kind(&from).is_none()
            && k.network.as_deref() == Some(from.as_str())
        {
            f.push(Finding::new(
                Severity::Info,
                "network-kept",
                format!("nics[{i}].network"),
                format!(
                    "network '{from}' is kept by name: the libvirt host needs a network of that name (virsh net-list); --network-map '{from}'=bridge:BRIDGE[,tag=VLAN] or --bridge BRIDGE attaches it to a host bridge"
                ),
            ));
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::VmxDocument;

    fn vm(text: &str) -> Vm {
        VmxDocument::parse(text.as_bytes()).unwrap().lower().vm
    }

    #[test]
    fn linux_goes_to_virtio_and_keeps_macs_and_boot_disk_first() {
        let src = vm(include_str!(
            "../../../fixtures/vms/linux-web/linux-web.vmx"
        ));
        let (kvm, changes) = to_kvm(&src, &MapOptions::default());
        assert!(kvm
            .disks
            .iter()
            .filter(|d| d.device == DeviceKind::Disk)
            .all(|d| d.bus == Bus::Scsi));
        assert_eq!(kvm.controllers[0].model.as_deref(), Some("virtio-scsi"));
        assert_eq!(kvm.disks[0].address(), "scsi0:0");
        assert_eq!(kvm.disks[0].boot_order, Some(1));
        assert_eq!(kvm.disks[2].bus, Bus::Sata, "CD-ROM");
        assert!(kvm.nics.iter().all(|n| n.model == "virtio"));
        let macs = |v: &Vm| v.nics.iter().map(|n| n.mac.clone()).collect::<Vec<_>>();
        assert_eq!(macs(&kvm), macs(&src));
        assert!(changes
            .iter()
            .any(|c| c.path == "nics[0].model" && c.from == "e1000"));
        assert!(kvm
            .validate()
            .iter()
            .all(|f| f.severity != vmshift_model::Severity::Error));
    }

    #[test]
    fn keep_models_keeps_pvscsi_which_qemu_emulates() {
        let src = vm(include_str!("../../../fixtures/vms/winsrv/winsrv.vmx"));
        let opts = MapOptions {
            keep_models: true,
            ..MapOptions::default()
        };
        let (kvm, _) = to_kvm(&src, &opts);
        assert_eq!(kvm.disks[0].bus, Bus::Scsi);
        assert_eq!(kvm.controllers[0].model.as_deref(), Some("pvscsi"));
    }

    #[test]
    fn many_sata_disks_spread_over_controllers_and_addresses_stay_unique() {
        let mut src = vm(include_str!("../../../fixtures/vms/winsrv/winsrv.vmx"));
        for u in 1..8 {
            let mut d = src.disks[0].clone();
            d.unit = u;
            d.boot_order = None;
            src.disks.push(d);
        }
        // (--keep-models keeps pvscsi, which QEMU emulates: the disks
        // then stay on SCSI; the SATA spreading is the default's.)
        let (kvm, _) = to_kvm(&src, &MapOptions::default());
        assert!(kvm.disks.iter().all(|d| d.bus != Bus::Sata || d.unit < 6));
        assert!(kvm
            .controllers
            .iter()
            .any(|c| c.bus == Bus::Sata && c.index == 1));
        let codes: Vec<String> = kvm.validate().into_iter().map(|f| f.code).collect();
        assert!(
            !codes.contains(&"disk-address-conflict".to_string()),
            "{codes:?}"
        );
    }

    #[test]
    fn a_kvm_source_keeps_its_virtio_devices() {
        let text = include_str!("../../../fixtures/vms/proxmox/101.conf");
        let src = crate::proxmox::ConfDocument::parse(text.as_bytes())
            .unwrap()
            .lower()
            .vm;
        assert_eq!(src.guest.family, OsFamily::Windows);
        let (kvm, _) = to_kvm(&src, &MapOptions::default());
        assert_eq!(kvm.nics[0].model, "virtio");
        assert!(kvm
            .disks
            .iter()
            .filter(|d| d.device == DeviceKind::Disk)
            .all(|d| d.bus == Bus::Scsi));
        assert_eq!(
            kvm.machine.as_deref(),
            Some("pc-q35-8.1"),
            "+pve suffix dropped"
        );
    }

    #[test]
    fn host_serial_devices_become_ptys_and_names_are_cleaned() {
        let mut src = vm(include_str!(
            "../../../fixtures/vms/linux-web/linux-web.vmx"
        ));
        src.name = "a/b\nc".into();
        src.serials[0].kind = SerialKind::Pipe;
        src.serials[0].target = Some("/root/.bashrc".into());
        let (kvm, ch) = to_kvm(&src, &MapOptions::default());
        assert_eq!(kvm.name, "a_b_c");
        assert_eq!(kvm.serials[0].kind, SerialKind::Pty);
        assert_eq!(kvm.serials[0].target, None);
        assert!(ch.iter().any(|c| c.path == "serials[0]"));
    }

    #[test]
    fn windows_stays_on_sata_and_intel_unless_virtio_is_forced() {
        let src = vm(include_str!("../../../fixtures/vms/winsrv/winsrv.vmx"));
        let (kvm, changes) = to_kvm(&src, &MapOptions::default());
        assert_eq!(kvm.disks[0].bus, Bus::Sata);
        assert_eq!(
            kvm.disks[0].address(),
            "sata0:1",
            "after the CD-ROM that was already there"
        );
        assert_eq!(kvm.nics[0].model, "e1000e");
        assert!(changes.iter().any(|c| c.why.contains("virtio drivers")));
        let forced = MapOptions {
            force_virtio: true,
            ..MapOptions::default()
        };
        let (kvm, _) = to_kvm(&src, &forced);
        assert_eq!(kvm.disks[0].bus, Bus::Scsi);
        assert_eq!(kvm.nics[0].model, "virtio");
        assert!(kvm.target_findings().is_empty());
    }
}
