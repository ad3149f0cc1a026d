//! `vmshift guest`: the file systems and files inside a guest's disks,
//! read offline through vmshift's own image and file-system readers.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use vmshift_guest::vfs::{self, EntryKind, Found, GuestFs};
use vmshift_image::ImageReader;
use vmshift_vm::DescriptorFormat;

use crate::args::{GuestCatArgs, GuestFsArgs, GuestLsArgs, GuestSource, Output, VmFormatArg};

/// The largest file `guest cat` prints.
const MAX_CAT: u64 = 1 << 40;

fn is_descriptor(path: &Path, from: Option<VmFormatArg>) -> bool {
    from.is_some() || DescriptorFormat::from_extension(path).is_some()
}

/// The disks: the images, in order, or the descriptor's hard disks.
/// The guest's disks, opened; then the process is confined (it reads
/// only through them from here on).
fn disks(src: &GuestSource, more: &[std::path::PathBuf]) -> Result<Vec<Arc<dyn ImageReader>>> {
    let disks = open_disks(src, more)?;
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    Ok(disks)
}

fn open_disks(src: &GuestSource, more: &[std::path::PathBuf]) -> Result<Vec<Arc<dyn ImageReader>>> {
    let added: Vec<&std::path::PathBuf> = src.add.iter().chain(more).collect();
    if is_descriptor(&src.image, src.from) {
        if let Some(a) = added.first() {
            bail!(
                "{}: a VM descriptor names its own disks; {} cannot be added to them",
                src.image.display(),
                a.display()
            );
        }
        let mut l = crate::cmd::vm::load(&src.image, src.from)?;
        let resolver = crate::cmd::vm::resolver(&mut l, &src.roots, src.gate.force_share)?;
        let disks = vmshift_vm::open_disks(&l.lowered.vm, &resolver)?;
        if disks.is_empty() {
            bail!("{}: the VM has no hard disk", src.image.display());
        }
        return Ok(disks.into_iter().map(|(_, d)| Arc::from(d)).collect());
    }
    std::iter::once(&src.image)
        .chain(added)
        .map(|p| {
            let img = crate::cmd::open(p, src.format, &src.gate, false, crate::cmd::Use::Look)?;
            Ok(Arc::from(img))
        })
        .collect()
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}")
    } else if v < 10.0 {
        format!("{v:.1}{}", UNITS[u])
    } else {
        format!("{v:.0}{}", UNITS[u])
    }
}

