//! vmshift's whole-VM pipeline, shared by the CLI's `vm` commands: a
//! descriptor read into the model ([`load`]), the disks it names resolved
//! through the image gate ([`Resolver`]), converted and written
//! ([`convert::convert_vm`]), or booted to a verdict ([`boot`]).
//!
//! Errors are this crate's own ([`Error`]); progress and cancellation come
//! through [`convert::Observer`] and an atomic flag, so a front end other
//! than the CLI can drive it.

#![deny(missing_docs)]

pub mod boot;
pub mod convert;
pub mod devices;
pub mod error;
pub mod load;
pub mod resolve;
pub mod state;

pub use error::{Error, Result};
pub use load::{load, DescriptorFormat, Loaded};
pub use resolve::{
    disk_findings, guest_disks, guest_drivers, guest_findings, open_disks, read_guest_of,
    DiskRoots, GuestRead, Resolver,
};
