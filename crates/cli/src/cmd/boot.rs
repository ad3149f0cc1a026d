//! `vmshift vm boot`: boots a VM on vmshift-kvm and reports the verdict.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use vmshift_kvm::qemu::{boot_qemu, Accel, Machine, QemuOptions};
use vmshift_kvm::{Blob, BootConfig, DiskBus, DiskSpec, FailureCause, KvmStatus, Verdict};
use vmshift_model::{Bus, DeviceKind, Vm};

use crate::args::{BootOutput, EngineArg, VmBootArgs, VmFormatArg};
use crate::cmd::vm::{load, Resolver};

/// The guest came up.
pub const EXIT_BOOTED: i32 = 0;
/// The boot failed.
pub const EXIT_FAILED: i32 = 1;
/// No verdict within the timeout.
pub const EXIT_TIMEOUT: i32 = 3;
/// vmshift could not run the boot at all.
pub const EXIT_ERROR: u8 = 4;

/// True when `path` names a VM descriptor rather than a disk image.
fn is_descriptor(path: &Path, from: Option<VmFormatArg>) -> bool {
    from.is_some()
        || path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .is_some_and(|e| matches!(e.as_str(), "vmx" | "xml" | "conf" | "ovf" | "ova"))
}

/// The bus for a disk of the model, or why neither engine has one.
fn bus_of(vm: &Vm, disk: &vmshift_model::Disk) -> Result<DiskBus> {
    match disk.bus {
        Bus::Virtio => Ok(DiskBus::VirtioBlk),
        Bus::Sata => Ok(DiskBus::Sata),
        Bus::Ide => Ok(DiskBus::Ide),
        Bus::Nvme => Ok(DiskBus::Nvme),
        Bus::Scsi => {
            let model = vm
                .controllers
                .iter()
                .find(|c| c.bus == Bus::Scsi && c.index == disk.controller)
                .and_then(|c| c.model.clone())
                .unwrap_or_default();
            match model.as_str() {
                "virtio-scsi" => Ok(DiskBus::VirtioScsi),
                "lsilogic" => Ok(DiskBus::LsiLogic),
                "lsisas1068" => Ok(DiskBus::LsiSas),
                "pvscsi" => Ok(DiskBus::PvScsi),
                "" => bail!("SCSI controller {} names no model", disk.controller),
                other => bail!(
                    "SCSI controller {} is a {other}, which neither vmshift-kvm nor QEMU emulates",
                    disk.controller
                ),
            }
        }
        other => bail!("disks on the {other} bus are not booted"),
    }
}

/// The disks of a descriptor, opened through the same resolution as `vm
/// convert`, with their buses; CD-ROMs and empty drives are left out and
/// listed in the returned notes.
fn vm_disks(args: &VmBootArgs, path: &Path) -> Result<(Vm, Vec<DiskSpec>, Vec<String>)> {
    let l = load(path, args.from)?;
    let vm = l.lowered.vm.clone();
    let resolver = Resolver::new(&l.path, l.archive, &args.roots)?;
    let mut disks = Vec::new();
    let mut notes = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let Some(src) = &d.source else {
            notes.push(format!("drive {i} is empty: left out"));
            continue;
        };
        if d.device != DeviceKind::Disk {
            notes.push(format!("{src}: not a hard disk: left out"));
            continue;
        }
        let bus = bus_of(&vm, d).map_err(|e| {
            anyhow!(
                "{src}: {e}; `vmshift vm convert` moves disks to virtio-scsi: convert the VM first and boot the converted descriptor"
            )
        })?;
        let (_, image) = resolver.open(src)?;
        disks.push(DiskSpec {
            image: Arc::from(image),
            bus,
            controller: d.controller,
            unit: d.unit,
            serial: format!("vmshift{i}"),
        });
    }
    if disks.is_empty() {
        bail!("{}: the VM has no disk to boot", path.display());
    }
    Ok((vm, disks, notes))
}

/// What to tell the user to do about a failure.
fn advice(cause: FailureCause, buses: &[DiskBus]) -> Option<String> {
    let drivers = if buses.contains(&DiskBus::VirtioScsi) {
        "virtio_pci virtio_scsi sd_mod"
    } else {
        "virtio_pci virtio_blk"
    };
    match cause {
        FailureCause::RootNotFound | FailureCause::EmergencyShell => Some(format!(
            "the guest's initramfs probably has no driver for its new disk controller ({drivers}). \
             In the guest on VMware, add the drivers and rebuild the initramfs — Debian/Ubuntu: \
             list them in /etc/initramfs-tools/modules and run `update-initramfs -u`; \
             RHEL/Fedora/SUSE: `dracut -f --add-drivers '{drivers}'` — then convert again"
        )),
        FailureCause::RootMountFailed => Some(
            "the root device was found but not mounted: check root= on the command line and that the kernel has the root file system's driver".into(),
        ),
        _ => None,
    }
}

