//! The copy engine: convert, compare and map, through the block traits only.
//!
//! Convert walks the source in aligned windows. A window the source's map
//! says reads as zero is skipped (or zeroed in a target that is not
//! zero-initialized); any other window is read, split into data and zero
//! units (zero detection at `-S` granularity, never finer than the target's
//! allocation unit), and encoded on worker threads, so decompression and
//! compression use every core. The writer plans each window's placement in
//! guest order; the data writes themselves run in parallel.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::block::{
    BlockState, Chunk, Encoder, Extent, ImageReader, ImageWriter, Packed, WritePlan,
};
use crate::error::{Error, ErrorKind, Result};

/// How `convert` treats zeros and parallelism.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Bytes that must be zero to be skipped (`-S`); 0 writes everything.
    pub min_sparse: u64,
    /// The target already reads as zero everywhere (`--target-is-zero`).
    pub target_is_zero: bool,
    /// Worker threads for reading and encoding.
    pub threads: usize,
    /// Polled between windows: when set, the copy stops with an error.
    pub cancel: Option<&'static AtomicBool>,
    /// Write the target in guest order, as qemu-img does unless `-W`:
    /// reads and compression still overlap, but each window's data is
    /// written before the next window's. `false` (`-W`) lets workers write
    /// as they finish.
    pub in_order: bool,
    /// The target's backing file (`convert -B`), opened: only what the
    /// source's top image holds is written (its data, and zeros where it
    /// says zero); what the source reads from its own backing chain is
    /// left unallocated, to read through to this file. A target cluster
    /// only partly written gets the rest from this file (copy on write).
    pub target_backing: Option<Arc<dyn ImageReader>>,
}

/// The copy's workers: as many as the CPUs this process may use (its
/// cgroup's quota included), at most 8 — beyond that the disk, not the
/// CPU, limits a copy, and the cap bounds memory (2 MiB windows in flight
/// per worker). Asked once: call it before a sandbox that would keep the
/// cgroup files from being read.
pub fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(8)))
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            min_sparse: 4096,
            target_is_zero: false,
            threads: default_threads(),
            cancel: None,
            in_order: true,
            target_backing: None,
        }
    }
}

const WINDOW: u64 = 2 << 20;

/// Copies `src` into `dst` (which must be at least as large), calling
/// `progress(done, total)` as windows complete.
///
/// Each worker takes the next window, reads and encodes it, then waits for
/// its turn to have the writer plan it (metadata, in guest order, under one
/// lock) and performs the planned writes itself, outside the lock: reads,
/// compression and data writes of different windows all overlap.
pub fn convert(
    src: &dyn ImageReader,
    dst: &mut dyn ImageWriter,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let size = src.size();
    if dst.size() < size {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "target is {} bytes, smaller than the source's {size}",
                dst.size()
            ),
        ));
    }
    let gran = dst.granularity().max(512);
    let job = Job {
        src,
        encoder: dst.encoder(),
        window: WINDOW.max(gran) / gran * gran,
        // Zero detection never splits an allocation unit of the target.
        unit: opts.min_sparse.div_ceil(gran) * gran,
        skip_zeros: dst.zero_initialized() || opts.target_is_zero,
        in_order: opts.in_order,
        gran,
        compressed: dst.compresses(),
        target_backing: opts.target_backing.clone(),
        size,
        cancel: opts.cancel,
        next_window: AtomicU64::new(0),
        pool: BufferPool::default(),
        turn: Mutex::new(Turn {
            dst,
            next: 0,
            done: 0,
            error: None,
        }),
        turn_changed: Condvar::new(),
        progress,
    };
    std::thread::scope(|scope| {
        for _ in 0..opts.threads.max(1) {
            scope.spawn(|| job.work());
        }
    });
    let turn = job.turn.into_inner().unwrap_or_else(|p| p.into_inner());
    match turn.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What one window of the source turned into: pieces of its buffer.
