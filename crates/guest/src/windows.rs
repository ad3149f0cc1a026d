//! What a Windows guest is, read offline from its NTFS volume and registry
//! hives (with vmshift's own hive reader): product, version, build and
//! edition (`SOFTWARE`), host name and the storage and network drivers and
//! when they start (`SYSTEM`), VirtIO drivers in the driver store, VMware
//! Tools, and whether the volume was left hibernated or dirty.

use serde::Serialize;

use crate::hive::Hive;
use crate::inspect::{Guest, GuestFinding, Mount};
use crate::ntfs::NtfsVol;
use crate::vfs::{EntryKind, Found, GuestFs};

/// Storage and network drivers a migration cares about: their service
/// name, and what they drive.
const DRIVERS: [(&str, &str); 16] = [
    ("viostor", "VirtIO block (virtio-blk)"),
    ("vioscsi", "VirtIO SCSI (virtio-scsi)"),
    ("netkvm", "VirtIO network (virtio-net)"),
    ("storahci", "SATA AHCI"),
    ("stornvme", "NVMe"),
    ("atapi", "IDE"),
    ("intelide", "IDE (Intel)"),
    ("pciide", "IDE"),
    ("LSI_SAS", "LSI Logic SAS (VMware lsisas1068)"),
    ("LSI_SAS2", "LSI SAS2"),
    ("LSI_SCSI", "LSI Logic parallel (VMware lsilogic)"),
    ("pvscsi", "VMware paravirtual SCSI"),
    ("vmxnet3ndis6", "VMware vmxnet3"),
    ("e1i63x64", "Intel e1000e"),
    ("E1G60", "Intel e1000"),
    ("rtl8139", "Realtek 8139"),
];

/// A driver service in `SYSTEM`.
#[derive(Debug, Clone, Serialize)]
pub struct WinDriver {
    /// Its service name (`storahci`).
    pub name: String,
    /// What it drives.
    pub drives: String,
    /// Its `Start` value: 0 boot, 1 system, 2 automatic, 3 on demand,
    /// 4 disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<u32>,
    /// `Start` in words.
    pub starts: &'static str,
}

/// The Windows-only facts of a guest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowsFacts {
    /// The system root folder on its volume (`/Windows`).
    pub root_dir: String,
    /// The system root as Windows names it (`C:\Windows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_root: Option<String>,
    /// The control set `Select\Current` names (`ControlSet001`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_control_set: Option<String>,
    /// `EditionID` (`ServerStandard`, `Professional`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edition: Option<String>,
    /// `CurrentBuildNumber` (`20348`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The storage and network drivers installed, and when they start.
    pub drivers: Vec<WinDriver>,
    /// The drivers could be read (`SYSTEM` and its Services key are
    /// sound); when not, `drivers` is empty and says nothing.
    pub drivers_read: bool,
    /// VirtIO driver packages in the driver store (`viostor.inf_amd64_…`).
    pub driver_store_virtio: Vec<String>,
    /// `hiberfil.sys` holds an image Windows will resume (hibernation or
    /// Fast Startup).
    pub hibernated: bool,
    /// The NTFS volume is marked dirty (not unmounted cleanly).
    pub ntfs_dirty: bool,
}

fn start_name(v: Option<u32>) -> &'static str {
    match v {
        Some(0) => "boot",
        Some(1) => "system",
        Some(2) => "automatic",
        Some(3) => "on demand",
        Some(4) => "disabled",
        Some(_) => "unknown",
        None => "not set",
    }
}

/// The system root folder of an NTFS volume (`/Windows`, `/WINNT`), if it
/// holds a Windows installation (a `System32` folder; its hives may still
/// be missing or damaged, which the inspection then reports).
pub fn system_root(vol: &NtfsVol) -> Option<String> {
    ["/Windows", "/WINNT"].into_iter().find_map(|r| {
        let ok = vol
            .stat(&format!("{r}/System32"))
            .is_ok_and(|e| e.kind == EntryKind::Dir);
        // The folder's name as the volume spells it.
        ok.then(|| {
            vol.list("/")
                .ok()
                .and_then(|es| {
                    es.into_iter()
                        .find(|e| e.name.eq_ignore_ascii_case(&r[1..]))
                        .map(|e| format!("/{}", e.name))
                })
                .unwrap_or_else(|| r.to_string())
        })
    })
}

