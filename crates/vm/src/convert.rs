//! Converting a whole VM: the descriptor mapped for the target, every disk
//! copied through vmshift's engine, nothing written until every check
//! passed, and what a failed run wrote removed.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vmshift_desc::libvirt::DomainDocument;
use vmshift_desc::mapping::{migration_findings, to_kvm, Change, MapOptions, NetTarget};
use vmshift_desc::qemu;
use vmshift_desc::vmx::VmxDocument;
use vmshift_image::engine::{convert, ConvertOptions};
use vmshift_image::output::AtomicOutput;
use vmshift_image::{open_image, ImageReader, OpenOptions};
use vmshift_model::{DeviceKind, DiskFormat, DiskRef, Finding, FirmwareKind, Severity, Vm};

use crate::error::{Error, Result};
use crate::load::Loaded;
use crate::resolve::{open_failure, text, Resolver};

/// What a conversion produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A libvirt domain XML.
    Libvirt,
    /// A Proxmox VE VM (`<vmid>.conf` and a directory-storage layout).
    Proxmox,
    /// A VMware `.vmx`.
    Vmx,
    /// A `qemu-system-x86_64` command line, as a shell script.
    QemuArgs,
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertRequest {
    /// What to produce.
    pub to: Target,
    /// The folder to write into (created if missing); nothing is written
    /// outside it.
    pub out: PathBuf,
    /// The disks' format (default: qcow2; VMDK for a `.vmx`).
    pub disk_format: Option<DiskFormat>,
    /// libvirt: the folder the disks will live in on the hypervisor.
    pub target_dir: Option<PathBuf>,
    /// Proxmox: the VM id.
    pub vmid: Option<u32>,
    /// Proxmox: the directory storage the disks go to.
    pub storage: Option<String>,
    /// Keep the source's device models instead of virtio.
    pub keep_models: bool,
    /// Put every disk and NIC on virtio, even where the guest may lack the
    /// drivers.
    pub force_virtio: bool,
    /// Write the descriptor only, not the disks.
    pub descriptor_only: bool,
    /// Replace outputs that exist.
    pub force: bool,
    /// Go on with a suspended or locked VMware VM.
    pub allow: crate::state::Allow,
    /// Where each source network goes (`--network-map NAME=TARGET`).
    pub networks: Vec<(String, NetTarget)>,
    /// The host bridge for every NIC not mapped otherwise and not on
    /// VMware NAT, host-only or a custom vmnet (`--bridge NAME`).
    pub bridge: Option<String>,
    /// The sandbox the run enters once every input is open (the disks,
    /// OVMF's variable template, libvirt's schema) and the output folder
    /// exists, before it reads what the guest wrote: called with the
    /// output folder (canonical), and the folder above the highest folder
    /// this run made (whose empty folders a failed run removes), if it
    /// made any.
    pub confine: Option<Confine>,
}

/// The sandbox a conversion enters (see [`ConvertRequest::confine`]).
pub type Confine = fn(&Path, Option<&Path>) -> std::result::Result<(), String>;

/// Told how a conversion goes; every method has a default that does
/// nothing.
pub trait Observer: Sync {
    /// Disk `index` of `count` starts: `input` → `target`, `size` bytes.
    fn disk_started(&self, index: usize, count: usize, input: &str, target: &Path, size: u64) {
        let _ = (index, count, input, target, size);
    }
    /// `done` of `total` bytes of the current disk are copied.
    fn progress(&self, done: u64, total: u64) {
        let _ = (done, total);
    }
    /// The current disk is written.
    fn disk_finished(&self) {}
}

/// An observer that is told nothing.
#[derive(Debug, Default)]
pub struct Quiet;
impl Observer for Quiet {}

/// What a conversion wrote and found.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The descriptor written.
    pub descriptor: PathBuf,
    /// The disks written.
    pub disks: Vec<PathBuf>,
    /// What the mapping changed, and why.
    pub changes: Vec<Change>,
    /// Every finding (none of them an error), most severe first.
    pub findings: Vec<Finding>,
    /// The converted VM.
    pub vm: Vm,
}

