//! A read-only reader of Windows registry hive files ("regf": `SYSTEM`,
//! `SOFTWARE`, `NTUSER.DAT`, …), written from the published descriptions
//! of the format.
//!
//! The file is read through a [`HiveSource`] at random offsets, so a
//! 100 MiB `SOFTWARE` hive never has to be in memory whole: the reader
//! keeps at most [`CACHE_PAGES`] pages of 4 KiB.
//!
//! The layout, in short: a 4096-byte base block ("regf", sequence numbers,
//! version, root cell offset, size of the hive bins, checksum), then hive
//! bins ("hbin", multiples of 4096 bytes) holding cells. A cell is a signed
//! 32-bit size (negative when allocated, a multiple of 8) followed by its
//! data; cell offsets in the file are relative to the first hive bin
//! (file offset 4096). Keys are "nk" cells, values "vk" cells; a key's
//! subkeys are listed by "lf", "lh" or "li" cells, or by an "ri" cell that
//! lists such lists; value data longer than 16344 bytes in a hive of
//! version 1.4 or later is split over segments listed by a "db" cell.
//!
//! Every offset, size and count read from the file is checked before it is
//! used. A damaged hive gives a [`HiveError`] naming the structure and its
//! file offset; no input makes the reader panic, loop, or allocate in
//! proportion to a number it read (lists are capped at
//! [`MAX_LIST_ENTRIES`], value data at [`MAX_VALUE_DATA`] unless the caller
//! asks for more).

use std::fmt;
use std::io;
use std::sync::{Mutex, PoisonError};

/// Registry value type: no type.
pub const REG_NONE: u32 = 0;
/// Registry value type: a NUL-terminated UTF-16LE string.
pub const REG_SZ: u32 = 1;
/// Registry value type: a UTF-16LE string with `%VARIABLE%` references.
pub const REG_EXPAND_SZ: u32 = 2;
/// Registry value type: raw bytes.
pub const REG_BINARY: u32 = 3;
/// Registry value type: a little-endian 32-bit number.
pub const REG_DWORD: u32 = 4;
/// Registry value type: a big-endian 32-bit number.
pub const REG_DWORD_BIG_ENDIAN: u32 = 5;
/// Registry value type: a symbolic link (a UTF-16LE registry path).
pub const REG_LINK: u32 = 6;
/// Registry value type: UTF-16LE strings, each NUL-terminated, ended by
/// an empty string.
pub const REG_MULTI_SZ: u32 = 7;
/// Registry value type: a little-endian 64-bit number.
pub const REG_QWORD: u32 = 11;

/// The most value data [`Value::data`] reads (16 MiB); use
/// [`Value::data_with_limit`] for more.
pub const MAX_VALUE_DATA: usize = vmshift_model::limits::HIVE_VALUE_BYTES;

/// The most subkeys or values one key may have here (about a million);
/// a key claiming more is reported as damaged.
pub const MAX_LIST_ENTRIES: u32 = vmshift_model::limits::HIVE_LIST_ENTRIES;

/// The most 4 KiB pages of the file the reader keeps in memory (1 MiB).
pub const CACHE_PAGES: usize = 256;

/// Size of the base block; the hive bins start right after it.
const BASE_BLOCK: u64 = 4096;
/// Size of a cache page and the unit of hive bin sizes.
const PAGE: usize = 4096;
/// Reads larger than this bypass the page cache.
const DIRECT_READ: usize = 4 * PAGE;
/// Size of the fixed part of an nk cell (before the name).
const NK_FIXED: u32 = 0x4c;
/// Size of the fixed part of a vk cell (before the name).
const VK_FIXED: u32 = 0x14;
/// nk flag: the name is stored one byte per character (Latin-1).
const NK_COMP_NAME: u16 = 0x0020;
/// vk flag: the name is stored one byte per character (Latin-1).
const VK_COMP_NAME: u16 = 0x0001;
/// Data bytes in each segment of a "db" big-data value.
const BIG_DATA_SEGMENT: u32 = 16344;
/// First minor version whose values may use "db" big-data cells.
const BIG_DATA_MINOR: u32 = 4;
/// Top bit of a vk data length: the data is stored in the offset field.
const DATA_INLINE: u32 = 0x8000_0000;

/// Random access to the bytes of a hive file.
pub trait HiveSource {
    /// The size of the file in bytes.
    fn len(&self) -> u64;

    /// Whether the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes at `offset`; reading past the end is an
    /// error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl HiveSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.as_slice();
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|range| range.end <= bytes.len());
        match range {
            Some(range) => {
                buf.copy_from_slice(&bytes[range]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at offset {offset:#x} are past the end ({:#x} bytes)",
                    buf.len(),
                    bytes.len()
                ),
            )),
        }
    }
}

/// What went wrong reading a hive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HiveError {
    /// The source could not be read.
    #[error("reading {len} bytes of the hive at file offset {offset:#x}: {source}")]
    Io {
        /// File offset of the read.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// The source's error.
        #[source]
        source: io::Error,
    },
    /// A structure of the file is damaged or breaks the format's rules.
    #[error("{what} at {offset:#x}: {msg}")]
    Corrupt {
        /// The structure, e.g. "base block", "nk cell", "subkey list".
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong, and what was expected.
        msg: String,
    },
    /// The file is a valid hive of a kind or version this reader does not
    /// read (e.g. a transaction log).
    #[error("{what} at {offset:#x}: {msg}")]
    Unsupported {
        /// The structure, e.g. "base block".
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// What is not supported.
        msg: String,
    },
    /// A value's type is not one the asked-for helper reads.
    #[error("value {name:?} has type {kind} ({}), not {expected}", kind_name(*.kind))]
    WrongType {
        /// The value's name ("" for the default value).
        name: String,
        /// Its type.
        kind: u32,
        /// The types the helper reads.
        expected: &'static str,
    },
    /// A value's data does not have the size its type needs.
    #[error("value {name:?} of type {} holds {len} bytes, expected {expected}", kind_name(*.kind))]
    BadLength {
        /// The value's name.
        name: String,
        /// Its type.
        kind: u32,
        /// The data length.
        len: u32,
        /// The length the type needs.
        expected: u32,
    },
    /// A value's data is larger than the caller's limit.
    #[error("value {name:?} holds {len} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The value's name.
        name: String,
        /// The data length.
        len: u32,
        /// The limit.
        limit: usize,
    },
}

/// The conventional name of a value type, for messages.
fn kind_name(kind: u32) -> &'static str {
    match kind {
        REG_NONE => "REG_NONE",
        REG_SZ => "REG_SZ",
        REG_EXPAND_SZ => "REG_EXPAND_SZ",
        REG_BINARY => "REG_BINARY",
        REG_DWORD => "REG_DWORD",
        REG_DWORD_BIG_ENDIAN => "REG_DWORD_BIG_ENDIAN",
        REG_LINK => "REG_LINK",
        REG_MULTI_SZ => "REG_MULTI_SZ",
        8 => "REG_RESOURCE_LIST",
        9 => "REG_FULL_RESOURCE_DESCRIPTOR",
        10 => "REG_RESOURCE_REQUIREMENTS_LIST",
        REG_QWORD => "REG_QWORD",
        _ => "unknown type",
    }
}

/// A structure in the file, for error messages.
#[derive(Debug, Clone, Copy)]
struct Loc {
    what: &'static str,
    /// File offset.
    off: u64,
}

impl Loc {
    fn err(self, msg: String) -> HiveError {
        HiveError::Corrupt {
            what: self.what,
            offset: self.off,
            msg,
        }
    }

    fn unsupported(self, msg: String) -> HiveError {
        HiveError::Unsupported {
            what: self.what,
            offset: self.off,
            msg,
        }
    }
}

/// An allocated cell: its hive offset and the length of its data.
#[derive(Debug, Clone, Copy)]
struct Cell {
    /// Offset of the size field, relative to the first hive bin.
    off: u32,
    /// Bytes of data after the size field.
    len: u32,
}

