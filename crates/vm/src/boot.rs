//! Booting a VM to prove it comes up: its disks resolved as a conversion
//! resolves them, the guest's own kernel found on them (or one given), the
//! engine chosen (vmshift-kvm, or QEMU for controllers vmshift-kvm does
//! not emulate and hosts without hardware KVM), and the verdict read from
//! the console.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmshift_image::ImageReader;
use vmshift_kvm::qemu::{boot_qemu, Accel, Machine, QemuOptions};
use vmshift_kvm::{Blob, BootConfig, BootReport, DiskBus, DiskSpec, FailureCause, KvmStatus};
use vmshift_model::{Bus, DeviceKind, Vm};

use crate::error::{Error, Result};
use crate::load::Loaded;
use crate::resolve::Resolver;

/// The engine that runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// vmshift's own launcher on `/dev/kvm`.
    Kvm,
    /// QEMU, with the VM's own disk controllers.
    Qemu,
}

/// The VM to boot: its disks and what the model says of it.
#[derive(Debug)]
pub struct BootTarget {
    /// Guest RAM the VM has, in MiB.
    pub memory_mib: u64,
    /// The VM's QEMU machine type, when it names one.
    pub machine: Option<String>,
    /// The disks, in the VM's order.
    pub disks: Vec<DiskSpec>,
    /// Drives left out (empty, CD-ROMs), to tell the user.
    pub notes: Vec<String>,
}

/// The bus for a disk of the model, or why neither engine has one.
fn bus_of(vm: &Vm, disk: &vmshift_model::Disk) -> std::result::Result<DiskBus, String> {
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
            // The names the descriptor readers keep: VMware's, libvirt's,
            // Proxmox's and QEMU's own.
            match model.as_str() {
                "virtio-scsi" | "virtio-scsi-pci" | "virtio-scsi-single" => Ok(DiskBus::VirtioScsi),
                "lsilogic" | "lsi" | "lsi53c895a" | "lsi53c810" => Ok(DiskBus::LsiLogic),
                "lsisas1068" | "mptsas1068" => Ok(DiskBus::LsiSas),
                "pvscsi" | "vmpvscsi" => Ok(DiskBus::PvScsi),
                "megasas" | "lsisas1078" => Ok(DiskBus::MegaSas),
                // A SCSI controller without a model: libvirt's (and QEMU's)
                // default on x86 is the LSI 53C895A.
                "" => Ok(DiskBus::LsiLogic),
                other => Err(format!(
                    "SCSI controller {} is a {other}, which neither vmshift-kvm nor QEMU emulates",
                    disk.controller
                )),
            }
        }
        other => Err(format!("disks on the {other} bus are not booted")),
    }
}

/// The disks of a descriptor, opened through the same resolution as a
/// conversion, with their buses; CD-ROMs and empty drives are left out
/// and named in the notes.
pub fn descriptor_target(
    loaded: &Loaded,
    resolver: &Resolver,
    allow: crate::state::Allow,
) -> Result<BootTarget> {
    let vm = &loaded.lowered.vm;
    let mut disks = Vec::new();
    let mut notes = Vec::new();
    // A suspended or running VMware VM: its disks are not what the guest
    // would boot from.
    for f in crate::state::state_findings(loaded, resolver, allow) {
        if f.severity == vmshift_model::Severity::Error {
            return Err(Error::Request(format!(
                "{}: {}",
                loaded.path.display(),
                f.message
            )));
        }
        notes.push(f.message);
    }
    for (i, d) in vm.disks.iter().enumerate() {
        let Some(src) = &d.source else {
            notes.push(format!("drive {i} is empty: left out"));
            continue;
        };
        if d.device != DeviceKind::Disk {
            notes.push(format!("{src}: not a hard disk: left out"));
            continue;
        }
        let bus = bus_of(vm, d).map_err(|e| {
            Error::Request(format!(
                "{src}: {e}; `vmshift vm convert` moves disks to virtio-scsi: convert the VM first and boot the converted descriptor"
            ))
        })?;
        let vmware_lsi = vm.controllers.iter().any(|c| {
            c.bus == Bus::Scsi && c.index == d.controller && c.model.as_deref() == Some("lsilogic")
        });
        if bus == DiskBus::LsiLogic
            && vmware_lsi
            && !notes.iter().any(|n: &String| n.contains("mptspi"))
        {
            notes.push(
                "VMware's LSI Logic controller (an LSI 53C1030, Linux's mptspi) has no QEMU model; QEMU's LSI 53C895A (Linux's sym53c8xx) stands in for it, so a guest whose initramfs has only mptspi will not find its disks here".into(),
            );
        }
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
        return Err(Error::Request(format!(
            "{}: the VM has no disk to boot",
            loaded.path.display()
        )));
    }
    Ok(BootTarget {
        memory_mib: vm.memory_mib,
        machine: vm.machine.clone(),
        disks,
        notes,
    })
}