pub fn filesystems(args: &GuestFsArgs) -> Result<i32> {
    let found = vfs::scan(&disks(&args.source, &args.more)?)?;
    match args.output {
        Output::Json => {
            let v: Vec<_> = found
                .iter()
                .map(|f| {
                    json!({
                        "name": f.info.place,
                        "type": f.info.kind.name(),
                        "uuid": f.info.uuid,
                        "label": f.info.label,
                        "size": f.info.size,
                        "readable": f.info.kind.readable(),
                        "note": f.info.note,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            // Wide enough for /dev/VG/LV names, within reason (a name from
            // a damaged image may be any length).
            let w = found
                .iter()
                .map(|f| f.info.place.len())
                .max()
                .unwrap_or(0)
                .clamp(12, 48);
            println!(
                "{:<w$} {:<12} {:<38} {:<16} {:>6}",
                "Name", "Type", "UUID", "Label", "Size"
            );
            for f in &found {
                if f.info.kind == vfs::FsKind::Unread {
                    let note = f.info.note.as_deref().unwrap_or("");
                    println!("{:<w$} {:<12} ({note})", f.info.place, f.info.kind.name());
                    continue;
                }
                println!(
                    "{:<w$} {:<12} {:<38} {:<16} {:>6}{}",
                    f.info.place,
                    f.info.kind.name(),
                    f.info.uuid.as_deref().unwrap_or("-"),
                    f.info.label.as_deref().unwrap_or("-"),
                    human_size(f.info.size),
                    f.info
                        .note
                        .as_ref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(0)
}

/// The file system a guest path names (`/dev/sda1:/etc` or a path in the
/// root file system) and the path inside it.
fn locate(found: &[Found], path: &str) -> Result<(Box<dyn GuestFs>, String)> {
    if let Some((dev, inner)) = path.split_once(':') {
        let f = found.iter().find(|f| f.info.place == dev).ok_or_else(|| {
            anyhow!("{dev}: no file system there (see `vmshift guest filesystems`)")
        })?;
        let inner = if inner.is_empty() { "/" } else { inner };
        if !inner.starts_with('/') {
            bail!("{path}: the path inside {dev} must be absolute");
        }
        return Ok((vfs::open(f)?, inner.to_string()));
    }
    if !path.starts_with('/') {
        bail!("{path}: a guest path is absolute (/etc/fstab) or names its file system (/dev/sda1:/EFI)");
    }
    let readable: Vec<&Found> = found.iter().filter(|f| f.info.kind.readable()).collect();
    // The root: the one file system there is, or the one that holds /etc.
    let mut roots = Vec::new();
    for f in &readable {
        let fs = vfs::open(f)?;
        let has_etc = fs.stat("/etc").is_ok_and(|e| e.kind == EntryKind::Dir);
        if has_etc {
            roots.push(fs);
        }
    }
    match (roots.len(), readable.len()) {
        (1, _) => Ok((roots.remove(0), path.to_string())),
        (0, 1) => Ok((vfs::open(readable[0])?, path.to_string())),
        _ => {
            let names: Vec<&str> = readable.iter().map(|f| f.info.place.as_str()).collect();
            bail!(
                "{path}: which file system? Prefix the path with one of: {} (e.g. {}:{path})",
                names.join(", "),
                names.first().copied().unwrap_or("/dev/sda1")
            )
        }
    }
}

fn mode_string(mode: u32, kind: EntryKind) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File => '-',
        EntryKind::Other => match mode & 0o170000 {
            0o020000 => 'c',
            0o060000 => 'b',
            0o010000 => 'p',
            0o140000 => 's',
            _ => '?',
        },
    };
    let mut s = String::from(t);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    s
}

fn time_string(secs: i64) -> String {
    // UTC, as YYYY-MM-DD HH:MM (civil from days, Howard Hinnant's).
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn ls(args: &GuestLsArgs) -> Result<i32> {
    let found = vfs::scan(&disks(&args.source, &[])?)?;
    let (fs, path) = locate(&found, &args.path)?;
    let mut entries = fs.list(&path)?;
    entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let out = std::io::stdout();
    let mut out = out.lock();
    for e in &entries {
        if args.long {
            let full = format!("{}/{}", path.trim_end_matches('/'), e.name);
            let target = match e.kind {
                EntryKind::Symlink => fs
                    .read_link(&full)?
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            writeln!(
                out,
                "{} {:>12} {} {}{}",
                mode_string(e.mode, e.kind),
                e.size,
                time_string(e.mtime),
                e.name,
                target
            )?;
        } else {
            writeln!(out, "{}", e.name)?;
        }
    }
    Ok(0)
}

pub fn cat(args: &GuestCatArgs) -> Result<i32> {
    let found = vfs::scan(&disks(&args.source, &[])?)?;
    let (fs, path) = locate(&found, &args.path)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    fs.read_to(&path, MAX_CAT, &mut out)?;
    out.flush()?;
    Ok(0)
}

pub fn inspect(args: &GuestFsArgs) -> Result<i32> {
    let disks = disks(&args.source, &args.more)?;
    let found = vfs::scan(&disks)?;
    let guests = vmshift_guest::inspect::inspect(&found)?;
    let boot = vmshift_guest::bootpath::boot_path(&disks, &found);
    match args.output {
        Output::Json => {
            let fss: Vec<_> = found
                .iter()
                .map(|f| {
                    json!({
                        "name": f.info.place,
                        "type": f.info.kind.name(),
                        "uuid": f.info.uuid,
                        "label": f.info.label,
                        "size": f.info.size,
                    })
                })
                .collect();
            let v = json!({"operatingsystems": guests, "filesystems": fss, "boot": boot});
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            if guests.is_empty() {
                println!("no operating system found ({} file systems)", found.len());
            }
            println!(
                "{} boots with BIOS: {}",
                boot.disk,
                boot.bios.as_deref().unwrap_or("no (no boot code)")
            );
            println!(
                "{} boots with UEFI: {}",
                boot.disk,
                if boot.uefi.is_empty() {
                    "no (no EFI system partition with a loader)".to_string()
                } else {
                    boot.uefi.join(", ")
                }
            );
            for g in &guests {
                let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
                println!("{}: {}", g.root, opt(&g.product_name));
                println!(
                    "  distribution: {} {}",
                    opt(&g.distro),
                    match (g.major_version, g.minor_version) {
                        (Some(a), Some(b)) => format!("{a}.{b}"),
                        (Some(a), None) => a.to_string(),
                        _ => "unknown".into(),
                    }
                );
                println!("  hostname:     {}", opt(&g.hostname));
                println!("  arch:         {}", opt(&g.arch));
                if let Some(w) = &g.windows {
                    println!(
                        "  windows:      {} {} build {} (root {}, {})",
                        opt(&g.product_variant),
                        opt(&w.edition),
                        opt(&w.build),
                        opt(&w.system_root),
                        opt(&w.current_control_set)
                    );
                    for d in &w.drivers {
                        println!(
                            "  driver {:<14} starts {:<10} {}",
                            d.name, d.starts, d.drives
                        );
                    }
                    if !w.driver_store_virtio.is_empty() {
                        println!("  driver store: {}", w.driver_store_virtio.join(", "));
                    }
                    println!(
                        "  hibernated:   {}{}",
                        if w.hibernated { "yes" } else { "no" },
                        if w.ntfs_dirty {
                            " (NTFS volume dirty)"
                        } else {
                            ""
                        }
                    );
                } else {
                    println!(
                        "  packages:     {} ({})",
                        opt(&g.package_format),
                        opt(&g.package_management)
                    );
                }
                println!(
                    "  vmware tools: {}",
                    if g.vmware_tools { "installed" } else { "no" }
                );
                for m in &g.mountpoints {
                    println!(
                        "  mount {:<14} {} ({})",
                        m.path,
                        m.device.as_deref().unwrap_or("not on these disks"),
                        m.spec
                    );
                }
                for k in &g.kernels {
                    println!(
                        "  kernel {} initramfs {} ({}; virtio at boot: {})",
                        k.version,
                        k.initramfs.as_deref().unwrap_or("none"),
                        if k.initramfs_archives.is_empty() {
                            "not read".to_string()
                        } else {
                            k.initramfs_archives.join(" + ")
                        },
                        if k.virtio_drivers.is_empty() {
                            "none".to_string()
                        } else {
                            k.virtio_drivers.join(", ")
                        }
                    );
                }
                for u in &g.unknown {
                    println!("  unknown: {u}");
                }
                for f in &g.findings {
                    println!("  {}: {}", f.code, f.message);
                }
            }
        }
    }
    Ok(0)
}
