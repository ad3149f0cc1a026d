//! `vmshift vm boot`: boots a VM and reports the verdict. The logic is
//! vmshift-vm's (`boot`); this is its front end.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use vmshift_kvm::qemu::Accel;
use vmshift_kvm::Verdict;
use vmshift_vm::boot::{self as vmboot, BootRequest, Engine};
use vmshift_vm::DescriptorFormat;

use crate::args::{BootOutput, EngineArg, VmBootArgs, VmFormatArg};
use crate::cmd::vm::{load, resolver};

/// The guest came up.
pub const EXIT_BOOTED: i32 = 0;
/// The boot failed.
pub const EXIT_FAILED: i32 = 1;
/// No verdict within the timeout.
pub const EXIT_TIMEOUT: i32 = 3;
/// vmshift could not run the boot at all.
pub const EXIT_ERROR: u8 = 4;

/// vmshift-kvm's sandbox once the VM is built.
fn confine_vmm() -> std::result::Result<(), String> {
    crate::sandbox::confine(&crate::sandbox::Policy::vmm()).map_err(|e| format!("{e:#}"))
}

/// The sandbox of the thread that reads the guest's boot files from the
/// open disks: it opens, writes and runs nothing.
fn confine_reader() -> std::result::Result<(), String> {
    crate::sandbox::confine_thread(&crate::sandbox::Policy::read()).map_err(|e| format!("{e:#}"))
}

/// The sandbox of the threads that serve the disks to QEMU (the QEMU
/// engine): they accept on their socket and read and write the open disks
/// and overlay, nothing else.
fn confine_server() -> std::result::Result<(), String> {
    crate::sandbox::confine_thread(&crate::sandbox::Policy::serve()).map_err(|e| format!("{e:#}"))
}

/// True when `path` names a VM descriptor rather than a disk image.
fn is_descriptor(path: &Path, from: Option<VmFormatArg>) -> bool {
    from.is_some() || DescriptorFormat::from_extension(path).is_some()
}

/// Runs `vm boot`.
pub fn run(args: &VmBootArgs) -> Result<i32> {
    let overlay_limit = vmshift_model::parse_size(&args.overlay_limit)
        .map_err(|e| anyhow!("--overlay-limit {}: {e}", args.overlay_limit))?;
    let images = |paths: &[std::path::PathBuf]| -> Result<Vec<_>> {
        paths
            .iter()
            .map(|p| crate::cmd::open(p, args.format, &args.gate, true, crate::cmd::Use::Copy))
            .collect()
    };
    if !args.skip_device.is_empty()
        && (args.probe || !args.vm.iter().any(|v| is_descriptor(v, args.from)))
    {
        bail!("--skip-device names a device of a VM: give its descriptor, not disk images");
    }
    let target = match args.vm.as_slice() {
        _ if args.probe => vmboot::images_target(images(&args.vm)?, 256),
        [one] if is_descriptor(one, args.from) => {
            let mut l = load(one, args.from)?;
            l.apply_devices(&vmshift_vm::devices::DeviceChoices {
                skip: args.skip_device.clone(),
                map: Vec::new(),
            })?;
            let r = resolver(&mut l, &args.roots, args.gate.force_share)?;
            vmboot::descriptor_target(&l, &r, crate::cmd::vm::allow(&args.state))?
        }
        [_] => vmboot::images_target(images(&args.vm)?, 1024),
        _ => bail!("vm boot takes one VM or disk (several disks only with --probe)"),
    };
    if args.output == BootOutput::Human {
        for n in &target.notes {
            eprintln!("vmshift: {n}");
        }
    }
    let notes = target.notes.clone();
    let request = BootRequest {
        engine: args.engine.map(|e| match e {
            EngineArg::Kvm => Engine::Kvm,
            EngineArg::Qemu => Engine::Qemu,
        }),
        qemu: args.qemu.clone(),
        probe: args.probe,
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        append: args.append.clone(),
        memory_mib: args.memory,
        vcpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
        expect: args.expect.clone(),
        console_log: args.console_log.clone(),
        console_echo: args.console,
        overlay_limit,
        overlay_dir: args.overlay_dir.clone(),
        confine: Some(confine_vmm),
        confine_reader: Some(confine_reader),
        confine_server: Some(confine_server),
        cancel: Some(&crate::signals::INTERRUPTED),
    };
    let prepared = vmboot::prepare(target, &request)?;
    if args.output == BootOutput::Human {
        for n in &prepared.notes {
            eprintln!("vmshift: {n}");
        }
    }
    let notes: Vec<String> = notes.into_iter().chain(prepared.notes.clone()).collect();
    let kernel_source = prepared.kernel_source.clone();
    let engine_name = prepared.engine_name();
    let buses = prepared.buses.clone();
    let memory = prepared.config.memory_mib;
    if args.output == BootOutput::Human {
        eprintln!("vmshift: kernel {kernel_source}");
        if let Some(q) = &prepared.qemu {
            eprintln!(
                "vmshift: QEMU ({}, {}), disks served from vmshift's drivers over NBD",
                q.machine.name(),
                match q.accel {
                    Accel::Kvm => "KVM",
                    Accel::Tcg => "TCG: software emulation, as this host has no hardware KVM",
                }
            );
        }
    }
    crate::signals::install();
    let report = vmboot::run(prepared)?;
    let secs = report.elapsed.as_secs_f64();
    let (word, code, cause, line) = match &report.verdict {
        Verdict::Booted { line } => ("booted", EXIT_BOOTED, None, Some(line.as_str())),
        Verdict::Failed { cause, line } => {
            ("failed", EXIT_FAILED, Some(*cause), Some(line.as_str()))
        }
        Verdict::Timeout => ("timeout", EXIT_TIMEOUT, None, None),
    };
    let fix = cause.and_then(|c| vmboot::advice(c, &buses));
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
                "kernel-entry": report.entry,
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