/// The engine asked for (`None`: the host decides), checked against the
/// input: vmshift-kvm must emulate every disk's controller.
fn asked_engine(args: &VmBootArgs, disks: &[DiskSpec]) -> Result<Option<EngineArg>> {
    let asked = match (args.engine, &args.qemu) {
        (Some(EngineArg::Kvm), Some(_)) => {
            bail!("--qemu names the emulator for --engine qemu, not --engine kvm")
        }
        (None, Some(_)) => Some(EngineArg::Qemu),
        (e, _) => e.or(args.probe.then_some(EngineArg::Kvm)),
    };
    if asked == Some(EngineArg::Qemu) && args.probe {
        bail!("the probe guest runs on vmshift-kvm only: --probe takes --engine kvm");
    }
    if asked != Some(EngineArg::Qemu) {
        if let Some(d) = disks.iter().find(|d| !d.bus.emulated()) {
            bail!(
                "disk {} is on {}, which vmshift-kvm does not emulate (it boots virtio-blk and virtio-scsi disks, as `vmshift vm convert` writes them): \
                 --engine qemu boots the VM with its own controllers, or convert it first",
                d.serial,
                d.bus.describe()
            );
        }
    }
    Ok(asked)
}

/// The engine to run: the one asked for, or vmshift-kvm where this host's
/// `/dev/kvm` boots stock kernels. The probe guest runs on kvm_pvm too.
fn host_engine(asked: Option<EngineArg>) -> Result<EngineArg> {
    match (vmshift_kvm::kvm_status(), asked) {
        (_, Some(EngineArg::Qemu)) => Ok(EngineArg::Qemu),
        (KvmStatus::Missing, _) => bail!(
            "/dev/kvm is missing: vmshift-kvm needs KVM (load kvm-intel or kvm-amd); \
             --engine qemu boots the VM on QEMU, in software emulation where there is no KVM"
        ),
        (KvmStatus::Pvm, None) => bail!(
            "this host's /dev/kvm is kvm_pvm, which boots only kernels built as PVM guests, not a VM's own kernel; \
             --engine qemu boots it on QEMU (in software emulation here: slower, but it runs), \
             or run vm boot on a host with hardware KVM (kvm-intel or kvm-amd); --engine kvm tries anyway"
        ),
        _ => Ok(EngineArg::Kvm),
    }
}

