//! A PCI bus 0 reached through configuration mechanism #1 (ports 0xCF8
//! and 0xCFC–0xCFF), with a host bridge at 00:00.0 and one function per
//! device. BARs are placed by the VMM (there is no firmware) inside the
//! window the DSDT describes; the guest may size and move them.

use crate::layout;

/// The configuration address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The first configuration data port.
pub const CONFIG_DATA: u16 = 0xcfc;

/// Standard header offsets used here.
pub const VENDOR_ID: usize = 0x00;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAPABILITIES: usize = 0x34;
/// Status bit: the function has a capability list.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// 256 bytes of configuration space, with a write mask per byte and the
/// BAR sizes that make sizing work.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
    /// Size of each BAR (0: none); BARs are 32-bit memory BARs.
    bar_size: [u32; 6],
    next_cap: usize,
}

impl ConfigSpace {
    /// A type-0 header with the given ids and class (base class, subclass,
    /// programming interface in bits 23..0).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, subsystem: (u16, u16)) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; 256],
            writable: [0; 256],
            bar_size: [0; 6],
            next_cap: 0x40,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09..0x0c].copy_from_slice(&class.to_le_bytes()[..3]);
        c.set_u16(0x2c, subsystem.0);
        c.set_u16(0x2e, subsystem.1);
        // Command: I/O space, memory space, bus master, INTx disable.
        c.writable[COMMAND] = 0x07;
        c.writable[COMMAND + 1] = 0x04;
        // Interrupt line is scratch space for the OS.
        c.writable[0x3c] = 0xff;
        c
    }

    /// Adds a 32-bit, non-prefetchable memory BAR of `size` bytes (a power
    /// of two, at least 16) at `addr`.
    pub fn add_bar(&mut self, index: usize, addr: u32, size: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size));
        self.bar_size[index] = size;
        self.set_u32(BAR0 + 4 * index, addr);
        let mask = !(size - 1);
        self.writable[BAR0 + 4 * index..BAR0 + 4 * index + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Appends a capability (its id, then `body`, which starts at the byte
    /// after the next pointer) and returns its offset. `writable` masks
    /// the body's bytes the guest may write.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(
            at + len <= 256,
            "PCI capabilities overflow the configuration space"
        );
        self.bytes[at] = id;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        for (i, m) in writable.iter().enumerate() {
            self.writable[at + 2 + i] = *m;
        }
        // Link it: the list head, or the previous capability's next byte.
        let mut p = CAPABILITIES;
        while self.bytes[p] != 0 {
            p = self.bytes[p] as usize + 1;
        }
        self.bytes[p] = at as u8;
        self.set_u16(STATUS, self.u16(STATUS) | STATUS_CAP_LIST);
        self.next_cap = at + len;
        at
    }

    /// The current address of a BAR (0 when it has none).
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let size = self.bar_size[index];
        (size != 0).then(|| {
            (
                u64::from(self.u32(BAR0 + 4 * index) & !(size - 1)),
                u64::from(size),
            )
        })
    }

    /// True when the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.bytes[COMMAND] & 0x2 != 0
    }

    /// Reads the dword at `reg` (a multiple of 4).
    pub fn read_dword(&self, reg: usize) -> u32 {
        self.u32(reg & 0xfc)
    }

    /// Writes `data` at `offset` through the write mask.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            if at < 256 {
                let m = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !m) | (b & m);
            }
        }
    }

    /// A byte of configuration space.
    pub fn byte(&self, at: usize) -> u8 {
        self.bytes[at]
    }

    /// A little-endian u16.
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// A little-endian u32.
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// A function on the bus.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// Its configuration space, to write.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// A configuration write landed at `offset` (after the mask was
    /// applied); devices with live registers in config space react here.
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// A read of `data.len()` bytes at `offset` into BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// An Intel-vendor host bridge (class 06/00).
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(0x8086, 0x29c0, 0x06_00_00, 0, (0x1af4, 0x1100)),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// Bus 0: slot n holds device n.
pub struct PciBus {
    devices: Vec<Box<dyn PciDevice>>,
    address: u32,
    next_bar: u64,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("devices", &self.devices.len())
            .field("address", &self.address)
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus holding the host bridge.
    pub fn new() -> Self {
        PciBus {
            devices: vec![Box::new(HostBridge::new())],
            address: 0,
            next_bar: layout::PCI_MMIO_START,
        }
    }

    /// Allocates `size` bytes of BAR space (naturally aligned).
    pub fn allocate_bar(&mut self, size: u64) -> Option<u32> {
        let at = self.next_bar.next_multiple_of(size);
        let end = at.checked_add(size)?;
        (end <= layout::PCI_MMIO_END).then(|| {
            self.next_bar = end;
            at as u32
        })
    }

    /// Adds a device in the next slot and returns the slot (at most 31).
    pub fn add(&mut self, dev: Box<dyn PciDevice>) -> Option<u8> {
        (self.devices.len() < 32).then(|| {
            self.devices.push(dev);
            (self.devices.len() - 1) as u8
        })
    }

    /// The device in `slot`.
    pub fn device_mut(&mut self, slot: usize) -> Option<&mut (dyn PciDevice + 'static)> {
        self.devices.get_mut(slot).map(|d| &mut **d)
    }

