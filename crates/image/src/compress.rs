//! The compression codecs of qcow2 (raw deflate, zstd) and VMDK (zlib).

use std::cell::RefCell;

use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress, Status};

// Codec states cost tens to hundreds of KiB to set up, more than a cluster
// takes to process: each thread keeps one of each and resets it per use.
thread_local! {
    static INFLATE: RefCell<Option<(bool, Decompress)>> = const { RefCell::new(None) };
    static UNZSTD: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// A codec and its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate with a 4 KiB window, as qcow2 stores it.
    RawDeflate,
    /// Deflate in a zlib wrapper, as VMDK grains store it.
    Zlib,
    /// Zstandard, as qcow2 with compression_type=zstd stores it.
    Zstd,
}

/// Decompresses `input` into exactly `out.len()` bytes. Trailing input after
/// the end of the stream is ignored (the on-disk size is rounded to
/// sectors); a stream that ends early or would produce more is an error.
pub fn decompress(codec: Codec, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match codec {
        Codec::RawDeflate | Codec::Zlib => inflate(codec == Codec::Zlib, input, out),
        Codec::Zstd => unzstd(input, out),
    }
}

/// Decompresses `input` into the start of `out`, returning how many bytes
/// it produced; an error when it would produce more than `out.len()`.
/// For VMDK grains, whose last one may cover only the end of the disk.
pub fn decompress_prefix(codec: Codec, input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    if codec == Codec::Zstd {
        return unzstd(input, out).map(|()| out.len());
    }
    let zlib_header = codec == Codec::Zlib;
    let mut d = Decompress::new(zlib_header);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("deflate data is corrupt: {e}"))?;
    let produced = d.total_out() as usize;
    if status == Status::StreamEnd {
        return Ok(produced);
    }
    if produced < out.len() {
        return Err(format!("deflate data ends early, after {produced} bytes"));
    }
    let consumed = d.total_in() as usize;
    let mut extra = [0u8; 1];
    d.decompress(&input[consumed..], &mut extra, FlushDecompress::Finish)
        .map_err(|e| format!("deflate data is corrupt: {e}"))?;
    if d.total_out() as usize > produced {
        return Err(format!(
            "deflate data inflates to more than {} bytes",
            out.len()
        ));
    }
    Ok(produced)
}

fn inflate(zlib_header: bool, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    INFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some((z, d)) if *z == zlib_header => {
                d.reset(zlib_header);
                d
            }
            other => &mut other.insert((zlib_header, Decompress::new(zlib_header))).1,
        };
        inflate_with(d, input, out)
    })
}

fn inflate_with(d: &mut Decompress, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("deflate data is corrupt: {e}"))?;
    let produced = d.total_out() as usize;
    if produced < out.len() {
        return Err(format!(
            "deflate data ends after {produced} of {} bytes",
            out.len()
        ));
    }
    if status != Status::StreamEnd {
        // Output is full: the stream must end here, producing nothing more.
        let consumed = d.total_in() as usize;
        let mut extra = [0u8; 1];
        let st = d
            .decompress(&input[consumed..], &mut extra, FlushDecompress::Finish)
            .map_err(|e| format!("deflate data is corrupt: {e}"))?;
        if d.total_out() as usize > produced {
            return Err(format!(
                "deflate data inflates to more than the {} bytes of a cluster",
                out.len()
            ));
        }
        if st != Status::StreamEnd
            && !input[consumed..].is_empty()
            && d.total_in() as usize == consumed
        {
            return Err("deflate stream does not end after a full cluster".into());
        }
    }
    Ok(())
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, Operation};
    UNZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dec = match &mut *slot {
            Some(d) => {
                d.reinit().map_err(|e| format!("zstd: {e}"))?;
                d
            }
            None => {
                let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
                // A cluster is at most 2 MiB: refuse frames that ask for a
                // larger window (and so for more memory).
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(22))
                    .map_err(|e| format!("zstd: {e}"))?;
                slot.insert(d)
            }
        };
        unzstd_with(dec, input, out)
    })
}