/// Bare disk images, each on its own virtio-blk device, with `memory_mib`
/// of RAM.
pub fn images_target(images: Vec<Box<dyn ImageReader>>, memory_mib: u64) -> BootTarget {
    BootTarget {
        memory_mib,
        machine: None,
        disks: images
            .into_iter()
            .enumerate()
            .map(|(i, image)| DiskSpec {
                image: Arc::from(image),
                bus: DiskBus::VirtioBlk,
                controller: 0,
                unit: 0,
                serial: format!("vmshift{i}"),
            })
            .collect(),
        notes: Vec::new(),
    }
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootRequest {
    /// The engine asked for (`None`: vmshift-kvm where the host's
    /// `/dev/kvm` boots stock kernels).
    pub engine: Option<Engine>,
    /// The QEMU system emulator (implies the QEMU engine; default
    /// `qemu-system-x86_64` on `PATH`).
    pub qemu: Option<PathBuf>,
    /// Boot the built-in probe guest (vmshift-kvm only).
    pub probe: bool,
    /// The kernel instead of the guest's own.
    pub kernel: Option<PathBuf>,
    /// The initramfs, with `kernel`.
    pub initrd: Option<PathBuf>,
    /// The command line instead of the guest's own.
    pub append: Option<String>,
    /// Guest RAM in MiB instead of the VM's.
    pub memory_mib: Option<u64>,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// How long to wait for the verdict.
    pub timeout: Duration,
    /// The success pattern instead of the default.
    pub expect: Option<String>,
    /// Where the console is logged.
    pub console_log: Option<PathBuf>,
    /// Echo the console to standard output.
    pub console_echo: bool,
    /// Bytes of guest writes kept, over all the VM's disks.
    pub overlay_limit: u64,
    /// Where the guest's writes are kept: a temporary file in this folder,
    /// or memory.
    pub overlay_dir: Option<PathBuf>,
    /// The sandbox vmshift-kvm enters once the VM is built.
    pub confine: Option<fn() -> std::result::Result<(), String>>,
    /// The sandbox of the thread that reads the guest's boot files (its
    /// file systems, grub.cfg, kernel and initramfs) from the open disks,
    /// before either engine runs.
    pub confine_reader: Option<fn() -> std::result::Result<(), String>>,
    /// The sandbox of the threads that serve the disks to QEMU over NBD
    /// (the QEMU engine).
    pub confine_server: Option<fn() -> std::result::Result<(), String>>,
    /// Set to stop the boot (it then fails with an interrupted error).
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
}

/// A boot ready to run.
#[derive(Debug)]
pub struct PreparedBoot {
    /// The engine that will run it.
    pub engine: Engine,
    /// QEMU's settings, with the QEMU engine.
    pub qemu: Option<QemuOptions>,
    /// Where the kernel comes from, for the report.
    pub kernel_source: String,
    /// The disks' controllers, for the advice on failure.
    pub buses: Vec<DiskBus>,
    /// What the boot changed from the VM, for the report.
    pub notes: Vec<String>,
    /// The launch itself.
    pub config: BootConfig,
}

/// This host's RAM in MiB (`MemTotal` in `/proc/meminfo`), if it says.
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The guest RAM to boot with: `--memory` if given (refused past the
/// host's RAM), else the VM's own, at most half the host's RAM — a VM
/// sized for its ESXi host must not take this one down. Returns the
/// size and, when it differs from the VM's, a note saying why.
pub fn guest_memory(
    asked: Option<u64>,
    vm_mib: u64,
    host_mib: Option<u64>,
) -> Result<(u64, Option<String>)> {
    match (asked, host_mib) {
        (Some(m), Some(h)) if m > h => Err(Error::Request(format!(
            "--memory {m} MiB is more than this host's RAM ({h} MiB)"
        ))),
        (Some(m), _) => Ok((m, None)),
        (None, Some(h)) if vm_mib > h / 2 => Ok((
            h / 2,
            Some(format!(
                "the VM has {vm_mib} MiB of RAM; it boots with {} MiB, half of this host's (--memory sets it)",
                h / 2
            )),
        )),
        (None, _) => Ok((vm_mib, None)),
    }
}

impl PreparedBoot {
    /// How the report names the engine.
    pub fn engine_name(&self) -> String {
        match (&self.engine, &self.qemu) {
            (Engine::Qemu, Some(q)) => format!("qemu ({})", q.accel.name()),
            _ => "vmshift-kvm".into(),
        }
    }
}

/// The engine asked for, checked against the input: vmshift-kvm must
/// emulate every disk's controller.
fn asked_engine(req: &BootRequest, disks: &[DiskSpec]) -> Result<Option<Engine>> {
    let asked = match (req.engine, &req.qemu) {
        (Some(Engine::Kvm), Some(_)) => {
            return Err(Error::Request(
                "--qemu names the emulator for --engine qemu, not --engine kvm".into(),
            ))
        }
        (None, Some(_)) => Some(Engine::Qemu),
        (e, _) => e.or(req.probe.then_some(Engine::Kvm)),
    };
    if asked == Some(Engine::Qemu) && req.probe {
        return Err(Error::Request(
            "the probe guest runs on vmshift-kvm only: --probe takes --engine kvm".into(),
        ));
    }
    if asked != Some(Engine::Qemu) {
        if let Some(d) = disks.iter().find(|d| !d.bus.emulated()) {
            return Err(Error::Request(format!(
                "disk {} is on {}, which vmshift-kvm does not emulate (it boots virtio-blk and virtio-scsi disks, as `vmshift vm convert` writes them): \
                 --engine qemu boots the VM with its own controllers, or convert it first",
                d.serial,
                d.bus.describe()
            )));
        }
    }
    Ok(asked)
}

/// The engine to run: the one asked for, or vmshift-kvm where this host's
/// `/dev/kvm` boots stock kernels. The probe guest runs on kvm_pvm too.
fn host_engine(asked: Option<Engine>) -> Result<Engine> {
    match (vmshift_kvm::kvm_status(), asked) {
        (_, Some(Engine::Qemu)) => Ok(Engine::Qemu),
        (KvmStatus::Missing, _) => Err(Error::Request(
            "/dev/kvm is missing: vmshift-kvm needs KVM (load kvm-intel or kvm-amd); \
             --engine qemu boots the VM on QEMU, in software emulation where there is no KVM"
                .into(),
        )),
        (KvmStatus::Pvm, None) => Err(Error::Request(
            "this host's /dev/kvm is kvm_pvm, which boots only kernels built as PVM guests, not a VM's own kernel; \
             --engine qemu boots it on QEMU (in software emulation here: slower, but it runs), \
             or run vm boot on a host with hardware KVM (kvm-intel or kvm-amd); --engine kvm tries anyway"
                .into(),
        )),
        _ => Ok(Engine::Kvm),
    }
}

fn read_blob(path: &std::path::Path) -> Result<Blob> {
    Ok(Blob::read(path)?)
}

/// Everything checked and loaded — the engine, the kernel (the guest's
/// own unless one is given), the command line — before anything runs. The
/// input is checked first (its errors do not depend on the host), then
/// the host.
pub fn prepare(target: BootTarget, req: &BootRequest) -> Result<PreparedBoot> {
    let asked = asked_engine(req, &target.disks)?;
    let buses: Vec<DiskBus> = target.disks.iter().map(|d| d.bus).collect();
    let (kernel, initrd, guest_cmdline, kernel_source) = match &req.kernel {
        _ if req.probe => (
            vmshift_kvm::probe_kernel(),
            None,
            String::new(),
            "the built-in probe guest".to_string(),
        ),
        Some(k) => (
            read_blob(k)?,
            req.initrd.as_deref().map(read_blob).transpose()?,
            String::new(),
            k.display().to_string(),
        ),
        None => {
            let images: Vec<_> = target.disks.iter().map(|d| d.image.clone()).collect();
            let e = match req.confine_reader {
                None => vmshift_guest::find_boot_entry(&images)?,
                Some(confine) => std::thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            confine().map_err(|e| Error::Request(format!("the sandbox: {e}")))?;
                            Ok::<_, Error>(vmshift_guest::find_boot_entry(&images)?)
                        })
                        .join()
                        .map_err(|_| {
                            Error::Request(
                                "the thread reading the guest's boot files panicked".into(),
                            )
                        })?
                })?,
            };
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
    let engine = host_engine(asked)?;
    let (memory_mib, memory_note) =
        guest_memory(req.memory_mib, target.memory_mib, host_memory_mib())?;
    let qemu = (engine == Engine::Qemu).then(|| QemuOptions {
        program: req
            .qemu
            .clone()
            .unwrap_or_else(|| "qemu-system-x86_64".into()),
        accel: Accel::for_host(),
        machine: Machine::from_model(target.machine.as_deref()),
    });
    Ok(PreparedBoot {
        engine,
        qemu,
        kernel_source,
        buses,
        notes: memory_note.into_iter().collect(),
        config: BootConfig {
            memory_mib,
            vcpus: req.vcpus,
            kernel,
            initrd,
            cmdline: req.append.clone().unwrap_or(guest_cmdline),
            disks: target.disks,
            overlay_limit: req.overlay_limit,
            overlay_dir: req.overlay_dir.clone(),
            confine: req.confine,
            confine_server: req.confine_server,
            console_log: req.console_log.clone(),
            console_echo: req.console_echo,
            expect: req.expect.clone(),
            probe: req.probe,
            timeout: req.timeout,
            cancel: req.cancel,
        },
    })
}