fn hive(vol: &NtfsVol, path: &str) -> std::result::Result<Hive, String> {
    let src = vol.file_source(path).map_err(|e| e.to_string())?;
    Hive::open(Box::new(src)).map_err(|e| format!("{path}: {e}"))
}

/// A string value at `key`, `name` (None when absent or not a string).
fn string(h: &Hive, key: &str, name: &str) -> Option<String> {
    let k = h.open_path(key).ok()??;
    let v = k.value(name).ok()??;
    v.as_string().ok().filter(|s| !s.is_empty())
}

fn dword(h: &Hive, key: &str, name: &str) -> Option<u32> {
    let k = h.open_path(key).ok()??;
    let v = k.value(name).ok()??;
    v.as_dword().ok()
}

/// The architecture of a PE image's header.
fn pe_arch(vol: &NtfsVol, path: &str) -> Option<String> {
    let mut head = Vec::new();
    struct Cap<'a>(&'a mut Vec<u8>);
    impl std::io::Write for Cap<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let room = 4096 - self.0.len().min(4096);
            self.0.extend_from_slice(&b[..b.len().min(room)]);
            if room == 0 {
                return Err(std::io::Error::other("enough"));
            }
            Ok(b.len().min(room))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let _ = vol.read_to(path, 1 << 30, &mut Cap(&mut head));
    if head.len() < 0x40 || &head[0..2] != b"MZ" {
        return None;
    }
    let pe = u32::from_le_bytes(head[0x3c..0x40].try_into().ok()?) as usize;
    if head.get(pe..pe + 4)? != b"PE\0\0" {
        return None;
    }
    let machine = u16::from_le_bytes(head.get(pe + 4..pe + 6)?.try_into().ok()?);
    Some(
        match machine {
            0x8664 => "x86_64",
            0x14c => "i386",
            0xaa64 => "aarch64",
            0x1c4 => "arm",
            _ => return None,
        }
        .to_string(),
    )
}