/// A name safe to use as a file name inside the output folder.
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
        return Err(Error::Request(format!(
            "{}: would leave the output folder",
            rel.display()
        )));
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
    img: Arc<dyn ImageReader>,
    /// How the source is named in messages.
    input: String,
    target: PathBuf,
    format: DiskFormat,
}

/// A disk opened before the sandbox: how it is named, and its reader.
type OpenedDisk = Result<(String, Arc<dyn ImageReader>)>;
/// An image opened before the sandbox.
type OpenedImage = Result<Arc<dyn ImageReader>>;

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

/// Converts the VM `loaded` describes, its disks found by `resolver`.
/// `cancel`, when set, stops the copy between windows (the run then fails
/// and removes what it wrote, and the output folder if it made it).
pub fn convert_vm(
    loaded: &Loaded,
    resolver: &Resolver,
    req: &ConvertRequest,
    observer: &dyn Observer,
    cancel: Option<&'static AtomicBool>,
) -> Result<ConvertReport> {
    if req.out.exists() && !req.out.is_dir() {
        return Err(Error::Request(format!(
            "{}: exists and is not a folder; --out names the folder to write into",
            req.out.display()
        )));
    }
    // The folders this run will make, the output folder first.
    let made: Vec<PathBuf> = req
        .out
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .map(Path::to_path_buf)
        .collect();
    let above = made.last().map(|top| {
        top.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    });
    let r = convert_into(loaded, resolver, req, observer, cancel, above.as_deref());
    if r.is_err() {
        // Only empty folders go (remove_dir refuses any other).
        for dir in &made {
            let _ = std::fs::remove_dir(dir);
        }
    }
    r
}

