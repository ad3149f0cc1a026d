//! The kernel, initramfs and command line a Linux guest boots with, read
//! from its disks: GRUB's `grub.cfg` (the default entry, or the first),
//! BootLoaderSpec entries (`blscfg`, with `$kernelopts` from `grubenv`),
//! or Debian's `/vmlinuz` and `/initrd.img` links with the file system's
//! UUID as root — on every file system vmshift reads (ext2/3/4, XFS, FAT,
//! on partitions or LVM logical volumes: RHEL keeps `/boot` on XFS).

use std::collections::HashMap;
use std::sync::Arc;

use vmshift_image::ImageReader;

use crate::vfs::{self, EntryKind, GuestFs};
use crate::{Error, Result, MAX_BOOT_FILE};

/// A file system opened for its boot configuration.
struct Filesystem {
    /// Its device name (`/dev/sda1`, `/dev/rhel/root`).
    place: String,
    /// Its UUID, for a `root=UUID=` of its own.
    uuid: String,
    fs: Box<dyn GuestFs>,
}

/// What the guest's boot loader would boot.
#[derive(Debug, Clone)]
pub struct BootEntry {
    /// Where the configuration was found ("/dev/sda1:
    /// /boot/grub/grub.cfg").
    pub source: String,
    /// The entry's title.
    pub title: String,
    /// The kernel's path on its file system.
    pub kernel_path: String,
    /// The kernel image.
    pub kernel: Vec<u8>,
    /// The initramfs path and bytes.
    pub initrd: Option<(String, Vec<u8>)>,
    /// The kernel command line.
    pub cmdline: String,
}

/// A boot entry as the configuration states it (paths not yet read).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntrySpec {
    /// Title.
    pub title: String,
    /// Kernel path.
    pub linux: String,
    /// Initramfs paths (GRUB may list several; the first is used... all are
    /// concatenated by GRUB, and so here).
    pub initrd: Vec<String>,
    /// Command line.
    pub options: String,
}

/// Splits a GRUB command line into words, honouring single and double
/// quotes and backslash escapes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut has = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                has = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                has = true;
            }
            (None, c) if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            (_, c) => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The longest command line (or list of initrd paths) assembled from a
/// configuration; past it the rest is dropped (the launcher then refuses a
/// line longer than the kernel takes).
const MAX_EXPANDED: usize = 64 << 10;
/// The largest grub.cfg or BootLoaderSpec entry read.
const MAX_CONFIG: u64 = 1 << 20;
/// The largest grubenv read (GRUB's own is one 1024-byte block).
const MAX_GRUBENV: u64 = 64 << 10;

type Vars = HashMap<String, String>;

/// Expands each word (dropping words that expand to nothing) and joins
/// them with spaces, at most [`MAX_EXPANDED`] bytes.
fn expand_words<'a>(words: impl IntoIterator<Item = &'a str>, vars: &Vars) -> Vec<String> {
    let mut out = Vec::new();
    let mut total = 0usize;
    for w in words {
        let e = expand(w, vars);
        if e.is_empty() {
            continue;
        }
        total += e.len() + 1;
        if total > MAX_EXPANDED {
            break;
        }
        out.push(e);
    }
    out
}

/// Replaces `$name` and `${name}` with their values (unknown variables
/// are empty, as in GRUB); at most [`MAX_EXPANDED`] bytes.
fn expand(word: &str, vars: &Vars) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(b) = after.strip_prefix('{') {
            match b.find('}') {
                Some(e) => (&b[..e], e + 2),
                None => (b, b.len() + 1),
            }
        } else {
            let e = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..e], e)
        };
        if let Some(v) = vars.get(name) {
            if out.len() + v.len() > MAX_EXPANDED {
                break;
            }
            out.push_str(v);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// A path as GRUB writes it, without a `(device)` prefix.
fn grub_path(p: &str) -> String {
    let p = if p.starts_with('(') {
        p.find(')').map(|i| &p[i + 1..]).unwrap_or(p)
    } else {
        p
    };
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

/// Reads `key=value` lines of a GRUB environment block.
pub fn grubenv(text: &str) -> Vars {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Splits a `grub.cfg` into statements: at newlines and unquoted `;`,
/// with a block's `{` ending its statement and `}` a statement of its own
/// (so `menuentry 'A' { linux /k; initrd /i; }` on one line reads as it
/// would on several); `${…}` and quoted text are kept whole; comments
/// dropped.
fn statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    let push = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim();
        if !t.is_empty() {
            out.push(t.to_string());
        }
        cur.clear();
    };
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (Some('"'), '\\') | (None, '\\') => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.push(c);
            }
            (None, '$') if chars.peek() == Some(&'{') => {
                cur.push(c);
                for n in chars.by_ref() {
                    cur.push(n);
                    if n == '}' {
                        break;
                    }
                }
            }
            (None, '#') if cur.trim().is_empty() || cur.ends_with(char::is_whitespace) => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
                push(&mut cur, &mut out);
            }
            (None, '\n' | ';') => push(&mut cur, &mut out),
            (None, '{') => {
                cur.push_str(" {");
                push(&mut cur, &mut out);
            }
            (None, '}') => {
                push(&mut cur, &mut out);
                out.push("}".into());
            }
            (None, c) => cur.push(c),
        }
    }
    push(&mut cur, &mut out);
    out
}

