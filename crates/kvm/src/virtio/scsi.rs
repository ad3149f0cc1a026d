//! virtio-scsi (virtio 1.2 §5.6): one target (0) with one LUN per disk, in
//! the VM's disk order, as libvirt places disks on a virtio-scsi
//! controller. Enough of SBC/SPC for Linux's `sd` driver; any other
//! command gets CHECK CONDITION with ILLEGAL REQUEST sense.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::VirtioDevice;
use crate::disk::OverlayDisk;

const QUEUE_SIZE: u16 = 128;
const SECTOR: u64 = 512;
const CHUNK: usize = 1 << 20;
/// Largest sense and CDB sizes a driver may configure.
const MAX_SENSE: u32 = 252;
const MAX_CDB: u32 = 252;

/// Response codes (virtio-scsi `response`).
const S_OK: u8 = 0;
const S_BAD_TARGET: u8 = 3;
/// SCSI status.
const GOOD: u8 = 0;
const CHECK_CONDITION: u8 = 2;

/// Sense keys.
const ILLEGAL_REQUEST: u8 = 0x5;
const MEDIUM_ERROR: u8 = 0x3;

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense(pub u8, pub u8, pub u8);

const INVALID_OPCODE: Sense = Sense(ILLEGAL_REQUEST, 0x20, 0);
const LBA_OUT_OF_RANGE: Sense = Sense(ILLEGAL_REQUEST, 0x21, 0);
const INVALID_FIELD: Sense = Sense(ILLEGAL_REQUEST, 0x24, 0);
const LUN_NOT_SUPPORTED: Sense = Sense(ILLEGAL_REQUEST, 0x25, 0);
const READ_ERROR: Sense = Sense(MEDIUM_ERROR, 0x11, 0);
const WRITE_ERROR: Sense = Sense(MEDIUM_ERROR, 0x0c, 0);

/// A virtio-scsi controller.
#[derive(Debug)]
pub struct Scsi {
    luns: Vec<(OverlayDisk, String)>,
    sense_size: u32,
    cdb_size: u32,
    /// Commands that ended in CHECK CONDITION, for the report.
    pub errors: u64,
}

/// What a command did.
enum Outcome {
    Good,
    Check(Sense),
}

impl Scsi {
    /// A controller with these disks as LUNs 0, 1, … of target 0, each
    /// with its serial.
    pub fn new(luns: Vec<(OverlayDisk, String)>) -> Self {
        Scsi {
            luns,
            sense_size: 96,
            cdb_size: 32,
            errors: 0,
        }
    }

    /// The LUN a virtio-scsi LUN field names: `Some(None)` for target 0
    /// with a LUN that does not exist, `None` for another target.
    fn lun(&self, field: &[u8; 8]) -> Option<Option<usize>> {
        if field[0] != 1 || field[1] != 0 {
            return None;
        }
        let lun = (usize::from(field[2] & 0x3f) << 8) | usize::from(field[3]);
        Some((lun < self.luns.len()).then_some(lun))
    }

    fn request(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (Ok(mut reader), Ok(mut resp)) = (
            Reader::new(mem, chain.clone()),
            Writer::<()>::new(mem, chain),
        ) else {
            self.errors += 1;
            return 0;
        };
        let resp_len = 12 + self.sense_size as usize;
        if resp.available_bytes() < resp_len {
            self.errors += 1;
            return 0;
        }
        let Ok(mut data_in) = resp.split_at(resp_len) else {
            return 0;
        };
        let mut head = vec![0u8; 19 + self.cdb_size as usize];
        let (status, response, sense) = if reader.read_exact(&mut head).is_err() {
            (GOOD, S_BAD_TARGET, None)
        } else {
            let lun_field: [u8; 8] = head[..8].try_into().expect("8 bytes");
            // The driver may configure a CDB shorter than the longest
            // command; read a short one as zero-padded.
            let mut cdb = head[19..].to_vec();
            cdb.resize(cdb.len().max(16), 0);
            match self.lun(&lun_field) {
                None => (GOOD, S_BAD_TARGET, None),
                Some(lun) => match self.command(lun, &cdb, &mut reader, &mut data_in) {
                    Outcome::Good => (GOOD, S_OK, None),
                    Outcome::Check(s) => {
                        self.errors += 1;
                        (CHECK_CONDITION, S_OK, Some(s))
                    }
                },
            }
        };
        let mut r = vec![0u8; resp_len];
        if let Some(s) = sense {
            let fixed = fixed_sense(s);
            let n = fixed.len().min(self.sense_size as usize);
            r[12..12 + n].copy_from_slice(&fixed[..n]);
            r[0..4].copy_from_slice(&(n as u32).to_le_bytes());
        }
        let resid = data_in.available_bytes() as u32;
        r[4..8].copy_from_slice(&resid.to_le_bytes());
        r[10] = status;
        r[11] = response;
        let _ = resp.write_all(&r);
        (resp.bytes_written() + data_in.bytes_written()) as u32
    }

