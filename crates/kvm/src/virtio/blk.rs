//! virtio-blk (virtio 1.2 §5.2) over an [`OverlayDisk`].

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::VirtioDevice;
use crate::disk::OverlayDisk;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Request status values.
pub const S_OK: u8 = 0;
/// The request failed.
pub const S_IOERR: u8 = 1;
/// The request type is not supported.
pub const S_UNSUPP: u8 = 2;

const F_SEG_MAX: u64 = 1 << 2;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
/// Data moves through a buffer of at most this many bytes, whatever the
/// request's length.
const CHUNK: usize = 1 << 20;

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    disk: OverlayDisk,
    id: [u8; 20],
    /// Requests that failed, for the report.
    pub errors: u64,
}

impl Block {
    /// A block device over `disk`; `id` is what GET_ID answers (the disk's
    /// serial, cut to 20 bytes).
    pub fn new(disk: OverlayDisk, id: &str) -> Self {
        let mut serial = [0u8; 20];
        let n = id.len().min(20);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            disk,
            id: serial,
            errors: 0,
        }
    }

    /// Serves one request; returns the bytes written into the chain.
    fn request(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (
            Reader::new(mem, chain.clone()),
            Writer::<()>::new(mem, chain),
        ) else {
            // A descriptor outside guest memory: nothing can be written back.
            self.errors += 1;
            return 0;
        };
        let avail = writer.available_bytes();
        if avail == 0 {
            self.errors += 1;
            return 0;
        }
        let Ok(mut status) = writer.split_at(avail - 1) else {
            self.errors += 1;
            return 0;
        };
        let mut header = [0u8; 16];
        let code = if reader.read_exact(&mut header).is_err() {
            S_IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            match kind {
                T_IN => self.read(sector, &mut writer),
                T_OUT => self.write(sector, &mut reader),
                T_FLUSH => S_OK,
                T_GET_ID => {
                    let n = writer.available_bytes().min(20);
                    if writer.write_all(&self.id[..n]).is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                _ => S_UNSUPP,
            }
        };
        if code != S_OK {
            self.errors += 1;
        }
        let _ = status.write_all(&[code]);
        (writer.bytes_written() + status.bytes_written()) as u32
    }

    /// The byte offset of `sector` when `len` bytes from there fit on the
    /// disk and `len` is whole sectors.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len as u64)?;
        ((len as u64).is_multiple_of(SECTOR) && end <= self.disk.size()).then_some(offset)
    }

    fn read(&mut self, sector: u64, writer: &mut Writer<'_>) -> u8 {
        let len = writer.available_bytes();
        let Some(mut offset) = self.range(sector, len) else {
            return S_IOERR;
        };
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            if self.disk.read_at(&mut buf[..n], offset).is_err()
                || writer.write_all(&buf[..n]).is_err()
            {
                return S_IOERR;
            }
            offset += n as u64;
            left -= n;
        }
        S_OK
    }

    fn write(&mut self, sector: u64, reader: &mut Reader<'_>) -> u8 {
        let len = reader.available_bytes();
        let Some(mut offset) = self.range(sector, len) else {
            return S_IOERR;
        };
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            if reader.read_exact(&mut buf[..n]).is_err()
                || self.disk.write_at(&buf[..n], offset).is_err()
            {
                return S_IOERR;
            }
            offset += n as u64;
            left -= n;
        }
        S_OK
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u16 {
        2
    }

    fn pci_class(&self) -> u32 {
        0x01_80_00
    }

    fn features(&self) -> u64 {
        super::F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        super::read_config_bytes(&c, offset, data);
    }

    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.request(chain, mem);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{image, GuestQueue};
    use vm_memory::{Bytes, GuestAddress};

    /// Pushes a request of `kind` at `sector` with a device-writable data
    /// buffer of `len` bytes (none when 0), serves it, and returns the
    /// data buffer's and the status byte's addresses.
    fn submit(dev: &mut Block, g: &mut GuestQueue, kind: u32, sector: u64, len: u32) -> (u64, u64) {
        let hdr = g.header(kind, sector);
        let buf = g.alloc(len.max(1));
        let st = g.alloc(1);
        if len > 0 {
            g.push(&[(hdr, 16, false), (buf, len, true), (st, 1, true)]);
        } else {
            g.push(&[(hdr, 16, false), (st, 1, true)]);
        }
        dev.process(0, &mut g.queue, &g.mem);
        (buf, st)
    }

    fn block(bytes: &[u8]) -> (tempfile::NamedTempFile, Block) {
        let (f, r) = image(bytes);
        (f, Block::new(OverlayDisk::new(r, 1 << 20), "vmshift-disk0"))
    }

    #[test]
    fn read_returns_the_image_bytes_and_ok() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let (_f, mut dev) = block(&data);
        let mut g = GuestQueue::new();
        let hdr = g.header(T_IN, 2);
        let buf = g.alloc(1024);
        let st = g.alloc(1);
        g.push(&[(hdr, 16, false), (buf, 1024, true), (st, 1, true)]);
        assert!(dev.process(0, &mut g.queue, &g.mem));
        let mut got = vec![0u8; 1024];
        g.mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert_eq!(got, &data[1024..2048]);
        assert_eq!(g.status(st), S_OK);
        assert_eq!(g.used_len(0), 1025);
    }

    #[test]
    fn write_then_read_sees_it_and_the_image_is_unchanged() {
        let (f, mut dev) = block(&[0u8; 4096]);
        let mut g = GuestQueue::new();
        let hdr = g.header(T_OUT, 1);
        let buf = g.alloc(512);
        g.mem.write_slice(&[0xcd; 512], GuestAddress(buf)).unwrap();
        let st = g.alloc(1);
        g.push(&[(hdr, 16, false), (buf, 512, false), (st, 1, true)]);
        dev.process(0, &mut g.queue, &g.mem);
        assert_eq!(g.status(st), S_OK);
        let mut b = [0u8; 512];
        dev.disk.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [0xcd; 512]);
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![0u8; 4096]);
    }

    #[test]
    fn sector_past_the_end_is_ioerr() {
        let (_f, mut dev) = block(&[0u8; 4096]);
        let mut g = GuestQueue::new();
        let (_, st) = submit(&mut dev, &mut g, T_IN, 7, 1024);
        assert_eq!(g.status(st), S_IOERR);
        // A sector number whose byte offset overflows.
        let (_, st) = submit(&mut dev, &mut g, T_IN, u64::MAX / 2, 512);
        assert_eq!(g.status(st), S_IOERR);
    }

    #[test]
    fn unaligned_length_and_unknown_type_get_error_status() {
        let (_f, mut dev) = block(&[0u8; 4096]);
        let mut g = GuestQueue::new();
        let (_, st) = submit(&mut dev, &mut g, T_IN, 0, 100);
        assert_eq!(g.status(st), S_IOERR);
        let (_, st) = submit(&mut dev, &mut g, 99, 0, 0);
        assert_eq!(g.status(st), S_UNSUPP);
    }

    #[test]
    fn descriptor_outside_guest_memory_is_used_with_zero_length() {
        let (_f, mut dev) = block(&[0u8; 4096]);
        let mut g = GuestQueue::new();
        let hdr = g.header(T_IN, 0);
        let st = g.alloc(1);
        g.push(&[
            (hdr, 16, false),
            (0xdead_0000_0000, 512, true),
            (st, 1, true),
        ]);
        assert!(dev.process(0, &mut g.queue, &g.mem));
        assert_eq!(g.used_len(0), 0);
        assert_eq!(dev.errors, 1);
    }

    #[test]
    fn chain_without_status_byte_is_dropped() {
        let (_f, mut dev) = block(&[0u8; 4096]);
        let mut g = GuestQueue::new();
        let hdr = g.header(T_FLUSH, 0);
        g.push(&[(hdr, 16, false)]);
        dev.process(0, &mut g.queue, &g.mem);
        assert_eq!(g.used_len(0), 0);
    }

    #[test]
    fn get_id_returns_the_serial() {
        let (_f, mut dev) = block(&[0u8; 4096]);
        let mut g = GuestQueue::new();
        let (buf, st) = submit(&mut dev, &mut g, T_GET_ID, 0, 20);
        let mut id = [0u8; 20];
        g.mem.read_slice(&mut id, GuestAddress(buf)).unwrap();
        assert_eq!(&id[..13], b"vmshift-disk0");
        assert_eq!(g.status(st), S_OK);
    }

    #[test]
    fn overlay_full_is_ioerr() {
        let (f, r) = image(&[0u8; 65536]);
        let _keep = f;
        let mut dev = Block::new(OverlayDisk::new(r, 4096), "d");
        let mut g = GuestQueue::new();
        let buf = g.alloc(8192);
        let hdr = g.header(T_OUT, 0);
        let st = g.alloc(1);
        g.push(&[(hdr, 16, false), (buf, 8192, false), (st, 1, true)]);
        dev.process(0, &mut g.queue, &g.mem);
        assert_eq!(g.status(st), S_IOERR);
    }
}
