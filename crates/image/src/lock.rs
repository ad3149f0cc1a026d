//! QEMU's image locks, taken and respected the way QEMU takes them.
//!
//! QEMU (and qemu-img, qemu-io, qemu-nbd) lock one byte per permission on
//! every image file it opens, with open file description (OFD) locks:
//! byte 100 + p when it uses permission p, byte 200 + p when it does not
//! let others have it. Permissions: 0 consistent read, 1 write, 2 write
//! unchanged, 3 resize. Before taking its own, it tests the others': a
//! permission it uses that someone does not share, or one it does not
//! share that someone uses, is a conflict ("Failed to get shared "write"
//! lock"). vmshift does the same on every file of an image it reads, so a
//! running VM's disk is not read while the VM writes it (unless the user
//! says `-U`/`--force-share`), and a VM started while vmshift reads the
//! image is refused by QEMU.
//!
//! What qemu-img does when reading, observed on QEMU 10.0 (`/proc/locks`
//! while `qemu-io -r` holds the image, and conflicts against a writer):
//! a qcow2 or VMDK file, and every backing file, is locked 100, 201, 203
//! (it reads, and shares neither write nor resize); a VMDK's flat extent
//! 100, 203; a raw image only 100 for `info`, `map` and `compare`, and 100,
//! 201, 203 as `convert`'s source; with `-U` only 100 (it shares
//! everything). The locks last as long as the file stays open.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// QEMU's permission bytes start here (`RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: i64 = 100;
/// QEMU's "not shared" bytes start here (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: i64 = 200;

/// One of QEMU's permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Reading data that does not change underneath.
    ConsistentRead = 0,
    /// Writing.
    Write = 1,
    /// Writing the same data (a mirror).
    WriteUnchanged = 2,
    /// Changing the size.
    Resize = 3,
}

impl Perm {
    /// Every permission.
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    /// QEMU's name for it (in its error messages).
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// What a reader of a file asks for: consistent read, and the permissions
/// it does not share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLock {
    /// Others may not write.
    pub unshare_write: bool,
    /// Others may not resize.
    pub unshare_resize: bool,
}

impl ReadLock {
    /// A format's own file, or a backing file: nobody else writes or
    /// resizes it while it is read (qcow2, VMDK).
    pub const FORMAT: ReadLock = ReadLock {
        unshare_write: true,
        unshare_resize: true,
    };
    /// A VMDK flat extent or a data file: nobody resizes it.
    pub const EXTENT: ReadLock = ReadLock {
        unshare_write: false,
        unshare_resize: true,
    };
    /// Shares everything (`-U`, or a raw image `info` reads).
    pub const SHARED: ReadLock = ReadLock {
        unshare_write: false,
        unshare_resize: false,
    };

    fn unshared(self) -> impl Iterator<Item = Perm> {
        [
            (Perm::Write, self.unshare_write),
            (Perm::Resize, self.unshare_resize),
        ]
        .into_iter()
        .filter_map(|(p, on)| on.then_some(p))
    }
}

/// True when another open file description holds a lock on `byte`.
fn held(file: &File, byte: i64) -> std::io::Result<bool> {
    // SAFETY: a zeroed `flock` is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl on a valid descriptor borrowed from `file`, with a
    // pointer to a live `flock` it fills in.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

/// Takes a shared lock on `byte` for `file`'s open file description.
fn take(file: &File, byte: i64) -> std::io::Result<()> {
    // SAFETY: as in `held`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl on a valid descriptor borrowed from `file`, with a
    // pointer to a live `flock`; the lock belongs to this open file
    // description and ends when it is closed.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a file system refuses locks altogether (some network file
/// systems): QEMU then goes on without them, and so does vmshift.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::ENOLCK) | Some(libc::EINVAL)
    )
}

fn in_use(path: &Path, what: String) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!(
            "{what}: is another process using the image (a running VM, qemu-img, qemu-nbd)? \
             -U/--force-share reads it anyway, but what a running VM writes meanwhile may be read half-written"
        ),
    )
    .at_path(path)
}

/// Takes QEMU's locks for reading `file` (named `path` in errors) after
/// checking, as QEMU does, that nobody holds a conflicting one.
pub fn lock_for_read(file: &File, path: &Path, want: ReadLock) -> Result<()> {
    let check = |byte: i64| -> Result<bool> {
        match held(file, byte) {
            Ok(h) => Ok(h),
            Err(e) if unsupported(&e) => Ok(false),
            Err(e) => Err(Error::io(path, "testing the image's lock", e)),
        }
    };
    if check(SHARED_BASE + Perm::ConsistentRead as i64)? {
        return Err(in_use(
            path,
            format!("Failed to get \"{}\" lock", Perm::ConsistentRead.name()),
        ));
    }
    for p in want.unshared() {
        if check(PERM_BASE + p as i64)? {
            return Err(in_use(
                path,
                format!("Failed to get shared \"{}\" lock", p.name()),
            ));
        }
    }
    let bytes = std::iter::once(PERM_BASE + Perm::ConsistentRead as i64)
        .chain(want.unshared().map(|p| SHARED_BASE + p as i64));
    for byte in bytes {
        match take(file, byte) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => return Ok(()),
            // A write lock another process took between the test and now.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                return Err(in_use(path, "Failed to lock the image".into()))
            }
            Err(e) => return Err(Error::io(path, "locking the image", e)),
        }
    }
    Ok(())
}

/// Takes the image the way QEMU takes one it resizes: it uses write and
/// resize and shares nothing, after checking that nobody (a running QEMU,
/// qemu-img) uses it at all. The locks go with the file.
pub fn lock_for_resize(file: &File, path: &Path) -> Result<()> {
    let check = |byte: i64| -> Result<bool> {
        held(file, byte).map_err(|e| Error::io(path, "testing the image's lock", e))
    };
    let mut busy = false;
    for p in Perm::ALL {
        busy |= check(PERM_BASE + p as i64)?;
    }
    busy |= check(SHARED_BASE + Perm::Write as i64)?;
    busy |= check(SHARED_BASE + Perm::Resize as i64)?;
    if busy {
        return Err(Error::new(
            ErrorKind::Locked,
            "Failed to get \"write\" lock: the image is in use (a running QEMU or qemu-img holds its lock); stop it first",
        )
        .at_path(path));
    }
    let bytes = [
        PERM_BASE + Perm::Write as i64,
        PERM_BASE + Perm::Resize as i64,
    ]
    .into_iter()
    .chain(Perm::ALL.iter().map(|p| SHARED_BASE + *p as i64));
    for byte in bytes {
        take(file, byte).map_err(|_| {
            Error::new(
                ErrorKind::Locked,
                "the image is in use (its lock is held); stop the process that has it open",
            )
            .at_path(path)
        })?;
    }
    Ok(())
}