    fn command(
        &mut self,
        lun: Option<usize>,
        cdb: &[u8],
        reader: &mut Reader<'_>,
        out: &mut Writer<'_>,
    ) -> Outcome {
        let op = cdb[0];
        // INQUIRY and REPORT LUNS answer for a LUN that does not exist too.
        let Some(lun) = lun else {
            return match op {
                0x12 if cdb[1] & 1 == 0 => {
                    let mut inq = standard_inquiry();
                    inq[0] = 0x7f; // no device at this LUN
                    reply(out, &inq, be16(&cdb[3..5]))
                }
                0xa0 => self.report_luns(cdb, out),
                0x03 => reply(out, &fixed_sense(LUN_NOT_SUPPORTED), usize::from(cdb[4])),
                _ => Outcome::Check(LUN_NOT_SUPPORTED),
            };
        };
        let blocks = self.luns[lun].0.size() / SECTOR;
        match op {
            0x00 | 0x1b | 0x1e | 0x2f | 0x35 | 0x91 => Outcome::Good,
            0x03 => reply(out, &fixed_sense(Sense(0, 0, 0)), usize::from(cdb[4])),
            0x12 => self.inquiry(lun, cdb, out),
            0xa0 => self.report_luns(cdb, out),
            0x25 => {
                let mut d = [0u8; 8];
                let last = blocks.saturating_sub(1).min(0xffff_ffff) as u32;
                d[..4].copy_from_slice(&last.to_be_bytes());
                d[4..].copy_from_slice(&(SECTOR as u32).to_be_bytes());
                reply(out, &d, 8)
            }
            0x9e if cdb[1] & 0x1f == 0x10 => {
                let mut d = [0u8; 32];
                d[..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(SECTOR as u32).to_be_bytes());
                reply(out, &d, be32(&cdb[10..14]))
            }
            0x1a | 0x5a => mode_sense(cdb, out),
            0x08 | 0x28 | 0x88 | 0x0a | 0x2a | 0x8a => {
                let (lba, count) = match op {
                    0x08 | 0x0a => {
                        let n = usize::from(cdb[4]);
                        (
                            u64::from(be32(&[0, cdb[1] & 0x1f, cdb[2], cdb[3]]) as u32),
                            if n == 0 { 256 } else { n },
                        )
                    }
                    0x28 | 0x2a => (u64::from(be32(&cdb[2..6]) as u32), be16(&cdb[7..9])),
                    _ => (be64(&cdb[2..10]), be32(&cdb[10..14])),
                };
                let write = matches!(op, 0x0a | 0x2a | 0x8a);
                self.transfer(lun, lba, count, write, reader, out)
            }
            _ => Outcome::Check(INVALID_OPCODE),
        }
    }

