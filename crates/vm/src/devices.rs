//! The user's choices for devices a conversion cannot copy — a VMware raw
//! device mapping, a passthrough disk, a host block device: leave one out
//! (`--skip-device ADDR`), or give the new VM a host block device in its
//! place (`--map-device ADDR=/dev/…`). Applied to the model right after it
//! is read, so that validation, conversion and the boot check all see the
//! VM the user asked for, and the report says what was done.

use vmshift_model::{DeviceKind, DiskFormat, DiskRef, Finding, Severity};

use crate::{Error, Loaded, Result};

/// What to do with devices, by their address (`scsi0:1`, `sata0:2`,
/// `ide1:0`, as `vm inspect` shows them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceChoices {
    /// Addresses of devices to leave out.
    pub skip: Vec<String>,
    /// Addresses of disks to replace by a host block device, and the
    /// device's path on the KVM host (`/dev/…`).
    pub map: Vec<(String, String)>,
}

impl DeviceChoices {
    /// True when nothing is asked.
    pub fn is_empty(&self) -> bool {
        self.skip.is_empty() && self.map.is_empty()
    }

    /// Reads `ADDR=/dev/…`.
    pub fn parse_map(text: &str) -> std::result::Result<(String, String), String> {
        let (addr, dev) = text
            .split_once('=')
            .ok_or_else(|| format!("'{text}': expected ADDR=/dev/…, e.g. scsi0:1=/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"))?;
        check_address(addr).map_err(|e| format!("'{text}': {e}"))?;
        let ok = dev.starts_with("/dev/")
            && dev.len() > "/dev/".len()
            && !dev.split('/').any(|c| c == "..")
            && !dev.contains([',', '\n', '\r', '\0']);
        if !ok {
            return Err(format!(
                "'{text}': '{dev}' is not a host block device path (/dev/…, no '..' or commas)"
            ));
        }
        Ok((addr.to_ascii_lowercase(), dev.to_string()))
    }

    /// Reads `ADDR`.
    pub fn parse_address(text: &str) -> std::result::Result<String, String> {
        check_address(text).map_err(|e| format!("'{text}': {e}"))?;
        Ok(text.to_ascii_lowercase())
    }
}

/// `bus` `controller`:`unit`, e.g. `scsi0:1`.
fn check_address(text: &str) -> std::result::Result<(), String> {
    let bad = || "expected a device address such as scsi0:1, sata0:2 or ide1:0".to_string();
    let (bus, rest) = text
        .find(|c: char| c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(bad)?;
    let (c, u) = rest.split_once(':').ok_or_else(bad)?;
    let number = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    if bus.is_empty() || !bus.bytes().all(|b| b.is_ascii_alphabetic()) || !number(c) || !number(u) {
        return Err(bad());
    }
    Ok(())
}

impl Loaded {
    /// Applies `choices` to the VM read, adding a finding for each; an
    /// address the VM does not have, or a choice that contradicts another,
    /// is an error before anything else happens.
    pub fn apply_devices(&mut self, choices: &DeviceChoices) -> Result<()> {
        if choices.is_empty() {
            return Ok(());
        }
        let vm = &mut self.lowered.vm;
        let have: Vec<String> = vm.disks.iter().map(|d| d.address()).collect();
        let find = |addr: &str, flag: &str| -> Result<usize> {
            have.iter()
                .position(|a| a.eq_ignore_ascii_case(addr))
                .ok_or_else(|| {
                    Error::Request(format!(
                        "{flag} {addr}: the VM has no device there (it has: {})",
                        if have.is_empty() {
                            "none".to_string()
                        } else {
                            have.join(", ")
                        }
                    ))
                })
        };
        let mut seen = std::collections::HashSet::new();
        for a in choices
            .skip
            .iter()
            .chain(choices.map.iter().map(|(a, _)| a))
        {
            if !seen.insert(a.to_ascii_lowercase()) {
                return Err(Error::Request(format!(
                    "{a} is named twice by --skip-device/--map-device"
                )));
            }
        }
        let mut findings = Vec::new();
        for (addr, dev) in &choices.map {
            let i = find(addr, "--map-device")?;
            let d = &mut vm.disks[i];
            if d.device != DeviceKind::Disk {
                return Err(Error::Request(format!(
                    "--map-device {addr}: the device there is a {}, not a disk; --skip-device {addr} leaves it out",
                    match d.device {
                        DeviceKind::Cdrom => "CD-ROM drive",
                        DeviceKind::Floppy => "floppy drive",
                        DeviceKind::Disk => "disk",
                    }
                )));
            }
            let was = d
                .source
                .as_ref()
                .map_or("no source".to_string(), |s| s.to_string());
            findings.push(Finding::new(
                Severity::Info,
                "device-mapped",
                format!("disks[{i}].source"),
                format!(
                    "the disk at {} ({was}) becomes host block device {dev}, as --map-device says: nothing is copied, and {dev} must exist on the KVM host and hold what the disk held",
                    d.address()
                ),
            ));
            d.source = Some(DiskRef::Device { path: dev.clone() });
            d.format = Some(DiskFormat::Raw);
            d.size = None;
            d.passthrough = true;
        }
        let mut skip: Vec<usize> = choices
            .skip
            .iter()
            .map(|a| find(a, "--skip-device"))
            .collect::<Result<_>>()?;
        skip.sort_unstable();
        for &i in skip.iter().rev() {
            let d = vm.disks.remove(i);
            let what = match d.device {
                DeviceKind::Disk => "disk",
                DeviceKind::Cdrom => "CD-ROM drive",
                DeviceKind::Floppy => "floppy drive",
            };
            let was = d
                .source
                .as_ref()
                .map_or("empty".to_string(), |s| s.to_string());
            findings.push(Finding::new(
                if d.device == DeviceKind::Disk {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                "device-skipped",
                "disks",
                format!(
                    "the {what} at {} ({was}) is left out, as --skip-device says: the new VM does not have it",
                    d.address()
                ),
            ));
        }
        // Indices of later findings refer to the VM as it is now.
        self.lowered.findings.extend(findings);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_maps_parse_strictly() {
        assert_eq!(DeviceChoices::parse_address("SCSI0:1").unwrap(), "scsi0:1");
        for bad in [
            "scsi",
            "0:1",
            "scsi0",
            "scsi0:",
            "scsi:1",
            "sc si0:1",
            "scsi0:1:2",
            "scsi99999:1",
        ] {
            assert!(DeviceChoices::parse_address(bad).is_err(), "{bad}");
        }
        assert_eq!(
            DeviceChoices::parse_map("scsi0:1=/dev/sdb").unwrap(),
            ("scsi0:1".to_string(), "/dev/sdb".to_string())
        );
        for bad in [
            "scsi0:1",
            "scsi0:1=",
            "scsi0:1=sdb",
            "scsi0:1=/dev/",
            "scsi0:1=/dev/../etc/passwd",
            "scsi0:1=/dev/sdb,format=qcow2",
            "=/dev/sdb",
        ] {
            assert!(DeviceChoices::parse_map(bad).is_err(), "{bad}");
        }
    }
}
