use std::fmt;
use std::path::{Path, PathBuf};

/// A descriptor that cannot be read or written: where (file, line, key) and
/// what was expected.
#[derive(Debug)]
pub struct DescError {
    /// The descriptor file, when known.
    pub file: Option<PathBuf>,
    /// 1-based line number.
    pub line: Option<usize>,
    /// The key, element or field at fault.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    source: Option<std::io::Error>,
}

/// Results of this crate.
pub type Result<T, E = DescError> = std::result::Result<T, E>;

impl DescError {
    /// An error with a message only.
    pub fn new(message: impl Into<String>) -> DescError {
        DescError {
            file: None,
            line: None,
            field: None,
            message: message.into(),
            source: None,
        }
    }

    /// An error at a line.
    pub fn at_line(line: usize, message: impl Into<String>) -> DescError {
        DescError {
            line: Some(line),
            ..DescError::new(message)
        }
    }

    /// A failed read of `path`.
    pub fn io(path: &Path, e: std::io::Error) -> DescError {
        DescError {
            message: e.to_string(),
            source: Some(e),
            ..DescError::new("").in_file(path)
        }
    }

    /// Names the file (unless already named).
    pub fn in_file(mut self, path: &Path) -> DescError {
        if self.file.is_none() {
            self.file = Some(path.to_path_buf());
        }
        self
    }

    /// Names the key or element at fault (unless already named).
    pub fn field(mut self, field: impl Into<String>) -> DescError {
        if self.field.is_none() {
            self.field = Some(field.into());
        }
        self
    }
}

impl fmt::Display for DescError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.file {
            write!(f, "{}: ", p.display())?;
        }
        if let Some(l) = self.line {
            write!(f, "line {l}: ")?;
        }
        if let Some(k) = &self.field {
            write!(f, "{k}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for DescError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}