enum Piece {
    Data {
        offset: u64,
        range: Range<usize>,
        packed: Packed,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// Left unallocated: the target's backing file shows through.
    Below {
        len: u64,
    },
}

/// A window read and split into pieces.
struct Window {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
}

/// The writer, and whose turn it is to use it.
struct Turn<'a> {
    dst: &'a mut dyn ImageWriter,
    /// The window whose pieces are planned next.
    next: u64,
    /// Bytes planned so far.
    done: u64,
    /// The first error; set, it stops every worker.
    error: Option<Error>,
}

/// One convert, shared by its workers.
struct Job<'a> {
    src: &'a dyn ImageReader,
    encoder: Arc<dyn Encoder>,
    window: u64,
    unit: u64,
    skip_zeros: bool,
    in_order: bool,
    gran: u64,
    compressed: bool,
    target_backing: Option<Arc<dyn ImageReader>>,
    size: u64,
    cancel: Option<&'static AtomicBool>,
    next_window: AtomicU64,
    pool: BufferPool,
    turn: Mutex<Turn<'a>>,
    turn_changed: Condvar,
    progress: &'a (dyn Fn(u64, u64) + Sync),
}

impl<'a> Job<'a> {
    fn lock(&self) -> MutexGuard<'_, Turn<'a>> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the first error and wakes everyone so they stop.
    fn fail(&self, e: Error) {
        let mut t = self.lock();
        t.error.get_or_insert(e);
        self.turn_changed.notify_all();
    }

    /// Copies windows until none are left or the job fails. A panic
    /// anywhere in a driver (reading, encoding, planning, writing) fails
    /// the job instead of leaving other workers waiting for a turn that
    /// never comes.
    fn work(&self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.windows()));
        if outcome.is_err() {
            self.fail(Error::new(
                ErrorKind::Io,
                "internal error in the copy (a driver panicked)",
            ));
        }
    }

    fn windows(&self) {
        loop {
            if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                self.fail(Error::new(ErrorKind::Io, "interrupted"));
                return;
            }
            let w = self.next_window.fetch_add(1, Ordering::Relaxed);
            let start = w * self.window;
            if start >= self.size || self.lock().error.is_some() {
                return;
            }
            let len = self.window.min(self.size - start);
            // A panic in a driver becomes this window's error instead of
            // leaving the next window waiting for its turn forever.
            let window = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match &self.target_backing {
                    Some(below) => process_window_top(
                        &self.pool,
                        self.src,
                        below.as_ref(),
                        &*self.encoder,
                        start,
                        len,
                        self.unit,
                        self.gran,
                        self.compressed,
                    ),
                    None => process_window(
                        &self.pool,
                        self.src,
                        &*self.encoder,
                        start,
                        len,
                        self.unit,
                        self.gran,
                    ),
                }
            }))
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Io,
                    format!("internal error while copying the window at {start:#x}"),
                ))
            });
            let Some((buf, plans, done)) = self.plan_in_turn(w, window) else {
                return;
            };
            for (plan, range) in plans {
                if let Err(e) = plan.execute(&buf[range]) {
                    self.fail(e);
                    return;
                }
            }
            self.pool.put(buf);
            (self.progress)(done.min(self.size), self.size);
        }
    }

    /// Waits for window `w`'s turn and has the writer plan its pieces.
    /// Returns the window's buffer, the plans (with the range of the buffer
    /// each writes) and the bytes done, or `None` when the job failed.
    #[allow(clippy::type_complexity)]
    fn plan_in_turn(
        &self,
        w: u64,
        window: Result<Window>,
    ) -> Option<(Vec<u8>, Vec<(WritePlan, Range<usize>)>, u64)> {
        let mut t = self.lock();
        while t.next != w && t.error.is_none() {
            t = self.turn_changed.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        if t.error.is_some() {
            return None;
        }
        let mut plans = Vec::new();
        let outcome = window.and_then(|window| {
            for piece in &window.pieces {
                match piece {
                    Piece::Data {
                        offset,
                        range,
                        packed,
                    } => {
                        t.done += range.len() as u64;
                        let chunk = Chunk {
                            offset: *offset,
                            data: &window.buf[range.clone()],
                            compressed: packed.as_deref(),
                        };
                        let plan = t.dst.plan(&chunk)?;
                        plans.push((plan, range.clone()));
                    }
                    Piece::Zero { offset, len } => {
                        t.done += len;
                        if !self.skip_zeros {
                            t.dst.write_zeroes(*offset, *len)?;
                        }
                    }
                    Piece::Below { len } => t.done += len,
                }
            }
            Ok(window.buf)
        });
        let outcome = outcome.and_then(|buf| {
            // In order: this window's data is written before the turn
            // passes on.
            if self.in_order {
                for (plan, range) in plans.drain(..) {
                    plan.execute(&buf[range])?;
                }
            }
            Ok(buf)
        });
        let buf = match outcome {
            Ok(buf) => buf,
            Err(e) => {
                t.error.get_or_insert(e);
                self.turn_changed.notify_all();
                return None;
            }
        };
        t.next += 1;
        let done = t.done;
        self.turn_changed.notify_all();
        Some((buf, plans, done))
    }
}

