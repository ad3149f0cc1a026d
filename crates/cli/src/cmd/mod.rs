//! One module per subcommand. Each returns the process exit code.

pub mod boot;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod guest;
pub mod info;
pub mod map;
pub mod part;
pub mod resize;
pub mod vm;

use std::path::Path;

use anyhow::Result;
use vmshift_image::{open_image, Gate, ImageReader, OpenOptions};

use crate::args::{FormatArg, GateArgs};

/// The gate the user's flags describe.
pub fn gate(args: &GateArgs) -> Gate {
    args.roots
        .iter()
        .fold(Gate::new(), |g, r| g.with_root(r))
        .allow_outside(args.allow_backing_outside)
}

/// How a command reads an image, for QEMU's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// To look at it (`info`, `map`, `compare`, `check`, `part`): a raw
    /// image may be written by others meanwhile, as qemu-img allows.
    Look,
    /// To copy or boot it: nobody writes it meanwhile.
    Copy,
    /// To compare it: as `Look`, and data past the end of a truncated
    /// image reads as zeros, as qemu-img reads it (a mismatch, not an
    /// error).
    Compare,
    /// To describe it (`info`): as `Look`, and a backing file the gate
    /// refuses is named, not opened.
    Describe,
}

/// Opens an image read-only, taking QEMU's shared locks (unless `-U`);
/// without `-f`, probes and says so on stderr when `announce` is set.
pub fn open(
    path: &Path,
    format: Option<FormatArg>,
    gate_args: &GateArgs,
    announce: bool,
    usage: Use,
) -> Result<Box<dyn ImageReader>> {
    let opts = OpenOptions {
        gate: gate(gate_args),
        force_share: gate_args.force_share,
        share_raw_writes: usage != Use::Copy,
        already_locked: false,
        zeros_past_eof: usage == Use::Compare,
        keep_refused_backing: usage == Use::Describe,
    };
    let reader = open_image(path, format.map(Into::into), &opts)?;
    if format.is_none() && announce {
        eprintln!(
            "vmshift: {}: no -f given, probed format: {}",
            path.display(),
            reader.format()
        );
    }
    Ok(reader)
}

/// The last component of `path`, as a string (what a VMDK descriptor
/// records as its extent's name).
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The chain from `top` down: top first.
pub fn chain(top: &dyn ImageReader) -> Vec<&dyn ImageReader> {
    let mut out = vec![top];
    while let Some(b) = out.last().and_then(|r| r.backing()) {
        out.push(b);
    }
    out
}
