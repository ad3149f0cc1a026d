//! A read-only XFS reader (v4 and v5), written here from the on-disk format
//! described in "XFS Algorithms & Data Structures": the superblock, inode
//! location from the inode number, short-form, block, leaf and node
//! directories, extent lists and B+tree extent maps, local and remote
//! symlinks.
//!
//! Every number from the image is checked before it is used: block and
//! inode numbers against the allocation groups, fork sizes against the
//! inode, directory entries against their block, a B+tree's levels and
//! record counts against its node, and each tree block is visited once (a
//! tree that points into itself ends with an error, not a loop). Memory is
//! bounded by the caps below, whatever the image says.

use std::collections::HashSet;
use std::sync::Arc;

use crate::vfs::{Device, Entry, EntryKind, FsInfo, FsKind, GuestFs};
use crate::{Error, Result};

/// The most extents one file's map may have.
const MAX_EXTENTS: usize = vmshift_model::limits::XFS_EXTENTS;
/// The most B+tree blocks read for one file's extent map.
const MAX_TREE_BLOCKS: usize = vmshift_model::limits::XFS_TREE_BLOCKS;
/// The most entries one directory may have.
const MAX_DIR_ENTRIES: usize = vmshift_model::limits::DIR_ENTRIES;
/// The most symlinks followed while resolving one path (Linux: 40).
const MAX_SYMLINK_HOPS: u32 = vmshift_model::limits::SYMLINK_HOPS;
/// The longest symlink target (Linux's PATH_MAX).
const MAX_LINK: u64 = 4096;
/// Directory data lives below this byte offset of the directory; leaf and
/// free-index blocks above it.
const DIR_LEAF_OFFSET: u64 = 32 << 30;

/// CRC-32C (Castagnoli), as XFS v5 checksums its metadata.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// True when the little-endian CRC-32C at `at` of `b` is the checksum of
/// `b` with that field zeroed (how XFS stores it).
fn crc_ok(b: &[u8], at: usize) -> bool {
    let mut c = b.to_vec();
    let stored = u32::from_le_bytes(c[at..at + 4].try_into().expect("4 bytes"));
    c[at..at + 4].fill(0);
    crc32c(&c) == stored
}

/// v5 incompatible features vmshift reads: file types in directory
/// entries, sparse inode chunks, a separate metadata UUID, big
/// timestamps, 64-bit extent counters.
const INCOMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20;
/// v5 incompatible feature: xfs_repair must run before the file system
/// is used (Linux refuses to mount it).
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The geometry the superblock states, checked.
#[derive(Debug, Clone)]
struct Geo {
    block: u64,
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    inopblog: u32,
    inode_size: u64,
    dir_block: u64,
    v5: bool,
    ftype: bool,
    rootino: u64,
}

impl Geo {
    fn parse(sb: &[u8], len: u64) -> std::result::Result<Geo, String> {
        if &sb[0..4] != b"XFSB" {
            return Err("no XFSB magic".into());
        }
        let version = be16(sb, 100);
        let v5 = match version & 0xf {
            4 => false,
            5 => true,
            v => return Err(format!("version {v}; vmshift reads XFS v4 and v5")),
        };
        if !v5 && version & 0x2000 == 0 {
            return Err("a v4 file system without version 2 directories".into());
        }
        let block = u64::from(be32(sb, 4));
        let blocklog = u32::from(sb[120]);
        if !(9..=16).contains(&blocklog) || block != 1 << blocklog {
            return Err(format!(
                "block size {block} (log {blocklog}) is not a power of two from 512 to 65536"
            ));
        }
        let inode_size = u64::from(be16(sb, 104));
        let inodelog = u32::from(sb[122]);
        if !(8..=11).contains(&inodelog) || inode_size != 1 << inodelog || inodelog > blocklog {
            return Err(format!("inode size {inode_size} (log {inodelog})"));
        }
        let inopblog = u32::from(sb[123]);
        if inopblog != blocklog - inodelog {
            return Err(format!(
                "{inopblog} as the log of inodes per block, but blocks hold 2^{}",
                blocklog - inodelog
            ));
        }
        let agblocks = u64::from(be32(sb, 84));
        let agcount = u64::from(be32(sb, 88));
        let agblklog = u32::from(sb[124]);
        if agblocks < 2 || agcount == 0 || agblklog > 31 || agblocks > 1 << agblklog {
            return Err(format!(
                "{agcount} allocation groups of {agblocks} blocks (log {agblklog})"
            ));
        }
        let dblocks = be64(sb, 8);
        if dblocks
            .checked_mul(block)
            .is_none_or(|b| b > len.saturating_add(block))
            || agcount
                .checked_mul(agblocks)
                .is_none_or(|b| b < dblocks.saturating_sub(agblocks))
        {
            return Err(format!(
                "{dblocks} blocks of {block} bytes in {agcount} groups do not fit the {len} bytes there are"
            ));
        }
        let dirblklog = u32::from(sb[192]);
        if blocklog + dirblklog > 16 {
            return Err(format!(
                "directory blocks of 2^{} bytes (at most 64 KiB)",
                blocklog + dirblklog
            ));
        }
        let features2 = be32(sb, 200);
        let incompat = if v5 { be32(sb, 216) } else { 0 };
        if incompat & INCOMPAT_NEEDSREPAIR != 0 {
            return Err("marked as needing repair (run xfs_repair before it is used)".into());
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(format!(
                "incompatible features {:#x} that vmshift does not read",
                incompat & !INCOMPAT_KNOWN
            ));
        }
        if v5 {
            let sect = usize::from(be16(sb, 102));
            if !(512..=sb.len()).contains(&sect) || !crc_ok(&sb[..sect], 224) {
                return Err("checksum mismatch".into());
            }
        }
        if dblocks == 0 || agcount != dblocks.div_ceil(agblocks) {
            return Err(format!(
                "{agcount} allocation groups of {agblocks} blocks, but {dblocks} blocks in all"
            ));
        }
        let ftype = if v5 {
            incompat & 1 != 0
        } else {
            version & 0x8000 != 0 && features2 & 0x200 != 0
        };
        Ok(Geo {
            block,
            agblocks,
            agcount,
            agblklog,
            inopblog,
            inode_size,
            dir_block: block << dirblklog,
            v5,
            ftype,
            rootino: be64(sb, 56),
        })
    }