/// Window buffers, reused so that each window does not fault in and zero
/// fresh memory.
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// A buffer of `len` bytes (contents unspecified: callers overwrite it).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // One buffer per worker is all that is ever in use at once.
        if buf.capacity() > 0 && pool.len() < 16 {
            pool.push(buf);
        }
    }
}

/// Where a byte of a window comes from when the target has a backing file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// The source's top image holds data here.
    Top,
    /// The source's top image says zero (or has no backing to defer to).
    Zero,
    /// The source reads this from its backing chain: not written.
    Below,
    /// The source's top image says zero where the target's backing file
    /// has ended: the target reads zeros there by itself.
    PostZero,
}

/// Reads one window for a target with a backing file (`convert -B`): per
/// target cluster, one wholly from the source's backing chain is left
/// unallocated; any other is written whole — the source top's data, its
/// zeros, and for the rest the target backing's bytes (copy on write) or,
/// for a compressed target, the source's own (qemu-img reads a whole
/// cluster for a compressed write) — and split into data and zero runs at
/// `unit`.
#[allow(clippy::too_many_arguments)]
fn process_window_top(
    pool: &BufferPool,
    src: &dyn ImageReader,
    below: &dyn ImageReader,
    encoder: &dyn Encoder,
    start: u64,
    len: u64,
    unit: u64,
    gran: u64,
    compressed: bool,
) -> Result<Window> {
    // The source's layers over the window.
    let mut spans: Vec<(u64, u64, Layer)> = Vec::new();
    let mut pos = start;
    while pos < start + len {
        let e = src.map(pos, start + len - pos)?;
        if e.len == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("map made no progress at offset {pos:#x}"),
            )
            .at_path(src.path()));
        }
        let layer = if e.depth > 0 {
            Layer::Below
        } else if e.reads_as_zero() {
            Layer::Zero
        } else {
            Layer::Top
        };
        let n = e.len.min(start + len - e.start);
        // Past the target backing file's end the target reads zeros by
        // itself: zeros there are left unallocated (qemu-img's
        // post-backing zeros).
        let end_below = below.size();
        if layer == Layer::Zero && e.start + n > end_below {
            if e.start < end_below {
                spans.push((e.start, end_below - e.start, Layer::Zero));
            }
            let from = e.start.max(end_below);
            spans.push((from, e.start + n - from, Layer::PostZero));
        } else {
            spans.push((e.start, n, layer));
        }
        pos = e.end().min(start + len);
    }
    if spans.iter().all(|s| s.2 == Layer::Below) || spans.iter().all(|s| s.2 == Layer::PostZero) {
        return Ok(Window {
            buf: Vec::new(),
            pieces: vec![Piece::Below { len }],
        });
    }
    let mut buf = pool.take(len as usize);
    // Which layers each target cluster holds: bit 0 top data or zeros,
    // bit 1 from below, bit 2 zeros past the target backing's end.
    let mut held = vec![0u8; len.div_ceil(gran) as usize];
    for &(s, n, layer) in &spans {
        let bit = match layer {
            Layer::Top | Layer::Zero => 1,
            Layer::Below => 2,
            Layer::PostZero => 4,
        };
        for c in (s - start) / gran..=(s - start + n - 1) / gran {
            held[c as usize] |= bit;
        }
    }
    // A cluster is written when the top holds something in it; for a
    // compressed target (whole clusters only, read from the source, as
    // qemu-img does) also when it mixes the two kinds of "nothing here".
    let written: Vec<bool> = held
        .iter()
        .map(|&h| h & 1 != 0 || (compressed && h == 6))
        .collect();
    for &(s, n, layer) in &spans {
        let r = (s - start) as usize..(s - start + n) as usize;
        match layer {
            Layer::Top => src.read_at(&mut buf[r], s)?,
            Layer::Zero | Layer::PostZero => buf[r].fill(0),
            Layer::Below => {}
        }
    }
    // Copy on write: the rest of a written cluster is the target
    // backing's (zeros past its end) — or, compressed, the source's own.
    for &(s, n, layer) in &spans {
        if layer == Layer::Top || layer == Layer::Zero || (layer == Layer::PostZero && !compressed)
        {
            continue;
        }
        let mut p = s;
        while p < s + n {
            let c = (p - start) / gran;
            let c_end = (start + (c + 1) * gran).min(s + n);
            if written[c as usize] {
                let r = (p - start) as usize..(c_end - start) as usize;
                if compressed {
                    src.read_at(&mut buf[r], p)?;
                } else {
                    crate::block::read_below(Some(below), &mut buf[r], p)?;
                }
            }
            p = c_end;
        }
    }
    let data = |range: Range<usize>, buf: &[u8]| -> Result<Piece> {
        Ok(Piece::Data {
            offset: start + range.start as u64,
            packed: encoder.encode(&buf[range.clone()])?,
            range,
        })
    };
    // Runs of written clusters, split into data and zero units.
    let mut pieces = Vec::new();
    let mut c = 0usize;
    while c < written.len() {
        let w = written[c];
        let mut e = c;
        while e < written.len() && written[e] == w {
            e += 1;
        }
        let a = c * gran as usize;
        let b = (e * gran as usize).min(len as usize);
        if !w {
            pieces.push(Piece::Below {
                len: (b - a) as u64,
            });
        } else {
            let step = unit.max(gran) as usize;
            let mut p = a;
            while p < b {
                let q = (p + step).min(b);
                // Extend a run of the same kind.
                let zero = unit != 0 && is_zero(&buf[p..q]);
                let mut r = q;
                while r < b {
                    let nxt = (r + step).min(b);
                    if (unit != 0 && is_zero(&buf[r..nxt])) != zero {
                        break;
                    }
                    r = nxt;
                }
                if zero {
                    pieces.push(Piece::Zero {
                        offset: start + p as u64,
                        len: (r - p) as u64,
                    });
                } else {
                    pieces.push(data(p..r, &buf)?);
                }
                p = r;
            }
        }
        c = e;
    }
    Ok(Window { buf, pieces })
}

