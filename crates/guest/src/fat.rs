//! A read-only FAT12/16/32 reader (EFI system partitions, boot floppies),
//! written here: the `fatfs` crate wants read+write+seek even to read and
//! panics on some malformed images.
//!
//! Every number from the image is checked before it is used: the BPB's
//! geometry against the partition, cluster numbers against the cluster
//! count, a cluster chain's length against the clusters there are (a loop
//! ends there), a file's size against its chain.

use std::sync::Arc;

use crate::vfs::{Device, Entry, EntryKind, FsInfo, FsKind, GuestFs};
use crate::{Error, Result};

/// A FAT file system in `[start, start + len)` of an image.
#[derive(Debug)]
pub struct Fat {
    image: Arc<dyn Device>,
    start: u64,
    info: FsInfo,
    cluster_bytes: u64,
    fat_offset: u64,
    /// FAT12/16: the fixed root directory (offset, bytes); FAT32: none.
    root_fixed: Option<(u64, u64)>,
    root_cluster: u32,
    data_offset: u64,
    clusters: u32,
    bits: u32,
}

/// One directory entry as stored: its name (long if it has one), the
/// short name, attributes, first cluster, size and modification time.
#[derive(Debug, Clone)]
struct Raw {
    name: String,
    short: String,
    attr: u8,
    cluster: u32,
    size: u32,
    mtime: (u16, u16),
}

const ATTR_DIR: u8 = 0x10;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_LFN: u8 = 0x0f;

/// True when `boot` (the first sector) looks like a FAT boot sector whose
/// BPB is consistent.
pub fn probe(boot: &[u8]) -> bool {
    boot.len() >= 512 && Geometry::parse(boot, u64::MAX).is_ok()
}

/// The BPB's numbers, checked.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    bps: u64,
    spc: u64,
    reserved: u64,
    fats: u64,
    root_entries: u64,
    fat_sectors: u64,
    total_sectors: u64,
    root_cluster: u32,
    clusters: u32,
    bits: u32,
}

impl Geometry {
    fn parse(b: &[u8], len: u64) -> std::result::Result<Geometry, String> {
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
        let u32_at = |o: usize| u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]));
        if b[510] != 0x55 || b[511] != 0xaa {
            return Err("no boot sector signature (55 aa)".into());
        }
        if !matches!(b[0], 0xeb | 0xe9) {
            return Err("no jump instruction at the start of the boot sector".into());
        }
        let bps = u16_at(11);
        if !matches!(bps, 512 | 1024 | 2048 | 4096) {
            return Err(format!(
                "bytes per sector is {bps}, not 512, 1024, 2048 or 4096"
            ));
        }
        let spc = u64::from(b[13]);
        if !spc.is_power_of_two() || spc > 128 {
            return Err(format!(
                "sectors per cluster is {spc}, not a power of two up to 128"
            ));
        }
        let reserved = u16_at(14);
        let fats = u64::from(b[16]);
        if reserved == 0 || fats == 0 || fats > 4 {
            return Err(format!("{reserved} reserved sectors and {fats} FATs"));
        }
        let root_entries = u16_at(17);
        let total_sectors = match u16_at(19) {
            0 => u32_at(32),
            n => n,
        };
        let fat_sectors = match u16_at(22) {
            0 => u32_at(36),
            n => n,
        };
        if total_sectors == 0 || fat_sectors == 0 {
            return Err("the BPB gives no size or no FAT size".into());
        }
        if total_sectors.saturating_mul(bps) > len {
            return Err(format!(
                "{total_sectors} sectors of {bps} bytes do not fit the {len}-byte partition"
            ));
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let meta = reserved + fats * fat_sectors + root_sectors;
        if meta >= total_sectors {
            return Err("the FATs and root directory fill the whole volume".into());
        }
        let clusters = (total_sectors - meta) / spc;
        let bits = if clusters < 4085 {
            12
        } else if clusters < 65525 {
            16
        } else {
            32
        };
        if bits == 32 && root_entries != 0 {
            return Err("a FAT32 volume with a fixed root directory".into());
        }
        if bits != 32 && root_entries == 0 {
            return Err("a FAT12/16 volume without a root directory".into());
        }
        // The FAT must hold an entry for every cluster.
        if fat_sectors * bps * 8 / u64::from(bits) < clusters + 2 {
            return Err(format!(
                "a FAT of {fat_sectors} sectors cannot map {clusters} clusters"
            ));
        }
        let clusters = u32::try_from(clusters).map_err(|_| "too many clusters".to_string())?;
        let root_cluster = if bits == 32 { u32_at(44) as u32 } else { 0 };
        if bits == 32 && !(2..clusters + 2).contains(&root_cluster) {
            return Err(format!(
                "the root directory's cluster {root_cluster} is not on the volume"
            ));
        }
        Ok(Geometry {
            bps,
            spc,
            reserved,
            fats,
            root_entries,
            fat_sectors,
            total_sectors,
            root_cluster,
            clusters,
            bits,
        })
    }
}