/// Runs a prepared boot to its verdict.
pub fn run(prepared: PreparedBoot) -> Result<BootReport> {
    Ok(match prepared.qemu {
        Some(q) => boot_qemu(prepared.config, &q)?,
        None => vmshift_kvm::boot(prepared.config)?,
    })
}

/// What to tell the user to do about a failure.
pub fn advice(cause: FailureCause, buses: &[DiskBus]) -> Option<String> {
    let drivers = if buses.contains(&DiskBus::VirtioScsi) {
        "virtio_pci virtio_scsi sd_mod"
    } else {
        "virtio_pci virtio_blk"
    };
    match cause {
        FailureCause::RootNotFound | FailureCause::EmergencyShell
            if buses.iter().any(|b| matches!(b, DiskBus::VirtioBlk | DiskBus::VirtioScsi)) =>
        {
            Some(format!(
                "the guest's initramfs probably has no driver for its new disk controller ({drivers}). \
                 In the guest on VMware, add the drivers and rebuild the initramfs — Debian/Ubuntu: \
                 list them in /etc/initramfs-tools/modules and run `update-initramfs -u`; \
                 RHEL/Fedora/SUSE: `dracut -f --add-drivers '{drivers}'` — then convert again"
            ))
        }
        FailureCause::RootNotFound | FailureCause::EmergencyShell => {
            let mut drivers: Vec<&str> = buses
                .iter()
                .map(|b| match b {
                    DiskBus::LsiLogic => "sym53c8xx",
                    DiskBus::LsiSas => "mptsas",
                    DiskBus::PvScsi => "vmw_pvscsi",
                    DiskBus::MegaSas => "megaraid_sas",
                    DiskBus::Sata => "ahci",
                    DiskBus::Ide => "ata_piix",
                    DiskBus::Nvme => "nvme",
                    DiskBus::VirtioBlk | DiskBus::VirtioScsi => "virtio_pci",
                })
                .collect();
            drivers.sort_unstable();
            drivers.dedup();
            Some(format!(
                "the guest's initramfs found no root device on the VM's own disk controller: check root= on the command line, and that the initramfs has the controller's driver ({})",
                drivers.join(" ")
            ))
        }
        FailureCause::RootMountFailed => Some(
            "the root device was found but not mounted: check root= on the command line and that the kernel has the root file system's driver".into(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_is_capped_at_half_the_host_unless_asked() {
        assert_eq!(guest_memory(None, 2048, Some(24000)).unwrap(), (2048, None));
        let (m, note) = guest_memory(None, 65536, Some(24000)).unwrap();
        assert_eq!(m, 12000);
        assert!(note.unwrap().contains("65536 MiB"));
        assert_eq!(
            guest_memory(Some(16000), 65536, Some(24000)).unwrap(),
            (16000, None)
        );
        let e = guest_memory(Some(30000), 1024, Some(24000)).unwrap_err();
        assert!(e.to_string().contains("more than this host's RAM"), "{e}");
        assert_eq!(guest_memory(None, 65536, None).unwrap(), (65536, None));
    }
}
