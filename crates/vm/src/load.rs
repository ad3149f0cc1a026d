//! Reading a descriptor — `.vmx`, libvirt XML, Proxmox `.conf`, OVF, OVA —
//! into the model.

use std::path::{Path, PathBuf};

use vmshift_desc::libvirt::DomainDocument;
use vmshift_desc::ovf::{OvaArchive, OvfDocument};
use vmshift_desc::proxmox::ConfDocument;
use vmshift_desc::vmx::{snapshot_names, VmxDocument};
use vmshift_desc::{read_descriptor, Lowered};
use vmshift_image::Gate;
use vmshift_model::{Finding, Severity};

use crate::error::{Error, Result};

/// The descriptor formats vmshift reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescriptorFormat {
    /// VMware `.vmx`.
    Vmx,
    /// libvirt domain XML.
    Libvirt,
    /// Proxmox VE qemu-server `.conf`.
    Proxmox,
    /// OVF descriptor.
    Ovf,
    /// OVA archive (OVF and disks in a tar).
    Ova,
}

impl DescriptorFormat {
    /// The format a file's extension names, if any.
    pub fn from_extension(path: &Path) -> Option<DescriptorFormat> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())?;
        Some(match ext.as_str() {
            "vmx" => DescriptorFormat::Vmx,
            "xml" => DescriptorFormat::Libvirt,
            "conf" => DescriptorFormat::Proxmox,
            "ovf" => DescriptorFormat::Ovf,
            "ova" => DescriptorFormat::Ova,
            _ => return None,
        })
    }

    /// `from`, or the format of `path`'s extension.
    pub fn of(path: &Path, from: Option<DescriptorFormat>) -> Result<DescriptorFormat> {
        from.or_else(|| Self::from_extension(path)).ok_or_else(|| {
            Error::Request(format!(
                "{}: cannot tell the descriptor's format from its name; say --from vmx|libvirt|proxmox|ovf|ova",
                path.display()
            ))
        })
    }
}

/// A descriptor read into the model.
#[derive(Debug)]
pub struct Loaded {
    /// The descriptor's path.
    pub path: PathBuf,
    /// The model and what reading it found.
    pub lowered: Lowered,
    /// An OVA: the archive (verified) and the one handle its disks are
    /// read through.
    pub archive: Option<(OvaArchive, std::fs::File)>,
    /// A `.vmx`: its `checkpoint.vmState` (empty when absent), for
    /// [`crate::state`].
    pub vmx_vmstate: Option<String>,
}

/// Reads the descriptor at `path` (its format `from`, or by extension).
pub fn load(path: &Path, from: Option<DescriptorFormat>) -> Result<Loaded> {
    let kind = DescriptorFormat::of(path, from)?;
    let with_file = |e: vmshift_desc::DescError| Error::Descriptor(e.in_file(path));
    let mut archive = None;
    let mut vmx_vmstate = None;
    let lowered = match kind {
        DescriptorFormat::Vmx => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            let doc = VmxDocument::parse(&bytes).map_err(with_file)?;
            vmx_vmstate = Some(doc.get("checkpoint.vmState").unwrap_or("").to_string());
            let mut l = doc.lower();
            // VMware names a VM without displayName after its .vmx file.
            if doc.get("displayName").is_none() {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                l.findings.push(Finding::new(
                    Severity::Info,
                    "vmx-default-name",
                    "vmx:displayName",
                    format!("displayName is not set: the VM takes its .vmx file's name, '{stem}', as VMware does"),
                ));
                l.vm.name = stem;
            }
            read_vmsd(path, &mut l);
            l
        }
        DescriptorFormat::Libvirt => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            DomainDocument::parse(&bytes)
                .and_then(|d| d.lower())
                .map_err(with_file)?
        }
        DescriptorFormat::Proxmox => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            ConfDocument::parse(&bytes).map_err(with_file)?.lower()
        }
        DescriptorFormat::Ovf => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            OvfDocument::parse(&bytes).map_err(with_file)?.lower()
        }
        DescriptorFormat::Ova => {
            // One handle from listing through verification to reading the
            // disks: what was verified is what is converted. The manifest's
            // sums are checked against every member before anything is
            // trusted.
            let file = std::fs::File::open(path).map_err(Error::io(path, "opening the OVA"))?;
            let ova = OvaArchive::from_file(&file, path).map_err(with_file)?;
            let verified = ova.verify().map_err(with_file)?;
            let doc = ova.descriptor().map_err(with_file)?;
            let mut l = doc.lower();
            l.findings.extend(ova.findings().iter().cloned());
            l.findings.extend(verified);
            l.findings.extend(ova.check_references(&doc));
            archive = Some((ova, file));
            l
        }
    };
    Ok(Loaded {
        path: path.to_path_buf(),
        lowered,
        archive,
        vmx_vmstate,
    })
}

/// Snapshot names from the `.vmsd` beside a `.vmx`, read through the same
/// gate as disks (no symlink out of the folder); a `.vmsd` that cannot be
/// read is a finding, never fatal.
fn read_vmsd(vmx: &Path, l: &mut Lowered) {
    let name = vmx.with_extension("vmsd");
    let Some(file_name) = name.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    if std::fs::symlink_metadata(&name).is_err() {
        return;
    }
    let read = Gate::new()
        .resolve(vmx, &file_name, "snapshot list")
        .map_err(|e| e.to_string())
        .and_then(|p| read_descriptor(&p).map_err(|e| e.to_string()))
        .and_then(|b| VmxDocument::parse(&b).map_err(|e| format!("line {}", e.line.unwrap_or(0))));
    match read {
        Ok(doc) => l.vm.snapshots = snapshot_names(&doc),
        Err(e) => l.findings.push(Finding::new(
            Severity::Warning,
            "vmsd-unreadable",
            "snapshots",
            format!(
                "{}: not a snapshot list ({e}); snapshots are not listed",
                name.display()
            ),
        )),
    }
}