    fn transfer(
        &mut self,
        lun: usize,
        lba: u64,
        count: usize,
        write: bool,
        reader: &mut Reader<'_>,
        out: &mut Writer<'_>,
    ) -> Outcome {
        let disk = &mut self.luns[lun].0;
        let blocks = disk.size() / SECTOR;
        if lba.checked_add(count as u64).is_none_or(|end| end > blocks) {
            return Outcome::Check(LBA_OUT_OF_RANGE);
        }
        let len = count * SECTOR as usize;
        let have = if write {
            reader.available_bytes()
        } else {
            out.available_bytes()
        };
        if have < len {
            return Outcome::Check(INVALID_FIELD);
        }
        let mut offset = lba * SECTOR;
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            if write {
                if reader.read_exact(&mut buf[..n]).is_err()
                    || disk.write_at(&buf[..n], offset).is_err()
                {
                    return Outcome::Check(WRITE_ERROR);
                }
            } else if disk.read_at(&mut buf[..n], offset).is_err()
                || out.write_all(&buf[..n]).is_err()
            {
                return Outcome::Check(READ_ERROR);
            }
            offset += n as u64;
            left -= n;
        }
        Outcome::Good
    }

    fn inquiry(&self, lun: usize, cdb: &[u8], out: &mut Writer<'_>) -> Outcome {
        let alloc = be16(&cdb[3..5]);
        if cdb[1] & 1 == 0 {
            if cdb[2] != 0 {
                return Outcome::Check(INVALID_FIELD);
            }
            return reply(out, &standard_inquiry(), alloc);
        }
        let serial = self.luns[lun].1.as_bytes();
        let page = cdb[2];
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => serial.to_vec(),
            0x83 => {
                // One T10 vendor-id designator: vendor, then the serial.
                let mut id = b"VMSHIFT ".to_vec();
                id.extend_from_slice(serial);
                let mut d = vec![0x02, 0x01, 0x00, id.len() as u8];
                d.extend_from_slice(&id);
                d
            }
            0xb0 => {
                let mut d = vec![0u8; 0x3c];
                // Maximum transfer length (blocks) and optimal granularity.
                d[4..8].copy_from_slice(&((CHUNK as u32) / SECTOR as u32 * 4).to_be_bytes());
                d
            }
            0xb1 => {
                let mut d = vec![0u8; 0x3c];
                d[1] = 1; // non-rotating medium
                d
            }
            0xb2 => vec![0u8; 4],
            _ => return Outcome::Check(INVALID_FIELD),
        };
        let mut d = vec![0, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        reply(out, &d, alloc)
    }

    fn report_luns(&self, cdb: &[u8], out: &mut Writer<'_>) -> Outcome {
        let mut d = vec![0u8; 8];
        d[..4].copy_from_slice(&((self.luns.len() * 8) as u32).to_be_bytes());
        for lun in 0..self.luns.len() {
            let mut e = [0u8; 8];
            if lun < 256 {
                e[1] = lun as u8;
            } else {
                e[0] = 0x40 | (lun >> 8) as u8;
                e[1] = lun as u8;
            }
            d.extend_from_slice(&e);
        }
        reply(out, &d, be32(&cdb[6..10]))
    }
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Writes at most `alloc` bytes of `data` into the data-in buffer.
fn reply(out: &mut Writer<'_>, data: &[u8], alloc: usize) -> Outcome {
    let n = data.len().min(alloc).min(out.available_bytes());
    match out.write_all(&data[..n]) {
        Ok(()) => Outcome::Good,
        Err(_) => Outcome::Check(INVALID_FIELD),
    }
}

fn standard_inquiry() -> [u8; 36] {
    let mut d = [0u8; 36];
    d[0] = 0x00; // direct-access block device
    d[2] = 0x05; // SPC-3
    d[3] = 0x02; // response data format
    d[4] = 31; // additional length
    d[7] = 0x02; // command queueing
    d[8..16].copy_from_slice(b"VMSHIFT ");
    d[16..32].copy_from_slice(b"VIRTUAL DISK    ");
    d[32..36].copy_from_slice(b"0001");
    d
}

/// Fixed-format sense data.
fn fixed_sense(s: Sense) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[0] = 0x70;
    d[2] = s.0;
    d[7] = 10;
    d[12] = s.1;
    d[13] = s.2;
    d
}