/// Reads one window and splits it into data and zero pieces.
#[allow(clippy::too_many_arguments)]
fn process_window(
    pool: &BufferPool,
    src: &dyn ImageReader,
    encoder: &dyn Encoder,
    start: u64,
    len: u64,
    unit: u64,
    gran: u64,
) -> Result<Window> {
    // The source's holes (what its map says reads as zero), per target
    // allocation unit: never read, and never written as data whatever
    // -S is (as qemu-img: its block status comes first, -S only splits
    // data).
    let blocks = len.div_ceil(gran) as usize;
    let mut hole = vec![unit != 0; blocks];
    if unit != 0 {
        let mut pos = start;
        while pos < start + len {
            let e = src.map(pos, start + len - pos)?;
            if e.len == 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("map made no progress at offset {pos:#x}"),
                )
                .at_path(src.path()));
            }
            if !e.reads_as_zero() {
                let first = (e.start - start) / gran;
                let last = (e.end().min(start + len) - start - 1) / gran;
                for b in first..=last {
                    hole[b as usize] = false;
                }
            }
            pos = e.end().min(start + len);
        }
        if hole.iter().all(|&h| h) {
            return Ok(Window {
                buf: Vec::new(),
                pieces: vec![Piece::Zero { offset: start, len }],
            });
        }
    }
    let mut buf = pool.take(len as usize);
    let mut b = 0;
    while b < blocks {
        let mut e = b;
        while e < blocks && hole[e] == hole[b] {
            e += 1;
        }
        let r = b * gran as usize..(e * gran as usize).min(len as usize);
        if hole[b] {
            buf[r].fill(0);
        } else {
            src.read_at(&mut buf[r.clone()], start + r.start as u64)?;
        }
        b = e;
    }
    let data = |range: Range<usize>, buf: &[u8]| -> Result<Piece> {
        Ok(Piece::Data {
            offset: start + range.start as u64,
            packed: encoder.encode(&buf[range.clone()])?,
            range,
        })
    };
    if unit == 0 {
        let pieces = vec![data(0..buf.len(), &buf)?];
        return Ok(Window { buf, pieces });
    }
    // Runs of data units and zero units.
    let mut pieces = Vec::new();
    let mut run_start = 0usize;
    let mut run_zero = None;
    let mut pos = 0usize;
    while pos < buf.len() {
        // A unit never spans a hole's edge: a hole stays zero.
        let block = pos / gran as usize;
        let mut edge = block + 1;
        while edge < blocks && hole[edge] == hole[block] {
            edge += 1;
        }
        let n = (unit as usize)
            .min(buf.len() - pos)
            .min(edge * gran as usize - pos);
        let zero = hole[block] || is_zero(&buf[pos..pos + n]);
        if run_zero != Some(zero) {
            if let Some(z) = run_zero {
                pieces.push((z, run_start, pos));
            }
            run_zero = Some(zero);
            run_start = pos;
        }
        pos += n;
    }
    if let Some(z) = run_zero {
        pieces.push((z, run_start, buf.len()));
    }
    let pieces = pieces
        .into_iter()
        .map(|(zero, a, b)| {
            if zero {
                Ok(Piece::Zero {
                    offset: start + a as u64,
                    len: (b - a) as u64,
                })
            } else {
                data(a..b, &buf)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Window { buf, pieces })
}

/// True when the map says all of `[start, start+len)` reads as zero.
fn reads_as_zero(src: &dyn ImageReader, start: u64, len: u64) -> Result<bool> {
    let mut pos = start;
    while pos < start + len {
        let e = src.map(pos, start + len - pos)?;
        if !e.reads_as_zero() || e.len == 0 {
            return Ok(false);
        }
        pos += e.len;
    }
    Ok(true)
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any initialized bytes are valid u64s; align_to only
        // reinterprets the aligned middle of the slice.
        unsafe { buf.align_to::<u64>() }
    };
    // OR whole blocks so the compiler can vectorise; stop at the first
    // block with a set bit.
    let blocks = words.chunks_exact(16);
    let rest = blocks.remainder();
    head.iter().all(|&b| b == 0)
        && blocks
            .into_iter()
            .all(|blk| blk.iter().fold(0, |acc, &w| acc | w) == 0)
        && rest.iter().all(|&w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Where two images first differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Same content (a larger image's extra bytes are all zero).
    Identical,
    /// The first 512-byte sector that differs, as qemu-img reports it.
    DiffersAt(u64),
    /// Strict: the sizes differ.
    SizeMismatch,
    /// Strict: the block status differs at this offset (allocation, zero,
    /// data, compression, a host offset, or where the status ends).
    StatusMismatch(u64),
}

/// Reads `x.len()` bytes at `pos` of both images (in parallel) and
/// returns the first differing sector, if any.
fn first_difference(
    a: &dyn ImageReader,
    b: &dyn ImageReader,
    pos: u64,
    x: &mut [u8],
    y: &mut [u8],
) -> Result<Option<u64>> {
    std::thread::scope(|s| -> Result<()> {
        let h = s.spawn(|| a.read_at(x, pos));
        b.read_at(y, pos)?;
        h.join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "reader thread panicked")))
    })?;
    Ok(x.iter()
        .zip(y.iter())
        .position(|(p, q)| p != q)
        .map(|i| sector_of(pos + i as u64)))
}

