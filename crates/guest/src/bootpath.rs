//! What a guest's boot disk can boot with: BIOS (boot code in the MBR, or
//! GRUB's core image in a GPT BIOS boot partition) and UEFI (an EFI system
//! partition holding a loader: `\EFI\BOOT\BOOTX64.EFI`, shim, GRUB,
//! systemd-boot, Windows Boot Manager). A VM whose firmware cannot use
//! what the disk has stops at "No bootable device" after the migration.

use std::sync::Arc;

use serde::Serialize;
use vmshift_image::part::{read_table, TableKind};
use vmshift_image::ImageReader;

use crate::vfs::{self, EntryKind, Found};

/// GPT type of an EFI system partition.
const ESP_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT type of a BIOS boot partition (GRUB's core image).
const BIOS_BOOT_GUID: &str = "21686148-6449-6E6F-744E-656564454649";

/// EFI loaders looked for in each `\EFI\<vendor>` folder, by name.
const LOADERS: [&str; 7] = [
    "bootx64.efi",
    "shimx64.efi",
    "grubx64.efi",
    "bootmgfw.efi",
    "systemd-bootx64.efi",
    "bootaa64.efi",
    "bootia32.efi",
];

/// The boot paths of the first disk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootPath {
    /// The disk (`/dev/sda`).
    pub disk: String,
    /// How BIOS firmware boots it, if it can (`MBR boot code`, `GRUB core
    /// image in the BIOS boot partition /dev/sda1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bios: Option<String>,
    /// The EFI loaders on its EFI system partitions
    /// (`/dev/sda1:/EFI/debian/shimx64.efi`).
    pub uefi: Vec<String>,
}

impl BootPath {
    /// True when BIOS firmware finds something to boot.
    pub fn bios_bootable(&self) -> bool {
        self.bios.is_some()
    }
    /// True when UEFI firmware finds a loader.
    pub fn uefi_bootable(&self) -> bool {
        !self.uefi.is_empty()
    }
}

/// The boot paths of `disks[0]`, with its file systems among `found`.
pub fn boot_path(disks: &[Arc<dyn ImageReader>], found: &[Found]) -> BootPath {
    let mut out = BootPath {
        disk: vfs::disk_name(0),
        ..BootPath::default()
    };
    let Some(disk) = disks.first() else {
        return out;
    };
    let mut mbr = [0u8; 512];
    if disk.read_at(&mut mbr, 0).is_err() {
        return out;
    }
    // Boot code: the first 440 bytes, before the disk signature.
    let code = mbr[..440].iter().any(|&b| b != 0);
    let Ok(Some(table)) = read_table(&**disk) else {
        return out;
    };
    let mut esps = Vec::new();
    for p in &table.partitions {
        let place = format!("{}{}", out.disk, p.number);
        let t = p.type_id.to_ascii_uppercase();
        if t == ESP_GUID || t == "0XEF" {
            esps.push(place.clone());
        }
        if t == BIOS_BOOT_GUID && code {
            out.bios = Some(format!(
                "GRUB's core image in the BIOS boot partition {place}"
            ));
        }
    }
    if table.kind == TableKind::Mbr && code {
        let active = table.partitions.iter().find(|p| p.bootable);
        out.bios = Some(match active {
            Some(p) => format!("MBR boot code, active partition {}{}", out.disk, p.number),
            None => "MBR boot code".to_string(),
        });
    }
    for esp in esps {
        let Some(f) = found.iter().find(|f| f.info.place == esp) else {
            continue;
        };
        let Ok(fs) = vfs::open(f) else { continue };
        let Ok(top) = fs.list("/") else { continue };
        let Some(efi) = top
            .iter()
            .find(|e| e.kind == EntryKind::Dir && e.name.eq_ignore_ascii_case("EFI"))
        else {
            continue;
        };
        let efi_path = format!("/{}", efi.name);
        let Ok(vendors) = fs.list(&efi_path) else {
            continue;
        };
        // \EFI\<vendor>\ and one level below (\EFI\Microsoft\Boot\).
        let mut dirs: Vec<(String, u32)> = vendors
            .iter()
            .filter(|v| v.kind == EntryKind::Dir)
            .map(|v| (format!("{efi_path}/{}", v.name), 1))
            .collect();
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = fs.list(&dir) else { continue };
            for e in &entries {
                match e.kind {
                    EntryKind::File if LOADERS.contains(&e.name.to_ascii_lowercase().as_str()) => {
                        out.uefi.push(format!("{esp}:{dir}/{}", e.name));
                    }
                    EntryKind::Dir if depth < 2 => {
                        dirs.push((format!("{dir}/{}", e.name), depth + 1))
                    }
                    _ => {}
                }
            }
        }
        out.uefi.sort();
    }
    out
}