fn err(place: &str, msg: impl Into<String>) -> Error {
    Error::fs(place, msg)
}

impl Fat {
    /// Opens the FAT file system at `[start, start + len)`.
    pub fn open(
        image: Arc<dyn Device>,
        start: u64,
        len: u64,
        place: String,
        partition: Option<u32>,
    ) -> Result<Fat> {
        let mut boot = [0u8; 512];
        image.read_at(&mut boot, start)?;
        let g = Geometry::parse(&boot, len)
            .map_err(|m| err(&place, format!("FAT boot sector: {m}")))?;
        let (serial_at, label_at) = if g.bits == 32 { (67, 71) } else { (39, 43) };
        let has_ext = boot[serial_at - 1] == 0x29;
        let uuid = has_ext.then(|| {
            let s = u32::from_le_bytes(boot[serial_at..serial_at + 4].try_into().expect("4 bytes"));
            format!("{:04X}-{:04X}", s >> 16, s & 0xffff)
        });
        let kind = match g.bits {
            12 => FsKind::Fat12,
            16 => FsKind::Fat16,
            _ => FsKind::Fat32,
        };
        let boot_label = has_ext
            .then(|| label_text(&boot[label_at..label_at + 11]))
            .flatten();
        let root_sectors = (g.root_entries * 32).div_ceil(g.bps);
        let fat_offset = g.reserved * g.bps;
        let root_offset = (g.reserved + g.fats * g.fat_sectors) * g.bps;
        let mut fat = Fat {
            image,
            start,
            info: FsInfo {
                kind,
                uuid,
                label: boot_label,
                size: g.total_sectors * g.bps,
                place,
                partition,
                partuuid: None,
                note: None,
            },
            cluster_bytes: g.spc * g.bps,
            fat_offset,
            root_fixed: (g.bits != 32).then_some((root_offset, g.root_entries * 32)),
            root_cluster: g.root_cluster,
            data_offset: root_offset + root_sectors * g.bps,
            clusters: g.clusters,
            bits: g.bits,
        };
        // The label in the root directory wins over the boot sector's, as
        // blkid and mlabel read it.
        if let Ok(raw) = fat.raw_root() {
            if let Some(l) = raw
                .iter()
                .find(|e| e.attr & ATTR_VOLUME != 0 && e.attr != ATTR_LFN)
            {
                fat.info.label = Some(l.short.clone()).filter(|s| !s.is_empty());
            }
        }
        Ok(fat)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image.read_at(buf, self.start + offset)?;
        Ok(())
    }

