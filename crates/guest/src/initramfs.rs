//! What an initramfs carries: its cpio newc archives (an uncompressed
//! early-microcode archive, then the main one, usually compressed) read as
//! a stream — pushed through the decompressor into a cpio parser that
//! keeps only the member names — so a 60 MiB initramfs is never inflated
//! into memory.
//!
//! Read: gzip and zstd (their crates' write-side decoders), xz and lzma
//! (lzma-rust2's push decoders), bzip2 (the bzip2 crate's push decoder on
//! its Rust libbzip2), lz4 in the kernel's legacy format (`lz4 -l`) and in
//! the frame format (which the kernel cannot unpack; named `lz4-frame`),
//! the blocks of both decoded with lz4_flex. lzo is named as not read.
//! Compressions are told apart by the magics of the kernel's table
//! (`lib/decompress.c`), in its order. As in the kernel, after a
//! compressed stream ends (xz, lzma, bzip2, lz4 frame; lz4 legacy at a
//! zero block size) zero padding and further archives may follow.
//!
//! Limits: a member name is at most 4 KiB; the initramfs holds at most
//! 1 million members with 64 MiB of names in all and inflates to at most
//! 2 GiB in all (past them the scan stops with an error: a decompression
//! bomb or a damaged archive); an xz or lzma dictionary is at most
//! 128 MiB. No decoder holds more than its window and one block (lz4: 8
//! MiB in and out), whatever the input says.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::hash::Hasher as _;
use std::io::{self, Write};
use std::rc::Rc;

/// The most an initramfs may inflate to.
/// (Distributions' largest, with firmware, stay well under 1 GiB; a bomb
/// is stopped within seconds.)
pub const MAX_INFLATED: u64 = vmshift_model::limits::INITRAMFS_INFLATED_BYTES;
/// The most members it may hold.
pub const MAX_MEMBERS: u64 = vmshift_model::limits::INITRAMFS_MEMBERS;
/// The most bytes of member names it may hold.
pub const MAX_NAME_BYTES: u64 = 64 << 20;
/// The most memory an xz or lzma decoder may take, in KiB (128 MiB: `xz
/// -9` and `lzma -9` need 65 MiB; the kernel's own tools use far less).
const MAX_LZMA_KIB: u32 = 128 << 10;

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// Every member's path (without a leading `./` or `/`).
    pub names: BTreeSet<String>,
    /// The compression of each archive, in order (`none`, `gzip`, `bzip2`,
    /// `lzma`, `xz`, `lzo`, `lz4`, `zstd`, or `lz4-frame`, which the kernel
    /// cannot unpack).
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

/// What the archives of one scan share: what they found, and what they
/// used of the limits.
struct Shared {
    found: RefCell<Contents>,
    max_inflated: u64,
    inflated: Cell<u64>,
    members: Cell<u64>,
    name_bytes: Cell<u64>,
}

impl Shared {
    fn trailers_complete(&self) -> bool {
        let f = self.found.borrow();
        f.complete >= f.archives.len()
    }
}

