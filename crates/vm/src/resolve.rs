//! Where the disks a descriptor names are: every reference resolved to a
//! local file by one rule — it must lie inside a root (the descriptor's
//! folder, a `--disk-root`, a mapped datastore or storage) — and opened
//! through the image gate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmshift_desc::ovf::OvaArchive;
use vmshift_image::vmdk::VmdkReader;
use vmshift_image::{open_image, Gate, ImageReader, OpenOptions};
use vmshift_model::{DeviceKind, Disk, DiskRef, Finding, Severity, Vm};

use crate::error::{Error, Result};

/// Folders the disks may be found in, besides the descriptor's own.
#[derive(Debug, Clone, Default)]
pub struct DiskRoots {
    /// Folders disks may lie in (`--disk-root`).
    pub disk_roots: Vec<PathBuf>,
    /// VMware datastores mapped to local folders: `[NAME] path` and
    /// `/vmfs/volumes/NAME/path` resolve under the folder.
    pub datastores: BTreeMap<String, PathBuf>,
    /// Proxmox storages mapped to local folders: `NAME:volume` resolves
    /// under the folder.
    pub storages: BTreeMap<String, PathBuf>,
    /// Read disks even when another process holds QEMU's lock on them
    /// (qemu-img's `-U`).
    pub force_share: bool,
}

impl DiskRoots {
    /// Reads `NAME=DIR` pairs (`flag` names them in errors).
    pub fn pairs(list: &[String], flag: &str) -> Result<BTreeMap<String, PathBuf>> {
        list.iter()
            .map(|p| {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| Error::Request(format!("{flag} {p}: expected NAME=DIR")))?;
                Ok((k.to_string(), PathBuf::from(v)))
            })
            .collect()
    }
}

/// Whether `p` is an absolute path on a Windows host (`C:\\…`, `\\\\server\\…`).
fn windows_path(p: &str) -> bool {
    let b = p.as_bytes();
    (b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b':' && (b[2] == b'\\' || b[2] == b'/'))
        || p.starts_with("\\\\")
}

fn missing(p: &Path) -> Error {
    Error::Disk {
        message: format!("{} does not exist", p.display()),
        missing: true,
    }
}

fn unresolved(message: String) -> Error {
    Error::Disk {
        message,
        missing: false,
    }
}

/// Resolves the disk references of one descriptor to local files.
#[derive(Debug)]
pub struct Resolver {
    descriptor: PathBuf,
    /// The OVA the descriptor came from, and its open handle: its disks are
    /// members, read in place.
    archive: Option<(OvaArchive, std::fs::File)>,
    gate: Gate,
    datastores: BTreeMap<String, PathBuf>,
    storages: BTreeMap<String, PathBuf>,
    disk_roots: Vec<PathBuf>,
    force_share: bool,
}

impl Resolver {
    /// A resolver for the descriptor at `descriptor` (with its OVA, when it
    /// came from one).
    pub fn new(
        descriptor: &Path,
        archive: Option<(OvaArchive, std::fs::File)>,
        roots: &DiskRoots,
    ) -> Resolver {
        let gate = roots
            .disk_roots
            .iter()
            .chain(roots.datastores.values())
            .chain(roots.storages.values())
            .fold(Gate::new(), |g, r| g.with_root(r))
            .hint("add its folder with --disk-root DIR, or map its datastore or storage (--datastore, --storage-map)");
        Resolver {
            descriptor: descriptor.to_path_buf(),
            archive,
            gate,
            datastores: roots.datastores.clone(),
            storages: roots.storages.clone(),
            disk_roots: roots.disk_roots.clone(),
            force_share: roots.force_share,
        }
    }

