//! Putting a VM together and running it to a verdict.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msi, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use vmshift_image::ImageReader;

use crate::boot::Blob;
use crate::devices::{ConsoleSink, Devices, IrqTrigger, ResetTrigger, Stop, StopSignal};
use crate::disk::OverlayDisk;
use crate::error::{Error, Result};
use crate::pci::PciBus;
use crate::verdict::{FailureCause, Verdict, Watcher};
use crate::virtio::blk::Block;
use crate::virtio::pci::{VirtioPci, BAR_SIZE};
use crate::virtio::scsi::Scsi;
use crate::virtio::MsiSink;
use crate::{acpi, cpu, layout};

/// The controller a disk sits on. vmshift-kvm emulates the virtio ones;
/// the QEMU engine ([`crate::qemu`]) runs them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// Its own virtio-blk PCI device.
    VirtioBlk,
    /// A LUN of a virtio-scsi controller.
    VirtioScsi,
    /// A target of an LSI Logic 53C895A SCSI controller (VMware's
    /// `lsilogic`).
    LsiLogic,
    /// A target of an LSI SAS1068 controller (VMware's `lsisas1068`).
    LsiSas,
    /// A target of a VMware paravirtual SCSI controller (`pvscsi`).
    PvScsi,
    /// A target of an LSI MegaRAID SAS 1078 controller (`megasas`).
    MegaSas,
    /// A port of an AHCI (SATA) controller.
    Sata,
    /// An IDE channel's master or slave.
    Ide,
    /// Its own NVMe controller.
    Nvme,
}

impl DiskBus {
    /// True when vmshift-kvm emulates this controller.
    pub fn emulated(self) -> bool {
        matches!(self, DiskBus::VirtioBlk | DiskBus::VirtioScsi)
    }

    /// How reports name the controller.
    pub fn describe(self) -> &'static str {
        match self {
            DiskBus::VirtioBlk => "virtio-blk",
            DiskBus::VirtioScsi => "virtio-scsi",
            DiskBus::LsiLogic => "LSI Logic SCSI (lsilogic)",
            DiskBus::LsiSas => "LSI SAS1068 (lsisas1068)",
            DiskBus::PvScsi => "VMware paravirtual SCSI (pvscsi)",
            DiskBus::MegaSas => "LSI MegaRAID SAS (megasas)",
            DiskBus::Sata => "SATA (AHCI)",
            DiskBus::Ide => "IDE",
            DiskBus::Nvme => "NVMe",
        }
    }
}

/// A disk for the guest.
#[derive(Debug)]
pub struct DiskSpec {
    /// The image, read through vmshift's drivers.
    pub image: Arc<dyn ImageReader>,
    /// Where it sits.
    pub bus: DiskBus,
    /// The controller's index among those of its kind (the VM's
    /// `scsi1`, `sata0`, IDE channel …).
    pub controller: u32,
    /// The unit on that controller (SCSI target or LUN, SATA port, IDE
    /// master 0 / slave 1).
    pub unit: u32,
    /// The serial the guest sees.
    pub serial: String,
}

/// What to boot and how.
#[derive(Debug)]
pub struct BootConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs (1..=64).
    pub vcpus: u8,
    /// The kernel: bzImage or ELF vmlinux.
    pub kernel: Blob,
    /// The initramfs.
    pub initrd: Option<Blob>,
    /// The kernel command line (`console=ttyS0` is added when missing).
    pub cmdline: String,
    /// The disks, in the VM's order.
    pub disks: Vec<DiskSpec>,
    /// Bytes of guest writes kept, over all disks, before writes fail.
    pub overlay_limit: u64,
    /// Keep them in an unlinked temporary file in this folder instead of
    /// memory.
    pub overlay_dir: Option<PathBuf>,
    /// Where the console is logged.
    pub console_log: Option<PathBuf>,
    /// Echo the console to standard output.
    pub console_echo: bool,
    /// The success pattern (default: a login prompt or systemd's
    /// multi-user/graphical target).
    pub expect: Option<String>,
    /// The kernel is the probe guest: its own lines decide.
    pub probe: bool,
    /// How long to wait for a verdict.
    pub timeout: Duration,
    /// Set (by a signal handler) to stop the boot: it then ends with
    /// [`Error::Interrupted`].
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
    /// Called once the VM is built, before its vCPUs start: the caller's
    /// sandbox (vmshift-kvm only).
    pub confine: Option<fn() -> std::result::Result<(), String>>,
    /// Called on each disk's NBD server thread before it accepts QEMU
    /// (the QEMU engine): the caller's sandbox for the threads that read
    /// QEMU's requests.
    pub confine_server: Option<fn() -> std::result::Result<(), String>>,
}