    /// The function an address register value selects, with the register.
    fn selected(&self) -> Option<(usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as usize;
        let function = (a >> 8) & 0x7;
        (enabled && bus == 0 && function == 0 && slot < self.devices.len())
            .then_some((slot, (a & 0xfc) as usize))
    }

    /// A port read in 0xCF8..=0xCFF.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        if !(CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            data.fill(0xff);
            return;
        }
        let shift = usize::from(port - CONFIG_DATA);
        let value = match self.selected() {
            Some((slot, reg)) => self.devices[slot].config().read_dword(reg),
            None => 0xffff_ffff,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(shift + i).copied().unwrap_or(0xff);
        }
    }

    /// A port write in 0xCF8..=0xCFF.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS {
            if data.len() == 4 {
                self.address = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            }
            return;
        }
        if !(CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            return;
        }
        let shift = usize::from(port - CONFIG_DATA);
        if let Some((slot, reg)) = self.selected() {
            let len = data.len().min(4 - shift);
            let dev = &mut self.devices[slot];
            dev.config_mut().write(reg + shift, &data[..len]);
            dev.config_written(reg + shift, len);
        }
    }

    /// The device and BAR an MMIO address falls in.
    fn bar_at(&self, addr: u64) -> Option<(usize, usize, u64)> {
        self.devices.iter().enumerate().find_map(|(slot, d)| {
            let c = d.config();
            if !c.memory_enabled() {
                return None;
            }
            (0..6).find_map(|bar| {
                let (base, size) = c.bar(bar)?;
                (base != 0 && addr >= base && addr - base < size).then(|| (slot, bar, addr - base))
            })
        })
    }

    /// An MMIO read; false when no BAR claims the address.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.bar_at(addr) {
            Some((slot, bar, off)) => {
                self.devices[slot].bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// An MMIO write; false when no BAR claims the address.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.bar_at(addr) {
            Some((slot, bar, off)) => {
                self.devices[slot].bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(bus: &mut PciBus, slot: u32, reg: u32) -> u32 {
        bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | (slot << 11) | reg).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        bus.pio_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write(bus: &mut PciBus, slot: u32, reg: u32, v: u32) {
        bus.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | (slot << 11) | reg).to_le_bytes(),
        );
        bus.pio_write(CONFIG_DATA, &v.to_le_bytes());
    }

    struct Dummy(ConfigSpace, Vec<(usize, u64)>);
    impl PciDevice for Dummy {
        fn config(&self) -> &ConfigSpace {
            &self.0
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
        fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
            self.1.push((bar, off));
            data.fill(0x5a);
        }
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_all_ones() {
        let mut bus = PciBus::new();
        assert_eq!(cfg_read(&mut bus, 0, 0), 0x29c0_8086);
        assert_eq!(cfg_read(&mut bus, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(cfg_read(&mut bus, 5, 0), 0xffff_ffff);
    }

    #[test]
    fn config_address_reads_back_for_the_type1_probe() {
        let mut bus = PciBus::new();
        bus.pio_write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        bus.pio_read(CONFIG_ADDRESS, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut bus = PciBus::new();
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 1, (0x1af4, 0x1100));
        let at = bus.allocate_bar(0x4000).unwrap();
        c.add_bar(0, at, 0x4000);
        let slot = u32::from(bus.add(Box::new(Dummy(c, vec![]))).unwrap());
        assert_eq!(cfg_read(&mut bus, slot, 0x10), 0xc000_0000);
        cfg_write(&mut bus, slot, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read(&mut bus, slot, 0x10), 0xffff_c000);
        cfg_write(&mut bus, slot, 0x10, 0xc001_0000);
        // Memory decoding off: the BAR does not answer.
        let mut d = [0u8; 4];
        assert!(!bus.mmio_read(0xc001_0010, &mut d));
        cfg_write(&mut bus, slot, 0x04, 0x2);
        assert!(bus.mmio_read(0xc001_0010, &mut d));
        assert_eq!(d, [0x5a; 4]);
        assert!(!bus.mmio_read(0xc000_0010, &mut d));
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut bus = PciBus::new();
        cfg_write(&mut bus, 0, 0, 0x1234_5678);
        assert_eq!(cfg_read(&mut bus, 0, 0), 0x29c0_8086);
    }

    #[test]
    fn sub_dword_reads_at_each_data_port() {
        let mut bus = PciBus::new();
        bus.pio_write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 1];
        bus.pio_read(CONFIG_DATA + 1, &mut b);
        assert_eq!(b[0], 0x80);
        let mut w = [0u8; 2];
        bus.pio_read(CONFIG_DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, (0, 0));
        let a = c.add_capability(0x09, &[0; 14], &[]);
        let b = c.add_capability(0x11, &[0; 10], &[]);
        assert_eq!(c.byte(0x34) as usize, a);
        assert_eq!(c.byte(a + 1) as usize, b);
        assert_eq!(c.byte(b + 1), 0);
        assert_ne!(c.u16(0x06) & STATUS_CAP_LIST, 0);
    }
}
