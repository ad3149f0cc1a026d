//! Whether a VMware VM is at rest: not suspended (its memory, with data
//! the guest has not written to its disks yet, saved in a `.vmss`/`.vmem`)
//! and not running (VMware's `.lck` lock folders beside the `.vmx` or its
//! disks). Copying the disks of either gives a guest that lost writes or a
//! file system caught mid-change, so both are errors unless the user says
//! otherwise — and then the report still says so.

use std::path::{Path, PathBuf};

use vmshift_model::{DeviceKind, DiskRef, Finding, Severity};

use crate::load::Loaded;
use crate::resolve::Resolver;

/// What the user lets through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allow {
    /// Convert or boot a suspended VM (`--allow-suspended`).
    pub suspended: bool,
    /// Convert or boot a VM whose files are locked (`--allow-locked`).
    pub locked: bool,
}

/// Files in `dir` whose names end with `suffix` (case-insensitive), sorted.
fn with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_ascii_lowercase())
                .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    out.sort();
    out
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The findings on a VMware VM's state: `vm-suspended` and `vm-locked`,
/// errors unless `allow` lets them through (then warnings that say so).
/// Nothing for other descriptors.
pub fn state_findings(loaded: &Loaded, resolver: &Resolver, allow: Allow) -> Vec<Finding> {
    let Some(vmstate) = &loaded.vmx_vmstate else {
        return Vec::new();
    };
    let folder = match loaded.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out = Vec::new();

    // Suspended: the checkpoint the .vmx names, or a suspend or memory
    // file beside it.
    let mut evidence = Vec::new();
    if !vmstate.trim().is_empty() {
        evidence.push(format!(
            "checkpoint.vmState = \"{}\"{}",
            vmstate,
            if folder.join(vmstate).exists() {
                ""
            } else {
                " (the file is not here)"
            }
        ));
    }
    let vmss = with_suffix(&folder, ".vmss");
    if !vmss.is_empty() {
        evidence.push(format!("suspend state {}", names(&vmss)));
    }
    let vmem = with_suffix(&folder, ".vmem");
    if !vmem.is_empty() {
        evidence.push(format!("guest memory {}", names(&vmem)));
    }
    if !evidence.is_empty() {
        let what = format!(
            "the VM is suspended or running ({}): its memory holds what the guest has not written to its disks yet, so the disks are not a consistent copy",
            evidence.join("; ")
        );
        out.push(if allow.suspended {
            Finding::new(
                Severity::Warning,
                "vm-suspended",
                "state",
                format!("{what}; going on anyway as --allow-suspended says"),
            )
        } else {
            Finding::new(
                Severity::Error,
                "vm-suspended",
                "state",
                format!("{what}. Resume it in VMware and shut the guest down (not suspend), then try again; --allow-suspended goes on anyway"),
            )
        });
    }

    // Locked: VMware's lock folders beside the .vmx and the disks.
    let mut locks = with_suffix(&folder, ".lck");
    for d in &loaded.lowered.vm.disks {
        if d.device != DeviceKind::Disk {
            continue;
        }
        let Some(src @ DiskRef::File { .. }) = &d.source else {
            continue;
        };
        if let Ok(p) = resolver.resolve(src) {
            let mut lck = p.into_os_string();
            lck.push(".lck");
            let lck = PathBuf::from(lck);
            if lck.exists() && !locks.contains(&lck) {
                locks.push(lck);
            }
        }
    }
    if !locks.is_empty() {
        let what = format!(
            "VMware holds the VM's files ({}): it is running, or VMware stopped without removing its locks",
            names(&locks)
        );
        out.push(if allow.locked {
            Finding::new(
                Severity::Warning,
                "vm-locked",
                "state",
                format!("{what}; going on anyway as --allow-locked says"),
            )
        } else {
            Finding::new(
                Severity::Error,
                "vm-locked",
                "state",
                format!("{what}. Shut the VM down in VMware first; if it is not running (a crash left the locks), --allow-locked goes on anyway"),
            )
        });
    }
    out
}
