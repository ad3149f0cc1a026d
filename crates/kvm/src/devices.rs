//! The platform devices on port I/O and MMIO: COM1, the i8042 (reset), the
//! ACPI sleep and reset registers, and the PCI bus.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::pci::PciBus;
use crate::verdict::{Verdict, Watcher};

/// COM1's ports.
const COM1: u16 = 0x3f8;
/// The i8042's data and command ports.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// Why the VM stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The console gave a verdict.
    Verdict(Verdict),
    /// The guest reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The guest powered off.
    PowerOff,
    /// A vCPU stopped with an error.
    Error(String),
}

/// The first reason to stop, and a way to wait for it.
#[derive(Debug, Default)]
pub struct StopSignal {
    reason: Mutex<Option<Stop>>,
    cv: Condvar,
}

impl StopSignal {
    /// Records `why` unless a reason is already known.
    pub fn stop(&self, why: Stop) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(why);
            self.cv.notify_all();
        }
    }

    /// True once a reason is known.
    pub fn stopped(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits at most `timeout` for a reason.
    pub fn wait(&self, timeout: std::time::Duration) -> Option<Stop> {
        let r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let (r, _) = self
            .cv
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        r.clone()
    }
}

/// Raises the serial port's interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's reset line.
#[derive(Debug)]
pub struct ResetTrigger(pub Arc<StopSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.stop(Stop::Reset);
        Ok(())
    }
}

/// Where the guest's console goes: a log file, the terminal, and the
/// verdict watcher.
pub struct ConsoleSink {
    /// The console log.
    pub log: Option<std::io::BufWriter<std::fs::File>>,
    /// Echo to standard output.
    pub echo: bool,
    /// The watcher.
    pub watcher: Watcher,
    /// The last bytes written, for the report.
    pub tail: Vec<u8>,
    /// Told when the watcher decides.
    pub stop: Arc<StopSignal>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("echo", &self.echo)
            .finish()
    }
}

/// How much console output the report keeps.
const TAIL: usize = 16 << 10;

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The verdict first: a log or terminal that fails must not hide it.
        if let Some(v) = self.watcher.feed(buf) {
            self.stop.stop(Stop::Verdict(v.clone()));
        }
        if let Some(log) = &mut self.log {
            let ok = log.write_all(buf).is_ok() && (!buf.contains(&b'\n') || log.flush().is_ok());
            if !ok {
                // Stop logging (a full disk, say); the console tail and
                // the verdict go on.
                self.log = None;
            }
        }
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(buf).and_then(|()| out.flush());
        }
        self.tail.extend_from_slice(buf);
        if self.tail.len() > 2 * TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = &mut self.log {
            log.flush()?;
        }
        Ok(())
    }
}

/// Every device the vCPUs reach through exits.
pub struct Devices {
    /// COM1.
    pub serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
    /// The keyboard controller (only its reset line matters).
    pub i8042: I8042Device<ResetTrigger>,
    /// PCI bus 0.
    pub pci: PciBus,
    /// Where stops are reported.
    pub stop: Arc<StopSignal>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").field("pci", &self.pci).finish()
    }
}

impl Devices {
    /// A port read; ports nobody decodes read as all ones.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - COM1) as u8);
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                data[0] = self.i8042.read((port - I8042_DATA) as u8);
            }
            0xcf8..=0xcff => self.pci.pio_read(port, data),
            p if p == acpi::SLEEP_PORT || p == acpi::SLEEP_PORT + 1 || p == acpi::RESET_PORT => {
                data.fill(0)
            }
            _ => data.fill(0xff),
        }
    }

    /// A port write; writes nobody decodes are dropped.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                // An error here is the irqfd write failing; the byte still
                // reached the console.
                let _ = self.serial.write((p - COM1) as u8, data[0]);
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                let _ = self.i8042.write((port - I8042_DATA) as u8, data[0]);
            }
            0xcf8..=0xcff => self.pci.pio_write(port, data),
            p if p == acpi::SLEEP_PORT && data.first().is_some_and(|v| v & SLP_EN != 0) => {
                self.stop.stop(Stop::PowerOff);
            }
            p if p == acpi::RESET_PORT && data.first() == Some(&acpi::RESET_VALUE) => {
                self.stop.stop(Stop::Reset);
            }
            _ => {}
        }
    }

    /// An MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    /// An MMIO write; unclaimed addresses drop it.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.pci.mmio_write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (Devices, Arc<StopSignal>, EventFd) {
        let stop = Arc::new(StopSignal::default());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink {
            log: None,
            echo: false,
            watcher: Watcher::new(Some("READY")).unwrap(),
            tail: Vec::new(),
            stop: stop.clone(),
        };
        let d = Devices {
            serial: Serial::new(IrqTrigger(evt.try_clone().unwrap()), sink),
            i8042: I8042Device::new(ResetTrigger(stop.clone())),
            pci: PciBus::new(),
            stop: stop.clone(),
        };
        (d, stop, evt)
    }

    #[test]
    fn serial_output_reaches_the_watcher_and_stops_the_vm() {
        let (mut d, stop, _evt) = devices();
        for b in b"booting\nREADY\n" {
            d.pio_write(COM1, &[*b]);
        }
        assert!(matches!(
            stop.wait(std::time::Duration::ZERO),
            Some(Stop::Verdict(Verdict::Booted { .. }))
        ));
        assert!(String::from_utf8_lossy(&d.serial.writer().tail).contains("booting"));
    }

    #[test]
    fn serial_transmit_interrupt_fires_when_enabled() {
        let (mut d, _stop, evt) = devices();
        // IER: transmitter holding register empty interrupt.
        d.pio_write(COM1 + 1, &[0x02]);
        d.pio_write(COM1, b"x");
        assert!(evt.read().unwrap() >= 1);
    }

    #[test]
    fn i8042_reset_command_stops_the_vm() {
        let (mut d, stop, _evt) = devices();
        assert!(!stop.stopped());
        d.pio_write(I8042_COMMAND, &[0xfe]);
        assert_eq!(stop.wait(std::time::Duration::ZERO), Some(Stop::Reset));
    }

    #[test]
    fn acpi_sleep_register_powers_off() {
        let (mut d, stop, _evt) = devices();
        d.pio_write(acpi::SLEEP_PORT, &[(5 << 2) | SLP_EN]);
        assert_eq!(stop.wait(std::time::Duration::ZERO), Some(Stop::PowerOff));
    }

    #[test]
    fn unclaimed_ports_and_mmio_read_all_ones() {
        let (mut d, _stop, _evt) = devices();
        let mut b = [0u8; 2];
        d.pio_read(0x2f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut m = [0u8; 4];
        d.mmio_read(0xd000_0000, &mut m);
        assert_eq!(m, [0xff; 4]);
    }
}