/// Inspects the Windows installation on `found` (an NTFS volume).
pub fn inspect_windows(vol: &NtfsVol, found: &Found, root_dir: &str) -> Guest {
    let mut g = Guest::new(found.info.place.clone(), "windows");
    g.distro = Some("windows".into());
    g.mountpoints.push(Mount {
        path: "/".into(),
        spec: found.info.place.clone(),
        fstype: "ntfs".into(),
        device: Some(found.info.place.clone()),
    });
    let mut w = WindowsFacts {
        root_dir: root_dir.to_string(),
        ntfs_dirty: vol.dirty(),
        ..WindowsFacts::default()
    };
    g.arch = pe_arch(vol, &format!("{root_dir}/System32/ntoskrnl.exe"))
        .or_else(|| pe_arch(vol, &format!("{root_dir}/System32/cmd.exe")));
    if g.arch.is_none() {
        g.unknown
            .push("arch: no PE header in System32\\ntoskrnl.exe or cmd.exe".into());
    }
    match hive(vol, &format!("{root_dir}/System32/config/SOFTWARE")) {
        Ok(h) => {
            let cv = r"Microsoft\Windows NT\CurrentVersion";
            g.product_name = string(&h, cv, "ProductName");
            g.product_variant = string(&h, cv, "InstallationType");
            w.edition = string(&h, cv, "EditionID");
            w.build =
                string(&h, cv, "CurrentBuildNumber").or_else(|| string(&h, cv, "CurrentBuild"));
            w.system_root = string(&h, cv, "SystemRoot");
            match (
                dword(&h, cv, "CurrentMajorVersionNumber"),
                dword(&h, cv, "CurrentMinorVersionNumber"),
            ) {
                (Some(major), minor) => {
                    g.major_version = Some(major);
                    g.minor_version = Some(minor.unwrap_or(0));
                }
                _ => {
                    if let Some(v) = string(&h, cv, "CurrentVersion") {
                        let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
                        g.major_version = it.next().flatten();
                        g.minor_version = it.next().flatten().or(g.major_version.map(|_| 0));
                    }
                }
            }
            g.vmware_tools = h
                .open_path(r"VMware, Inc.\VMware Tools")
                .ok()
                .flatten()
                .is_some();
        }
        Err(e) => g.unknown.push(format!("SOFTWARE hive: {e}")),
    }
    g.vmware_tools |= vol
        .stat("/Program Files/VMware/VMware Tools")
        .is_ok_and(|e| e.kind == EntryKind::Dir);
    match hive(vol, &format!("{root_dir}/System32/config/SYSTEM")) {
        Ok(h) => {
            let current = dword(&h, "Select", "Current").unwrap_or(1);
            let cs = format!("ControlSet{current:03}");
            g.hostname = string(&h, &format!(r"{cs}\Services\Tcpip\Parameters"), "Hostname")
                .or_else(|| {
                    string(
                        &h,
                        &format!(r"{cs}\Control\ComputerName\ComputerName"),
                        "ComputerName",
                    )
                });
            // A damaged Services key is unknown, never "no drivers".
            let mut damaged = None;
            match h.open_path(&format!(r"{cs}\Services")) {
                Ok(Some(services)) => {
                    for (name, drives) in DRIVERS {
                        match services.subkey(name) {
                            Ok(Some(k)) => {
                                let start = match k.value("Start") {
                                    Ok(Some(v)) => v.as_dword().ok(),
                                    _ => None,
                                };
                                w.drivers.push(WinDriver {
                                    name: name.to_string(),
                                    drives: drives.to_string(),
                                    start,
                                    starts: start_name(start),
                                });
                            }
                            Ok(None) => {}
                            Err(e) => {
                                damaged = Some(format!("{cs}\\Services\\{name}: {e}"));
                                break;
                            }
                        }
                    }
                }
                Ok(None) => damaged = Some(format!("no {cs}\\Services key")),
                Err(e) => damaged = Some(format!("{cs}\\Services: {e}")),
            }
            if let Some(why) = damaged {
                g.unknown.push(format!("SYSTEM hive: drivers: {why}"));
                w.drivers.clear();
                w.drivers_read = false;
            } else {
                w.drivers_read = true;
            }
            w.current_control_set = Some(cs);
        }
        Err(e) => g.unknown.push(format!("SYSTEM hive: {e}")),
    }
    if let Ok(entries) = vol.list(&format!("{root_dir}/System32/DriverStore/FileRepository")) {
        for e in entries {
            let lower = e.name.to_ascii_lowercase();
            if ["viostor.inf", "vioscsi.inf", "netkvm.inf"]
                .iter()
                .any(|p| lower.starts_with(p))
            {
                w.driver_store_virtio.push(e.name);
            }
        }
        w.driver_store_virtio.sort();
    }
    let mut hib = Vec::new();
    if vol.stat("/hiberfil.sys").is_ok_and(|e| e.size >= 4) {
        struct First<'a>(&'a mut Vec<u8>);
        impl std::io::Write for First<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.0.len() >= 4 {
                    return Err(std::io::Error::other("enough"));
                }
                self.0
                    .extend_from_slice(&b[..b.len().min(4 - self.0.len())]);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = vol.read_to("/hiberfil.sys", u64::MAX, &mut First(&mut hib));
    }
    w.hibernated = hib.len() == 4 && (hib.eq_ignore_ascii_case(b"hibr"));
    findings(&mut g, &w);
    g.windows = Some(w);
    g
}

