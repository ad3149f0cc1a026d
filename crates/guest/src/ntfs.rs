//! NTFS, read with the `ntfs` crate (0.4) over vmshift's devices: the
//! volume's label and dirty flag, directories (names compared without case,
//! as Windows does, through the volume's own `$UpCase` table), files and
//! their sizes, and random access to a file for the registry hive reader.
//!
//! The crate reads through `Read + Seek`; every read is bounded by the
//! partition, and the crate's own checks turn damaged structures into
//! errors. NTFS metadata files (`$MFT`, `$Bitmap`, … records 0–23) are not
//! listed, as ntfs-3g hides them.

use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileNamespace, NtfsVolumeFlags};
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};

use crate::hive::HiveSource;
use crate::vfs::{Device, Entry, EntryKind, FsInfo, FsKind, GuestFs};
use crate::{Error, Result};

/// Records below this are NTFS's own metadata files.
const FIRST_USER_RECORD: u64 = 24;
/// The most entries one directory listing may return.
const MAX_DIR_ENTRIES: usize = vmshift_model::limits::DIR_ENTRIES;
/// Seconds from 1601-01-01 (NTFS time) to 1970-01-01.
const NT_TO_UNIX: i64 = 11_644_473_600;

/// A byte range of a device as `Read + Seek`.
#[derive(Debug)]
struct Io {
    dev: Arc<dyn Device>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.dev
            .read_at(&mut buf[..n], self.start + self.pos)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Io {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

#[derive(Debug)]
struct Inner {
    ntfs: Ntfs,
    io: Io,
}

/// An NTFS volume.
#[derive(Debug, Clone)]
pub struct NtfsVol {
    info: FsInfo,
    dirty: bool,
    inner: Arc<Mutex<Inner>>,
}

thread_local! {
    /// Set while the `ntfs` crate runs here: its panics are caught.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, which calls the `ntfs` crate: a panic in it (the crate has
/// some on damaged index entries) becomes an error naming the volume, and
/// is not printed. Other threads' panics print as before.
fn guarded<R>(place: &str, what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                prev(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(err(
            place,
            format!("{what}: a damaged NTFS structure ({why})"),
        ))
    })
}

fn err(place: &str, msg: impl Into<String>) -> Error {
    Error::fs(place, msg)
}

fn unix_time(nt: u64) -> i64 {
    (nt / 10_000_000) as i64 - NT_TO_UNIX
}

impl NtfsVol {
    /// Opens the NTFS volume at `[start, start + len)`.
    pub fn open(
        dev: Arc<dyn Device>,
        start: u64,
        len: u64,
        place: String,
        partition: Option<u32>,
    ) -> Result<NtfsVol> {
        let p = place.clone();
        guarded(&p, "NTFS", move || {
            Self::open_inner(dev, start, len, place, partition)
        })
    }

    fn open_inner(
        dev: Arc<dyn Device>,
        start: u64,
        len: u64,
        place: String,
        partition: Option<u32>,
    ) -> Result<NtfsVol> {
        let mut io = Io {
            dev,
            start,
            len,
            pos: 0,
        };
        let e = |m: ntfs::NtfsError| err(&place, format!("NTFS: {m}"));
        let mut ntfs = Ntfs::new(&mut io).map_err(e)?;
        ntfs.read_upcase_table(&mut io).map_err(e)?;
        if ntfs.size() > len {
            return Err(err(
                &place,
                format!(
                    "NTFS: the boot sector states {} bytes, more than the partition's {len}",
                    ntfs.size()
                ),
            ));
        }
        let label = match ntfs.volume_name(&mut io) {
            Some(Ok(n)) => Some(n.name().to_string_lossy()).filter(|s| !s.is_empty()),
            _ => None,
        };
        let dirty = ntfs
            .volume_info(&mut io)
            .map(|v| v.flags().contains(NtfsVolumeFlags::IS_DIRTY))
            .map_err(e)?;
        let info = FsInfo {
            kind: FsKind::Ntfs,
            uuid: Some(format!("{:016X}", ntfs.serial_number())),
            label,
            size: ntfs.size(),
            place,
            partition,
            partuuid: None,
            note: None,
        };
        Ok(NtfsVol {
            info,
            dirty,
            inner: Arc::new(Mutex::new(Inner { ntfs, io })),
        })
    }

    /// True when the volume is marked dirty: Windows did not unmount it
    /// cleanly (a crash, a hibernation, Fast Startup).
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    fn err(&self, path: &str, e: impl std::fmt::Display) -> Error {
        err(&self.info.place, format!("{path}: {e}"))
    }

    /// The file record number at `path` (components compared without
    /// case).
    fn lookup(&self, inner: &mut Inner, path: &str) -> Result<u64> {
        let Inner { ntfs, io } = inner;
        let mut file = ntfs.root_directory(io).map_err(|e| self.err(path, e))?;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            let next = {
                let index = file.directory_index(io).map_err(|e| self.err(path, e))?;
                let mut finder = index.finder();
                let entry = NtfsFileNameIndex::find(&mut finder, ntfs, io, comp)
                    .ok_or_else(|| self.err(path, "no such file or directory"))?
                    .map_err(|e| self.err(path, e))?;
                entry.to_file(ntfs, io).map_err(|e| self.err(path, e))?
            };
            file = next;
        }
        Ok(file.file_record_number())
    }

    fn with_file<R>(
        &self,
        path: &str,
        f: impl FnOnce(&Ntfs, &mut Io, NtfsFile<'_>) -> Result<R>,
    ) -> Result<R> {
        guarded(&self.info.place, path, || self.with_file_inner(path, f))
    }

    fn with_file_inner<R>(
        &self,
        path: &str,
        f: impl FnOnce(&Ntfs, &mut Io, NtfsFile<'_>) -> Result<R>,
    ) -> Result<R> {
        // A read that panicked (caught in `guarded`) leaves nothing half
        // done that matters: every read seeks first.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.lookup(&mut guard, path)?;
        let Inner { ntfs, io } = &mut *guard;
        let file = ntfs.file(io, rec).map_err(|e| self.err(path, e))?;
        f(ntfs, io, file)
    }

    /// The length of a file's unnamed data stream.
    fn data_len(&self, path: &str, io: &mut Io, file: &NtfsFile<'_>) -> Result<u64> {
        match file.data(io, "") {
            None => Ok(0),
            Some(item) => {
                let item = item.map_err(|e| self.err(path, e))?;
                let attr = item.to_attribute().map_err(|e| self.err(path, e))?;
                Ok(attr.value_length())
            }
        }
    }

    fn entry(&self, path: &str, name: String, io: &mut Io, file: &NtfsFile<'_>) -> Result<Entry> {
        let si = file.info().map_err(|e| self.err(path, e))?;
        let attrs = si.file_attributes().bits();
        let kind = if file.is_directory() {
            EntryKind::Dir
        } else if attrs & 0x400 != 0 {
            // A reparse point: a symlink or junction.
            EntryKind::Symlink
        } else {
            EntryKind::File
        };
        let size = if kind == EntryKind::Dir {
            0
        } else {
            self.data_len(path, io, file)?
        };
        // Read-only files without write bits, as ntfs-3g shows them.
        let perm = if attrs & 0x1 != 0 { 0o555 } else { 0o777 };
        Ok(Entry {
            name,
            kind,
            size,
            mode: perm
                | match kind {
                    EntryKind::Dir => 0o040000,
                    EntryKind::Symlink => 0o120000,
                    _ => 0o100000,
                },
            mtime: unix_time(si.modification_time().nt_timestamp()),
        })
    }

    /// Random access to the file at `path`, for the hive reader.
    pub fn file_source(&self, path: &str) -> Result<NtfsFileSource> {
        let (record, len) = self.with_file(path, |_, io, file| {
            if file.is_directory() {
                return Err(self.err(path, "is a directory"));
            }
            Ok((file.file_record_number(), self.data_len(path, io, &file)?))
        })?;
        Ok(NtfsFileSource {
            vol: self.clone(),
            path: path.to_string(),
            record,
            len,
        })
    }
}

/// A file of an NTFS volume, read at any offset.
#[derive(Debug)]
pub struct NtfsFileSource {
    vol: NtfsVol,
    path: String,
    record: u64,
    len: u64,
}

impl HiveSource for NtfsFileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        guarded(&self.vol.info.place, &self.path, || {
            self.read_at_inner(buf, offset)
                .map_err(|e| err(&self.vol.info.place, e.to_string()))
        })
        .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl NtfsFileSource {
    fn read_at_inner(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let io_err =
            |e: &dyn std::fmt::Display| std::io::Error::other(format!("{}: {e}", self.path));
        let mut guard = self.vol.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { ntfs, io } = &mut *guard;
        let file = ntfs.file(io, self.record).map_err(|e| io_err(&e))?;
        let item = file
            .data(io, "")
            .ok_or_else(|| io_err(&"no data"))?
            .map_err(|e| io_err(&e))?;
        let attr = item.to_attribute().map_err(|e| io_err(&e))?;
        let mut value = attr.value(io).map_err(|e| io_err(&e))?;
        value
            .seek(io, SeekFrom::Start(offset))
            .map_err(|e| io_err(&e))?;
        value.read_exact(io, buf).map_err(|e| io_err(&e))?;
        Ok(())
    }
}

impl GuestFs for NtfsVol {
    fn info(&self) -> &FsInfo {
        &self.info
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        self.with_file(path, |ntfs, io, dir| {
            let index = dir.directory_index(io).map_err(|e| self.err(path, e))?;
            let mut it = index.entries();
            let mut records = Vec::new();
            while let Some(e) = it.next(io) {
                let e = e.map_err(|e| self.err(path, e))?;
                let Some(key) = e.key() else { continue };
                let key = key.map_err(|e| self.err(path, e))?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let rec = e.file_reference().file_record_number();
                if rec < FIRST_USER_RECORD {
                    continue;
                }
                if records.len() >= MAX_DIR_ENTRIES {
                    return Err(self.err(
                        path,
                        format!("more than {MAX_DIR_ENTRIES} entries, vmshift's limit for one directory"),
                    ));
                }
                records.push((key.name().to_string_lossy(), rec));
            }
            let mut out = Vec::new();
            for (name, rec) in records {
                let file = ntfs.file(io, rec).map_err(|e| self.err(path, e))?;
                out.push(self.entry(path, name, io, &file)?);
            }
            Ok(out)
        })
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let name = crate::vfs::base_name(path);
        self.with_file(path, |_, io, file| self.entry(path, name, io, &file))
    }

    fn read_to(&self, path: &str, max: u64, out: &mut dyn std::io::Write) -> Result<u64> {
        self.with_file(path, |_, io, file| {
            if file.is_directory() {
                return Err(self.err(path, "is a directory"));
            }
            let Some(item) = file.data(io, "") else {
                return Ok(0);
            };
            let item = item.map_err(|e| self.err(path, e))?;
            let attr = item.to_attribute().map_err(|e| self.err(path, e))?;
            let size = attr.value_length();
            if size > max {
                return Err(self.err(path, format!("{size} bytes, more than the {max} read")));
            }
            let mut value = attr.value(io).map_err(|e| self.err(path, e))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < size {
                let n = value.read(io, &mut buf).map_err(|e| self.err(path, e))?;
                if n == 0 {
                    return Err(self.err(path, format!("its data ends at {done} of {size} bytes")));
                }
                out.write_all(&buf[..n])
                    .map_err(|e| self.err(path, format!("writing: {e}")))?;
                done += n as u64;
            }
            Ok(done)
        })
    }
}