/// How the boot went.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// The verdict.
    pub verdict: Verdict,
    /// From [`boot`]'s start to the verdict.
    pub elapsed: Duration,
    /// From [`boot`]'s start to the first exit of the boot vCPU (the guest
    /// ran its first instructions by then).
    pub first_exit: Option<Duration>,
    /// The end of the console output.
    pub console_tail: String,
    /// The command line the kernel got.
    pub cmdline: String,
    /// The boot protocol the kernel was entered by (vmshift-kvm only:
    /// QEMU chooses its own).
    pub entry: Option<&'static str>,
}

/// What `/dev/kvm` on this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmStatus {
    /// Hardware KVM (kvm-intel, kvm-amd): stock kernels boot.
    Hardware,
    /// `kvm_pvm`: only PVM guests and small freestanding guests run.
    Pvm,
    /// No usable `/dev/kvm`.
    Missing,
}

/// Tells what `/dev/kvm` is here.
pub fn kvm_status() -> KvmStatus {
    if !Path::new("/dev/kvm").exists() {
        KvmStatus::Missing
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        KvmStatus::Pvm
    } else {
        KvmStatus::Hardware
    }
}

/// MSIs through `KVM_SIGNAL_MSI`.
struct KvmMsi(Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn send(&self, address: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // A failure means the guest programmed an address KVM rejects; the
        // guest then misses the interrupt, as on hardware.
        let _ = self.0.signal_msi(msi);
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// `_IOC(dir, 0xAE, nr, size)`: a KVM ioctl number (dir 0 none, 1 write,
/// 2 read).
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

/// The ioctls the VMM makes once the VM runs (a sandbox allows these and
/// no other): `KVM_RUN`, `KVM_SIGNAL_MSI`, and `KVM_GET_REGS` for a triple
/// fault's report.
pub const RUNTIME_IOCTLS: [u64; 3] = [
    kvm_ioc(0, 0x80, 0),
    kvm_ioc(1, 0xa5, std::mem::size_of::<kvm_msi>()),
    kvm_ioc(2, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),
];

/// Boots the VM and waits for the verdict.
pub fn boot(mut config: BootConfig) -> Result<BootReport> {
    let start = Instant::now();
    if config.vcpus == 0 || config.vcpus > 64 {
        return Err(Error::Config(format!(
            "{} vCPUs asked for; vmshift-kvm runs 1 to 64",
            config.vcpus
        )));
    }
    let mem_size = config
        .memory_mib
        .checked_mul(1 << 20)
        .filter(|m| *m >= 64 << 20)
        .ok_or_else(|| {
            Error::Config(format!(
                "{} MiB of guest memory asked for; at least 64 MiB are needed",
                config.memory_mib
            ))
        })?;
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("creating the VM"))?);
    vm.set_tss_address(layout::KVM_TSS as usize)
        .map_err(Error::kvm("setting the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP)
        .map_err(Error::kvm("setting the identity map address"))?;
    vm.create_irq_chip()
        .map_err(Error::kvm("creating the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(Error::kvm("creating the PIT"))?;

    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| Error::Memory(format!("mapping {} MiB: {e:?}", config.memory_mib)))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which
        // outlives the VM (both are dropped when this function returns,
        // after every vCPU thread has been joined).
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("registering guest memory"))?;
    }

    let kernel = crate::boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => Some(crate::boot::load_initrd(&mem, p, &kernel)?),
        None => None,
    };
    let tables = acpi::build(layout::ACPI_START, config.vcpus);
    mem.write_slice(&tables.bytes, GuestAddress(tables.base))
        .map_err(|e| Error::Memory(format!("writing the ACPI tables: {e}")))?;
    let cmdline = with_console(&config.cmdline);
    crate::boot::write_boot_data(
        &mem,
        &kernel,
        &cmdline,
        &crate::boot::BootParams {
            mem_size,
            cmdline_len: cmdline.len(),
            initrd,
            rsdp: layout::ACPI_START,
        },
    )?;

    let stop = Arc::new(StopSignal::default());
    let disks = std::mem::take(&mut config.disks);
    let devices = Arc::new(Mutex::new(build_devices(&config, disks, &vm, &mem, &stop)?));

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("reading the supported CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(Error::kvm(format!("creating vCPU {id}")))?;
        vcpu.set_cpuid2(&cpu::cpuid(&supported, id, config.vcpus))
            .map_err(Error::kvm("setting CPUID"))?;
        cpu::setup_msrs(&vcpu)?;
        cpu::setup_lapic(&vcpu)?;
        if id == 0 {
            cpu::setup_boot_cpu(&vcpu, kernel.entry)?;
        }
        vcpus.push(vcpu);
    }

    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| Error::Config(format!("installing the vCPU kick signal: {e}")))?;
    // Everything is open and set up: the caller's sandbox closes in before
    // the guest runs (the vCPU threads inherit it).
    if let Some(confine) = config.confine {
        confine().map_err(|e| Error::Config(format!("confining the VMM: {e}")))?;
    }
    let first_exit = Arc::new(Mutex::new(None));
    let threads: Vec<JoinHandle<()>> = vcpus
        .into_iter()
        .enumerate()
        .map(|(id, vcpu)| {
            let devices = devices.clone();
            let stop = stop.clone();
            let first = (id == 0).then(|| first_exit.clone());
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A device that panics must stop the VM, not leave it
                    // waiting for the timeout.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_vcpu(vcpu, &devices, &stop, first, start)
                    }));
                    if r.is_err() {
                        stop.stop(Stop::Error(format!("vCPU {id} stopped: the VMM panicked")));
                    }
                })
                .map_err(|e| Error::Config(format!("starting a vCPU thread: {e}")))
        })
        .collect::<Result<_>>()?;

    // Wait in slices, so that an interrupt is seen.
    let mut interrupted = false;
    let reason = loop {
        let left = config.timeout.saturating_sub(start.elapsed());
        if let Some(r) = stop.wait(left.min(Duration::from_millis(100))) {
            break Some(r);
        }
        if config
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            interrupted = true;
            break None;
        }
        if start.elapsed() >= config.timeout {
            break None;
        }
    };
    let elapsed = start.elapsed();
    // Stop the vCPUs: set the reason (if the timeout came first) and kick
    // each thread out of KVM_RUN until it has gone.
    stop.stop(Stop::Error("timeout".into()));
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
    }
    if interrupted {
        return Err(Error::Interrupted);
    }
    let mut devs = devices.lock().unwrap_or_else(|e| e.into_inner());
    let _ = std::io::Write::flush(devs.serial.writer_mut());
    let tail = String::from_utf8_lossy(&devs.serial.writer().tail).into_owned();
    let verdict = verdict_of(reason, &tail);
    let first_exit = *first_exit.lock().unwrap_or_else(|e| e.into_inner());
    Ok(BootReport {
        verdict,
        elapsed,
        first_exit,
        console_tail: tail,
        cmdline,
        entry: Some(kernel.entry.protocol()),
    })
}

