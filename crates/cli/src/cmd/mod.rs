//! One module per subcommand. Each returns the process exit code.

pub mod boot;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
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

/// Opens an image read-only; without `-f`, probes and says so on stderr
/// when `announce` is set.
pub fn open(
    path: &Path,
    format: Option<FormatArg>,
    gate_args: &GateArgs,
    announce: bool,
) -> Result<Box<dyn ImageReader>> {
    let opts = OpenOptions {
        gate: gate(gate_args),
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
