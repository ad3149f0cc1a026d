//! `vmshift vm`: whole VMs. Reads a descriptor into the model, checks it
//! and the disks it names, and converts it — descriptor and disks — for
//! libvirt, Proxmox VE, VMware or a plain QEMU command line. The pipeline
//! is vmshift-vm's; this is its front end.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use vmshift_desc::read_descriptor;
use vmshift_model::{Finding, Severity};
use vmshift_vm::convert::{ConvertRequest, Observer, Target};
use vmshift_vm::{disk_findings, DescriptorFormat, DiskRoots, Loaded, Resolver};

use crate::args::{
    DiskRootArgs, ModelOutput, StateArgs, VmConvertArgs, VmDiffArgs, VmFormatArg, VmInspectArgs,
    VmTargetArg, VmValidateArgs,
};
use crate::progress::Progress;

impl From<VmFormatArg> for DescriptorFormat {
    fn from(f: VmFormatArg) -> DescriptorFormat {
        match f {
            VmFormatArg::Vmx => DescriptorFormat::Vmx,
            VmFormatArg::Libvirt => DescriptorFormat::Libvirt,
            VmFormatArg::Proxmox => DescriptorFormat::Proxmox,
            VmFormatArg::Ovf => DescriptorFormat::Ovf,
            VmFormatArg::Ova => DescriptorFormat::Ova,
        }
    }
}

/// Reads a descriptor (its format `from`, or by extension), on a thread
/// confined to reading it and the snapshot list beside a `.vmx`.
pub(crate) fn load(path: &Path, from: Option<VmFormatArg>) -> Result<Loaded> {
    let mut files = vec![path.to_path_buf()];
    // The snapshot list beside a .vmx, when it is a plain file (a link
    // would give the thread whatever it leads to; the loader refuses one
    // that leads out of the VM's folder).
    let vmsd = path.with_extension("vmsd");
    let is_vmx =
        DescriptorFormat::of(path, from.map(Into::into)).ok() == Some(DescriptorFormat::Vmx);
    if is_vmx && std::fs::symlink_metadata(&vmsd).is_ok_and(|m| m.is_file()) {
        files.push(vmsd);
    }
    let policy = crate::sandbox::Policy::load(files);
    crate::sandbox::confined(&policy, || vmshift_vm::load(path, from.map(Into::into)))
}

/// What the state flags let through.
pub(crate) fn allow(args: &StateArgs) -> vmshift_vm::state::Allow {
    vmshift_vm::state::Allow {
        suspended: args.allow_suspended,
        locked: args.allow_locked,
    }
}

/// The roots the disk options name.
pub(crate) fn roots(args: &DiskRootArgs, force_share: bool) -> Result<DiskRoots> {
    Ok(DiskRoots {
        disk_roots: args.disk_roots.clone(),
        datastores: DiskRoots::pairs(&args.datastores, "--datastore")?,
        storages: DiskRoots::pairs(&args.storages, "--storage-map")?,
        force_share,
    })
}

/// A resolver for `l`'s disks (an OVA's archive handle moves into it).
pub(crate) fn resolver(l: &mut Loaded, args: &DiskRootArgs, force_share: bool) -> Result<Resolver> {
    Ok(Resolver::new(
        &l.path,
        l.archive.take(),
        &roots(args, force_share)?,
    ))
}

fn print_findings(findings: &[Finding]) {
    for f in findings {
        eprintln!("{f}");
    }
}