/// Runs `vm boot`.
pub fn run(args: &VmBootArgs) -> Result<i32> {
    let overlay_limit = vmshift_model::parse_size(&args.overlay_limit)
        .map_err(|e| anyhow!("--overlay-limit {}: {e}", args.overlay_limit))?;
    let bare = |(i, p): (usize, &std::path::PathBuf)| -> Result<DiskSpec> {
        Ok(DiskSpec {
            image: Arc::from(crate::cmd::open(p, args.format, &args.gate, true)?),
            bus: DiskBus::VirtioBlk,
            controller: 0,
            unit: 0,
            serial: format!("vmshift{i}"),
        })
    };
    let (memory, machine, disks, notes) = match args.vm.as_slice() {
        _ if args.probe => (
            256,
            None,
            args.vm
                .iter()
                .enumerate()
                .map(bare)
                .collect::<Result<_>>()?,
            Vec::new(),
        ),
        [one] if is_descriptor(one, args.from) => {
            let (vm, disks, notes) = vm_disks(args, one)?;
            (vm.memory_mib, vm.machine, disks, notes)
        }
        [one] => (1024, None, vec![bare((0, one))?], Vec::new()),
        _ => bail!("vm boot takes one VM or disk (several disks only with --probe)"),
    };
    let asked = asked_engine(args, &disks)?;
    let memory = args.memory.unwrap_or(memory);
    let buses: Vec<DiskBus> = disks.iter().map(|d| d.bus).collect();
    if args.output == BootOutput::Human {
        for n in &notes {
            eprintln!("vmshift: {n}");
        }
    }
    // The kernel: the one given, or the guest's own from its disks.
    let (kernel, initrd, guest_cmdline, kernel_source) = match &args.kernel {
        _ if args.probe => (
            vmshift_kvm::probe_kernel(),
            None,
            String::new(),
            "the built-in probe guest".to_string(),
        ),
        Some(k) => (
            Blob::read(k)?,
            args.initrd.as_deref().map(Blob::read).transpose()?,
            String::new(),
            k.display().to_string(),
        ),
        None => {
            let images: Vec<_> = disks.iter().map(|d| d.image.clone()).collect();
            let e = vmshift_guest::find_boot_entry(&images)?;
            let source = format!("{} ({}, \"{}\")", e.kernel_path, e.source, e.title);
            let initrd = e.initrd.map(|(name, data)| Blob { name, data });
            (
                Blob {
                    name: e.kernel_path,
                    data: e.kernel,
                },
                initrd,
                e.cmdline,
                source,
            )
        }
    };
    let cmdline = args.append.clone().unwrap_or(guest_cmdline);
    if args.output == BootOutput::Human {
        eprintln!("vmshift: kernel {kernel_source}");
    }
    // The input is checked first (its errors do not depend on the host),
    // then the host.
    let engine = host_engine(asked)?;
    let config = BootConfig {
        memory_mib: memory,
        vcpus: args.cpus,
        kernel,
        initrd,
        cmdline,
        disks,
        overlay_limit,
        console_log: args.console_log.clone(),
        console_echo: args.console,
        expect: args.expect.clone(),
        probe: args.probe,
        timeout: Duration::from_secs(args.timeout),
    };
    let (report, engine_name) = match engine {
        EngineArg::Kvm => (vmshift_kvm::boot(config)?, "vmshift-kvm".to_string()),
        EngineArg::Qemu => {
            let options = QemuOptions {
                program: args
                    .qemu
                    .clone()
                    .unwrap_or_else(|| "qemu-system-x86_64".into()),
                accel: Accel::for_host(),
                machine: Machine::from_model(machine.as_deref()),
            };
            if args.output == BootOutput::Human {
                eprintln!(
                    "vmshift: QEMU ({}, {}), disks served from vmshift's drivers over NBD",
                    options.machine.name(),
                    match options.accel {
                        Accel::Kvm => "KVM",
                        Accel::Tcg => "TCG: software emulation, as this host has no hardware KVM",
                    }
                );
            }
            let name = format!("qemu ({})", options.accel.name());
            (boot_qemu(config, &options)?, name)
        }
    };
    let secs = report.elapsed.as_secs_f64();
    let (word, code, cause, line) = match &report.verdict {
        Verdict::Booted { line } => ("booted", EXIT_BOOTED, None, Some(line.as_str())),
        Verdict::Failed { cause, line } => {
            ("failed", EXIT_FAILED, Some(*cause), Some(line.as_str()))
        }
        Verdict::Timeout => ("timeout", EXIT_TIMEOUT, None, None),
    };
    let fix = cause.and_then(|c| advice(c, &buses));
    match args.output {
        BootOutput::Json => {
            let v = json!({
                "verdict": word,
                "cause": cause,
                "cause-text": cause.map(|c| c.describe()),
                "line": line,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "first-exit-ms": report.first_exit.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
                "engine": engine_name,
                "kernel": kernel_source,
                "memory-mib": memory,
                "cmdline": report.cmdline,
                "fix": fix,
                "notes": notes,
                "console-tail": report.console_tail.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        BootOutput::Human => {
            match (&report.verdict, cause) {
                (Verdict::Booted { line }, _) => {
                    println!("booted in {secs:.3} s on {engine_name}: {}", line.trim())
                }
                (Verdict::Failed { line, .. }, Some(c)) => {
                    println!(
                        "failed after {secs:.1} s on {engine_name}: {}: {}",
                        c.describe(),
                        line.trim()
                    )
                }
                _ => println!(
                    "timeout: no verdict within {} s on {engine_name}",
                    args.timeout
                ),
            }
            if let Some(f) = &fix {
                println!("likely fix: {f}");
            }
            if args.probe && !args.console {
                for l in report.console_tail.lines() {
                    if l.starts_with("VMSHIFT-PROBE ") {
                        println!("{}", l.trim_end_matches('\r'));
                    }
                }
            }
            if code != EXIT_BOOTED && !args.console {
                println!("--- the end of the guest's console ---");
                let lines: Vec<&str> = report.console_tail.lines().collect();
                for l in &lines[lines.len().saturating_sub(25)..] {
                    println!("{}", l.trim_end_matches('\r'));
                }
            }
        }
    }
    Ok(code)
}
