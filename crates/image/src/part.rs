//! Partition tables: MBR (primary entries and the chain of extended boot
//! records) and GPT (primary and backup headers, both CRC32s, 512- and
//! 4096-byte sectors), read through any [`ImageReader`].
//!
//! Reading never trusts the table: every offset is checked against the
//! disk, the EBR chain is walked with loop detection and a length limit,
//! and a damaged GPT is reported (which copy is damaged, and whether the
//! backup header sits at the end of the disk, as it must after a resize).

use std::collections::HashSet;

use byteorder::{ByteOrder, LittleEndian};
use serde::Serialize;

use crate::block::ImageReader;
use crate::error::{Error, ErrorKind, Result};

/// Logical partitions followed in an extended partition, at most.
const MAX_LOGICAL: usize = vmshift_model::limits::MBR_LOGICAL_PARTITIONS;
/// GPT entries read, at most (the usual array has 128).
const MAX_GPT_ENTRIES: u32 = vmshift_model::limits::GPT_ENTRIES;
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";

/// MBR or GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// DOS/MBR partitioning.
    Mbr,
    /// GUID partition table.
    Gpt,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Partition {
    /// 1-based number as Linux names it (MBR logical partitions from 5).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Bytes.
    pub size: u64,
    /// The type: `0x83` for MBR, a GUID for GPT.
    pub type_id: String,
    /// The type's common name.
    pub type_name: String,
    /// GPT: the partition's own GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// GPT: the partition's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// MBR: the active (boot) flag.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
    /// MBR: an extended partition (a container of logical ones).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
}

/// What is wrong with a GPT.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GptState {
    /// Bytes per sector the table uses.
    pub sector_size: u64,
    /// The disk's GUID.
    pub disk_guid: String,
    /// First and last usable LBA.
    pub first_usable_lba: u64,
    /// Last usable LBA (inclusive).
    pub last_usable_lba: u64,
    /// LBA of the backup header.
    pub backup_lba: u64,
    /// The primary header and its entries are sound.
    pub primary_ok: bool,
    /// The backup header and its entries are sound.
    pub backup_ok: bool,
    /// The backup header is on the disk's last sector.
    pub backup_at_end: bool,
    /// Entries in the partition array, as its header says (checked
    /// against `limits::GPT_ENTRIES`).
    #[serde(skip)]
    pub entries: u32,
}

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PartitionTable {
    /// MBR or GPT.
    pub kind: TableKind,
    /// GPT details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpt: Option<GptState>,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
    /// Problems found (damage, overlaps, entries past the disk).
    pub problems: Vec<String>,
}

impl PartitionTable {
    /// The partition that ends last on the disk.
    pub fn last(&self) -> Option<&Partition> {
        self.partitions
            .iter()
            .filter(|p| !p.extended)
            .max_by_key(|p| p.end)
    }
}

fn invalid(img: &dyn ImageReader, field: &str, at: u64, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
        .at_path(img.path())
        .field(field)
        .offset(at)
}

fn read(img: &dyn ImageReader, at: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, at)?;
    Ok(b)
}

/// Reads the partition table of `img`: `None` when the disk has none.
pub fn read_table(img: &dyn ImageReader) -> Result<Option<PartitionTable>> {
    let size = img.size();
    if size < 512 {
        return Ok(None);
    }
    let mbr = read(img, 0, 512)?;
    let has_sig = mbr[510] == 0x55 && mbr[511] == 0xaa;
    // GPT: the header is at LBA 1, whose byte offset depends on the
    // sector size; try 512 then 4096.
    let entries = mbr_entries(&mbr);
    let protective = entries.iter().any(|e| e.kind == 0xee);
    let mbr_in_use = has_sig && entries.iter().any(|e| e.kind != 0);
    for ss in [512u64, 4096] {
        if size >= ss * 2 {
            let h = read(img, ss, 8)?;
            if h == GPT_SIGNATURE {
                // A GPT counts only behind a protective MBR (as the kernel
                // and libblkid have it); a DOS table written over an old GPT
                // is the disk's table.
                if mbr_in_use && !protective {
                    let mut t = read_mbr(img, &entries)?;
                    t.problems.push(format!(
                        "a leftover GPT header at byte {ss} (no protective MBR entry); the MBR is the table"
                    ));
                    return Ok(Some(t));
                }
                return read_gpt(img, ss).map(Some);
            }
        }
    }
    if !has_sig {
        return Ok(None);
    }
    if protective {
        // A protective MBR whose primary GPT header is unreadable: the
        // backup may still be whole, at the end, in either sector size.
        return read_gpt(img, 512)
            .or_else(|e| read_gpt(img, 4096).map_err(|_| e))
            .map(Some);
    }
    if entries.iter().all(|e| e.kind == 0) {
        return Ok(None);
    }
    read_mbr(img, &entries).map(Some)
}

