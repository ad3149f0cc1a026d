//! `vmshift vm`: whole VMs. Reads a descriptor into the model, checks it
//! and the disks it names, and converts it — descriptor and disks — for
//! libvirt, Proxmox VE, VMware or a plain QEMU command line.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use vmshift_desc::libvirt::DomainDocument;
use vmshift_desc::mapping::{migration_findings, to_kvm, Change, MapOptions};
use vmshift_desc::ovf::{OvaArchive, OvfDocument};
use vmshift_desc::proxmox::ConfDocument;
use vmshift_desc::vmx::{snapshot_names, VmxDocument};
use vmshift_desc::{qemu, read_descriptor, Lowered};
use vmshift_image::engine::{convert, ConvertOptions};
use vmshift_image::output::AtomicOutput;
use vmshift_image::vmdk::VmdkReader;
use vmshift_image::{open_image, Gate, ImageReader, OpenOptions};
use vmshift_model::{DeviceKind, DiskFormat, DiskRef, Finding, FirmwareKind, Severity, Vm};

use crate::args::{
    DiskRootArgs, ModelOutput, VmConvertArgs, VmDiffArgs, VmFormatArg, VmInspectArgs, VmTargetArg,
    VmValidateArgs,
};
use crate::progress::Progress;

/// A descriptor read into the model.
pub(crate) struct Loaded {
    pub(crate) path: PathBuf,
    pub(crate) lowered: Lowered,
    /// An OVA: the archive (verified) and the one handle its disks are
    /// read through.
    pub(crate) archive: Option<(OvaArchive, std::fs::File)>,
}

fn format_of(path: &Path, from: Option<VmFormatArg>) -> Result<VmFormatArg> {
    if let Some(f) = from {
        return Ok(f);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    Ok(match ext.as_str() {
        "vmx" => VmFormatArg::Vmx,
        "xml" => VmFormatArg::Libvirt,
        "conf" => VmFormatArg::Proxmox,
        "ovf" => VmFormatArg::Ovf,
        "ova" => VmFormatArg::Ova,
        _ => bail!(
            "{}: cannot tell the descriptor's format from its name; say --from vmx|libvirt|proxmox|ovf|ova",
            path.display()
        ),
    })
}

pub(crate) fn load(path: &Path, from: Option<VmFormatArg>) -> Result<Loaded> {
    let kind = format_of(path, from)?;
    let with_file = |e: vmshift_desc::DescError| anyhow!(e.in_file(path));
    let mut archive = None;
    let lowered = match kind {
        VmFormatArg::Vmx => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            let doc = VmxDocument::parse(&bytes).map_err(with_file)?;
            let mut l = doc.lower();
            read_vmsd(path, &mut l);
            l
        }
        VmFormatArg::Libvirt => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            DomainDocument::parse(&bytes)
                .and_then(|d| d.lower())
                .map_err(with_file)?
        }
        VmFormatArg::Proxmox => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            ConfDocument::parse(&bytes).map_err(with_file)?.lower()
        }
        VmFormatArg::Ovf => {
            let bytes = read_descriptor(path).map_err(with_file)?;
            OvfDocument::parse(&bytes).map_err(with_file)?.lower()
        }
        VmFormatArg::Ova => {
            // One handle from listing through verification to reading the
            // disks: what was verified is what is converted. The manifest's
            // sums are checked against every member before anything is
            // trusted.
            let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
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
        .map_err(anyhow::Error::from)
        .and_then(|p| read_descriptor(&p).map_err(|e| anyhow!(e)))
        .and_then(|b| VmxDocument::parse(&b).map_err(|e| anyhow!("line {}", e.line.unwrap_or(0))));
    match read {
        Ok(doc) => l.vm.snapshots = snapshot_names(&doc),
        Err(e) => l.findings.push(Finding::new(
            Severity::Warning,
            "vmsd-unreadable",
            "snapshots",
            format!(
                "{}: not a snapshot list ({e:#}); snapshots are not listed",
                name.display()
            ),
        )),
    }
}