/// A top-level item of the GRUB menu.
#[derive(Debug, Clone)]
struct MenuItem {
    /// The entry (a submenu has none).
    entry: Option<EntrySpec>,
    /// Its `--id` (or `$menuentry_id_option`) value.
    id: Option<String>,
}

/// The entry GRUB boots by default from a `grub.cfg`: `set default=` when
/// it names a top-level menu entry by number, title or id (after
/// expanding `${saved_entry}` and the like from grubenv), else the first
/// entry. An entry without a `linux` line (a `chainloader` to another
/// system, say) cannot be booted directly: then the first top-level entry
/// with one is taken. Returns `None` when the file has no menu entry with
/// a `linux` line; `Some` of an empty `linux` when it uses `blscfg`
/// instead.
pub fn parse_grub_cfg(text: &str, vars: &Vars) -> Option<EntrySpec> {
    let mut default: Option<String> = None;
    let mut top_items: Vec<MenuItem> = Vec::new();
    let mut depth = 0usize;
    let mut current: Option<MenuItem> = None;
    let mut bls = false;
    for line in statements(text) {
        let line = line.as_str();
        let w = words(line);
        let Some(cmd) = w.first().map(String::as_str) else {
            continue;
        };
        match cmd {
            "menuentry" | "submenu" => {
                if depth == 0 {
                    let id = w
                        .iter()
                        .position(|a| a == "--id" || a == "$menuentry_id_option")
                        .and_then(|i| w.get(i + 1))
                        .cloned();
                    let item = MenuItem {
                        entry: (cmd == "menuentry").then(|| EntrySpec {
                            title: w.get(1).cloned().unwrap_or_default(),
                            ..Default::default()
                        }),
                        id,
                    };
                    if cmd == "menuentry" {
                        current = Some(item);
                    } else {
                        top_items.push(item);
                    }
                }
                if line.ends_with('{') {
                    depth += 1;
                }
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    if let Some(e) = current.take() {
                        top_items.push(e);
                    }
                }
            }
            "set" if depth == 0 => {
                if let Some(v) = w.get(1).and_then(|a| a.strip_prefix("default=")) {
                    default = Some(expand(v, vars));
                }
            }
            "blscfg" => bls = true,
            "linux" | "linux16" | "linuxefi" if depth == 1 => {
                if let (Some(e), Some(k)) =
                    (current.as_mut().and_then(|c| c.entry.as_mut()), w.get(1))
                {
                    e.linux = grub_path(&expand(k, vars));
                    e.options = expand_words(w[2..].iter().map(String::as_str), vars).join(" ");
                }
            }
            "initrd" | "initrd16" | "initrdefi" if depth == 1 => {
                if let Some(e) = current.as_mut().and_then(|c| c.entry.as_mut()) {
                    e.initrd = expand_words(w[1..].iter().map(String::as_str), vars)
                        .iter()
                        .map(|p| grub_path(p))
                        .collect();
                }
            }
            _ => {}
        }
    }
    let bootable = |i: &MenuItem| i.entry.clone().filter(|e| !e.linux.is_empty());
    let named = default.as_deref().and_then(|d| match d.parse::<usize>() {
        Ok(n) => top_items.get(n),
        Err(_) => top_items
            .iter()
            .find(|i| i.id.as_deref() == Some(d) || i.entry.as_ref().is_some_and(|e| e.title == d)),
    });
    let pick = named
        .and_then(bootable)
        .or_else(|| top_items.iter().find_map(bootable));
    match pick {
        Some(e) => Some(e),
        None if bls => Some(EntrySpec::default()),
        None => None,
    }
}