    /// The FAT entry of cluster `n`.
    fn next(&self, n: u32) -> Result<u32> {
        let at = match self.bits {
            12 => u64::from(n) * 3 / 2,
            16 => u64::from(n) * 2,
            _ => u64::from(n) * 4,
        };
        let mut b = [0u8; 4];
        let len = if self.bits == 32 { 4 } else { 2 };
        self.read(&mut b[..len], self.fat_offset + at)?;
        Ok(match self.bits {
            12 => {
                let v = u32::from(u16::from_le_bytes([b[0], b[1]]));
                if n & 1 == 1 {
                    v >> 4
                } else {
                    v & 0xfff
                }
            }
            16 => u32::from(u16::from_le_bytes([b[0], b[1]])),
            _ => u32::from_le_bytes(b) & 0x0fff_ffff,
        })
    }

    fn end_of_chain(&self, v: u32) -> bool {
        match self.bits {
            12 => v >= 0xff8,
            16 => v >= 0xfff8,
            _ => v >= 0x0fff_fff8,
        }
    }

    /// The clusters of the chain starting at `first`, at most `max` of
    /// them (a longer chain, a loop, or a cluster off the volume is an
    /// error naming it).
    fn chain(&self, first: u32, max: u64, what: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut n = first;
        loop {
            if !(2..self.clusters + 2).contains(&n) {
                return Err(err(
                    &self.info.place,
                    format!(
                        "{what}: cluster {n} is not on the volume (2 to {})",
                        self.clusters + 1
                    ),
                ));
            }
            if out.len() as u64 >= max.min(u64::from(self.clusters)) {
                return Err(err(
                    &self.info.place,
                    format!("{what}: its cluster chain is longer than it can be (a loop in the FAT?) at cluster {n}"),
                ));
            }
            out.push(n);
            let v = self.next(n)?;
            if self.end_of_chain(v) {
                return Ok(out);
            }
            n = v;
        }
    }

    fn cluster_offset(&self, n: u32) -> u64 {
        self.data_offset + u64::from(n - 2) * self.cluster_bytes
    }

    /// The bytes of a directory: the fixed root, or a cluster chain.
    fn dir_bytes(&self, cluster: u32, what: &str) -> Result<Vec<u8>> {
        if cluster == 0 {
            if let Some((off, len)) = self.root_fixed {
                let mut buf = vec![0u8; len as usize];
                self.read(&mut buf, off)?;
                return Ok(buf);
            }
        }
        let first = if cluster == 0 {
            self.root_cluster
        } else {
            cluster
        };
        // A directory holds at most 65536 entries (2 MiB).
        let max = (2u64 << 20).div_ceil(self.cluster_bytes);
        let chain = self.chain(first, max, what)?;
        let mut buf = vec![0u8; chain.len() * self.cluster_bytes as usize];
        for (i, c) in chain.iter().enumerate() {
            let at = i * self.cluster_bytes as usize;
            self.read(
                &mut buf[at..at + self.cluster_bytes as usize],
                self.cluster_offset(*c),
            )?;
        }
        Ok(buf)
    }

    fn raw_root(&self) -> Result<Vec<Raw>> {
        let bytes = self.dir_bytes(0, "the root directory")?;
        Ok(parse_dir(&bytes))
    }

    /// The entries of the directory at `path` (and its first cluster).
    fn lookup_dir(&self, path: &str) -> Result<Vec<Raw>> {
        let mut entries = self.raw_root()?;
        let mut walked = String::new();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            walked.push('/');
            walked.push_str(part);
            let e = find(&entries, part).ok_or_else(|| {
                err(
                    &self.info.place,
                    format!("{walked}: no such file or directory"),
                )
            })?;
            if e.attr & ATTR_DIR == 0 {
                return Err(err(&self.info.place, format!("{walked}: not a directory")));
            }
            entries = if e.cluster == 0 {
                self.raw_root()?
            } else {
                parse_dir(&self.dir_bytes(e.cluster, &walked)?)
            };
        }
        Ok(entries)
    }

    fn lookup(&self, path: &str) -> Result<Option<Raw>> {
        let path = path.trim_end_matches('/');
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", path),
        };
        if name.is_empty() || name == "." {
            return Ok(None); // the root
        }
        let entries = self.lookup_dir(dir)?;
        find(&entries, name).cloned().map(Some).ok_or_else(|| {
            err(
                &self.info.place,
                format!("{path}: no such file or directory"),
            )
        })
    }
}

