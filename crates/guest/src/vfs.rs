//! Every file system on a guest's disks, found by its magic, named the way
//! libguestfs names it (`/dev/sda1`: disk a, partition 1), and readable
//! through one interface where vmshift reads that kind (ext2/3/4, FAT,
//! XFS, NTFS). Kinds not read (btrfs, LVM physical volumes, swap) are
//! still listed with their UUID, label and size.

use std::io::{Read, Write};
use std::sync::Arc;

use ext4_view::Ext4;
use vmshift_image::part::read_table;
use vmshift_image::ImageReader;

use crate::{Error, Result};

/// What a file system (or other content) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext2.
    Ext2,
    /// ext3 (ext2 with a journal).
    Ext3,
    /// ext4.
    Ext4,
    /// FAT12.
    Fat12,
    /// FAT16.
    Fat16,
    /// FAT32.
    Fat32,
    /// XFS.
    Xfs,
    /// NTFS.
    Ntfs,
    /// btrfs.
    Btrfs,
    /// Linux swap.
    Swap,
    /// An LVM2 physical volume.
    LvmPv,
    /// A LUKS-encrypted volume (not read: its key is in the guest's
    /// owner's hands).
    Luks,
    /// A logical volume vmshift does not read (thin, RAID, a PV missing)
    /// or that holds nothing it knows; [`FsInfo::note`] says which.
    Unread,
}

impl FsKind {
    /// The name `blkid` and `virt-filesystems` give it.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => "vfat",
            FsKind::Xfs => "xfs",
            FsKind::Ntfs => "ntfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Swap => "swap",
            FsKind::LvmPv => "LVM2_member",
            FsKind::Luks => "crypto_LUKS",
            FsKind::Unread => "unknown",
        }
    }

    /// True when vmshift reads its files.
    pub fn readable(self) -> bool {
        matches!(
            self,
            FsKind::Ext2
                | FsKind::Ext3
                | FsKind::Ext4
                | FsKind::Fat12
                | FsKind::Fat16
                | FsKind::Fat32
                | FsKind::Xfs
                | FsKind::Ntfs
        )
    }
}

/// A file system found, and where.
#[derive(Debug, Clone)]
pub struct FsInfo {
    /// Its kind.
    pub kind: FsKind,
    /// Its UUID (FAT: the volume serial, as `XXXX-XXXX`).
    pub uuid: Option<String>,
    /// Its label.
    pub label: Option<String>,
    /// Its size in bytes, as the file system states it.
    pub size: u64,
    /// Where it is: the device name libguestfs would give it (`/dev/sda1`).
    pub place: String,
    /// Its partition number (None: the whole disk).
    pub partition: Option<u32>,
    /// The partition's PARTUUID as Linux shows it (GPT: its GUID; MBR:
    /// the disk signature and the partition number, `1234abcd-01`).
    pub partuuid: Option<String>,
    /// Why it is not read, for [`FsKind::Unread`].
    pub note: Option<String>,
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, fifo or socket.
    Other,
}

/// A directory entry (or a file's own status).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name (not valid UTF-8: replaced characters).
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its size in bytes.
    pub size: u64,
    /// Its mode, with the file type bits.
    pub mode: u32,
    /// When it was last modified, in seconds since the epoch.
    pub mtime: i64,
}

/// A guest file system vmshift reads. Paths are absolute inside it; a
/// symlink is followed inside the file system, never on the host.
pub trait GuestFs {
    /// What it is and where.
    fn info(&self) -> &FsInfo;
    /// The entries of the directory at `path` (without `.` and `..`).
    fn list(&self, path: &str) -> Result<Vec<Entry>>;
    /// The entry at `path` itself (a symlink is not followed).
    fn stat(&self, path: &str) -> Result<Entry>;
    /// The entry `path` names, symlinks followed (inside the file system).
    fn metadata(&self, path: &str) -> Result<Entry> {
        self.stat(path)
    }
    /// Streams the file at `path` into `out`; a file larger than `max`
    /// bytes is an error. Returns its size.
    fn read_to(&self, path: &str, max: u64, out: &mut dyn Write) -> Result<u64>;
    /// Reads the file at `path`, at most `max` bytes.
    fn read(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_to(path, max, &mut v)?;
        Ok(v)
    }
    /// The target of the symlink at `path`; `None` for what is not one.
    fn read_link(&self, path: &str) -> Result<Option<String>> {
        let _ = path;
        Ok(None)
    }
}

