//! qcow2: QEMU's copy-on-write format (docs/interop/qcow2.rst).

pub mod check;
pub(crate) mod header;
pub(crate) mod reader;
mod snapshot;
pub mod writer;

pub use reader::{ChainOpener, Qcow2Reader};
pub use writer::{Qcow2Options, Qcow2Writer};