/// MODE SENSE(6)/(10): no block descriptors; the caching page (write
/// cache enabled, so the guest sends SYNCHRONIZE CACHE) for page 0x08 or
/// 0x3f.
fn mode_sense(cdb: &[u8], out: &mut Writer<'_>) -> Outcome {
    let page = cdb[2] & 0x3f;
    let pages: Vec<u8> = match page {
        0x08 | 0x3f => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            p[2] = 0x04; // WCE
            p
        }
        _ => return Outcome::Check(INVALID_FIELD),
    };
    if cdb[0] == 0x1a {
        let mut d = vec![(3 + pages.len()) as u8, 0, 0, 0];
        d.extend_from_slice(&pages);
        reply(out, &d, usize::from(cdb[4]))
    } else {
        let mut d = vec![0u8; 8];
        d[..2].copy_from_slice(&((6 + pages.len()) as u16).to_be_bytes());
        d.extend_from_slice(&pages);
        reply(out, &d, be16(&cdb[7..9]))
    }
}

impl VirtioDevice for Scsi {
    fn device_id(&self) -> u16 {
        8
    }

    fn pci_class(&self) -> u32 {
        0x01_00_00
    }

    fn features(&self) -> u64 {
        super::F_VERSION_1
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // control, event, one request queue
        vec![QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 36];
        let put =
            |c: &mut [u8; 36], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut c, 0, 1); // num_queues
        put(&mut c, 4, u32::from(QUEUE_SIZE) - 2); // seg_max
        put(&mut c, 8, (CHUNK as u32 / SECTOR as u32) * 4); // max_sectors
        put(&mut c, 12, u32::from(QUEUE_SIZE)); // cmd_per_lun
        put(&mut c, 16, 0); // event_info_size
        put(&mut c, 20, self.sense_size);
        put(&mut c, 24, self.cdb_size);
        c[28..30].copy_from_slice(&0u16.to_le_bytes()); // max_channel
        c[30..32].copy_from_slice(&0u16.to_le_bytes()); // max_target
        put(&mut c, 32, self.luns.len().saturating_sub(1) as u32); // max_lun
        super::read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match offset {
            20 if v <= MAX_SENSE => self.sense_size = v,
            24 if (6..=MAX_CDB).contains(&v) => self.cdb_size = v,
            _ => {}
        }
    }

    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        // The event queue holds buffers for events this device never
        // raises.
        if index == 1 {
            return false;
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = if index == 0 {
                control(chain, mem)
            } else {
                self.request(chain, mem)
            };
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn reset(&mut self) {
        self.sense_size = 96;
        self.cdb_size = 32;
    }
}

