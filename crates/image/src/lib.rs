//! vmshift's block layer.
//!
//! Format drivers (raw, qcow2) implement [`ImageReader`] and
//! [`ImageWriter`]; the [`engine`] copies, compares and maps images through
//! those traits without knowing formats. Every file an image names passes
//! the [`Gate`].

pub mod block;
pub mod check;
pub mod compress;
pub mod create;
pub mod engine;
pub mod error;
mod fileio;
pub mod gate;
pub mod lock;
pub mod nbd;
pub mod open;
pub mod output;
pub mod part;
pub mod qcow2;
pub mod raw;
pub mod resize;
pub mod salvage;
pub mod vmdk;

pub use block::{
    BlockState, Chunk, Encoder, Extent, ImageInfo, ImageReader, ImageWriter, PlannedWrite,
    SnapshotInfo, WritePlan, WriteSource,
};
pub use check::CheckReport;
pub use error::{Error, ErrorKind, Result};
pub use fileio::allocated_bytes;
pub use gate::Gate;
pub use open::{open_image, probe, OpenOptions};
