//! An input as an initramfs: cpio newc archives, plain or compressed
//! (gzip, zstd, xz, lzma, lz4, bzip2), streamed through the scanner in
//! uneven chunks.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vmshift_guest::initramfs::Scanner;

fuzz_target!(|data: &[u8]| {
    let mut s = Scanner::new();
    for chunk in data.chunks(4093) {
        if s.write_all(chunk).is_err() {
            return;
        }
    }
    if let Ok(c) = s.finish() {
        let _ = c.modules();
        let _ = c.dracut_hostonly();
    }
});