#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    boot: bool,
    kind: u8,
    lba: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[0x1be + i * 16..0x1be + (i + 1) * 16];
        MbrEntry {
            boot: e[0] == 0x80,
            kind: e[4],
            lba: u64::from(LittleEndian::read_u32(&e[8..12])),
            sectors: u64::from(LittleEndian::read_u32(&e[12..16])),
        }
    })
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn read_mbr(img: &dyn ImageReader, entries: &[MbrEntry; 4]) -> Result<PartitionTable> {
    let size = img.size();
    let mut t = PartitionTable {
        kind: TableKind::Mbr,
        gpt: None,
        partitions: Vec::new(),
        problems: Vec::new(),
    };
    let part = |number: u32, e: &MbrEntry, base: u64, extended: bool| Partition {
        number,
        start: (base + e.lba) * 512,
        end: (base + e.lba + e.sectors) * 512,
        size: e.sectors * 512,
        type_id: format!("0x{:02x}", e.kind),
        type_name: mbr_type_name(e.kind).to_string(),
        guid: None,
        label: None,
        bootable: e.boot,
        extended,
    };
    let mut ext = None;
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let p = part(i as u32 + 1, e, 0, is_extended(e.kind));
        if is_extended(e.kind) {
            if ext.is_some() {
                t.problems.push(format!(
                    "partition {} is a second extended partition",
                    i + 1
                ));
            } else {
                ext = Some((e.lba, e.sectors));
            }
        }
        t.partitions.push(p);
    }
    // The EBR chain: each EBR's entry 0 is a logical partition relative to
    // that EBR, entry 1 the next EBR relative to the extended partition.
    if let Some((ext_lba, ext_sectors)) = ext {
        let mut seen = HashSet::new();
        let mut ebr = ext_lba;
        let mut number = 5;
        loop {
            if !seen.insert(ebr) {
                return Err(invalid(
                    img,
                    "extended boot record",
                    ebr * 512,
                    format!("the chain of extended boot records loops back to sector {ebr}"),
                ));
            }
            if seen.len() > MAX_LOGICAL {
                return Err(invalid(
                    img,
                    "extended boot record",
                    ebr * 512,
                    format!("more than {MAX_LOGICAL} logical partitions"),
                ));
            }
            if (ebr + 1) * 512 > size || ebr >= ext_lba + ext_sectors {
                return Err(invalid(
                    img,
                    "extended boot record",
                    ebr * 512,
                    format!("sector {ebr} lies outside the extended partition or the disk"),
                ));
            }
            let s = read(img, ebr * 512, 512)?;
            if s[510] != 0x55 || s[511] != 0xaa {
                t.problems.push(format!(
                    "the extended boot record at sector {ebr} has no 55 AA signature"
                ));
                break;
            }
            let [first, next, ..] = mbr_entries(&s);
            if first.kind != 0 && first.sectors != 0 {
                t.partitions.push(part(number, &first, ebr, false));
                number += 1;
            }
            if next.kind == 0 || next.sectors == 0 {
                break;
            }
            ebr = ext_lba + next.lba;
        }
    }
    check_layout(&mut t, size);
    Ok(t)
}

/// Overlaps and partitions past the end of the disk.
fn check_layout(t: &mut PartitionTable, size: u64) {
    let mut ps: Vec<&Partition> = t.partitions.iter().collect();
    ps.sort_by_key(|p| p.start);
    let mut problems = Vec::new();
    for p in &ps {
        if p.end > size {
            problems.push(format!(
                "partition {} ends at byte {} past the end of the disk ({size} bytes)",
                p.number, p.end
            ));
        }
    }
    for (i, a) in ps.iter().enumerate() {
        for b in &ps[i + 1..] {
            if b.start >= a.end {
                break;
            }
            // Logical partitions lie inside their extended container.
            let nested = |outer: &Partition, inner: &Partition| {
                outer.extended && inner.start >= outer.start && inner.end <= outer.end
            };
            if !nested(a, b) && !nested(b, a) {
                problems.push(format!("partitions {} and {} overlap", a.number, b.number));
            }
        }
    }
    t.problems.extend(problems);
}

