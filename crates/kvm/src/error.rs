//! The launcher's error type.

use std::path::PathBuf;

/// What can stop the launcher before or while the guest runs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: String,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open it?)")]
    NoKvm(kvm_ioctls::Error),
    /// Guest memory could not be set up or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel or initramfs could not be loaded.
    #[error("{name}: {msg}")]
    Kernel {
        /// The file (a host path or a path in the guest).
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The configuration asks for something the launcher cannot do.
    #[error("{0}")]
    Config(String),
    /// QEMU (the QEMU engine) could not run the guest.
    #[error("QEMU: {0}")]
    Qemu(String),
    /// The user interrupted the boot.
    #[error("interrupted")]
    Interrupted,
    /// A file the launcher writes (the console log) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl Error {
    /// A KVM error while doing `what`.
    pub fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        let what = what.into();
        move |source| Error::Kvm { what, source }
    }
}

/// An error and its causes in one line.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.iter().any(|o| o.contains(&t)) {
            out.push(t);
        }
        cur = c.source();
    }
    out.join(": ")
}

/// The launcher's result type.
pub type Result<T> = std::result::Result<T, Error>;
