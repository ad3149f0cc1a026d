//! The vocabulary every vmshift crate shares.
//!
//! For now this is the disk side of it: which format an image is in, and
//! sizes written the way `qemu-img` users write them (`10G`, `512M`). The VM
//! description (CPU, memory, disks, NICs) joins it with the descriptor work.
#![deny(missing_docs)]

mod format;
mod size;

pub use format::DiskFormat;
pub use size::{format_size, parse_size, SizeError};