    /// The byte offset of file-system block `fsb` (AG number and block
    /// within it).
    fn block_offset(&self, fsb: u64) -> Option<u64> {
        let agno = fsb >> self.agblklog;
        let agbno = fsb & ((1u64 << self.agblklog) - 1);
        (agno < self.agcount && agbno < self.agblocks)
            .then(|| (agno * self.agblocks + agbno) * self.block)
    }

    /// The byte offset of inode `ino`.
    fn inode_offset(&self, ino: u64) -> Option<u64> {
        let per_block = self.inopblog;
        let fsb = ino >> per_block;
        let index = ino & ((1u64 << per_block) - 1);
        if ino >> (self.agblklog + per_block) >= self.agcount {
            return None;
        }
        self.block_offset(fsb).map(|b| b + index * self.inode_size)
    }
}

/// One extent of a file: `count` blocks at file block `off`, stored at
/// file-system block `fsb`; unwritten extents read as zeros.
#[derive(Debug, Clone, Copy)]
struct Extent {
    off: u64,
    fsb: u64,
    count: u64,
    unwritten: bool,
}

fn unpack_extent(r: &[u8]) -> Extent {
    let hi = be64(r, 0);
    let lo = be64(r, 8);
    Extent {
        unwritten: hi >> 63 != 0,
        off: (hi >> 9) & ((1 << 54) - 1),
        fsb: ((hi & 0x1ff) << 43) | (lo >> 21),
        count: lo & ((1 << 21) - 1),
    }
}

/// An inode's core fields and data fork.
#[derive(Debug, Clone)]
struct Inode {
    ino: u64,
    mode: u16,
    format: u8,
    size: u64,
    mtime: i64,
    nextents: u64,
    fork: Vec<u8>,
}

impl Inode {
    fn kind(&self) -> EntryKind {
        match self.mode & 0o170000 {
            0o040000 => EntryKind::Dir,
            0o100000 => EntryKind::File,
            0o120000 => EntryKind::Symlink,
            _ => EntryKind::Other,
        }
    }
}

/// An XFS file system in `[start, start + len)` of an image.
#[derive(Debug)]
pub struct Xfs {
    image: Arc<dyn Device>,
    start: u64,
    len: u64,
    info: FsInfo,
    g: Geo,
}

fn err(place: &str, msg: impl Into<String>) -> Error {
    Error::fs(place, msg)
}

/// A directory entry as stored: name, inode number.
type RawEntry = (Vec<u8>, u64);

impl Xfs {
    /// Opens the XFS file system at `[start, start + len)`.
    pub fn open(
        image: Arc<dyn Device>,
        start: u64,
        len: u64,
        place: String,
        partition: Option<u32>,
    ) -> Result<Xfs> {
        if len < 512 {
            return Err(err(&place, "XFS superblock: the partition is too small"));
        }
        // One sector (up to 4 KiB): what its checksum covers.
        let mut sb = vec![0u8; len.min(4096) as usize];
        image.read_at(&mut sb, start)?;
        let g = Geo::parse(&sb, len).map_err(|m| err(&place, format!("XFS superblock: {m}")))?;
        let uuid = crate::vfs::uuid_text(&sb[32..48]);
        let label = crate::vfs::c_string(&sb[108..120]);
        let fs = Xfs {
            image,
            start,
            len,
            info: FsInfo {
                kind: FsKind::Xfs,
                uuid: Some(uuid),
                label,
                size: be64(&sb, 8) * g.block,
                place,
                partition,
                partuuid: None,
                note: None,
            },
            g,
        };
        let root = fs.inode(fs.g.rootino)?;
        if root.kind() != EntryKind::Dir {
            return Err(fs.err(format!(
                "the root inode {} is not a directory",
                fs.g.rootino
            )));
        }
        Ok(fs)
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        err(&self.info.place, msg)
    }