    fn folder(&self) -> &Path {
        match self.descriptor.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// Opens the disk image `r` names: a file, or a member of the archive
    /// read in place. Returns how to name it, and the reader.
    pub fn open(&self, r: &DiskRef) -> Result<(String, Box<dyn ImageReader>)> {
        if let Some((a, file)) = &self.archive {
            let DiskRef::File { path } = r else {
                return Err(unresolved(format!("'{r}' is not a file of the archive")));
            };
            let shown = self.descriptor.join(path);
            let m = a.member(path).ok_or_else(|| Error::Disk {
                message: format!("'{path}' is not in {}", self.descriptor.display()),
                missing: true,
            })?;
            let file = file
                .try_clone()
                .map_err(Error::io(&self.descriptor, "reading the archive"))?;
            let img = VmdkReader::open_in_file(file, &shown, m.data_offset, m.size)?;
            return Ok((shown.display().to_string(), Box::new(img)));
        }
        let p = self.resolve(r)?;
        if !p.exists() {
            return Err(missing(&p));
        }
        let opts = OpenOptions {
            force_share: self.force_share,
            ..OpenOptions::default()
        };
        let img = open_image(&p, None, &opts)?;
        Ok((p.display().to_string(), img))
    }

    /// The local path of `r`, or why there is none.
    pub fn resolve(&self, r: &DiskRef) -> Result<PathBuf> {
        self.resolve_noted(r).map(|(p, _)| p)
    }

    /// Where a disk of this name may lie: the descriptor's folder, then
    /// each `--disk-root`, first match wins.
    fn by_name(&self, r: &DiskRef, file: &str, host: &str) -> Result<(PathBuf, Option<String>)> {
        let what = "disk";
        let candidates = std::iter::once(self.folder().join(file))
            .chain(self.disk_roots.iter().map(|d| d.join(file)));
        for c in candidates {
            if c.exists() {
                let p = self
                    .gate
                    .resolve(&self.descriptor, &c.to_string_lossy(), what)?;
                let note = format!(
                    "'{r}' is a path on {host}; the disk of that name at {} is used",
                    p.display()
                );
                return Ok((p, Some(note)));
            }
        }
        Err(Error::Disk {
            message: format!(
                "'{r}' is a path on {host}; there is no '{file}' beside the descriptor or in a --disk-root: copy the disk there, or name its folder with --disk-root DIR"
            ),
            missing: true,
        })
    }

    /// The local path of `r` and, when it was found by its file name
    /// rather than where the descriptor says (a path on the host the VM
    /// came from), a note saying so.
    pub fn resolve_noted(&self, r: &DiskRef) -> Result<(PathBuf, Option<String>)> {
        if self.archive.is_some() {
            return Err(unresolved(format!(
                "'{r}' lies inside the archive; only disks are read from it"
            )));
        }
        let what = "disk";
        let plain = |p: PathBuf| (p, None);
        match r {
            DiskRef::File { path } if windows_path(path) => {
                // A path on the Windows host the VM came from: the disk is
                // found by its file name, whatever the folders are called
                // here.
                let file = path
                    .rsplit(['\\', '/'])
                    .find(|p| !p.is_empty())
                    .ok_or_else(|| unresolved(format!("'{r}' names no file")))?;
                self.by_name(r, file, "the Windows host the VM came from")
            }
            DiskRef::File { path }
                if Path::new(path).is_absolute() && !Path::new(path).exists() =>
            {
                // An absolute path on another host (a Linux Workstation):
                // nothing there here, so by its file name.
                let file = Path::new(path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| unresolved(format!("'{r}' names no file")))?;
                self.by_name(
                    r,
                    &file,
                    "the host the VM came from (it does not exist here)",
                )
            }
            DiskRef::File { path } => Ok(plain(self.gate.resolve(&self.descriptor, path, what)?)),
            DiskRef::Datastore { datastore, path } => {
                if let Some(dir) = self.datastores.get(datastore) {
                    let p = dir.join(path);
                    return Ok(plain(self.gate.resolve(
                        &self.descriptor,
                        &p.to_string_lossy(),
                        what,
                    )?));
                }
                // An unmapped datastore: the disk by its file name, beside
                // the descriptor or in a --disk-root, whatever the folder
                // is called here.
                let name = Path::new(path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| unresolved(format!("'{r}' names no file")))?;
                self.by_name(
                    r,
                    &name,
                    &format!(
                        "datastore '{datastore}' (not mapped with --datastore {datastore}=DIR)"
                    ),
                )
            }
            DiskRef::Volume { storage, volume } => {
                let dir = self.storages.get(storage).ok_or_else(|| {
                    unresolved(format!(
                        "'{r}' is a volume of storage '{storage}'; map it with --storage-map {storage}=DIR"
                    ))
                })?;
                // Directory storages keep images under images/<vmid>/ and
                // ISO images under template/iso/.
                let p = if let Some(iso) = volume.strip_prefix("iso/") {
                    dir.join("template/iso").join(iso)
                } else if volume.contains('/') {
                    dir.join("images").join(volume)
                } else {
                    dir.join(volume)
                };
                Ok(plain(self.gate.resolve(
                    &self.descriptor,
                    &p.to_string_lossy(),
                    what,
                )?))
            }
            DiskRef::Device { path } => Err(unresolved(format!(
                "'{path}' is a host device or LUN, not an image file"
            ))),
        }
    }

    /// The local path of the medium `r` names, which must exist.
    pub fn existing(&self, r: &DiskRef) -> Result<PathBuf> {
        let p = self.resolve(r)?;
        if p.exists() {
            Ok(p)
        } else {
            Err(missing(&p))
        }
    }
}

/// An error and its causes in one line, without repeating a cause the
/// message above it already quotes.
pub fn text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.iter().any(|o| o.contains(&t)) {
            out.push(t);
        }
        cur = c.source();
    }
    out.join(": ")
}

