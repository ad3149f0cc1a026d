//! What the fuzz targets share: an input as a disk image file, an input as
//! a guest device, and a bounded walk over a guest file system.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use vmshift_guest::vfs::{Device, EntryKind, GuestFs};

/// A file the input is written to (in /dev/shm when there is one): image
/// formats are opened by path, as vmshift opens them.
pub fn input_file(name: &str, data: &[u8]) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("vmshift-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch folder");
        d
    });
    let p = dir.join(name);
    std::fs::write(&p, data).expect("writing the fuzz input");
    p
}

/// The input as a device (a partition, a logical volume) of `len` bytes:
/// the input's bytes, then zeros, as a sparse image reads.
#[derive(Debug)]
pub struct Mem {
    data: Vec<u8>,
    len: u64,
}

impl Device for Mem {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vmshift_guest::Result<()> {
        buf.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = self.data.get(start..) {
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
        }
        Ok(())
    }
}

/// The input as a device of `len` bytes (at least the input's own):
/// a small input stands for the first bytes of a large file system, so
/// that superblock geometry checks against the device size pass and the
/// readers go on to the structures behind them.
pub fn device(data: &[u8], len: u64) -> Arc<dyn Device> {
    Arc::new(Mem {
        data: data.to_vec(),
        len: len.max(data.len() as u64),
    })
}

/// Lists and reads what a file system holds, within a budget of entries
/// and bytes: every call must return (an error is fine), never panic,
/// hang or grow without bound.
pub fn walk(fs: &dyn GuestFs) {
    // Every path operation resolves from the root again (the readers keep
    // no directory cache), so the walk stays small: more inputs a second
    // find more than a deeper walk of each.
    let mut budget = 48u32;
    walk_dir(fs, "/", 0, &mut budget);
    let _ = fs.stat("/etc/../etc/./fstab");
    let _ = fs.metadata("/a/b/c");
}

fn walk_dir(fs: &dyn GuestFs, dir: &str, depth: u32, budget: &mut u32) {
    let Ok(entries) = fs.list(dir) else { return };
    for e in entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
        if *budget % 8 == 0 {
            let _ = fs.stat(&path);
        }
        if e.kind == EntryKind::Symlink {
            let _ = fs.read_link(&path);
        }
        match e.kind {
            EntryKind::Dir if depth < 3 => walk_dir(fs, &path, depth + 1, budget),
            // Up to 64 KiB a file: past that a reader refuses before it
            // reads (the size check is what runs), and a mutated size must
            // not make every input stream megabytes of zeros.
            EntryKind::File | EntryKind::Symlink => {
                let _ = fs.read_to(&path, 64 << 10, &mut std::io::sink());
            }
            _ => {}
        }
    }
}
