//! What a guest is, read offline: for Linux a pipeline of small detectors,
//! each reading a few files from the tree its fstab mounts; for Windows
//! its registry hives (see [`crate::windows`]). A missing or odd file
//! makes its fact unknown (with the reason), never a failed run.

use serde::Serialize;

use crate::vfs::{self, EntryKind, Found, GuestFs};
use crate::Result;

/// The most a configuration file read for inspection may hold.
const MAX_CONFIG: u64 = 1 << 20;

/// One mount of `/etc/fstab`, resolved against the file systems found.
#[derive(Debug, Clone, Serialize)]
pub struct Mount {
    /// The mount point.
    pub path: String,
    /// The device as fstab names it (`UUID=…`, `/dev/sda1`).
    pub spec: String,
    /// The file system type fstab gives.
    pub fstype: String,
    /// The file system it resolves to (`/dev/sda1`), if found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// A kernel in `/boot`, with its initramfs.
#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    /// The kernel's version (`6.1.0-18-amd64`).
    pub version: String,
    /// Its path.
    pub path: String,
    /// The initramfs for it, if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// The virtio drivers the guest has at boot with this kernel: in its
    /// initramfs, or built into the kernel (`modules.builtin`).
    pub virtio_drivers: Vec<String>,
    /// Other disk controller drivers it has at boot (`ahci`, `nvme`,
    /// `vmw_pvscsi`, `mptspi`, `mptsas`, `ata_piix`).
    pub storage_drivers: Vec<String>,
    /// How the initramfs is packed (`none`, `gzip`, `zstd`, in order).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub initramfs_archives: Vec<String>,
    /// The initramfs was built by dracut in host-only mode.
    pub dracut_hostonly: bool,
}

/// Something in the guest that will trip the migration, and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFinding {
    /// A stable code (`guest-fstab-device-name`).
    pub code: String,
    /// What and where.
    pub message: String,
}

/// An operating system installation (Linux or Windows).
#[derive(Debug, Clone, Serialize)]
pub struct Guest {
    /// The root file system (`/dev/sda2`).
    pub root: String,
    /// `linux` or `windows`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The distribution's id (`debian`, `rhel`, `ubuntu`), as os-release
    /// says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distro: Option<String>,
    /// Its product name (`Debian GNU/Linux 12 (bookworm)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
    /// Major version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_version: Option<u32>,
    /// Minor version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_version: Option<u32>,
    /// The host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The architecture of its binaries (`x86_64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// `deb` or `rpm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package_format: Option<String>,
    /// `apt`, `dnf`, `yum`, `zypper`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package_management: Option<String>,
    /// The mounts of `/etc/fstab`.
    pub mountpoints: Vec<Mount>,
    /// The kernels in `/boot` (Linux).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<Kernel>,
    /// `InstallationType` (`Server`, `Client`), Windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_variant: Option<String>,
    /// Windows' own facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<crate::windows::WindowsFacts>,
    /// VMware Tools (open-vm-tools or VMware's installer) is installed.
    pub vmware_tools: bool,
    /// Facts that could not be read, and why.
    pub unknown: Vec<String>,
    /// What will trip the migration.
    pub findings: Vec<GuestFinding>,
}

/// The guests found on the disks: file systems that hold `/etc` with an
/// `os-release` or a release file (Linux), NTFS volumes with a Windows
/// system root and its registry hives (Windows).
pub fn inspect(found: &[Found]) -> Result<Vec<Guest>> {
    let mut out = Vec::new();
    for f in found.iter().filter(|f| f.info.kind.readable()) {
        if f.info.kind == vfs::FsKind::Ntfs {
            let vol = crate::ntfs::NtfsVol::open(
                f.image.clone(),
                f.start,
                f.len,
                f.info.place.clone(),
                f.info.partition,
            )?;
            if let Some(root) = crate::windows::system_root(&vol) {
                out.push(crate::windows::inspect_windows(&vol, f, &root));
            }
            continue;
        }
        let fs = vfs::open(f)?;
        if !is_dir(&*fs, "/etc") {
            continue;
        }
        let release = [
            "/etc/os-release",
            "/usr/lib/os-release",
            "/etc/redhat-release",
            "/etc/debian_version",
        ]
        .iter()
        .any(|p| fs.stat(p).is_ok());
        if !release {
            continue;
        }
        out.push(inspect_linux(&*fs, f, found));
    }
    Ok(out)
}