    fn read(&self, buf: &mut [u8], offset: u64, what: &dyn Fn() -> String) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(self.err(format!(
                "{}: {} bytes at {offset} are past the end of the file system ({} bytes)",
                what(),
                buf.len(),
                self.len
            )));
        }
        self.image.read_at(buf, self.start + offset)?;
        Ok(())
    }

    /// Reads `n` bytes of file-system block `fsb` onwards.
    fn read_blocks(&self, fsb: u64, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        let at = self.g.block_offset(fsb).ok_or_else(|| {
            self.err(format!(
                "{}: block {fsb} is outside the allocation groups",
                what()
            ))
        })?;
        self.read(buf, at, what)
    }

    /// Reads and checks inode `ino`.
    fn inode(&self, ino: u64) -> Result<Inode> {
        let at = self
            .g
            .inode_offset(ino)
            .ok_or_else(|| self.err(format!("inode {ino} is outside the allocation groups")))?;
        let mut b = vec![0u8; self.g.inode_size as usize];
        self.read(&mut b, at, &|| format!("inode {ino}"))?;
        if &b[0..2] != b"IN" {
            return Err(self.err(format!("inode {ino} (at {at}): no IN magic")));
        }
        let version = b[4];
        let core = match version {
            1 | 2 if !self.g.v5 => 100,
            3 if self.g.v5 => 176,
            v => {
                return Err(self.err(format!(
                    "inode {ino}: version {v} on an XFS v{} file system",
                    if self.g.v5 { 5 } else { 4 }
                )))
            }
        };
        if version == 3 && (!crc_ok(&b, 100) || be64(&b, 152) != ino) {
            return Err(self.err(format!(
                "inode {ino} (at {at}): checksum mismatch, or it names another inode"
            )));
        }
        let forkoff = usize::from(b[82]) * 8;
        let end = if forkoff == 0 {
            b.len()
        } else {
            core + forkoff
        };
        if end > b.len() {
            return Err(self.err(format!(
                "inode {ino}: the attribute fork offset {forkoff} is past the inode"
            )));
        }
        let flags2 = if version == 3 { be64(&b, 120) } else { 0 };
        let mtime = if flags2 & 0x8 != 0 {
            // Big timestamps: nanoseconds since 1901-12-13.
            (be64(&b, 40) / 1_000_000_000) as i64 - (1i64 << 31)
        } else {
            i64::from(be32(&b, 40) as i32)
        };
        let nextents = if flags2 & 0x10 != 0 {
            be64(&b, 24)
        } else {
            u64::from(be32(&b, 76))
        };
        if be16(&b, 90) & 0x1 != 0 {
            return Err(self.err(format!(
                "inode {ino}: its data is on a realtime device, which vmshift does not read"
            )));
        }
        Ok(Inode {
            ino,
            mode: be16(&b, 2),
            format: b[5],
            size: be64(&b, 56),
            mtime,
            nextents,
            fork: b[core..end].to_vec(),
        })
    }

    /// The extent map of an extents- or B+tree-format inode, in file
    /// order, checked not to overlap.
    fn extents(&self, ino: &Inode) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        match ino.format {
            2 => {
                let n = ino.nextents;
                if n.saturating_mul(16) > ino.fork.len() as u64 {
                    return Err(self.err(format!(
                        "inode {}: {n} extents do not fit its {}-byte data fork",
                        ino.ino,
                        ino.fork.len()
                    )));
                }
                for r in ino.fork.chunks_exact(16).take(n as usize) {
                    out.push(unpack_extent(r));
                }
            }
            3 => {
                let f = &ino.fork;
                if f.len() < 4 + 16 {
                    return Err(self.err(format!("inode {}: B+tree root too small", ino.ino)));
                }
                let level = be16(f, 0);
                let numrecs = usize::from(be16(f, 2));
                let maxrecs = (f.len() - 4) / 16;
                if level == 0 || level > 9 || numrecs == 0 || numrecs > maxrecs {
                    return Err(self.err(format!(
                        "inode {}: extent B+tree root with level {level} and {numrecs} records (at most {maxrecs})",
                        ino.ino
                    )));
                }
                let ptrs = 4 + maxrecs * 8;
                let mut seen = HashSet::new();
                for i in 0..numrecs {
                    let p = be64(f, ptrs + i * 8);
                    self.bmbt(ino.ino, p, level - 1, &mut seen, &mut out)?;
                }
            }
            f => {
                return Err(self.err(format!(
                    "inode {}: data fork format {f} where extents were expected",
                    ino.ino
                )))
            }
        }
        if ino.format == 3 && out.len() as u64 != ino.nextents {
            return Err(self.err(format!(
                "inode {}: its extent B+tree holds {} extents, the inode says {}",
                ino.ino,
                out.len(),
                ino.nextents
            )));
        }
        out.sort_by_key(|e| e.off);
        let mut next = 0u64;
        for e in &out {
            if e.off < next {
                return Err(self.err(format!(
                    "inode {}: extents overlap at file block {}",
                    ino.ino, e.off
                )));
            }
            next = e.off.saturating_add(e.count);
        }
        Ok(out)
    }

    /// Walks one block of an extent B+tree.
    fn bmbt(
        &self,
        ino: u64,
        fsb: u64,
        level: u16,
        seen: &mut HashSet<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        if !seen.insert(fsb) || seen.len() > MAX_TREE_BLOCKS {
            return Err(self.err(format!(
                "inode {ino}: the extent B+tree visits block {fsb} twice, or has more than {MAX_TREE_BLOCKS} blocks"
            )));
        }
        let bs = self.g.block as usize;
        let mut b = vec![0u8; bs];
        self.read_blocks(fsb, &mut b, &|| format!("inode {ino}: extent B+tree block"))?;
        let (magic, hdr): (&[u8], usize) = if self.g.v5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        if &b[0..4] != magic {
            return Err(self.err(format!(
                "inode {ino}: extent B+tree block {fsb} has no {} magic",
                String::from_utf8_lossy(magic)
            )));
        }
        if self.g.v5 && (!crc_ok(&b, 64) || be64(&b, 56) != ino) {
            return Err(self.err(format!(
                "inode {ino}: extent B+tree block {fsb}: checksum mismatch, or another inode owns it"
            )));
        }
        let lvl = be16(&b, 4);
        let numrecs = usize::from(be16(&b, 6));
        let maxrecs = (bs - hdr) / 16;
        if lvl != level || numrecs > maxrecs {
            return Err(self.err(format!(
                "inode {ino}: extent B+tree block {fsb} at level {lvl} with {numrecs} records (expected level {level}, at most {maxrecs} records)"
            )));
        }
        if level == 0 {
            if out.len() + numrecs > MAX_EXTENTS {
                return Err(self.err(format!("inode {ino}: more than {MAX_EXTENTS} extents")));
            }
            for i in 0..numrecs {
                out.push(unpack_extent(&b[hdr + i * 16..hdr + i * 16 + 16]));
            }
        } else {
            let ptrs = hdr + maxrecs * 8;
            for i in 0..numrecs {
                let p = be64(&b, ptrs + i * 8);
                self.bmbt(ino, p, level - 1, seen, out)?;
            }
        }
        Ok(())
    }

    /// Streams bytes `[0, limit)` of a file with extent map `map` into
    /// `out`: holes and unwritten extents as zeros.
    fn stream(
        &self,
        ino: u64,
        map: &[Extent],
        limit: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let bs = self.g.block;
        let chunk = 1u64 << 20;
        let mut buf = vec![0u8; chunk as usize];
        let mut pos = 0u64;
        let zeros = |out: &mut dyn FnMut(&[u8]) -> Result<()>, mut n: u64, buf: &mut [u8]| {
            buf.fill(0);
            while n > 0 {
                let k = n.min(buf.len() as u64);
                out(&buf[..k as usize])?;
                n -= k;
            }
            Ok::<(), Error>(())
        };
        for e in map {
            if pos >= limit {
                break;
            }
            let e_start = e.off.saturating_mul(bs);
            if e_start > pos {
                let n = e_start.min(limit) - pos;
                zeros(out, n, &mut buf)?;
                pos += n;
            }
            let e_end = e_start
                .saturating_add(e.count.saturating_mul(bs))
                .min(limit);
            if e.unwritten {
                if e_end > pos {
                    zeros(out, e_end - pos, &mut buf)?;
                    pos = e_end;
                }
                continue;
            }
            while pos < e_end {
                let n = (e_end - pos).min(chunk);
                let rel = pos - e_start;
                let fsb = e.fsb + rel / bs;
                let within = rel % bs;
                // A read may cross an AG boundary only if the extent does,
                // which a valid extent never does: read block by block runs
                // that stay inside one AG.
                let agbno = fsb & ((1u64 << self.g.agblklog) - 1);
                let room = self.g.agblocks.saturating_sub(agbno) * bs - within;
                let n = n.min(room.max(1));
                let at = self.g.block_offset(fsb).ok_or_else(|| {
                    self.err(format!(
                        "inode {ino}: extent block {fsb} is outside the allocation groups"
                    ))
                })? + within;
                self.read(&mut buf[..n as usize], at, &|| format!("inode {ino}: data"))?;
                out(&buf[..n as usize])?;
                pos += n;
            }
        }
        if pos < limit {
            zeros(out, limit - pos, &mut buf)?;
        }
        Ok(())
    }

    /// Bytes `[off, off + n)` of a file with map `map` (a directory or
    /// symlink block).
    fn read_range(&self, ino: u64, map: &[Extent], off: u64, n: u64) -> Result<Vec<u8>> {
        let bs = self.g.block;
        let mut v = vec![0u8; n as usize];
        let mut done = 0u64;
        while done < n {
            let fb = (off + done) / bs;
            let within = (off + done) % bs;
            let k = (bs - within).min(n - done);
            let e = map
                .iter()
                .find(|e| e.off <= fb && fb < e.off.saturating_add(e.count))
                .ok_or_else(|| self.err(format!("inode {ino}: file block {fb} is not mapped")))?;
            let at = self.g.block_offset(e.fsb + (fb - e.off)).ok_or_else(|| {
                self.err(format!(
                    "inode {ino}: extent block {} is outside the allocation groups",
                    e.fsb + (fb - e.off)
                ))
            })? + within;
            self.read(&mut v[done as usize..(done + k) as usize], at, &|| {
                format!("inode {ino}: directory or link block")
            })?;
            done += k;
        }
        Ok(v)
    }

    /// The entries of directory inode `d` (with `.` and `..` where the
    /// format stores them).
    fn dir_entries(&self, d: &Inode) -> Result<Vec<RawEntry>> {
        let mut out = Vec::new();
        match d.format {
            1 => {
                let f = &d.fork;
                if d.size > f.len() as u64 {
                    return Err(self.err(format!(
                        "directory inode {}: short-form size {} past its {}-byte data fork",
                        d.ino,
                        d.size,
                        f.len()
                    )));
                }
                let end = d.size as usize;
                if end < 6 {
                    return Err(self.err(format!(
                        "directory inode {}: short-form header past its {end} bytes",
                        d.ino
                    )));
                }
                let (count, i8) = if f[1] > 0 {
                    (usize::from(f[1]), true)
                } else {
                    (usize::from(f[0]), false)
                };
                let ino_len = if i8 { 8 } else { 4 };
                let read_ino = |at: usize| {
                    if i8 {
                        be64(f, at)
                    } else {
                        u64::from(be32(f, at))
                    }
                };
                out.push((b"..".to_vec(), read_ino(2)));
                let mut at = 2 + ino_len;
                for _ in 0..count {
                    let bad = || {
                        self.err(format!(
                            "directory inode {}: short-form entry at byte {at} runs past the {end}-byte directory",
                            d.ino
                        ))
                    };
                    if at >= end {
                        return Err(bad());
                    }
                    let namelen = usize::from(f[at]);
                    let size = 3 + namelen + usize::from(self.g.ftype) + ino_len;
                    if namelen == 0 || at + size > end {
                        return Err(bad());
                    }
                    let name = f[at + 3..at + 3 + namelen].to_vec();
                    out.push((name, read_ino(at + size - ino_len)));
                    at += size;
                }
            }
            2 | 3 => {
                let map = self.extents(d)?;
                let dbs = self.g.dir_block;
                let bs = self.g.block;
                let limit = d.size.min(DIR_LEAF_OFFSET);
                let mut blocks = 0u64;
                for e in &map {
                    let first = e.off.saturating_mul(bs);
                    let last = e.off.saturating_add(e.count).saturating_mul(bs).min(limit);
                    let mut at = first.next_multiple_of(dbs);
                    while at < last {
                        blocks += 1;
                        if blocks > limit / dbs + 1 {
                            return Err(self.err(format!(
                                "directory inode {}: more directory blocks than its size holds",
                                d.ino
                            )));
                        }
                        let b = self.read_range(d.ino, &map, at, dbs)?;
                        self.dir_block(d.ino, at, &b, &mut out)?;
                        at += dbs;
                    }
                }
            }
            f => return Err(self.err(format!("directory inode {}: data fork format {f}", d.ino))),
        }
        Ok(out)
    }

    /// The entries of one directory data block (block or data form).
    fn dir_block(&self, ino: u64, at: u64, b: &[u8], out: &mut Vec<RawEntry>) -> Result<()> {
        let hdr = if self.g.v5 { 64 } else { 16 };
        if self.g.v5 && (!crc_ok(b, 4) || be64(b, 40) != ino) {
            return Err(self.err(format!(
                "directory inode {ino}: block at {at}: checksum mismatch, or another inode owns it"
            )));
        }
        let magic = &b[0..4];
        let end = match magic {
            b"XD2B" | b"XDB3" => {
                let count = u64::from(be32(b, b.len() - 8));
                (b.len() as u64)
                    .checked_sub(8 + count * 8)
                    .filter(|&e| e >= hdr as u64)
                    .ok_or_else(|| {
                        self.err(format!(
                            "directory inode {ino}: block at {at} has {count} leaf entries, more than it holds"
                        ))
                    })? as usize
            }
            b"XD2D" | b"XDD3" => b.len(),
            _ => {
                return Err(self.err(format!(
                    "directory inode {ino}: block at {at} has no directory data magic"
                )))
            }
        };
        if (magic == b"XD2B" || magic == b"XD2D") == self.g.v5 {
            return Err(self.err(format!(
                "directory inode {ino}: block at {at} has a v{} magic on a v{} file system",
                if self.g.v5 { 4 } else { 5 },
                if self.g.v5 { 5 } else { 4 }
            )));
        }
        let mut p = hdr;
        while p + 8 <= end {
            let bad = |what: &str| {
                self.err(format!(
                    "directory inode {ino}: block at {at}, entry at {p}: {what}"
                ))
            };
            if be16(b, p) == 0xffff {
                let len = usize::from(be16(b, p + 2));
                if len < 8 || len % 8 != 0 || p + len > end {
                    return Err(bad("unused entry of a bad length"));
                }
                p += len;
                continue;
            }
            let namelen = usize::from(b[p + 8]);
            let size = (8 + 1 + namelen + usize::from(self.g.ftype) + 2).next_multiple_of(8);
            if namelen == 0 || p + size > end {
                return Err(bad("entry runs past the block"));
            }
            // The list holds "." and ".." as well.
            if out.len() >= MAX_DIR_ENTRIES + 2 {
                return Err(bad(&format!(
                    "more than {MAX_DIR_ENTRIES} entries, vmshift's limit for one directory"
                )));
            }
            out.push((b[p + 9..p + 9 + namelen].to_vec(), be64(b, p)));
            p += size;
        }
        Ok(())
    }

    /// The target of symlink inode `l`.
    fn link_target(&self, l: &Inode) -> Result<String> {
        if l.size > MAX_LINK {
            return Err(self.err(format!("symlink inode {}: {} bytes long", l.ino, l.size)));
        }
        let bytes = match l.format {
            1 => l
                .fork
                .get(..l.size as usize)
                .ok_or_else(|| {
                    self.err(format!(
                        "symlink inode {}: {} bytes do not fit its data fork",
                        l.ino, l.size
                    ))
                })?
                .to_vec(),
            _ => {
                let map = self.extents(l)?;
                let hdr = if self.g.v5 { 56 } else { 0 };
                let per = self.g.block - hdr;
                let mut v = Vec::new();
                let mut fb = 0u64;
                while (v.len() as u64) < l.size {
                    let b = self.read_range(l.ino, &map, fb * self.g.block, self.g.block)?;
                    if self.g.v5
                        && (&b[0..4] != b"XSLM" || !crc_ok(&b, 12) || be64(&b, 32) != l.ino)
                    {
                        return Err(self.err(format!(
                            "symlink inode {}: block {fb} has no XSLM magic, a checksum mismatch, or another owner",
                            l.ino
                        )));
                    }
                    let want = (l.size - v.len() as u64).min(per) as usize;
                    v.extend_from_slice(&b[hdr as usize..hdr as usize + want]);
                    fb += 1;
                }
                v
            }
        };
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Finds `path` from the root; symlinks on the way are followed inside
    /// the file system, the last one only when `follow`.
    fn resolve(&self, path: &str, follow: bool) -> Result<Inode> {
        let mut stack = vec![self.g.rootino];
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .rev()
            .map(str::to_string)
            .collect();
        let mut hops = 0u32;
        let mut cur = self.inode(self.g.rootino)?;
        while let Some(name) = todo.pop() {
            if name == ".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                cur = self.inode(*stack.last().expect("root stays"))?;
                continue;
            }
            if cur.kind() != EntryKind::Dir {
                return Err(self.err(format!("{path}: a component is not a directory")));
            }
            let entries = self.dir_entries(&cur)?;
            let ino = entries
                .iter()
                .find(|(n, _)| n.as_slice() == name.as_bytes())
                .map(|(_, i)| *i)
                .ok_or_else(|| self.err(format!("{path}: no such file or directory")))?;
            let next = self.inode(ino)?;
            if next.kind() == EntryKind::Symlink && (follow || !todo.is_empty()) {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(self.err(format!("{path}: more than {MAX_SYMLINK_HOPS} symlinks")));
                }
                let target = self.link_target(&next)?;
                if target.starts_with('/') {
                    stack.truncate(1);
                    cur = self.inode(self.g.rootino)?;
                }
                todo.extend(
                    target
                        .split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .rev()
                        .map(str::to_string),
                );
                continue;
            }
            stack.push(ino);
            cur = next;
        }
        Ok(cur)
    }

    fn entry(&self, name: String, i: &Inode) -> Entry {
        Entry {
            name,
            kind: i.kind(),
            size: i.size,
            mode: u32::from(i.mode),
            mtime: i.mtime,
        }
    }
}

