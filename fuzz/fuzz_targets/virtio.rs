//! The launcher's virtio-blk and virtio-scsi devices serving a queue the
//! input lays out in guest memory, as a hostile guest driver would: the
//! descriptor table, the available ring, the request headers, CDBs and
//! buffers are all the input's. The image underneath is a raw file; the
//! devices must answer every chain with a status (or drop it), never
//! panic, and never write outside guest memory or to the image.
//!
//! Input: byte 0 picks the device (even: virtio-blk, odd: virtio-scsi)
//! and, for SCSI, the queue (control or request); byte 1 the queue size
//! (a power of two, 1–256); bytes 2–3 the SCSI cdb_size, bytes 4–5 its
//! sense_size, written to the device's configuration as a driver would;
//! the rest is guest memory from address 0 (descriptor table at 0,
//! available ring at 0x1000, used ring at 0x2000).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmshift_image::{open_image, ImageReader, OpenOptions};
use vmshift_kvm::disk::OverlayDisk;
use vmshift_kvm::virtio::blk::Block;
use vmshift_kvm::virtio::scsi::Scsi;
use vmshift_kvm::virtio::VirtioDevice;

/// Guest memory: enough for the rings and a few buffers, and small enough
/// that chains pointing anywhere also point outside it.
const MEM: usize = 256 << 10;

fn disk() -> Arc<dyn ImageReader> {
    static IMAGE: OnceLock<Arc<dyn ImageReader>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let bytes: Vec<u8> = (0..(64u32 << 10)).map(|i| (i % 251) as u8).collect();
            let path = vmshift_fuzz::input_file("virtio-disk.raw", &bytes);
            let r = open_image(
                &path,
                Some(vmshift_model::DiskFormat::Raw),
                &OpenOptions::default(),
            )
            .expect("opening the fuzz disk");
            Arc::from(r)
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (head, rest) = data.split_at(6);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    mem.write_slice(&rest[..rest.len().min(MEM)], GuestAddress(0))
        .expect("inside guest memory");
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(1 << (head[1] % 9));
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        return;
    }
    // Two limits small enough to fill: the overlay refuses writes past it.
    let overlay = || OverlayDisk::new(disk(), 16 << 10);
    let (mut dev, index): (Box<dyn VirtioDevice>, usize) = if head[0] % 2 == 0 {
        (Box::new(Block::new(overlay(), "fuzz")), 0)
    } else {
        let mut s = Scsi::new(vec![(overlay(), "a".into()), (overlay(), "b".into())]);
        let cdb = u32::from(u16::from_le_bytes([head[2], head[3]]));
        let sense = u32::from(u16::from_le_bytes([head[4], head[5]]));
        s.write_config(24, &cdb.to_le_bytes());
        s.write_config(20, &sense.to_le_bytes());
        (Box::new(s), if head[0] & 2 == 0 { 2 } else { 0 })
    };
    let mut cfg = [0u8; 64];
    dev.read_config(0, &mut cfg);
    // Twice: the second pass sees the used ring the first one wrote.
    dev.process(index, &mut queue, &mem);
    dev.process(index, &mut queue, &mem);
});