fn is_dir(fs: &dyn GuestFs, path: &str) -> bool {
    fs.stat(path).is_ok_and(|e| e.kind == EntryKind::Dir)
}

/// A text file, or why it could not be read.
fn text(fs: &dyn GuestFs, path: &str) -> std::result::Result<String, String> {
    fs.read(path, MAX_CONFIG)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| e.to_string())
}

/// `KEY=value` lines (os-release, sysconfig), quotes removed.
fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

fn version_numbers(v: &str) -> (Option<u32>, Option<u32>) {
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse().ok());
    let minor = it.next().and_then(|s| s.parse().ok());
    (major, minor.or(major.map(|_| 0)))
}

impl Guest {
    /// A guest with its root and type, every fact still unknown.
    pub fn new(root: String, kind: &'static str) -> Guest {
        Guest {
            root,
            kind,
            distro: None,
            product_name: None,
            major_version: None,
            minor_version: None,
            hostname: None,
            arch: None,
            package_format: None,
            package_management: None,
            mountpoints: Vec::new(),
            kernels: Vec::new(),
            product_variant: None,
            windows: None,
            vmware_tools: false,
            unknown: Vec::new(),
            findings: Vec::new(),
        }
    }
}

fn inspect_linux(fs: &dyn GuestFs, root: &Found, all: &[Found]) -> Guest {
    let mut g = Guest::new(root.info.place.clone(), "linux");
    fstab(fs, all, &mut g);
    // The rest reads the tree as the guest mounts it: /boot, /usr or /var
    // may be file systems of their own.
    let mut mounts = Vec::new();
    for m in g.mountpoints.iter().filter(|m| m.path != "/") {
        let Some(f) = m
            .device
            .as_ref()
            .and_then(|d| all.iter().find(|f| &f.info.place == d))
        else {
            continue;
        };
        if !f.info.kind.readable() {
            continue;
        }
        match vfs::open(f) {
            Ok(mfs) => mounts.push((m.path.clone(), mfs)),
            Err(e) => g.unknown.push(format!("{}: {e}", m.path)),
        }
    }
    let view = vfs::Mounted::new(fs, mounts);
    let fs: &dyn GuestFs = &view;
    distribution(fs, &mut g);
    hostname(fs, &mut g);
    g.arch = arch(fs);
    if g.arch.is_none() {
        g.unknown
            .push("arch: no ELF binary found in /bin, /usr/bin or /sbin".into());
    }
    packages(fs, &mut g);
    kernels(fs, &mut g);
    g.vmware_tools = [
        "/usr/bin/vmtoolsd",
        "/usr/sbin/vmtoolsd",
        "/etc/vmware-tools/tools.conf",
        "/etc/vmware-tools/locations",
    ]
    .iter()
    .any(|p| fs.stat(p).is_ok());
    if g.vmware_tools {
        g.findings.push(GuestFinding {
            code: "guest-vmware-tools".into(),
            message: format!(
                "VMware Tools is installed: it does nothing on KVM; remove it ({}) and install qemu-guest-agent",
                match g.package_format.as_deref() {
                    Some("deb") => "apt-get purge open-vm-tools",
                    Some("rpm") => "dnf remove open-vm-tools",
                    _ => "the open-vm-tools package, or /usr/bin/vmware-uninstall-tools.pl",
                }
            ),
        });
    }
    network(fs, &mut g);
    g
}

