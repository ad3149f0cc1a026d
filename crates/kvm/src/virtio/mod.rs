//! virtio devices (virtio 1.2) and their PCI transport.
//!
//! A device ([`VirtioDevice`]) only answers its configuration space and
//! serves requests from its queues through guest memory; the transport
//! ([`pci::VirtioPci`]) does feature negotiation, queue setup and MSI-X
//! interrupts. Every request field the guest gives is checked and turned
//! into the device's error status, never a panic.

pub mod blk;
pub mod pci;
pub mod scsi;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: a modern device.
pub const F_VERSION_1: u64 = 1 << 32;

/// Delivers a message-signalled interrupt.
pub trait MsiSink: Send + Sync {
    /// Sends the MSI with this address and data.
    fn send(&self, address: u64, data: u32);
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 block, 8 SCSI).
    fn device_id(&self) -> u16;
    /// The PCI class code (base, sub, interface).
    fn pci_class(&self) -> u32;
    /// Feature bits offered, [`F_VERSION_1`] included.
    fn features(&self) -> u64;
    /// The maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Serves the requests available on queue `index`. Returns true when
    /// it added used buffers.
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Copies the bytes of `config` at `offset` into `data` (bytes past its
/// end read as zero).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A guest memory with one queue in it, for device tests: descriptors are
/// pushed as the guest's driver would push them.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmshift_image::{open_image, ImageReader, OpenOptions};

    const SIZE: u16 = 64;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// A raw image file holding `bytes`, opened through vmshift's reader.
    pub fn image(bytes: &[u8]) -> (tempfile::NamedTempFile, std::sync::Arc<dyn ImageReader>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let r = open_image(
            f.path(),
            Some(vmshift_model::DiskFormat::Raw),
            &OpenOptions::default(),
        )
        .unwrap();
        (f, std::sync::Arc::from(r))
    }

    pub struct GuestQueue {
        pub mem: GuestMemoryMmap,
        pub queue: Queue,
        next_desc: u16,
        next_avail: u16,
        next_buf: u64,
    }

    impl GuestQueue {
        pub fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let mut queue = Queue::new(SIZE).unwrap();
            queue.set_size(SIZE);
            queue.set_desc_table_address(Some(DESC as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            queue.set_used_ring_address(Some(USED as u32), Some(0));
            queue.set_ready(true);
            assert!(queue.is_valid(&mem));
            GuestQueue {
                mem,
                queue,
                next_desc: 0,
                next_avail: 0,
                next_buf: 0x10000,
            }
        }

        /// Guest memory for a buffer.
        pub fn alloc(&mut self, len: u32) -> u64 {
            let at = self.next_buf;
            self.next_buf = (at + u64::from(len) + 15) & !15;
            at
        }

        /// A virtio-blk request header.
        pub fn header(&mut self, kind: u32, sector: u64) -> u64 {
            let at = self.alloc(16);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(at)).unwrap();
            at
        }

        /// Makes a chain of (address, length, device-writable) available.
        pub fn push(&mut self, descs: &[(u64, u32, bool)]) {
            let head = self.next_desc;
            for (i, (addr, len, write)) in descs.iter().enumerate() {
                let idx = self.next_desc % SIZE;
                let last = i + 1 == descs.len();
                let flags: u16 = (if last { 0 } else { 1 }) | (if *write { 2 } else { 0 });
                let next = (idx + 1) % SIZE;
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&next.to_le_bytes());
                self.mem
                    .write_slice(&d, GuestAddress(DESC + 16 * u64::from(idx)))
                    .unwrap();
                self.next_desc = self.next_desc.wrapping_add(1);
            }
            let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % SIZE);
            self.mem.write_obj(head % SIZE, GuestAddress(slot)).unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            self.mem
                .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// The length the device put in used element `i`.
        pub fn used_len(&self, i: u16) -> u32 {
            self.mem
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(i) + 4))
                .unwrap()
        }

        /// The status byte at `at`.
        pub fn status(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
    }
}
