//! Multi-file VMDK output: a descriptor file and its extents
//! (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::writer::{descriptor_text, Subformat, VmdkOptions, VmdkWriter};
use crate::block::{Chunk, Encoder, ImageWriter, PlainEncoder, WritePlan};
use crate::error::{Error, Result};
use crate::fileio::write_all_at;
use crate::output::SideOutputs;
use crate::raw::RawWriter;

/// QEMU's split size: 2 GiB per extent file.
const SPLIT: u64 = 2 << 30;

#[derive(Debug)]
struct Piece {
    start: u64,
    len: u64,
    writer: Box<dyn ImageWriter>,
}

/// Writes a descriptor file and the extents it names.
#[derive(Debug)]
pub struct VmdkSetWriter {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    descriptor: String,
    pieces: Vec<Piece>,
}

impl VmdkSetWriter {
    /// `file` will hold the descriptor; `name` is its final file name.
    pub fn create(
        file: File,
        path: &Path,
        size: u64,
        name: &str,
        opts: VmdkOptions,
        sides: &mut SideOutputs,
    ) -> Result<Self> {
        let size = size.div_ceil(512) * 512;
        let stem = name.strip_suffix(".vmdk").unwrap_or(name);
        let (create_type, split, sparse) = match opts.subformat {
            Subformat::MonolithicFlat => ("monolithicFlat", u64::MAX, false),
            Subformat::TwoGbMaxExtentFlat => ("twoGbMaxExtentFlat", SPLIT, false),
            Subformat::TwoGbMaxExtentSparse => ("twoGbMaxExtentSparse", SPLIT, true),
            _ => unreachable!("single-file subformats use VmdkWriter"),
        };
        let mut pieces = Vec::new();
        let mut lines = Vec::new();
        let mut start = 0;
        while start < size || pieces.is_empty() {
            let len = split.min(size - start);
            let n = pieces.len() + 1;
            let extent = match (split, sparse) {
                (u64::MAX, _) => format!("{stem}-flat.vmdk"),
                (_, true) => format!("{stem}-s{n:03}.vmdk"),
                (_, false) => format!("{stem}-f{n:03}.vmdk"),
            };
            let (f, temp) = sides.create(&extent)?;
            let writer: Box<dyn ImageWriter> = if sparse {
                let mut w = VmdkWriter::create(
                    f,
                    &temp,
                    len,
                    &extent,
                    VmdkOptions {
                        subformat: Subformat::MonolithicSparse,
                        ..opts.clone()
                    },
                )?;
                w.embed_descriptor = false;
                lines.push(format!("RW {} SPARSE \"{extent}\"", len / 512));
                Box::new(w)
            } else {
                lines.push(format!("RW {} FLAT \"{extent}\" 0", len / 512));
                Box::new(RawWriter::new(f, &temp, len, true, true)?)
            };
            pieces.push(Piece { start, len, writer });
            start += len;
            if size == 0 {
                break;
            }
        }
        Ok(VmdkSetWriter {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            descriptor: descriptor_text(create_type, &lines, size, &opts),
            pieces,
        })
    }

    /// The pieces a guest range touches, with the part in each.
    fn split(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.pieces.iter().enumerate().filter_map(move |(i, p)| {
            let a = offset.max(p.start);
            let b = (offset + len).min(p.start + p.len);
            (a < b).then(|| (i, a, b - a))
        })
    }
}

impl ImageWriter for VmdkSetWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.pieces
            .iter()
            .map(|p| p.writer.granularity())
            .max()
            .unwrap_or(512)
    }

    fn zero_initialized(&self) -> bool {
        true
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        Arc::new(PlainEncoder)
    }

    fn plan(&mut self, c: &Chunk<'_>) -> Result<WritePlan> {
        let mut parts = Vec::new();
        let spans: Vec<_> = self.split(c.offset, c.data.len() as u64).collect();
        for (i, at, n) in spans {
            let base = (at - c.offset) as usize;
            let piece = &mut self.pieces[i];
            let sub = Chunk {
                offset: at - piece.start,
                data: &c.data[base..base + n as usize],
                compressed: None,
            };
            parts.push((base, piece.writer.plan(&sub)?));
        }
        Ok(WritePlan {
            file: self.file.clone(),
            path: self.path.clone(),
            writes: Vec::new(),
            parts,
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let spans: Vec<_> = self.split(offset, len).collect();
        for (i, at, n) in spans {
            let piece = &mut self.pieces[i];
            piece.writer.write_zeroes(at - piece.start, n)?;
        }
        Ok(())
    }

    fn finish_with(self: Box<Self>, flush: bool) -> Result<()> {
        for p in self.pieces {
            p.writer.finish_with(flush)?;
        }
        write_all_at(&self.file, &self.path, self.descriptor.as_bytes(), 0)?;
        if !flush {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.path, "syncing the descriptor", e))
    }
}