impl Cell {
    fn loc(self, what: &'static str) -> Loc {
        Loc {
            what,
            off: BASE_BLOCK + u64::from(self.off),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// A two-byte signature for messages: text when printable, else hex.
fn sig(b: &[u8]) -> String {
    if b.iter().all(|c| c.is_ascii_graphic()) {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        format!("{:02x}{:02x}", b[0], b[1])
    }
}

/// A page cache slot: the page number (`u64::MAX` when empty) and bytes.
type Slot = (u64, Box<[u8]>);

/// An open registry hive.
pub struct Hive {
    src: Box<dyn HiveSource + Send + Sync>,
    /// Bytes of hive bins, from file offset 4096.
    bins_len: u32,
    root: u32,
    minor: u32,
    dirty: bool,
    last_written: u64,
    /// Direct-mapped cache of [`CACHE_PAGES`] file pages.
    cache: Mutex<Vec<Slot>>,
}

impl fmt::Debug for Hive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hive")
            .field("len", &self.src.len())
            .field("bins_len", &self.bins_len)
            .field("root", &self.root)
            .field("minor", &self.minor)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl Hive {
    /// Opens a hive, checking its base block: the "regf" signature, the
    /// header checksum, version 1.2 to 1.6, a primary (not log) file, the
    /// size of the hive bins against the file, the first hive bin, and
    /// that the root cell is a key.
    ///
    /// Unequal sequence numbers (a hive whose last write was not
    /// completed; its transaction logs were not applied) do not fail the
    /// open: [`Hive::dirty`] reports them.
    pub fn open(src: Box<dyn HiveSource + Send + Sync>) -> Result<Hive, HiveError> {
        let base = Loc {
            what: "base block",
            off: 0,
        };
        let file_len = src.len();
        if file_len < BASE_BLOCK + PAGE as u64 {
            return Err(base.err(format!(
                "the file is {file_len} bytes, too short for a 4096-byte base block and a hive bin"
            )));
        }
        let mut bb = [0u8; 512];
        src.read_at(&mut bb, 0).map_err(|source| HiveError::Io {
            offset: 0,
            len: bb.len(),
            source,
        })?;
        if &bb[0..4] != b"regf" {
            return Err(base.err(format!(
                "signature {:02x?} is not \"regf\": not a registry hive",
                &bb[0..4]
            )));
        }
        let sum = (0..127).fold(0u32, |acc, i| acc ^ le32(&bb, i * 4));
        // Windows stores 1 for a sum of 0 and 0xfffffffe for 0xffffffff.
        let adjusted = match sum {
            0 => 1,
            u32::MAX => u32::MAX - 1,
            other => other,
        };
        let stored = le32(&bb, 0x1fc);
        if stored != sum && stored != adjusted {
            return Err(base.err(format!(
                "checksum {stored:#010x} at 0x1fc does not match the header, which sums to {sum:#010x}"
            )));
        }
        let (major, minor) = (le32(&bb, 0x14), le32(&bb, 0x18));
        if major != 1 || !(2..=6).contains(&minor) {
            return Err(base.unsupported(format!(
                "version {major}.{minor}; this reader reads versions 1.2 to 1.6"
            )));
        }
        let file_type = le32(&bb, 0x1c);
        if file_type != 0 {
            return Err(base.unsupported(format!(
                "file type {file_type} is a transaction log or other non-primary file; \
                 only primary hives (type 0) are read"
            )));
        }
        let bins_len = le32(&bb, 0x28);
        if bins_len == 0
            || !bins_len.is_multiple_of(PAGE as u32)
            || BASE_BLOCK + u64::from(bins_len) > file_len
        {
            return Err(base.err(format!(
                "hive bins size {bins_len:#x} at 0x28 must be a non-zero multiple of 4096 \
                 that fits in the file after the base block ({file_len:#x} bytes)"
            )));
        }
        let hive = Hive {
            src,
            bins_len,
            root: le32(&bb, 0x24),
            minor,
            dirty: le32(&bb, 0x04) != le32(&bb, 0x08),
            last_written: le64(&bb, 0x0c),
            cache: Mutex::new(vec![(u64::MAX, Box::default()); CACHE_PAGES]),
        };
        let mut hbin = [0u8; 8];
        hive.read_bins(0, &mut hbin)?;
        if &hbin[0..4] != b"hbin" || le32(&hbin, 4) != 0 {
            return Err(Loc {
                what: "first hive bin",
                off: BASE_BLOCK,
            }
            .err(format!(
                "header {:02x?} is not \"hbin\" with offset 0",
                &hbin
            )));
        }
        hive.root()?;
        Ok(hive)
    }

    /// Whether the hive is dirty: its primary and secondary sequence
    /// numbers differ, so its last write did not complete and changes may
    /// be in the transaction logs (`.LOG1`, `.LOG2`) that this reader does
    /// not apply.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// The minor format version (the major is always 1): 3 for Windows
    /// XP, 5 for Windows Vista and later, 6 for some Windows 10 hives.
    pub fn minor_version(&self) -> u32 {
        self.minor
    }

    /// When the hive was last written, as a Windows FILETIME (100 ns since
    /// 1601-01-01 UTC).
    pub fn last_written(&self) -> u64 {
        self.last_written
    }

    /// The root key.
    pub fn root(&self) -> Result<Key<'_>, HiveError> {
        let base = Loc {
            what: "base block",
            off: 0,
        };
        self.key_at(base, "root cell", self.root)
    }

    /// The key at `path` below the root, such as
    /// `ControlSet001\Services\viostor`, matching each name
    /// case-insensitively; `None` when a key on the way does not exist.
    /// Leading, trailing and doubled backslashes are ignored; an empty
    /// path is the root.
    pub fn open_path(&self, path: &str) -> Result<Option<Key<'_>>, HiveError> {
        let mut key = self.root()?;
        for name in path.split('\\').filter(|name| !name.is_empty()) {
            match key.subkey(name)? {
                Some(next) => key = next,
                None => return Ok(None),
            }
        }
        Ok(Some(key))
    }

    /// Reads `buf.len()` bytes at hive offset `off` (relative to the first
    /// hive bin); the caller has checked the range lies in the hive bins.
    fn read_bins(&self, off: u32, buf: &mut [u8]) -> Result<(), HiveError> {
        let start = BASE_BLOCK + u64::from(off);
        let len = buf.len();
        if len > DIRECT_READ {
            return self
                .src
                .read_at(buf, start)
                .map_err(|source| HiveError::Io {
                    offset: start,
                    len,
                    source,
                });
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let mut done = 0;
        while done < buf.len() {
            let pos = start + done as u64;
            let page = pos / PAGE as u64;
            let in_page = (pos % PAGE as u64) as usize;
            let n = (PAGE - in_page).min(buf.len() - done);
            let slot = &mut cache[(page % CACHE_PAGES as u64) as usize];
            if slot.0 != page {
                let mut bytes = vec![0u8; PAGE].into_boxed_slice();
                self.src
                    .read_at(&mut bytes, page * PAGE as u64)
                    .map_err(|source| HiveError::Io {
                        offset: page * PAGE as u64,
                        len: PAGE,
                        source,
                    })?;
                *slot = (page, bytes);
            }
            buf[done..done + n].copy_from_slice(&slot.1[in_page..in_page + n]);
            done += n;
        }
        Ok(())
    }

    /// The allocated cell at hive offset `off`, which the structure at
    /// `from` names in its field `field`.
    fn cell(&self, from: Loc, field: &'static str, off: u32) -> Result<Cell, HiveError> {
        let bins = self.bins_len;
        if u64::from(off) + 8 > u64::from(bins) {
            return Err(from.err(format!(
                "{field} offset {off:#x} is outside the hive bins ({bins:#x} bytes)"
            )));
        }
        if !off.is_multiple_of(8) {
            return Err(from.err(format!(
                "{field} offset {off:#x} is not a multiple of 8, so not a cell"
            )));
        }
        let mut size = [0u8; 4];
        self.read_bins(off, &mut size)?;
        let size = i32::from_le_bytes(size);
        let at = Cell { off, len: 0 }.loc(field);
        if size >= 0 {
            return Err(at.err(format!(
                "the cell is free (size {size:#x}), but {} at {:#x} uses it",
                from.what, from.off
            )));
        }
        let abs = size.unsigned_abs();
        if !abs.is_multiple_of(8) || abs < 8 {
            return Err(at.err(format!(
                "cell size {abs:#x} is not a multiple of 8 of at least 8"
            )));
        }
        if u64::from(off) + u64::from(abs) > u64::from(bins) {
            return Err(at.err(format!(
                "cell of {abs:#x} bytes runs past the end of the hive bins ({bins:#x} bytes)"
            )));
        }
        Ok(Cell { off, len: abs - 4 })
    }

    /// `len` bytes at `at` in the data of `cell` (a `what`).
    fn cell_bytes(
        &self,
        cell: Cell,
        what: &'static str,
        at: u32,
        len: u32,
    ) -> Result<Vec<u8>, HiveError> {
        if u64::from(at) + u64::from(len) > u64::from(cell.len) {
            return Err(cell.loc(what).err(format!(
                "needs {len} bytes at {at:#x} of its data, but the cell holds {} bytes",
                cell.len
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_bins(cell.off + 4 + at, &mut buf)?;
        Ok(buf)
    }

    /// The fixed part, `len` bytes, of the structure with signature
    /// `signature` in `cell`, which `field` of `from` names.
    fn structure(
        &self,
        cell: Cell,
        here: Loc,
        signature: &[u8; 2],
        len: u32,
        from: Loc,
        field: &'static str,
    ) -> Result<Vec<u8>, HiveError> {
        let head = self.cell_bytes(cell, here.what, 0, 2)?;
        if head != signature {
            return Err(here.err(format!(
                "signature {} is not {:?} ({field} of {} at {:#x})",
                sig(&head),
                String::from_utf8_lossy(signature),
                from.what,
                from.off
            )));
        }
        self.cell_bytes(cell, here.what, 0, len)
    }

    /// The key whose nk cell is at `off`.
    fn key_at(&self, from: Loc, field: &'static str, off: u32) -> Result<Key<'_>, HiveError> {
        let cell = self.cell(from, field, off)?;
        let here = cell.loc("nk cell");
        let fixed = self.structure(cell, here, b"nk", NK_FIXED, from, field)?;
        let flags = le16(&fixed, 0x02);
        let name_len = le16(&fixed, 0x48);
        let raw = self.cell_bytes(cell, "nk cell", NK_FIXED, u32::from(name_len))?;
        Ok(Key {
            hive: self,
            off,
            name: decode_name(&raw, flags & NK_COMP_NAME != 0, here)?,
            last_written: le64(&fixed, 0x04),
            parent: le32(&fixed, 0x10),
            subkey_count: le32(&fixed, 0x14),
            subkey_list: le32(&fixed, 0x1c),
            value_count: le32(&fixed, 0x24),
            value_list: le32(&fixed, 0x28),
        })
    }

    /// Appends the entries of the subkey list at `off` to `out`; an "ri"
    /// list (only at `depth` 0) is followed into its lists. At most `max`
    /// entries are taken.
    fn collect_subkeys(
        &self,
        from: Loc,
        field: &'static str,
        off: u32,
        depth: u8,
        max: u32,
        out: &mut Vec<Entry>,
    ) -> Result<(), HiveError> {
        let cell = self.cell(from, field, off)?;
        let here = cell.loc("subkey list");
        let head = self.cell_bytes(cell, "subkey list", 0, 4)?;
        let count = u32::from(le16(&head, 2));
        let kind = [head[0], head[1]];
        let (entry, indirect) = match &kind {
            b"lf" | b"lh" => (8, false),
            b"li" => (4, false),
            b"ri" => (4, true),
            other => {
                return Err(here.err(format!(
                    "signature {} is not lf, lh, li or ri ({field} of {} at {:#x})",
                    sig(other),
                    from.what,
                    from.off
                )))
            }
        };
        if indirect && depth > 0 {
            return Err(here.err(
                "an ri list inside an ri list; an ri list may only point at lf, lh or li lists"
                    .to_string(),
            ));
        }
        if !indirect && out.len() as u64 + u64::from(count) > u64::from(max) {
            return Err(here.err(format!(
                "its {count} entries make more subkeys than the {max} of the key ({} at {:#x})",
                from.what, from.off
            )));
        }
        let entries = self.cell_bytes(cell, "subkey list", 4, count * entry)?;
        for chunk in entries.chunks_exact(entry as usize) {
            let target = le32(chunk, 0);
            let hint = match &kind {
                b"lf" => Hint::Prefix([chunk[4], chunk[5], chunk[6], chunk[7]]),
                b"lh" => Hint::Hash(le32(chunk, 4)),
                _ => Hint::None,
            };
            if indirect {
                self.collect_subkeys(here, "ri entry", target, depth + 1, max, out)?;
            } else {
                out.push(Entry { off: target, hint });
            }
        }
        Ok(())
    }

    /// The value whose vk cell is at `off`.
    fn value_at(&self, from: Loc, off: u32) -> Result<Value<'_>, HiveError> {
        let cell = self.cell(from, "value", off)?;
        let here = cell.loc("vk cell");
        let fixed = self.structure(cell, here, b"vk", VK_FIXED, from, "value")?;
        let name_len = le16(&fixed, 0x02);
        let flags = le16(&fixed, 0x10);
        let raw = self.cell_bytes(cell, "vk cell", VK_FIXED, u32::from(name_len))?;
        Ok(Value {
            hive: self,
            off,
            name: decode_name(&raw, flags & VK_COMP_NAME != 0, here)?,
            raw_len: le32(&fixed, 0x04),
            data_off: le32(&fixed, 0x08),
            kind: le32(&fixed, 0x0c),
        })
    }

    /// Reads value data of `len` bytes that does not fit in its cell: the
    /// "db" big-data cell at `db`, its segment list and segments.
    fn big_data(&self, db: Cell, len: u32) -> Result<Vec<u8>, HiveError> {
        let here = db.loc("db cell");
        let head = self.cell_bytes(db, "db cell", 0, 8)?;
        let segments = u32::from(le16(&head, 2));
        let needed = len.div_ceil(BIG_DATA_SEGMENT);
        if segments < needed {
            return Err(here.err(format!(
                "{segments} segments of {BIG_DATA_SEGMENT} bytes cannot hold the value's {len} bytes"
            )));
        }
        let list = self.cell(here, "segment list", le32(&head, 4))?;
        let offsets = self.cell_bytes(list, "segment list", 0, needed * 4)?;
        let mut data = Vec::with_capacity(len as usize);
        for chunk in offsets.chunks_exact(4) {
            let seg = self.cell(list.loc("segment list"), "segment", le32(chunk, 0))?;
            let take = (len - data.len() as u32).min(BIG_DATA_SEGMENT);
            data.extend(self.cell_bytes(seg, "segment", 0, take)?);
        }
        Ok(data)
    }
}

/// Decodes an nk or vk name: Latin-1 when `compressed`, else UTF-16LE.
fn decode_name(raw: &[u8], compressed: bool, here: Loc) -> Result<String, HiveError> {
    if compressed {
        return Ok(raw.iter().map(|&b| char::from(b)).collect());
    }
    if !raw.len().is_multiple_of(2) {
        return Err(here.err(format!("UTF-16 name of odd length {} bytes", raw.len())));
    }
    Ok(utf16(raw, false))
}

/// Decodes UTF-16LE (an odd last byte is ignored), up to the first NUL
/// when `to_nul`.
fn utf16(raw: &[u8], to_nul: bool) -> String {
    let units = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| !to_nul || u != 0);
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Compares names as Windows does: case-insensitively, one character at
/// a time.
fn same_name(a: &str, b: &str) -> bool {
    fn upper(c: char) -> char {
        let mut up = c.to_uppercase();
        match (up.next(), up.next()) {
            (Some(u), None) => u,
            _ => c,
        }
    }
    a.chars().map(upper).eq(b.chars().map(upper))
}

/// An entry of a subkey list: the nk offset and what the list says of
/// the name.
#[derive(Debug, Clone, Copy)]
struct Entry {
    off: u32,
    hint: Hint,
}

/// The name hint of a subkey list entry.
#[derive(Debug, Clone, Copy)]
enum Hint {
    /// "li" lists have none.
    None,
    /// "lf": the first 4 bytes of the name (0-padded).
    Prefix([u8; 4]),
    /// "lh": the name's hash: h = h * 37 + upper-case character.
    Hash(u32),
}

/// A name looked up, prepared to test hints so that only matching subkeys'
/// nk cells are read.
struct Probe {
    /// The upper-case name if ASCII; a non-ASCII name is compared with
    /// every subkey (Windows' upper-casing of other characters is its own).
    ascii: Option<Vec<u8>>,
}

impl Probe {
    fn new(name: &str) -> Probe {
        Probe {
            ascii: name
                .is_ascii()
                .then(|| name.to_ascii_uppercase().into_bytes()),
        }
    }

    /// Whether a subkey with this hint may have the name.
    fn may_match(&self, hint: Hint) -> bool {
        let Some(name) = &self.ascii else {
            return true;
        };
        match hint {
            Hint::None => true,
            Hint::Hash(hash) => {
                hash == name
                    .iter()
                    .fold(0u32, |h, &c| h.wrapping_mul(37).wrapping_add(u32::from(c)))
            }
            Hint::Prefix(prefix) => {
                let mut want = [0u8; 4];
                for (w, &c) in want.iter_mut().zip(name) {
                    *w = c;
                }
                !prefix.is_ascii() || prefix.to_ascii_uppercase() == want
            }
        }
    }
}

/// A registry key.
#[derive(Debug, Clone)]
pub struct Key<'h> {
    hive: &'h Hive,
    /// Hive offset of the nk cell.
    off: u32,
    name: String,
    last_written: u64,
    parent: u32,
    subkey_count: u32,
    subkey_list: u32,
    value_count: u32,
    value_list: u32,
}

impl<'h> Key<'h> {
    /// The key's name (the root key's name is whatever Windows gave the
    /// hive, e.g. `ROOT` or `CMI-CreateHive{…}`).
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// When the key was last written, as a Windows FILETIME (100 ns since
    /// 1601-01-01 UTC).
    pub fn last_written(&self) -> u64 {
        self.last_written
    }

    /// The number of subkeys the key records (volatile keys are never in
    /// a file).
    pub fn subkey_count(&self) -> u32 {
        self.subkey_count
    }

    /// The number of values the key records.
    pub fn value_count(&self) -> u32 {
        self.value_count
    }

    fn loc(&self) -> Loc {
        Cell {
            off: self.off,
            len: 0,
        }
        .loc("nk cell")
    }

    /// The subkey list entries, checked: as many as the key records, none
    /// twice.
    fn subkey_entries(&self) -> Result<Vec<Entry>, HiveError> {
        let count = self.subkey_count;
        if count == 0 {
            return Ok(Vec::new());
        }
        let here = self.loc();
        if count > MAX_LIST_ENTRIES {
            return Err(here.err(format!(
                "subkey count {count} is more than the {MAX_LIST_ENTRIES} this reader accepts"
            )));
        }
        let mut out = Vec::new();
        self.hive
            .collect_subkeys(here, "subkey list", self.subkey_list, 0, count, &mut out)?;
        if out.len() != count as usize {
            return Err(here.err(format!(
                "subkey count is {count}, but its subkey lists hold {}",
                out.len()
            )));
        }
        let mut sorted: Vec<u32> = out.iter().map(|entry| entry.off).collect();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(here.err(format!(
                "its subkey lists name the key at {:#x} more than once",
                BASE_BLOCK + u64::from(pair[0])
            )));
        }
        Ok(out)
    }

    /// The subkey at `off`, checked to be a child of this key: its parent
    /// field names this key, and it is not the root. With the duplicate
    /// check of [`Key::subkey_entries`], this keeps the tree free of cycles.
    fn child_at(&self, off: u32) -> Result<Key<'h>, HiveError> {
        let here = self.loc();
        if off == self.hive.root {
            return Err(here.err("a subkey list names the root key".to_string()));
        }
        let child = self.hive.key_at(here, "subkey", off)?;
        if child.parent != self.off {
            return Err(child.loc().err(format!(
                "parent offset {:#x} is not that of the key {:?} at {:#x} that lists it",
                child.parent, self.name, here.off
            )));
        }
        Ok(child)
    }

    /// The subkeys, in the order of the file (Windows keeps them sorted
    /// by upper-case name).
    pub fn subkeys(&self) -> Result<Vec<Key<'h>>, HiveError> {
        self.subkey_entries()?
            .into_iter()
            .map(|entry| self.child_at(entry.off))
            .collect()
    }

    /// The subkey called `name`, compared case-insensitively. The hints
    /// of "lf" and "lh" lists (name prefix, name hash) select the subkeys
    /// whose names are read, as Windows looks keys up.
    pub fn subkey(&self, name: &str) -> Result<Option<Key<'h>>, HiveError> {
        let probe = Probe::new(name);
        for entry in self.subkey_entries()? {
            if !probe.may_match(entry.hint) {
                continue;
            }
            let child = self.child_at(entry.off)?;
            if same_name(&child.name, name) {
                return Ok(Some(child));
            }
        }
        Ok(None)
    }

    /// The vk offsets of the values.
    fn value_offsets(&self) -> Result<Vec<u32>, HiveError> {
        let count = self.value_count;
        if count == 0 {
            return Ok(Vec::new());
        }
        let here = self.loc();
        if count > MAX_LIST_ENTRIES {
            return Err(here.err(format!(
                "value count {count} is more than the {MAX_LIST_ENTRIES} this reader accepts"
            )));
        }
        let list = self.hive.cell(here, "value list", self.value_list)?;
        let bytes = self.hive.cell_bytes(list, "value list", 0, count * 4)?;
        Ok(bytes.chunks_exact(4).map(|c| le32(c, 0)).collect())
    }

    /// The values, in the order of the file.
    pub fn values(&self) -> Result<Vec<Value<'h>>, HiveError> {
        let here = self.loc();
        self.value_offsets()?
            .into_iter()
            .map(|off| self.hive.value_at(here, off))
            .collect()
    }

