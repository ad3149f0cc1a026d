//! What a metadata check found, in `qemu-img check`'s terms.

use serde::Serialize;

/// The result of a check, with `qemu-img check`'s JSON field names.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// One line per problem found, as qemu-img prints them.
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 check errors, 2 corruptions,
    /// 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// What `check -r` repairs (qemu-img's `-r leaks` and `-r all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// Refcounts higher than the references: lowered.
    Leaks,
    /// Leaks, refcounts lower than the references (but not zero), and
    /// OFLAG_COPIED flags that disagree with the refcounts.
    All,
}

/// What a repair did, and the lines it printed.
#[derive(Debug, Clone, Default)]
pub struct Repaired {
    /// Leaked clusters whose refcount was lowered.
    pub leaks_fixed: u64,
    /// Corruptions fixed.
    pub corruptions_fixed: u64,
    /// Every line, as qemu-img prints them on stderr.
    pub messages: Vec<String>,
    /// The refcount structure needs rebuilding, which `-r leaks` does not
    /// do (qemu-img's "need to rebuild" error): nothing was written.
    pub needs_rebuild: bool,
}