/// What file systems are read from: a disk image, or an LVM logical
/// volume assembled from the disks' physical volumes.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// A disk image as a [`Device`].
#[derive(Debug, Clone)]
pub struct Disk(pub Arc<dyn ImageReader>);

impl Device for Disk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.0.read_at(buf, offset)?)
    }
}

/// A guest's tree as the guest mounts it: its root file system, with
/// others at their mountpoints (`/boot` on a partition of its own). A path
/// goes to the file system of its longest mountpoint; a symlink is
/// resolved inside the file system it is on.
pub struct Mounted<'a> {
    root: &'a dyn GuestFs,
    /// Mountpoints, longest first.
    mounts: Vec<(String, Box<dyn GuestFs>)>,
}

impl<'a> Mounted<'a> {
    /// The tree of `root` with `mounts` (mountpoint, file system).
    pub fn new(root: &'a dyn GuestFs, mut mounts: Vec<(String, Box<dyn GuestFs>)>) -> Self {
        for m in &mut mounts {
            m.0 = m.0.trim_end_matches('/').to_string();
        }
        mounts.retain(|m| !m.0.is_empty());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        Mounted { root, mounts }
    }

    fn route<'p>(&self, path: &'p str) -> (&dyn GuestFs, std::borrow::Cow<'p, str>) {
        for (mp, fs) in &self.mounts {
            if let Some(rest) = path.strip_prefix(mp.as_str()) {
                if rest.is_empty() {
                    return (&**fs, "/".into());
                }
                if rest.starts_with('/') {
                    return (&**fs, rest.to_string().into());
                }
            }
        }
        (self.root, path.into())
    }
}

impl std::fmt::Debug for Mounted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mps: Vec<&str> = self.mounts.iter().map(|m| m.0.as_str()).collect();
        f.debug_struct("Mounted")
            .field("root", &self.root.info().place)
            .field("mounts", &mps)
            .finish()
    }
}

impl GuestFs for Mounted<'_> {
    fn info(&self) -> &FsInfo {
        self.root.info()
    }
    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let (fs, p) = self.route(path);
        fs.list(&p)
    }
    fn stat(&self, path: &str) -> Result<Entry> {
        let (fs, p) = self.route(path);
        fs.stat(&p)
    }
    fn metadata(&self, path: &str) -> Result<Entry> {
        let (fs, p) = self.route(path);
        fs.metadata(&p)
    }
    fn read_to(&self, path: &str, max: u64, out: &mut dyn Write) -> Result<u64> {
        let (fs, p) = self.route(path);
        fs.read_to(&p, max, out)
    }
    fn read_link(&self, path: &str) -> Result<Option<String>> {
        let (fs, p) = self.route(path);
        fs.read_link(&p)
    }
}

/// A file system found on a disk.
#[derive(Clone)]
pub struct Found {
    /// What and where.
    pub info: FsInfo,
    /// The disk, or the logical volume.
    pub image: Arc<dyn Device>,
    /// Its byte range on the disk.
    pub start: u64,
    /// Its length.
    pub len: u64,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found").field("info", &self.info).finish()
    }
}

/// The last component of a guest path (`/` for the root).
pub(crate) fn base_name(path: &str) -> String {
    path.rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string()
}

/// `/dev/sda`, `/dev/sdb`, … `/dev/sdaa` for disk `i`.
pub fn disk_name(i: usize) -> String {
    let mut n = i + 1;
    let mut s = Vec::new();
    while n > 0 {
        n -= 1;
        s.push((b'a' + (n % 26) as u8) as char);
        n /= 26;
    }
    s.reverse();
    format!("/dev/sd{}", s.into_iter().collect::<String>())
}