/// The verdict for the first reason the VM stopped (`None`: the timeout
/// came first).
pub(crate) fn verdict_of(reason: Option<Stop>, tail: &str) -> Verdict {
    match reason {
        None => Verdict::Timeout,
        Some(Stop::Verdict(v)) => v,
        Some(Stop::Reset) => Verdict::Failed {
            cause: FailureCause::Reset,
            line: last_line(tail),
        },
        Some(Stop::PowerOff) => Verdict::Failed {
            cause: FailureCause::PowerOff,
            line: last_line(tail),
        },
        Some(Stop::Error(e)) => Verdict::Failed {
            cause: FailureCause::VmError,
            line: e,
        },
    }
}

fn last_line(tail: &str) -> String {
    tail.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim_end_matches('\r')
        .to_string()
}

/// The command line with `console=ttyS0` added when no console on ttyS0
/// is named.
pub(crate) fn with_console(cmdline: &str) -> String {
    if cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console=ttyS0"))
    {
        cmdline.trim().to_string()
    } else {
        format!("{} console=ttyS0", cmdline.trim())
            .trim()
            .to_string()
    }
}

/// The console's destinations for `config`: its log, the terminal, and the
/// verdict watcher (which tells `stop`).
pub(crate) fn console_sink(config: &BootConfig, stop: &Arc<StopSignal>) -> Result<ConsoleSink> {
    let log = match &config.console_log {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(
            |source| Error::Io {
                path: p.clone(),
                source,
            },
        )?)),
        None => None,
    };
    let watcher = if config.probe {
        Watcher::probe()
    } else {
        Watcher::new(config.expect.as_deref())
            .map_err(|e| Error::Config(format!("--expect: {e}")))?
    };
    Ok(ConsoleSink {
        log,
        echo: config.console_echo,
        watcher,
        tail: Vec::new(),
        stop: stop.clone(),
    })
}

