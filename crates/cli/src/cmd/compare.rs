//! `vmshift compare`: exit 0 identical, 1 different, 2 error (as qemu-img).

use anyhow::Result;
use vmshift_image::engine::{compare, compare_strict, Comparison};

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
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    let progress = if args.quiet {
        Progress::Silent
    } else {
        Progress::new(a.size().max(b.size()), args.progress)
    };
    let result = if args.strict {
        compare_strict(a.as_ref(), b.as_ref(), &|d, t| progress.update(d, t))?
    } else {
        compare(a.as_ref(), b.as_ref(), &|d, t| progress.update(d, t))?
    };
    progress.finish();
    let say = |text: String| {
        if !args.quiet {
            println!("{text}");
        }
    };
    // qemu-img warns of different sizes once the common part is equal.
    let common = a.size().min(b.size());
    let warn_size = a.size() != b.size()
        && match result {
            Comparison::Identical => true,
            Comparison::DiffersAt(off) => off >= common,
            _ => false,
        };
    if warn_size {
        say("Warning: Image size mismatch!".into());
    }
    match result {
        Comparison::Identical => {
            say("Images are identical.".into());
            Ok(0)
        }
        Comparison::DiffersAt(off) => {
            say(format!("Content mismatch at offset {off}!"));
            Ok(1)
        }
        Comparison::SizeMismatch => {
            say("Strict mode: Image size mismatch!".into());
            Ok(1)
        }
        Comparison::StatusMismatch(off) => {
            say(format!("Strict mode: Offset {off} block status mismatch!"));
            Ok(1)
        }
    }
}