/// The finding code for a disk reference that did not resolve.
pub fn unresolved_code(e: &Error) -> &'static str {
    if is_device_mapping(e) {
        "raw-device-mapping"
    } else if e.is_not_found() {
        "disk-missing"
    } else {
        "disk-unresolved"
    }
}

/// True when the disk's file maps a physical device (a VMware RDM
/// descriptor) rather than holding data.
fn is_device_mapping(e: &Error) -> bool {
    matches!(e, Error::Image(i) if i.kind() == vmshift_image::ErrorKind::DeviceMapping)
}

/// The finding for disk `i`, which failed to open with `e`.
pub fn open_failure(i: usize, d: &Disk, severity: Severity, e: &Error) -> Finding {
    let mut message = text(e);
    if is_device_mapping(e) {
        message.push_str(&format!(
            "; --skip-device {a} leaves it out, --map-device {a}=/dev/… gives the new VM a host block device in its place",
            a = d.address()
        ));
    }
    Finding::new(
        severity,
        unresolved_code(e),
        format!("disks[{i}].source"),
        message,
    )
}

/// The checks that need the files: each disk resolves, opens, and holds
/// the format its descriptor declares.
pub fn disk_findings(vm: &Vm, resolver: &Resolver) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let Some(src) = &d.source else { continue };
        if matches!(src, DiskRef::Device { .. }) {
            continue; // Vm::validate reports it
        }
        let path = format!("disks[{i}].source");
        let severity = if d.device == DeviceKind::Disk {
            Severity::Error
        } else {
            Severity::Warning
        };
        if d.device != DeviceKind::Disk {
            if let Err(e) = resolver.existing(src) {
                out.push(Finding::new(severity, unresolved_code(&e), path, text(&e)));
            }
            continue;
        }
        if let Ok((_, Some(note))) = resolver.resolve_noted(src) {
            out.push(Finding::new(
                Severity::Info,
                "disk-path-mapped",
                path.clone(),
                note,
            ));
        }
        match resolver.open(src) {
            Ok((shown, img)) => {
                if let Some(declared) = d.size.filter(|&n| n != img.size()) {
                    out.push(Finding::new(
                        Severity::Warning,
                        "disk-size-mismatch",
                        format!("disks[{i}].size"),
                        format!(
                            "the descriptor says {declared} bytes, but {shown} holds {}",
                            img.size()
                        ),
                    ));
                }
                if let Some(want) = d.format.filter(|&f| f != img.format()) {
                    out.push(Finding::new(
                        Severity::Error,
                        "disk-format-mismatch",
                        format!("disks[{i}].format"),
                        format!(
                            "the descriptor says {want}, but {shown} holds {}",
                            img.format()
                        ),
                    ));
                }
            }
            Err(e) => out.push(open_failure(i, d, severity, &e)),
        }
    }
    out
}