/// Whether `p` is an absolute path on a Windows host (`C:\\…`, `\\\\server\\…`).
fn windows_path(p: &str) -> bool {
    let b = p.as_bytes();
    (b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b':' && (b[2] == b'\\' || b[2] == b'/'))
        || p.starts_with("\\\\")
}

/// `NAME=DIR` pairs.
fn pairs(list: &[String], flag: &str) -> Result<BTreeMap<String, PathBuf>> {
    list.iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| anyhow!("{flag} {p}: expected NAME=DIR"))?;
            Ok((k.to_string(), PathBuf::from(v)))
        })
        .collect()
}

/// Resolves the disk references of a descriptor to local files, by one
/// rule: every disk must lie inside a root — the descriptor's folder,
/// a `--disk-root`, or a mapped datastore or storage.
pub(crate) struct Resolver {
    descriptor: PathBuf,
    /// The OVA the descriptor came from, and its open handle: its disks are
    /// members, read in place.
    archive: Option<(OvaArchive, std::fs::File)>,
    gate: Gate,
    datastores: BTreeMap<String, PathBuf>,
    storages: BTreeMap<String, PathBuf>,
}

impl Resolver {
    pub(crate) fn new(
        descriptor: &Path,
        archive: Option<(OvaArchive, std::fs::File)>,
        roots: &DiskRootArgs,
    ) -> Result<Resolver> {
        let datastores = pairs(&roots.datastores, "--datastore")?;
        let storages = pairs(&roots.storages, "--storage-map")?;
        let gate = roots
            .disk_roots
            .iter()
            .chain(datastores.values())
            .chain(storages.values())
            .fold(Gate::new(), |g, r| g.with_root(r))
            .hint("add its folder with --disk-root DIR, or map its datastore or storage (--datastore, --storage-map)");
        Ok(Resolver {
            descriptor: descriptor.to_path_buf(),
            archive,
            gate,
            datastores,
            storages,
        })
    }

    fn folder(&self) -> &Path {
        match self.descriptor.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// Opens the disk image `r` names: a file, or a member of the archive
    /// read in place. Returns how to name it, and the reader.
    pub(crate) fn open(&self, r: &DiskRef) -> Result<(String, Box<dyn ImageReader>)> {
        if let Some((a, file)) = &self.archive {
            let DiskRef::File { path } = r else {
                bail!("'{r}' is not a file of the archive");
            };
            let shown = self.descriptor.join(path);
            let m = a.member(path).ok_or_else(|| {
                anyhow!(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("'{path}' is not in {}", self.descriptor.display())
                ))
            })?;
            let file = file
                .try_clone()
                .with_context(|| format!("{}", self.descriptor.display()))?;
            let img = VmdkReader::open_in_file(file, &shown, m.data_offset, m.size)?;
            return Ok((shown.display().to_string(), Box::new(img)));
        }
        let p = self.resolve(r)?;
        if !p.exists() {
            return Err(anyhow!(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", p.display())
            )));
        }
        let img = open_image(&p, None, &OpenOptions::default())?;
        Ok((p.display().to_string(), img))
    }

    /// The local path of `r`, or why there is none.
    fn resolve(&self, r: &DiskRef) -> Result<PathBuf> {
        if self.archive.is_some() {
            bail!("'{r}' lies inside the archive; only disks are read from it");
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
                    _ => bail!(
                        "'{path}' is a path on a Windows host outside the VM's folder; copy the disk beside the descriptor"
                    ),
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
                    bail!(
                        "'{r}' lies on datastore '{datastore}' outside the VM's folder; map it with --datastore {datastore}=DIR"
                    );
                }
                let name = p
                    .file_name()
                    .ok_or_else(|| anyhow!("'{r}' names no file"))?
                    .to_string_lossy();
                Ok(self.gate.resolve(&self.descriptor, &name, what)?)
            }
            DiskRef::Volume { storage, volume } => {
                let dir = self.storages.get(storage).ok_or_else(|| {
                    anyhow!("'{r}' is a volume of storage '{storage}'; map it with --storage-map {storage}=DIR")
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
            DiskRef::Device { path } => {
                bail!("'{path}' is a host device or LUN, not an image file")
            }
        }
    }
}