fn distribution(fs: &dyn GuestFs, g: &mut Guest) {
    let os_release = text(fs, "/etc/os-release").or_else(|_| text(fs, "/usr/lib/os-release"));
    match os_release {
        Ok(t) => {
            let kv = key_values(&t);
            let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            g.distro = get("ID");
            g.product_name = get("PRETTY_NAME").or_else(|| get("NAME"));
            if let Some(v) = get("VERSION_ID") {
                (g.major_version, g.minor_version) = version_numbers(&v);
            }
        }
        Err(why) => g.unknown.push(format!("os-release: {why}")),
    }
    // Debian's point release is in /etc/debian_version (os-release has
    // only the major version); libguestfs names the product by it too.
    if g.distro.as_deref() == Some("debian") || g.distro.is_none() {
        if let Ok(v) = text(fs, "/etc/debian_version") {
            let v = v.trim();
            if v.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                (g.major_version, g.minor_version) = version_numbers(v);
                g.distro.get_or_insert_with(|| "debian".into());
                g.product_name = Some(v.to_string());
            }
        }
    }
    if g.distro.is_none() {
        if let Ok(t) = text(fs, "/etc/redhat-release") {
            let t = t.trim().to_string();
            g.distro = Some(if t.starts_with("CentOS") {
                "centos".into()
            } else if t.starts_with("Fedora") {
                "fedora".into()
            } else {
                "rhel".into()
            });
            if let Some(v) = t
                .split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
            {
                (g.major_version, g.minor_version) = version_numbers(v);
            }
            g.product_name = Some(t);
        }
    }
}

fn hostname(fs: &dyn GuestFs, g: &mut Guest) {
    let from_file = ["/etc/hostname", "/etc/HOSTNAME"].iter().find_map(|p| {
        text(fs, p).ok().and_then(|t| {
            t.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
        })
    });
    let from_sysconfig = || {
        text(fs, "/etc/sysconfig/network").ok().and_then(|t| {
            key_values(&t)
                .into_iter()
                .find(|(k, _)| k == "HOSTNAME")
                .map(|(_, v)| v)
        })
    };
    g.hostname = from_file.or_else(from_sysconfig);
    if g.hostname.is_none() {
        g.unknown.push(
            "hostname: no /etc/hostname, /etc/HOSTNAME or HOSTNAME= in /etc/sysconfig/network"
                .into(),
        );
    }
}

/// The architecture from the ELF header of a system binary.
fn arch(fs: &dyn GuestFs) -> Option<String> {
    for p in [
        "/bin/ls",
        "/usr/bin/ls",
        "/bin/sh",
        "/usr/bin/bash",
        "/sbin/init",
        "/usr/lib/systemd/systemd",
    ] {
        let mut head = Vec::new();
        // Only the header: a writer that stops after 64 bytes.
        struct Head<'a>(&'a mut Vec<u8>);
        impl std::io::Write for Head<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let room = 64usize.saturating_sub(self.0.len());
                self.0.extend_from_slice(&b[..b.len().min(room)]);
                if room == 0 {
                    return Err(std::io::Error::other("enough"));
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = fs.read_to(p, 256 << 20, &mut Head(&mut head));
        if head.len() >= 20 && &head[0..4] == b"\x7fELF" {
            let machine = u16::from_le_bytes([head[18], head[19]]);
            return Some(
                match machine {
                    0x3e => "x86_64",
                    0x03 => "i386",
                    0xb7 => "aarch64",
                    0x28 => "arm",
                    0xf3 => "riscv64",
                    0x15 => "ppc64",
                    0x16 => "s390x",
                    _ => "unknown",
                }
                .to_string(),
            );
        }
    }
    None
}