/// The VM's hard disks, opened in the descriptor's order through the
/// gate (for reading their guest file systems): what each is called, and
/// its reader. A disk that does not open is an error naming it.
pub fn open_disks(vm: &Vm, resolver: &Resolver) -> Result<Vec<(String, Box<dyn ImageReader>)>> {
    let mut out = Vec::new();
    for d in &vm.disks {
        let Some(src) = &d.source else { continue };
        if d.device != DeviceKind::Disk {
            continue;
        }
        out.push(resolver.open(src)?);
    }
    Ok(out)
}

/// What vmshift read of the guest inside a VM's disks.
#[derive(Debug, Clone)]
pub struct GuestRead {
    /// The operating systems found.
    pub guests: Vec<vmshift_guest::inspect::Guest>,
    /// What the boot disk boots with.
    pub boot: vmshift_guest::bootpath::BootPath,
}

/// The VM's disks, opened through the resolver, for [`read_guest_of`]
/// (`None` when one does not open).
pub fn guest_disks(vm: &Vm, resolver: &Resolver) -> Option<Vec<std::sync::Arc<dyn ImageReader>>> {
    let disks = open_disks(vm, resolver).ok()?;
    Some(
        disks
            .into_iter()
            .map(|(_, d)| std::sync::Arc::from(d))
            .collect(),
    )
}

/// Reads the guest inside the VM's hard disks, opened already (so that a
/// caller confines itself between opening them and reading what the
/// guest wrote), offline: `None` when they hold nothing readable.
pub fn read_guest_of(disks: Vec<std::sync::Arc<dyn ImageReader>>) -> Option<GuestRead> {
    let found = vmshift_guest::vfs::scan(&disks).ok()?;
    let guests = vmshift_guest::inspect::inspect(&found).ok()?;
    let boot = vmshift_guest::bootpath::boot_path(&disks, &found);
    Some(GuestRead { guests, boot })
}

/// What the guest will trip over on KVM (its initramfs without virtio,
/// fstab device names, VMware Tools, network configuration naming the NIC,
/// Windows' boot drivers and hibernation), each a warning with the fix;
/// and the firmware the VM asks for against what its boot disk boots
/// with (`boot-firmware-mismatch`, an error: the VM would not start).
pub fn guest_findings(vm: &Vm, read: &GuestRead) -> Vec<Finding> {
    let mut out: Vec<Finding> = read
        .guests
        .iter()
        .flat_map(|g| {
            g.findings.iter().map(move |f| {
                Finding::new(
                    Severity::Warning,
                    &f.code,
                    format!("guest:{}", g.root),
                    f.message.clone(),
                )
            })
        })
        .collect();
    if let Some((_, why)) = firmware_fix(vm, read) {
        out.push(Finding::new(
            Severity::Error,
            "boot-firmware-mismatch",
            "firmware",
            why,
        ));
    }
    out
}