/// An error and its causes in one line, without repeating a cause the
/// message above it already quotes.
fn text(e: &anyhow::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in e.chain() {
        let t = c.to_string();
        if !out.iter().any(|o| o.contains(&t)) {
            out.push(t);
        }
    }
    out.join(": ")
}

/// Whether `e` says a file does not exist.
fn not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// The code for a disk reference that did not resolve.
fn unresolved_code(e: &anyhow::Error) -> &'static str {
    if not_found(e) {
        "disk-missing"
    } else {
        "disk-unresolved"
    }
}

/// The checks that need the files: each disk resolves, opens, and holds
/// the format its descriptor declares.
fn disk_findings(vm: &Vm, resolver: &Resolver) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let Some(src) = &d.source else { continue };
        if matches!(src, DiskRef::Device { .. }) {
            continue; // validate() reports it
        }
        let path = format!("disks[{i}].source");
        let severity = if d.device == DeviceKind::Disk {
            Severity::Error
        } else {
            Severity::Warning
        };
        if d.device != DeviceKind::Disk {
            if let Err(e) = resolver.resolve(src).and_then(|p| {
                if p.exists() {
                    Ok(())
                } else {
                    Err(anyhow!(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} does not exist", p.display())
                    )))
                }
            }) {
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

fn print_findings(findings: &[Finding]) {
    for f in findings {
        eprintln!("{f}");
    }
}

pub fn inspect(args: &VmInspectArgs) -> Result<i32> {
    let l = load(&args.vm, args.from)?;
    let mut findings = l.lowered.findings.clone();
    findings.extend(l.lowered.vm.validate());
    match args.output {
        ModelOutput::Json => {
            let v = serde_json::json!({"vm": l.lowered.vm, "findings": findings});
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ModelOutput::Toml => {
            print!("{}", toml::to_string(&l.lowered.vm)?);
            // Findings as TOML comments: one line each.
            for f in &findings {
                println!("# {}", f.to_string().replace(['\n', '\r'], " "));
            }
        }
    }
    Ok(0)
}

pub fn validate(args: &VmValidateArgs) -> Result<i32> {
    // The schema first: it speaks of documents the model cannot read.
    let mut findings = Vec::new();
    if let Some(dir) = &args.libvirt_schema {
        if format_of(&args.vm, args.from)? != VmFormatArg::Libvirt {
            bail!(
                "--libvirt-schema checks libvirt domain XML; {} is not one",
                args.vm.display()
            );
        }
        let bytes = read_descriptor(&args.vm).map_err(|e| anyhow!(e.in_file(&args.vm)))?;
        let doc =
            vmshift_desc::xml::Document::parse(&bytes).map_err(|e| anyhow!(e.in_file(&args.vm)))?;
        findings.extend(vmshift_desc::schema::validate_domain(&doc, dir).map_err(|e| anyhow!(e))?);
    }
    let l = match load(&args.vm, args.from) {
        Ok(l) => l,
        Err(e) if !findings.is_empty() => {
            for f in &findings {
                println!("{f}");
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let resolver = Resolver::new(&l.path, l.archive, &args.roots)?;
    findings.extend(l.lowered.findings.clone());
    findings.extend(l.lowered.vm.validate());
    findings.extend(disk_findings(&l.lowered.vm, &resolver));
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if findings.is_empty() {
        println!("{}: no findings", args.vm.display());
    }
    Ok(if errors > 0 { 1 } else { 0 })
}

pub fn diff(args: &VmDiffArgs) -> Result<i32> {
    let a = load(&args.a, args.from_a)?.lowered.vm;
    let b = load(&args.b, args.from_b)?.lowered.vm;
    let (ja, jb) = (serde_json::to_value(&a)?, serde_json::to_value(&b)?);
    let mut lines = Vec::new();
    json_diff("", &ja, &jb, &mut lines);
    for l in &lines {
        println!("{l}");
    }
    Ok(if lines.is_empty() { 0 } else { 1 })
}

fn json_diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                json_diff(
                    &join(k),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let null = Value::Null;
                json_diff(
                    &format!("{path}[{i}]"),
                    x.get(i).unwrap_or(&null),
                    y.get(i).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} → {b}")),
    }
}

/// A name safe to use as a file name inside `--out`.
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "vm".into()
    } else {
        s
    }
}

/// `rel` must be a plain relative path (no `..`, not absolute).
fn inside(out: &Path, rel: &Path) -> Result<PathBuf> {
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("{}: would leave the output folder", rel.display());
    }
    Ok(out.join(rel))
}

/// Where disk `n` of Proxmox VM `id` goes in a directory storage
/// (`images/<id>/vm-<id>-disk-<n>.<ext>`) and how the config names it
/// (`STORAGE:<id>/vm-<id>-disk-<n>.<ext>`).
fn proxmox_volume(id: u32, storage: &str, n: usize, ext: &str) -> (PathBuf, DiskRef) {
    let file = format!("vm-{id}-disk-{n}.{ext}");
    (
        PathBuf::from("images").join(id.to_string()).join(&file),
        DiskRef::Volume {
            storage: storage.to_string(),
            volume: format!("{id}/{file}"),
        },
    )
}

/// The OVMF files Debian's ovmf package installs: (code, vars template).
fn ovmf(secure: bool) -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new("/usr/share/OVMF");
    let (code, vars) = if secure {
        ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")
    } else {
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
    };
    let (c, v) = (dir.join(code), dir.join(vars));
    (c.is_file() && v.is_file()).then_some((c, v))
}

