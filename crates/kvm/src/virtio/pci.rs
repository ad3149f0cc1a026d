//! The virtio PCI transport (virtio 1.2 §4.1), modern only, with MSI-X.
//!
//! BAR 0 holds every region:
//!
//! | offset | region |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications (4 bytes per queue) |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending bits |

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{MsiSink, VirtioDevice};
use crate::pci::{ConfigSpace, PciDevice};

const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
/// Size of BAR 0.
pub const BAR_SIZE: u32 = 0x8000;
const NOTIFY_MULTIPLIER: u32 = 4;
/// "No vector".
const NO_VECTOR: u16 = 0xffff;

/// Device status bits.
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;

/// MSI-X message control bits.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, Clone, Copy, Default)]
struct MsixEntry {
    addr: u64,
    data: u32,
    masked: bool,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    msi: Arc<dyn MsiSink>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    msix_config: u16,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    isr: u8,
    msix: Vec<MsixEntry>,
    pending: Vec<bool>,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("device_id", &self.device.device_id())
            .field("status", &self.status)
            .finish()
    }
}

/// Builds a virtio PCI capability body (after id and next).
fn virtio_cap(cfg_type: u8, offset: u64, length: u32, extra: Option<u32>) -> Vec<u8> {
    let len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// Wraps `device` with its BAR 0 at `bar_addr`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiSink>,
        bar_addr: u32,
    ) -> Self {
        let id = device.device_id();
        let mut config =
            ConfigSpace::new(0x1af4, 0x1040 + id, device.pci_class(), 1, (0x1af4, 0x1100));
        config.add_bar(0, bar_addr, BAR_SIZE);
        let sizes = device.queue_max_sizes();
        let nq = sizes.len();
        config.add_capability(0x09, &virtio_cap(1, COMMON, 0x40, None), &[]);
        config.add_capability(0x09, &virtio_cap(3, ISR, 4, None), &[]);
        config.add_capability(0x09, &virtio_cap(4, DEVICE, 0x1000, None), &[]);
        config.add_capability(
            0x09,
            &virtio_cap(
                2,
                NOTIFY,
                NOTIFY_MULTIPLIER * nq as u32,
                Some(NOTIFY_MULTIPLIER),
            ),
            &[],
        );
        let vectors = nq + 1;
        let mut msix = Vec::new();
        msix.extend_from_slice(&((vectors - 1) as u16).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(0x11, &msix, &[0, 0xc0]);
        VirtioPci {
            config,
            msix_cap,
            device,
            mem,
            msi,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            msix_config: NO_VECTOR,
            queue_select: 0,
            queues: sizes
                .iter()
                .map(|s| Queue::new(*s).expect("queue sizes are powers of two"))
                .collect(),
            queue_vectors: vec![NO_VECTOR; nq],
            isr: 0,
            msix: vec![
                MsixEntry {
                    masked: true,
                    ..Default::default()
                };
                vectors
            ],
            pending: vec![false; vectors],
        }
    }

    fn msix_control(&self) -> u16 {
        self.config.u16(self.msix_cap + 2)
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.status = 0;
        self.msix_config = NO_VECTOR;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.isr = 0;
        self.device.reset();
    }

    /// Signals `vector`, or marks it pending while it is masked.
    fn signal(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.msix.len() {
            return;
        }
        let control = self.msix_control();
        if control & MSIX_ENABLE == 0 {
            return;
        }
        if control & MSIX_FUNCTION_MASK != 0 || self.msix[v].masked {
            self.pending[v] = true;
            return;
        }
        self.pending[v] = false;
        self.msi.send(self.msix[v].addr, self.msix[v].data);
    }

    fn deliver_pending(&mut self) {
        for v in 0..self.pending.len() {
            if self.pending[v] {
                self.signal(v as u16);
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = usize::from(self.queue_select);
        let queue = self.queues.get(q);
        let features = self.device.features();
        let mut regs = [0u8; 0x40];
        let feature_word = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        regs[0x04..0x08].copy_from_slice(&feature_word.to_le_bytes());
        regs[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        regs[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        regs[0x0c..0x10].copy_from_slice(&drv.to_le_bytes());
        regs[0x10..0x12].copy_from_slice(&self.msix_config.to_le_bytes());
        regs[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        regs[0x14] = self.status;
        regs[0x15] = self.config_generation;
        regs[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(queue) = queue {
            regs[0x18..0x1a].copy_from_slice(&queue.size().to_le_bytes());
            regs[0x1a..0x1c].copy_from_slice(&self.queue_vectors[q].to_le_bytes());
            regs[0x1c..0x1e].copy_from_slice(&u16::from(queue.ready()).to_le_bytes());
            regs[0x1e..0x20].copy_from_slice(&(q as u16).to_le_bytes());
            regs[0x20..0x28].copy_from_slice(&queue.desc_table().to_le_bytes());
            regs[0x28..0x30].copy_from_slice(&queue.avail_ring().to_le_bytes());
            regs[0x30..0x38].copy_from_slice(&queue.used_ring().to_le_bytes());
        }
        super::read_config_bytes(&regs, offset, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 8 {
            self.common_write(offset, &data[..4]);
            self.common_write(offset + 4, &data[4..]);
            return;
        }
        let mut v = [0u8; 4];
        v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        let v32 = u32::from_le_bytes(v);
        let v16 = v32 as u16;
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            // Features may change only before FEATURES_OK.
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => self.msix_config = self.valid_vector(v16),
            0x14 => self.set_status(data[0]),
            0x16 => self.queue_select = v16,
            0x18 => {
                if let Some(q) = self.selected_queue() {
                    if !q.ready() {
                        q.set_size(v16);
                    }
                }
            }
            0x1a => {
                let vec = self.valid_vector(v16);
                let q = usize::from(self.queue_select);
                if let Some(slot) = self.queue_vectors.get_mut(q) {
                    *slot = vec;
                }
            }
            0x1c => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    // A queue whose rings lie outside guest memory (or are
                    // misaligned, or of a bad size) is not enabled.
                    if v16 == 1 {
                        q.set_ready(true);
                        if !q.is_valid(&mem) {
                            q.set_ready(false);
                        }
                    }
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                if let Some(q) = self.selected_queue() {
                    if q.ready() {
                        return;
                    }
                    let (lo, hi) = if offset.is_multiple_of(8) {
                        (Some(v32), None)
                    } else {
                        (None, Some(v32))
                    };
                    match offset & !7 {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn set_status(&mut self, s: u8) {
        if s == 0 {
            self.reset();
            return;
        }
        let mut s = s;
        if s & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            // A driver that accepts what was not offered, or a legacy
            // driver, does not get FEATURES_OK.
            if self.driver_features & !offered != 0
                || self.driver_features & super::F_VERSION_1 == 0
            {
                s &= !STATUS_FEATURES_OK;
            }
        }
        self.status = s;
    }

    /// The guest notified queue `index`.
    fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let used = self.device.process(index, queue, &self.mem);
        if used && queue.needs_notification(&self.mem).unwrap_or(true) {
            self.isr |= 1;
            let vector = self.queue_vectors[index];
            self.signal(vector);
        }
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let mut table = Vec::with_capacity(self.msix.len() * 16);
        for e in &self.msix {
            table.extend_from_slice(&(e.addr as u32).to_le_bytes());
            table.extend_from_slice(&((e.addr >> 32) as u32).to_le_bytes());
            table.extend_from_slice(&e.data.to_le_bytes());
            table.extend_from_slice(&u32::from(e.masked).to_le_bytes());
        }
        super::read_config_bytes(&table, offset, data);
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let entry = (offset / 16) as usize;
        let Some(e) = self.msix.get_mut(entry) else {
            return;
        };
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&(e.addr as u32).to_le_bytes());
        bytes[4..8].copy_from_slice(&((e.addr >> 32) as u32).to_le_bytes());
        bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&u32::from(e.masked).to_le_bytes());
        let at = (offset % 16) as usize;
        let n = data.len().min(16 - at);
        bytes[at..at + n].copy_from_slice(&data[..n]);
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        e.addr = u64::from(word(0)) | (u64::from(word(4)) << 32);
        e.data = word(8);
        let was_masked = e.masked;
        e.masked = word(12) & 1 != 0;
        if was_masked && !e.masked && self.pending[entry] {
            self.signal(entry as u16);
        }
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if offset < control.end && offset + len > control.start {
            self.deliver_pending();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < ISR => self.common_read(o - COMMON, data),
            o if o < DEVICE => {
                if o == ISR {
                    data[0] = self.isr;
                    self.isr = 0;
                }
            }
            o if o < NOTIFY => self.device.read_config(o - DEVICE, data),
            o if o < MSIX_TABLE => {}
            o if o < MSIX_PBA => self.msix_read(o - MSIX_TABLE, data),
            o => {
                let bits: u64 = self
                    .pending
                    .iter()
                    .enumerate()
                    .map(|(i, p)| u64::from(*p) << i)
                    .sum();
                super::read_config_bytes(&bits.to_le_bytes(), o - MSIX_PBA, data);
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.is_empty() {
            return;
        }
        match offset {
            o if o < ISR => self.common_write(o - COMMON, data),
            o if o < DEVICE => {}
            o if o < NOTIFY => self.device.write_config(o - DEVICE, data),
            o if o < MSIX_TABLE => {
                let index = (o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                self.notify(index as usize);
            }
            o if o < MSIX_PBA => self.msix_write(o - MSIX_TABLE, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::OverlayDisk;
    use crate::virtio::blk::Block;
    use crate::virtio::testing::{image, GuestQueue};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Recorder {
        fn send(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn w16(d: &mut VirtioPci, off: u64, v: u16) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn w32(d: &mut VirtioPci, off: u64, v: u32) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn r32(d: &mut VirtioPci, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates, sets up queue 0 where `GuestQueue` keeps it, and
    /// programs MSI-X vector 1 for it, as Linux's virtio_pci does.
    fn linux_like_setup(d: &mut VirtioPci, msix_enable: bool) {
        let cap = d.msix_cap;
        if msix_enable {
            d.config_mut()
                .write(cap + 2, &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
            d.config_written(cap + 2, 2);
        }
        d.bar_write(0, 0x14, &[1 | 2]);
        w32(d, 0x00, 1);
        assert_eq!(r32(d, 0x04), 1, "VERSION_1 offered");
        w32(d, 0x08, 0);
        w32(d, 0x0c, 1 << 9);
        w32(d, 0x08, 1);
        w32(d, 0x0c, 1);
        d.bar_write(0, 0x14, &[1 | 2 | 8]);
        let mut s = [0u8; 1];
        d.bar_read(0, 0x14, &mut s);
        assert_eq!(s[0] & 8, 8, "FEATURES_OK kept");
        // MSI-X entry 1: address, data, unmasked.
        w32(d, MSIX_TABLE + 16, 0xfee0_0000);
        w32(d, MSIX_TABLE + 20, 0);
        w32(d, MSIX_TABLE + 24, 0x41);
        w32(d, MSIX_TABLE + 28, 0);
        w16(d, 0x16, 0);
        w16(d, 0x18, 64);
        w16(d, 0x1a, 1);
        w32(d, 0x20, 0x0);
        w32(d, 0x24, 0);
        w32(d, 0x28, 0x1000);
        w32(d, 0x2c, 0);
        w32(d, 0x30, 0x2000);
        w32(d, 0x34, 0);
        w16(d, 0x1c, 1);
        let mut e = [0u8; 2];
        d.bar_read(0, 0x1c, &mut e);
        assert_eq!(e, [1, 0], "queue enabled");
        if msix_enable {
            d.config_mut().write(cap + 2, &MSIX_ENABLE.to_le_bytes());
            d.config_written(cap + 2, 2);
        }
        d.bar_write(0, 0x14, &[1 | 2 | 8 | 4]);
    }

    fn device(g: &GuestQueue, rec: Arc<Recorder>) -> (tempfile::NamedTempFile, VirtioPci) {
        let (f, r) = image(&[0x11u8; 8192]);
        let blk = Block::new(OverlayDisk::new(r, 1 << 20), "s");
        (
            f,
            VirtioPci::new(Box::new(blk), g.mem.clone(), rec, 0xc000_0000),
        )
    }

    #[test]
    fn a_notified_request_is_served_and_signalled_by_msix() {
        let mut g = GuestQueue::new();
        let rec = Arc::new(Recorder::default());
        let (_f, mut d) = device(&g, rec.clone());
        linux_like_setup(&mut d, true);
        let hdr = g.header(0, 0);
        let buf = g.alloc(512);
        let st = g.alloc(1);
        g.push(&[(hdr, 16, false), (buf, 512, true), (st, 1, true)]);
        w16(&mut d, NOTIFY, 0);
        assert_eq!(g.status(st), 0);
        assert_eq!(g.used_len(0), 513);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);
    }

    #[test]
    fn a_masked_vector_is_delivered_when_unmasked() {
        let mut g = GuestQueue::new();
        let rec = Arc::new(Recorder::default());
        let (_f, mut d) = device(&g, rec.clone());
        linux_like_setup(&mut d, true);
        w32(&mut d, MSIX_TABLE + 28, 1);
        let hdr = g.header(4, 0);
        let st = g.alloc(1);
        g.push(&[(hdr, 16, false), (st, 1, true)]);
        w16(&mut d, NOTIFY, 0);
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(r32(&mut d, MSIX_PBA) & 2, 2);
        w32(&mut d, MSIX_TABLE + 28, 0);
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        assert_eq!(r32(&mut d, MSIX_PBA), 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_is_not_enabled() {
        let g = GuestQueue::new();
        let rec = Arc::new(Recorder::default());
        let (_f, mut d) = device(&g, rec);
        d.bar_write(0, 0x14, &[1 | 2]);
        w16(&mut d, 0x16, 0);
        w32(&mut d, 0x20, 0);
        w32(&mut d, 0x24, 0x10);
        w16(&mut d, 0x1c, 1);
        let mut e = [0u8; 2];
        d.bar_read(0, 0x1c, &mut e);
        assert_eq!(e, [0, 0]);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let g = GuestQueue::new();
        let rec = Arc::new(Recorder::default());
        let (_f, mut d) = device(&g, rec);
        d.bar_write(0, 0x14, &[1 | 2]);
        w32(&mut d, 0x08, 0);
        w32(&mut d, 0x0c, 1 << 28);
        w32(&mut d, 0x08, 1);
        w32(&mut d, 0x0c, 1);
        d.bar_write(0, 0x14, &[1 | 2 | 8]);
        let mut s = [0u8; 1];
        d.bar_read(0, 0x14, &mut s);
        assert_eq!(s[0] & 8, 0);
    }

    #[test]
    fn config_space_names_a_modern_virtio_device_with_msix() {
        let g = GuestQueue::new();
        let rec = Arc::new(Recorder::default());
        let (_f, d) = device(&g, rec);
        let c = d.config();
        assert_eq!((c.u16(0), c.u16(2)), (0x1af4, 0x1042));
        assert_eq!(c.byte(8), 1);
        // Walk the capability list: four virtio structures, then MSI-X.
        let mut p = c.byte(0x34) as usize;
        let mut kinds = Vec::new();
        while p != 0 {
            kinds.push((c.byte(p), if c.byte(p) == 9 { c.byte(p + 3) } else { 0 }));
            p = c.byte(p + 1) as usize;
        }
        assert_eq!(kinds, vec![(9, 1), (9, 3), (9, 4), (9, 2), (0x11, 0)]);
        assert_eq!(c.u16(d.msix_cap + 2) & 0x7ff, 1);
    }
}