fn packages(fs: &dyn GuestFs, g: &mut Guest) {
    let has = |p: &str| fs.stat(p).is_ok();
    if has("/var/lib/dpkg/status") {
        g.package_format = Some("deb".into());
        g.package_management = Some("apt".into());
    } else if has("/var/lib/rpm") || has("/usr/lib/sysimage/rpm") {
        g.package_format = Some("rpm".into());
        // As libguestfs decides it: the RHEL family by its version (dnf
        // from 8, yum from 5), Fedora by dnf being there.
        let major = g.major_version.unwrap_or(0);
        let rhel_like = matches!(
            g.distro.as_deref(),
            Some(
                "rhel"
                    | "centos"
                    | "rocky"
                    | "almalinux"
                    | "ol"
                    | "oraclelinux"
                    | "scientificlinux"
                    | "redhat-based"
            )
        );
        g.package_management = Some(
            if rhel_like {
                match major {
                    8.. => "dnf",
                    5.. => "yum",
                    _ => "up2date",
                }
            } else if has("/usr/bin/zypper")
                || g.distro
                    .as_deref()
                    .is_some_and(|d| d.starts_with("opensuse") || d == "sles")
            {
                "zypper"
            } else if has("/usr/bin/dnf") || has("/usr/bin/dnf-3") {
                "dnf"
            } else {
                "yum"
            }
            .into(),
        );
    } else {
        g.unknown
            .push("package manager: neither /var/lib/dpkg/status nor an rpm database".into());
    }
}

/// The file system an fstab device names, if it is on these disks.
fn resolve(spec: &str, all: &[Found]) -> Option<String> {
    let by = |f: &dyn Fn(&Found) -> bool| all.iter().find(|x| f(x)).map(|x| x.info.place.clone());
    let eq = |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    if let Some(u) = spec
        .strip_prefix("UUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"))
    {
        return by(&|x| eq(&x.info.uuid, u.trim_matches('"')));
    }
    if let Some(l) = spec
        .strip_prefix("LABEL=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-label/"))
    {
        return by(&|x| x.info.label.as_deref() == Some(l.trim_matches('"')));
    }
    if let Some(p) = spec
        .strip_prefix("PARTUUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-partuuid/"))
    {
        return by(&|x| eq(&x.info.partuuid, p.trim_matches('"')));
    }
    // LVM: /dev/mapper/VG-LV (a '-' inside a name doubled),
    // /dev/disk/by-id/dm-name-VG-LV, or /dev/VG/LV as named here.
    if let Some(dm) = spec
        .strip_prefix("/dev/mapper/")
        .or_else(|| spec.strip_prefix("/dev/disk/by-id/dm-name-"))
    {
        let (vg, lv) = split_dm_name(dm)?;
        let name = format!("/dev/{vg}/{lv}");
        return by(&|x| x.info.place == name);
    }
    // /dev/sda1, /dev/vda1, /dev/hda1, /dev/xvda1: disk letter and number.
    for prefix in ["/dev/sd", "/dev/vd", "/dev/hd", "/dev/xvd"] {
        if let Some(rest) = spec.strip_prefix(prefix) {
            let name = format!("/dev/sd{rest}");
            return by(&|x| x.info.place == name);
        }
    }
    by(&|x| x.info.place == spec)
}

/// The VG and LV of a device-mapper name: split at the one '-' that is
/// not doubled; a doubled '-' is a '-' in the name.
fn split_dm_name(dm: &str) -> Option<(String, String)> {
    let b = dm.as_bytes();
    let mut i = 0;
    let mut vg = String::new();
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                vg.push('-');
                i += 2;
                continue;
            }
            let lv = dm[i + 1..].replace("--", "-");
            return (!vg.is_empty() && !lv.is_empty()).then_some((vg, lv));
        }
        vg.push(b[i] as char);
        i += 1;
    }
    None
}

