//! Every limit vmshift puts on what it reads, in one place.
//!
//! Images, descriptors and guest file systems come from outside. Each size,
//! count and depth they state is checked against a limit here before
//! anything is allocated, looped over or followed; past it the input is
//! refused with an error naming the structure and the limit. Where QEMU
//! has a limit of its own, vmshift's is the same, so that an image QEMU
//! refuses is refused here too. [`ALL`] lists them for reports (`info
//! --output json` shows those that applied to an image).

/// One limit, as reports name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Its name in reports (`info --output json`).
    pub name: &'static str,
    /// The largest value accepted.
    pub value: u64,
    /// What is counted.
    pub unit: &'static str,
    /// What it bounds.
    pub what: &'static str,
}

// --- disk images ------------------------------------------------------------

/// The deepest backing chain followed (images, the top one included).
pub const CHAIN_DEPTH: usize = 64;
/// A qcow2 L1 table (QEMU's `QCOW_MAX_L1_SIZE`).
pub const QCOW2_L1_BYTES: u64 = 32 << 20;
/// A qcow2 refcount table (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const QCOW2_REFTABLE_BYTES: u64 = 8 << 20;
/// qcow2 snapshots (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const QCOW2_SNAPSHOTS: u32 = 65536;
/// A qcow2 snapshot table.
pub const QCOW2_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// A qcow2 backing file name (QEMU's 1023 bytes).
pub const QCOW2_BACKING_NAME: u32 = 1023;
/// qcow2 persistent bitmaps (QEMU's `QCOW2_MAX_BITMAPS`).
pub const QCOW2_BITMAPS: u32 = 65535;
/// A qcow2 bitmap directory (QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const QCOW2_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// qcow2 L2 tables kept in memory per image.
pub const QCOW2_L2_CACHE_BYTES: usize = 16 << 20;
/// A VMDK descriptor (text, embedded or a file of its own).
pub const VMDK_DESCRIPTOR_BYTES: usize = (1 << 20) - 1;
/// A VMDK grain: 2 MiB (VMware uses 64 KiB).
pub const VMDK_GRAIN_SECTORS: u64 = 4096;
/// Entries per VMDK grain table (QEMU's 512).
pub const VMDK_GTES_PER_GT: u32 = 512;
/// Entries of a VMDK or seSparse grain directory (16 MiB of entries; 64
/// TiB of seSparse disk).
pub const VMDK_GD_ENTRIES: u64 = 1 << 22;
/// Grain tables kept in memory per sparse VMDK extent.
pub const VMDK_GT_CACHE_BYTES: usize = 8 << 20;
/// Logical partitions followed in an MBR extended partition.
pub const MBR_LOGICAL_PARTITIONS: usize = 128;
/// GPT partition entries read (the usual array has 128).
pub const GPT_ENTRIES: u32 = 16384;

/// The most metadata memory one image holds: its largest tables and caches
/// together (qcow2: L1, refcount table, L2 cache, snapshot table and bitmap
/// directory; a VMDK extent's grain directory and table cache are less).
pub const IMAGE_METADATA_BYTES: u64 = QCOW2_L1_BYTES
    + QCOW2_REFTABLE_BYTES
    + QCOW2_L2_CACHE_BYTES as u64
    + QCOW2_SNAPSHOT_TABLE_BYTES
    + QCOW2_BITMAP_DIRECTORY_BYTES;

// --- descriptors ------------------------------------------------------------

/// A descriptor file (`.vmx`, XML, `.conf`, OVF) read into memory.
pub const DESCRIPTOR_BYTES: u64 = 4 << 20;
/// XML nesting depth.
pub const XML_DEPTH: usize = 64;
/// XML elements in one document.
pub const XML_ELEMENTS: usize = 100_000;
/// Members of an OVA (tar) archive.
pub const OVA_MEMBERS: usize = 10_000;
/// A member name in an OVA.
pub const OVA_NAME_BYTES: usize = 4096;