/// One GPT header, parsed and checked.
#[derive(Debug, Clone)]
struct GptHeader {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// Reads and checks the header at `lba`; `Err` says what is wrong.
fn gpt_header(img: &dyn ImageReader, ss: u64, lba: u64) -> std::result::Result<GptHeader, String> {
    let at = lba
        .checked_mul(ss)
        .filter(|&a| a + ss <= img.size())
        .ok_or_else(|| format!("header LBA {lba} lies past the end of the disk"))?;
    let b = read(img, at, ss as usize).map_err(|e| e.to_string())?;
    if &b[0..8] != GPT_SIGNATURE {
        return Err(format!("no 'EFI PART' signature at LBA {lba}"));
    }
    let hsize = LittleEndian::read_u32(&b[12..16]) as usize;
    if hsize < 92 || hsize as u64 > ss {
        return Err(format!("header size {hsize} (expected 92 to {ss})"));
    }
    let want = LittleEndian::read_u32(&b[16..20]);
    let mut h = b[..hsize].to_vec();
    h[16..20].fill(0);
    let got = crc32fast::hash(&h);
    if got != want {
        return Err(format!(
            "header CRC32 is {want:08x}, the header's bytes give {got:08x}"
        ));
    }
    let u64_at = |o: usize| LittleEndian::read_u64(&b[o..o + 8]);
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&b[56..72]);
    let hdr = GptHeader {
        my_lba: u64_at(24),
        alternate_lba: u64_at(32),
        first_usable: u64_at(40),
        last_usable: u64_at(48),
        disk_guid,
        entries_lba: u64_at(72),
        entries: LittleEndian::read_u32(&b[80..84]),
        entry_size: LittleEndian::read_u32(&b[84..88]),
        entries_crc: LittleEndian::read_u32(&b[88..92]),
    };
    if hdr.my_lba != lba {
        return Err(format!(
            "header at LBA {lba} says it is at LBA {}",
            hdr.my_lba
        ));
    }
    if hdr.entry_size < 128 || !hdr.entry_size.is_power_of_two() || hdr.entry_size > 4096 {
        return Err(format!(
            "entry size {} (expected a power of two from 128)",
            hdr.entry_size
        ));
    }
    if hdr.entries == 0 || hdr.entries > MAX_GPT_ENTRIES {
        return Err(format!(
            "{} entries (expected 1 to {MAX_GPT_ENTRIES})",
            hdr.entries
        ));
    }
    let bytes = u64::from(hdr.entries) * u64::from(hdr.entry_size);
    if hdr
        .entries_lba
        .checked_mul(ss)
        .and_then(|a| a.checked_add(bytes))
        .is_none_or(|end| end > img.size())
    {
        return Err(format!(
            "the entry array at LBA {} ({bytes} bytes) runs past the end of the disk",
            hdr.entries_lba
        ));
    }
    if hdr.first_usable > hdr.last_usable {
        return Err(format!(
            "first usable LBA {} is after the last usable LBA {}",
            hdr.first_usable, hdr.last_usable
        ));
    }
    Ok(hdr)
}

/// The entry array of `h`, checked against its CRC32.
fn gpt_entries(
    img: &dyn ImageReader,
    ss: u64,
    h: &GptHeader,
) -> std::result::Result<Vec<u8>, String> {
    let bytes = h.entries as usize * h.entry_size as usize;
    let b = read(img, h.entries_lba * ss, bytes).map_err(|e| e.to_string())?;
    let got = crc32fast::hash(&b);
    if got != h.entries_crc {
        return Err(format!(
            "entry array CRC32 is {:08x}, its bytes give {got:08x}",
            h.entries_crc
        ));
    }
    Ok(b)
}

