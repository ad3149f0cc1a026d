//! The QEMU engine of `vm boot`: the same boot — kernel, initramfs,
//! command line, verdict — on `qemu-system-x86_64`, with the VM's own
//! disk controllers (SATA, IDE, LSI, pvscsi, NVMe as well as virtio).
//!
//! QEMU never opens the images. Each disk is served to it by vmshift's NBD
//! server from an [`OverlayDisk`] over the image vmshift's gate opened, so
//! QEMU reads exactly what vmshift reads (backing chains and VMDK extents
//! resolved by vmshift, not by QEMU) and the guest's writes land in the
//! same bounded in-memory overlay as with vmshift-kvm (QEMU's own
//! `snapshot=on` would write an unbounded temporary file instead).
//!
//! QEMU runs with KVM when this host's `/dev/kvm` boots stock kernels, and
//! with TCG (software emulation, `-cpu max`) otherwise; under TCG the
//! kernel gets `tsc_early_khz=` and `lpj=` from the host's clock, which
//! keeps it from hanging in TSC calibration. The console is QEMU's serial
//! port on its standard output, read by the same [`Watcher`] as
//! vmshift-kvm's; QEMU's QMP socket tells a guest reset from a power-off.
//!
//! [`Watcher`]: crate::verdict::Watcher

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmshift_image::nbd::NbdServer;

use crate::devices::{Stop, StopSignal};
use crate::disk::{OverlayDisk, SharedOverlay};
use crate::error::{Error, Result};
use crate::vmm::{console_sink, verdict_of, with_console, BootConfig, BootReport, DiskBus};

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation (`-accel tcg -cpu max`).
    Tcg,
}

impl Accel {
    /// KVM where this host's `/dev/kvm` boots stock kernels, TCG
    /// otherwise (no `/dev/kvm`, or `kvm_pvm`).
    pub fn for_host() -> Accel {
        let usable = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
        };
        match crate::kvm_status() {
            crate::KvmStatus::Hardware if usable() => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }

    /// `kvm` or `tcg`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// q35 (ICH9, PCIe; its AHCI controller is SATA controller 0).
    Q35,
    /// i440fx (`pc`; PIIX IDE on channels 0 and 1).
    Pc,
}

impl Machine {
    /// The machine for a VM whose model names `machine` (`q35`,
    /// `pc-q35-9.0`, `pc`, `pc-i440fx-8.2`, Proxmox's `pc+pve0` …). A VM
    /// that names none gets `pc`, the i440FX/PIIX chipset: what VMware
    /// emulates (i440BX/PIIX4, IDE on PIIX), and what Proxmox and libvirt
    /// default to; `vm convert` names q35 in what it writes.
    pub fn from_model(machine: Option<&str>) -> Machine {
        match machine {
            Some(m) if m.contains("q35") => Machine::Q35,
            _ => Machine::Pc,
        }
    }