/// A push parser of cpio newc archives: bytes in, member names out.
struct Cpio {
    shared: Rc<Shared>,
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
    done: bool,
    /// What this archive's headers say it inflates to.
    inflated: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Cpio {
    fn new(shared: Rc<Shared>) -> Cpio {
        Cpio {
            shared,
            head: Vec::with_capacity(110),
            name_left: 0,
            name: Vec::new(),
            skip: 0,
            skip_after_name: 0,
            pos: 0,
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
        let members = self.shared.members.get() + 1;
        self.shared.members.set(members);
        if members > MAX_MEMBERS {
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
        let max = self.shared.max_inflated;
        if self.inflated > max {
            return Err(bad(format!("inflates to more than {max} bytes")));
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
            self.shared.found.borrow_mut().complete += 1;
            // The trailer's own padding is part of this archive.
            return Ok(());
        }
        let name = name
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        let name_bytes = self.shared.name_bytes.get() + name.len() as u64;
        self.shared.name_bytes.set(name_bytes);
        if name_bytes > MAX_NAME_BYTES {
            return Err(bad(format!(
                "member names take more than {MAX_NAME_BYTES} bytes"
            )));
        }
        self.shared.found.borrow_mut().names.insert(name);
        Ok(())
    }
}

/// Where a decompressor's output goes: counted against the scan's
/// inflated limit, then parsed as a cpio archive up to its trailer (what
/// follows the trailer inside the same stream is padding, ignored).
struct Sink(Box<Cpio>);

impl Sink {
    fn push(&mut self, buf: &[u8]) -> io::Result<()> {
        let shared = &self.0.shared;
        let inflated = shared.inflated.get().saturating_add(buf.len() as u64);
        shared.inflated.set(inflated);
        if inflated > shared.max_inflated {
            return Err(bad(format!(
                "inflates to more than {} bytes",
                shared.max_inflated
            )));
        }
        if !self.0.done {
            self.0.push(buf)?;
        }
        Ok(())
    }

    /// The compressed stream has ended: so must its archive have.
    fn end(&self, kind: &str) -> io::Result<()> {
        if self.0.done {
            return Ok(());
        }
        Err(bad(format!(
            "the {kind} stream ends before its cpio archive's trailer"
        )))
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A decompressor fed by push, passing what it inflates to its [`Sink`].
trait Inflate {
    /// Takes compressed bytes. `None`: it took them all and wants more.
    /// `Some((used, carry))`: its stream ended after `buf[..used]`;
    /// `carry` are bytes it had taken that follow the end (they come
    /// before `buf[used..]`).
    fn push(&mut self, buf: &[u8]) -> io::Result<Option<(usize, Vec<u8>)>>;
    /// The input is over: an error if that cuts the stream short.
    fn finish(&mut self) -> io::Result<()>;
}

/// gzip and zstd, through their crates' write-side decoders, which take
/// every byte given (a gzip stream may hold more members, up to the end of
/// the file): an error after the archive's trailer is padding or garbage
/// the kernel ignores too, and ends the scan there.
struct WriteSide {
    decoder: Box<dyn Write>,
    shared: Rc<Shared>,
    ignoring: bool,
}

impl Inflate for WriteSide {
    fn push(&mut self, buf: &[u8]) -> io::Result<Option<(usize, Vec<u8>)>> {
        if self.ignoring {
            return Ok(None);
        }
        match self.decoder.write_all(buf) {
            Ok(()) => Ok(None),
            Err(_) if self.shared.trailers_complete() => {
                self.ignoring = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        match self.decoder.flush() {
            Err(e) if !self.ignoring && !self.shared.trailers_complete() => Err(e),
            _ => Ok(()),
        }
    }
}

/// One call of a sans-I/O decompressor.
struct Step {
    taken: usize,
    made: usize,
    ended: bool,
}

/// A sans-I/O decompressor: compressed bytes and an output buffer in, how
/// much of each it used out.
trait Codec {
    /// Decodes from `input` into `out`; `last`: no more input will come.
    fn step(&mut self, input: &[u8], out: &mut [u8], last: bool) -> io::Result<Step>;
    /// Bytes it took past its stream's end (after `ended`).
    fn unused(&self) -> &[u8] {
        &[]
    }
}

fn lzma_action(last: bool) -> lzma_rust2::Action {
    if last {
        lzma_rust2::Action::Finish
    } else {
        lzma_rust2::Action::Run
    }
}

fn lzma_step(r: lzma_rust2::StreamResult) -> Step {
    Step {
        taken: r.bytes_consumed,
        made: r.bytes_produced,
        ended: r.status == lzma_rust2::Status::StreamEnd,
    }
}

impl Codec for lzma_rust2::XzStream {
    fn step(&mut self, input: &[u8], out: &mut [u8], last: bool) -> io::Result<Step> {
        self.process(input, out, lzma_action(last)).map(lzma_step)
    }
}

impl Codec for lzma_rust2::LzmaStream {
    fn step(&mut self, input: &[u8], out: &mut [u8], last: bool) -> io::Result<Step> {
        self.process(input, out, lzma_action(last)).map(lzma_step)
    }
    fn unused(&self) -> &[u8] {
        self.unused_input()
    }
}

impl Codec for bzip2::Decompress {
    fn step(&mut self, input: &[u8], out: &mut [u8], _last: bool) -> io::Result<Step> {
        let (in0, out0) = (self.total_in(), self.total_out());
        let status = self.decompress(input, out).map_err(|e| {
            bad(match e {
                bzip2::Error::Data => "damaged data (a CRC or the coding)",
                bzip2::Error::DataMagic => "no bzip2 header",
                _ => "the decoder was misused",
            })
        })?;
        let step = |ended| Step {
            taken: (self.total_in() - in0) as usize,
            made: (self.total_out() - out0) as usize,
            ended,
        };
        match status {
            bzip2::Status::StreamEnd => Ok(step(true)),
            bzip2::Status::MemNeeded => Err(bad("out of memory")),
            _ => Ok(step(false)),
        }
    }
}

/// Drives a [`Codec`] through a fixed output buffer into a [`Sink`].
struct Pump<C> {
    kind: &'static str,
    codec: C,
    sink: Sink,
    out: Vec<u8>,
    /// Compressed bytes taken so far, for error messages.
    taken: u64,
}

impl<C: Codec> Pump<C> {
    fn new(kind: &'static str, codec: C, sink: Sink) -> Pump<C> {
        Pump {
            kind,
            codec,
            sink,
            out: vec![0; 64 << 10],
            taken: 0,
        }
    }

    fn step(&mut self, input: &[u8], last: bool) -> io::Result<Step> {
        let s = self.codec.step(input, &mut self.out, last).map_err(|e| {
            let what = if e.kind() == io::ErrorKind::OutOfMemory {
                format!(
                    "needs more than the {} MiB vmshift allows ({e})",
                    MAX_LZMA_KIB >> 10
                )
            } else {
                e.to_string()
            };
            let (from, to) = (self.taken, self.taken + input.len() as u64);
            bad(format!(
                "{} stream, in compressed bytes {from}..{to}: {what}",
                self.kind
            ))
        })?;
        self.taken += s.taken as u64;
        self.sink.push(&self.out[..s.made])?;
        if s.ended {
            self.sink.end(self.kind)?;
        }
        Ok(s)
    }
}

impl<C: Codec> Inflate for Pump<C> {
    fn push(&mut self, buf: &[u8]) -> io::Result<Option<(usize, Vec<u8>)>> {
        let mut at = 0;
        loop {
            let s = self.step(&buf[at..], false)?;
            at += s.taken;
            if s.ended {
                return Ok(Some((at, self.codec.unused().to_vec())));
            }
            // Every call takes input or gives output; none that does
            // neither with input left (which would be a hang).
            if s.taken == 0 && s.made == 0 {
                if at == buf.len() {
                    return Ok(None);
                }
                return Err(bad(format!(
                    "the {} decoder stalled after {} compressed bytes",
                    self.kind, self.taken
                )));
            }
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        loop {
            let s = self.step(&[], true)?;
            if s.ended {
                return Ok(());
            }
            if s.made == 0 {
                return Err(bad(format!(
                    "the {} stream ends early, after {} compressed bytes (truncated?)",
                    self.kind, self.taken
                )));
            }
        }
    }
}

/// Bytes gathered until there are as many as wanted (a header, a block
/// that arrives in pieces).
#[derive(Default)]
struct Gather {
    buf: Vec<u8>,
    want: usize,
}

impl Gather {
    /// Takes what it still wants from `input`; returns how much.
    fn take(&mut self, input: &[u8]) -> usize {
        let n = (self.want - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        n
    }
    fn full(&self) -> bool {
        self.buf.len() == self.want
    }
    fn reset(&mut self, want: usize) {
        self.buf.clear();
        self.want = want;
    }
    fn le32(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.buf[at..at + 4]);
        u32::from_le_bytes(b)
    }
}

/// The kernel's lz4 format's magic (`lz4 -l`).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// The most a block of it inflates to.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The most an lz4 block of `n` bytes may take compressed
/// (`LZ4_COMPRESSBOUND`).
const fn lz4_bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// The kernel's lz4 format: its magic, then blocks, each a u32 LE
/// compressed size and a raw LZ4 block inflating to at most 8 MiB. The
/// magic again starts another stream (read on as this one); a zero size
/// (padding) or the end of the input ends it, as in the kernel's `unlz4`.
struct Lz4Legacy {
    sink: Sink,
    gather: Gather,
    started: bool,
    in_block: bool,
    out: Vec<u8>,
    /// Where the element being gathered starts in the stream.
    at: u64,
}

impl Lz4Legacy {
    fn new(sink: Sink) -> Lz4Legacy {
        let mut gather = Gather::default();
        gather.reset(4);
        Lz4Legacy {
            sink,
            gather,
            started: false,
            in_block: false,
            out: Vec::new(),
            at: 0,
        }
    }

    fn next(&mut self, want: usize, in_block: bool) {
        self.at += self.gather.buf.len() as u64;
        self.gather.reset(want);
        self.in_block = in_block;
    }

    fn block(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            self.out = vec![0; LZ4_LEGACY_BLOCK];
        }
        let n = lz4_flex::block::decompress_into(&self.gather.buf, &mut self.out)
            .map_err(|e| bad(format!("lz4 block at stream offset {}: {e}", self.at)))?;
        self.sink.push(&self.out[..n])?;
        self.next(4, false);
        Ok(())
    }

    /// A block's size, the magic, or the end; `true` at the end.
    fn word(&mut self) -> io::Result<bool> {
        let word = self.gather.le32(0);
        if !self.started && word != LZ4_LEGACY_MAGIC {
            return Err(bad(format!(
                "not an lz4 legacy stream (magic {word:#010x})"
            )));
        }
        self.started = true;
        match word as usize {
            _ if word == LZ4_LEGACY_MAGIC => self.next(4, false),
            0 => return Ok(true),
            n if n > lz4_bound(LZ4_LEGACY_BLOCK) => {
                return Err(bad(format!(
                "lz4 block at stream offset {} of {n} bytes, over the {} an 8 MiB block may take",
                self.at,
                lz4_bound(LZ4_LEGACY_BLOCK)
            )))
            }
            n => self.next(n, true),
        }
        Ok(false)
    }
}

impl Inflate for Lz4Legacy {
    fn push(&mut self, buf: &[u8]) -> io::Result<Option<(usize, Vec<u8>)>> {
        let mut at = 0;
        while at < buf.len() {
            at += self.gather.take(&buf[at..]);
            if !self.gather.full() {
                break;
            }
            if self.in_block {
                self.block()?;
            } else if self.word()? {
                self.sink.end("lz4")?;
                return Ok(Some((at, Vec::new())));
            }
        }
        Ok(None)
    }

    fn finish(&mut self) -> io::Result<()> {
        let cut = if self.in_block {
            true
        } else {
            self.gather.buf.iter().any(|&b| b != 0)
        };
        if cut {
            return Err(bad(format!(
                "the lz4 stream ends inside a block at stream offset {} (truncated?)",
                self.at
            )));
        }
        self.sink.end("lz4")
    }
}

/// The lz4 frame format's magic.
const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;
/// How far back a linked lz4 block may refer.
const LZ4_WINDOW: usize = 64 << 10;

/// Where an lz4 frame is.
#[derive(Clone, Copy, PartialEq)]
enum FrameAt {
    /// Magic, FLG, BD.
    Head,
    /// The optional content size and dictionary id, and the header
    /// checksum.
    Descriptor,
    BlockSize,
    Block {
        raw: bool,
        len: usize,
    },
    ContentChecksum,
}

/// The lz4 frame format (`lz4` without `-l`, magic 0x184D2204), which the
/// kernel does not unpack: header, blocks of at most 4 MiB (each
/// independent or referring to the 64 KiB before it), an end mark, and
/// xxHash32 checksums of the header, of each block and of the content
/// when the frame has them — all checked.
struct Lz4Frame {
    sink: Sink,
    gather: Gather,
    state: FrameAt,
    flags: u8,
    block_max: usize,
    content_size: Option<u64>,
    made: u64,
    content_hash: twox_hash::XxHash32,
    out: Vec<u8>,
    /// The last 64 KiB of output, for linked blocks.
    window: Vec<u8>,
    at: u64,
}

impl Lz4Frame {
    const BLOCK_INDEPENDENT: u8 = 0x20;
    const BLOCK_CHECKSUM: u8 = 0x10;
    const CONTENT_SIZE: u8 = 0x08;
    const CONTENT_CHECKSUM: u8 = 0x04;
    const DICT_ID: u8 = 0x01;

    fn new(sink: Sink) -> Lz4Frame {
        let mut gather = Gather::default();
        gather.reset(6);
        Lz4Frame {
            sink,
            gather,
            state: FrameAt::Head,
            flags: 0,
            block_max: 0,
            content_size: None,
            made: 0,
            content_hash: twox_hash::XxHash32::with_seed(0),
            out: Vec::new(),
            window: Vec::new(),
            at: 0,
        }
    }

    fn next(&mut self, state: FrameAt, want: usize) {
        self.at += self.gather.buf.len() as u64;
        self.gather.reset(want);
        self.state = state;
    }

    fn fail(&self, what: impl std::fmt::Display) -> io::Error {
        bad(format!("lz4 frame at stream offset {}: {what}", self.at))
    }

    fn head(&mut self) -> io::Result<()> {
        let g = &self.gather.buf;
        let (magic, flags, bd) = (self.gather.le32(0), g[4], g[5]);
        if magic != LZ4_FRAME_MAGIC {
            return Err(self.fail(format_args!("magic {magic:#010x}")));
        }
        if flags >> 6 != 1 || flags & 0x02 != 0 || bd & 0x8f != 0 || bd >> 4 < 4 {
            return Err(self.fail(format_args!(
                "a frame descriptor of version {} (FLG {flags:#04x}, BD {bd:#04x})",
                flags >> 6
            )));
        }
        if flags & Self::DICT_ID != 0 {
            return Err(self.fail("the frame needs a dictionary"));
        }
        self.flags = flags;
        self.block_max = 1 << (8 + 2 * (bd >> 4));
        let more = if flags & Self::CONTENT_SIZE != 0 {
            8
        } else {
            0
        };
        // Gather on: the descriptor is checked as a whole.
        self.gather.want = 6 + more + 1;
        self.state = FrameAt::Descriptor;
        Ok(())
    }

    fn descriptor(&mut self) -> io::Result<()> {
        let g = &self.gather.buf;
        let (fields, check) = g[4..].split_at(g.len() - 5);
        let want = (twox_hash::XxHash32::oneshot(0, fields) >> 8) as u8;
        if check[0] != want {
            return Err(self.fail(format_args!(
                "header checksum {:#04x}, computed {want:#04x}",
                check[0]
            )));
        }
        if self.flags & Self::CONTENT_SIZE != 0 {
            let mut b = [0; 8];
            b.copy_from_slice(&fields[2..10]);
            self.content_size = Some(u64::from_le_bytes(b));
        }
        self.out = vec![0; self.block_max];
        self.next(FrameAt::BlockSize, 4);
        Ok(())
    }

    fn block_size(&mut self) -> io::Result<bool> {
        let word = self.gather.le32(0);
        if word == 0 {
            if self.flags & Self::CONTENT_CHECKSUM != 0 {
                self.next(FrameAt::ContentChecksum, 4);
                return Ok(false);
            }
            return self.end();
        }
        let (raw, len) = (word & 0x8000_0000 != 0, (word & 0x7fff_ffff) as usize);
        if len > self.block_max {
            return Err(self.fail(format_args!(
                "a block of {len} bytes, over the frame's {} maximum",
                self.block_max
            )));
        }
        let check = if self.flags & Self::BLOCK_CHECKSUM != 0 {
            4
        } else {
            0
        };
        self.next(FrameAt::Block { raw, len }, len + check);
        Ok(false)
    }

    fn block(&mut self, raw: bool, len: usize) -> io::Result<()> {
        let data = &self.gather.buf[..len];
        if self.flags & Self::BLOCK_CHECKSUM != 0 {
            let (got, want) = (self.gather.le32(len), twox_hash::XxHash32::oneshot(0, data));
            if got != want {
                return Err(self.fail(format_args!(
                    "block checksum {got:#010x}, computed {want:#010x}"
                )));
            }
        }
        let linked = self.flags & Self::BLOCK_INDEPENDENT == 0;
        let n = if raw {
            self.out[..len].copy_from_slice(data);
            len
        } else if linked {
            lz4_flex::block::decompress_into_with_dict(data, &mut self.out, &self.window)
                .map_err(|e| self.fail(e))?
        } else {
            lz4_flex::block::decompress_into(data, &mut self.out).map_err(|e| self.fail(e))?
        };
        let made = &self.out[..n];
        if linked {
            if n >= LZ4_WINDOW {
                self.window.clear();
                self.window.extend_from_slice(&made[n - LZ4_WINDOW..]);
            } else {
                self.window.extend_from_slice(made);
                let excess = self.window.len().saturating_sub(LZ4_WINDOW);
                self.window.drain(..excess);
            }
        }
        if self.flags & Self::CONTENT_CHECKSUM != 0 {
            self.content_hash.write(made);
        }
        self.made += n as u64;
        self.sink.push(made)?;
        self.next(FrameAt::BlockSize, 4);
        Ok(())
    }

    fn content_checksum(&mut self) -> io::Result<bool> {
        let (got, want) = (self.gather.le32(0), self.content_hash.finish_32());
        if got != want {
            return Err(self.fail(format_args!(
                "content checksum {got:#010x}, computed {want:#010x}"
            )));
        }
        self.end()
    }

    fn end(&mut self) -> io::Result<bool> {
        if let Some(size) = self.content_size.filter(|&s| s != self.made) {
            return Err(self.fail(format_args!(
                "the frame holds {} bytes, its header says {size}",
                self.made
            )));
        }
        self.sink.end("lz4 frame")?;
        Ok(true)
    }
}

impl Inflate for Lz4Frame {
    fn push(&mut self, buf: &[u8]) -> io::Result<Option<(usize, Vec<u8>)>> {
        let mut at = 0;
        while at < buf.len() {
            at += self.gather.take(&buf[at..]);
            if !self.gather.full() {
                break;
            }
            let ended = match self.state {
                FrameAt::Head => self.head().map(|()| false)?,
                FrameAt::Descriptor => self.descriptor().map(|()| false)?,
                FrameAt::BlockSize => self.block_size()?,
                FrameAt::Block { raw, len } => self.block(raw, len).map(|()| false)?,
                FrameAt::ContentChecksum => self.content_checksum()?,
            };
            if ended {
                return Ok(Some((at, Vec::new())));
            }
        }
        Ok(None)
    }

    fn finish(&mut self) -> io::Result<()> {
        Err(self.fail("the frame ends before its end mark (truncated?)"))
    }
}

/// Where an initramfs scan is: in an uncompressed archive, between
/// archives, or inside a decompressor feeding an archive.
enum Stage {
    Plain(Box<Cpio>),
    Between(Vec<u8>),
    Inflating(Box<dyn Inflate>),
    Stopped,
}

/// A `Write` that scans an initramfs pushed through it.
pub struct Scanner {
    shared: Rc<Shared>,
    stage: Stage,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("found", &self.shared.found.borrow())
            .finish_non_exhaustive()
    }
}

/// What an archive starts with: a cpio header (looked for first, as the
/// kernel does), then the compressions of the kernel's table
/// (`lib/decompress.c`) in its order and by its two-byte magics (its old
/// gzip magic 1f 9e left out: nothing writes it), then the lz4 frame
/// format, which the kernel does not know.
const MAGICS: [(&[u8], &str); 9] = [
    (b"07070", "none"),
    (&[0x1f, 0x8b], "gzip"),
    (&[0x42, 0x5a], "bzip2"),
    (&[0x5d, 0x00], "lzma"),
    (&[0xfd, 0x37], "xz"),
    (&[0x89, 0x4c], "lzo"),
    (&[0x02, 0x21], "lz4"),
    (&[0x28, 0xb5], "zstd"),
    (&[0x04, 0x22, 0x4d, 0x18], "lz4-frame"),
];

impl Scanner {
    /// A scanner with nothing read yet.
    pub fn new() -> Scanner {
        Scanner::with_limit(MAX_INFLATED)
    }

    /// A scanner that stops past `max_inflated` bytes inflated.
    fn with_limit(max_inflated: u64) -> Scanner {
        let shared = Rc::new(Shared {
            found: RefCell::new(Contents::default()),
            max_inflated,
            inflated: Cell::new(0),
            members: Cell::new(0),
            name_bytes: Cell::new(0),
        });
        Scanner {
            stage: Stage::Between(Vec::new()),
            shared,
        }
    }

    /// What was found.
    pub fn contents(&self) -> Contents {
        self.shared.found.borrow().clone()
    }

    /// Ends the scan: what was found, or an error when the last archive
    /// stops before its trailer (a truncated or damaged initramfs).
    pub fn finish(mut self) -> io::Result<Contents> {
        if let Stage::Inflating(d) = &mut self.stage {
            d.finish()?;
        }
        self.stage = Stage::Stopped;
        let c = self.contents();
        if c.unread.is_none() && c.complete < c.archives.len() {
            return Err(bad("the archive ends before its trailer (truncated?)"));
        }
        Ok(c)
    }

    /// Feeds `input` to the current stage until it has taken it all or the
    /// stage ends; returns how much it took, and bytes it had taken
    /// earlier that come back (they precede `input[used..]`).
    fn step(&mut self, input: &[u8]) -> io::Result<(usize, Vec<u8>)> {
        match std::mem::replace(&mut self.stage, Stage::Stopped) {
            Stage::Plain(mut c) => {
                let used = c.push(input)?;
                if c.done && c.skip == 0 {
                    self.stage = Stage::Between(Vec::new());
                } else {
                    self.stage = Stage::Plain(c);
                }
                Ok((used, Vec::new()))
            }
            Stage::Between(pending) => self.between(pending, input),
            Stage::Inflating(mut d) => match d.push(input)? {
                None => {
                    self.stage = Stage::Inflating(d);
                    Ok((input.len(), Vec::new()))
                }
                Some(end) => {
                    self.stage = Stage::Between(Vec::new());
                    Ok(end)
                }
            },
            Stage::Stopped => Ok((input.len(), Vec::new())),
        }
    }

    /// Skips zero padding, gathers an archive's first 6 bytes and starts
    /// reading it; those bytes come back to be fed to it.
    fn between(&mut self, mut pending: Vec<u8>, input: &[u8]) -> io::Result<(usize, Vec<u8>)> {
        let mut used = 0;
        if pending.is_empty() {
            used = input.iter().position(|&b| b != 0).unwrap_or(input.len());
        }
        let n = (6 - pending.len()).min(input.len() - used);
        pending.extend_from_slice(&input[used..used + n]);
        used += n;
        if pending.len() < 6 {
            self.stage = Stage::Between(pending);
            return Ok((used, Vec::new()));
        }
        let Some(&(_, kind)) = MAGICS.iter().find(|(m, _)| pending.starts_with(m)) else {
            return Err(bad(format!(
                "neither a cpio archive nor a known compression (starts {pending:02x?})"
            )));
        };
        self.shared.found.borrow_mut().archives.push(kind);
        let cpio = Box::new(Cpio::new(self.shared.clone()));
        let sink = Sink(cpio);
        self.stage = match kind {
            "none" => Stage::Plain(sink.0),
            "gzip" => self.write_side(flate2::write::MultiGzDecoder::new(sink)),
            "zstd" => self.write_side(zstd::stream::write::Decoder::new(sink)?),
            "xz" => Stage::Inflating(Box::new(Pump::new(
                kind,
                lzma_rust2::XzStream::new_mem_limit(false, MAX_LZMA_KIB),
                sink,
            ))),
            "lzma" => Stage::Inflating(Box::new(Pump::new(
                kind,
                lzma_rust2::LzmaStream::new_mem_limit(MAX_LZMA_KIB, None),
                sink,
            ))),
            "bzip2" => Stage::Inflating(Box::new(Pump::new(
                kind,
                bzip2::Decompress::new(false),
                sink,
            ))),
            "lz4" => Stage::Inflating(Box::new(Lz4Legacy::new(sink))),
            "lz4-frame" => Stage::Inflating(Box::new(Lz4Frame::new(sink))),
            other => {
                self.shared.found.borrow_mut().unread = Some(format!(
                    "an archive compressed with {other}, which vmshift does not read yet"
                ));
                Stage::Stopped
            }
        };
        Ok((used, pending))
    }

    fn write_side(&self, decoder: impl Write + 'static) -> Stage {
        Stage::Inflating(Box::new(WriteSide {
            decoder: Box::new(decoder),
            shared: self.shared.clone(),
            ignoring: false,
        }))
    }
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new()
    }
}

impl Write for Scanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bytes handed back by a stage that ended, to feed before the rest
        // of `buf`: a loop, not a recursion, however many archives follow.
        let mut front = Vec::new();
        let mut rest = buf;
        while !(front.is_empty() && rest.is_empty()) {
            if front.is_empty() {
                let (used, back) = self.step(rest)?;
                rest = &rest[used..];
                front = back;
            } else {
                let f = std::mem::take(&mut front);
                let (used, mut back) = self.step(&f)?;
                back.extend_from_slice(&f[used..]);
                front = back;
            }
        }
        Ok(buf.len())
    }

    /// Nothing to flush: [`Scanner::finish`] ends the stream.
    fn flush(&mut self) -> io::Result<()> {
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
        let mut lzo = vec![0x89, b'L', b'Z', b'O', 0, 0x0d];
        lzo.extend_from_slice(&[1u8; 100]);
        let c = scan(&lzo, 64).unwrap();
        assert_eq!(c.archives, ["lzo"]);
        assert!(c.unread.as_deref().is_some_and(|u| u.contains("lzo")));
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
    fn an_initramfs_of_one_member_past_the_limit_is_refused_at_it_read() {
        // MAX_MEMBERS headers: the trailer and the files before it.
        let names: Vec<String> = (0..MAX_MEMBERS).map(|i| format!("f{i:07}")).collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        let at = cpio(&files[1..]);
        let c = scan(&at, 1 << 20).unwrap();
        assert_eq!(c.names.len() as u64, MAX_MEMBERS - 1);
        let past = cpio(&files);
        let e = scan(&past, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("more than 1048576 members"), "{e}");
    }

    #[test]
    fn a_member_inflating_just_past_the_limit_is_refused_at_it_read_on() {
        // One member "big": 110 header bytes, a 4-byte name padded to
        // 116, then its data padded to 4. The limit is what all of it
        // inflates to.
        let archive = |filesize: u64| {
            let mut a = cpio(&[("big", b"")]);
            a[54..62].copy_from_slice(format!("{filesize:08x}").as_bytes());
            a
        };
        let max = vmshift_model::limits::INITRAMFS_INFLATED_BYTES;
        let past = scan(&archive(max - 116 + 1), 4096).unwrap_err();
        assert!(past.to_string().contains("inflates to more than"), "{past}");
        // At the limit the member is read on: the archive then ends early
        // (its data is not there), another error.
        let at = scan(&archive(max - 116), 4096).unwrap_err();
        assert!(!at.to_string().contains("inflates to more than"), "{at}");
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

    fn scan_limited(bytes: &[u8], chunk: usize, limit: u64) -> io::Result<Contents> {
        let mut s = Scanner::with_limit(limit);
        for c in bytes.chunks(chunk) {
            s.write_all(c)?;
        }
        s.finish()
    }

    // The real tools are the peers: cpio packs and lists the archives,
    // xz, lz4 and bzip2 compress them as initramfs builders do.

    /// Runs `tool` (from the Debian package `package`) in `dir` with
    /// `stdin` (a file) on its standard input; what it writes.
    fn run(
        package: &str,
        tool: &str,
        args: &[&str],
        dir: &std::path::Path,
        stdin: Option<&std::path::Path>,
    ) -> Vec<u8> {
        let mut cmd = std::process::Command::new(tool);
        cmd.args(args).current_dir(dir);
        if let Some(path) = stdin {
            cmd.stdin(std::fs::File::open(path).unwrap());
        }
        let out = match cmd.output() {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "`{tool}` is missing: install the Debian package {package} \
                 (apt-get install {package})"
            ),
            Err(e) => panic!("cannot run {tool}: {e}"),
        };
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// A compression as a real tool writes it: the name the scanner gives
    /// it, the Debian package, the tool and its arguments.
    type Compressor = (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    );

    /// What initramfs builders use: `xz --check=crc32` (dracut,
    /// initramfs-tools), `lzma`, `lz4 -l` (the kernel's `CONFIG_RD_LZ4`),
    /// `bzip2`; and the lz4 frame format, which the kernel cannot unpack.
    const COMPRESSORS: [Compressor; 5] = [
        ("xz", "xz-utils", "xz", &["--check=crc32"]),
        ("lzma", "xz-utils", "xz", &["--format=lzma"]),
        ("lz4", "lz4", "lz4", &["-l"]),
        ("lz4-frame", "lz4", "lz4", &[]),
        ("bzip2", "bzip2", "bzip2", &[]),
    ];

    /// More of what the tools can write: other xz checks and filters,
    /// lz4 frames of small linked blocks with every checksum.
    const VARIANTS: [Compressor; 6] = [
        ("xz", "xz-utils", "xz", &["--check=crc64"]),
        ("xz", "xz-utils", "xz", &["--check=sha256"]),
        ("xz", "xz-utils", "xz", &["--check=none"]),
        (
            "xz",
            "xz-utils",
            "xz",
            &["--check=crc32", "--x86", "--lzma2=dict=1MiB"],
        ),
        ("lzma", "xz-utils", "xz", &["--format=lzma", "-9"]),
        (
            "lz4-frame",
            "lz4",
            "lz4",
            &["-B4", "-BD", "-BX", "--content-size"],
        ),
    ];

    fn compress(how: &Compressor, data: &[u8]) -> Vec<u8> {
        let (_, package, tool, args) = how;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in"), data).unwrap();
        let mut all = args.to_vec();
        all.extend(["-c", "in"]);
        run(package, tool, &all, dir.path(), None)
    }

    /// Text that compresses about as well as a kernel module.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(format!("{:x} ", x >> 52).as_bytes());
        }
        out.truncate(len);
        out
    }

    /// An archive packed by `cpio -o -H newc` and the names `cpio -t`
    /// lists in it.
    struct Packed {
        archive: Vec<u8>,
        names: BTreeSet<String>,
    }

    /// Packs `files` (path, contents; a contents of `->target` is a
    /// symbolic link) with cpio.
    fn pack(files: &[(&str, Vec<u8>)]) -> Packed {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        for (path, data) in files {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            match data.strip_prefix(b"->") {
                Some(target) => {
                    std::os::unix::fs::symlink(std::str::from_utf8(target).unwrap(), &p).unwrap()
                }
                None => std::fs::write(&p, data).unwrap(),
            }
        }
        let list = run(
            "findutils",
            "find",
            &[".", "-mindepth", "1", "-printf", "%P\\n"],
            &tree,
            None,
        );
        std::fs::write(dir.path().join("list"), &list).unwrap();
        let cpio_args = ["-o", "-H", "newc", "--quiet"];
        let archive = run(
            "cpio",
            "cpio",
            &cpio_args,
            &tree,
            Some(&dir.path().join("list")),
        );
        std::fs::write(dir.path().join("archive"), &archive).unwrap();
        let listed = run(
            "cpio",
            "cpio",
            &["-t", "--quiet"],
            dir.path(),
            Some(&dir.path().join("archive")),
        );
        let names: BTreeSet<String> = String::from_utf8(listed)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert!(names.len() >= files.len(), "{names:?}");
        Packed { archive, names }
    }

    /// A main archive like a small dracut one; `big` adds a 9 MiB file,
    /// more than one lz4 legacy block (8 MiB) and several bzip2 blocks.
    fn main_archive(big: bool) -> Packed {
        let m = "usr/lib/modules/6.1.0/kernel/drivers";
        let mut files = vec![
            (format!("{m}/block/virtio_blk.ko"), text(40 << 10, 1)),
            (format!("{m}/scsi/virtio_scsi.ko.xz"), text(3000, 2)),
            (format!("{m}/virtio/virtio_pci.ko.zst"), text(5000, 3)),
            (format!("{m}/net/virtio_net.ko"), text(20 << 10, 4)),
            ("usr/lib/dracut/hostonly-files".into(), Vec::new()),
            ("init".into(), b"#!/bin/sh\nexec /sbin/init\n".to_vec()),
            ("bin".into(), b"->usr/bin".to_vec()),
            ("usr/bin/sh".into(), text(100, 5)),
        ];
        if big {
            let mut data = text(1 << 20, 6);
            data.resize(9 << 20, 0);
            files.push(("usr/lib/firmware/big.bin".into(), data));
        }
        let files: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
        pack(&files)
    }

    fn early_archive() -> Packed {
        pack(&[("kernel/x86/microcode/GenuineIntel.bin", text(10 << 10, 7))])
    }

    fn virtio_modules() -> BTreeSet<String> {
        ["virtio_blk", "virtio_net", "virtio_pci", "virtio_scsi"]
            .map(String::from)
            .into()
    }

    #[test]
    fn real_compressors_main_archive_names_match_cpio_t() {
        let main = main_archive(false);
        for how in COMPRESSORS.iter().chain(&VARIANTS) {
            let compressed = compress(how, &main.archive);
            for chunk in [1, 13, 4096, 1 << 20] {
                let c = scan(&compressed, chunk)
                    .unwrap_or_else(|e| panic!("{how:?}, chunks of {chunk}: {e}"));
                assert_eq!(c.names, main.names, "{how:?}, chunks of {chunk}");
                assert_eq!(c.archives, [how.0], "{how:?}");
                assert_eq!(c.complete, 1, "{how:?}");
                assert_eq!(c.modules(), virtio_modules(), "{how:?}");
                assert!(c.dracut_hostonly(), "{how:?}");
            }
        }
    }

    #[test]
    fn early_microcode_then_big_compressed_main_archive_names_match_cpio_t() {
        let early = early_archive();
        let main = main_archive(true);
        let want: BTreeSet<String> = early.names.union(&main.names).cloned().collect();
        for how in &COMPRESSORS {
            let mut all = early.archive.clone();
            all.extend_from_slice(&[0u8; 512]); // padding between archives
            all.extend_from_slice(&compress(how, &main.archive));
            for chunk in [4093, 1 << 20] {
                let c =
                    scan(&all, chunk).unwrap_or_else(|e| panic!("{how:?}, chunks of {chunk}: {e}"));
                assert_eq!(c.names, want, "{how:?}, chunks of {chunk}");
                assert_eq!(c.archives, ["none", how.0], "{how:?}");
                assert_eq!(c.complete, 2, "{how:?}");
                assert_eq!(c.modules(), virtio_modules(), "{how:?}");
            }
        }
    }

    #[test]
    fn archives_after_a_compressed_one_are_read_too() {
        // As the kernel does: after a compressed stream's end, padding,
        // then any archive.
        let main = main_archive(false);
        let late = cpio(&[("late/file", b"x")]);
        for how in &COMPRESSORS {
            let compressed = compress(how, &main.archive);
            let mut all = compressed.clone();
            all.extend_from_slice(&[0u8; 8]);
            all.extend_from_slice(&late);
            all.extend_from_slice(&compressed);
            for chunk in [1, 4093, 1 << 20] {
                let c =
                    scan(&all, chunk).unwrap_or_else(|e| panic!("{how:?}, chunks of {chunk}: {e}"));
                assert_eq!(c.archives, [how.0, "none", how.0], "{how:?}");
                assert_eq!(c.complete, 3, "{how:?}");
                assert!(c.names.contains("late/file"), "{how:?}");
                assert_eq!(c.names.len(), main.names.len() + 1, "{how:?}");
            }
        }
    }

    #[test]
    fn lz4_legacy_streams_one_after_another_read_as_one_archive() {
        // `unlz4` reads on over a new magic: two `lz4 -l` outputs, each
        // with half of the archive, are one archive.
        let main = main_archive(false);
        let (a, b) = main.archive.split_at(main.archive.len() / 2 + 3);
        let mut all = compress(&COMPRESSORS[2], a);
        all.extend_from_slice(&compress(&COMPRESSORS[2], b));
        let c = scan(&all, 4093).unwrap();
        assert_eq!(c.names, main.names);
        assert_eq!(c.archives, ["lz4"]);
    }

    #[test]
    fn truncated_compressed_archives_are_errors() {
        let main = main_archive(false);
        for how in &COMPRESSORS {
            let compressed = compress(how, &main.archive);
            let len = compressed.len();
            for cut in [6, 12, len / 3, len / 2, len - 5, len - 1] {
                let r = scan(&compressed[..cut], 4096);
                // .lzma has no checksum or size: its last byte may only
                // feed the range coder's final normalisation, after the
                // end marker, so losing it can lose nothing. Then every
                // member must have been read.
                if how.0 == "lzma" && cut == len - 1 {
                    if let Ok(c) = &r {
                        assert_eq!(c.names, main.names, "{how:?} cut to {cut} of {len}");
                        continue;
                    }
                }
                assert!(r.is_err(), "{how:?} cut to {cut} of {len}: {r:?}");
            }
        }
    }

    #[test]
    fn bit_flips_never_panic_and_checked_formats_never_misread() {
        // xz, bzip2 and lz4 frames carry checksums: a flipped bit is an
        // error, or a flip that changes nothing read. lzma and lz4 legacy
        // have none: a flip may change a name, but never panics or hangs.
        let archive = cpio(&[
            (
                "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko",
                b"module",
            ),
            ("usr/lib/dracut/hostonly-files", b""),
            ("init", b"#!/bin/sh\n"),
        ]);
        let want = scan(&archive, 4096).unwrap().names;
        for how in &COMPRESSORS {
            let checked = !matches!(how.0, "lzma" | "lz4");
            let compressed = compress(how, &archive);
            for i in 0..compressed.len() {
                let mut damaged = compressed.clone();
                damaged[i] ^= 1 << (i % 8);
                let r = scan(&damaged, 64);
                if let (true, Ok(c)) = (checked, r) {
                    assert_eq!(c.names, want, "{how:?}, bit {} of byte {i}", i % 8);
                }
            }
        }
    }

    #[test]
    fn garbage_after_each_magic_is_an_error() {
        let magics: [&[u8]; 6] = [
            &[0xfd, b'7', b'z', b'X', b'Z', 0],
            &[0x5d, 0, 0, 0x80, 0],
            b"BZh9",
            &[0x02, 0x21, 0x4c, 0x18],
            &[0x04, 0x22, 0x4d, 0x18],
            &[0x04, 0x22, 0x4d, 0x18, 0x64, 0x40],
        ];
        for magic in magics {
            for garbage in [text(4096, 9), vec![0xff; 4096], vec![0x01; 3]] {
                let mut all = magic.to_vec();
                all.extend_from_slice(&garbage);
                let r = scan(&all, 100);
                assert!(r.is_err(), "{magic:02x?} + {:02x?}: {r:?}", &garbage[..3]);
            }
        }
    }

    #[test]
    fn compressed_bombs_stop_at_the_inflated_limit() {
        // A complete archive, then 2 MiB of zeros in the same stream; with
        // the limit lowered to 1 MiB. Read in full under the real limit.
        let mut data = cpio(&[("init", b"#!/bin/sh\n")]);
        data.resize(data.len() + (2 << 20), 0);
        for how in &COMPRESSORS {
            let compressed = compress(how, &data);
            assert!(compressed.len() < 64 << 10, "{how:?}");
            let e = scan_limited(&compressed, 4096, 1 << 20).unwrap_err();
            assert!(
                e.to_string().contains("inflates to more than"),
                "{how:?}: {e}"
            );
            let c = scan(&compressed, 4096).unwrap();
            assert_eq!(c.names.len(), 1, "{how:?}");
        }
    }

    #[test]
    fn oversized_dictionaries_and_blocks_are_refused() {
        // An lzma header that asks for a 1 GiB dictionary.
        let mut lzma = vec![0x5d, 0, 0, 0, 0x40];
        lzma.extend_from_slice(&[0xff; 8]);
        lzma.extend_from_slice(&[0; 64]);
        let e = scan(&lzma, 4096).unwrap_err();
        assert!(e.to_string().contains("needs more than the 128 MiB"), "{e}");
        // An lz4 legacy block of 2 GiB.
        let lz4 = [0x02, 0x21, 0x4c, 0x18, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3];
        let e = scan(&lz4, 4096).unwrap_err();
        assert!(e.to_string().contains("over the"), "{e}");
        // An lz4 frame whose first block claims 8 MiB.
        let mut frame = compress(&COMPRESSORS[3], &cpio(&[("init", b"")]));
        frame[7..11].copy_from_slice(&(8u32 << 20).to_le_bytes());
        let e = scan(&frame, 4096).unwrap_err();
        assert!(e.to_string().contains("maximum"), "{e}");
    }

    #[test]
    fn many_archives_in_one_write_are_read_without_recursion() {
        let one = cpio(&[]);
        let all = one.repeat(50_000);
        let c = scan(&all, all.len()).unwrap();
        assert_eq!(c.complete, 50_000);
    }
}