/// The first sector of a difference at byte `at`.
fn sector_of(at: u64) -> u64 {
    at & !511
}

/// Compares the guest content of two images as `qemu-img compare` does:
/// where sizes differ, the extra part of the larger one must read as zero.
pub fn compare(
    a: &dyn ImageReader,
    b: &dyn ImageReader,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Comparison> {
    let common = a.size().min(b.size());
    let total = a.size().max(b.size());
    let mut ba = vec![0u8; WINDOW as usize];
    let mut bb = vec![0u8; WINDOW as usize];
    let mut pos = 0;
    while pos < common {
        let n = WINDOW.min(common - pos);
        if !(reads_as_zero(a, pos, n)? && reads_as_zero(b, pos, n)?) {
            if let Some(at) =
                first_difference(a, b, pos, &mut ba[..n as usize], &mut bb[..n as usize])?
            {
                return Ok(Comparison::DiffersAt(at));
            }
        }
        pos += n;
        progress(pos, total);
    }
    let longer = if a.size() > b.size() { a } else { b };
    while pos < total {
        let n = WINDOW.min(total - pos);
        if !reads_as_zero(longer, pos, n)? {
            let x = &mut ba[..n as usize];
            longer.read_at(x, pos)?;
            if let Some(i) = x.iter().position(|&v| v != 0) {
                return Ok(Comparison::DiffersAt(sector_of(pos + i as u64)));
            }
        }
        pos += n;
        progress(pos, total);
    }
    Ok(Comparison::Identical)
}

/// One block-status answer as `qemu-img compare` sees it: the extent at
/// `offset` (split where QEMU's driver would split it) and its flags.
fn strict_status(r: &dyn ImageReader, offset: u64) -> Result<(Extent, [bool; 6])> {
    let size = r.size();
    // Ask no further than QEMU's answer would reach (a sparse VMDK's
    // grain): mapping the whole rest each time would be quadratic.
    let cap = r.status_end(offset);
    let len = if cap > offset {
        (cap - offset).min(size - offset)
    } else {
        size - offset
    };
    let e = r.map(offset, len)?;
    if e.len == 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("map made no progress at offset {offset:#x}"),
        )
        .at_path(r.path()));
    }
    let (allocated, zero, data) = map_flags(&e);
    let flags = [
        allocated,
        zero,
        data,
        e.state == BlockState::Compressed,
        e.host_offset.is_some(),
        // BDRV_BLOCK_EOF: the answer reaches the end of the image.
        e.end() == size,
    ];
    Ok((e, flags))
}

