//! What an initramfs carries: its cpio newc archives (an uncompressed
//! early-microcode archive, then the main one, usually compressed) read as
//! a stream — pushed through the decompressor into a cpio parser that
//! keeps only the member names — so a 60 MiB initramfs is never inflated
//! into memory. gzip and zstd are read; xz, lz4, bzip2 and lzo are named
//! as not read yet.
//!
//! Limits: a member name is at most 4 KiB, a member at most 4 GiB, the
//! archive at most 4 GiB inflated and 1 million members (past them the
//! scan stops with an error: a decompression bomb or a damaged archive).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::{self, Write};
use std::rc::Rc;

/// The most an initramfs may inflate to.
pub const MAX_INFLATED: u64 = 4 << 30;
/// The most members it may hold.
pub const MAX_MEMBERS: u64 = 1 << 20;

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// Every member's path (without a leading `./` or `/`).
    pub names: BTreeSet<String>,
    /// The compression of each archive, in order (`none`, `gzip`, `zstd`).
    pub archives: Vec<&'static str>,
    /// An archive vmshift could not read (its compression), if any.
    pub unread: Option<String>,
    /// Archives read to their trailer.
    pub complete: usize,
}

impl Contents {
    /// The kernel modules it carries, by name (`virtio_blk`), from
    /// `…/kernel/…/NAME.ko[.xz|.zst|.gz]`.
    pub fn modules(&self) -> BTreeSet<String> {
        self.names
            .iter()
            .filter(|n| n.contains("/modules/"))
            .filter_map(|n| n.rsplit('/').next())
            .filter_map(|f| f.split_once(".ko").map(|(m, _)| m.replace('-', "_")))
            .collect()
    }

    /// Built with dracut in host-only mode (only this host's drivers).
    pub fn dracut_hostonly(&self) -> bool {
        self.names.contains("lib/dracut/hostonly-files")
            || self.names.contains("usr/lib/dracut/hostonly-files")
    }
}

/// A push parser of cpio newc archives: bytes in, member names out.
struct Cpio {
    found: Rc<RefCell<Contents>>,
    head: Vec<u8>,
    /// Bytes of the current member (name, padding, data, padding) still
    /// to skip or take.
    name_left: usize,
    name: Vec<u8>,
    skip: u64,
    /// What follows the current member's name: padding, data, padding.
    skip_after_name: u64,
    /// Bytes consumed since the archive's first header (for alignment).
    pos: u64,
    members: u64,
    done: bool,
    inflated: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Cpio {
    fn new(found: Rc<RefCell<Contents>>) -> Cpio {
        Cpio {
            found,
            head: Vec::with_capacity(110),
            name_left: 0,
            name: Vec::new(),
            skip: 0,
            skip_after_name: 0,
            pos: 0,
            members: 0,
            done: false,
            inflated: 0,
        }
    }

    fn hex(field: &[u8]) -> io::Result<u64> {
        let s = std::str::from_utf8(field).map_err(|_| bad("a cpio header field is not hex"))?;
        u64::from_str_radix(s, 16).map_err(|_| bad(format!("cpio header field '{s}' is not hex")))
    }

    /// Takes `buf`; returns how many bytes belong to this archive (the
    /// rest, after its trailer, is the next archive's).
    fn push(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut i = 0;
        while i < buf.len() && !(self.done && self.skip == 0) {
            if self.skip > 0 {
                let n = (self.skip.min((buf.len() - i) as u64)) as usize;
                self.skip -= n as u64;
                self.pos += n as u64;
                i += n;
                continue;
            }
            if self.name_left > 0 {
                let n = self.name_left.min(buf.len() - i);
                self.name.extend_from_slice(&buf[i..i + n]);
                self.name_left -= n;
                self.pos += n as u64;
                i += n;
                if self.name_left == 0 {
                    self.end_name()?;
                }
                continue;
            }
            let n = (110 - self.head.len()).min(buf.len() - i);
            self.head.extend_from_slice(&buf[i..i + n]);
            self.pos += n as u64;
            i += n;
            if self.head.len() == 110 {
                self.start_member()?;
            }
        }
        Ok(i)
    }

    fn start_member(&mut self) -> io::Result<()> {
        let h = std::mem::take(&mut self.head);
        if &h[0..6] != b"070701" && &h[0..6] != b"070702" {
            return Err(bad(format!(
                "not a cpio newc header at archive offset {} (magic {:?})",
                self.pos - 110,
                String::from_utf8_lossy(&h[0..6])
            )));
        }
        self.members += 1;
        if self.members > MAX_MEMBERS {
            return Err(bad(format!("more than {MAX_MEMBERS} members")));
        }
        let filesize = Self::hex(&h[54..62])?;
        let namesize = Self::hex(&h[94..102])? as usize;
        if namesize == 0 || namesize > 4096 {
            return Err(bad(format!("a member name of {namesize} bytes")));
        }
        // The name, then padding to 4 bytes from the header's start.
        self.name.clear();
        self.name_left = namesize;
        let name_pad = (4 - (110 + namesize) % 4) % 4;
        let data_pad = (4 - filesize % 4) % 4;
        self.skip_after_name = name_pad as u64 + filesize + data_pad;
        self.inflated = self
            .inflated
            .saturating_add(110 + namesize as u64 + self.skip_after_name);
        if self.inflated > MAX_INFLATED {
            return Err(bad(format!("inflates to more than {MAX_INFLATED} bytes")));
        }
        Ok(())
    }

    fn end_name(&mut self) -> io::Result<()> {
        let raw = std::mem::take(&mut self.name);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let name = String::from_utf8_lossy(&raw[..end]).into_owned();
        self.skip = self.skip_after_name;
        if name == "TRAILER!!!" {
            self.done = true;
            self.found.borrow_mut().complete += 1;
            // The trailer's own padding is part of this archive.
            return Ok(());
        }
        let name = name
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        self.found.borrow_mut().names.insert(name);
        Ok(())
    }
}

/// Where an initramfs scan is: in an uncompressed archive, between
/// archives, or inside a decompressor feeding an archive.
enum Stage {
    Plain(Box<Cpio>),
    Between(Vec<u8>),
    Inflating(Box<dyn Write>),
    Stopped,
}

/// A `Write` that scans an initramfs pushed through it.
pub struct Scanner {
    found: Rc<RefCell<Contents>>,
    stage: Stage,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("found", &self.found.borrow())
            .finish_non_exhaustive()
    }
}

