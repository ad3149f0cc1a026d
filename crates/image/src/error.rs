//! One error type for the whole block layer.
//!
//! Every error says which file, which field and which offset it is about,
//! and what was expected, so a user can act on it without a hex editor.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused or failed an I/O operation.
    Io,
    /// The file is not in the format it claims (bad magic, bad field).
    InvalidFormat,
    /// A valid file uses a feature vmshift does not implement.
    Unsupported,
    /// The image's metadata contradicts itself (past EOF, overlaps, bad refcounts).
    Corrupt,
    /// A referenced file (backing, data file, extent) was refused by the gate.
    Refused,
    /// The output path already exists and `--force` was not given.
    Exists,
    /// The caller asked for something impossible (read past the end, bad option).
    InvalidInput,
    /// Another process (a running QEMU, qemu-img) holds the image's lock.
    Locked,
    /// The file maps a physical device or LUN (a VMware raw device
    /// mapping, `fullDevice`): there is no image data to read.
    DeviceMapping,
}

/// A block-layer error with its context.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    field: Option<String>,
    offset: Option<u64>,
    message: String,
    source: Option<io::Error>,
}

/// The block layer's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a message; add context with the builders.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            field: None,
            offset: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O failure while doing `what` on `path`.
    pub fn io(path: &Path, what: impl Into<String>, source: io::Error) -> Self {
        Error {
            source: Some(source),
            ..Error::new(ErrorKind::Io, what).at_path(path)
        }
    }

    /// Names the file the error is about.
    pub fn at_path(mut self, path: &Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }

    /// Names the header field or table the error is about.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Names the field, unless the error already names one.
    pub fn field_if_unset(mut self, field: impl Into<String>) -> Self {
        if self.field.is_none() {
            self.field = Some(field.into());
        }
        self
    }

    /// Names the byte offset in the file the error is about.
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    pub(crate) fn set_source(&mut self, source: io::Error) {
        self.source = Some(source);
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file the error is about, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The field the error is about, if known.
    pub fn field_name(&self) -> Option<&str> {
        self.field.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        match (&self.field, self.offset) {
            (Some(field), Some(off)) => write!(f, "{field} (at offset {off:#x}): ")?,
            (Some(field), None) => write!(f, "{field}: ")?,
            (None, Some(off)) => write!(f, "at offset {off:#x}: ")?,
            (None, None) => {}
        }
        // The cause is not repeated here: it is `source()`, which callers
        // print as a chain (`{:#}` with anyhow).
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Shorthand for the errors a format driver raises about its own file.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub path: PathBuf,
}

impl Ctx {
    pub fn new(path: &Path) -> Self {
        Ctx {
            path: path.to_path_buf(),
        }
    }

    /// A malformed field: `field` at `offset` holds something unexpected.
    pub fn invalid(&self, field: &str, offset: u64, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidFormat, message)
            .at_path(&self.path)
            .field(field)
            .offset(offset)
    }

    /// Self-contradicting metadata.
    pub fn corrupt(&self, field: &str, offset: u64, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message)
            .at_path(&self.path)
            .field(field)
            .offset(offset)
    }

    /// A feature this driver does not implement.
    pub fn unsupported(&self, field: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unsupported, message)
            .at_path(&self.path)
            .field(field)
    }
}
