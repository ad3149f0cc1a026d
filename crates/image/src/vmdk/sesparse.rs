//! seSparse extents: the snapshot deltas of VMFS 6 (and of VMFS 5 disks
//! over 2 TiB). VMware has not published the format; the layout here is
//! the one QEMU reads (docs/formats/vmdk.md §6.2), and like QEMU vmshift
//! refuses anything its strict header checks do not recognise, including a
//! journal that still needs replaying. Read-only.
//!
//! A 512-byte constant header of u64 fields gives the areas in sectors: a
//! volatile header, a grain directory of u64 entries naming grain tables by
//! index, the grain tables (4096 u64 entries, 16 MiB of guest data each),
//! and the grains (4 KiB each) addressed by index.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian};

use super::sparse::Grain;
use crate::check::CheckReport;
use crate::error::{Ctx, Result};
use crate::fileio::{file_len, read_exact_at, read_up_to_at};

const CONST_MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
const GRAIN_SECTORS: u64 = 8;
const GRAIN_BYTES: u64 = GRAIN_SECTORS * 512;
const GT_SECTORS: u64 = 64;
const GT_ENTRIES: u64 = GT_SECTORS * 512 / 8;
/// 64 TiB, the largest seSparse disk (QEMU's limit too).
const MAX_GD_ENTRIES: u64 = vmshift_model::limits::VMDK_GD_ENTRIES;
const GT_CACHE_TABLES: usize = 256;

const GD_ALLOCATED: u64 = 0x1000_0000_0000_0000;
const TOP_NIBBLE: u64 = 0xf000_0000_0000_0000;

/// An seSparse extent file opened for reading.
#[derive(Debug)]
pub struct SeSparseExtent {
    file: File,
    ctx: Ctx,
    file_len: u64,
    /// Sectors.
    pub capacity: u64,
    gd: Vec<u64>,
    /// Sector of grain table 0.
    tables_at: u64,
    /// Sector of grain 0.
    grains_at: u64,
    gt_cache: Mutex<HashMap<u64, Arc<[u64]>>>,
}