/// A GUID in its usual text form (the first three fields little-endian).
pub fn guid_text(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        LittleEndian::read_u32(&g[0..4]),
        LittleEndian::read_u16(&g[4..6]),
        LittleEndian::read_u16(&g[6..8]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

fn read_gpt(img: &dyn ImageReader, ss: u64) -> Result<PartitionTable> {
    let last_lba = img.size() / ss - 1;
    let primary = gpt_header(img, ss, 1).and_then(|h| gpt_entries(img, ss, &h).map(|e| (h, e)));
    // The backup header: where the primary says, else the last sector.
    let backup_lba = primary
        .as_ref()
        .map(|(h, _)| h.alternate_lba)
        .unwrap_or(last_lba);
    let backup = gpt_header(img, ss, backup_lba)
        .or_else(|e| {
            if backup_lba != last_lba {
                gpt_header(img, ss, last_lba)
            } else {
                Err(e)
            }
        })
        .and_then(|h| gpt_entries(img, ss, &h).map(|e| (h, e)));
    let mut problems = Vec::new();
    if let Err(e) = &primary {
        problems.push(format!("primary GPT: {e}"));
    }
    if let Err(e) = &backup {
        problems.push(format!("backup GPT: {e}"));
    }
    let (h, entries) = match (&primary, &backup) {
        (Ok(p), _) => p.clone(),
        (Err(_), Ok(b)) => b.clone(),
        (Err(p), Err(b)) => {
            return Err(invalid(
                img,
                "GPT header",
                ss,
                format!("both GPT copies are damaged: primary: {p}; backup: {b}"),
            ))
        }
    };
    if let (Ok((p, pe)), Ok((b, be))) = (&primary, &backup) {
        if pe != be || p.disk_guid != b.disk_guid {
            problems.push("the primary and backup GPTs differ".into());
        }
    }
    let backup_at = backup
        .as_ref()
        .map(|(b, _)| b.my_lba)
        .unwrap_or(h.alternate_lba);
    if backup_at != last_lba {
        problems.push(format!(
            "the backup GPT header is at LBA {backup_at}, not at the end of the disk (LBA {last_lba}): the disk was resized without moving it"
        ));
    }
    if h.last_usable > last_lba {
        problems.push(format!(
            "the last usable LBA {} lies past the end of the disk (LBA {last_lba})",
            h.last_usable
        ));
    }
    let mut t = PartitionTable {
        kind: TableKind::Gpt,
        gpt: Some(GptState {
            sector_size: ss,
            disk_guid: guid_text(&h.disk_guid),
            first_usable_lba: h.first_usable,
            last_usable_lba: h.last_usable,
            backup_lba: backup_at,
            primary_ok: primary.is_ok(),
            backup_ok: backup.is_ok(),
            backup_at_end: backup_at == last_lba,
            entries: h.entries,
        }),
        partitions: Vec::new(),
        problems,
    };
    for (i, e) in entries.chunks_exact(h.entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = LittleEndian::read_u64(&e[32..40]);
        let last = LittleEndian::read_u64(&e[40..48]);
        if last < first {
            t.problems.push(format!(
                "partition {} ends (LBA {last}) before it starts (LBA {first})",
                i + 1
            ));
            continue;
        }
        if first < h.first_usable || last > h.last_usable {
            t.problems.push(format!(
                "partition {} (LBA {first}–{last}) lies outside the usable LBAs {}–{}",
                i + 1,
                h.first_usable,
                h.last_usable
            ));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(LittleEndian::read_u16)
            .take_while(|&c| c != 0)
            .collect();
        let type_id = guid_text(&e[0..16]);
        let (start, end) = (
            first.saturating_mul(ss),
            last.saturating_add(1).saturating_mul(ss),
        );
        t.partitions.push(Partition {
            number: i as u32 + 1,
            start,
            end,
            size: end - start,
            type_name: gpt_type_name(&type_id).to_string(),
            type_id,
            guid: Some(guid_text(&e[16..32])),
            label: Some(String::from_utf16_lossy(&name)),
            bootable: false,
            extended: false,
        });
    }
    let size = img.size();
    check_layout(&mut t, size);
    Ok(t)
}

fn mbr_type_name(kind: u8) -> &'static str {
    match kind {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0e => "FAT16",
        0x05 => "Extended",
        0x07 => "HPFS/NTFS/exFAT",
        0x0b | 0x0c => "W95 FAT32",
        0x0f => "W95 Extended (LBA)",
        0x11 | 0x14 | 0x16 | 0x1b | 0x1c | 0x1e => "Hidden FAT",
        0x17 => "Hidden NTFS",
        0x27 => "Hidden NTFS WinRE",
        0x42 => "SFS / Windows dynamic",
        0x82 => "Linux swap / Solaris",
        0x83 => "Linux",
        0x85 => "Linux extended",
        0x8e => "Linux LVM",
        0xa5 => "FreeBSD",
        0xa6 => "OpenBSD",
        0xa9 => "NetBSD",
        0xbf => "Solaris",
        0xee => "GPT protective",
        0xef => "EFI (FAT-12/16/32)",
        0xfb => "VMware VMFS",
        0xfc => "VMware VMKCORE",
        0xfd => "Linux raid autodetect",
        _ => "unknown",
    }
}

fn gpt_type_name(guid: &str) -> &'static str {
    match guid {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery environment",
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3" => "Microsoft LDM metadata",
        "AF9B60A0-1431-4F62-BC68-3311714A69AD" => "Microsoft LDM data",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "44479540-F297-41B2-9AF7-D131D5F0458A" => "Linux root (x86)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux /home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "6A898CC3-1DD2-11B2-99A6-080020736631" => "Solaris /usr / Apple ZFS",
        "516E7CB4-6ECF-11D6-8FF8-00022D09712B" => "FreeBSD",
        "AA31E02A-400F-11DB-9590-000C2911D1B8" => "VMware VMFS",
        _ => "unknown",
    }
}