impl GuestFs for Xfs {
    fn info(&self) -> &FsInfo {
        &self.info
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let d = self.resolve(path, true)?;
        if d.kind() != EntryKind::Dir {
            return Err(self.err(format!("{path}: not a directory")));
        }
        let mut out = Vec::new();
        for (name, ino) in self.dir_entries(&d)? {
            if name == b"." || name == b".." {
                continue;
            }
            let i = self.inode(ino)?;
            out.push(self.entry(String::from_utf8_lossy(&name).into_owned(), &i));
        }
        Ok(out)
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let i = self.resolve(path, false)?;
        let name = crate::vfs::base_name(path);
        Ok(self.entry(name, &i))
    }

    fn metadata(&self, path: &str) -> Result<Entry> {
        let i = self.resolve(path, true)?;
        let name = crate::vfs::base_name(path);
        Ok(self.entry(name, &i))
    }

    fn read_to(&self, path: &str, max: u64, out: &mut dyn std::io::Write) -> Result<u64> {
        let i = self.resolve(path, true)?;
        if i.kind() != EntryKind::File {
            return Err(self.err(format!("{path}: not a regular file")));
        }
        if i.size > max {
            return Err(self.err(format!(
                "{path} is {} bytes, more than the {max} read",
                i.size
            )));
        }
        let map = self.extents(&i)?;
        self.stream(i.ino, &map, i.size, &mut |b| {
            out.write_all(b)
                .map_err(|e| self.err(format!("{path}: writing: {e}")))
        })?;
        Ok(i.size)
    }

