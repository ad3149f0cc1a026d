//! Creating writers: new images, and existing targets written in place.

use std::fs::File;
use std::path::Path;

use vmshift_model::DiskFormat;

use crate::block::ImageWriter;
use crate::error::{Error, ErrorKind, Result};
use crate::output::SideOutputs;
use crate::qcow2::{Qcow2Options, Qcow2Writer};
use crate::raw::RawWriter;
use crate::vmdk::set::VmdkSetWriter;
use crate::vmdk::writer::{Subformat, VmdkOptions, VmdkWriter};

/// Splits `-o` strings (`a=b,c=d`, repeatable) into pairs. A `,,` escapes
/// a comma inside a value, as in QEMU.
pub fn parse_options(items: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in items {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = item.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    parts.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        for p in parts.into_iter().filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("option '{p}' is not of the form key=value"),
                )
            })?;
            out.push((k.trim().to_string(), v.to_string()));
        }
    }
    Ok(out)
}

/// What a new image should be.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub format: DiskFormat,
    pub size: u64,
    pub options: Vec<(String, String)>,
    /// Compress data as it is written (`convert -c`).
    pub compress: bool,
    /// The output's file name at its final path (formats whose metadata
    /// names their own files, like VMDK descriptors, record it).
    pub name: String,
}

impl CreateSpec {
    /// The backing file named in the options, if any.
    pub fn backing_file(&self) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == "backing_file")
            .map(|(_, v)| v.as_str())
    }

    fn qcow2_options(&self) -> Result<Qcow2Options> {
        let mut o = Qcow2Options::default();
        for (k, v) in &self.options {
            o.set(k, v)?;
        }
        o.compress_data = self.compress;
        o.validate()?;
        Ok(o)
    }

    fn vmdk_options(&self) -> Result<VmdkOptions> {
        let mut o = VmdkOptions::default();
        for (k, v) in &self.options {
            o.set(k, v)?;
        }
        if self.compress && o.subformat != Subformat::StreamOptimized {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "-c with VMDK needs -o subformat=streamOptimized (its grains are always compressed)",
            ));
        }
        Ok(o)
    }

    /// Checks the options without creating anything.
    pub fn validate(&self) -> Result<()> {
        match self.format {
            DiskFormat::Qcow2 => self.qcow2_options().map(|_| ()),
            DiskFormat::Raw => {
                if self.compress {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "raw images cannot be compressed (-c)",
                    ));
                }
                for (k, v) in &self.options {
                    if !(k == "preallocation" && v == "off") {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!("raw images take no option '{k}={v}' (only preallocation=off)"),
                        ));
                    }
                }
                Ok(())
            }
            DiskFormat::Vmdk => self.vmdk_options().map(|_| ()),
        }
    }
}

/// A writer that builds a new image in `file` (empty, writable); formats
/// made of several files create the others through `sides`.
pub fn create_writer(
    file: File,
    path: &Path,
    spec: &CreateSpec,
    sides: &mut SideOutputs,
) -> Result<Box<dyn ImageWriter>> {
    spec.validate()?;
    Ok(match spec.format {
        DiskFormat::Raw => Box::new(RawWriter::new(file, path, spec.size, true, true)?),
        DiskFormat::Qcow2 => Box::new(Qcow2Writer::create(
            file,
            path,
            spec.size,
            spec.qcow2_options()?,
        )?),
        DiskFormat::Vmdk => {
            let opts = spec.vmdk_options()?;
            match opts.subformat {
                Subformat::MonolithicSparse | Subformat::StreamOptimized => {
                    Box::new(VmdkWriter::create(file, path, spec.size, &spec.name, opts)?)
                }
                _ => Box::new(VmdkSetWriter::create(
                    file, path, spec.size, &spec.name, opts, sides,
                )?),
            }
        }
    })
}

/// A writer into an existing target (`convert -n`): a raw file or block
/// device written in place, or a pre-created qcow2 image that holds no data
/// yet (rebuilt in place with its own options). `size` is what will be
/// written; the target keeps its own size if larger.
pub fn open_existing_writer(
    file: File,
    path: &Path,
    format: DiskFormat,
    size: u64,
    target_is_zero: bool,
) -> Result<Box<dyn ImageWriter>> {
    Ok(match format {
        DiskFormat::Raw => Box::new(RawWriter::new(file, path, size, false, target_is_zero)?),
        DiskFormat::Qcow2 => Box::new(Qcow2Writer::reuse_empty(file, path, size)?),
        DiskFormat::Vmdk => {
            return Err(
                Error::new(ErrorKind::Unsupported, "writing VMDK is not supported yet")
                    .at_path(path),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_options_splits_and_unescapes() {
        let got = parse_options(&[
            "cluster_size=4k,compat=1.1".into(),
            "backing_file=a,,b".into(),
        ])
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("cluster_size".into(), "4k".into()),
                ("compat".into(), "1.1".into()),
                ("backing_file".into(), "a,b".into())
            ]
        );
        assert!(parse_options(&["nonsense".into()]).is_err());
    }
}
