//! An input as a partition: probed for every file system vmshift knows
//! (ext2/3/4, XFS, FAT, NTFS, btrfs, swap, LUKS, LVM PV), opened where it
//! reads the kind, and walked within a budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmshift_guest::vfs::{self, Found};

fuzz_target!(|data: &[u8]| {
    // The input is the start of a 1 GiB partition (zeros after it).
    let dev = vmshift_fuzz::device(data, 1 << 30);
    let len = dev.size();
    let Some(info) = vfs::probe(&dev, 0, len, "/dev/sda1", Some(1)) else {
        return;
    };
    let found = Found {
        info,
        image: dev,
        start: 0,
        len,
    };
    // A PV: its volume group and logical volumes.
    let _ = vmshift_guest::lvm::logical_volumes(std::slice::from_ref(&found));
    if let Ok(fs) = vfs::open(&found) {
        vmshift_fuzz::walk(&*fs);
    }
});
