//! Where the disks a descriptor names are: every reference resolved to a
//! local file by one rule — it must lie inside a root (the descriptor's
//! folder, a `--disk-root`, a mapped datastore or storage) — and opened
//! through the image gate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmshift_desc::ovf::OvaArchive;
use vmshift_image::vmdk::VmdkReader;
use vmshift_image::{open_image, Gate, ImageReader, OpenOptions};
use vmshift_model::{DeviceKind, DiskRef, Finding, Severity, Vm};

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
        if self.archive.is_some() {
            return Err(unresolved(format!(
                "'{r}' lies inside the archive; only disks are read from it"
            )));
        }
        let what = "disk";
        match r {
            DiskRef::File { path } if windows_path(path) => {
                // A path on the Windows host the VM came from: its folder
                // is the VM's own when the names match; resolve by file name.
                let parts: Vec<&str> = path.split(['\\', '/']).filter(|p| !p.is_empty()).collect();
                let own = self.folder().canonicalize().ok();
                let own = own
                    .as_ref()
                    .and_then(|o| o.file_name())
                    .map(|n| n.to_string_lossy().into_owned());
                match (parts.as_slice(), own) {
                    ([.., dir, file], Some(own)) if dir.eq_ignore_ascii_case(&own) => {
                        Ok(self.gate.resolve(&self.descriptor, file, what)?)
                    }
                    _ => Err(unresolved(format!(
                        "'{path}' is a path on a Windows host outside the VM's folder; copy the disk beside the descriptor"
                    ))),
                }
            }
            DiskRef::File { path } => Ok(self.gate.resolve(&self.descriptor, path, what)?),
            DiskRef::Datastore { datastore, path } => {
                if let Some(dir) = self.datastores.get(datastore) {
                    let p = dir.join(path);
                    return Ok(self
                        .gate
                        .resolve(&self.descriptor, &p.to_string_lossy(), what)?);
                }
                // A datastore path into the VM's own folder resolves there
                // by file name: `[ds] vm/vm.vmdk` beside `vm/vm.vmx`.
                let p = Path::new(path);
                let own = self.folder().canonicalize().ok();
                let parent = p.parent().and_then(|x| x.file_name());
                let same = match (parent, own.as_ref().and_then(|o| o.file_name())) {
                    (None, _) => true,
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                };
                if !same {
                    return Err(unresolved(format!(
                        "'{r}' lies on datastore '{datastore}' outside the VM's folder; map it with --datastore {datastore}=DIR"
                    )));
                }
                let name = p
                    .file_name()
                    .ok_or_else(|| unresolved(format!("'{r}' names no file")))?
                    .to_string_lossy();
                Ok(self.gate.resolve(&self.descriptor, &name, what)?)
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
                Ok(self
                    .gate
                    .resolve(&self.descriptor, &p.to_string_lossy(), what)?)
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
    if e.is_not_found() {
        "disk-missing"
    } else {
        "disk-unresolved"
    }
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
            Err(e) => out.push(Finding::new(severity, unresolved_code(&e), path, text(&e))),
        }
    }
    out
}
