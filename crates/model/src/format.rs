use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A disk image format vmshift can read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain byte-for-byte image (also block devices).
    Raw,
    /// QEMU's copy-on-write format, versions 2 and 3.
    Qcow2,
    /// VMware's virtual disk format.
    Vmdk,
}

impl DiskFormat {
    /// Every format, in the order help texts list them.
    pub const ALL: [DiskFormat; 3] = [DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Vmdk];

    /// The name `qemu-img` and vmshift use on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DiskFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown disk format '{s}' (expected raw, qcow2 or vmdk)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_names_case_insensitively() {
        assert_eq!("QCOW2".parse::<DiskFormat>(), Ok(DiskFormat::Qcow2));
        assert_eq!("raw".parse::<DiskFormat>(), Ok(DiskFormat::Raw));
        assert!("qcow".parse::<DiskFormat>().is_err());
    }
}