fn findings(g: &mut Guest, w: &WindowsFacts) {
    // Where the drivers could not be read (said in `unknown`), nothing is
    // claimed about them.
    if w.drivers_read {
        storage_findings(g, w);
    }
    if w.hibernated || w.ntfs_dirty {
        g.findings.push(GuestFinding {
            code: "windows-hibernated".into(),
            message: format!(
                "{}: the disk is not consistent, and what is changed on it (drivers, registry) may be discarded when Windows resumes. In the guest on VMware, turn off hibernation and Fast Startup (powercfg /h off) and shut down fully (shutdown /s /t 0) before converting",
                match (w.hibernated, w.ntfs_dirty) {
                    (true, true) => "Windows was hibernated (hiberfil.sys holds an image to resume) and its NTFS volume is marked dirty",
                    (true, false) => "Windows was hibernated or shut down with Fast Startup (hiberfil.sys holds an image to resume)",
                    _ => "the NTFS volume is marked dirty (Windows did not shut down cleanly)",
                }
            ),
        });
    }
    if w.drivers_read {
        net_finding(g, w);
    }
    if g.vmware_tools {
        g.findings.push(GuestFinding {
            code: "guest-vmware-tools".into(),
            message: "VMware Tools is installed: it does nothing on KVM and its drivers (pvscsi, vmxnet3) will not find their devices; uninstall it (Settings > Apps, or its MSI with msiexec /x) and install the QEMU guest agent from the virtio-win ISO".into(),
        });
    }
}

fn storage_findings(g: &mut Guest, w: &WindowsFacts) {
    let drv = |n: &str| w.drivers.iter().find(|d| d.name.eq_ignore_ascii_case(n));
    let boot = |n: &str| drv(n).is_some_and(|d| d.start == Some(0));
    let virtio_store = !w
        .driver_store_virtio
        .iter()
        .all(|p| p.to_ascii_lowercase().starts_with("netkvm"));
    if drv("viostor").is_none() && drv("vioscsi").is_none() && !virtio_store {
        g.findings.push(GuestFinding {
            code: "windows-no-virtio-storage-driver".into(),
            message: "Windows has no VirtIO storage driver (viostor, vioscsi), installed or in its driver store: on a virtio disk it stops with INACCESSIBLE_BOOT_DEVICE. Before converting, install the virtio-win drivers in the guest (virtio-win-guest-tools.exe from the virtio-win ISO), or keep the disk on a controller Windows drives (SATA: storahci)".into(),
        });
    }
    let started: Vec<&str> = ["viostor", "vioscsi", "storahci"]
        .into_iter()
        .filter(|n| boot(n))
        .collect();
    if started.is_empty() {
        let present: Vec<String> = ["viostor", "vioscsi", "storahci"]
            .iter()
            .filter_map(|n| drv(n))
            .map(|d| format!("{} starts {}", d.name, d.starts))
            .collect();
        let target = ["viostor", "vioscsi", "storahci"]
            .into_iter()
            .find(|n| drv(n).is_some())
            .unwrap_or("storahci");
        g.findings.push(GuestFinding {
            code: "windows-boot-driver-not-started".into(),
            message: format!(
                "no driver for a controller KVM offers starts at boot ({}): whichever controller the disk moves to, Windows cannot read it at boot (INACCESSIBLE_BOOT_DEVICE). Before converting, in the guest run: reg add HKLM\\SYSTEM\\CurrentControlSet\\Services\\{target} /v Start /t REG_DWORD /d 0 /f",
                if present.is_empty() { "none is installed".to_string() } else { present.join(", ") }
            ),
        });
    }
}

fn net_finding(g: &mut Guest, w: &WindowsFacts) {
    let drv = |n: &str| w.drivers.iter().find(|d| d.name.eq_ignore_ascii_case(n));
    if drv("netkvm").is_none()
        && !w
            .driver_store_virtio
            .iter()
            .any(|p| p.to_ascii_lowercase().starts_with("netkvm"))
    {
        g.findings.push(GuestFinding {
            code: "windows-no-virtio-net-driver".into(),
            message: "Windows has no VirtIO network driver (netkvm): a virtio-net NIC has no network until the virtio-win drivers are installed; install them before converting, or use an e1000e NIC".into(),
        });
    }
}