pub(crate) fn uuid_text(b: &[u8]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

pub(crate) fn c_string(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

/// What the bytes at the start of a range are, with UUID, label and size
/// where the superblock says them.
pub fn probe(
    image: &Arc<dyn Device>,
    start: u64,
    len: u64,
    place: &str,
    partition: Option<u32>,
) -> Option<FsInfo> {
    let mut head = vec![0u8; (68 * 1024).min(len as usize)];
    image.read_at(&mut head, start).ok()?;
    let info = |kind, uuid, label, size| FsInfo {
        kind,
        uuid,
        label,
        size,
        place: place.to_string(),
        partition,
        partuuid: None,
        note: None,
    };
    let u32le = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
    // ext2/3/4: superblock at 1024.
    if head.len() >= 2048 && head[1080..1082] == [0x53, 0xef] {
        let sb = &head[1024..2048];
        let compat = u32::from_le_bytes(sb[92..96].try_into().expect("4"));
        let incompat = u32::from_le_bytes(sb[96..100].try_into().expect("4"));
        let ro = u32::from_le_bytes(sb[100..104].try_into().expect("4"));
        let kind = if incompat & !0x6 != 0 || ro & !0x7 != 0 {
            FsKind::Ext4
        } else if compat & 0x4 != 0 {
            FsKind::Ext3
        } else {
            FsKind::Ext2
        };
        let log = u32::from_le_bytes(sb[24..28].try_into().expect("4")).min(6);
        let mut blocks = u64::from(u32::from_le_bytes(sb[4..8].try_into().expect("4")));
        if incompat & 0x80 != 0 {
            blocks |= u64::from(u32::from_le_bytes(sb[0x150..0x154].try_into().expect("4"))) << 32;
        }
        return Some(info(
            kind,
            Some(uuid_text(&sb[0x68..0x78])),
            c_string(&sb[0x78..0x88]),
            blocks.saturating_mul(1024 << log),
        ));
    }
    // XFS: "XFSB" at 0; UUID at 32, label at 108.
    if head.len() >= 512 && &head[0..4] == b"XFSB" {
        let bsize = u64::from(u32::from_be_bytes(head[4..8].try_into().expect("4")));
        let blocks = u64::from_be_bytes(head[8..16].try_into().expect("8"));
        return Some(info(
            FsKind::Xfs,
            Some(uuid_text(&head[32..48])),
            c_string(&head[108..120]),
            blocks.saturating_mul(bsize),
        ));
    }
    // btrfs: magic at 64 KiB + 0x40.
    if head.len() >= 0x10000 + 0x200 && &head[0x10040..0x10048] == b"_BHRfS_M" {
        let sb = &head[0x10000..];
        let size = u64::from_le_bytes(sb[0x70..0x78].try_into().expect("8"));
        return Some(info(
            FsKind::Btrfs,
            Some(uuid_text(&sb[0x20..0x30])),
            c_string(&sb[0x12b..0x22b]),
            size,
        ));
    }
    // NTFS: "NTFS    " at 3; the volume (label, serial) read by the NTFS
    // reader, or the boot sector's serial and size when it does not open.
    if head.len() >= 512 && &head[3..11] == b"NTFS    " {
        if let Ok(v) =
            crate::ntfs::NtfsVol::open(image.clone(), start, len, place.to_string(), partition)
        {
            return Some(v.info().clone());
        }
        let bps = u64::from(u16::from_le_bytes([head[11], head[12]]));
        let sectors = u64::from_le_bytes(head[0x28..0x30].try_into().expect("8"));
        let serial = u64::from_le_bytes(head[0x48..0x50].try_into().expect("8"));
        return Some(info(
            FsKind::Ntfs,
            Some(format!("{serial:016X}")),
            None,
            sectors.saturating_mul(bps),
        ));
    }
    // LUKS1/2: "LUKS\xba\xbe", the UUID as text at 168, LUKS2's label at 24.
    if head.len() >= 512 && &head[0..6] == b"LUKS\xba\xbe" {
        let v2 = u16::from_be_bytes([head[6], head[7]]) == 2;
        return Some(info(
            FsKind::Luks,
            c_string(&head[168..208]),
            if v2 { c_string(&head[24..72]) } else { None },
            len,
        ));
    }
    // LVM2: "LABELONE" in one of the first four sectors, "LVM2 001" after.
    for s in 0..4usize {
        let at = s * 512;
        if head.len() >= at + 64
            && &head[at..at + 8] == b"LABELONE"
            && &head[at + 24..at + 32] == b"LVM2 001"
        {
            // The PV UUID at the PV header, grouped 6-4-4-4-4-4-6 as
            // blkid and pvs print it.
            let pvh = at
                + u32::from_le_bytes(head[at + 20..at + 24].try_into().expect("4")).min(448)
                    as usize;
            let raw = String::from_utf8_lossy(&head[pvh..pvh + 32]).to_string();
            let mut id = String::new();
            for (i, c) in raw.chars().enumerate() {
                if [6, 10, 14, 18, 22, 26].contains(&i) {
                    id.push('-');
                }
                id.push(c);
            }
            return Some(info(FsKind::LvmPv, Some(id), None, len));
        }
    }
    // Swap: "SWAPSPACE2" at the end of the first page.
    if head.len() >= 4096 && &head[4086..4096] == b"SWAPSPACE2" {
        return Some(info(
            FsKind::Swap,
            Some(uuid_text(&head[1036..1052])),
            c_string(&head[1052..1068]),
            u64::from(u32le(1028)) * 4096,
        ));
    }
    // FAT last: its boot sector has the least distinctive magic.
    if head.len() >= 512 && crate::fat::probe(&head[..512]) {
        return crate::fat::Fat::open(image.clone(), start, len, place.to_string(), partition)
            .ok()
            .map(|f| f.info().clone());
    }
    None
}

/// Every file system on `disks`, in disk and partition order: each
/// partition of a partition table (MBR with logical partitions, GPT), or
/// the whole disk when it has none.
pub fn scan(disks: &[Arc<dyn ImageReader>]) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    for (i, image) in disks.iter().enumerate() {
        let size = image.size();
        let dev = disk_name(i);
        let mut mbr = [0u8; 512];
        let signature = image
            .read_at(&mut mbr, 0)
            .ok()
            .map(|()| u32::from_le_bytes(mbr[440..444].try_into().expect("4 bytes")));
        let ranges: Vec<(Option<u32>, u64, u64, Option<String>)> = match read_table(&**image)? {
            Some(t) => t
                .partitions
                .iter()
                .filter(|p| !p.extended && p.end <= size && p.start < p.end)
                .map(|p| {
                    let partuuid = match (&p.guid, signature) {
                        (Some(g), _) => Some(g.to_ascii_lowercase()),
                        (None, Some(sig)) => Some(format!("{sig:08x}-{:02x}", p.number)),
                        _ => None,
                    };
                    (Some(p.number), p.start, p.end - p.start, partuuid)
                })
                .collect(),
            None => vec![(None, 0, size, None)],
        };
        let disk: Arc<dyn Device> = Arc::new(Disk(image.clone()));
        for (number, start, len, partuuid) in ranges {
            let place = match number {
                Some(n) => format!("{dev}{n}"),
                None => dev.clone(),
            };
            if let Some(mut info) = probe(&disk, start, len, &place, number) {
                info.partuuid = partuuid;
                out.push(Found {
                    info,
                    image: disk.clone(),
                    start,
                    len,
                });
            }
        }
    }
    // Logical volumes, named /dev/VG/LV, after the disks.
    let (on_lvs, unread) = crate::lvm::found_on_lvs(&out);
    out.extend(on_lvs);
    for (place, why) in unread {
        // A damaged PV: said on its own entry.
        if let Some(f) = out.iter_mut().find(|f| f.info.place == place) {
            let note = f.info.note.get_or_insert_with(String::new);
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&why);
            continue;
        }
        out.push(Found {
            info: FsInfo {
                kind: FsKind::Unread,
                uuid: None,
                label: None,
                size: 0,
                place,
                partition: None,
                partuuid: None,
                note: Some(why),
            },
            image: Arc::new(Disk(disks[0].clone())),
            start: 0,
            len: 0,
        });
    }
    Ok(out)
}