/// One output file a conversion writes.
struct Job {
    /// What to copy (a disk, or OVMF's variable template).
    img: Box<dyn ImageReader>,
    /// How the source is named in messages.
    input: String,
    target: PathBuf,
    format: DiskFormat,
}

pub fn convert_vm(args: &VmConvertArgs) -> Result<i32> {
    let l = load(&args.vm, args.from)?;
    let resolver = Resolver::new(&l.path, l.archive, &args.roots)?;
    let mut findings = l.lowered.findings.clone();
    findings.extend(l.lowered.vm.validate());
    let disk_format: DiskFormat = match (args.disk_format, args.to) {
        (Some(f), _) => f.into(),
        (None, VmTargetArg::Vmx) => DiskFormat::Vmdk,
        (None, _) => DiskFormat::Qcow2,
    };
    if args.to == VmTargetArg::Proxmox && args.vmid.is_none() {
        bail!("--to proxmox needs --vmid N --storage NAME");
    }
    // Sparse source images are thin: the converted disks get discard.
    let mut src = l.lowered.vm.clone();
    for d in &mut src.disks {
        if d.device != DeviceKind::Disk {
            continue;
        }
        if let Some(Ok((_, img))) = d.source.as_ref().map(|r| resolver.open(r)) {
            d.thin |= is_thin(img.as_ref());
        }
    }
    let map_opts = MapOptions {
        keep_models: args.keep_models,
        force_virtio: args.virtio,
        disk_format,
    };
    let (mut vm, mut changes): (Vm, Vec<Change>) = match args.to {
        VmTargetArg::Vmx => (src.clone(), Vec::new()),
        _ => to_kvm(&src, &map_opts),
    };
    if args.to != VmTargetArg::Vmx {
        findings.extend(migration_findings(&src, &vm, &map_opts));
    }
    // The converted VM's own problems that the source did not have
    // (addresses the mapping could not place, a boot bus OVMF lacks).
    let known: std::collections::HashSet<(String, String)> = findings
        .iter()
        .map(|f| (f.code.clone(), f.path.clone()))
        .collect();
    findings.extend(
        vm.validate()
            .into_iter()
            .chain(vm.target_findings())
            .filter(|f| !known.contains(&(f.code.clone(), f.path.clone()))),
    );

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: creating the output folder", args.out.display()))?;
    let out = args
        .out
        .canonicalize()
        .with_context(|| format!("{}", args.out.display()))?;
    let base = safe_name(&vm.name);
    let ext = match disk_format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
        DiskFormat::Vmdk => "vmdk",
    };
    let missing_severity = if args.descriptor_only {
        Severity::Warning
    } else {
        Severity::Error
    };

    // Plan: every disk opened, every output named, before anything is
    // written.
    let mut jobs: Vec<Job> = Vec::new();
    let mut n = 0;
    for i in 0..vm.disks.len() {
        let d = vm.disks[i].clone();
        let Some(source) = &d.source else { continue };
        if d.device != DeviceKind::Disk {
            // Media (ISOs, floppy images) are not copied: point at them
            // where they are, when they resolve (Proxmox can only name
            // storage volumes, so there the drive is left empty).
            let placed = resolver
                .resolve(source)
                .and_then(|p| p.canonicalize().with_context(|| format!("{}", p.display())));
            match placed {
                Ok(p) if args.to != VmTargetArg::Proxmox => {
                    vm.disks[i].source = Some(DiskRef::File {
                        path: p.display().to_string(),
                    })
                }
                Ok(p) => {
                    findings.push(Finding::new(
                        Severity::Info,
                        "media-not-carried",
                        format!("disks[{i}].source"),
                        format!("{} is not on a Proxmox storage; the drive is left empty (upload the ISO and attach it)", p.display()),
                    ));
                    vm.disks[i].source = None;
                }
                Err(e) => {
                    findings.push(Finding::new(
                        Severity::Warning,
                        "media-missing",
                        format!("disks[{i}].source"),
                        format!("{}; the drive is left empty", text(&e)),
                    ));
                    vm.disks[i].source = None;
                }
            }
            continue;
        }
        let (rel, reference) = match (args.to, args.vmid, &args.storage) {
            (VmTargetArg::Proxmox, Some(id), Some(storage)) => proxmox_volume(id, storage, n, ext),
            _ => {
                let file = format!("{base}-disk{n}.{ext}");
                let at = match (&args.target_dir, args.to) {
                    (Some(t), VmTargetArg::Libvirt) => t.join(&file),
                    (_, VmTargetArg::Vmx) => PathBuf::from(&file),
                    _ => out.join(&file),
                };
                (
                    PathBuf::from(&file),
                    DiskRef::File {
                        path: at.display().to_string(),
                    },
                )
            }
        };
        n += 1;
        let target = inside(&out, &rel)?;
        vm.disks[i].source = Some(reference);
        vm.disks[i].format = Some(disk_format);
        let (input, img) = match resolver.open(source) {
            Ok(x) => x,
            Err(e) => {
                findings.push(Finding::new(
                    missing_severity,
                    unresolved_code(&e),
                    format!("disks[{i}].source"),
                    text(&e),
                ));
                continue;
            }
        };
        if let Some(declared) = d.size.filter(|&n| n != img.size()) {
            findings.push(Finding::new(
                Severity::Warning,
                "disk-size-mismatch",
                format!("disks[{i}].size"),
                format!(
                    "the descriptor says {declared} bytes, but {input} holds {}; the image's size is used",
                    img.size()
                ),
            ));
        }
        vm.disks[i].size = Some(img.size());
        jobs.push(Job {
            img,
            input,
            target,
            format: disk_format,
        });
    }

    // Serial logs land in --out under names of their own.
    if args.to != VmTargetArg::Vmx {
        for (i, s) in vm.serials.iter_mut().enumerate() {
            if s.kind != vmshift_model::SerialKind::File {
                continue;
            }
            let to = out
                .join(format!("{base}-serial{}.log", s.port))
                .display()
                .to_string();
            changes.push(Change {
                path: format!("serials[{i}].target"),
                from: s.target.clone().unwrap_or_default(),
                to: to.clone(),
                why: "the serial log is written beside the converted VM".into(),
            });
            s.target = Some(to);
        }
    }

    // UEFI variable stores: never carried over; a fresh one from OVMF's
    // template where the target needs a file for it.
    let uefi = vm.firmware.kind == FirmwareKind::Uefi;
    if uefi && args.to != VmTargetArg::Vmx {
        findings.push(Finding::new(
            Severity::Info,
            "nvram-not-carried",
            "firmware.efi-vars",
            "the source's UEFI variables (boot entries) are not carried over: the new VM starts from OVMF's defaults and boots the default path (\\EFI\\BOOT\\BOOTX64.EFI) until the OS registers its loader again",
        ));
        vm.firmware.efi_vars = None;
    }
    let mut ovmf_files = None;
    if uefi && matches!(args.to, VmTargetArg::Proxmox | VmTargetArg::QemuArgs) {
        let (code, template) = ovmf(vm.firmware.secure_boot).ok_or_else(|| {
            anyhow!("the VM is UEFI and needs OVMF's variable store template; install Debian's ovmf package")
        })?;
        let (rel, reference, fmt) = match (args.vmid, &args.storage) {
            (Some(id), Some(storage)) if args.to == VmTargetArg::Proxmox => {
                let (rel, r) = proxmox_volume(id, storage, n, ext);
                (rel, r, disk_format)
            }
            _ => {
                let file = format!("{base}_VARS.fd");
                let at = out.join(&file).display().to_string();
                (
                    PathBuf::from(&file),
                    DiskRef::File { path: at },
                    DiskFormat::Raw,
                )
            }
        };
        let target = inside(&out, &rel)?;
        let vars = open_image(&template, Some(DiskFormat::Raw), &OpenOptions::default())?;
        jobs.push(Job {
            img: vars,
            input: template.display().to_string(),
            target: target.clone(),
            format: fmt,
        });
        ovmf_files = Some((code, target));
        vm.firmware.efi_vars = Some(reference);
    }

    // The descriptor.
    let (file, text) = match args.to {
        VmTargetArg::Libvirt => (format!("{base}.xml"), DomainDocument::raise(&vm).render()),
        VmTargetArg::Vmx => {
            let (doc, f) = VmxDocument::raise(&vm);
            findings.extend(f);
            (format!("{base}.vmx"), doc.render())
        }
        VmTargetArg::Proxmox => {
            let id = args.vmid.unwrap_or(100);
            let raised = vmshift_desc::proxmox::raise_with_findings(
                &vm,
                &vmshift_desc::proxmox::RaiseOptions {
                    vmid: Some(id),
                    ..Default::default()
                },
            );
            findings.extend(raised.findings);
            (format!("{id}.conf"), raised.doc.render())
        }
        VmTargetArg::QemuArgs => {
            let o = ovmf_files.as_ref().map(|(c, v)| qemu::Ovmf {
                code: c.display().to_string(),
                vars: v.display().to_string(),
            });
            let (argv, f) = qemu::command_line(&vm, o.as_ref());
            findings.extend(f);
            (format!("{base}.sh"), qemu::script(&argv))
        }
    };
    let descriptor = inside(&out, Path::new(&file))?;

    // Pre-flight: no errors, no output that exists already (unless
    // --force) — nothing has been written yet.
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if errors > 0 {
        print_findings(&findings);
        let missing = findings
            .iter()
            .any(|f| f.severity == Severity::Error && f.code.starts_with("disk-"));
        bail!(
            "{}: {errors} error(s) above; nothing was written{}",
            args.vm.display(),
            if missing {
                " (--descriptor-only writes the descriptor without the disks)"
            } else {
                ""
            }
        );
    }
    if args.descriptor_only {
        jobs.clear();
    }
    let targets: Vec<&Path> = jobs
        .iter()
        .map(|j| j.target.as_path())
        .chain([descriptor.as_path()])
        .collect();
    if !args.force {
        if let Some(t) = targets.iter().find(|t| t.exists()) {
            bail!(
                "{}: already exists; --force replaces it (nothing was written)",
                t.display()
            );
        }
    }

    // Write: the disks, then the descriptor that names them. A failure
    // removes what this run wrote.
    crate::signals::install();
    let mut written: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<()> {
        for (k, job) in jobs.iter().enumerate() {
            if let Some(parent) = job.target.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
                // A symlink inside --out must not lead outside it.
                let real = parent.canonicalize()?;
                if !real.starts_with(&out) {
                    bail!(
                        "{}: leads outside {} (a symlink?)",
                        parent.display(),
                        out.display()
                    );
                }
            }
            eprintln!(
                "vmshift: {}/{}: {} → {}",
                k + 1,
                jobs.len(),
                job.input,
                job.target.display()
            );
            copy_disk(
                job.img.as_ref(),
                &job.target,
                job.format,
                args.force,
                args.progress,
            )?;
            written.push(job.target.clone());
        }
        let (o, mut fh) = AtomicOutput::create(&descriptor, args.force)?;
        if args.to == VmTargetArg::QemuArgs {
            use std::os::unix::fs::PermissionsExt;
            fh.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        }
        std::io::Write::write_all(&mut fh, text.as_bytes())
            .and_then(|()| fh.sync_all())
            .with_context(|| format!("{}", descriptor.display()))?;
        o.commit()?;
        Ok(())
    })();
    if let Err(e) = result {
        for w in &written {
            let _ = std::fs::remove_file(w);
        }
        return Err(e);
    }

    // The report.
    println!("wrote {}", descriptor.display());
    for c in &changes {
        println!("changed {c}");
    }
    for f in &findings {
        println!("{f}");
    }
    Ok(0)
}