/// `qemu-img compare -s`: the sizes must match, and the block status of
/// both images must match everywhere (as QEMU reports it: allocation, zero,
/// data, compression, a host offset, and where each answer ends), besides
/// the content.
pub fn compare_strict(
    a: &dyn ImageReader,
    b: &dyn ImageReader,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Comparison> {
    if a.size() != b.size() {
        return Ok(Comparison::SizeMismatch);
    }
    let size = a.size();
    let mut ba = vec![0u8; WINDOW as usize];
    let mut bb = vec![0u8; WINDOW as usize];
    let mut pos = 0;
    while pos < size {
        let (ea, fa) = strict_status(a, pos)?;
        let (eb, fb) = strict_status(b, pos)?;
        if fa != fb {
            return Ok(Comparison::StatusMismatch(pos));
        }
        let mut chunk = ea.len.min(eb.len);
        let (allocated, zero) = (fa[0], fa[1]);
        if allocated && !zero {
            chunk = chunk.min(WINDOW);
            let n = chunk as usize;
            if let Some(at) = first_difference(a, b, pos, &mut ba[..n], &mut bb[..n])? {
                return Ok(Comparison::DiffersAt(at));
            }
        }
        pos += chunk;
        progress(pos, size);
    }
    Ok(Comparison::Identical)
}

/// The whole map of an image, with neighbours of the same kind merged the
/// way `qemu-img map` merges them.
pub fn map_all(src: &dyn ImageReader) -> Result<Vec<Extent>> {
    map_range(src, 0, u64::MAX)
}

/// Like [`map_all`], for the guest range from `start` of at most `len`
/// bytes (`qemu-img map --start-offset --max-length`): nothing when
/// `start` is at or past the end.
pub fn map_range(src: &dyn ImageReader, start: u64, len: u64) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = start;
    let size = start.saturating_add(len).min(src.size());
    while pos < size {
        let e = src.map(pos, size - pos)?;
        if e.len == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("map made no progress at offset {pos:#x}"),
            )
            .at_path(src.path()));
        }
        pos += e.len;
        if let Some(last) = out.last_mut() {
            let same_kind = last.state == e.state && last.depth == e.depth;
            let contiguous = match (last.host_offset, e.host_offset) {
                (Some(a), Some(b)) => a + last.len == b,
                (None, None) => true,
                _ => false,
            };
            if same_kind && contiguous {
                last.len += e.len;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// `present`, `zero`, `data` of qemu-img's map for an extent.
pub fn map_flags(e: &Extent) -> (bool, bool, bool) {
    match e.state {
        BlockState::Data | BlockState::Compressed => (true, false, true),
        BlockState::Zero => (true, true, false),
        BlockState::DataHole => (true, true, true),
        BlockState::Unallocated => (false, true, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::PlainEncoder;
    use crate::raw::RawReader;

    /// A writer whose planning panics, standing in for a driver bug.
    #[derive(Debug)]
    struct PanickingWriter;

    impl ImageWriter for PanickingWriter {
        fn size(&self) -> u64 {
            64 << 20
        }
        fn granularity(&self) -> u64 {
            4096
        }
        fn zero_initialized(&self) -> bool {
            true
        }
        fn encoder(&self) -> Arc<dyn Encoder> {
            Arc::new(PlainEncoder)
        }
        fn plan(&mut self, _: &Chunk<'_>) -> Result<WritePlan> {
            panic!("driver bug")
        }
        fn write_zeroes(&mut self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn finish_with(self: Box<Self>, _flush: bool) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn convert_with_panicking_writer_fails_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.raw");
        std::fs::write(&path, vec![0x5au8; 16 << 20]).unwrap();
        let src = RawReader::open(std::fs::File::open(&path).unwrap(), &path).unwrap();
        let opts = ConvertOptions {
            threads: 4,
            ..ConvertOptions::default()
        };
        let err = convert(&src, &mut PanickingWriter, &opts, &|_, _| {}).unwrap_err();
        assert!(err.to_string().contains("internal error"), "{err}");
    }
}