/// Opens a file system vmshift reads.
pub fn open(found: &Found) -> Result<Box<dyn GuestFs>> {
    let place = found.info.place.clone();
    match found.info.kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => {
            let fs = crate::fs::open_ext(found.image.clone(), found.start, found.len)
                .ok_or_else(|| Error::Fs {
                    place: place.clone(),
                    msg: "the ext superblock's geometry does not fit the partition, or the file system does not open".into(),
                })?;
            Ok(Box::new(ExtFs {
                fs,
                info: found.info.clone(),
            }))
        }
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => Ok(Box::new(crate::fat::Fat::open(
            found.image.clone(),
            found.start,
            found.len,
            place,
            found.info.partition,
        )?)),
        FsKind::Xfs => Ok(Box::new(crate::xfs::Xfs::open(
            found.image.clone(),
            found.start,
            found.len,
            place,
            found.info.partition,
        )?)),
        FsKind::Ntfs => Ok(Box::new(crate::ntfs::NtfsVol::open(
            found.image.clone(),
            found.start,
            found.len,
            place,
            found.info.partition,
        )?)),
        FsKind::Unread => Err(Error::Fs {
            place,
            msg: found.info.note.clone().unwrap_or_default(),
        }),
        k => Err(Error::Fs {
            place,
            msg: format!("vmshift does not read {} file systems yet", k.name()),
        }),
    }
}