fn convert_into(
    loaded: &Loaded,
    resolver: &Resolver,
    req: &ConvertRequest,
    observer: &dyn Observer,
    cancel: Option<&'static AtomicBool>,
    made_above: Option<&Path>,
) -> Result<ConvertReport> {
    let mut findings = loaded.lowered.findings.clone();
    findings.extend(loaded.lowered.vm.validate());
    findings.extend(crate::state::state_findings(loaded, resolver, req.allow));

    let disk_format = match (req.disk_format, req.to) {
        (Some(f), _) => f,
        (None, Target::Vmx) => DiskFormat::Vmdk,
        (None, _) => DiskFormat::Qcow2,
    };
    if req.to == Target::Proxmox && (req.vmid.is_none() || req.storage.is_none()) {
        return Err(Error::Request(
            "--to proxmox needs --vmid N --storage NAME".into(),
        ));
    }
    for (i, (k, _)) in req.networks.iter().enumerate() {
        let key = vmshift_desc::mapping::net_key(k);
        if req.networks[..i]
            .iter()
            .any(|(other, _)| vmshift_desc::mapping::net_key(other) == key)
        {
            return Err(Error::Request(format!(
                "--network-map: '{k}' is mapped twice (names compare without case and without /dev/)"
            )));
        }
    }
    if req.to == Target::Proxmox {
        for (k, t) in &req.networks {
            if let NetTarget::Network(n) = t {
                return Err(Error::Request(format!(
                    "--network-map {k}=network:{n}: Proxmox attaches NICs to bridges; map to bridge:NAME[,tag=VLAN]"
                )));
            }
        }
    }
    if req.to == Target::Vmx && loaded.lowered.vm.disks.iter().any(|d| d.passthrough) {
        return Err(Error::Request(
            "--map-device gives a KVM VM a host block device; for a .vmx, make the RDM on the ESXi host (vmkfstools -z) and attach it there".into(),
        ));
    }
    if req.to == Target::Vmx && (!req.networks.is_empty() || req.bridge.is_some()) {
        return Err(Error::Request(
            "--network-map and --bridge map networks for KVM; --to vmx keeps the VM's own".into(),
        ));
    }

    // Every input open before the sandbox: the disks (once each; the plan
    // below takes them from here), OVMF's variable templates where the
    // target may need one (the guest may turn a BIOS VM into a UEFI one),
    // and what libvirt's schema accepts.
    let mut opened: Vec<Option<OpenedDisk>> = loaded
        .lowered
        .vm
        .disks
        .iter()
        .map(|d| match &d.source {
            Some(src) if d.device == DeviceKind::Disk => {
                Some(resolver.open(src).map(|(name, img)| (name, Arc::from(img))))
            }
            _ => None,
        })
        .collect();
    let templates: Vec<(bool, (PathBuf, PathBuf), OpenedImage)> =
        if matches!(req.to, Target::Proxmox | Target::QemuArgs) {
            [false, true]
                .into_iter()
                .filter_map(|secure| {
                    let (code, template) = ovmf(secure)?;
                    let img = open_image(&template, Some(DiskFormat::Raw), &OpenOptions::default())
                        .map(Arc::from)
                        .map_err(Error::from);
                    Some((secure, (code, template), img))
                })
                .collect()
        } else {
            Vec::new()
        };
    let nvme = match req.to {
        Target::QemuArgs => true,
        Target::Libvirt => vmshift_desc::schema::accepts_emulated_nvme(Path::new(
            vmshift_desc::schema::DEFAULT_SCHEMA_DIR,
        )),
        Target::Proxmox | Target::Vmx => false,
    };
    std::fs::create_dir_all(&req.out).map_err(Error::io(&req.out, "creating the output folder"))?;
    let out = req
        .out
        .canonicalize()
        .map_err(Error::io(&req.out, "reading the output folder"))?;
    if let Some(confine) = req.confine {
        confine(&out, made_above).map_err(|e| Error::Request(format!("the sandbox: {e}")))?;
    }

    // The guest itself, read offline from its disks.
    let guest = if req.to != Target::Vmx {
        let disks: Option<Vec<Arc<dyn ImageReader>>> = opened
            .iter()
            .flatten()
            .map(|r| r.as_ref().ok().map(|(_, img)| img.clone()))
            .collect();
        disks.and_then(crate::resolve::read_guest_of)
    } else {
        None
    };
    // Sparse source images are thin: the converted disks get discard.
    let mut src = loaded.lowered.vm.clone();
    for (d, o) in src.disks.iter_mut().zip(&opened) {
        if d.passthrough {
            continue;
        }
        if let Some(Ok((_, img))) = o {
            d.thin |= is_thin(img.as_ref());
        }
    }
    // The firmware the boot disk boots with, where the descriptor asks
    // for the other (an OVF that lost `firmware = "efi"`): the converted
    // VM gets what the disk needs, and the report says so.
    let mut firmware_change = None;
    if let Some(g) = &guest {
        if let Some((kind, why)) = crate::resolve::firmware_fix(&src, g) {
            firmware_change = Some(Change {
                path: "firmware".into(),
                from: format!("{:?}", src.firmware.kind).to_lowercase(),
                to: format!("{kind:?}").to_lowercase(),
                why: format!(
                    "the guest: {}",
                    why.split(": it would").next().unwrap_or(&why)
                ),
            });
            src.firmware.kind = kind;
            if kind == vmshift_model::FirmwareKind::Bios {
                src.firmware.secure_boot = false;
                src.firmware.efi_vars = None;
            }
        }
        findings.extend(crate::resolve::guest_findings(&src, g));
    }
    let map_opts = MapOptions {
        keep_models: req.keep_models,
        force_virtio: req.force_virtio,
        disk_format,
        networks: req.networks.clone(),
        bridge: req.bridge.clone(),
        nvme,
        guest: guest.as_ref().and_then(crate::resolve::guest_drivers),
    };
    let (mut vm, mut changes): (Vm, Vec<Change>) = match req.to {
        Target::Vmx => (src.clone(), Vec::new()),
        _ => to_kvm(&src, &map_opts),
    };
    changes.extend(firmware_change);
    if req.to != Target::Vmx {
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

    let base = safe_name(&vm.name);
    let ext = match disk_format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
        DiskFormat::Vmdk => "vmdk",
    };
    let missing_severity = if req.descriptor_only {
        Severity::Warning
    } else {
        Severity::Error
    };

    // Plan: every disk opened, every output named, before anything is
    // written.
    let mut jobs: Vec<Job> = Vec::new();
    let mut n = 0;
    // The mapping keeps the source's disks, in its order.
    if opened.len() != vm.disks.len() {
        return Err(Error::Request(format!(
            "internal error: the mapping made {} disks of {}",
            vm.disks.len(),
            opened.len()
        )));
    }
    for (i, slot) in opened.iter_mut().enumerate() {
        let d = vm.disks[i].clone();
        let Some(source) = &d.source else { continue };
        if d.passthrough {
            // A host block device, as the user mapped it: used in place.
            continue;
        }
        if d.device != DeviceKind::Disk {
            // Media (ISOs, floppy images) are not copied: point at them
            // where they are, when they resolve (Proxmox can only name
            // storage volumes, so there the drive is left empty).
            let placed = resolver.resolve(source).and_then(|p| {
                p.canonicalize()
                    .map_err(Error::io(&p, "reading the medium"))
            });
            match placed {
                Ok(p) if req.to != Target::Proxmox => {
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
        let (rel, reference) = match (req.to, req.vmid, &req.storage) {
            (Target::Proxmox, Some(id), Some(storage)) => proxmox_volume(id, storage, n, ext),
            _ => {
                let file = format!("{base}-disk{n}.{ext}");
                let at = match (&req.target_dir, req.to) {
                    (Some(t), Target::Libvirt) => t.join(&file),
                    (_, Target::Vmx) => PathBuf::from(&file),
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
        if let Ok((_, Some(note))) = resolver.resolve_noted(source) {
            findings.push(Finding::new(
                Severity::Info,
                "disk-path-mapped",
                format!("disks[{i}].source"),
                note,
            ));
        }
        // Every disk of the source was opened before the sandbox (the
        // mapping changes no drive's kind or source).
        let opened_disk = slot.take().ok_or_else(|| {
            Error::Request(format!(
                "internal error: disks[{i}] was not opened before the sandbox"
            ))
        })?;
        let (input, img) = match opened_disk {
            Ok(x) => x,
            Err(e) => {
                findings.push(open_failure(i, &d, missing_severity, &e));
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

    // Serial logs land in the output folder under names of their own.
    if req.to != Target::Vmx {
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
    if uefi && req.to != Target::Vmx {
        findings.push(Finding::new(
            Severity::Info,
            "nvram-not-carried",
            "firmware.efi-vars",
            "the source's UEFI variables (boot entries) are not carried over: the new VM starts from OVMF's defaults and boots the default path (\\EFI\\BOOT\\BOOTX64.EFI) until the OS registers its loader again",
        ));
        vm.firmware.efi_vars = None;
    }
    let mut ovmf_files = None;
    if uefi && matches!(req.to, Target::Proxmox | Target::QemuArgs) {
        let secure = vm.firmware.secure_boot;
        let Some((_, (code, template), vars)) =
            templates.into_iter().find(|(s, _, _)| *s == secure)
        else {
            return Err(Error::Request("the VM is UEFI and needs OVMF's variable store template; install Debian's ovmf package".into()));
        };
        let (rel, reference, fmt) = match (req.vmid, &req.storage) {
            (Some(id), Some(storage)) if req.to == Target::Proxmox => {
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
        jobs.push(Job {
            img: vars?,
            input: template.display().to_string(),
            target: target.clone(),
            format: fmt,
        });
        ovmf_files = Some((code, target));
        vm.firmware.efi_vars = Some(reference);
    }

    // The descriptor.
    let (file, text) = match req.to {
        Target::Libvirt => {
            findings.extend(vmshift_desc::mapping::libvirt_network_findings(&src, &vm));
            for (i, n) in vm.nics.iter().enumerate() {
                if let (Some(tag), Some(b)) = (n.vlan, &n.bridge) {
                    findings.push(Finding::new(
                        Severity::Info,
                        "libvirt-vlan",
                        format!("nics[{i}].vlan"),
                        format!("VLAN {tag} on bridge '{b}': libvirt tags VLANs on an Open vSwitch bridge only, so the interface names one (<virtualport type='openvswitch'/>); for a Linux bridge, map the network to a bridge that carries VLAN {tag} untagged instead"),
                    ));
                }
            }
            (format!("{base}.xml"), DomainDocument::raise(&vm).render())
        }
        Target::Vmx => {
            let (doc, f) = VmxDocument::raise(&vm);
            findings.extend(f);
            (format!("{base}.vmx"), doc.render())
        }
        Target::Proxmox => {
            let id = req.vmid.unwrap_or(100);
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
        Target::QemuArgs => {
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
    // forced) — nothing has been written yet.
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if errors > 0 {
        let missing = findings
            .iter()
            .any(|f| f.severity == Severity::Error && f.code.starts_with("disk-"));
        return Err(Error::Refused {
            message: format!(
                "{}: {errors} error(s) above; nothing was written{}",
                loaded.path.display(),
                if missing {
                    " (--descriptor-only writes the descriptor without the disks)"
                } else {
                    ""
                }
            ),
            findings,
        });
    }
    if req.descriptor_only {
        jobs.clear();
    }
    let targets: Vec<&Path> = jobs
        .iter()
        .map(|j| j.target.as_path())
        .chain([descriptor.as_path()])
        .collect();
    if !req.force {
        if let Some(t) = targets.iter().find(|t| t.exists()) {
            return Err(Error::Request(format!(
                "{}: already exists; --force replaces it (nothing was written)",
                t.display()
            )));
        }
    }

    // Write: the disks, then the descriptor that names them. A failure
    // removes what this run wrote.
    let mut written: Vec<PathBuf> = Vec::new();
    // Folders made inside the output folder (a Proxmox storage's
    // images/<vmid>), deepest first, removed again if the run fails.
    let mut folders: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<()> {
        for (k, job) in jobs.iter().enumerate() {
            if let Some(parent) = job.target.parent() {
                let new: Vec<PathBuf> = parent
                    .ancestors()
                    .take_while(|a| a.starts_with(&out) && *a != out && !a.exists())
                    .map(Path::to_path_buf)
                    .collect();
                std::fs::create_dir_all(parent)
                    .map_err(Error::io(parent, "creating the folder"))?;
                folders.splice(0..0, new);
                // A symlink inside the output folder must not lead outside it.
                let real = parent
                    .canonicalize()
                    .map_err(Error::io(parent, "reading the folder"))?;
                if !real.starts_with(&out) {
                    return Err(Error::Request(format!(
                        "{}: leads outside {} (a symlink?)",
                        parent.display(),
                        out.display()
                    )));
                }
            }
            observer.disk_started(k, jobs.len(), &job.input, &job.target, job.img.size());
            copy_disk(
                job.img.as_ref(),
                &job.target,
                job.format,
                req.force,
                observer,
                cancel,
            )?;
            observer.disk_finished();
            written.push(job.target.clone());
        }
        let (o, mut fh) = AtomicOutput::create(&descriptor, req.force)?;
        if req.to == Target::QemuArgs {
            use std::os::unix::fs::PermissionsExt;
            fh.set_permissions(std::fs::Permissions::from_mode(0o755))
                .map_err(Error::io(&descriptor, "making the script executable"))?;
        }
        std::io::Write::write_all(&mut fh, text.as_bytes())
            .and_then(|()| fh.sync_all())
            .map_err(Error::io(&descriptor, "writing"))?;
        o.commit()?;
        Ok(())
    })();
    if let Err(e) = result {
        for w in &written {
            let _ = std::fs::remove_file(w);
        }
        // Only empty folders go (remove_dir refuses any other).
        for f in &folders {
            let _ = std::fs::remove_dir(f);
        }
        return Err(e);
    }
    Ok(ConvertReport {
        descriptor,
        disks: written,
        changes,
        findings,
        vm,
    })
}

/// Converts one image to `target` atomically.
fn copy_disk(
    src: &dyn ImageReader,
    target: &Path,
    format: DiskFormat,
    force: bool,
    observer: &dyn Observer,
    cancel: Option<&'static AtomicBool>,
) -> Result<()> {
    use vmshift_image::create::{create_writer, CreateSpec};
    use vmshift_image::output::SideOutputs;
    let spec = CreateSpec {
        format,
        size: src.size(),
        options: Vec::new(),
        compress: false,
        name: target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    spec.validate()?;
    let (out, file) = AtomicOutput::create(target, force)?;
    let mut sides = SideOutputs::new(target, force);
    // Messages name the target (the temporary file is ours).
    let mut writer = create_writer(file, target, &spec, &mut sides)?;
    let opts = ConvertOptions {
        cancel,
        ..ConvertOptions::default()
    };
    convert(src, writer.as_mut(), &opts, &|done, total| {
        observer.progress(done, total)
    })?;
    writer.finish()?;
    sides.commit()?;
    out.commit()?;
    Ok(())
}
