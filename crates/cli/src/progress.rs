//! Progress reporting: a bar on a terminal, percentage lines with `-p` in a
//! pipe, nothing otherwise.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// Reports how much of a job is done.
#[derive(Debug)]
pub enum Progress {
    /// The bar, and the furthest position shown: the copy engine's workers
    /// report out of order, and the bar never goes back.
    Bar(ProgressBar, AtomicU64),
    /// The last percentage printed (none yet: `None`).
    Lines(Mutex<Option<u64>>),
    Silent,
}

impl Progress {
    /// A reporter for a job of `total` bytes; `forced` is `-p`.
    pub fn new(total: u64, forced: bool) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            Progress::Bar(bar, AtomicU64::new(0))
        } else if forced {
            Progress::Lines(Mutex::new(None))
        } else {
            Progress::Silent
        }
    }

    pub fn update(&self, done: u64, total: u64) {
        match self {
            Progress::Bar(bar, furthest) => {
                if furthest.fetch_max(done, Ordering::Relaxed) < done {
                    bar.set_position(done);
                }
            }
            Progress::Lines(last) => {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|l| pct > l) {
                    *last = Some(pct);
                    let _ = writeln!(std::io::stderr(), "    ({pct}.00/100%)");
                }
            }
            Progress::Silent => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar, _) = self {
            bar.finish_and_clear();
        }
    }
}