impl SeSparseExtent {
    pub fn open(file: File, path: &Path) -> Result<SeSparseExtent> {
        let ctx = Ctx::new(path);
        let len = file_len(&file, path)?;
        let mut b = [0u8; 512];
        if read_up_to_at(&file, path, &mut b, 0)? < 512 {
            return Err(ctx.invalid("header", 0, "file too short for an seSparse header"));
        }
        let f = |i: usize| LittleEndian::read_u64(&b[i * 8..i * 8 + 8]);
        let expect = |field: &str, at: usize, want: u64, what: &str| {
            let have = f(at / 8);
            if have == want {
                Ok(())
            } else {
                Err(ctx.unsupported(
                    field,
                    format!("{have:#x} at byte {at} (expected {want:#x}: {what})"),
                ))
            }
        };
        if f(0) != CONST_MAGIC {
            return Err(ctx.invalid(
                "magic",
                0,
                format!("{:#018x} (expected 0xcafebabe, an seSparse header)", f(0)),
            ));
        }
        expect("version", 8, VERSION, "the one seSparse version known")?;
        expect("grain_size", 24, GRAIN_SECTORS, "8 sectors")?;
        expect("grain_table_size", 32, GT_SECTORS, "64 sectors")?;
        expect("flags", 40, 0, "no flags")?;
        for (i, name) in ["reserved1", "reserved2", "reserved3", "reserved4"]
            .iter()
            .enumerate()
        {
            expect(name, 48 + 8 * i, 0, "reserved")?;
        }
        if b[208..].iter().any(|&x| x != 0) {
            return Err(ctx.unsupported("header padding", "non-zero bytes after byte 208"));
        }
        let capacity = f(2);
        let sectors = |field: &str, at: usize| {
            f(at / 8)
                .checked_mul(512)
                .filter(|&o| o < len)
                .ok_or_else(|| {
                    ctx.corrupt(
                        field,
                        at as u64,
                        format!(
                            "sector {} lies past the end of the file ({len} bytes)",
                            f(at / 8)
                        ),
                    )
                })
        };
        // The volatile header: a journal to replay means the last writer
        // did not finish, and the tables cannot be trusted without it.
        let vol_at = sectors("volatile_header_offset", 80)?;
        let mut v = [0u8; 512];
        read_exact_at(&file, path, &mut v, vol_at, "volatile header")?;
        let vf = |i: usize| LittleEndian::read_u64(&v[i * 8..i * 8 + 8]);
        if vf(0) != VOLATILE_MAGIC {
            return Err(ctx.invalid(
                "volatile header",
                vol_at,
                format!("magic {:#018x} (expected 0xcafecafe)", vf(0)),
            ));
        }
        if vf(3) != 0 {
            return Err(ctx.unsupported(
                "replay_journal",
                "the journal has not been replayed (the disk was not closed cleanly); open it in VMware once to replay it",
            ));
        }
        if v[32..].iter().any(|&x| x != 0) {
            return Err(ctx.unsupported("volatile header padding", "non-zero bytes after byte 32"));
        }
        let entries = capacity.div_ceil(GRAIN_SECTORS * GT_ENTRIES);
        if entries > MAX_GD_ENTRIES {
            return Err(ctx.invalid(
                "capacity",
                16,
                format!("{capacity} sectors is more than the 64 TiB an seSparse disk can hold"),
            ));
        }
        let gd_room = f(17).saturating_mul(512) / 8;
        if gd_room < entries {
            return Err(ctx.corrupt(
                "grain_dir_size",
                136,
                format!(
                    "{} sectors hold {gd_room} grain directory entries; {capacity} sectors need {entries}",
                    f(17)
                ),
            ));
        }
        let gd_at = sectors("grain_dir_offset", 128)?;
        if gd_at + entries * 8 > len {
            return Err(ctx.corrupt(
                "grain_dir_offset",
                128,
                format!("the grain directory ({entries} entries) runs past the end of the file ({len} bytes)"),
            ));
        }
        let mut raw = vec![0u8; (entries * 8) as usize];
        read_exact_at(&file, path, &mut raw, gd_at, "grain directory")?;
        let gd = raw.chunks_exact(8).map(LittleEndian::read_u64).collect();
        Ok(SeSparseExtent {
            file,
            ctx,
            file_len: len,
            capacity,
            gd,
            tables_at: f(18),
            grains_at: f(24),
            gt_cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * 512
    }

    pub fn grain_bytes(&self) -> u64 {
        GRAIN_BYTES
    }

    pub fn path_buf(&self) -> PathBuf {
        self.ctx.path.clone()
    }

    /// The byte offset of the grain table directory entry `i` names, or
    /// `None` when it has none.
    fn table_offset(&self, i: usize) -> Result<Option<u64>> {
        let e = self.gd[i];
        if e == 0 {
            return Ok(None);
        }
        if e & 0xffff_ffff_0000_0000 != GD_ALLOCATED {
            return Err(self.ctx.corrupt(
                "grain directory entry",
                i as u64 * 8,
                format!("entry {i} is {e:#018x}; an allocated entry is 0x10000000 followed by a table index"),
            ));
        }
        let at = (e & 0xffff_ffff)
            .checked_mul(GT_SECTORS)
            .and_then(|s| s.checked_add(self.tables_at))
            .and_then(|s| s.checked_mul(512))
            .filter(|&at| at + GT_ENTRIES * 8 <= self.file_len)
            .ok_or_else(|| {
                self.ctx.corrupt(
                    "grain directory entry",
                    i as u64 * 8,
                    format!(
                        "entry {i} names grain table {}, which lies past the end of the file",
                        e & 0xffff_ffff
                    ),
                )
            })?;
        Ok(Some(at))
    }

    fn table(&self, at: u64) -> Result<Arc<[u64]>> {
        let lock = || self.gt_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = lock().get(&at) {
            return Ok(t.clone());
        }
        let mut raw = vec![0u8; (GT_ENTRIES * 8) as usize];
        read_exact_at(&self.file, &self.ctx.path, &mut raw, at, "grain table")?;
        let t: Arc<[u64]> = raw.chunks_exact(8).map(LittleEndian::read_u64).collect();
        let mut cache = lock();
        if cache.len() >= GT_CACHE_TABLES {
            cache.clear();
        }
        cache.insert(at, t.clone());
        Ok(t)
    }

    /// Decodes one grain table entry (`table_at` for the message).
    fn decode(&self, e: u64, table_at: u64, j: u64) -> Result<Grain> {
        let bad = |why: String| Err(self.ctx.corrupt("grain table entry", table_at + j * 8, why));
        match e & TOP_NIBBLE {
            0 if e == 0 => Ok(Grain::Unallocated),
            // SCSI-unmapped and zeroed grains both read as zeros.
            0x1000_0000_0000_0000 | 0x2000_0000_0000_0000 => Ok(Grain::Zero),
            0x3000_0000_0000_0000 => {
                let index =
                    ((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12);
                match index
                    .checked_mul(GRAIN_SECTORS)
                    .and_then(|s| s.checked_add(self.grains_at))
                    .and_then(|s| s.checked_mul(512))
                    .filter(|&at| at < self.file_len)
                {
                    Some(at) => Ok(Grain::Data(at)),
                    None => bad(format!(
                        "grain {index} lies past the end of the file ({} bytes)",
                        self.file_len
                    )),
                }
            }
            _ => bad(format!("{e:#018x} is not a known kind of entry")),
        }
    }

    /// The grain holding byte `offset` of the extent.
    pub fn grain(&self, offset: u64) -> Result<Grain> {
        let g = offset / GRAIN_BYTES;
        let i = (g / GT_ENTRIES) as usize;
        let Some(at) = self.table_offset(i)? else {
            return Ok(Grain::Unallocated);
        };
        let j = g % GT_ENTRIES;
        self.decode(self.table(at)?[j as usize], at, j)
    }

    /// Reads grain data at host `at`.
    pub fn read_data(&self, buf: &mut [u8], at: u64) -> Result<()> {
        if at + buf.len() as u64 > self.file_len {
            return Err(self.ctx.corrupt(
                "grain table entry",
                at,
                "grain data runs past the end of the file",
            ));
        }
        read_exact_at(&self.file, &self.ctx.path, buf, at, "grain")
    }

    /// Checks every directory and table entry: entries of unknown kinds,
    /// tables and grains past the end of the file, two directory entries
    /// sharing a table, two table entries sharing a grain.
    pub fn check(&self, report: &mut CheckReport) -> Result<()> {
        let name = self.ctx.path.display().to_string();
        let err = |report: &mut CheckReport, msg: String| {
            report.corruptions += 1;
            report.messages.push(format!("ERROR {name}: {msg}"));
        };
        let grains = self.capacity.div_ceil(GRAIN_SECTORS);
        report.total_clusters += grains;
        let mut tables: HashMap<u64, usize> = HashMap::new();
        let mut owners: HashMap<u64, u64> = HashMap::new();
        for i in 0..self.gd.len() {
            let at = match self.table_offset(i) {
                Ok(Some(at)) => at,
                Ok(None) => continue,
                Err(e) => {
                    err(report, e.to_string());
                    continue;
                }
            };
            if let Some(other) = tables.insert(at, i) {
                err(
                    report,
                    format!("grain directory entries {other} and {i} share one grain table"),
                );
                continue;
            }
            let table = self.table(at)?;
            for (j, &e) in table.iter().enumerate() {
                let g = i as u64 * GT_ENTRIES + j as u64;
                match self.decode(e, at, j as u64) {
                    Err(e) => err(report, e.to_string()),
                    Ok(Grain::Data(host)) => {
                        if g >= grains {
                            err(
                                report,
                                format!("grain table entry for grain {g} lies beyond the capacity"),
                            );
                            continue;
                        }
                        report.allocated_clusters += 1;
                        if host + GRAIN_BYTES > self.file_len {
                            err(
                                report,
                                format!(
                                    "grain {g} runs past the end of the file ({} bytes)",
                                    self.file_len
                                ),
                            );
                        } else if let Some(other) = owners.insert(host, g) {
                            err(
                                report,
                                format!("grains {other} and {g} share the data at byte {host:#x}"),
                            );
                        }
                    }
                    Ok(_) => {}
                }
            }
        }
        Ok(())
    }
}