/// An ext2/3/4 file system, read with `ext4-view`.
struct ExtFs {
    fs: Ext4,
    info: FsInfo,
}

impl ExtFs {
    fn err(&self, path: &str, e: impl std::fmt::Display) -> Error {
        Error::Fs {
            place: self.info.place.clone(),
            msg: format!("{path}: {e}"),
        }
    }
}

fn ext_entry(name: String, m: &ext4_view::Metadata) -> Entry {
    let ft = m.file_type();
    Entry {
        name,
        kind: if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_regular_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        },
        size: m.len(),
        mode: u32::from(m.mode())
            | match () {
                _ if ft.is_dir() => 0o040000,
                _ if ft.is_symlink() => 0o120000,
                _ if ft.is_regular_file() => 0o100000,
                _ => 0,
            },
        mtime: m.modified().seconds(),
    }
}

impl GuestFs for ExtFs {
    fn info(&self) -> &FsInfo {
        &self.info
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in self.fs.read_dir(path).map_err(|e| self.err(path, e))? {
            let e = e.map_err(|e| self.err(path, e))?;
            let name = e.file_name().display().to_string();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= vmshift_model::limits::DIR_ENTRIES {
                return Err(self.err(
                    path,
                    format!(
                        "more than {} entries, vmshift's limit for one directory",
                        vmshift_model::limits::DIR_ENTRIES
                    ),
                ));
            }
            let m = e.metadata().map_err(|e| self.err(path, e))?;
            out.push(ext_entry(name, &m));
        }
        Ok(out)
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let m = self
            .fs
            .symlink_metadata(path)
            .map_err(|e| self.err(path, e))?;
        let name = base_name(path);
        Ok(ext_entry(name, &m))
    }

    fn metadata(&self, path: &str) -> Result<Entry> {
        let m = self.fs.metadata(path).map_err(|e| self.err(path, e))?;
        let name = base_name(path);
        Ok(ext_entry(name, &m))
    }

    fn read_to(&self, path: &str, max: u64, out: &mut dyn Write) -> Result<u64> {
        let mut f = self.fs.open(path).map_err(|e| self.err(path, e))?;
        let size = f.metadata().len();
        if size > max {
            return Err(self.err(path, format!("{size} bytes, more than the {max} read")));
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| self.err(path, e))?;
            if n == 0 {
                break;
            }
            done += n as u64;
            if done > max {
                return Err(self.err(path, format!("more than the {max} bytes read")));
            }
            out.write_all(&buf[..n])
                .map_err(|e| self.err(path, format!("writing: {e}")))?;
        }
        Ok(done)
    }

    fn read_link(&self, path: &str) -> Result<Option<String>> {
        match self.fs.read_link(path) {
            Ok(t) => Ok(Some(t.display().to_string())),
            Err(ext4_view::Ext4Error::NotASymlink) => Ok(None),
            Err(e) => Err(self.err(path, e)),
        }
    }
}