/// A BootLoaderSpec entry file (`/loader/entries/*.conf`).
pub fn parse_bls(text: &str, vars: &Vars) -> EntrySpec {
    let mut e = EntrySpec::default();
    for line in text.lines() {
        let line = line.trim();
        let (k, v) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let v = v.trim();
        match k {
            "title" => e.title = v.to_string(),
            // Values are words with variables, as GRUB's blscfg reads them
            // (RHEL writes `initrd /initramfs-….img $tuned_initrd`).
            "linux" => {
                if let Some(k) = expand_words(v.split_whitespace(), vars).first() {
                    e.linux = grub_path(k);
                }
            }
            "initrd" => e.initrd.extend(
                expand_words(v.split_whitespace(), vars)
                    .iter()
                    .map(|p| grub_path(p)),
            ),
            "options" => e.options = expand_words(v.split_whitespace(), vars).join(" "),
            _ => {}
        }
    }
    e
}

/// The size of the file at `path` (symlinks followed).
fn size_of(fs: &Filesystem, path: &str) -> Result<u64> {
    let m = fs.fs.metadata(path)?;
    if m.kind != EntryKind::File {
        return Err(Error::Fs {
            place: fs.place.clone(),
            msg: format!("{path}: not a regular file"),
        });
    }
    Ok(m.size)
}

/// Reads a whole file, refusing one larger than [`MAX_BOOT_FILE`].
fn read_file(fs: &Filesystem, path: &str) -> Result<Vec<u8>> {
    let size = size_of(fs, path)?;
    if size > MAX_BOOT_FILE {
        return Err(Error::TooLarge {
            place: fs.place.clone(),
            path: path.into(),
            size,
            max: MAX_BOOT_FILE,
        });
    }
    fs.fs.read(path, MAX_BOOT_FILE)
}