/// Feeds a decompressor's output to a cpio parser; bytes after the
/// archive's trailer are ignored (padding, or another member of a
/// multi-member stream that holds nothing).
struct CpioSink(Box<Cpio>);

impl Write for CpioSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.0.done {
            self.0.push(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Scanner {
    /// A scanner with nothing read yet.
    pub fn new() -> Scanner {
        let found = Rc::new(RefCell::new(Contents::default()));
        Scanner {
            stage: Stage::Between(Vec::new()),
            found,
        }
    }

    /// What was found.
    pub fn contents(&self) -> Contents {
        self.found.borrow().clone()
    }

    fn trailers_complete(&self) -> bool {
        let f = self.found.borrow();
        f.complete >= f.archives.len()
    }

    /// Ends the scan: what was found, or an error when the last archive
    /// stops before its trailer (a truncated or damaged initramfs).
    pub fn finish(mut self) -> io::Result<Contents> {
        if let Stage::Inflating(w) = &mut self.stage {
            if let Err(e) = w.flush() {
                if !self.trailers_complete() {
                    return Err(e);
                }
            }
        }
        self.stage = Stage::Stopped;
        let c = self.found.borrow().clone();
        if c.unread.is_none() && c.complete < c.archives.len() {
            return Err(bad("the archive ends before its trailer (truncated?)"));
        }
        Ok(c)
    }

    fn between(&mut self, mut pending: Vec<u8>, buf: &[u8]) -> io::Result<()> {
        pending.extend_from_slice(buf);
        // Zero padding between archives.
        let start = pending.iter().position(|&b| b != 0);
        let Some(start) = start else {
            self.stage = Stage::Between(Vec::new());
            return Ok(());
        };
        let rest = &pending[start..];
        if rest.len() < 6 {
            self.stage = Stage::Between(rest.to_vec());
            return Ok(());
        }
        let cpio = Box::new(Cpio::new(self.found.clone()));
        let kind: &'static str = if rest.starts_with(b"07070") {
            "none"
        } else if rest.starts_with(&[0x1f, 0x8b]) {
            "gzip"
        } else if rest.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            "zstd"
        } else if rest.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            "xz"
        } else if rest.starts_with(&[0x02, 0x21, 0x4c, 0x18])
            || rest.starts_with(&[0x04, 0x22, 0x4d, 0x18])
        {
            "lz4"
        } else if rest.starts_with(b"BZh") {
            "bzip2"
        } else if rest.starts_with(&[0x89, b'L', b'Z', b'O']) {
            "lzo"
        } else if rest.starts_with(&[0x5d, 0, 0]) {
            "lzma"
        } else {
            return Err(bad(format!(
                "neither a cpio archive nor a known compression (starts {:02x?})",
                &rest[..6]
            )));
        };
        self.found.borrow_mut().archives.push(kind);
        let rest = rest.to_vec();
        match kind {
            "none" => {
                self.stage = Stage::Plain(cpio);
                self.write_all(&rest)?;
            }
            "gzip" => {
                self.stage =
                    Stage::Inflating(Box::new(flate2::write::MultiGzDecoder::new(CpioSink(cpio))));
                self.write_all(&rest)?;
            }
            "zstd" => {
                let d = zstd::stream::write::Decoder::new(CpioSink(cpio))?;
                self.stage = Stage::Inflating(Box::new(d));
                self.write_all(&rest)?;
            }
            other => {
                self.found.borrow_mut().unread = Some(format!(
                    "an archive compressed with {other}, which vmshift does not read yet"
                ));
                self.stage = Stage::Stopped;
            }
        }
        Ok(())
    }
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new()
    }
}

