//! Read-only access to what is inside a guest's disks, over vmshift's own
//! [`ImageReader`]s: partitions (MBR, GPT), ext2/3/4 file systems (with
//! `ext4-view`), and the boot configuration a Linux guest boots with (its
//! GRUB `grub.cfg`, BootLoaderSpec entries, or Debian's `/vmlinuz`
//! links).
//!
//! Nothing here writes: the images are only read through `read_at`.

#![deny(missing_docs)]

pub mod bootcfg;
pub mod bootpath;
pub mod fat;
pub mod fs;
pub mod hive;
pub mod initramfs;
pub mod inspect;
pub mod lvm;
pub mod ntfs;
pub mod vfs;
pub mod windows;
pub mod xfs;

use std::path::PathBuf;

pub use bootcfg::{find_boot_entry, BootEntry};
pub use vfs::{scan, EntryKind, Found, FsInfo, FsKind, GuestFs};

/// The largest kernel, or initramfs (all its files together), read from a
/// guest.
pub const MAX_BOOT_FILE: u64 = vmshift_model::limits::BOOT_FILE_BYTES;

/// What went wrong reading a guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The disk image could not be read.
    #[error(transparent)]
    Image(#[from] vmshift_image::Error),
    /// A file system could not be read.
    #[error("{place}: {msg}")]
    Fs {
        /// Disk and partition.
        place: String,
        /// What went wrong.
        msg: String,
    },
    /// No boot configuration was found.
    #[error("no Linux boot configuration found on {0} (looked for grub.cfg, BootLoaderSpec entries and /boot/vmlinuz on every ext2/3/4 file system); give --kernel and --initrd")]
    NoBootConfig(String),
    /// A boot file is too large to load.
    #[error("{place}: {path} is {size} bytes, more than vmshift loads ({max})")]
    TooLarge {
        /// Disk and partition.
        place: String,
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl Error {
    /// A file system error at `place` (`/dev/sda1`).
    pub(crate) fn fs(place: &str, msg: impl Into<String>) -> Error {
        Error::Fs {
            place: place.to_string(),
            msg: msg.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