/// A control-queue request: task management functions complete at once
/// (every command completes synchronously, so nothing is ever in flight);
/// asynchronous-notification queries report no events.
fn control(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) = (
        Reader::new(mem, chain.clone()),
        Writer::<()>::new(mem, chain),
    ) else {
        return 0;
    };
    let mut kind = [0u8; 4];
    if reader.read_exact(&mut kind).is_err() {
        return 0;
    }
    let resp: &[u8] = match u32::from_le_bytes(kind) {
        0 => &[0],                 // TMF: FUNCTION COMPLETE
        1 | 2 => &[0, 0, 0, 0, 0], // AN query/subscribe: no events, OK
        _ => &[9],                 // FAILURE
    };
    let n = resp.len().min(writer.available_bytes());
    let _ = writer.write_all(&resp[..n]);
    writer.bytes_written() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{image, GuestQueue};
    use vm_memory::{Bytes, GuestAddress};

    fn scsi(luns: usize) -> (Vec<tempfile::NamedTempFile>, Scsi) {
        let mut files = Vec::new();
        let mut disks = Vec::new();
        for i in 0..luns {
            let data: Vec<u8> = (0..65536u32).map(|b| (b as u8) ^ (i as u8)).collect();
            let (f, r) = image(&data);
            files.push(f);
            disks.push((OverlayDisk::new(r, 1 << 20), format!("disk{i}")));
        }
        (files, Scsi::new(disks))
    }

    /// Sends a command to target 0 `lun`; returns (response bytes, data-in).
    fn cmd(
        dev: &mut Scsi,
        g: &mut GuestQueue,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: u32,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut req = vec![0u8; 51];
        req[0] = 1;
        req[3] = lun;
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        let r = g.alloc(51);
        g.mem.write_slice(&req, GuestAddress(r)).unwrap();
        let mut descs = vec![(r, 51, false)];
        if !data_out.is_empty() {
            let o = g.alloc(data_out.len() as u32);
            g.mem.write_slice(data_out, GuestAddress(o)).unwrap();
            descs.push((o, data_out.len() as u32, false));
        }
        let resp = g.alloc(108);
        descs.push((resp, 108, true));
        let din = g.alloc(data_in.max(1));
        if data_in > 0 {
            descs.push((din, data_in, true));
        }
        g.push(&descs);
        dev.process(2, &mut g.queue, &g.mem);
        let mut rb = vec![0u8; 108];
        g.mem.read_slice(&mut rb, GuestAddress(resp)).unwrap();
        let mut db = vec![0u8; data_in as usize];
        g.mem.read_slice(&mut db, GuestAddress(din)).unwrap();
        (rb, db)
    }

    #[test]
    fn inquiry_and_vpd_pages() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let (r, d) = cmd(&mut dev, &mut g, 0, &[0x12, 0, 0, 0, 96, 0], &[], 96);
        assert_eq!((r[10], r[11]), (GOOD, S_OK));
        assert_eq!(&d[8..16], b"VMSHIFT ");
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), 96 - 36);
        let (_, d) = cmd(&mut dev, &mut g, 0, &[0x12, 1, 0, 0, 64, 0], &[], 64);
        assert_eq!(&d[4..10], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        let (_, d) = cmd(&mut dev, &mut g, 0, &[0x12, 1, 0x80, 0, 64, 0], &[], 64);
        assert_eq!(&d[4..9], b"disk0");
    }

    #[test]
    fn report_luns_lists_every_disk() {
        let (_f, mut dev) = scsi(3);
        let mut g = GuestQueue::new();
        let (r, d) = cmd(
            &mut dev,
            &mut g,
            0,
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[],
            256,
        );
        assert_eq!(r[10], GOOD);
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 24);
        assert_eq!(d[8 + 8 + 1], 1);
        assert_eq!(d[8 + 16 + 1], 2);
    }

    #[test]
    fn read_capacity_10_and_16() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let (_, d) = cmd(
            &mut dev,
            &mut g,
            0,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
            8,
        );
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 127);
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 512);
        let mut c16 = [0u8; 16];
        c16[0] = 0x9e;
        c16[1] = 0x10;
        c16[13] = 32;
        let (_, d) = cmd(&mut dev, &mut g, 0, &c16, &[], 32);
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 127);
    }

    #[test]
    fn read10_reads_the_lun_it_names() {
        let (_f, mut dev) = scsi(2);
        let mut g = GuestQueue::new();
        let (r, d) = cmd(
            &mut dev,
            &mut g,
            1,
            &[0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0],
            &[],
            512,
        );
        assert_eq!(r[10], GOOD);
        let want: Vec<u8> = (1024..1536u32).map(|b| (b as u8) ^ 1).collect();
        assert_eq!(d, want);
    }

    #[test]
    fn write16_then_read16_round_trips() {
        let (f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let mut w = [0u8; 16];
        w[0] = 0x8a;
        w[9] = 5;
        w[13] = 1;
        let (r, _) = cmd(&mut dev, &mut g, 0, &w, &[0xee; 512], 0);
        assert_eq!(r[10], GOOD);
        let mut rd = w;
        rd[0] = 0x88;
        let (_, d) = cmd(&mut dev, &mut g, 0, &rd, &[], 512);
        assert_eq!(d, vec![0xee; 512]);
        let orig: Vec<u8> = (0..65536u32).map(|b| b as u8).collect();
        assert_eq!(std::fs::read(f[0].path()).unwrap(), orig);
    }

    #[test]
    fn lba_out_of_range_is_check_condition() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let (r, _) = cmd(
            &mut dev,
            &mut g,
            0,
            &[0x28, 0, 0, 0, 0, 127, 0, 0, 2, 0],
            &[],
            1024,
        );
        assert_eq!(r[10], CHECK_CONDITION);
        assert_eq!((r[12 + 2], r[12 + 12]), (ILLEGAL_REQUEST, 0x21));
        // An LBA + count that overflows u64.
        let mut c = [0xffu8; 16];
        c[0] = 0x88;
        c[1] = 0;
        let (r, _) = cmd(&mut dev, &mut g, 0, &c, &[], 512);
        assert_eq!(r[10], CHECK_CONDITION);
    }

    #[test]
    fn unknown_opcode_is_illegal_request() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let (r, _) = cmd(&mut dev, &mut g, 0, &[0xd7, 0, 0, 0, 0, 0], &[], 16);
        assert_eq!(r[10], CHECK_CONDITION);
        assert_eq!((r[12 + 2], r[12 + 12]), (ILLEGAL_REQUEST, 0x20));
        assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), 18);
    }

    #[test]
    fn missing_lun_and_other_target() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let (r, d) = cmd(&mut dev, &mut g, 5, &[0x12, 0, 0, 0, 36, 0], &[], 36);
        assert_eq!(r[10], GOOD);
        assert_eq!(d[0], 0x7f);
        let (r, _) = cmd(&mut dev, &mut g, 5, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!(r[10], CHECK_CONDITION);
        // Target 1 does not exist.
        let mut req = vec![0u8; 51];
        req[0] = 1;
        req[1] = 1;
        let a = g.alloc(51);
        g.mem.write_slice(&req, GuestAddress(a)).unwrap();
        let resp = g.alloc(108);
        g.push(&[(a, 51, false), (resp, 108, true)]);
        dev.process(2, &mut g.queue, &g.mem);
        let mut rb = [0u8; 12];
        g.mem.read_slice(&mut rb, GuestAddress(resp)).unwrap();
        assert_eq!(rb[11], S_BAD_TARGET);
    }

    #[test]
    fn short_response_buffer_is_dropped() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let a = g.alloc(51);
        let resp = g.alloc(8);
        g.push(&[(a, 51, false), (resp, 8, true)]);
        dev.process(2, &mut g.queue, &g.mem);
        assert_eq!(g.used_len(0), 0);
    }

    #[test]
    fn a_six_byte_cdb_size_does_not_cut_a_16_byte_command() {
        let (_f, mut dev) = scsi(1);
        dev.write_config(24, &6u32.to_le_bytes());
        let mut g = GuestQueue::new();
        // A 25-byte request header: lun, id, attributes, 6 CDB bytes.
        let mut req = vec![0u8; 25];
        req[0] = 1;
        req[19] = 0x88; // READ(16), cut after its 6th byte
        let a = g.alloc(25);
        g.mem.write_slice(&req, GuestAddress(a)).unwrap();
        let resp = g.alloc(108);
        g.push(&[(a, 25, false), (resp, 108, true)]);
        dev.process(2, &mut g.queue, &g.mem);
        let mut rb = [0u8; 12];
        g.mem.read_slice(&mut rb, GuestAddress(resp)).unwrap();
        // Zero blocks at LBA 0: nothing to transfer, GOOD.
        assert_eq!((rb[10], rb[11]), (GOOD, S_OK));
    }

    #[test]
    fn mode_sense_caching_page() {
        let (_f, mut dev) = scsi(1);
        let mut g = GuestQueue::new();
        let (r, d) = cmd(&mut dev, &mut g, 0, &[0x1a, 0, 0x3f, 0, 192, 0], &[], 192);
        assert_eq!(r[10], GOOD);
        assert_eq!(d[0], 23);
        assert_eq!((d[4], d[6] & 4), (0x08, 4));
    }
}