fn build_devices(
    config: &BootConfig,
    disks: Vec<DiskSpec>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    stop: &Arc<StopSignal>,
) -> Result<Devices> {
    let sink = console_sink(config, stop)?;
    let irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| Error::Config(format!("creating the serial eventfd: {e}")))?;
    vm.register_irqfd(&irq, 4)
        .map_err(Error::kvm("connecting COM1 to IRQ 4"))?;
    let msi: Arc<dyn MsiSink> = Arc::new(KvmMsi(vm.clone()));
    // One virtio-blk function per virtio-blk disk; one virtio-scsi
    // controller for every virtio-scsi disk, in the slot of its first disk,
    // so the bus keeps the VM's disk order.
    enum Slot {
        Blk(OverlayDisk, String),
        Scsi,
    }
    let mut slots = Vec::new();
    let mut luns = Vec::new();
    let budget = crate::disk::budget(config.overlay_limit, config.overlay_dir.as_deref())?;
    for d in disks {
        let disk = OverlayDisk::sharing(d.image, budget.clone());
        match d.bus {
            DiskBus::VirtioBlk => slots.push(Slot::Blk(disk, d.serial)),
            DiskBus::VirtioScsi => {
                if luns.is_empty() {
                    slots.push(Slot::Scsi);
                }
                luns.push((disk, d.serial));
            }
            other => {
                return Err(Error::Config(format!(
                    "disk {}: vmshift-kvm does not emulate the {} controller (it boots virtio-blk and virtio-scsi disks); --engine qemu runs it",
                    d.serial,
                    other.describe()
                )))
            }
        }
    }
    let mut pci = PciBus::new();
    let mut luns = Some(luns);
    for slot in slots {
        let device: Box<dyn crate::virtio::VirtioDevice> = match slot {
            Slot::Blk(disk, serial) => Box::new(Block::new(disk, &serial)),
            Slot::Scsi => Box::new(Scsi::new(luns.take().unwrap_or_default())),
        };
        let bar = pci
            .allocate_bar(u64::from(BAR_SIZE))
            .ok_or_else(|| Error::Config("too many disks for the PCI window".into()))?;
        pci.add(Box::new(VirtioPci::new(
            device,
            mem.clone(),
            msi.clone(),
            bar,
        )))
        .ok_or_else(|| Error::Config("more than 31 disk controllers".into()))?;
    }
    Ok(Devices {
        serial: Serial::new(IrqTrigger(irq), sink),
        i8042: I8042Device::new(ResetTrigger(stop.clone())),
        pci,
        stop: stop.clone(),
    })
}

fn run_vcpu(
    mut vcpu: VcpuFd,
    devices: &Mutex<Devices>,
    stop: &StopSignal,
    first: Option<Arc<Mutex<Option<Duration>>>>,
    start: Instant,
) {
    let lock = || devices.lock().unwrap_or_else(|e| e.into_inner());
    let mut first = first;
    while !stop.stopped() {
        let exit = vcpu.run();
        if let Some(f) = first.take() {
            *f.lock().unwrap_or_else(|e| e.into_inner()) = Some(start.elapsed());
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => lock().pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => lock().pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => lock().mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => lock().mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => stop.stop(Stop::Reset),
            Ok(VcpuExit::SystemEvent(kind, _)) => stop.stop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Stop::PowerOff,
                _ => Stop::Reset,
            }),
            Ok(VcpuExit::Hlt) => std::thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                stop.stop(Stop::Error(format!(
                    "KVM internal error (emulation failure) at guest address {rip:#x}"
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => stop.stop(Stop::Error(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(other) => stop.stop(Stop::Error(format!("unexpected KVM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => stop.stop(Stop::Error(format!("KVM_RUN failed: {e}"))),
        }
    }
}