    /// `q35` or `pc`.
    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The emulator (`qemu-system-x86_64`, looked up on `PATH` when it has
    /// no slash).
    pub program: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// The machine type.
    pub machine: Machine,
}

/// A value inside a QEMU option list: commas doubled.
fn opt(v: &str) -> String {
    v.replace(',', ",,")
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo`.
fn host_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse::<f64>()
        .ok()?;
    (mhz >= 1.0).then_some((mhz * 1000.0) as u64)
}

/// The kernel command line QEMU passes: the console on ttyS0 and, under
/// TCG, the TSC frequency and loops-per-jiffy (for HZ=250, Debian's; a
/// kernel with another HZ only waits longer in udelay) unless given.
fn guest_cmdline(cmdline: &str, accel: Accel, khz: Option<u64>) -> String {
    let mut c = with_console(cmdline);
    if let (Accel::Tcg, Some(khz)) = (accel, khz) {
        let has = |c: &str, k: &str| c.split_whitespace().any(|w| w.starts_with(k));
        if !has(&c, "tsc_early_khz=") {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if !has(&c, "lpj=") {
            c.push_str(&format!(" lpj={}", khz * 4));
        }
    }
    c
}

/// A disk as QEMU gets it: the NBD socket vmshift serves it on, and where
/// it sits.
#[derive(Debug, Clone)]
struct QemuDisk {
    socket: PathBuf,
    bus: DiskBus,
    controller: u32,
    unit: u32,
    serial: String,
}

/// The SCSI controller device for a bus, when it is SCSI.
fn scsi_controller(bus: DiskBus) -> Option<&'static str> {
    match bus {
        DiskBus::VirtioScsi => Some("virtio-scsi-pci"),
        DiskBus::LsiLogic => Some("lsi53c895a"),
        DiskBus::LsiSas => Some("mptsas1068"),
        DiskBus::PvScsi => Some("pvscsi"),
        DiskBus::MegaSas => Some("megasas"),
        _ => None,
    }
}

/// The arguments for the disks: controllers first, then one `-blockdev`
/// (NBD) and one `-device` per disk, in the VM's order.
fn disk_args(disks: &[QemuDisk], machine: Machine) -> Result<Vec<String>> {
    let mut a = Vec::new();
    let mut arg = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    // One controller per (model, index), as the VM has them.
    let mut scsi: Vec<(&str, u32)> = Vec::new();
    let mut ahci: Vec<u32> = Vec::new();
    for d in disks {
        if let Some(model) = scsi_controller(d.bus) {
            if let Some((other, _)) = scsi.iter().find(|(m, c)| *c == d.controller && *m != model) {
                return Err(Error::Config(format!(
                    "disk {}: SCSI controller {} is both {other} and {model}",
                    d.serial, d.controller
                )));
            }
            if !scsi.contains(&(model, d.controller)) {
                scsi.push((model, d.controller));
            }
        }
        // q35's own AHCI is SATA controller 0; others are added.
        let own = machine == Machine::Q35 && d.controller == 0;
        if d.bus == DiskBus::Sata && !own && !ahci.contains(&d.controller) {
            ahci.push(d.controller);
        }
    }
    for (model, c) in &scsi {
        arg("-device", format!("{model},id=scsi{c}"));
    }
    for c in &ahci {
        arg("-device", format!("ahci,id=sata{c}"));
    }
    for (i, d) in disks.iter().enumerate() {
        let node = format!("disk{i}");
        let blockdev = serde_json::json!({
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "unix", "path": d.socket.to_string_lossy()},
        });
        arg("-blockdev", blockdev.to_string());
        // Errors reach the guest (a full overlay is an I/O error to it, as
        // with vmshift-kvm) instead of pausing the VM.
        let report = if d.bus == DiskBus::Nvme {
            ""
        } else {
            ",werror=report,rerror=report"
        };
        let serial = format!("id=dev{i},serial={}{report}", opt(&d.serial));
        let c = d.controller;
        let u = d.unit;
        let dev = match d.bus {
            DiskBus::VirtioBlk => format!("virtio-blk-pci,drive={node},{serial}"),
            // libvirt's addressing: virtio-scsi disks are LUNs of target
            // 0; the others' units are targets.
            DiskBus::VirtioScsi => {
                format!("scsi-hd,bus=scsi{c}.0,channel=0,scsi-id=0,lun={u},drive={node},{serial}")
            }
            DiskBus::LsiLogic | DiskBus::LsiSas | DiskBus::PvScsi | DiskBus::MegaSas => {
                format!("scsi-hd,bus=scsi{c}.0,channel=0,scsi-id={u},lun=0,drive={node},{serial}")
            }
            DiskBus::Sata => {
                if u > 5 {
                    return Err(Error::Config(format!(
                        "disk {}: SATA port {u}: an AHCI controller has ports 0 to 5",
                        d.serial
                    )));
                }
                let bus = if machine == Machine::Q35 && c == 0 {
                    "ide".to_string()
                } else {
                    format!("sata{c}")
                };
                format!("ide-hd,bus={bus}.{u},drive={node},{serial}")
            }
            DiskBus::Ide => {
                if c > 1 || u > 1 {
                    return Err(Error::Config(format!(
                        "disk {}: IDE {c}:{u}: IDE has channels 0 and 1, each with units 0 and 1",
                        d.serial
                    )));
                }
                match machine {
                    Machine::Pc => format!("ide-hd,bus=ide.{c},unit={u},drive={node},{serial}"),
                    // q35 has no IDE: the disk takes the AHCI port of the
                    // same position, as libvirt does.
                    Machine::Q35 => {
                        format!("ide-hd,bus=ide.{},drive={node},{serial}", c * 2 + u)
                    }
                }
            }
            DiskBus::Nvme => format!("nvme,drive={node},{serial}"),
        };
        arg("-device", dev);
    }
    Ok(a)
}

/// QEMU's `-sandbox` setting: everything it can deny.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The whole argument list (without the program).
fn qemu_args(
    config: &BootConfig,
    options: &QemuOptions,
    files: &Files,
    disks: &[QemuDisk],
    cmdline: &str,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = Vec::new();
    let mut arg = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    arg("-machine", options.machine.name().into());
    arg("-accel", options.accel.name().into());
    arg(
        "-cpu",
        match options.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
        .into(),
    );
    arg("-smp", config.vcpus.to_string());
    arg("-m", format!("{}M", config.memory_mib));
    a.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // Stopped until the monitor is negotiated (watch_qmp).
            "-S",
            "-serial",
            "stdio",
            // QEMU's own seccomp filter: the guest's devices run in a
            // process that cannot exec, fork, gain privileges or use
            // obsolete calls.
            "-sandbox",
            SANDBOX,
        ]
        .map(String::from),
    );
    let mut arg = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    arg(
        "-qmp",
        format!(
            "unix:{},server=on,wait=on",
            opt(&files.qmp.to_string_lossy())
        ),
    );
    arg("-kernel", files.kernel.to_string_lossy().into_owned());
    if let Some(i) = &files.initrd {
        arg("-initrd", i.to_string_lossy().into_owned());
    }
    arg("-append", cmdline.to_string());
    a.extend(disk_args(disks, options.machine)?);
    Ok(a)
}

/// The files QEMU is given, in a private temporary folder.
struct Files {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    qmp: PathBuf,
}

impl Files {
    fn new(config: &BootConfig) -> Result<Files> {
        let dir = tempfile::Builder::new()
            .prefix("vmshift-boot-")
            .tempdir()
            .map_err(|source| Error::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let write = |name: &str, data: &[u8]| -> Result<PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, data).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            Ok(p)
        };
        let kernel = write("kernel", &config.kernel.data)?;
        let initrd = match &config.initrd {
            Some(i) => Some(write("initrd", &i.data)?),
            None => None,
        };
        let qmp = dir.path().join("qmp.sock");
        Ok(Files {
            dir,
            kernel,
            initrd,
            qmp,
        })
    }
}

/// Reads QEMU's QMP socket until it closes: negotiates, starts the guest
/// (QEMU runs with `-S`, so no event is lost before negotiation), and
/// returns why the guest shut down, if it did. A VM that QEMU pauses (a
/// KVM internal error) stops the boot at once.
fn watch_qmp(stream: UnixStream, stop: &StopSignal) -> Option<Stop> {
    let mut w = stream.try_clone().ok()?;
    let mut lines = BufReader::new(stream).lines();
    // The greeting, then capabilities negotiation, then the guest runs.
    lines.next()?.ok()?;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"cont\"}\n")
        .ok()?;
    let mut shutdown = None;
    for line in lines {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match v["event"].as_str() {
            Some("SHUTDOWN") if v["data"]["guest"] == true => {
                shutdown = Some(match v["data"]["reason"].as_str() {
                    Some("guest-reset") => Stop::Reset,
                    Some("guest-panic") => Stop::Error("the guest panicked".into()),
                    _ => Stop::PowerOff,
                });
            }
            Some("STOP") if shutdown.is_none() => stop.stop(Stop::Error(
                "QEMU paused the VM (an emulation error)".into(),
            )),
            _ => {}
        }
    }
    shutdown
}

/// Connects to QEMU's QMP socket, which it creates and then waits on
/// before it starts the guest.
fn connect_qmp(path: &Path, child: &mut Child, deadline: Instant) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => {
                if let Ok(Some(_)) = child.try_wait() {
                    return Err(Error::Qemu("it exited before starting the guest".into()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(Error::Qemu(format!(
                    "its monitor socket {} did not open: {e}",
                    path.display()
                )))
            }
        }
    }
}

/// The last lines QEMU wrote to its standard error, without its note
/// that it waits for the monitor.
fn stderr_tail(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("QEMU waiting for connection"))
        .collect();
    lines[lines.len().saturating_sub(5)..].join("; ")
}

/// The longest Unix socket path (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Boots `config` on QEMU and waits for the verdict. The probe guest
/// runs on vmshift-kvm only.
pub fn boot_qemu(mut config: BootConfig, options: &QemuOptions) -> Result<BootReport> {
    let start = Instant::now();
    if config.probe {
        return Err(Error::Config(
            "the probe guest runs on vmshift-kvm only (--engine kvm)".into(),
        ));
    }
    if config.vcpus == 0 || config.memory_mib < 64 {
        return Err(Error::Config(format!(
            "{} vCPUs and {} MiB asked for; at least 1 vCPU and 64 MiB are needed",
            config.vcpus, config.memory_mib
        )));
    }
    let files = Files::new(&config)?;
    let longest = files
        .dir
        .path()
        .join(format!("disk{}.sock", config.disks.len()));
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::Config(format!(
            "the temporary folder {} is too long a path for the disks' Unix sockets ({} bytes at most): set TMPDIR to a shorter folder",
            files.dir.path().display(),
            MAX_SOCKET_PATH
        )));
    }
    let cmdline = guest_cmdline(&config.cmdline, options.accel, host_khz());
    // Serve each disk from its overlay.
    let mut servers = Vec::new();
    let mut disks = Vec::new();
    let budget = crate::disk::budget(config.overlay_limit, config.overlay_dir.as_deref())?;
    for (i, d) in std::mem::take(&mut config.disks).into_iter().enumerate() {
        let socket = files.dir.path().join(format!("disk{i}.sock"));
        let overlay = SharedOverlay(Mutex::new(OverlayDisk::sharing(d.image, budget.clone())));
        servers.push(
            NbdServer::start_confined(Arc::new(overlay), &socket, config.confine_server).map_err(
                |e| {
                    Error::Config(format!(
                        "serving disk {} to QEMU: {}",
                        d.serial,
                        crate::error::chain(&e)
                    ))
                },
            )?,
        );
        disks.push(QemuDisk {
            socket,
            bus: d.bus,
            controller: d.controller,
            unit: d.unit,
            serial: d.serial,
        });
    }
    let args = qemu_args(&config, options, &files, &disks, &cmdline)?;
    let stop = Arc::new(StopSignal::default());
    let mut sink = console_sink(&config, &stop)?;
    let mut command = Command::new(&options.program);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl, which is async-signal-safe; it touches no memory of the
    // parent's.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            // QEMU dies with vmshift (killed, or interrupted) instead of
            // running the guest on without its disks.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| {
        Error::Qemu(format!(
            "cannot run {}: {e} (install qemu-system-x86, or give its path with --qemu)",
            options.program.display()
        ))
    })?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        // Bounded: QEMU's warnings are short; a flood is cut.
        let mut bytes = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut bytes);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let deadline = start.checked_add(config.timeout);
    let connect_by = Instant::now() + Duration::from_secs(30);
    let qmp = match connect_qmp(
        &files.qmp,
        &mut child,
        deadline.map_or(connect_by, |d| d.min(connect_by)),
    ) {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let words = stderr_tail(&errors.join().unwrap_or_default());
            return Err(Error::Qemu(if words.is_empty() {
                e.to_string()
            } else {
                format!("{e}: {words}")
            }));
        }
    };
    let monitor = {
        let stop = stop.clone();
        std::thread::spawn(move || watch_qmp(qmp, &stop))
    };
    // The console until QEMU closes it; then why QEMU ended, from its
    // monitor: the console's own verdict, read to the last byte, comes
    // first.
    let console = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = sink.write_all(&buf[..n]);
                    }
                }
            }
            let _ = sink.flush();
            let why = monitor.join().ok().flatten();
            stop.stop(why.unwrap_or_else(|| Stop::Error("the emulator exited".into())));
            sink
        })
    };
    // Wait in slices, so that an interrupt is seen.
    let mut interrupted = false;
    let reason = loop {
        let slice = Duration::from_millis(100);
        let left = deadline.map_or(slice, |d| d.saturating_duration_since(Instant::now()));
        if let Some(r) = stop.wait(left.min(slice)) {
            break Some(r);
        }
        if config.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            interrupted = true;
            break None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break None;
        }
    };
    let elapsed = start.elapsed();
    let _ = child.kill();
    let status = child.wait().ok();
    let sink = console
        .join()
        .map_err(|_| Error::Qemu("the console reader failed".into()))?;
    let errors = errors.join().unwrap_or_default();
    drop(servers);
    if interrupted {
        return Err(Error::Interrupted);
    }
    let tail = String::from_utf8_lossy(&sink.tail).into_owned();
    // QEMU stopping on its own is an error of the VM, with QEMU's words.
    let reason = match reason {
        Some(Stop::Error(e)) => {
            let status = status.map(|s| format!(" ({s})")).unwrap_or_default();
            let words = stderr_tail(&errors);
            let what = if words.is_empty() {
                format!("{e}{status}")
            } else {
                format!("{e}{status}: {words}")
            };
            if tail.is_empty() {
                // The guest never said a word: QEMU's failure, not the
                // guest's.
                return Err(Error::Qemu(what));
            }
            Some(Stop::Error(what))
        }
        r => r,
    };
    Ok(BootReport {
        verdict: verdict_of(reason, &tail),
        elapsed,
        first_exit: None,
        console_tail: tail,
        cmdline,
        entry: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::image;

    #[test]
    fn tcg_gets_the_tsc_frequency_and_every_engine_the_console() {
        assert_eq!(
            guest_cmdline("root=/dev/sda1 ro", Accel::Kvm, Some(2_000_000)),
            "root=/dev/sda1 ro console=ttyS0"
        );
        assert_eq!(
            guest_cmdline("root=/dev/sda1", Accel::Tcg, Some(2_000_000)),
            "root=/dev/sda1 console=ttyS0 tsc_early_khz=2000000 lpj=8000000"
        );
        // What the user gave stays.
        assert_eq!(
            guest_cmdline("console=ttyS0,115200 lpj=5", Accel::Tcg, Some(1000)),
            "console=ttyS0,115200 lpj=5 tsc_early_khz=1000"
        );
        assert_eq!(guest_cmdline("", Accel::Tcg, None), "console=ttyS0");
    }

    #[test]
    fn the_machine_follows_the_model() {
        // VMware's chipset (and Proxmox's and libvirt's default) is i440FX.
        assert_eq!(Machine::from_model(None), Machine::Pc);
        assert_eq!(Machine::from_model(Some("q35")), Machine::Q35);
        assert_eq!(Machine::from_model(Some("pc-q35-9.0")), Machine::Q35);
        assert_eq!(Machine::from_model(Some("pc")), Machine::Pc);
        assert_eq!(Machine::from_model(Some("pc-i440fx-8.2")), Machine::Pc);
        assert_eq!(Machine::from_model(Some("pc+pve0")), Machine::Pc);
    }

    fn disk(bus: DiskBus, controller: u32, unit: u32) -> QemuDisk {
        QemuDisk {
            socket: PathBuf::from("/nonexistent.sock"),
            bus,
            controller,
            unit,
            serial: format!("s{controller}{unit}"),
        }
    }

    #[test]
    fn impossible_addresses_are_refused() {
        for (d, m, want) in [
            (
                vec![disk(DiskBus::Sata, 0, 6)],
                Machine::Q35,
                "ports 0 to 5",
            ),
            (
                vec![disk(DiskBus::Ide, 2, 0)],
                Machine::Pc,
                "channels 0 and 1",
            ),
            (
                vec![disk(DiskBus::PvScsi, 0, 0), disk(DiskBus::LsiLogic, 0, 1)],
                Machine::Q35,
                "both pvscsi and lsi53c895a",
            ),
        ] {
            let e = disk_args(&d, m).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn descriptor_text_cannot_add_qemu_options() {
        let mut d = disk(DiskBus::VirtioBlk, 0, 0);
        d.serial = "x,drive=evil".into();
        let a = disk_args(&[d], Machine::Q35).unwrap();
        assert!(
            a.iter()
                .any(|x| x.contains("serial=x,,drive=evil,werror=report")),
            "{a:?}"
        );
    }

    /// Asks QEMU's monitor `command` and returns its `return` value.
    fn qmp(s: &mut BufReader<UnixStream>, command: serde_json::Value) -> serde_json::Value {
        let mut w = s.get_ref().try_clone().unwrap();
        writeln!(w, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(s.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() {
                return v["return"].clone();
            }
            assert!(v.get("error").is_none(), "{command}: {v}");
        }
    }

    /// Starts QEMU (stopped, `-S`) with `disks`, each served by vmshift's
    /// NBD server, and returns each disk's device type and size as QEMU
    /// sees them.
    fn attached(buses: &[(DiskBus, u32, u32)], machine: Machine) -> Vec<(String, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let mut files = Vec::new();
        let mut disks = Vec::new();
        for (i, (bus, c, u)) in buses.iter().enumerate() {
            let (f, r) = image(&vec![i as u8; (i + 1) << 20]);
            files.push(f);
            let socket = dir.path().join(format!("d{i}.sock"));
            let overlay = SharedOverlay(Mutex::new(OverlayDisk::new(r, 1 << 20)));
            servers.push(NbdServer::start_export(Arc::new(overlay), &socket).unwrap());
            disks.push(QemuDisk {
                socket,
                bus: *bus,
                controller: *c,
                unit: *u,
                serial: format!("vmshift{i}"),
            });
        }
        let qmp_path = dir.path().join("qmp.sock");
        let mut args: Vec<String> = [
            "-machine",
            machine.name(),
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-sandbox",
            SANDBOX,
        ]
        .map(String::from)
        .to_vec();
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=on", qmp_path.display()));
        args.extend(disk_args(&disks, machine).unwrap());
        let mut child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 (qemu-system-x86) must be installed");
        let s = match connect_qmp(
            &qmp_path,
            &mut child,
            Instant::now() + Duration::from_secs(20),
        ) {
            Ok(s) => s,
            Err(e) => {
                let out = child.wait_with_output().unwrap();
                panic!("{e}: {}", String::from_utf8_lossy(&out.stderr))
            }
        };
        let mut s = BufReader::new(s);
        let mut greeting = String::new();
        s.read_line(&mut greeting).unwrap();
        qmp(&mut s, serde_json::json!({"execute": "qmp_capabilities"}));
        let blocks = qmp(&mut s, serde_json::json!({"execute": "query-block"}));
        let mut out = Vec::new();
        for i in 0..disks.len() {
            let ty = qmp(
                &mut s,
                serde_json::json!({"execute": "qom-get",
                    "arguments": {"path": format!("/machine/peripheral/dev{i}"), "property": "type"}}),
            );
            let size = blocks
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["inserted"]["node-name"] == format!("disk{i}"))
                .map(|b| b["inserted"]["image"]["virtual-size"].as_u64().unwrap())
                .unwrap_or(0);
            out.push((ty.as_str().unwrap().to_string(), size));
        }
        let _ = qmp(&mut s, serde_json::json!({"execute": "quit"}));
        let _ = child.wait();
        out
    }

    #[test]
    fn qemu_attaches_every_controller_to_vmshifts_nbd_disks() {
        let got = attached(
            &[
                (DiskBus::VirtioScsi, 0, 0),
                (DiskBus::VirtioScsi, 0, 1),
                (DiskBus::VirtioBlk, 0, 0),
                (DiskBus::LsiLogic, 1, 0),
                (DiskBus::LsiSas, 2, 3),
                (DiskBus::PvScsi, 3, 1),
                (DiskBus::Sata, 0, 2),
                (DiskBus::Sata, 1, 0),
                (DiskBus::Ide, 1, 1),
                (DiskBus::Nvme, 0, 0),
            ],
            Machine::Q35,
        );
        let types: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "scsi-hd",
                "scsi-hd",
                "virtio-blk-pci",
                "scsi-hd",
                "scsi-hd",
                "scsi-hd",
                "ide-hd",
                "ide-hd",
                "ide-hd",
                "nvme"
            ]
        );
        for (i, (_, size)) in got.iter().enumerate() {
            assert_eq!(*size, ((i + 1) << 20) as u64, "disk {i}");
        }
    }

    #[test]
    fn ide_sits_on_piix_channels_on_pc() {
        let got = attached(
            &[
                (DiskBus::Ide, 0, 0),
                (DiskBus::Ide, 1, 1),
                (DiskBus::Sata, 0, 0),
            ],
            Machine::Pc,
        );
        assert_eq!(
            got,
            [
                ("ide-hd".to_string(), 1 << 20),
                ("ide-hd".to_string(), 2 << 20),
                ("ide-hd".to_string(), 3 << 20)
            ]
        );
    }
}
