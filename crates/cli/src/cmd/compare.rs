//! `vmshift compare`: exit 0 identical, 1 different, 2 error (as qemu-img).

use anyhow::Result;
use vmshift_image::engine::{compare, Comparison};

use crate::args::CompareArgs;
use crate::progress::Progress;

pub fn run(args: &CompareArgs) -> Result<i32> {
    let a = super::open(
        &args.a,
        args.format_a,
        &args.gate,
        false,
        super::Use::Compare,
    )?;
    let b = super::open(
        &args.b,
        args.format_b,
        &args.gate,
        false,
        super::Use::Compare,
    )?;
    let progress = if args.quiet {
        Progress::Silent
    } else {
        Progress::new(a.size().max(b.size()), args.progress)
    };
    let result = compare(a.as_ref(), b.as_ref(), &|d, t| progress.update(d, t))?;
    progress.finish();
    match result {
        Comparison::Identical => {
            if !args.quiet {
                println!("Images are identical.");
            }
            Ok(0)
        }
        Comparison::DiffersAt(off) => {
            if !args.quiet {
                println!("Content mismatch at offset {off}!");
            }
            Ok(1)
        }
    }
}
