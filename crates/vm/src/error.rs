//! The pipeline's error type.

use std::path::PathBuf;

use vmshift_model::Finding;

/// What stops a whole-VM operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A descriptor could not be read or understood (the message names the
    /// file and the field).
    #[error(transparent)]
    Descriptor(#[from] vmshift_desc::DescError),
    /// A disk image could not be opened or read.
    #[error(transparent)]
    Image(#[from] vmshift_image::Error),
    /// A disk reference leads to no readable image.
    #[error("{message}")]
    Disk {
        /// What is wrong, naming the reference.
        message: String,
        /// The file it leads to does not exist.
        missing: bool,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The request cannot be carried out as given.
    #[error("{0}")]
    Request(String),
    /// A conversion found errors before writing anything.
    #[error("{message}")]
    Refused {
        /// What to tell the user.
        message: String,
        /// Every finding, errors first.
        findings: Vec<Finding>,
    },
    /// The guest's disks could not be read for its kernel.
    #[error(transparent)]
    Guest(#[from] vmshift_guest::Error),
    /// The launcher could not run the guest.
    #[error(transparent)]
    Launcher(#[from] vmshift_kvm::Error),
}

impl Error {
    /// An I/O error while doing `what` with `path`.
    pub fn io(
        path: impl Into<PathBuf>,
        what: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, what, source }
    }

    /// True when the error says a file does not exist.
    pub fn is_not_found(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        if let Error::Disk { missing, .. } = self {
            return *missing;
        }
        while let Some(e) = cur {
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