/// `/etc/crypttab`: each mapped name and the device it opens.
fn crypttab(fs: &dyn GuestFs) -> Vec<(String, String)> {
    text(fs, "/etc/crypttab")
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    Some((f.next()?.to_string(), f.next()?.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn fstab(fs: &dyn GuestFs, all: &[Found], g: &mut Guest) {
    let crypt = crypttab(fs);
    let t = match text(fs, "/etc/fstab") {
        Ok(t) => t,
        Err(why) => {
            g.unknown.push(format!("fstab: {why}"));
            return;
        }
    };
    for line in t.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[2] == "swap" || f[1] == "none" || !f[1].starts_with('/') {
            continue;
        }
        let (spec, path, fstype) = (f[0], f[1], f[2]);
        if matches!(
            fstype,
            "proc" | "sysfs" | "tmpfs" | "devpts" | "nfs" | "nfs4" | "cifs"
        ) {
            continue;
        }
        let mut device = resolve(spec, all);
        // A device crypttab opens: the encrypted volume it comes from.
        if device.is_none() {
            let name = spec.strip_prefix("/dev/mapper/").unwrap_or(spec);
            if let Some((_, src)) = crypt.iter().find(|(n, _)| n == name) {
                device = resolve(src, all);
                g.unknown.push(format!(
                    "{path}: on {spec}, which /etc/crypttab opens from {src}: encrypted (LUKS), not read"
                ));
            }
        }
        if ["/dev/sd", "/dev/hd", "/dev/vd", "/dev/xvd"]
            .iter()
            .any(|p| spec.starts_with(p))
        {
            g.findings.push(GuestFinding {
                code: "guest-fstab-device-name".into(),
                message: format!(
                    "/etc/fstab mounts {path} from {spec}: device names change with the disk controller (VMware's sda may be vda on KVM); name it by UUID (blkid {spec}) before converting"
                ),
            });
        }
        g.mountpoints.push(Mount {
            path: path.to_string(),
            spec: spec.to_string(),
            fstype: fstype.to_string(),
            device,
        });
    }
    // The root file system is mounted at / whatever fstab says.
    if !g.mountpoints.iter().any(|m| m.path == "/") {
        g.mountpoints.insert(
            0,
            Mount {
                path: "/".into(),
                spec: g.root.clone(),
                fstype: String::new(),
                device: Some(g.root.clone()),
            },
        );
    }
}

fn kernels(fs: &dyn GuestFs, g: &mut Guest) {
    let Ok(entries) = fs.list("/boot") else {
        g.unknown.push("kernels: /boot cannot be listed".into());
        return;
    };
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let mut ks: Vec<Kernel> = names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.contains("rescue"))
        .map(|v| {
            let initramfs = [
                format!("initrd.img-{v}"),
                format!("initramfs-{v}.img"),
                format!("initrd-{v}"),
            ]
            .into_iter()
            .find(|c| names.contains(&c.as_str()))
            .map(|c| format!("/boot/{c}"));
            Kernel {
                version: v.to_string(),
                path: format!("/boot/vmlinuz-{v}"),
                initramfs,
                virtio_drivers: Vec::new(),
                storage_drivers: Vec::new(),
                initramfs_archives: Vec::new(),
                dracut_hostonly: false,
            }
        })
        .collect();
    ks.sort_by(|a, b| version_order(&a.version, &b.version));
    // The newest kernel is the one that boots by default: its initramfs is
    // read (an initramfs may inflate to gigabytes; reading every kernel's
    // would multiply that).
    if let Some(k) = ks.last_mut() {
        boot_drivers(fs, k, g);
    }
    g.kernels = ks;
    // The newest kernel is the one the guest boots by default: without
    // virtio in its initramfs, the converted VM stops at the initramfs
    // shell ("root device not found").
    if let Some(k) = g.kernels.last() {
        let has = |m: &str| k.virtio_drivers.iter().any(|d| d == m);
        let missing: Vec<&str> = ["virtio_pci", "virtio_scsi", "virtio_blk"]
            .into_iter()
            .filter(|m| !has(m))
            .collect();
        let usable = has("virtio_pci") && (has("virtio_scsi") || has("virtio_blk"));
        if k.initramfs.is_some() && !usable && !k.initramfs_archives.is_empty() {
            let fix = match g.package_format.as_deref() {
                Some("deb") => "printf 'virtio_pci\\nvirtio_blk\\nvirtio_scsi\\n' >> /etc/initramfs-tools/modules && update-initramfs -u -k all".to_string(),
                _ => "dracut -f --regenerate-all --add-drivers 'virtio_pci virtio_blk virtio_scsi'".to_string(),
            };
            g.findings.push(GuestFinding {
                code: "guest-initramfs-no-virtio".into(),
                message: format!(
                    "the initramfs of kernel {} lacks {}{}: on virtio disks the guest stops at the initramfs shell (root device not found); before converting, in the guest run: {fix}",
                    k.version,
                    missing.join(", "),
                    if k.dracut_hostonly { " (dracut built it in host-only mode: only this VMware host's drivers)" } else { "" }
                ),
            });
        }
    }
}

/// Orders kernel versions as versions: numbers by value (`6.1.0-18` after
/// `6.1.0-9`), the rest as text.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// The virtio drivers kernel `k` has at boot: built in, or in its
/// initramfs (read as a stream).
fn boot_drivers(fs: &dyn GuestFs, k: &mut Kernel, g: &mut Guest) {
    let wanted = [
        "virtio_pci",
        "virtio_scsi",
        "virtio_blk",
        "virtio_net",
        "ahci",
        "ata_piix",
        "nvme",
        "vmw_pvscsi",
        "mptspi",
        "mptsas",
    ];
    let mut have = std::collections::BTreeSet::new();
    for dir in ["/lib/modules", "/usr/lib/modules"] {
        if let Ok(t) = text(fs, &format!("{dir}/{}/modules.builtin", k.version)) {
            for l in t.lines() {
                if let Some(m) = l.rsplit('/').next().and_then(|f| f.strip_suffix(".ko")) {
                    let m = m.replace('-', "_");
                    if wanted.contains(&m.as_str()) {
                        have.insert(m);
                    }
                }
            }
            break;
        }
    }
    if let Some(path) = k.initramfs.clone() {
        let mut scan = crate::initramfs::Scanner::new();
        let read = fs.read_to(&path, crate::MAX_BOOT_FILE, &mut scan);
        match read
            .map_err(|e| e.to_string())
            .and_then(|_| scan.finish().map_err(|e| e.to_string()))
        {
            Ok(c) => {
                k.initramfs_archives = c.archives.iter().map(|a| a.to_string()).collect();
                k.dracut_hostonly = c.dracut_hostonly();
                for m in c.modules() {
                    if wanted.contains(&m.as_str()) {
                        have.insert(m);
                    }
                }
                if let Some(why) = c.unread {
                    g.unknown.push(format!("{path}: {why}"));
                    k.initramfs_archives.clear();
                }
            }
            Err(why) => g.unknown.push(format!("{path}: {why}")),
        }
    }
    let (virtio, other): (Vec<String>, Vec<String>) =
        have.into_iter().partition(|m| m.starts_with("virtio"));
    k.virtio_drivers = virtio;
    k.storage_drivers = other;
}

/// Network configuration that names an interface or a MAC address: on
/// KVM the NIC is another device with another name (ens192 → enp1s0).
fn network(fs: &dyn GuestFs, g: &mut Guest) {
    let mut named = Vec::new();
    let dir_files = |dir: &str, suffix: &str| -> Vec<String> {
        fs.list(dir)
            .map(|es| {
                es.into_iter()
                    .filter(|e| e.kind != EntryKind::Dir && e.name.ends_with(suffix))
                    .map(|e| format!("{dir}/{}", e.name))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut check = |file: String, hits: Vec<String>| {
        if !hits.is_empty() {
            named.push(format!("{file} ({})", hits.join(", ")));
        }
    };
    // eth0, ens192, eno1, enp2s0: a kernel or predictable NIC name.
    let iface_like = |w: &str| {
        let w = w.trim_matches(|c: char| c == ':' || c == '"' || c == '\'');
        ["eth", "ens", "eno", "enp"].iter().any(|p| {
            w.strip_prefix(p)
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        }) && w.len() <= 15
            && w.chars().all(|c| c.is_ascii_alphanumeric())
    };
    for f in dir_files("/etc/netplan", ".yaml") {
        if let Ok(t) = text(fs, &f) {
            let mut hits: Vec<String> = t
                .split_whitespace()
                .filter(|w| iface_like(w))
                .map(|w| w.trim_end_matches(':').to_string())
                .collect();
            if t.contains("macaddress") {
                hits.push("macaddress".into());
            }
            hits.dedup();
            check(f, hits);
        }
    }
    if let Ok(t) = text(fs, "/etc/network/interfaces") {
        let hits: Vec<String> = t
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("iface ")
                    .or_else(|| l.trim().strip_prefix("auto "))
            })
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| iface_like(w))
            .map(str::to_string)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        check("/etc/network/interfaces".into(), hits);
    }
    for f in dir_files("/etc/sysconfig/network-scripts", "") {
        if !f
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("ifcfg-") && n != "ifcfg-lo")
        {
            continue;
        }
        if let Ok(t) = text(fs, &f) {
            let hits: Vec<String> = key_values(&t)
                .into_iter()
                .filter(|(k, _)| k == "DEVICE" || k == "HWADDR")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            check(f, hits);
        }
    }
    for f in dir_files("/etc/NetworkManager/system-connections", "") {
        if let Ok(t) = text(fs, &f) {
            let hits: Vec<String> = key_values(&t)
                .into_iter()
                .filter(|(k, _)| k == "interface-name" || k == "mac-address")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            check(f, hits);
        }
    }
    for f in dir_files("/etc/systemd/network", ".network") {
        if let Ok(t) = text(fs, &f) {
            let hits: Vec<String> = key_values(&t)
                .into_iter()
                .filter(|(k, _)| k == "Name" || k == "MACAddress")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            check(f, hits);
        }
    }
    if let Ok(t) = text(fs, "/etc/udev/rules.d/70-persistent-net.rules") {
        if t.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("ATTR{address}"))
        {
            check(
                "/etc/udev/rules.d/70-persistent-net.rules".into(),
                vec!["MAC → name rules".into()],
            );
        }
    }
    if !named.is_empty() {
        g.findings.push(GuestFinding {
            code: "guest-net-config-names-nic".into(),
            message: format!(
                "network configuration names the NIC by its VMware name or MAC: {}; on KVM the NIC is another device (virtio-net, often enp1s0) — match it by a new name or the MAC the converted VM keeps, or the guest comes up without network",
                named.join("; ")
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_order_as_versions() {
        let mut v = vec![
            "6.1.0-18-amd64",
            "6.1.0-9-amd64",
            "5.14.0-362.el9.x86_64",
            "6.1.0-18-amd64-rt",
            "5.14.0-70.el9.x86_64",
        ];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(
            v,
            [
                "5.14.0-70.el9.x86_64",
                "5.14.0-362.el9.x86_64",
                "6.1.0-9-amd64",
                "6.1.0-18-amd64",
                "6.1.0-18-amd64-rt"
            ]
        );
    }

    #[test]
    fn device_mapper_names_split_at_the_single_dash() {
        assert_eq!(
            split_dm_name("rhel-root"),
            Some(("rhel".into(), "root".into()))
        );
        assert_eq!(
            split_dm_name("my--vg-lv--home"),
            Some(("my-vg".into(), "lv-home".into()))
        );
        assert_eq!(split_dm_name("novg"), None);
        assert_eq!(split_dm_name("-lv"), None);
    }
}