fn read_text(fs: &Filesystem, path: &str, max: u64) -> Option<String> {
    fs.fs
        .read(path, max)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The newest BootLoaderSpec entry under `dir` (highest file name, as
/// GRUB's blscfg sorts them).
fn newest_bls(fs: &Filesystem, env: &Vars) -> Option<(String, EntrySpec)> {
    for dir in ["/loader/entries", "/boot/loader/entries"] {
        let Ok(rd) = fs.fs.list(dir) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n.ends_with(".conf"))
            .collect();
        names.sort();
        if let Some(n) = names.last() {
            let path = format!("{dir}/{n}");
            let text = read_text(fs, &path, MAX_CONFIG)?;
            return Some((path, parse_bls(&text, env)));
        }
    }
    None
}

/// Loads the files an entry names from `fs`.
fn load(fs: &Filesystem, source: String, spec: EntrySpec) -> Result<BootEntry> {
    let kernel = read_file(fs, &spec.linux)?;
    let initrd = if spec.initrd.is_empty() {
        None
    } else {
        // GRUB concatenates several initrd files (microcode first); their
        // sizes are added up before any is read.
        let mut total = 0u64;
        for p in &spec.initrd {
            total = total.saturating_add(size_of(fs, p).unwrap_or(0));
        }
        if total > MAX_BOOT_FILE {
            return Err(Error::TooLarge {
                place: fs.place.clone(),
                path: spec.initrd.join(" ").into(),
                size: total,
                max: MAX_BOOT_FILE,
            });
        }
        let mut data = Vec::new();
        for p in &spec.initrd {
            data.extend_from_slice(&read_file(fs, p)?);
        }
        Some((spec.initrd.join(" "), data))
    };
    Ok(BootEntry {
        source,
        title: spec.title,
        kernel_path: spec.linux,
        kernel,
        initrd,
        cmdline: spec.options,
    })
}

/// What one file system says the guest boots, if anything.
fn entry_on(fs: &Filesystem) -> Option<Result<BootEntry>> {
    for cfg in [
        "/boot/grub/grub.cfg",
        "/grub/grub.cfg",
        "/boot/grub2/grub.cfg",
        "/grub2/grub.cfg",
    ] {
        let Some(text) = read_text(fs, cfg, MAX_CONFIG) else {
            continue;
        };
        let dir = &cfg[..cfg.rfind('/').unwrap_or(0)];
        let env = read_text(fs, &format!("{dir}/grubenv"), MAX_GRUBENV)
            .map(|t| grubenv(&t))
            .unwrap_or_default();
        match parse_grub_cfg(&text, &env) {
            Some(spec) if !spec.linux.is_empty() => {
                return Some(load(fs, format!("{}: {cfg}", fs.place), spec));
            }
            Some(_) => {
                if let Some((path, spec)) = newest_bls(fs, &env) {
                    return Some(load(fs, format!("{}: {path}", fs.place), spec));
                }
            }
            None => {}
        }
    }
    // BootLoaderSpec entries without GRUB (systemd-boot), $kernelopts
    // from a grubenv beside them if there is one.
    let env = ["/grub2/grubenv", "/boot/grub2/grubenv"]
        .iter()
        .find_map(|p| read_text(fs, p, MAX_GRUBENV))
        .map(|t| grubenv(&t))
        .unwrap_or_default();
    if let Some((path, spec)) = newest_bls(fs, &env) {
        if !spec.linux.is_empty() {
            return Some(load(fs, format!("{}: {path}", fs.place), spec));
        }
    }
    // Debian's links, with this file system as root.
    for (k, i) in [
        ("/vmlinuz", "/initrd.img"),
        ("/boot/vmlinuz", "/boot/initrd.img"),
    ] {
        if fs.fs.metadata(k).is_ok() {
            let initrd = if fs.fs.metadata(i).is_ok() {
                vec![i.to_string()]
            } else {
                Vec::new()
            };
            let spec = EntrySpec {
                title: "Linux (the /vmlinuz link)".into(),
                linux: k.into(),
                initrd,
                options: format!("root=UUID={} ro", fs.uuid),
            };
            return Some(load(fs, format!("{}: {k}", fs.place), spec));
        }
    }
    None
}

/// Finds what the guest boots: the first disk, then the next, each
/// partition in order, then the LVM logical volumes.
pub fn find_boot_entry(disks: &[Arc<dyn ImageReader>]) -> Result<BootEntry> {
    let looked: Vec<String> = disks
        .iter()
        .map(|d| d.path().display().to_string())
        .collect();
    for f in vfs::scan(disks)?
        .iter()
        .filter(|f| f.info.kind.readable() && f.info.kind != vfs::FsKind::Ntfs)
    {
        let Ok(fs) = vfs::open(f) else { continue };
        let fs = Filesystem {
            place: f.info.place.clone(),
            uuid: f.info.uuid.clone().unwrap_or_default(),
            fs,
        };
        if let Some(e) = entry_on(&fs) {
            return e;
        }
    }
    Err(Error::NoBootConfig(looked.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = r#"
set default="0"
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
fi
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-5b09' {
	load_video
	insmod ext2
	search --no-floppy --fs-uuid --set=root 5b09
	echo	'Loading Linux 6.1.0-50-cloud-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=5b09 ro  quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-50-cloud-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-5b09' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-50-cloud-amd64 (recovery mode)' {
		linux	/boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=5b09 ro single
	}
}
"#;

    #[test]
    fn debian_grub_cfg_first_entry() {
        let e = parse_grub_cfg(DEBIAN, &Vars::new()).unwrap();
        assert_eq!(e.title, "Debian GNU/Linux");
        assert_eq!(e.linux, "/boot/vmlinuz-6.1.0-50-cloud-amd64");
        assert_eq!(e.initrd, vec!["/boot/initrd.img-6.1.0-50-cloud-amd64"]);
        assert_eq!(e.options, "root=UUID=5b09 ro quiet");
    }

    #[test]
    fn default_index_counts_submenus_and_falls_back_to_the_first() {
        let cfg =
            "set default=\"1\"\nmenuentry 'A' {\n linux /a\n}\nmenuentry 'B' {\n linux /b x=1\n}\n";
        assert_eq!(parse_grub_cfg(cfg, &Vars::new()).unwrap().linux, "/b");
        // default=1 names the submenu: the first entry is booted.
        let cfg = DEBIAN.replace("set default=\"0\"", "set default=\"1\"");
        assert_eq!(
            parse_grub_cfg(&cfg, &Vars::new()).unwrap().title,
            "Debian GNU/Linux"
        );
    }

    #[test]
    fn separate_boot_partition_paths_and_device_prefix() {
        let cfg = "menuentry 'U' {\n linux ($root)/vmlinuz-5.15 root=/dev/mapper/vg-root ro $vt_handoff\n initrd /initrd.img-5.15\n}\n";
        let e = parse_grub_cfg(cfg, &Vars::new()).unwrap();
        assert_eq!(e.linux, "/vmlinuz-5.15");
        assert_eq!(e.options, "root=/dev/mapper/vg-root ro");
    }

    #[test]
    fn blscfg_with_kernelopts_from_grubenv() {
        let cfg = "set default=\"${saved_entry}\"\ninsmod blscfg\nblscfg\n";
        assert_eq!(
            parse_grub_cfg(cfg, &Vars::new()),
            Some(EntrySpec::default())
        );
        let env = grubenv("# GRUB Environment Block\nkernelopts=root=/dev/mapper/rhel-root ro crashkernel=auto\n###");
        let e = parse_bls(
            "title Red Hat Enterprise Linux (4.18.0-477.el8.x86_64) 8.8\nversion 4.18.0\nlinux /vmlinuz-4.18.0-477.el8.x86_64\ninitrd /initramfs-4.18.0-477.el8.x86_64.img $tuned_initrd\noptions $kernelopts $tuned_params\n",
            &env,
        );
        assert_eq!(e.linux, "/vmlinuz-4.18.0-477.el8.x86_64");
        assert_eq!(e.initrd, vec!["/initramfs-4.18.0-477.el8.x86_64.img"]);
        assert_eq!(e.options, "root=/dev/mapper/rhel-root ro crashkernel=auto");
    }

    #[test]
    fn expansion_is_bounded() {
        let mut vars = Vars::new();
        vars.insert("a".into(), "x".repeat(1 << 20));
        let line = format!("menuentry 'A' {{\n linux /k {}\n}}\n", "$a ".repeat(1000));
        let e = parse_grub_cfg(&line, &vars).unwrap();
        assert!(e.options.len() <= MAX_EXPANDED, "{}", e.options.len());
    }

    #[test]
    fn words_keep_quoted_spaces() {
        assert_eq!(
            words(r#"menuentry 'Debian GNU/Linux' --class "a b" x\ y"#),
            vec!["menuentry", "Debian GNU/Linux", "--class", "a b", "x y"]
        );
    }

    #[test]
    fn one_line_entries_titles_ids_and_chainloader_entries() {
        let cfg = "menuentry 'A' { linux /a; initrd /ia; }\nmenuentry 'B' --id b-id { linux /b x=${v} ; initrd /ib }\n";
        let mut vars = Vars::new();
        vars.insert("v".into(), "1".into());
        let e = parse_grub_cfg(cfg, &vars).unwrap();
        assert_eq!(
            (e.linux.as_str(), e.initrd.clone()),
            ("/a", vec!["/ia".to_string()])
        );
        let by_id = format!("set default=b-id\n{cfg}");
        let e = parse_grub_cfg(&by_id, &vars).unwrap();
        assert_eq!((e.linux.as_str(), e.options.as_str()), ("/b", "x=1"));
        let by_title = format!("set default='B'\n{cfg}");
        assert_eq!(parse_grub_cfg(&by_title, &vars).unwrap().linux, "/b");
        // saved_entry from grubenv.
        vars.insert("saved_entry".into(), "B".into());
        let saved = format!("set default=\"${{saved_entry}}\"\n{cfg}");
        assert_eq!(parse_grub_cfg(&saved, &vars).unwrap().linux, "/b");
        // A first (default) entry that chainloads Windows: the Linux one.
        let dual = "menuentry 'Windows' {\n insmod chain # a comment\n chainloader +1\n}\nmenuentry 'Linux' {\n linux /vmlinuz root=/dev/sda2 # tail\n}\n";
        let e = parse_grub_cfg(dual, &Vars::new()).unwrap();
        assert_eq!(
            (e.title.as_str(), e.options.as_str()),
            ("Linux", "root=/dev/sda2")
        );
    }

    #[test]
    fn no_menuentry_is_none() {
        assert_eq!(parse_grub_cfg("set timeout=5\n", &Vars::new()), None);
    }
}