/// The entry called `name`, by its long or short name, without regard to
/// case (as FAT compares them).
fn find<'a>(entries: &'a [Raw], name: &str) -> Option<&'a Raw> {
    entries.iter().find(|e| {
        e.attr & ATTR_VOLUME == 0
            && (e.name.eq_ignore_ascii_case(name) || e.short.eq_ignore_ascii_case(name))
    })
}

fn label_text(b: &[u8]) -> Option<String> {
    let s: String = b.iter().map(|&c| c as char).collect();
    let s = s.trim_end().to_string();
    (!s.is_empty() && s != "NO NAME").then_some(s)
}

/// A short name as stored (8.3, padded with spaces), with the lower-case
/// flags of byte 12 applied.
fn short_name(e: &[u8]) -> String {
    let mut base: Vec<u8> = e[0..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xe5;
    }
    let ext = &e[8..11];
    let case = e[12];
    let text = |b: &[u8], lower: bool| -> String {
        let s: String = b
            .iter()
            .map(|&c| c as char)
            .collect::<String>()
            .trim_end()
            .to_string();
        if lower {
            s.to_lowercase()
        } else {
            s
        }
    };
    let b = text(&base, case & 0x08 != 0);
    let x = text(ext, case & 0x10 != 0);
    if x.is_empty() {
        b
    } else {
        format!("{b}.{x}")
    }
}

fn lfn_checksum(short: &[u8]) -> u8 {
    short[..11]
        .iter()
        .fold(0u8, |sum, &c| sum.rotate_right(1).wrapping_add(c))
}

/// The live entries of a directory's bytes, with long names joined.
fn parse_dir(bytes: &[u8]) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
    let mut lfn_sum = None;
    for e in bytes.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0xe5 => {
                lfn.clear();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3f == ATTR_LFN {
            let ord = e[0] & 0x1f;
            if e[0] & 0x40 != 0 {
                lfn.clear();
                lfn_sum = Some(e[13]);
            }
            let mut part = [0u16; 13];
            let idx = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
            for (k, &o) in idx.iter().enumerate() {
                part[k] = u16::from_le_bytes([e[o], e[o + 1]]);
            }
            lfn.push((ord, part));
            continue;
        }
        let short = short_name(e);
        let mut name = short.clone();
        if !lfn.is_empty() && lfn_sum == Some(lfn_checksum(e)) {
            lfn.sort_by_key(|(o, _)| *o);
            let units: Vec<u16> = lfn
                .iter()
                .flat_map(|(_, p)| p.iter().copied())
                .take_while(|&u| u != 0)
                .collect();
            name = String::from_utf16_lossy(&units);
        }
        lfn.clear();
        lfn_sum = None;
        if name == "." || name == ".." {
            continue;
        }
        let hi = u32::from(u16::from_le_bytes([e[20], e[21]]));
        let lo = u32::from(u16::from_le_bytes([e[26], e[27]]));
        out.push(Raw {
            name,
            short,
            attr,
            cluster: hi << 16 | lo,
            size: u32::from_le_bytes([e[28], e[29], e[30], e[31]]),
            mtime: (
                u16::from_le_bytes([e[24], e[25]]),
                u16::from_le_bytes([e[22], e[23]]),
            ),
        });
    }
    out
}

/// Seconds since the epoch of a FAT date and time (local time, as stored).
fn fat_time((date, time): (u16, u16)) -> i64 {
    let (y, m, d) = (
        1980 + i64::from(date >> 9),
        i64::from((date >> 5) & 0xf).max(1),
        i64::from(date & 0x1f).max(1),
    );
    // Days from civil (Howard Hinnant's algorithm).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400
        + i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3f) * 60
        + i64::from(time & 0x1f) * 2
}