    fn read_link(&self, path: &str) -> Result<Option<String>> {
        let i = self.resolve(path, false)?;
        if i.kind() != EntryKind::Symlink {
            return Ok(None);
        }
        self.link_target(&i).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_records_unpack_as_the_format_packs_them() {
        // flag 1, startoff 5, startblock 0x1_0000_0003 (crosses the word
        // boundary), blockcount 7.
        let off: u128 = 5;
        let fsb: u128 = 0x1_0000_0003;
        let rec: u128 = (1u128 << 127) | (off << 73) | (fsb << 21) | 7;
        let e = unpack_extent(&rec.to_be_bytes());
        assert!(e.unwritten);
        assert_eq!((e.off, e.fsb, e.count), (5, 0x1_0000_0003, 7));
    }

    #[test]
    fn superblocks_that_do_not_fit_are_refused() {
        let mut sb = vec![0u8; 512];
        sb[0..4].copy_from_slice(b"XFSB");
        sb[4..8].copy_from_slice(&4096u32.to_be_bytes());
        sb[8..16].copy_from_slice(&1000u64.to_be_bytes());
        sb[84..88].copy_from_slice(&1000u32.to_be_bytes());
        sb[88..92].copy_from_slice(&1u32.to_be_bytes());
        sb[100..102].copy_from_slice(&0xb4a5u16.to_be_bytes());
        sb[104..106].copy_from_slice(&512u16.to_be_bytes());
        sb[120] = 12;
        sb[122] = 9;
        sb[123] = 3;
        sb[124] = 10;
        sb[102..104].copy_from_slice(&512u16.to_be_bytes());
        let fix = |b: &mut Vec<u8>| {
            b[224..228].fill(0);
            let c = crc32c(b);
            b[224..228].copy_from_slice(&c.to_le_bytes());
        };
        fix(&mut sb);
        assert!(Geo::parse(&sb, 1000 * 4096).is_ok());
        assert!(
            Geo::parse(&sb, 10 * 4096).is_err(),
            "more blocks than bytes"
        );
        let mut b = sb.clone();
        b[300] ^= 1;
        assert!(Geo::parse(&b, 1000 * 4096).is_err(), "checksum");
        for (incompat, what) in [(0x10u32, "needs repair"), (0x8000_0000, "unknown feature")] {
            let mut b = sb.clone();
            b[216..220].copy_from_slice(&incompat.to_be_bytes());
            fix(&mut b);
            assert!(Geo::parse(&b, 1000 * 4096).is_err(), "{what}");
        }
        let mut b = sb.clone();
        b[8..16].copy_from_slice(&0u64.to_be_bytes());
        fix(&mut b);
        assert!(Geo::parse(&b, 1000 * 4096).is_err(), "no blocks");
        let mut b = sb.clone();
        b[120] = 20;
        fix(&mut b);
        assert!(Geo::parse(&b, 1000 * 4096).is_err(), "block log");
        let mut b = sb.clone();
        b[88..92].copy_from_slice(&0u32.to_be_bytes());
        fix(&mut b);
        assert!(Geo::parse(&b, 1000 * 4096).is_err(), "no AGs");
        let mut b = sb.clone();
        b[124] = 5;
        fix(&mut b);
        assert!(Geo::parse(&b, 1000 * 4096).is_err(), "agblklog too small");
        let mut b = sb.clone();
        b[192] = 8;
        fix(&mut b);
        assert!(Geo::parse(&b, 1000 * 4096).is_err(), "dir blocks > 64 KiB");
    }

    /// A file read as a device, with some 4 KiB blocks replaced.
    #[derive(Debug)]
    struct Patched {
        file: std::fs::File,
        len: u64,
        blocks: std::collections::HashMap<u64, Vec<u8>>,
    }

    impl Device for Patched {
        fn size(&self) -> u64 {
            self.len
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            use std::os::unix::fs::FileExt;
            self.file
                .read_exact_at(buf, offset)
                .map_err(|e| Error::Fs {
                    place: "test".into(),
                    msg: e.to_string(),
                })?;
            let end = offset + buf.len() as u64;
            for blk in offset / 4096..end.div_ceil(4096) {
                if let Some(b) = self.blocks.get(&blk) {
                    let (s, e) = ((blk * 4096).max(offset), ((blk + 1) * 4096).min(end));
                    buf[(s - offset) as usize..(e - offset) as usize]
                        .copy_from_slice(&b[(s - blk * 4096) as usize..(e - blk * 4096) as usize]);
                }
            }
            Ok(())
        }
    }

    /// Lists and reads everything reachable, within bounds.
    fn walk(fs: &Xfs, dir: &str, depth: u32, budget: &mut u32) {
        let Ok(entries) = fs.list(dir) else { return };
        for e in entries {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
            let _ = fs.read_link(&path);
            match e.kind {
                EntryKind::Dir if depth < 6 => walk(fs, &path, depth + 1, budget),
                EntryKind::File => {
                    let _ = fs.read_to(&path, 1 << 24, &mut std::io::sink());
                }
                _ => {}
            }
        }
    }

    #[test]
    fn damaged_metadata_never_panics_or_hangs() {
        // v5 (most damage ends at a checksum) and v4 (none: the parsers
        // themselves meet it).
        damaged(&[], 100);
        damaged(&["-m", "crc=0", "-i", "size=256", "-n", "ftype=0"], 150);
    }

    fn damaged(mkfs: &[&str], cases: u32) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
        std::fs::write(d.join("f"), vec![7u8; 20000]).unwrap();
        for (name, n) in [("s", 3), ("b", 40), ("l", 400)] {
            proto.push_str(&format!("{name} d--755 0 0\n"));
            for i in 0..n {
                proto.push_str(&format!(
                    "file{i:04} ---644 0 0 {}\n",
                    d.join("f").display()
                ));
            }
            proto.push_str(&format!("ln l--777 0 0 ../{name}/file0001\n$\n"));
        }
        proto.push_str("$\n");
        std::fs::write(d.join("proto"), proto).unwrap();
        let img = d.join("x.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(320 << 20).unwrap();
        let out = std::process::Command::new("mkfs.xfs")
            .args(["-q", "-f", "-p"])
            .arg(d.join("proto"))
            .args(mkfs)
            .arg(&img)
            .output()
            .expect("mkfs.xfs (xfsprogs) must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The metadata blocks: those of the first 8 MiB that are not zero.
        let file = std::fs::File::open(&img).unwrap();
        let mut meta = Vec::new();
        {
            use std::os::unix::fs::FileExt;
            let mut b = vec![0u8; 4096];
            for blk in 0..2048u64 {
                file.read_exact_at(&mut b, blk * 4096).unwrap();
                if b.iter().any(|&x| x != 0) {
                    meta.push((blk, b.clone()));
                }
            }
        }
        assert!(meta.len() > 4, "{}", meta.len());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let start = std::time::Instant::now();
        for case in 0..cases {
            let mut blocks = std::collections::HashMap::new();
            for _ in 0..1 + case % 3 {
                let (blk, orig) = &meta[(rnd() % meta.len() as u64) as usize];
                let mut b = blocks.remove(blk).unwrap_or_else(|| orig.clone());
                for _ in 0..1 + rnd() % 8 {
                    let at = (rnd() % 4096) as usize;
                    b[at] = match rnd() % 4 {
                        0 => 0xff,
                        1 => 0,
                        2 => b[at] ^ (1 << (rnd() % 8)),
                        _ => rnd() as u8,
                    };
                }
                blocks.insert(*blk, b);
            }
            let dev: Arc<dyn Device> = Arc::new(Patched {
                file: file.try_clone().unwrap(),
                len: 320 << 20,
                blocks,
            });
            if let Ok(fs) = Xfs::open(dev, 0, 320 << 20, "/dev/sda".into(), None) {
                let mut budget = 2000;
                walk(&fs, "/", 0, &mut budget);
            }
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "{:?}",
            start.elapsed()
        );
    }
}