pub fn inspect(args: &VmInspectArgs) -> Result<i32> {
    let mut l = load(&args.vm, args.from)?;
    let mut findings = l.lowered.findings.clone();
    findings.extend(l.lowered.vm.validate());
    if !args.guest {
        // The descriptor read: what is left is printing.
        crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    }
    let guest = if args.guest {
        let resolver = resolver(&mut l, &args.roots, args.force_share)?;
        findings.extend(disk_findings(&l.lowered.vm, &resolver));
        // The disks open, the process confines itself before it reads what
        // the guest wrote.
        let disks = vmshift_vm::guest_disks(&l.lowered.vm, &resolver);
        crate::sandbox::confine(&crate::sandbox::Policy::read())?;
        let g = disks.and_then(vmshift_vm::read_guest_of);
        if let Some(g) = &g {
            findings.extend(vmshift_vm::guest_findings(&l.lowered.vm, g));
        }
        g
    } else {
        None
    };
    match args.output {
        ModelOutput::Json => {
            let mut v = serde_json::json!({"vm": l.lowered.vm, "findings": findings});
            if let Some(g) = &guest {
                v["guest"] = serde_json::json!({"operatingsystems": g.guests, "boot": g.boot});
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ModelOutput::Toml => {
            print!("{}", toml::to_string(&l.lowered.vm)?);
            if let Some(g) = &guest {
                // The guest as TOML comments: what was read, one line each.
                for os in &g.guests {
                    println!(
                        "# guest {}: {} ({} {}.{}), hostname {}",
                        os.root,
                        os.product_name.as_deref().unwrap_or("unknown"),
                        os.distro.as_deref().unwrap_or("unknown"),
                        os.major_version.unwrap_or(0),
                        os.minor_version.unwrap_or(0),
                        os.hostname.as_deref().unwrap_or("unknown")
                    );
                }
                println!(
                    "# guest boot: BIOS {}; UEFI {}",
                    g.boot.bios.as_deref().unwrap_or("no"),
                    if g.boot.uefi.is_empty() {
                        "no".to_string()
                    } else {
                        g.boot.uefi.join(", ")
                    }
                );
            }
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
        if DescriptorFormat::of(&args.vm, args.from.map(Into::into))? != DescriptorFormat::Libvirt {
            bail!(
                "--libvirt-schema checks libvirt domain XML; {} is not one",
                args.vm.display()
            );
        }
        // On a thread that may read only the descriptor and the schema.
        let mut policy = crate::sandbox::Policy::load(vec![args.vm.clone()]);
        policy.read_dirs.push(dir.clone());
        let checked = crate::sandbox::confined(&policy, || -> Result<Vec<Finding>> {
            let bytes = read_descriptor(&args.vm).map_err(|e| anyhow!(e.in_file(&args.vm)))?;
            let doc = vmshift_desc::xml::Document::parse(&bytes)
                .map_err(|e| anyhow!(e.in_file(&args.vm)))?;
            vmshift_desc::schema::validate_domain(&doc, dir).map_err(|e| anyhow!(e))
        })?;
        findings.extend(checked);
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
    let mut l = l;
    l.apply_devices(&args.devices.choices())?;
    let resolver = resolver(&mut l, &args.roots, args.force_share)?;
    findings.extend(l.lowered.findings.clone());
    findings.extend(l.lowered.vm.validate());
    findings.extend(disk_findings(&l.lowered.vm, &resolver));
    // What VMware left beside the VM (lock folders, suspend files) is read
    // by path: before the sandbox.
    findings.extend(vmshift_vm::state::state_findings(
        &l,
        &resolver,
        allow(&args.state),
    ));
    // The disks open, the process confines itself before it reads what
    // the guest wrote.
    let disks = vmshift_vm::guest_disks(&l.lowered.vm, &resolver);
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    if let Some(g) = disks.and_then(vmshift_vm::read_guest_of) {
        findings.extend(vmshift_vm::guest_findings(&l.lowered.vm, &g));
    }
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
    // Both read: what is left is comparing and printing.
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
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

/// The progress bar and the "k/n: input → target" lines.
struct Bars {
    progress: bool,
    bar: std::sync::Mutex<Option<Progress>>,
}

impl Observer for Bars {
    fn disk_started(&self, index: usize, count: usize, input: &str, target: &Path, size: u64) {
        eprintln!(
            "vmshift: {}/{}: {} → {}",
            index + 1,
            count,
            input,
            target.display()
        );
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Progress::new(size, self.progress));
    }
    fn progress(&self, done: u64, total: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.update(done, total);
        }
    }
    fn disk_finished(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish();
        }
    }
}

/// vm convert's sandbox once its inputs are open: it writes only in the
/// output folder (files, and the folders a Proxmox storage layout needs),
/// and a failed run removes the empty folders it made above it.
fn confine_convert(out: &Path, made_above: Option<&Path>) -> std::result::Result<(), String> {
    let mut policy = crate::sandbox::Policy::write(vec![out.to_path_buf()], Vec::new());
    policy.make_dirs.push(out.to_path_buf());
    policy.remove_dirs.extend(made_above.map(Path::to_path_buf));
    crate::sandbox::confine(&policy).map_err(|e| format!("{e:#}"))
}

pub fn convert_vm(args: &VmConvertArgs) -> Result<i32> {
    let mut l = load(&args.vm, args.from)?;
    l.apply_devices(&args.devices.choices())?;
    let resolver = resolver(&mut l, &args.roots, args.force_share)?;
    let req = ConvertRequest {
        to: match args.to {
            VmTargetArg::Libvirt => Target::Libvirt,
            VmTargetArg::Proxmox => Target::Proxmox,
            VmTargetArg::Vmx => Target::Vmx,
            VmTargetArg::QemuArgs => Target::QemuArgs,
        },
        out: args.out.clone(),
        disk_format: args.disk_format.map(Into::into),
        target_dir: args.target_dir.clone(),
        vmid: args.vmid,
        storage: args.storage.clone(),
        keep_models: args.keep_models,
        force_virtio: args.virtio,
        descriptor_only: args.descriptor_only,
        force: args.force,
        allow: allow(&args.state),
        networks: args.network_map.clone(),
        bridge: args.bridge.clone(),
        confine: Some(confine_convert),
    };
    crate::signals::install();
    let bars = Bars {
        progress: args.progress,
        bar: std::sync::Mutex::new(None),
    };
    let report = match vmshift_vm::convert::convert_vm(
        &l,
        &resolver,
        &req,
        &bars,
        Some(&crate::signals::INTERRUPTED),
    ) {
        Ok(r) => r,
        Err(vmshift_vm::Error::Refused { message, findings }) => {
            print_findings(&findings);
            bail!(message)
        }
        Err(e) => return Err(e.into()),
    };
    println!("wrote {}", report.descriptor.display());
    for c in &report.changes {
        println!("changed {c}");
    }
    for f in &report.findings {
        println!("{f}");
    }
    Ok(0)
}