// --- guest file systems -----------------------------------------------------

/// Symbolic links followed while resolving one path (Linux's 40).
pub const SYMLINK_HOPS: u32 = 40;
/// Entries listed from one directory.
pub const DIR_ENTRIES: usize = 1 << 20;
/// Extents of one XFS file.
pub const XFS_EXTENTS: usize = 1 << 18;
/// XFS B+tree blocks read for one file or directory.
pub const XFS_TREE_BLOCKS: usize = 1 << 16;
/// LVM metadata text.
pub const LVM_METADATA_BYTES: u64 = 16 << 20;
/// Segments of one LVM logical volume.
pub const LVM_SEGMENTS: usize = 1 << 16;
/// An initramfs, all its archives decompressed.
pub const INITRAMFS_INFLATED_BYTES: u64 = 2 << 30;
/// Members of an initramfs: its cpio headers, over all its archives, each
/// archive's trailer counted.
pub const INITRAMFS_MEMBERS: u64 = 1 << 20;
/// One registry value's data.
pub const HIVE_VALUE_BYTES: usize = 16 << 20;
/// Entries of one registry subkey list.
pub const HIVE_LIST_ENTRIES: u32 = 1 << 20;
/// A kernel or initramfs `vm boot` reads from a guest.
pub const BOOT_FILE_BYTES: u64 = 512 << 20;

/// Clients one NBD server serves at once (QEMU opens one per disk).
pub const NBD_CONNECTIONS: usize = 16;