/// The firmware the boot disk needs where the VM asks for the other one
/// (a BIOS VM whose disk has only an EFI system partition, or the
/// reverse: "No bootable device"), with what was found.
pub fn firmware_fix(vm: &Vm, read: &GuestRead) -> Option<(vmshift_model::FirmwareKind, String)> {
    use vmshift_model::FirmwareKind;
    let b = &read.boot;
    let uefi = vm.firmware.kind == FirmwareKind::Uefi;
    if uefi && !b.uefi_bootable() && b.bios_bootable() {
        Some((
            FirmwareKind::Bios,
            format!(
                "the VM asks for UEFI firmware, but its boot disk {} has no EFI system partition with a loader, only BIOS boot code ({}): it would stop at \"No bootable device\". Set the firmware to BIOS (VMware: firmware = \"bios\"; libvirt: no <loader>; Proxmox: bios: seabios); vm convert does",
                b.disk,
                b.bios.as_deref().unwrap_or("")
            ),
        ))
    } else if !uefi && !b.bios_bootable() && b.uefi_bootable() {
        Some((
            FirmwareKind::Uefi,
            format!(
                "the VM asks for BIOS firmware, but its boot disk {} has no BIOS boot code, only EFI loaders ({}): it would stop at \"No bootable device\". Set the firmware to UEFI (VMware: firmware = \"efi\"; libvirt: <os firmware='efi'>; Proxmox: bios: ovmf); vm convert does",
                b.disk,
                b.uefi.join(", ")
            ),
        ))
    } else {
        None
    }
}

/// What the guest drives, for the mapping: virtio disks when its boot
/// path has the drivers (Linux: the newest kernel's initramfs or built-in
/// modules; Windows: viostor or vioscsi starting at boot), SATA when it
/// has no virtio but has AHCI; virtio-net when it has the driver.
pub fn guest_drivers(read: &GuestRead) -> Option<vmshift_desc::mapping::GuestDrivers> {
    let g = read.guests.first()?;
    let mut out = vmshift_desc::mapping::GuestDrivers::default();
    if let Some(w) = &g.windows {
        if !w.drivers_read {
            return Some(out);
        }
        let boot: Vec<&str> = w
            .drivers
            .iter()
            .filter(|d| d.start == Some(0))
            .map(|d| d.name.as_str())
            .collect();
        let vio = boot
            .iter()
            .find(|n| n.eq_ignore_ascii_case("viostor") || n.eq_ignore_ascii_case("vioscsi"));
        out.virtio_disk = Some(match vio {
            Some(n) => (true, format!("Windows starts {n} at boot")),
            None => (
                false,
                "Windows has no VirtIO storage driver that starts at boot (viostor, vioscsi): SATA, which storahci drives".into(),
            ),
        });
        let net = w
            .drivers
            .iter()
            .any(|d| d.name.eq_ignore_ascii_case("netkvm"))
            || w.driver_store_virtio
                .iter()
                .any(|p| p.to_ascii_lowercase().starts_with("netkvm"));
        out.virtio_net = Some(if net {
            (
                true,
                "Windows has the VirtIO network driver (netkvm)".into(),
            )
        } else {
            (
                false,
                "Windows has no VirtIO network driver (netkvm)".into(),
            )
        });
        return Some(out);
    }
    let k = g.kernels.last()?;
    let has = |m: &str| k.virtio_drivers.iter().any(|d| d == m);
    if has("virtio_pci") && (has("virtio_scsi") || has("virtio_blk")) {
        out.virtio_disk = Some((
            true,
            format!(
                "kernel {} has {} at boot",
                k.version,
                k.virtio_drivers.join(", ")
            ),
        ));
    } else if !k.initramfs_archives.is_empty() && k.storage_drivers.iter().any(|d| d == "ahci") {
        out.virtio_disk = Some((
            false,
            format!(
                "the initramfs of kernel {} has no virtio disk driver but has ahci: SATA",
                k.version
            ),
        ));
    }
    if has("virtio_net") {
        out.virtio_net = Some((true, format!("kernel {} has virtio_net", k.version)));
    }
    Some(out)
}
