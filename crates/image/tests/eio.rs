//! An I/O error in the middle of a copy (the "test-only hook": a reader
//! that fails with EIO from one offset on, as a disk with a bad sector
//! does): convert stops with an error naming the image, the offset and
//! EIO; the temporary output is removed and the earlier output at the
//! target path is untouched.

use std::path::{Path, PathBuf};

use vmshift_image::create::{create_writer, CreateSpec};
use vmshift_image::engine::{convert, ConvertOptions};
use vmshift_image::output::{AtomicOutput, SideOutputs};
use vmshift_image::{open_image, Error, Extent, ImageInfo, ImageReader, OpenOptions};
use vmshift_model::DiskFormat;

/// An image whose reads fail with EIO from `bad` on.
#[derive(Debug)]
struct FailingDisk {
    inner: Box<dyn ImageReader>,
    bad: u64,
}

impl ImageReader for FailingDisk {
    fn format(&self) -> DiskFormat {
        self.inner.format()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn map(&self, offset: u64, len: u64) -> vmshift_image::Result<Extent> {
        self.inner.map(offset, len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vmshift_image::Result<()> {
        if offset + buf.len() as u64 > self.bad {
            return Err(Error::io(
                self.path(),
                format!("reading {} bytes at offset {offset:#x}", buf.len()),
                std::io::Error::from_raw_os_error(EIO),
            ));
        }
        self.inner.read_at(buf, offset)
    }
    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
}

/// `EIO` on Linux.
const EIO: i32 = 5;

fn dense_raw(dir: &Path, len: usize) -> PathBuf {
    let p = dir.join("src.raw");
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn eio_mid_copy_is_an_error_and_leaves_no_partial_output() {
    for format in [DiskFormat::Qcow2, DiskFormat::Raw, DiskFormat::Vmdk] {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dense_raw(dir.path(), 8 << 20);
        let src_bytes = std::fs::read(&src_path).unwrap();
        let target = dir.path().join("out.img");
        std::fs::write(&target, b"an earlier output").unwrap();
        let inner = open_image(&src_path, Some(DiskFormat::Raw), &OpenOptions::default()).unwrap();
        let src = FailingDisk {
            inner,
            bad: 5 << 20,
        };
        let spec = CreateSpec {
            format,
            size: src.size(),
            options: Vec::new(),
            compress: false,
            name: "out.img".into(),
        };
        let err = {
            let (out, file) = AtomicOutput::create(&target, true).unwrap();
            let mut sides = SideOutputs::new(&target, true);
            let mut writer = create_writer(file, out.temp_path(), &spec, &mut sides).unwrap();
            let err = convert(
                &src,
                writer.as_mut(),
                &ConvertOptions::default(),
                &|_, _| {},
            )
            .expect_err("the copy must fail");
            // The command returns here: the writer, the side outputs and
            // the temporary output are dropped uncommitted.
            drop(writer);
            drop(sides);
            drop(out);
            err
        };
        let text = format!("{err}");
        let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        assert!(text.contains("src.raw"), "{format}: {chain}");
        assert!(chain.contains("Input/output error"), "{format}: {chain}");
        // The failing read is named with its offset (the window holding
        // the bad sector at 5 MiB).
        assert!(
            chain.contains("at offset 0x4"),
            "{format}: the offset: {chain}"
        );
        assert_eq!(names(dir.path()), vec!["out.img", "src.raw"], "{format}");
        assert_eq!(std::fs::read(&target).unwrap(), b"an earlier output");
        assert_eq!(std::fs::read(&src_path).unwrap(), src_bytes);
    }
}