/// Every limit, for reports.
pub const ALL: &[Limit] = &[
    Limit {
        name: "chain-depth",
        value: CHAIN_DEPTH as u64,
        unit: "images",
        what: "backing chain",
    },
    Limit {
        name: "qcow2-l1-table-bytes",
        value: QCOW2_L1_BYTES,
        unit: "bytes",
        what: "qcow2 L1 table",
    },
    Limit {
        name: "qcow2-refcount-table-bytes",
        value: QCOW2_REFTABLE_BYTES,
        unit: "bytes",
        what: "qcow2 refcount table",
    },
    Limit {
        name: "qcow2-snapshots",
        value: QCOW2_SNAPSHOTS as u64,
        unit: "snapshots",
        what: "qcow2 snapshot table",
    },
    Limit {
        name: "qcow2-snapshot-table-bytes",
        value: QCOW2_SNAPSHOT_TABLE_BYTES,
        unit: "bytes",
        what: "qcow2 snapshot table",
    },
    Limit {
        name: "qcow2-backing-name-bytes",
        value: QCOW2_BACKING_NAME as u64,
        unit: "bytes",
        what: "qcow2 backing file name",
    },
    Limit {
        name: "qcow2-bitmaps",
        value: QCOW2_BITMAPS as u64,
        unit: "bitmaps",
        what: "qcow2 bitmap directory",
    },
    Limit {
        name: "qcow2-bitmap-directory-bytes",
        value: QCOW2_BITMAP_DIRECTORY_BYTES,
        unit: "bytes",
        what: "qcow2 bitmap directory",
    },
    Limit {
        name: "qcow2-l2-cache-bytes",
        value: QCOW2_L2_CACHE_BYTES as u64,
        unit: "bytes",
        what: "qcow2 L2 tables in memory",
    },
    Limit {
        name: "vmdk-descriptor-bytes",
        value: VMDK_DESCRIPTOR_BYTES as u64,
        unit: "bytes",
        what: "VMDK descriptor",
    },
    Limit {
        name: "vmdk-grain-sectors",
        value: VMDK_GRAIN_SECTORS,
        unit: "sectors",
        what: "VMDK grain",
    },
    Limit {
        name: "vmdk-grain-table-entries",
        value: VMDK_GTES_PER_GT as u64,
        unit: "entries",
        what: "VMDK grain table",
    },
    Limit {
        name: "vmdk-grain-directory-entries",
        value: VMDK_GD_ENTRIES,
        unit: "entries",
        what: "VMDK or seSparse grain directory",
    },
    Limit {
        name: "vmdk-grain-table-cache-bytes",
        value: VMDK_GT_CACHE_BYTES as u64,
        unit: "bytes",
        what: "VMDK grain tables in memory, per extent",
    },
    Limit {
        name: "image-metadata-bytes",
        value: IMAGE_METADATA_BYTES,
        unit: "bytes",
        what: "metadata memory of one image",
    },
    Limit {
        name: "mbr-logical-partitions",
        value: MBR_LOGICAL_PARTITIONS as u64,
        unit: "partitions",
        what: "MBR extended partition",
    },
    Limit {
        name: "gpt-entries",
        value: GPT_ENTRIES as u64,
        unit: "entries",
        what: "GPT partition array",
    },
    Limit {
        name: "descriptor-bytes",
        value: DESCRIPTOR_BYTES,
        unit: "bytes",
        what: "VM descriptor file",
    },
    Limit {
        name: "xml-depth",
        value: XML_DEPTH as u64,
        unit: "levels",
        what: "XML nesting",
    },
    Limit {
        name: "xml-elements",
        value: XML_ELEMENTS as u64,
        unit: "elements",
        what: "XML document",
    },
    Limit {
        name: "ova-members",
        value: OVA_MEMBERS as u64,
        unit: "members",
        what: "OVA archive",
    },
    Limit {
        name: "symlink-hops",
        value: SYMLINK_HOPS as u64,
        unit: "links",
        what: "guest path resolution",
    },
    Limit {
        name: "directory-entries",
        value: DIR_ENTRIES as u64,
        unit: "entries",
        what: "guest directory",
    },
    Limit {
        name: "xfs-extents",
        value: XFS_EXTENTS as u64,
        unit: "extents",
        what: "XFS file",
    },
    Limit {
        name: "xfs-tree-blocks",
        value: XFS_TREE_BLOCKS as u64,
        unit: "blocks",
        what: "XFS B+tree",
    },
    Limit {
        name: "lvm-metadata-bytes",
        value: LVM_METADATA_BYTES,
        unit: "bytes",
        what: "LVM metadata text",
    },
    Limit {
        name: "lvm-segments",
        value: LVM_SEGMENTS as u64,
        unit: "segments",
        what: "LVM logical volume",
    },
    Limit {
        name: "initramfs-inflated-bytes",
        value: INITRAMFS_INFLATED_BYTES,
        unit: "bytes",
        what: "initramfs decompressed",
    },
    Limit {
        name: "initramfs-members",
        value: INITRAMFS_MEMBERS,
        unit: "members",
        what: "initramfs",
    },
    Limit {
        name: "hive-value-bytes",
        value: HIVE_VALUE_BYTES as u64,
        unit: "bytes",
        what: "registry value",
    },
    Limit {
        name: "hive-list-entries",
        value: HIVE_LIST_ENTRIES as u64,
        unit: "entries",
        what: "registry subkey list",
    },
    Limit {
        name: "nbd-connections",
        value: NBD_CONNECTIONS as u64,
        unit: "connections",
        what: "clients of one NBD server at once",
    },
    Limit {
        name: "boot-file-bytes",
        value: BOOT_FILE_BYTES,
        unit: "bytes",
        what: "kernel or initramfs read from a guest",
    },
];

/// The limit named `name`.
pub fn named(name: &str) -> Option<&'static Limit> {
    ALL.iter().find(|l| l.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, l) in ALL.iter().enumerate() {
            assert!(ALL[..i].iter().all(|o| o.name != l.name), "{}", l.name);
            assert_eq!(named(l.name), Some(l));
        }
        assert_eq!(
            IMAGE_METADATA_BYTES,
            (32 + 8 + 16 + 64 + 64) << 20,
            "qcow2's tables and caches together"
        );
    }
}