fn entry(e: &Raw) -> Entry {
    Entry {
        name: e.name.clone(),
        kind: if e.attr & ATTR_DIR != 0 {
            EntryKind::Dir
        } else {
            EntryKind::File
        },
        size: if e.attr & ATTR_DIR != 0 {
            0
        } else {
            u64::from(e.size)
        },
        mode: if e.attr & ATTR_DIR != 0 {
            0o040755
        } else {
            0o100755
        },
        mtime: fat_time(e.mtime),
    }
}

impl GuestFs for Fat {
    fn info(&self) -> &FsInfo {
        &self.info
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        Ok(self
            .lookup_dir(path)?
            .iter()
            .filter(|e| e.attr & ATTR_VOLUME == 0)
            .map(entry)
            .collect())
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        Ok(match self.lookup(path)? {
            Some(e) => entry(&e),
            None => Entry {
                name: "/".into(),
                kind: EntryKind::Dir,
                size: 0,
                mode: 0o040755,
                mtime: 0,
            },
        })
    }

    fn read_to(&self, path: &str, max: u64, out: &mut dyn std::io::Write) -> Result<u64> {
        let e = self
            .lookup(path)?
            .ok_or_else(|| err(&self.info.place, format!("{path}: is a directory")))?;
        if e.attr & ATTR_DIR != 0 {
            return Err(err(&self.info.place, format!("{path}: is a directory")));
        }
        let size = u64::from(e.size);
        if size > max {
            return Err(err(
                &self.info.place,
                format!("{path} is {size} bytes, more than the {max} read"),
            ));
        }
        if size == 0 {
            return Ok(0);
        }
        let need = size.div_ceil(self.cluster_bytes);
        let chain = self.chain(e.cluster, need, path)?;
        if (chain.len() as u64) < need {
            return Err(err(
                &self.info.place,
                format!(
                    "{path}: {size} bytes, but its cluster chain holds only {}",
                    chain.len() as u64 * self.cluster_bytes
                ),
            ));
        }
        let mut left = size;
        let mut buf = vec![0u8; self.cluster_bytes as usize];
        for c in chain {
            let n = left.min(self.cluster_bytes) as usize;
            self.read(&mut buf[..n], self.cluster_offset(c))?;
            out.write_all(&buf[..n])
                .map_err(|e| err(&self.info.place, format!("{path}: writing: {e}")))?;
            left -= n as u64;
            if left == 0 {
                break;
            }
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic byte stream.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn hostile_boot_sectors_and_directories_never_panic() {
        for seed in 0..20_000u64 {
            let mut b = noise(seed, 512);
            // Half of them look like boot sectors, to reach the checks.
            if seed % 2 == 0 {
                b[0] = 0xeb;
                b[510] = 0x55;
                b[511] = 0xaa;
                b[11..13].copy_from_slice(&512u16.to_le_bytes());
                b[13] = 1 << (seed % 8);
            }
            let _ = Geometry::parse(&b, 1 << 30);
            let _ = parse_dir(&noise(seed, 32 * 64));
        }
    }

    #[test]
    fn short_names_and_checksums() {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(b"BOOTX64 EFI");
        assert_eq!(short_name(&e), "BOOTX64.EFI");
        e[12] = 0x18;
        assert_eq!(short_name(&e), "bootx64.efi");
        e[..11].copy_from_slice(b"README     ");
        e[12] = 0;
        assert_eq!(short_name(&e), "README");
        // The checksum of "FOO     BAR" as the FAT spec computes it.
        let mut sum = 0u8;
        for &c in b"FOO     BAR" {
            sum = (if sum & 1 != 0 { 0x80 } else { 0 }) + (sum >> 1);
            sum = sum.wrapping_add(c);
        }
        assert_eq!(lfn_checksum(b"FOO     BAR"), sum);
    }
}