    /// The value called `name`, compared case-insensitively; `""` is the
    /// default value (`(Default)`, `@` in .reg files).
    pub fn value(&self, name: &str) -> Result<Option<Value<'h>>, HiveError> {
        let here = self.loc();
        for off in self.value_offsets()? {
            let value = self.hive.value_at(here, off)?;
            if same_name(&value.name, name) {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }
}

/// A registry value; its data is read when asked for.
#[derive(Debug, Clone)]
pub struct Value<'h> {
    hive: &'h Hive,
    /// Hive offset of the vk cell.
    off: u32,
    name: String,
    /// Data length as stored, with the inline flag in its top bit.
    raw_len: u32,
    data_off: u32,
    kind: u32,
}

impl Value<'_> {
    /// The value's name; `""` for the default value.
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The value's type as stored: one of the `REG_*` constants of this
    /// module, or any other number.
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// The length of the data in bytes.
    pub fn data_len(&self) -> u32 {
        self.raw_len & !DATA_INLINE
    }

    /// The data, raw, if at most [`MAX_VALUE_DATA`] bytes.
    pub fn data(&self) -> Result<Vec<u8>, HiveError> {
        self.data_with_limit(MAX_VALUE_DATA)
    }

    /// The data, raw, if at most `limit` bytes: stored in the vk cell
    /// itself (4 bytes or fewer), in a data cell, or (version 1.4 and
    /// later) in the segments of a "db" big-data cell.
    pub fn data_with_limit(&self, limit: usize) -> Result<Vec<u8>, HiveError> {
        let here = Cell {
            off: self.off,
            len: 0,
        }
        .loc("vk cell");
        let len = self.data_len();
        if self.raw_len & DATA_INLINE != 0 {
            if len > 4 {
                return Err(here.err(format!(
                    "data stored in the cell (length {:#x}) is {len} bytes, more than 4",
                    self.raw_len
                )));
            }
            return Ok(self.data_off.to_le_bytes()[..len as usize].to_vec());
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        if len as usize > limit {
            return Err(HiveError::TooLarge {
                name: self.name.clone(),
                len,
                limit,
            });
        }
        let hive = self.hive;
        let cell = hive.cell(here, "data", self.data_off)?;
        if len <= cell.len {
            return hive.cell_bytes(cell, "data cell", 0, len);
        }
        if hive.minor >= BIG_DATA_MINOR && cell.len >= 8 {
            let head = hive.cell_bytes(cell, "data cell", 0, 2)?;
            if head == b"db" {
                return hive.big_data(cell, len);
            }
        }
        Err(cell.loc("data cell").err(format!(
            "the value {:?} at {:#x} declares {len} bytes, but the cell holds {} and is not \
             a db big-data cell",
            self.name, here.off, cell.len
        )))
    }

    fn wrong_type(&self, expected: &'static str) -> HiveError {
        HiveError::WrongType {
            name: self.name.clone(),
            kind: self.kind,
            expected,
        }
    }

    /// The data, which must be exactly `N` bytes.
    fn fixed<const N: usize>(&self) -> Result<[u8; N], HiveError> {
        let bad = || HiveError::BadLength {
            name: self.name.clone(),
            kind: self.kind,
            len: self.data_len(),
            expected: N as u32,
        };
        if self.data_len() as usize != N {
            return Err(bad());
        }
        self.data()?.try_into().map_err(|_| bad())
    }

    /// A REG_SZ, REG_EXPAND_SZ or REG_LINK value as text: its UTF-16LE data
    /// up to the first NUL (unpaired surrogates become U+FFFD).
    pub fn as_string(&self) -> Result<String, HiveError> {
        match self.kind {
            REG_SZ | REG_EXPAND_SZ | REG_LINK => Ok(utf16(&self.data()?, true)),
            _ => Err(self.wrong_type("REG_SZ, REG_EXPAND_SZ or REG_LINK")),
        }
    }

    /// A REG_MULTI_SZ value as its strings: the UTF-16LE data split at
    /// NULs, up to the first empty string.
    pub fn as_multi_string(&self) -> Result<Vec<String>, HiveError> {
        if self.kind != REG_MULTI_SZ {
            return Err(self.wrong_type("REG_MULTI_SZ"));
        }
        let data = self.data()?;
        let units: Vec<u16> = data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(units
            .split(|&u| u == 0)
            .take_while(|s| !s.is_empty())
            .map(|s| {
                char::decode_utf16(s.iter().copied())
                    .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect()
            })
            .collect())
    }

    /// A REG_DWORD (little-endian) or REG_DWORD_BIG_ENDIAN value of 4
    /// bytes as a number.
    pub fn as_dword(&self) -> Result<u32, HiveError> {
        match self.kind {
            REG_DWORD => Ok(u32::from_le_bytes(self.fixed()?)),
            REG_DWORD_BIG_ENDIAN => Ok(u32::from_be_bytes(self.fixed()?)),
            _ => Err(self.wrong_type("REG_DWORD or REG_DWORD_BIG_ENDIAN")),
        }
    }

    /// A REG_QWORD value of 8 bytes as a number.
    pub fn as_qword(&self) -> Result<u64, HiveError> {
        match self.kind {
            REG_QWORD => Ok(u64::from_le_bytes(self.fixed()?)),
            _ => Err(self.wrong_type("REG_QWORD")),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The reader is compared with hivex (Debian's `libhivex-bin`): a
    //! minimal empty hive is generated here from the format description,
    //! hivex's tools fill it, and everything both read is compared.

    use super::*;
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, OnceLock};

    /// Key path below the root (`\`-joined, "" for the root) → value name
    /// → (type, data).
    type Tree = BTreeMap<String, BTreeMap<String, (u32, Vec<u8>)>>;

    /// The prefix `hivexregedit --export` puts before key paths.
    const PREFIX: &str = r"HKEY_LOCAL_MACHINE\SYSTEM";
    /// Length of the value hand-crafted as a "db" big-data cell.
    const DB_LEN: u32 = 50_000;
    /// Length of the large value hivex writes as one plain data cell.
    const PLAIN_LEN: usize = 40_000;
    /// Services subkeys in the fixture compared with hivex: more than one
    /// lh list holds in a Windows-written hive (about 1012).
    const MANY: usize = 1100;
    /// Services subkeys in the fixture that is damaged a few thousand times.
    const FEW: usize = 12;

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn fix_checksum(b: &mut [u8]) {
        let sum = (0..127).fold(0u32, |acc, i| acc ^ le32(b, i * 4));
        put32(b, 0x1fc, sum);
    }

    fn utf16le(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    /// Builds one hive bin: cells are appended in order, so a cell can
    /// name any cell pushed before it.
    struct BinBuilder {
        at: u32,
        bytes: Vec<u8>,
    }

    impl BinBuilder {
        fn new(at: u32) -> BinBuilder {
            let mut bytes = vec![0u8; 32];
            bytes[0..4].copy_from_slice(b"hbin");
            put32(&mut bytes, 4, at);
            BinBuilder { at, bytes }
        }

        /// Appends an allocated cell holding `payload`; its hive offset.
        fn push(&mut self, payload: &[u8]) -> u32 {
            let off = self.at + self.bytes.len() as u32;
            let size = (payload.len() + 4).next_multiple_of(8);
            self.bytes.extend((-(size as i32)).to_le_bytes());
            self.bytes.extend(payload);
            self.bytes.resize(off as usize - self.at as usize + size, 0);
            off
        }

        /// The bin, its size a multiple of 4096, the rest one free cell.
        fn finish(mut self) -> Vec<u8> {
            let size = self.bytes.len().next_multiple_of(PAGE);
            let free = size - self.bytes.len();
            if free > 0 {
                self.bytes.extend((free as i32).to_le_bytes());
                self.bytes.resize(size, 0);
            }
            put32(&mut self.bytes, 8, size as u32);
            self.bytes
        }
    }

    /// An empty hive, from the format description: a base block with a
    /// correct checksum and one 4096-byte hive bin holding the root key
    /// "ROOT", the security cell hivex copies to new keys, and free space.
    fn empty_hive() -> Vec<u8> {
        let name = b"ROOT";
        let nk_cell = (NK_FIXED as usize + name.len() + 4).next_multiple_of(8);
        let sk_off = 0x20 + nk_cell as u32;
        let mut nk = vec![0u8; NK_FIXED as usize];
        nk[0..2].copy_from_slice(b"nk");
        put16(&mut nk, 0x02, 0x2c); // hive entry, no delete, compressed name
        for field in [0x1c, 0x20, 0x28, 0x30] {
            put32(&mut nk, field, 0xffff_ffff); // no lists, no class name
        }
        put32(&mut nk, 0x2c, sk_off);
        put16(&mut nk, 0x48, name.len() as u16);
        nk.extend(name);
        // A self-relative security descriptor without owner, group or ACLs.
        let sd = [
            1u8, 0, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut sk = b"sk\0\0".to_vec();
        for v in [sk_off, sk_off, 1, sd.len() as u32] {
            sk.extend(v.to_le_bytes());
        }
        sk.extend(sd);
        let mut bin = BinBuilder::new(0);
        assert_eq!(bin.push(&nk), 0x20);
        assert_eq!(bin.push(&sk), sk_off);
        let bin = bin.finish();

        let mut base = vec![0u8; BASE_BLOCK as usize];
        base[0..4].copy_from_slice(b"regf");
        for (at, v) in [
            (0x04, 1), // primary sequence number
            (0x08, 1), // secondary sequence number
            (0x14, 1), // major version
            (0x18, 5), // minor version
            (0x1c, 0), // primary file
            (0x20, 1), // direct memory load format
            (0x24, 0x20),
            (0x28, bin.len() as u32),
            (0x2c, 1), // clustering factor
        ] {
            put32(&mut base, at, v);
        }
        fix_checksum(&mut base);
        base.extend(bin);
        base
    }

    /// Runs one of hivex's tools, which the tests need: a missing one
    /// fails the test.
    fn run(tool: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {tool} ({e}): install libhivex-bin (apt-get install \
                     libhivex-bin), the peer the hive reader is tested against"
                )
            });
        let mut input = child.stdin.take().expect("piped stdin");
        let stdin = stdin.to_vec();
        let writer = std::thread::spawn(move || input.write_all(&stdin));
        let out = child.wait_with_output().expect("wait for the tool");
        writer.join().expect("stdin writer").expect("write stdin");
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn hex(bytes: &[u8], sep: &str) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(sep)
    }

    /// The `hivexsh -w` script that fills the empty hive.
    fn script(services: usize) -> String {
        let mut s = String::new();
        let mut line = |l: &str| {
            s.push_str(l);
            s.push('\n');
        };
        let multi = utf16le("one\0two\0three\0\0");
        let mid: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 256) as u8).collect();
        for l in [
            "add ControlSet001",
            "add Select",
            "cd Select",
            "setval 3",
            "Current",
            "dword:1",
            "Default",
            "dword:1",
            "LastKnownGood",
            "dword:2",
            r"cd \ ",
            r"cd ControlSet001",
            "add Control",
            "add Services",
            r"cd Control",
            "add Class",
            "setval 1",
            "SystemBootDevice",
            "string:multi(0)disk(0)rdisk(0)partition(1)",
            r"cd \ControlSet001\Services",
            "add viostor",
            "add storahci",
            "add Ünïcødé",
            "add 日本",
        ] {
            line(l);
        }
        for i in 0..services {
            line(&format!("add Svc{i:04}"));
        }
        for l in [
            "cd viostor",
            "setval 20",
            "@",
            "string:default here",
            "Start",
            "dword:0x3",
            "Type",
            "dword:1",
            "ImagePath",
            r"expandstring:\SystemRoot\System32\drivers\viostor.sys",
            "Group",
            "string:SCSI miniport",
            "EmptyString",
            "string:",
            "Nothing",
            "none",
            // hivexsh 1.3.23 writes garbage in the upper bytes of "qword:",
            // so the QWORD is given as bytes.
            "Q",
            "hex:11:ef,cd,ab,89,67,45,23,01",
            "Bin",
            "hex:3:de,ad,be,ef,01,02,03,04,05",
            "Bin3",
            "hex:3:01,02,03",
            "Bin0",
            "hex:3:",
            "BE",
            "hex:5:12,34,56,78",
            "Lnk",
            &format!("hex:6:{}", hex(&utf16le(r"\Registry\Machine\Foo"), ",")),
            "Multi",
            &format!("hex:7:{}", hex(&multi, ",")),
            "Res",
            "hex:8:00,01,02,03,04,05",
            "OddType",
            "hex:305419896:01",
            "Grüße",
            "string:latin-1 name",
            "Ünï値",
            &format!("hex:1:{}", hex(&utf16le("é日本\0"), ",")),
            // hivexsh takes at most about 4 KiB of data on a line.
            "Mid",
            &format!("hex:3:{}", hex(&mid, "")),
            // A placeholder the db big-data cell replaces (see `craft`).
            "BigDb",
            "hex:3:00,00,00,00,00,00,00,00",
            "cd ..",
            "cd storahci",
            "setval 2",
            "Start",
            "dword:0",
            "ErrorControl",
            "dword:0xffffffff",
            r"cd \ ",
            "setval 1",
            "@",
            "string:root default",
            "commit",
        ] {
            line(l);
        }
        s
    }

    /// A .reg file for `hivexregedit --merge` with a value longer than
    /// hivexsh takes: hivex writes it as one plain data cell, not as a db
    /// big-data cell (as hives older than version 1.4 store it).
    fn big_plain_reg() -> String {
        let data: Vec<u8> = (0..PLAIN_LEN).map(|i| (i % 251) as u8).collect();
        let mut reg = format!(
            "Windows Registry Editor Version 5.00\r\n\r\n\
             [{PREFIX}\\ControlSet001\\Services\\viostor\\Parameters]\r\n\"BigPlain\"=hex:"
        );
        for (i, chunk) in data.chunks(24).enumerate() {
            if i > 0 {
                reg.push_str(",\\\r\n  ");
            }
            reg.push_str(&hex(chunk, ","));
        }
        reg.push_str("\r\n\r\n");
        reg
    }

    /// The data of the hand-crafted db value.
    fn db_data() -> Vec<u8> {
        (0..DB_LEN)
            .map(|i| (i.wrapping_mul(31) >> 3) as u8)
            .collect()
    }

    /// Adds what hivex cannot write, hand-crafted in one more hive bin:
    /// - hivex writes every subkey list as one "lh" list, however long,
    ///   and never an "ri" list: the Services list is split into an lh, an
    ///   lf and an li list under an ri list;
    /// - hivex writes long value data as one data cell, never as a "db"
    ///   big-data cell: viostor's BigDb becomes a db cell with its segment
    ///   list and segments of 16344 bytes.
    fn craft(mut bytes: Vec<u8>) -> Vec<u8> {
        let bins_len = le32(&bytes, 0x28);
        assert_eq!(bytes.len() as u64, BASE_BLOCK + u64::from(bins_len));
        let (services_off, old_list, names, big_db_off) = {
            let hive = Hive::open(Box::new(bytes.clone())).expect("hivex's hive opens");
            let services = hive.open_path(r"ControlSet001\Services").unwrap().unwrap();
            let names: Vec<String> = services.subkeys().unwrap().iter().map(Key::name).collect();
            let viostor = services.subkey("viostor").unwrap().unwrap();
            let big_db = viostor.value("BigDb").unwrap().unwrap();
            (services.off, services.subkey_list, names, big_db.off)
        };
        let list_at = (BASE_BLOCK + u64::from(old_list)) as usize + 4;
        assert_eq!(&bytes[list_at..list_at + 2], b"lh", "hivex writes lh lists");
        let count = le16(&bytes, list_at + 2) as usize;
        assert_eq!(count, names.len());
        let entries = bytes[list_at + 4..list_at + 4 + count * 8].to_vec();

        let mut bin = BinBuilder::new(bins_len);
        let third = count / 3;
        let mut lists = Vec::new();
        for (sig, range) in [
            (b"lh", 0..third),
            (b"lf", third..2 * third),
            (b"li", 2 * third..count),
        ] {
            let mut list = sig.to_vec();
            list.extend((range.len() as u16).to_le_bytes());
            for i in range {
                let entry = &entries[i * 8..i * 8 + 8];
                list.extend(&entry[0..4]);
                match sig {
                    b"lh" => list.extend(&entry[4..8]),
                    b"lf" => {
                        let mut prefix = [0u8; 4];
                        for (p, c) in prefix.iter_mut().zip(names[i].chars()) {
                            *p = c as u8;
                        }
                        list.extend(prefix);
                    }
                    _ => {}
                }
            }
            lists.push(bin.push(&list));
        }
        let mut ri = b"ri".to_vec();
        ri.extend((lists.len() as u16).to_le_bytes());
        for off in &lists {
            ri.extend(off.to_le_bytes());
        }
        let ri_off = bin.push(&ri);

        let data = db_data();
        let segments: Vec<u32> = data
            .chunks(BIG_DATA_SEGMENT as usize)
            .map(|chunk| bin.push(chunk))
            .collect();
        let seg_list: Vec<u8> = segments.iter().flat_map(|s| s.to_le_bytes()).collect();
        let seg_list_off = bin.push(&seg_list);
        let mut db = b"db".to_vec();
        db.extend((segments.len() as u16).to_le_bytes());
        db.extend(seg_list_off.to_le_bytes());
        db.extend([0u8; 4]);
        let db_off = bin.push(&db);
        let bin = bin.finish();

        let nk = (BASE_BLOCK + u64::from(services_off)) as usize + 4;
        put32(&mut bytes, nk + 0x1c, ri_off);
        let vk = (BASE_BLOCK + u64::from(big_db_off)) as usize + 4;
        put32(&mut bytes, vk + 0x04, DB_LEN);
        put32(&mut bytes, vk + 0x08, db_off);
        put32(&mut bytes, 0x28, bins_len + bin.len() as u32);
        fix_checksum(&mut bytes);
        bytes.extend(bin);
        bytes
    }

    /// A generated hive and what hivex reads from it.
    struct Fixture {
        bytes: Vec<u8>,
        /// `hivexregedit --export` of the whole hive, parsed.
        peer: Tree,
        /// `hivexget` of each value of viostor: name → stdout.
        viostor: BTreeMap<String, Vec<u8>>,
    }

    fn build(services: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("SYSTEM");
        std::fs::write(&path, empty_hive()).expect("write the empty hive");
        let file = path.to_str().expect("UTF-8 temp path");
        run("hivexsh", &["-w", file], script(services).as_bytes());
        let reg = dir.path().join("big.reg");
        std::fs::write(&reg, big_plain_reg()).expect("write the .reg file");
        let reg = reg.to_str().expect("UTF-8 temp path");
        run(
            "hivexregedit",
            &["--merge", "--prefix", PREFIX, file, reg],
            b"",
        );
        let bytes = craft(std::fs::read(&path).expect("read the hive"));
        std::fs::write(&path, &bytes).expect("write the crafted hive");
        let export = run(
            "hivexregedit",
            &["--export", "--prefix", PREFIX, file, "\\"],
            b"",
        );
        let peer = parse_reg(&export);
        let key = r"\ControlSet001\Services\viostor";
        let viostor = peer[r"ControlSet001\Services\viostor"]
            .keys()
            .map(|name| {
                let arg = if name.is_empty() { "@" } else { name };
                (name.clone(), run("hivexget", &[file, key, arg], b""))
            })
            .collect();
        Fixture {
            bytes,
            peer,
            viostor,
        }
    }

    fn many() -> &'static Fixture {
        static MANY_KEYS: OnceLock<Fixture> = OnceLock::new();
        MANY_KEYS.get_or_init(|| build(MANY))
    }

    fn few() -> &'static Fixture {
        static FEW_KEYS: OnceLock<Fixture> = OnceLock::new();
        FEW_KEYS.get_or_init(|| build(FEW))
    }

    /// Parses `hivexregedit --export` output. It prints a name holding
    /// characters beyond Latin-1 as UTF-8 and any other name as raw
    /// Latin-1 bytes, so each line is decoded as UTF-8 if it can be.
    fn parse_reg(out: &[u8]) -> Tree {
        let mut tree = Tree::new();
        let mut key: Option<String> = None;
        for raw in out.split(|&b| b == b'\n') {
            let line = match std::str::from_utf8(raw) {
                Ok(text) => text.to_string(),
                Err(_) => raw.iter().map(|&b| char::from(b)).collect(),
            };
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with("Windows Registry Editor") {
                continue;
            }
            if let Some(path) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let path = path
                    .strip_prefix(PREFIX)
                    .unwrap_or_else(|| panic!("key {path:?} outside {PREFIX}"))
                    .trim_start_matches('\\')
                    .to_string();
                tree.insert(path.clone(), BTreeMap::new());
                key = Some(path);
                continue;
            }
            let (name, value) = parse_value_line(line);
            let key = key.as_ref().expect("a value line after a key line");
            let values = tree.get_mut(key).expect("the key's entry");
            assert!(values.insert(name, value).is_none(), "{line}");
        }
        tree
    }

    fn parse_value_line(line: &str) -> (String, (u32, Vec<u8>)) {
        let (name, rest) = match line.strip_prefix("@=") {
            Some(rest) => (String::new(), rest),
            None => {
                let quoted = line.strip_prefix('"').expect("a quoted value name");
                let mut name = String::new();
                let mut chars = quoted.char_indices();
                let end = loop {
                    match chars.next().expect("a closing quote") {
                        (_, '\\') => name.push(chars.next().expect("an escaped char").1),
                        (i, '"') => break i,
                        (_, c) => name.push(c),
                    }
                };
                let rest = quoted[end + 1..].strip_prefix('=').expect("= after name");
                (name, rest)
            }
        };
        let bytes = |list: &str| -> Vec<u8> {
            list.split(',')
                .filter(|b| !b.is_empty())
                .map(|b| u8::from_str_radix(b.trim(), 16).expect("a hex byte"))
                .collect()
        };
        let value = if let Some(dword) = rest.strip_prefix("dword:") {
            let n = u32::from_str_radix(dword, 16).expect("hex dword");
            (REG_DWORD, n.to_le_bytes().to_vec())
        } else if let Some(typed) = rest.strip_prefix("hex(") {
            let (kind, list) = typed.split_once("):").expect("hex(N):");
            (
                u32::from_str_radix(kind, 16).expect("hex type"),
                bytes(list),
            )
        } else if let Some(list) = rest.strip_prefix("hex:") {
            (REG_BINARY, bytes(list))
        } else {
            panic!("unexpected value line {line:?}")
        };
        (name, value)
    }

    /// Walks the whole hive with the reader under test.
    fn dump(hive: &Hive) -> Tree {
        fn walk(key: &Key<'_>, path: String, tree: &mut Tree) {
            let mut values = BTreeMap::new();
            for value in key.values().unwrap() {
                let data = value.data().unwrap();
                assert_eq!(data.len(), value.data_len() as usize);
                assert!(values.insert(value.name(), (value.kind(), data)).is_none());
            }
            tree.insert(path.clone(), values);
            for sub in key.subkeys().unwrap() {
                let sub_path = match path.as_str() {
                    "" => sub.name(),
                    _ => format!(r"{path}\{}", sub.name()),
                };
                walk(&sub, sub_path, tree);
            }
        }
        let mut tree = Tree::new();
        walk(&hive.root().unwrap(), String::new(), &mut tree);
        tree
    }

    /// Asserts equal trees, reporting the first difference briefly.
    fn assert_same(ours: &Tree, peer: &Tree) {
        let keys = |t: &Tree| t.keys().cloned().collect::<Vec<_>>();
        let only_ours: Vec<_> = keys(ours)
            .into_iter()
            .filter(|k| !peer.contains_key(k))
            .collect();
        let only_peer: Vec<_> = keys(peer)
            .into_iter()
            .filter(|k| !ours.contains_key(k))
            .collect();
        assert!(
            only_ours.is_empty() && only_peer.is_empty(),
            "keys only we read: {only_ours:?}; keys only hivex reads: {only_peer:?}"
        );
        for (path, values) in peer {
            let ours = &ours[path];
            let names =
                |v: &BTreeMap<String, (u32, Vec<u8>)>| v.keys().cloned().collect::<Vec<_>>();
            assert_eq!(names(ours), names(values), "value names of {path:?}");
            for (name, (kind, data)) in values {
                let (our_kind, our_data) = &ours[name];
                assert_eq!(our_kind, kind, "type of {path:?} {name:?}");
                assert!(our_data == data, "data of {path:?} {name:?} differs");
            }
        }
    }

    fn open(bytes: &[u8]) -> Hive {
        Hive::open(Box::new(bytes.to_vec())).expect("the hive opens")
    }

    #[test]
    fn hive_and_its_keys_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}

        send_sync::<Hive>();
        send_sync::<Key<'static>>();
        send_sync::<Value<'static>>();
        send_sync::<HiveError>();
    }

    #[test]
    fn hive_generated_empty_is_read_by_hivex_and_us() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("EMPTY");
        std::fs::write(&path, empty_hive()).unwrap();
        let file = path.to_str().unwrap();
        let out = run(
            "hivexregedit",
            &["--export", "--prefix", PREFIX, file, "\\"],
            b"",
        );

        let ours = dump(&open(&empty_hive()));

        assert_eq!(ours, parse_reg(&out));
        assert_eq!(ours.len(), 1);
    }

    #[test]
    fn hive_peer_written_reads_the_same_as_hivex_export() {
        let fixture = many();
        let hive = open(&fixture.bytes);

        let ours = dump(&hive);

        assert_same(&ours, &fixture.peer);
        assert!(ours.len() > MANY + 8, "{} keys", ours.len());
        assert!(!hive.dirty());
        assert_eq!(hive.minor_version(), 5);
        let viostor = &ours[r"ControlSet001\Services\viostor"];
        assert_eq!(viostor["BigDb"].1, db_data());
        assert_eq!(viostor["Mid"].1.len(), 4000);
        let params = &ours[r"ControlSet001\Services\viostor\Parameters"];
        assert_eq!(params["BigPlain"].1.len(), PLAIN_LEN);
        assert!(ours.contains_key(r"ControlSet001\Services\日本"));
        assert!(ours.contains_key(r"ControlSet001\Services\Ünïcødé"));
    }

    #[test]
    fn hive_peer_written_uses_ri_db_and_both_name_encodings() {
        let fixture = many();
        let hive = open(&fixture.bytes);
        let services = hive.open_path(r"ControlSet001\Services").unwrap().unwrap();
        let viostor = services.subkey("viostor").unwrap().unwrap();
        let cell_sig = |off: u32| {
            let at = (BASE_BLOCK + u64::from(off)) as usize + 4;
            fixture.bytes[at..at + 2].to_vec()
        };
        let vk_flags = |name: &str| {
            let value = viostor.value(name).unwrap().unwrap();
            le16(
                &fixture.bytes,
                (BASE_BLOCK + u64::from(value.off)) as usize + 4 + 0x10,
            )
        };
        let nk_flags = |name: &str| {
            let key = services.subkey(name).unwrap().unwrap();
            le16(
                &fixture.bytes,
                (BASE_BLOCK + u64::from(key.off)) as usize + 4 + 2,
            )
        };

        let big_db = viostor.value("BigDb").unwrap().unwrap();

        assert_eq!(cell_sig(services.subkey_list), b"ri");
        assert_eq!(cell_sig(big_db.data_off), b"db");
        assert_eq!(big_db.data().unwrap(), db_data());
        assert_eq!(nk_flags("Ünïcødé") & NK_COMP_NAME, NK_COMP_NAME);
        assert_eq!(nk_flags("日本") & NK_COMP_NAME, 0);
        assert_eq!(vk_flags("Grüße") & VK_COMP_NAME, VK_COMP_NAME);
        assert_eq!(vk_flags("Ünï値") & VK_COMP_NAME, 0);
    }

    #[test]
    fn hive_value_helpers_match_hivexget() {
        let fixture = many();
        let hive = open(&fixture.bytes);
        let viostor = hive
            .open_path(r"ControlSet001\Services\viostor")
            .unwrap()
            .unwrap();

        for (name, out) in &fixture.viostor {
            let value = viostor.value(name).unwrap().unwrap();
            let text = String::from_utf8(out.clone());
            let lines = || {
                let text = text.clone().expect("UTF-8 text");
                let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
                while lines.last().is_some_and(String::is_empty) {
                    lines.pop();
                }
                lines
            };
            match value.kind() {
                REG_SZ | REG_EXPAND_SZ | REG_LINK => {
                    let line = format!("{}\n", value.as_string().unwrap());
                    assert_eq!(text.as_deref(), Ok(line.as_str()), "{name}")
                }
                REG_MULTI_SZ => assert_eq!(value.as_multi_string().unwrap(), lines(), "{name}"),
                REG_DWORD | REG_DWORD_BIG_ENDIAN => {
                    assert_eq!(
                        vec![value.as_dword().unwrap().to_string()],
                        lines(),
                        "{name}"
                    )
                }
                REG_QWORD => {
                    assert_eq!(
                        vec![value.as_qword().unwrap().to_string()],
                        lines(),
                        "{name}"
                    )
                }
                _ => assert_eq!(&value.data().unwrap(), out, "{name}"),
            }
        }
        assert!(fixture.viostor.len() >= 20);
    }

    #[test]
    fn hive_value_helpers_decode_each_type() {
        let hive = open(&few().bytes);
        let key = hive
            .open_path(r"ControlSet001\Services\viostor")
            .unwrap()
            .unwrap();
        let value = |name: &str| key.value(name).unwrap().unwrap();

        assert_eq!(value("").as_string().unwrap(), "default here");
        assert_eq!(value("").name(), "");
        assert_eq!(value("START").as_dword().unwrap(), 3);
        assert_eq!(value("BE").as_dword().unwrap(), 0x1234_5678);
        assert_eq!(value("Q").as_qword().unwrap(), 0x0123_4567_89ab_cdef);
        assert_eq!(value("Q").kind(), REG_QWORD);
        assert_eq!(value("ImagePath").kind(), REG_EXPAND_SZ);
        assert_eq!(
            value("imagepath").as_string().unwrap(),
            r"\SystemRoot\System32\drivers\viostor.sys"
        );
        assert_eq!(value("Lnk").as_string().unwrap(), r"\Registry\Machine\Foo");
        assert_eq!(value("EmptyString").as_string().unwrap(), "");
        assert_eq!(
            value("Multi").as_multi_string().unwrap(),
            ["one", "two", "three"]
        );
        assert_eq!(value("Bin3").data().unwrap(), [1, 2, 3]);
        assert_eq!(value("Bin0").data().unwrap(), Vec::<u8>::new());
        assert_eq!(value("Nothing").kind(), REG_NONE);
        assert_eq!(value("OddType").kind(), 0x1234_5678);
        assert_eq!(value("GRÜßE").name(), "Grüße");
        assert_eq!(value("ünï値").as_string().unwrap(), "é日本");
        assert!(matches!(
            value("Bin").as_string(),
            Err(HiveError::WrongType {
                kind: REG_BINARY,
                ..
            })
        ));
        assert!(matches!(
            value("Bin").as_dword(),
            Err(HiveError::WrongType { .. })
        ));
        assert!(matches!(
            value("BigDb").data_with_limit(1000),
            Err(HiveError::TooLarge { len: DB_LEN, .. })
        ));
        assert!(key.value("Missing").unwrap().is_none());
    }

    #[test]
    fn hive_open_path_ignores_case_and_outer_backslashes() {
        let hive = open(&few().bytes);

        let select = hive.open_path(r"\select\").unwrap().unwrap();
        let viostor = hive
            .open_path(r"CONTROLSET001\services\VioStor")
            .unwrap()
            .unwrap();
        let unicode = hive
            .open_path(r"ControlSet001\Services\üNÏCØDÉ")
            .unwrap()
            .unwrap();

        assert_eq!(
            select
                .value("Current")
                .unwrap()
                .unwrap()
                .as_dword()
                .unwrap(),
            1
        );
        assert_eq!(viostor.name(), "viostor");
        assert_eq!(unicode.name(), "Ünïcødé");
        assert_eq!(hive.open_path("").unwrap().unwrap().name(), "ROOT");
        assert_eq!(hive.open_path(r"\").unwrap().unwrap().name(), "ROOT");
        assert!(hive
            .open_path(r"ControlSet001\Services\nope")
            .unwrap()
            .is_none());
        assert!(hive.open_path(r"ControlSet002\Services").unwrap().is_none());
    }

    #[test]
    fn hive_subkey_finds_every_key_through_list_hints() {
        let hive = open(&many().bytes);
        let services = hive.open_path(r"ControlSet001\Services").unwrap().unwrap();
        let subkeys = services.subkeys().unwrap();

        for sub in &subkeys {
            let found = services.subkey(&sub.name().to_lowercase()).unwrap();
            assert_eq!(found.map(|k| k.off), Some(sub.off), "{}", sub.name());
        }
        assert_eq!(subkeys.len(), MANY + 4);
        assert_eq!(services.subkey_count() as usize, MANY + 4);
    }

    /// A source that counts the bytes read from it.
    struct Counting {
        bytes: Vec<u8>,
        read: Arc<AtomicU64>,
    }

    impl HiveSource for Counting {
        fn len(&self) -> u64 {
            HiveSource::len(&self.bytes)
        }

        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.bytes.read_at(buf, offset)
        }
    }

    #[test]
    fn hive_lookup_reads_a_small_part_of_a_large_file() {
        let bytes = many().bytes.clone();
        let len = bytes.len();
        // A key listed by the lh list under the ri list. (The lf list's
        // hints, the first 4 characters, are all "Svc0"; the li list has
        // none: a lookup there reads every key before the one found.)
        let names: Vec<String> = open(&bytes)
            .open_path(r"ControlSet001\Services")
            .unwrap()
            .unwrap()
            .subkeys()
            .unwrap()
            .iter()
            .map(Key::name)
            .collect();
        let third = names.len() / 3;
        let in_lh = &names[third / 2];
        let read = Arc::new(AtomicU64::new(0));
        let hive = Hive::open(Box::new(Counting {
            bytes,
            read: read.clone(),
        }))
        .unwrap();

        let lh_key = hive.open_path(&format!(r"ControlSet001\Services\{in_lh}"));
        let start = hive
            .open_path(r"ControlSet001\Services\storahci")
            .unwrap()
            .unwrap()
            .value("Start")
            .unwrap()
            .unwrap()
            .as_dword();

        assert_eq!(lh_key.unwrap().unwrap().name(), *in_lh);
        assert_eq!(start.unwrap(), 0);
        let read = read.load(Ordering::Relaxed);
        assert!(len > 4 << 20, "{len}");
        assert!(read < 128 << 10, "read {read} bytes of {len}");
    }

    /// The few-keys fixture with `edit` applied and the checksum fixed.
    fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut bytes = few().bytes.clone();
        edit(&mut bytes);
        fix_checksum(&mut bytes);
        bytes
    }

    fn open_err(bytes: Vec<u8>) -> String {
        Hive::open(Box::new(bytes)).unwrap_err().to_string()
    }

    #[test]
    fn hive_unequal_sequence_numbers_open_as_dirty() {
        let bytes = edited(|b| {
            let primary = le32(b, 0x04);
            put32(b, 0x08, primary - 1);
        });

        let hive = open(&bytes);

        assert!(hive.dirty());
        assert!(hive
            .open_path(r"ControlSet001\Services\viostor")
            .unwrap()
            .is_some());
    }

    #[test]
    fn hive_bad_base_block_fails_with_the_field() {
        let mut bad_sum = few().bytes.clone();
        bad_sum[0x30] ^= 1;

        assert!(open_err(bad_sum).contains("checksum"));
        assert!(open_err(edited(|b| b[0] = b'R')).contains("not \"regf\""));
        assert!(open_err(edited(|b| put32(b, 0x18, 7))).contains("version 1.7"));
        assert!(open_err(edited(|b| put32(b, 0x14, 2))).contains("version 2.5"));
        assert!(open_err(edited(|b| put32(b, 0x1c, 1))).contains("file type 1"));
        assert!(open_err(edited(|b| put32(b, 0x28, 0x7fff_f000))).contains("hive bins size"));
        assert!(open_err(edited(|b| put32(b, 0x28, 0x1234))).contains("hive bins size"));
        assert!(open_err(edited(|b| b[4096] = b'x')).contains("first hive bin"));
        assert!(open_err(edited(|b| put32(b, 0x24, 0x7fff_fff0)))
            .contains("base block at 0x0: root cell offset 0x7ffffff0 is outside the hive bins"));
        assert!(open_err(vec![0; 100]).contains("too short"));
    }

    /// The file offset of the payload of the cell at hive offset `off`.
    fn payload(off: u32) -> usize {
        (BASE_BLOCK + u64::from(off)) as usize + 4
    }

    /// Where things are in the few-keys fixture.
    struct Places {
        root: u32,
        control_set: u32,
        services: u32,
        services_ri: u32,
        services_lists: Vec<u32>,
        viostor: u32,
        viostor_values: u32,
        big_db: u32,
        start: u32,
        bin: u32,
        bins_len: u32,
    }

    fn places() -> Places {
        let bytes = &few().bytes;
        let hive = open(bytes);
        let root = hive.root().unwrap();
        let control_set = root.subkey("ControlSet001").unwrap().unwrap();
        let services = control_set.subkey("Services").unwrap().unwrap();
        let viostor = services.subkey("viostor").unwrap().unwrap();
        let value = |name: &str| viostor.value(name).unwrap().unwrap().off;
        let ri = payload(services.subkey_list);
        let services_lists = (0..le16(bytes, ri + 2) as usize)
            .map(|i| le32(bytes, ri + 4 + 4 * i))
            .collect();
        Places {
            root: root.off,
            control_set: control_set.off,
            services: services.off,
            services_ri: services.subkey_list,
            services_lists,
            viostor: viostor.off,
            viostor_values: viostor.value_list,
            big_db: value("BigDb"),
            start: value("Start"),
            bin: value("Bin"),
            bins_len: hive.bins_len,
        }
    }

    /// The first error a full walk of the damaged hive meets.
    fn walk_err(bytes: Vec<u8>) -> String {
        let hive = match Hive::open(Box::new(bytes)) {
            Ok(hive) => hive,
            Err(e) => return e.to_string(),
        };
        let mut budget = 10_000;
        match walk_all(&hive, &mut budget) {
            Ok(()) => panic!("the damaged hive reads without error"),
            Err(e) => e.to_string(),
        }
    }

    /// Reads everything the reader offers, with a budget of keys.
    fn walk_all(hive: &Hive, budget: &mut u32) -> Result<(), HiveError> {
        fn walk(key: &Key<'_>, budget: &mut u32) -> Result<(), HiveError> {
            *budget = budget.checked_sub(1).expect("the walk does not end");
            let _ = (key.name(), key.last_written());
            for value in key.values()? {
                value.data()?;
                let _ = value.as_string();
                let _ = value.as_multi_string();
                let _ = value.as_dword();
                let _ = value.as_qword();
                key.value(&value.name())?;
            }
            for sub in key.subkeys()? {
                key.subkey(&sub.name())?;
                walk(&sub, budget)?;
            }
            Ok(())
        }
        walk(&hive.root()?, budget)?;
        hive.open_path(r"ControlSet001\Services\viostor")?;
        hive.open_path(r"Select")?;
        Ok(())
    }

    #[test]
    fn hive_damaged_lists_fail_naming_structure_and_offset() {
        let p = places();
        let at = |off: u32| BASE_BLOCK + u64::from(off);
        let services = payload(p.services);
        let ri = payload(p.services_ri);
        let first_list = payload(p.services_lists[0]);
        let control_set_list = le32(&few().bytes, payload(p.control_set) + 0x1c);

        let out_of_bins = walk_err(edited(|b| put32(b, services + 0x1c, 0x7fff_fff0)));
        let ri_self = walk_err(edited(|b| put32(b, ri + 4, p.services_ri)));
        let lh_self = walk_err(edited(|b| put32(b, first_list + 4, p.services_lists[0])));
        let list_is_nk = walk_err(edited(|b| put32(b, services + 0x1c, p.services)));
        let root_child = walk_err(edited(|b| put32(b, first_list + 4, p.root)));
        let ancestor = walk_err(edited(|b| {
            put32(b, payload(control_set_list) + 4, p.viostor);
        }));
        let twice = walk_err(edited(|b| {
            let second = le32(b, first_list + 12);
            put32(b, first_list + 4, second);
        }));
        let count = walk_err(edited(|b| put32(b, services + 0x14, 0xffff_fff0)));
        let free = walk_err(edited(|b| {
            let size = -i32::from_le_bytes(b[first_list - 4..first_list].try_into().unwrap());
            put32(b, first_list - 4, size as u32);
        }));

        assert!(
            out_of_bins.contains(&format!(
                "nk cell at {:#x}: subkey list offset 0x7ffffff0 is outside the hive bins ({:#x} bytes)",
                at(p.services),
                p.bins_len
            )),
            "{out_of_bins}"
        );
        assert!(ri_self.contains("ri list inside an ri list"), "{ri_self}");
        assert!(lh_self.contains("is not \"nk\""), "{lh_self}");
        assert!(
            list_is_nk.contains("is not lf, lh, li or ri"),
            "{list_is_nk}"
        );
        assert!(root_child.contains("names the root key"), "{root_child}");
        assert!(ancestor.contains("parent offset"), "{ancestor}");
        assert!(twice.contains("more than once"), "{twice}");
        assert!(count.contains("more than the 1048576"), "{count}");
        assert!(free.contains("the cell is free"), "{free}");
    }

    #[test]
    fn hive_list_counts_just_past_the_limit_are_refused_at_it_read() {
        let p = places();
        let services = payload(p.services);
        let viostor = payload(p.viostor);
        let past = MAX_LIST_ENTRIES + 1;
        let subkeys_past = walk_err(edited(|b| put32(b, services + 0x14, past)));
        let values_past = walk_err(edited(|b| put32(b, viostor + 0x24, past)));
        let limit = format!("more than the {MAX_LIST_ENTRIES} this reader accepts");
        assert!(
            subkeys_past.contains(&format!("subkey count {past} is {limit}")),
            "{subkeys_past}"
        );
        assert!(
            values_past.contains(&format!("value count {past} is {limit}")),
            "{values_past}"
        );
        // At the limit the count is read, and found to disagree with the
        // lists (which hold a few entries): a damaged hive, not the limit.
        let subkeys_at = walk_err(edited(|b| put32(b, services + 0x14, MAX_LIST_ENTRIES)));
        let values_at = walk_err(edited(|b| put32(b, viostor + 0x24, MAX_LIST_ENTRIES)));
        for e in [&subkeys_at, &values_at] {
            assert!(!e.is_empty() && !e.contains("this reader accepts"), "{e}");
        }
    }

    #[test]
    fn hive_damaged_values_fail_naming_structure_and_offset() {
        let p = places();
        let vk = |off: u32| payload(off);
        let db = le32(&few().bytes, vk(p.big_db) + 0x08);

        let inline_too_long = walk_err(edited(|b| put32(b, vk(p.start) + 4, 0x8000_0007)));
        let longer_than_cell = walk_err(edited(|b| put32(b, vk(p.bin) + 4, 4000)));
        let too_few_segments = walk_err(edited(|b| put16(b, payload(db) + 2, 2)));
        let huge = walk_err(edited(|b| put32(b, vk(p.bin) + 4, 0x7fff_ffff)));
        let past = walk_err(edited(|b| put32(b, vk(p.bin) + 4, (16 << 20) + 1)));
        let at_limit = walk_err(edited(|b| put32(b, vk(p.bin) + 4, 16 << 20)));
        let name_past_cell = walk_err(edited(|b| put16(b, vk(p.bin) + 2, 0xffff)));
        let list_past_cell = walk_err(edited(|b| put32(b, payload(p.viostor) + 0x24, 5000)));
        let value_in_header = walk_err(edited(|b| put32(b, payload(p.viostor_values), 0x1008)));

        assert!(inline_too_long.contains("more than 4"), "{inline_too_long}");
        assert!(
            longer_than_cell.contains("is not a db big-data cell"),
            "{longer_than_cell}"
        );
        assert!(
            too_few_segments.contains("2 segments"),
            "{too_few_segments}"
        );
        assert!(huge.contains("more than the limit"), "{huge}");
        assert!(
            past.contains("holds 16777217 bytes, more than the limit of 16777216"),
            "{past}"
        );
        assert!(!at_limit.contains("more than the limit"), "{at_limit}");
        assert!(
            name_past_cell.contains("needs 65535 bytes"),
            "{name_past_cell}"
        );
        assert!(list_past_cell.contains("value list at"), "{list_past_cell}");
        assert!(
            value_in_header.contains("value at 0x2008: the cell is free"),
            "{value_in_header}"
        );
    }

    /// A small deterministic random number generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The hive offsets and sizes of the allocated cells, walking the bins.
    fn allocated_cells(bytes: &[u8]) -> Vec<(u32, u32)> {
        let bins_len = le32(bytes, 0x28);
        let mut cells = Vec::new();
        let mut bin = 0u32;
        while bin < bins_len {
            let bin_size = le32(bytes, payload(bin) + 4);
            let mut off = bin + 32;
            while off < bin + bin_size {
                let size =
                    i32::from_le_bytes(bytes[payload(off) - 4..payload(off)].try_into().unwrap());
                if size < 0 {
                    cells.push((off, size.unsigned_abs()));
                }
                off += size.unsigned_abs();
            }
            bin += bin_size;
        }
        cells
    }

    #[test]
    fn hive_thousands_of_mutations_never_panic_or_hang() {
        let base = &few().bytes;
        let cells = allocated_cells(base);
        let bins_len = le32(base, 0x28);
        let cell_offsets: Vec<u32> = cells.iter().map(|c| c.0).collect();
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let (mut ok, mut failed) = (0, 0);
        let start = std::time::Instant::now();

        for round in 0..4000 {
            let mut bytes = base.clone();
            let (cell, size) = cells[rng.below(cells.len())];
            let at = payload(cell);
            let span = (size as usize - 4).min(0x60);
            let interesting32 = [
                0,
                1,
                4,
                0xffff_ffff,
                0x7fff_ffff,
                0x8000_0000,
                0x8000_0004,
                0x8000_0005,
                0x7fff_fff0,
                0xffff,
                0x1_0000,
                bins_len,
                bins_len - 8,
                0x20,
                cell,
                cell + 8,
                cell_offsets[rng.below(cell_offsets.len())],
            ];
            match round % 6 {
                0 => bytes[at + rng.below(span)] = rng.next() as u8,
                1 | 2 => {
                    let field = rng.below(span.saturating_sub(3).max(1)) & !3;
                    let v = interesting32[rng.below(interesting32.len())];
                    put32(&mut bytes, at + field, v);
                }
                3 => {
                    let field = rng.below(span.saturating_sub(1).max(1)) & !1;
                    let v = [0, 1, 2, 0x7fff, 0x8000, 0xffff][rng.below(6)];
                    put16(&mut bytes, at + field, v);
                }
                4 => {
                    let v =
                        [0, 4, 8, 0x7fff_fff8, 0x8000_0000, 0xffff_fff8, 0xffff_0000][rng.below(7)];
                    put32(&mut bytes, at - 4, v);
                }
                _ => {
                    let field = [0x04, 0x08, 0x14, 0x18, 0x1c, 0x24, 0x28][rng.below(7)];
                    let v = interesting32[rng.below(interesting32.len())];
                    put32(&mut bytes, field, v);
                    fix_checksum(&mut bytes);
                }
            }
            let hive = match Hive::open(Box::new(bytes)) {
                Ok(hive) => hive,
                Err(_) => {
                    failed += 1;
                    continue;
                }
            };
            let mut budget = 200;
            match walk_all(&hive, &mut budget) {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    failed += 1;
                }
            }
        }

        assert!(ok > 100 && failed > 100, "{ok} read, {failed} failed");
        assert!(start.elapsed().as_secs() < 120, "{:?}", start.elapsed());
    }
}