impl Write for Scanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::mem::replace(&mut self.stage, Stage::Stopped) {
            Stage::Plain(mut c) => {
                let used = c.push(buf)?;
                if c.done && c.skip == 0 {
                    self.between(Vec::new(), &buf[used..])?;
                } else {
                    self.stage = Stage::Plain(c);
                }
            }
            Stage::Between(p) => self.between(p, buf)?,
            Stage::Inflating(mut w) => match w.write_all(buf) {
                Ok(()) => self.stage = Stage::Inflating(w),
                // Past the archive's trailer: padding or garbage the
                // kernel ignores too.
                Err(_) if self.trailers_complete() => {}
                Err(e) => return Err(e),
            },
            Stage::Stopped => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Stage::Inflating(w) = &mut self.stage {
            w.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cpio newc archive of `files` (name, data), with its trailer.
    fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let member = |name: &str, data: &[u8], out: &mut Vec<u8>| {
            let namesize = name.len() + 1;
            out.extend_from_slice(
                format!(
                    "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                    1, 0o100644, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, namesize, 0
                )
                .as_bytes(),
            );
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
            out.extend_from_slice(data);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        };
        for (n, d) in files {
            member(n, d, &mut out);
        }
        member("TRAILER!!!", b"", &mut out);
        out
    }

    fn scan(bytes: &[u8], chunk: usize) -> io::Result<Contents> {
        let mut s = Scanner::new();
        for c in bytes.chunks(chunk) {
            s.write_all(c)?;
        }
        s.finish()
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn early_microcode_then_compressed_main_archive() {
        let early = cpio(&[("kernel/x86/microcode/GenuineIntel.bin", b"ucode")]);
        let main = cpio(&[
            (
                "usr/lib/modules/6.1.0-18-amd64/kernel/drivers/block/virtio_blk.ko.xz",
                b"m",
            ),
            (
                "./usr/lib/modules/6.1.0-18-amd64/kernel/drivers/virtio/virtio_pci.ko",
                &[7u8; 1000],
            ),
            ("usr/lib/dracut/hostonly-files", b""),
            ("init", b"#!/bin/sh"),
        ]);
        for compressed in [gzip(&main), zstd::bulk::compress(&main, 3).unwrap()] {
            let mut all = early.clone();
            all.extend_from_slice(&[0u8; 512]); // padding between archives
            all.extend_from_slice(&compressed);
            for chunk in [1, 7, 4096, 1 << 20] {
                let c = scan(&all, chunk).unwrap();
                assert_eq!(c.archives.len(), 2);
                assert_eq!(c.archives[0], "none");
                assert_eq!(c.complete, 2);
                let m: Vec<String> = c.modules().into_iter().collect();
                assert_eq!(m, ["virtio_blk", "virtio_pci"], "chunk {chunk}");
                assert!(c.dracut_hostonly());
                assert!(c.names.contains("init"));
            }
        }
    }

    #[test]
    fn unknown_compression_is_named_and_damage_is_an_error() {
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
        xz.extend_from_slice(&[1u8; 100]);
        let c = scan(&xz, 64).unwrap();
        assert!(c.unread.as_deref().is_some_and(|u| u.contains("xz")));
        // Cut short: no trailer.
        let main = gzip(&cpio(&[("a", &[1u8; 5000])]));
        assert!(scan(&main[..main.len() / 2], 512).is_err());
        // Not an archive at all.
        assert!(scan(b"hello, world, this is text", 8).is_err());
        // A member that claims 4 GiB: refused before anything is read.
        let mut huge = cpio(&[("big", b"")]);
        huge[54..62].copy_from_slice(b"ffffffff");
        let e = scan(&huge, 4096).unwrap_err();
        assert!(e.to_string().contains("inflates to more than"), "{e}");
        // A name of 1 MiB.
        let mut long = cpio(&[("n", b"")]);
        long[94..102].copy_from_slice(b"00100000");
        assert!(scan(&long, 4096).is_err());
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit_quickly() {
        // 8 MiB of zeros inside a member that claims 16 MiB: the scanner
        // reads the stream (never holding it) and the archive simply ends
        // early: an error, in well under a second.
        let mut head = cpio(&[("z", b"")]);
        head.truncate(head.len() - 124); // drop the trailer
        head[54..62].copy_from_slice(b"01000000");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&head).unwrap();
        for _ in 0..8 {
            e.write_all(&[0u8; 1 << 20]).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        let t = std::time::Instant::now();
        assert!(scan(&bomb, 1 << 16).is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