/// Whether an image allocates space as it is written (qcow2, sparse
/// VMDK): its guest's discards are worth passing on.
fn is_thin(img: &dyn ImageReader) -> bool {
    match img.format() {
        DiskFormat::Qcow2 => true,
        DiskFormat::Vmdk => img
            .info()
            .format_specific
            .iter()
            .find(|(k, _)| *k == "create-type")
            .and_then(|(_, v)| v.as_str().map(str::to_string))
            .is_some_and(|t| {
                matches!(
                    t.as_str(),
                    "monolithicSparse"
                        | "streamOptimized"
                        | "twoGbMaxExtentSparse"
                        | "vmfsSparse"
                        | "seSparse"
                        | "vmfsThin"
                )
            }),
        DiskFormat::Raw => false,
    }
}

/// Converts one image to `target` atomically.
fn copy_disk(
    src: &dyn ImageReader,
    target: &Path,
    format: DiskFormat,
    force: bool,
    progress: bool,
) -> Result<()> {
    use vmshift_image::create::{create_writer, CreateSpec};
    use vmshift_image::output::SideOutputs;
    let spec = CreateSpec {
        format,
        size: src.size(),
        options: Vec::new(),
        compress: false,
        name: super::file_name(target),
    };
    spec.validate()?;
    let (out, file) = AtomicOutput::create(target, force)?;
    let mut sides = SideOutputs::new(target, force);
    let mut writer = create_writer(file, out.temp_path(), &spec, &mut sides)?;
    let bar = Progress::new(src.size(), progress);
    let opts = ConvertOptions {
        cancel: Some(&crate::signals::INTERRUPTED),
        ..ConvertOptions::default()
    };
    convert(src, writer.as_mut(), &opts, &|done, total| {
        bar.update(done, total)
    })?;
    bar.finish();
    writer.finish()?;
    sides.commit()?;
    out.commit()?;
    Ok(())
}