fn unzstd_with(
    dec: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("zstd data is corrupt: {e}"))?;
        let full = outb.pos() == outb.capacity();
        if hint == 0 {
            // A frame ended.
            if full {
                return Ok(());
            }
            if inb.pos() == input.len() {
                break;
            }
            // Another frame follows (QEMU may write several).
            continue;
        }
        if full {
            // More output pending in this frame: it inflates past the cluster.
            let mut extra = [0u8; 1];
            let mut eb = OutBuffer::around(&mut extra[..]);
            dec.run(&mut inb, &mut eb)
                .map_err(|e| format!("zstd data is corrupt: {e}"))?;
            if eb.pos() > 0 {
                return Err(format!(
                    "zstd data inflates to more than the {} bytes of a cluster",
                    outb.capacity()
                ));
            }
            return Ok(());
        }
        if inb.pos() == input.len() {
            break;
        }
    }
    Err(format!(
        "zstd data ends after {} of {} bytes",
        outb.pos(),
        outb.capacity()
    ))
}

/// Compresses `input`; returns `None` when the result would not be smaller
/// than `limit` bytes (store the data uncompressed then).
pub fn compress(codec: Codec, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match codec {
        Codec::RawDeflate | Codec::Zlib => {
            // A fresh state per cluster: reusing one zlib-rs 0.6 state with
            // reset() made deflate's stored-block path overflow (a panic in
            // debug builds) when converting to 512-byte clusters.
            // Window 2^12: QEMU inflates qcow2 clusters with that window.
            let mut c = if codec == Codec::Zlib {
                // VMDK grains: level 9, so streamOptimized output is no
                // larger than qemu-img's (C zlib at level 6); zlib-rs at
                // level 6 was 2.5% larger on 1 GiB of /usr (BENCHMARKS.md).
                Compress::new(Level::best(), true)
            } else {
                Compress::new_with_window_bits(Level::default(), false, 12)
            };
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        Codec::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = match &mut *slot {
                Some(c) => c,
                None => slot.insert(zstd::bulk::Compressor::new(3).ok()?),
            };
            // Room for the frame of an incompressible cluster; refused below.
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(input.len()));
            c.compress_to_buffer(input, &mut out).ok()?;
            (out.len() < limit).then_some(out)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 7 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_every_codec() {
        for codec in [Codec::RawDeflate, Codec::Zlib, Codec::Zstd] {
            let data = sample();
            let packed = compress(codec, &data, data.len()).unwrap();
            let mut out = vec![0u8; data.len()];
            decompress(codec, &packed, &mut out).unwrap();
            assert_eq!(out, data, "{codec:?}");
        }
    }

    #[test]
    fn round_trip_many_sizes_on_one_thread_reuses_state_safely() {
        // Incompressible clusters that do not fit the limit, then small and
        // large compressible ones: every round trip must be exact.
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..(1 << 21))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for codec in [Codec::RawDeflate, Codec::Zlib, Codec::Zstd] {
            for size in [512usize, 65536, 2 << 20, 4096, 512, 1 << 20] {
                assert!(
                    compress(codec, &noise[..size], size).is_none(),
                    "{codec:?} {size}"
                );
                let data: Vec<u8> = (0..size).map(|i| (i / 13 % 7) as u8).collect();
                let packed = compress(codec, &data, size).unwrap();
                let mut out = vec![0u8; size];
                decompress(codec, &packed, &mut out).unwrap();
                assert_eq!(out, data, "{codec:?} {size}");
            }
        }
    }

    #[test]
    fn decompress_with_sector_padding_succeeds() {
        let data = sample();
        let mut packed = compress(Codec::RawDeflate, &data, data.len()).unwrap();
        packed.resize(packed.len().div_ceil(512) * 512, 0);
        let mut out = vec![0u8; data.len()];
        decompress(Codec::RawDeflate, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn decompress_too_much_data_is_refused() {
        let data = sample();
        for codec in [Codec::RawDeflate, Codec::Zstd] {
            let packed = compress(codec, &data, data.len()).unwrap();
            let mut out = vec![0u8; data.len() / 2];
            assert!(decompress(codec, &packed, &mut out).is_err(), "{codec:?}");
        }
    }

    #[test]
    fn decompress_truncated_stream_is_refused() {
        let data = sample();
        let packed = compress(Codec::RawDeflate, &data, data.len()).unwrap();
        let mut out = vec![0u8; data.len()];
        assert!(decompress(Codec::RawDeflate, &packed[..packed.len() / 2], &mut out).is_err());
    }
}
